"""Runs that must not mix or crash: one segment run per folder (shards share it, each shard once), decompression
bombs met while planning, weights full of NaN, and run folders that are files or hold nothing to resume.

Tiny and quick: a 3-layer model of 52k parameters on 48x64 images; the rival run is a subprocess that holds a lock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crate_vis.cli import main
from crate_vis.io.runlock import LOCK_NAME


@pytest.fixture()
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"p{k}.png")
    return folder


class _Holder:
    """Another process holding the lock file ``name`` of ``folder`` until it is stopped."""

    def __init__(self, folder: Path, name: str = LOCK_NAME) -> None:
        code = textwrap.dedent(f"""
            import sys, time
            from crate_vis.io.runlock import RunLock
            lock = RunLock({str(folder)!r}, {name!r}, what="segment run").acquire()
            print("held", flush=True)
            sys.stdin.read()
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture()
def holder() -> Iterator[list[_Holder]]:
    held: list[_Holder] = []
    yield held
    for h in held:
        h.kill()


def _segment(photos: Path, out: Path, ckpt: Path, *extra: str) -> int:
    return main(["segment", str(photos), "--out", str(out), "-c", str(ckpt), "--method", "dino", "--no-progress",
                 *extra])  # fmt: skip


# ------------------------------------------------------------------------------ one segment run per folder
def test_a_second_segment_run_into_a_busy_folder_is_refused_naming_the_first(tmp_path, photos, ckpt, capsys, holder):
    out = tmp_path / "out"
    holder.append(_Holder(out))
    assert _segment(photos, out, ckpt) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pid {holder[0].proc.pid}" in err and "segment run" in err, err
    assert not (out / "results.json").exists()  # nothing of the refused run was written
    holder[0].kill()  # the first run dies: its lock is stale and the next run reclaims it
    assert _segment(photos, out, ckpt) == 0
    assert json.loads((out / "run.json").read_text())["processed"] == 3
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_shards_share_a_folder_but_each_shard_runs_once(tmp_path, photos, ckpt, capsys, holder):
    out = tmp_path / "out"
    holder.append(_Holder(out, "shard-00000-of-00002.lock"))  # shard 0 of 2 is running elsewhere
    assert _segment(photos, out, ckpt, "--shard", "1/2") == 0  # the other shard runs beside it
    assert _segment(photos, out, ckpt, "--shard", "0/2") == 1  # the same shard twice: refused
    assert "shard 0/2" in capsys.readouterr().err
    assert _segment(photos, out, ckpt) == 1  # a whole-folder run while a shard runs: refused
    assert "its shard 0/2" in capsys.readouterr().err
    assert main(["segment", "--merge", "--out", str(out)]) == 1  # nor a merge
    assert "its shard 0/2" in capsys.readouterr().err
    holder[0].kill()
    assert _segment(photos, out, ckpt, "--shard", "0/2") == 0  # the dead shard's lock is reclaimed
    assert main(["segment", "--merge", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["processed"] == 3


# ------------------------------------------------------------------------------ decompression bombs
def test_a_decompression_bomb_first_in_the_folder_is_skipped_and_the_rest_segmented(
    tmp_path, photos, ckpt, capsys, monkeypatch
):
    """The input-size warning reads headers; a header over the pixel limit must be skipped there, as the loader
    skips it later, not end the run with a traceback."""
    Image.fromarray(np.zeros((200, 300, 3), np.uint8)).save(photos / "a_bomb.png")  # sorted first
    monkeypatch.setenv("CRATE_VIS_MAX_PIXELS", "10000")  # 300x200 = 60000 px is over; the 64x48 photos are not
    assert _segment(photos, tmp_path / "out", ckpt) == 0
    captured = capsys.readouterr()
    assert "3 processed, 1 skipped" in captured.out, captured.out
    assert "a_bomb.png" in captured.err and "Traceback" not in captured.err


# ------------------------------------------------------------------------------ weights and run folders
def test_nan_weights_are_named_as_nan_not_as_a_config_mismatch(tmp_path, photos, ckpt, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = next(bad.glob("*.safetensors"))
    sd = load_file(weights)
    name = sorted(k for k, v in sd.items() if v.is_floating_point() and v.ndim == 2)[0]
    sd[name][0, 0] = float("nan")
    save_file(sd, weights)
    assert _segment(photos, tmp_path / "out", bad) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NaN" in err and name in err and "config" not in err, err


def test_train_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    argv = ["train", "--data", "synthetic", "--model", "crate_test_patch8_32", "--epochs", "1", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "f")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file, not a folder" in err and "Errno" not in err, err
    assert (tmp_path / "f").read_text() == "x"  # untouched


@pytest.mark.parametrize("state", ["never-created", "config-only"])
def test_resume_of_a_folder_without_a_checkpoint_says_so(tmp_path, capsys, state):
    run = tmp_path / "run"
    if state == "config-only":
        run.mkdir()
        (run / "config.yaml").write_text("model: crate_test_patch8_32\n")
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    want = "no checkpoint to resume" if state == "config-only" else "no run to resume"
    assert len(err.splitlines()) == 1 and want in err and "--data is required" not in err, err


def test_an_output_in_the_way_is_refused_before_the_work(tmp_path, photos, ckpt, capsys, monkeypatch):
    """heads' figure and score's file (io.outputs.writable_file), eval's folder (writable_folder): one line, and
    no model runs first."""
    from crate_vis.experiments import heads as heads_module

    monkeypatch.setattr(heads_module, "image_attention", lambda *a, **k: pytest.fail("the model ran"))
    (tmp_path / "fig.png").mkdir()
    assert main(["heads", str(photos), "--out", str(tmp_path / "fig.png"), "-c", str(ckpt)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "is a folder" in err, err
    (tmp_path / "file").write_text("x")
    assert main(["heads", str(photos), "--out", str(tmp_path / "file" / "fig.png"), "-c", str(ckpt)]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["eval", "--data", str(photos), "--checkpoint", str(ckpt), "--out", str(tmp_path / "file")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "is a file, not a folder" in err, err
    assert (tmp_path / "file").read_text() == "x"

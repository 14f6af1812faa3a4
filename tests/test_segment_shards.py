"""Segmenting on many processes: shards, merges and torchrun give exactly what one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crate_vis import create_model, save_model
from crate_vis.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    torch.manual_seed(0)
    save_model(create_model("crate_test_patch8_32").eval(), root / "w")
    rng = np.random.default_rng(0)
    (root / "in" / "sub").mkdir(parents=True)
    for k in range(7):
        h, w = (40, 56) if k % 2 else (48, 32)
        img = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
        img[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = rng.integers(150, 255, 3)
        Image.fromarray(img).save(root / "in" / ("sub" if k == 3 else "") / f"im{k}.png")
    (root / "in" / "broken.png").write_bytes(b"not an image")
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["segment", str(root / "in"), "--out", str(out), "-c", str(root / "w"), "--img-size", "32", "--method",
            "maskcut", "--no-progress", *extra]  # fmt: skip


def _summary(out: Path) -> tuple[bytes, bytes]:
    return (out / "results.json").read_bytes(), (out / "images.json").read_bytes()


def test_shards_then_merge_equal_one_process(setup, capsys):
    root = setup
    single = root / "single"
    assert main(_args(root, single)) == 0
    sharded = root / "sharded"
    for i in range(3):
        assert main(_args(root, sharded, "--shard", f"{i}/3")) == 0
        assert not (sharded / "results.json").exists()  # nothing merged until asked
    assert main(["segment", "--merge", "--out", str(sharded)]) == 0
    assert _summary(sharded) == _summary(single)
    run = json.loads((sharded / "run.json").read_text())
    assert run["processed"] == 7 and run["skipped"] == 1
    # a killed shard resumes: its records are kept, the rerun skips them
    stamp = {p.name: p.stat().st_mtime_ns for p in (sharded / "images").glob("*.json")}
    assert main(_args(root, sharded, "--shard", "1/3")) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (sharded / "images").glob("*.json")} == stamp


def test_bad_shards_and_incomplete_merges_are_refused(setup, capsys):
    root = setup
    assert main(_args(root, root / "x", "--shard", "3/3")) == 1
    assert "the index must be in 0..2" in capsys.readouterr().err
    out = root / "partial"
    assert main(_args(root, out, "--shard", "0/2")) == 0
    assert main(["segment", "--merge", "--out", str(out)]) == 1
    assert "shard(s) 1 of 2 have not finished" in capsys.readouterr().err
    assert main(_args(root, out, "--shard", "1/2", "--tau", "0.3")) == 1  # other settings into the same run folder
    assert "other settings" in capsys.readouterr().err
    assert not (out / "results.json").exists()  # nothing merged from a mix
    assert main(["segment", "--merge", "--out", str(root / "nothing")]) == 1


def test_two_gloo_processes_equal_one(setup):
    """torchrun --nproc_per_node 2 -m crate_vis segment: byte-identical merged results to one process."""
    root = setup
    single = root / "single_tr"
    assert main(_args(root, single)) == 0
    out = root / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m",
           "crate_vis", *_args(root, out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _summary(out) == _summary(single)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000-of-00002.json", "00001-of-00002.json"]

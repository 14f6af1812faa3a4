"""Run-folder safety: one run per folder (run.lock), stale locks reclaimed, a full disk keeps the last checkpoint."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_train import TensorSet, make_image_folder, tiny_cfg

from crate_vis.errors import RunFolderError
from crate_vis.io.runlock import LOCK_NAME, RunLock, read_lock
from crate_vis.train import Trainer, train
from crate_vis.train.checkpointing import DiskFullError, is_disk_full

HOLDER = """
import sys, time
from crate_vis.io.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture()
def holder(tmp_path):
    """A second process holding the lock of ``tmp_path / "run"``; yields the Popen (killed afterwards)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(tmp_path / "run")],
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def _write_lock(run: Path, **info) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "started": "earlier", "token": "x", **info}))


# ------------------------------------------------------------------------------------------------------ the lock
def test_second_run_is_refused_while_another_process_holds_the_folder(tmp_path, holder, capsys):
    from crate_vis.cli import main

    cfg = tiny_cfg(tmp_path, epochs=1)
    with pytest.raises(RunFolderError, match=rf"{tmp_path / 'run'} is in use .*pid {holder.pid} "):
        train(cfg, TensorSet(8))
    assert read_lock(tmp_path / "run" / LOCK_NAME)["pid"] == holder.pid  # the holder's lock is left alone
    rc = main(["train", "--data", str(make_image_folder(tmp_path / "data", per_class=2, size=16)), "--model",
               "crate_test_patch8_32", "--out", str(tmp_path / "run"), "--workers", "0", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and f"pid {holder.pid}" in err[0] and str(tmp_path / "run") in err[0]
    # once the holder is killed (SIGKILL: no clean-up), its lock is stale and the next run reclaims it
    holder.kill()
    holder.wait()
    result = train(cfg, TensorSet(8))
    assert result.epochs_completed == 1 and not (tmp_path / "run" / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_pid_is_reclaimed_with_a_log_line(tmp_path, caplog):
    dead = _dead_pid()
    _write_lock(tmp_path / "run", pid=dead)
    with caplog.at_level(logging.WARNING, logger="crate_vis"):
        train(tiny_cfg(tmp_path, epochs=1), TensorSet(8))
    assert any("reclaimed the stale lock" in r.message and str(dead) in r.message for r in caplog.records)
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_reused_pid_and_own_leftover_lock_are_stale(tmp_path, holder):
    # the pid runs, but it is a later process than the one that wrote the lock (its start time differs)
    _write_lock(tmp_path / "other", pid=holder.pid, pid_start=1)
    RunLock(tmp_path / "other").acquire().release()
    # a lock with this process's pid that no RunLock of this process holds (left by an earlier process of this pid)
    _write_lock(tmp_path / "mine", pid=os.getpid())
    RunLock(tmp_path / "mine").acquire().release()
    # a lock from another host cannot be checked: respected, with a hint
    _write_lock(tmp_path / "remote", pid=_dead_pid(), host="elsewhere.example")
    with pytest.raises(RunFolderError, match=r"on host elsewhere\.example.*delete .*run\.lock"):
        RunLock(tmp_path / "remote").acquire()


def test_one_process_cannot_open_one_folder_twice_and_exceptions_release(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=1)
    first = Trainer(cfg, TensorSet(8))
    with pytest.raises(RunFolderError, match=f"pid {os.getpid()}"):
        Trainer(cfg, TensorSet(8))
    first.close()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    Trainer(cfg, TensorSet(8)).fit()  # fit releases at the end
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    # an error during set-up (here: last.pt exists without --resume) releases the lock too
    with pytest.raises(FileExistsError):
        Trainer(cfg, TensorSet(8))
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    # and a failed run into a new folder leaves no empty folder behind
    with pytest.raises(ValueError, match="needs a GPU"):
        train(tiny_cfg(tmp_path / "new", amp="fp16", device="cpu"), TensorSet(8))
    assert not (tmp_path / "new" / "run").exists()


def test_lock_released_when_training_raises(tmp_path):
    from crate_vis.train import NonFiniteLossError

    with pytest.raises(NonFiniteLossError):
        train(tiny_cfg(tmp_path, epochs=3), TensorSet(16, nan_after=16))
    assert not (tmp_path / "run" / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------------- disk full
class _FullDisk:
    """File object that accepts ``room`` bytes, then fails the way a full disk does (ENOSPC)."""

    def __init__(self, fh, room: int):
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.room:
            self.fh.write(bytes(memoryview(data).cast("B")[: self.room]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()

    def fileno(self) -> int:
        return self.fh.fileno()


def test_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    import crate_vis.train.checkpointing as ckpt

    real = ckpt.atomic_write
    saves = []

    @contextlib.contextmanager
    def full_on_second_last_pt(path, mode="w", **kw):  # the second save of last.pt meets a full disk half-way
        with real(path, mode, **kw) as fh:
            if Path(path).name == "last.pt":
                saves.append(path)
                if len(saves) == 2:
                    fh = _FullDisk(fh, 4096)
            yield fh

    monkeypatch.setattr(ckpt, "atomic_write", full_on_second_last_pt)
    cfg = tiny_cfg(tmp_path, epochs=3)
    with pytest.raises(DiskFullError, match=rf"disk full: could not write {tmp_path / 'run' / 'last.pt'}.*epoch 1"):
        train(cfg, TensorSet(8))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temporary file left
    assert not (tmp_path / "run" / LOCK_NAME).exists()

    # the command line says it in one line
    from crate_vis.cli import main

    saves.clear()
    root = make_image_folder(tmp_path / "data", per_class=4, size=16)
    rc = main(["train", "--data", str(root), "--model", "crate_test_patch8_32", "--img-size", "32", "--batch-size", "8",
               "--epochs", "2", "--workers", "0", "--no-progress", "--out", str(tmp_path / "cli")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "disk full" in err[0] and str(tmp_path / "cli" / "last.pt") in err[0]


def test_full_disk_while_writing_metrics_names_the_file(tmp_path, monkeypatch):
    import crate_vis.train.engine as engine

    real = engine.atomic_write
    calls = []

    @contextlib.contextmanager
    def full_on_second_metrics(path, mode="w", **kw):
        with real(path, mode, **kw) as fh:
            if Path(path).name == "metrics.csv":
                calls.append(path)
                if len(calls) == 2:
                    fh.write("epoch,train_loss\n1,")
                    raise OSError(errno.ENOSPC, "No space left on device")
            yield fh

    monkeypatch.setattr(engine, "atomic_write", full_on_second_metrics)
    with pytest.raises(DiskFullError, match=rf"disk full: could not write {tmp_path / 'run' / 'metrics.csv'}"):
        train(tiny_cfg(tmp_path, epochs=3), TensorSet(8))
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("1,")  # the previous, complete file


def test_is_disk_full_follows_causes_and_messages():
    wrapped = RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
    wrapped.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(wrapped)
    rust = 'Error while serializing: IoError(Os { code: 28, message: "No space left on device" })'  # safetensors
    assert is_disk_full(RuntimeError(rust))
    assert not is_disk_full(RuntimeError("file write failed")) and not is_disk_full(OSError(errno.EACCES, "denied"))

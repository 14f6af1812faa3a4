"""Training checkpoints that lose nothing and load with ``torch.load(weights_only=True)``.

``last.pt`` holds everything a resumed run needs: model, optimizer, scheduler, gradient scaler, EMA weights, epoch,
step, position inside the epoch, best metric, the RNG states of torch / CUDA / numpy / python (per rank), and the
resolved config. Every value is a tensor or a plain Python container of primitives, so the file reloads with
``weights_only=True``: RNG states that are not tensors (numpy's, python's) are converted here. Files are written
atomically, so a kill during a save leaves the previous checkpoint intact; so does a full disk, which is reported
as :class:`DiskFullError` ("disk full" and the path) instead of whatever the writer happened to raise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CrateVisError
from ..io.atomic import atomic_write
from ..models.checkpoint import RUN_CHECKPOINT_FORMAT

__all__ = [
    "CHECKPOINT_FORMAT", "DiskFullError", "capture_rng_state", "is_disk_full", "load_training_state",
    "reporting_disk_full", "restore_rng_state", "save_training_state", "seed_everything",
]  # fmt: skip

#: Marker stored in every training checkpoint.
CHECKPOINT_FORMAT = RUN_CHECKPOINT_FORMAT
CHECKPOINT_VERSION = 1


class DiskFullError(CrateVisError, OSError):
    """A file could not be written because its disk (or the user's quota) is full; the file it replaces is intact.

    The message says what was written, what is intact and what to do; ``path`` is the file. ``errno`` is left unset
    (the system's ENOSPC or EDQUOT is the ``__cause__``), so that the message is shown as it is, not re-worded.
    """

    def __init__(self, message: str, path: str | os.PathLike[str]) -> None:
        super().__init__(message)
        self.path = str(path)


_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT} if hasattr(errno, "EDQUOT") else {errno.ENOSPC}
_FULL_TEXTS = ("no space left on device", "disk quota exceeded")


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err``, or an exception it was raised from, reports a full disk or quota.

    ``torch.save`` wraps the ``OSError`` of its file in a ``RuntimeError``, and writers in other languages only
    keep the system's message, so the chain of causes and the messages are searched.

    Example:
        >>> is_disk_full(RuntimeError("write failed")), is_disk_full(OSError(errno.ENOSPC, "No space left"))
        (False, True)
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return True
        if any(text in str(current).lower() for text in _FULL_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextlib.contextmanager
def reporting_disk_full(
    path: str | os.PathLike[str], kept: str | None = None, then: str = "continue with --resume"
) -> Iterator[None]:
    """Turn a full-disk failure inside the block into :class:`DiskFullError` naming ``path``.

    Args:
        path: the file the block writes (atomically: on failure the previous version stays).
        kept: what is still intact, for the message (default: the previous ``path``, when there is one).
        then: what to do once there is space again, for the message.

    Raises:
        DiskFullError: "disk full: could not write PATH; ... is intact; free some space on that disk, then ...".

    Example:
        >>> with reporting_disk_full("run/last.pt"):  # doctest: +ELLIPSIS
        ...     raise OSError(errno.ENOSPC, "No space left on device")
        Traceback (most recent call last):
        crate_vis.train.checkpointing.DiskFullError: disk full: could not write run/last.pt; ...
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if not is_disk_full(err):
            raise
        p = Path(path)
        if kept is None:
            kept = f"the previous {p.name} is intact" if p.exists() else f"no partial {p.name} was left"
        raise DiskFullError(f"disk full: could not write {p}; {kept}; free some space on that disk, then {then}",
                            p) from err  # fmt: skip


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The RNG states of torch, CUDA, numpy and python as tensors and primitives."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},  # fmt: skip
        "python": {"version": int(version), "internal": [int(v) for v in internal], "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"])))
    p = state["python"]
    random.setstate((int(p["version"]), tuple(int(v) for v in p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.to(torch.uint8).cpu() for t in state["cuda"]])


def _to_saveable(obj: Any) -> Any:
    """Tensors to CPU and tuples to lists, recursively, so the file reloads with ``weights_only=True``."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _to_saveable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_saveable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a weights-only checkpoint")


def save_training_state(
    path: str | os.PathLike[str], state: Mapping[str, Any], *, kept: str | None = None,
    then: str = "continue with --resume",
) -> None:
    """Write a training checkpoint atomically (temp file + rename).

    Args:
        path: the checkpoint file.
        state: what to store (tensors and plain containers).
        kept: what stays intact if the disk is full, for the message (default: the previous file).
        then: what to do once there is space again, for the message.

    Raises:
        DiskFullError: the disk or quota is full; the previous file at ``path`` is unchanged.
    """
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **_to_saveable(state)}
    with reporting_disk_full(path, kept, then):
        # through a Python file object, so that the OSError of a failed write (ENOSPC) survives torch's wrapping
        with atomic_write(Path(path), "wb") as fh:
            torch.save(payload, fh)


def load_training_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_training_state` (``weights_only=True``).

    Raises:
        FileNotFoundError: no file.
        ValueError: not a crate-vis training checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile, KeyError, ValueError,
            IndexError, TypeError) as err:  # the legacy (non-zip) reader fails with lookup errors on other files
        raise ValueError(f"{p}: unreadable training checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{p} is not a crate-vis training checkpoint (use --pretrained to start from other weights)")
    return state

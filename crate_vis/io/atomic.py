"""Atomic file writes: a kill leaves the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_save"]


def _umask() -> int:
    """The process umask, read without changing it where Linux exposes it (os.umask can only read by setting)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(dest: Path) -> int:
    """Permissions for the new file: those of the file it replaces, else what ``open`` would give (0o666 & ~umask).

    ``tempfile.mkstemp`` creates files readable by their owner only (0o600); renamed as they are, every output
    would be unreadable to the rest of a shared group.
    """
    try:
        return stat.S_IMODE(dest.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def _staged(dest: Path, prefix: str, suffix: str) -> Iterator[tuple[int, str]]:
    """A new temporary file beside ``dest`` (its open descriptor and path), renamed over ``dest`` with the right
    permissions (:func:`_final_mode`) when the block ends without error, removed otherwise (``dest`` untouched)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dest.parent)
    try:
        yield fd, tmp
        os.chmod(tmp, _final_mode(dest))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` and rename it over ``path`` when the block ends without error.

    Args:
        path: destination file; its folder is created if missing.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        **open_kwargs: passed to :func:`open` (e.g. ``encoding``, ``newline``).

    Yields:
        The open temporary file. On an exception it is removed and ``path`` is left untouched.
    """
    if mode not in {"w", "wb"}:
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    dest = Path(path)
    if mode == "w":
        open_kwargs.setdefault("encoding", "utf-8")
    with _staged(dest, f".{dest.name}.", ".tmp") as (fd, _tmp), os.fdopen(fd, mode, **open_kwargs) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, **dump_kwargs: Any) -> None:
    """Serialise ``obj`` as JSON to ``path`` atomically."""
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, **dump_kwargs)


def atomic_save(path: str | os.PathLike[str], save_fn: Any) -> None:
    """Atomically write a file produced by a library writer that takes a path or file object.

    Args:
        path: destination; the temporary file keeps its suffix so that format sniffing by suffix still works.
        save_fn: callable receiving the temporary path (e.g. ``lambda p: fig.savefig(p, dpi=150)``).
    """
    dest = Path(path)
    with _staged(dest, f".{dest.stem}.", f".tmp{dest.suffix}") as (fd, tmp):
        os.close(fd)
        save_fn(tmp)
        # Library writers rarely fsync; do it so that a power cut after the rename cannot leave an empty file.
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())

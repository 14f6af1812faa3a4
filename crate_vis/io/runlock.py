"""One run per run folder: a lock file that a second run refuses and a dead run's leftover gives way to.

Used by ``crate-vis train`` (``RUN_DIR/run.lock``) and ``crate-vis segment`` (``OUT/run.lock``, or one lock per
shard, ``OUT/shard-00000-of-00004.lock``, since the shards of one run share their folder by design).

:class:`RunLock` creates the lock file exclusively, holding the owner's pid, host name and start time as JSON.
The file is written completely under a temporary name first and then hard-linked to its name: like an
``O_EXCL`` creation, the link fails when the name exists, and in addition nobody ever reads a half-written lock
(where the file system has no hard links, an ``O_CREAT | O_EXCL`` creation is used instead). The temporary name
(``.run.lock.<token>.new``) is not one that the clean-up of interrupted atomic writes removes.

A second run finding the lock stops with one line naming the folder and the holder's pid. A lock whose pid no
longer runs on this host (a run killed with SIGKILL, or a machine that rebooted) is stale: it is reclaimed, with a
log line. A lock from another host cannot be checked and is always respected; its message says how to remove it.
The lock is released when the run ends, also on exceptions, and, failing that, when the :class:`RunLock` object is
garbage-collected or the interpreter exits.

Example:
    >>> import tempfile
    >>> from crate_vis.io.runlock import RunLock, read_lock
    >>> run = tempfile.mkdtemp()
    >>> with RunLock(run) as lock:
    ...     read_lock(lock.path)["pid"] == os.getpid()
    True
    >>> lock.path.exists()
    False
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

from ..errors import RunFolderError

__all__ = ["LOCK_NAME", "RunLock", "busy_message", "live_holder", "pid_alive", "read_lock"]

log = logging.getLogger(__name__)

#: Name of the lock file inside a run folder.
LOCK_NAME = "run.lock"

_HELD: set[str] = set()  # tokens of the locks this process holds now


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (``True`` when that cannot be told).

    Example:
        >>> pid_alive(os.getpid())
        True
    """
    if os.name == "nt":  # os.kill would terminate the process there
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists, owned by another user (or a pid this platform cannot express)
    return True


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux ``/proc``), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text(encoding="ascii", errors="replace")
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name before ")" may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def read_lock(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The holder recorded in a lock file (``pid``, ``host``, ``started``, ...), or ``None`` when there is none."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _is_stale(holder: dict[str, Any]) -> bool:
    """A lock of this host whose process is gone: no such pid, or the pid now names a later process."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    if pid == os.getpid():  # this process: stale unless one of its own RunLock objects holds it
        return holder.get("token") not in _HELD
    if not pid_alive(pid):
        return True
    recorded, now = holder.get("pid_start"), _start_ticks(pid)
    return isinstance(recorded, int) and now is not None and now != recorded


def live_holder(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The holder recorded in the lock file ``path`` if that lock is held by a live run, else ``None``.

    A missing, unreadable or stale lock (see :class:`RunLock`) has no live holder.
    """
    holder = read_lock(path)
    if holder is None or _is_stale(holder):
        return None
    return holder


def _release(path: Path, token: str) -> None:
    """Remove ``path`` if it is still the lock with ``token`` (never another run's)."""
    _HELD.discard(token)
    holder = read_lock(path)
    if holder is not None and holder.get("token") == token:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class RunLock:
    """The exclusive lock of one run folder (``RUN_DIR/run.lock``), or of one part of it (``name``).

    Args:
        run_dir: the run folder; created if missing.
        name: the lock file's name inside ``run_dir``.
        what: what holds the lock, for messages (``"training run"``, ``"segment run"``, ...).
        same_process_hint: what a message tells to do when another object of this process holds the lock.

    Raises:
        RunFolderError: from :meth:`acquire`, when a live run holds the folder, or ``run_dir`` cannot be a folder.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        name: str = LOCK_NAME,
        *,
        what: str = "training run",
        same_process_hint: str = "call its fit() or close() first, or choose another --out",
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / name
        self.what = what
        self.same_process_hint = same_process_hint
        self.token: str | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self.token is not None

    def acquire(self) -> RunLock:
        """Take the lock, reclaiming a stale one; returns ``self``.

        Raises:
            RunFolderError: another live run holds the folder (the message names its pid, host and start time).
        """
        if self.held:
            return self
        _make_folder(self.run_dir)
        token = uuid.uuid4().hex
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "pid_start": _start_ticks(os.getpid()), "token": token}  # fmt: skip
        for _ in range(10):
            if self._create(info):
                self.token = token
                _HELD.add(token)
                self._finalizer = weakref.finalize(self, _release, self.path, token)
                return self
            holder = read_lock(self.path)
            if holder is None:  # removed meanwhile, being written (O_EXCL fallback), or left unreadable by a crash
                self._reclaim_unreadable()
                continue
            if _is_stale(holder):
                self._reclaim(holder)
                continue
            raise RunFolderError(self._busy_message(holder))
        raise RunFolderError(f"{self.run_dir}: could not take {self.path}: it stays unreadable or keeps changing; "
                             f"delete it if no other {self.what} uses this folder")  # fmt: skip

    def release(self) -> None:
        """Give the lock up (nothing happens when it is not held)."""
        if self._finalizer is not None:
            self._finalizer()  # runs _release once
            self._finalizer = None
        self.token = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------------------------------------ internals
    def _create(self, info: dict[str, Any]) -> bool:
        """Create the lock file holding ``info``; ``False`` when it exists already."""
        tmp = self.run_dir / f".{self.path.name}.{info['token']}.new"
        with open(tmp, "x", encoding="utf-8") as fh:  # written whole before it is linked, so never read half-written
            fh.write(json.dumps(info))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as err:  # no hard links on this file system
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
                raise
            return self._create_exclusive(info)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _create_exclusive(self, info: dict[str, Any]) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(info))
        return True

    def _reclaim(self, holder: dict[str, Any]) -> None:
        """Move the stale lock aside; if it turns out to be a fresh one (a race), put it back."""
        aside = self.run_dir / f".{self.path.name}.{uuid.uuid4().hex}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process reclaimed it first
        moved = read_lock(aside)
        if moved is not None and moved.get("token") != holder.get("token"):
            with contextlib.suppress(FileExistsError):  # a new holder's lock: hand it back unless another exists
                os.link(aside, self.path)
            aside.unlink()
            return
        aside.unlink()
        log.warning("reclaimed the stale lock %s of pid %s (started %s), which no longer runs", self.path,
                    holder.get("pid"), holder.get("started", "?"))  # fmt: skip

    def _reclaim_unreadable(self) -> None:
        """Remove an unreadable lock older than a minute (a crash during an ``O_EXCL`` creation); else wait a bit."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return
        if age < 60:
            time.sleep(0.2)  # being written right now
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        log.warning("removed the unreadable lock %s (%.0f s old)", self.path, age)

    def _busy_message(self, holder: dict[str, Any]) -> str:
        return busy_message(self.run_dir, self.path, holder, self.what, self.same_process_hint)


def busy_message(
    run_dir: Path, path: Path, holder: dict[str, Any], what: str,
    same_process_hint: str = "end it first, or choose another --out",
) -> str:
    """One line saying that the live ``holder`` of the lock ``path`` (a ``what``) uses ``run_dir``."""
    where, pid = holder.get("host", "?"), holder.get("pid", "?")
    if where == socket.gethostname() and pid == os.getpid():
        return (f"{run_dir} is in use by another {what} of this process (pid {pid}, started "
                f"{holder.get('started', '?')}): {same_process_hint}")  # fmt: skip
    msg = (f"{run_dir} is in use by another {what} (pid {pid} on host {where}, started "
           f"{holder.get('started', '?')}): wait for it to end or choose another --out")  # fmt: skip
    if where != socket.gethostname():
        msg += f"; if that run is gone, delete {path}"
    return msg


def _make_folder(run_dir: Path) -> None:
    """Create ``run_dir`` (and its parents); a path that is a file, or under one, is refused in one line."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is a file, not a folder: give --out a folder (a new one, or the run's own)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a parent is a file (or the path became one meanwhile)
        raise RunFolderError(f"cannot create the folder {run_dir}: a part of that path is a file, not a folder; "
                             "choose another --out") from None  # fmt: skip
    except OSError as err:
        raise RunFolderError(f"cannot create the folder {run_dir}: {err.strerror or err}") from None

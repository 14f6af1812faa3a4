"""The errors crate-vis raises on purpose, under one base class.

Every error here derives from :class:`CrateVisError`, and from the built-in exception a caller would naturally
catch (``ValueError`` for bad input, ``FileNotFoundError`` for an absent file, ...), so ``except ValueError`` keeps
working. The command line turns any :class:`CrateVisError` into a one-line message and a non-zero exit status; an
exception that is not one of these is a bug and keeps its traceback.

Example:
    >>> from crate_vis.errors import CrateVisError, UsageError
    >>> try:
    ...     raise UsageError("--tau must be in (0, 1), got 2.0")
    ... except CrateVisError as err:
    ...     print(err)
    --tau must be in (0, 1), got 2.0
"""

from __future__ import annotations

import os

__all__ = [
    "CrateVisError", "UsageError", "ImageLoadError", "DatasetError", "CheckpointError", "WeightsNotFoundError",
    "ChecksumError", "RecorderError", "SelectionError", "RunFolderError",
]  # fmt: skip


class CrateVisError(Exception):
    """Base class of every error crate-vis raises on purpose; its message is one line meant for the user."""


class UsageError(CrateVisError, ValueError):
    """An option or argument has a value the operation cannot use (checked before any work starts)."""


class ImageLoadError(CrateVisError, ValueError):
    """An image could not be read; ``path`` says which, ``reason`` why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Keeps the two-argument constructor working across process boundaries (DataLoader workers).
        return (type(self), (self.path, self.reason))


class DatasetError(CrateVisError, ValueError):
    """A dataset or prediction file is malformed; the message names the file and the entry."""

    def __init__(self, path: str | os.PathLike[str], entry: str, reason: str) -> None:
        self.path = str(path)
        self.entry = entry
        self.reason = reason
        super().__init__(f"{self.path}: {entry}: {reason}" if entry else f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return (type(self), (self.path, self.entry, self.reason))


class CheckpointError(CrateVisError, RuntimeError):
    """A checkpoint could not be read or does not fit the model."""


class WeightsNotFoundError(CrateVisError, FileNotFoundError):
    """A weight file is neither on disk nor in a cache; the message says where to put it."""


class ChecksumError(CrateVisError, RuntimeError):
    """A weight file's sha256 differs from the manifest."""


class RecorderError(CrateVisError, TypeError):
    """The model's structure is not one the attention and feature recorders understand."""


class SelectionError(CrateVisError, IndexError, ValueError):
    """A layer or head index out of range; the message names the valid range."""


class RunFolderError(CrateVisError, RuntimeError):
    """A run folder is in use by another process, or holds another run's outputs."""

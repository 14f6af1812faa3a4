"""Checks that an output path can be written, made before the work so that a long run never fails at its end.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> writable_file(folder / "new" / "score.json", "--output").name
    'score.json'
    >>> try:
    ...     writable_file(folder, "--output")
    ... except UsageError as err:
    ...     print(str(err).split(":")[1].strip())
    is a folder; give a file name (e.g. ...
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import UsageError

__all__ = ["writable_file", "writable_folder"]


def writable_folder(path: str | os.PathLike[str], flag: str) -> Path:
    """Create the output folder ``path`` (and its parents) and make sure it is writable.

    Args:
        path: the folder.
        flag: the option that named it, for the message (``"--out"``).

    Raises:
        UsageError: one line naming ``flag`` and ``path``: a file is in the way, or the folder cannot be created or
            written.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{flag} {out}: cannot create the folder ({err.strerror or err})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {out}: the folder is not writable")
    return out


def writable_file(path: str | os.PathLike[str], flag: str, inputs: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """Make sure a result file can be written at ``path``: not a folder nor another non-regular file, not one of
    ``inputs`` (the files the run reads), its folder created when absent and writable.

    Args:
        path: the file.
        flag: the option that named it, for the message (``"--output"``).
        inputs: files the run reads, which the result must not replace.

    Raises:
        UsageError: one line naming ``flag`` and ``path``.
    """
    out = Path(path)
    for given in inputs:
        if out.is_file() and Path(given).is_file() and os.path.samefile(out, given):
            raise UsageError(f"{flag} {out}: is an input of this run ({given}); give another file name")
    if out.is_dir():
        raise UsageError(f"{flag} {out}: is a folder; give a file name (e.g. {out / ('result' + (out.suffix or '.json'))})")
    for above in (out.parent, *out.parent.parents):
        if above.exists():
            if not above.is_dir():
                raise UsageError(f"{flag} {out}: {above} is a file, not a folder")
            break
    writable_folder(out.parent, flag)
    if out.exists() and not out.is_file():
        raise UsageError(f"{flag} {out}: exists and is not a regular file")
    return out

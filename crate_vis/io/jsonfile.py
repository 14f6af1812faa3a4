"""The one reader of json files a user hands to crate-vis (ground truth, results, a segmentation's image index).

Whatever is wrong with such a file becomes one :class:`~crate_vis.errors.DatasetError` naming it: absent or
unreadable, not UTF-8 (with the line and column of the first bad byte), not JSON (with the line and column the parser
stopped at), numbers too long to convert, or nesting too deep for the parser (``[[[[...]]]]``).

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.json"
    >>> _ = p.write_text('{"a": [1, 2]}')
    >>> read_json(p)
    {'a': [1, 2]}
    >>> _ = p.write_text('{"a": [1, 2}')
    >>> try:
    ...     read_json(p, "ground truth")
    ... except DatasetError as err:
    ...     print(err.reason)
    not valid JSON: Expecting ',' delimiter at line 1, column 12
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import DatasetError

__all__ = ["read_json"]


def _line_column(raw: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column (in characters) of byte ``offset`` of ``raw``."""
    before = raw[:offset]
    line_start = before.rfind(b"\n") + 1
    return before.count(b"\n") + 1, len(before[line_start:].decode("utf-8", errors="replace")) + 1


def read_json(path: str | os.PathLike[str], what: str = "") -> Any:
    """Parse the json file ``path`` (UTF-8, a leading byte-order mark allowed).

    Args:
        path: the file.
        what: what the file is, for the message (``"ground truth"``, ``"results"``); empty: the path alone.

    Returns:
        The parsed value.

    Raises:
        DatasetError: one line naming ``path``: not found, unreadable, not UTF-8, not valid JSON (line and column),
            or nested too deeply to parse.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise DatasetError(path, what, "not found") from None
    except IsADirectoryError:
        raise DatasetError(path, what, "is a folder, not a json file") from None
    except OSError as err:
        raise DatasetError(path, what, f"unreadable ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line, col = _line_column(raw, err.start)
        raise DatasetError(path, what, f"not UTF-8 text: byte 0x{raw[err.start]:02x} at line {line}, column {col}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(path, what, f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    except RecursionError:
        raise DatasetError(path, what, "JSON nested too deeply to read") from None
    except ValueError as err:  # e.g. an integer literal longer than Python converts
        raise DatasetError(path, what, f"not valid JSON: {' '.join(str(err).split())}") from None

"""Where crate-vis keeps what it caches: downloaded weights and decoded images.

Example:
    >>> import os
    >>> os.environ["CRATE_VIS_CACHE"] = "/tmp/cv-cache"
    >>> str(cache_dir())
    '/tmp/cv-cache'
    >>> del os.environ["CRATE_VIS_CACHE"]
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The cache folder: ``$CRATE_VIS_CACHE``, else ``~/.cache/crate-vis``."""
    return Path(os.environ.get("CRATE_VIS_CACHE", Path.home() / ".cache" / "crate-vis"))

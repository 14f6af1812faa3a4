"""Known checkpoints as data: the manifest in ``weights/manifest.json``, checksum checks and local resolution.

Nothing is downloaded from a model hub. A weight resolves to a file by, in order: an existing local path; a manifest
record whose file is in ``weights/`` or in the cache folder (``$CRATE_VIS_CACHE`` or ``~/.cache/crate-vis``); a URL
(the record's, or one given directly) fetched once into the cache. Every file with a known sha256 is verified. When
nothing works, the error says where to put the file.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ChecksumError, WeightsNotFoundError
from ..io.atomic import atomic_write

__all__ = [
    "WeightRecord", "ChecksumError", "WeightsNotFoundError", "WEIGHTS_DIR", "cache_dir", "list_weights",
    "get_record", "resolve_weights", "sha256_file", "verify_sha256", "default_weights", "weights_status",
]  # fmt: skip



def _weights_dir() -> Path:
    """The folder of the manifest and the embedded weights.

    ``$CRATE_VIS_WEIGHTS`` when set; else ``crate_vis/weights`` inside an installed wheel (the build maps the
    checkout's top-level ``weights/`` there); else the checkout's ``weights/`` (source tree, editable install).
    """
    if os.environ.get("CRATE_VIS_WEIGHTS"):
        return Path(os.environ["CRATE_VIS_WEIGHTS"])
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "weights", package.parent / "weights"):
        if (candidate / "manifest.json").is_file():
            return candidate
    return package / "weights"


#: The manifest and embedded weights folder (see :func:`_weights_dir`).
WEIGHTS_DIR = _weights_dir()
DEFAULT_WEIGHTS_NAME = "crate_mini_patch8_96.synthetic"




@dataclass(frozen=True)
class WeightRecord:
    """One known checkpoint.

    Attributes:
        name: ``arch.tag`` key, e.g. ``crate_tiny_patch16_224.in1k``.
        model: registered model name the weights fit.
        file: file name (or path relative to ``weights/``).
        url: download URL, if one is public and stable.
        source: where the weights are published.
        sha256: expected checksum, when known.
        license: licence terms.
        config: constructor overrides (``num_classes``...).
        reported_accuracy: what the publisher reports.
        layout: checkpoint layout in words.
    """

    name: str
    model: str
    file: str
    url: str | None = None
    source: str = ""
    sha256: str | None = None
    license: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    reported_accuracy: dict[str, Any] | None = None
    layout: str = ""


@lru_cache(maxsize=1)
def _manifest() -> dict[str, WeightRecord]:
    path = WEIGHTS_DIR / "manifest.json"
    data = json.loads(path.read_text())
    return {r["name"]: WeightRecord(**r) for r in data["weights"]}


def list_weights() -> list[WeightRecord]:
    """All manifest records."""
    return list(_manifest().values())


def get_record(name: str) -> WeightRecord:
    """The manifest record ``name`` (``arch.tag``), or the first record for a model name."""
    records = _manifest()
    if name in records:
        return records[name]
    for record in records.values():
        if record.model == name:
            return record
    raise KeyError(f"no weights named {name!r} in {WEIGHTS_DIR / 'manifest.json'}; known: {', '.join(records)}")


def cache_dir() -> Path:
    """Download cache: ``$CRATE_VIS_CACHE`` or ``~/.cache/crate-vis``."""
    return Path(os.environ.get("CRATE_VIS_CACHE", Path.home() / ".cache" / "crate-vis"))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike[str], expected: str | None) -> None:
    """Raise :class:`ChecksumError` when ``path`` does not hash to ``expected`` (no-op without one)."""
    if not expected:
        return
    actual = sha256_file(path)
    if actual.lower() != expected.lower():
        raise ChecksumError(
            f"{path}: sha256 {actual} does not match the manifest's {expected}; the file is corrupt, truncated or "
            "not the published one. Delete it and fetch it again."
        )


def _download(url: str, dest: Path, expected: str | None, timeout: float = 30.0) -> Path:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_write(dest, "wb") as fh:
            shutil.copyfileobj(response, fh)
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException, ValueError) as err:
        # HTTPException covers a connection dropped mid-body (IncompleteRead); ValueError a malformed URL. The
        # partial download never reaches ``dest``: atomic_write removed its temporary file.
        raise WeightsNotFoundError(
            f"could not download {url} ({err}); this machine may be offline. Download the file elsewhere and put it "
            f"at {dest}, or pass its local path."
        ) from None
    try:
        verify_sha256(dest, expected)
    except ChecksumError:
        dest.unlink(missing_ok=True)
        raise
    return dest


def resolve_weights(spec: str, model_name: str | None = None) -> Path:
    """Turn a local path, URL or manifest name into a verified local file.

    Args:
        spec: a file path, an ``http(s)://``/``file://`` URL, or a manifest name (``arch.tag`` or a model name).
        model_name: the model the weights are for, to pick the checksum of a matching record.

    Returns:
        Path of a local file whose checksum (when known) matches.

    Raises:
        WeightsNotFoundError: nothing on disk and no download possible; the message says where to put the file.
        ChecksumError: the file does not match the manifest.
    """
    local = Path(spec).expanduser()
    if local.exists():
        record = _record_for_file(local, model_name)
        verify_sha256(local, record.sha256 if record else None)
        return local
    if spec.startswith(("http://", "https://", "file://")):
        record = next((r for r in _manifest().values() if r.url == spec), None)
        dest = cache_dir() / (Path(record.file).name if record else _cache_name(spec))
        if dest.exists():
            verify_sha256(dest, record.sha256 if record else None)
            return dest
        return _download(spec, dest, record.sha256 if record else None)
    try:
        record = get_record(spec)
    except KeyError:
        raise WeightsNotFoundError(f"{spec!r} is neither an existing file, a URL, nor a manifest name") from None
    for candidate in (WEIGHTS_DIR / record.file, cache_dir() / Path(record.file).name):
        if candidate.exists():
            verify_sha256(candidate, record.sha256)
            return candidate
    if record.url:
        return _download(record.url, cache_dir() / Path(record.file).name, record.sha256)
    raise WeightsNotFoundError(
        f"weights {record.name!r} are not on disk and have no download URL. Get them from {record.source} and put "
        f"the file at {cache_dir() / Path(record.file).name} (or pass its path with --checkpoint)."
    )


def _cache_name(url: str) -> str:
    """File name for a downloaded URL: its last path component, or a digest when that is empty or ``.``/``..``."""
    name = Path(urllib.parse.urlsplit(url).path).name
    if name in ("", ".", ".."):
        name = "download-" + hashlib.sha256(url.encode()).hexdigest()[:16]
    return name


def _record_for_file(path: Path, model_name: str | None) -> WeightRecord | None:
    resolved = path.resolve()
    for record in _manifest().values():
        if (WEIGHTS_DIR / record.file).resolve() == resolved or (
            model_name == record.model and path.name == Path(record.file).name
        ):
            return record
    return None


def default_weights() -> Path:
    """The embedded default weights (project format), verified against the manifest."""
    return resolve_weights(DEFAULT_WEIGHTS_NAME)


def weights_status(record: WeightRecord) -> str:
    """Where a record's file is, or where to put it (one line for ``crate-vis list-models``)."""
    for candidate in (WEIGHTS_DIR / record.file, cache_dir() / Path(record.file).name):
        if candidate.exists():
            return f"on disk: {candidate}"
    return f"absent: put {Path(record.file).name} in {cache_dir()}" + (f" (or it downloads from {record.url})" if record.url else "")

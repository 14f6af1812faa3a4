"""Known checkpoints as data: the manifest in ``weights/manifest.json``, checksum checks and resolution to a file.

A weight resolves to a file by, in order: an existing local path; a manifest record whose file is in ``weights/`` or
in the crate-vis cache folder (``$CRATE_VIS_CACHE`` or ``~/.cache/crate-vis``); for a record published on the Hugging
Face Hub (``hf_repo`` + ``hf_filename``), the ``huggingface_hub`` cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or
``~/.cache/huggingface/hub``), and, unless ``HF_HUB_OFFLINE`` is set, a download into that cache; for any other
record, its URL (or one given directly) fetched once into the crate-vis cache. Every file with a known size or sha256
is verified. When nothing works, the error says where to put the file (and, for Hub records, the command that
downloads it).

Example:
    >>> from crate_vis.models.pretrained import get_record
    >>> record = get_record("crate_alpha_base_patch16_224.in1k")
    >>> record.model, record.hf_repo, record.hf_filename
    ('crate_alpha_base_patch16_224', 'UCSC-VLAA/CRATE-alpha', 'torch/crate_alpha_B16.pth')
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.metadata
import json
import os
import re
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
from ..io.paths import cache_dir

__all__ = [
    "WeightRecord", "ChecksumError", "WeightsNotFoundError", "WEIGHTS_DIR", "cache_dir", "list_weights",
    "get_record", "resolve_weights", "sha256_file", "verify_sha256", "verify_record", "default_weights",
    "weights_status", "hf_cache_dir", "hf_offline", "hub_download_command",
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
DEFAULT_WEIGHTS_NAME = "crate_mini_patch8_96.imagenette"




@dataclass(frozen=True)
class WeightRecord:
    """One known checkpoint.

    Attributes:
        name: ``arch.tag`` key, e.g. ``crate_alpha_base_patch16_224.in1k``.
        model: registered model name the weights fit.
        file: file name (or path relative to ``weights/``); its last component is the name in the crate-vis cache.
        url: download URL, if one is public and stable.
        source: where the weights are published.
        sha256: expected checksum, when known.
        license: licence terms.
        config: constructor overrides (``num_classes``...).
        reported_accuracy: what the publisher reports (``dataset``, ``top1``, ``reference``).
        layout: checkpoint layout in words.
        size: file size in bytes, when known (checked before the sha256).
        hf_repo: Hugging Face Hub repository (``ORG/NAME``) for weights published there.
        hf_filename: path of the file inside ``hf_repo``.
        hf_revision: branch, tag or commit of ``hf_repo``; ``None`` for ``main``.
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
    size: int | None = None
    hf_repo: str | None = None
    hf_filename: str | None = None
    hf_revision: str | None = None

    def __post_init__(self) -> None:
        if bool(self.hf_repo) != bool(self.hf_filename):
            raise ValueError(f"weights {self.name!r}: hf_repo and hf_filename go together")
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1):
            raise ValueError(f"weights {self.name!r}: size must be a positive number of bytes, got {self.size!r}")

    @property
    def cache_name(self) -> str:
        """The file's name in the crate-vis cache folder."""
        return Path(self.file).name


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


def verify_record(path: str | os.PathLike[str], record: WeightRecord) -> None:
    """Check ``path`` against what ``record`` knows: its size (cheap, first), then its sha256.

    Raises:
        ChecksumError: the size or the checksum differs.
    """
    if record.size is not None:
        actual = os.path.getsize(path)
        if actual != record.size:
            raise ChecksumError(
                f"{path}: {actual:,} bytes, but the manifest's {record.name} has {record.size:,}; the file is "
                "truncated or not the published one. Delete it and fetch it again."
            )
    verify_sha256(path, record.sha256)


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
        if record is not None:
            verify_record(local, record)
        return local
    if spec.startswith(("http://", "https://", "file://")):
        record = next((r for r in _manifest().values() if r.url == spec), None)
        dest = cache_dir() / (record.cache_name if record else _cache_name(spec))
        if dest.exists():
            verify_sha256(dest, record.sha256 if record else None)
            return dest
        return _download(spec, dest, record.sha256 if record else None)
    try:
        record = get_record(spec)
    except KeyError:
        raise WeightsNotFoundError(f"{spec!r} is neither an existing file, a URL, nor a manifest name") from None
    for candidate in _local_candidates(record):
        if candidate.exists():
            verify_record(candidate, record)
            return candidate
    if record.hf_repo:
        return _resolve_hub(record)
    if record.url:
        return _download(record.url, cache_dir() / record.cache_name, record.sha256)
    raise WeightsNotFoundError(
        f"weights {record.name!r} are not on disk and have no download URL. Get them from {record.source} and put "
        f"the file at {cache_dir() / record.cache_name} (or pass its path with --checkpoint)."
    )


def _local_candidates(record: WeightRecord) -> tuple[Path, Path]:
    """Where a record's file may already be: the weights folder, then the crate-vis cache."""
    return WEIGHTS_DIR / record.file, cache_dir() / record.cache_name


# ------------------------------------------------------------------------------------------ Hugging Face Hub
_TRUE = {"1", "ON", "YES", "TRUE"}


def hf_offline() -> bool:
    """Whether Hugging Face offline mode is on (``HF_HUB_OFFLINE``, read now, not at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE) and "HF_HUB_OFFLINE" not in os.environ


def hf_cache_dir() -> Path:
    """The ``huggingface_hub`` cache folder, read from the environment now (``huggingface_hub`` reads it once, at
    import): ``$HF_HUB_CACHE`` (or the older ``$HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else the library's
    default (``~/.cache/huggingface/hub``)."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.environ[key]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    try:
        from huggingface_hub import constants
    except ImportError:
        return Path.home() / ".cache" / "huggingface" / "hub"
    return Path(constants.HF_HUB_CACHE)


@lru_cache(maxsize=1)
def _hub_cli() -> str:
    """The download command the installed ``huggingface_hub`` provides: ``hf`` (0.34 and later; the only one from
    1.0), else the older ``huggingface-cli``."""
    try:
        scripts = {ep.name for ep in importlib.metadata.distribution("huggingface_hub").entry_points}
    except importlib.metadata.PackageNotFoundError:
        return "hf"
    return "huggingface-cli" if "huggingface-cli" in scripts and "hf" not in scripts else "hf"


def hub_download_command(record: WeightRecord) -> str:
    """The shell command that puts a Hub record's file into the Hugging Face cache."""
    revision = f" --revision {record.hf_revision}" if record.hf_revision else ""
    return f"{_hub_cli()} download {record.hf_repo} {record.hf_filename}{revision}"


def _hub_hint(record: WeightRecord) -> str:
    return (
        f"Download it with `{hub_download_command(record)}` (into the Hugging Face cache, {hf_cache_dir()}), or put "
        f"{record.cache_name} in {cache_dir()} (or pass its path with --checkpoint)."
    )


def _hub_cached(record: WeightRecord) -> Path | None:
    """The record's file in the Hugging Face cache, without any network access; ``None`` when absent."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(
            str(record.hf_repo), str(record.hf_filename), cache_dir=hf_cache_dir(), revision=record.hf_revision
        )
    except (OSError, ValueError):  # an unreadable cache or an invalid repo id: not there
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _resolve_hub(record: WeightRecord) -> Path:
    """A Hub record's file through ``huggingface_hub``: its cache first, then (unless offline) a download into it."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise WeightsNotFoundError(
            f"weights {record.name!r} are published on the Hugging Face Hub ({record.hf_repo}), and huggingface_hub "
            f"is not installed: `pip install huggingface_hub` (or crate-vis[hub]), then "
            f"`hf download {record.hf_repo} {record.hf_filename}`; or put {record.cache_name} in {cache_dir()}."
        ) from None

    def fetch(local_files_only: bool) -> str:
        return str(hf_hub_download(str(record.hf_repo), str(record.hf_filename), revision=record.hf_revision,
                                   cache_dir=hf_cache_dir(), local_files_only=local_files_only))  # fmt: skip

    path: str | None
    try:
        path = fetch(local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError is a FileNotFoundError
        path = None
    if path is None:
        if hf_offline():
            raise WeightsNotFoundError(
                f"weights {record.name!r} ({record.hf_filename} of the Hugging Face Hub repo {record.hf_repo}) are not "
                f"in the Hugging Face cache, and HF_HUB_OFFLINE is set, so nothing is downloaded. {_hub_hint(record)}"
            )
        try:
            path = fetch(local_files_only=False)
        except Exception as err:  # noqa: BLE001 - network, HTTP, auth and disk errors come in many types
            detail = str(err).splitlines()[0] if str(err) else ""
            raise WeightsNotFoundError(
                f"could not download {record.hf_filename} from the Hugging Face Hub repo {record.hf_repo} "
                f"({type(err).__name__}: {detail}); this machine may be offline. {_hub_hint(record)}"
            ) from None
    found = Path(path)
    try:
        verify_record(found, record)
    except ChecksumError as err:
        raise ChecksumError(
            f"{err} (it is in the Hugging Face cache: remove it there, or run "
            f"`{hub_download_command(record)} --force-download`)"
        ) from None
    return found


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
            model_name == record.model and path.name == record.cache_name
        ):
            return record
    return None


def default_weights() -> Path:
    """The embedded default weights (project format), verified against the manifest."""
    return resolve_weights(DEFAULT_WEIGHTS_NAME)


def weights_status(record: WeightRecord) -> str:
    """Where a record's file is, or where to put it (one line for ``crate-vis list-models``; no network access).

    Example:
        >>> from crate_vis.models.pretrained import get_record, weights_status
        >>> weights_status(get_record("crate_test_patch8_32.golden")).startswith("on disk: ")
        True
    """
    for candidate in _local_candidates(record):
        if candidate.exists():
            return f"on disk: {candidate}"
    if record.hf_repo:
        cached = _hub_cached(record)
        if cached is not None:
            return f"in the Hugging Face cache: {cached}"
        return f"absent: `{hub_download_command(record)}` or put {record.cache_name} in {cache_dir()}"
    if record.url:
        return f"absent: put {record.cache_name} in {cache_dir()} (or it downloads from {record.url})"
    published = re.search(r"https?://\S+", record.source)
    where = f" (get it from {published.group(0)})" if published else ""
    return f"absent: put {record.cache_name} in {cache_dir()}{where}"

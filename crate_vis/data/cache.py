"""Decoded image cache: an ImageFolder split decoded once into one memory-mapped uint8 file.

Decoding a JPEG costs more than every augmentation after it (0.4 ms for a 224 px imagenette photo, 3.6 ms for a
500x375 hymenoptera one, against 0.2-0.4 ms for crop, flip, jitter and normalisation at 96 px). The cache decodes
each image of a split once, with :func:`~crate_vis.io.images.load_image` (so grey, palette, CMYK and 16-bit files
become RGB exactly as everywhere else), shrinks it so its shorter side is at most ``size`` pixels, and stores it.

What is stored, and why:

* Images keep their aspect ratio: no square crop, no padding. A random-resized crop then draws from the whole photo
  with timm's scale and ratio semantics, and a validation centre crop sees the same region as on the original.
  Images are never enlarged: one whose shorter side is already at most ``size`` is stored as decoded.
* The training split's default ``size`` is twice the training resolution (:func:`default_cache_size`): crops of at
  least a quarter of the image area are then still shrunk, never enlarged, when resized to ``img_size``. The
  validation split is stored at the evaluation resize (``floor(img_size / eval_crop_pct)``) with the evaluation
  filter and torchvision's size arithmetic, so the centre-crop evaluation transform applied to a cached image gives
  exactly the tensors it gives on the original file.
* An unreadable file is reported once with its path and reason, marked invalid and never served
  (:class:`CachedImageFolder` leaves it out).

On disk, under the cache root (:func:`default_cache_root`: ``$CRATE_VIS_CACHE/decoded``, else
``~/.cache/crate-vis/decoded``; or an explicit ``cache_dir``), one folder per cache::

    <folder name>-<split>-<size>px-<key>/
        images.u8   every valid image as (H, W, 3) RGB bytes, one after another (memory-mapped when read)
        index.npz   per file: relative path, byte size, mtime, label, offset, height, width, validity
        meta.json   folder, split, size, resize filter, classes, fingerprint, invalid files, build time

``key`` is a hash of the folder's absolute path, the split, the size and the resize filter. The fingerprint is a
hash of the class list and of every image's relative path, byte size and modification time; it is recomputed each
time the cache is opened (a ``stat`` per file: 0.1 s for imagenette's 9,469 files) and a cache whose folder has
changed (a file added, removed, rewritten) is rebuilt, never reused. Content checksums are not part of it: hashing
every byte took 0.3 s for imagenette's 99 MB with a warm page cache but grows with the bytes of the data set (minutes
for ImageNet at every start), while the ``stat`` fingerprint grows with the file count only. A file rewritten with
the same size and the same modification time (a copy tool restoring mtimes onto different content) is therefore not
noticed; delete the cache folder after such an edit.

A build writes into a hidden temporary folder beside the cache and renames it into place when complete, so no
reader ever sees a partial cache. Builders of the same cache take an exclusive lock (``fcntl.flock`` on
``.<cache folder>.lock``; released by the kernel when a builder dies): a second one waits, then finds the finished
cache and reuses it. Decoding runs over ``workers`` processes.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from crate_vis.data.cache import CachedImageFolder, open_cache
    >>> root = Path(tempfile.mkdtemp())
    >>> (root / "train" / "cat").mkdir(parents=True)
    >>> Image.new("RGB", (300, 200), "orange").save(root / "train" / "cat" / "a.png")
    >>> cache = open_cache(root, "train", size=100, cache_dir=root / "cache")
    >>> image, label = CachedImageFolder(cache)[0]
    >>> image.size, label  # (W, H): the shorter side is 100 px, the aspect ratio kept
    ((150, 100), 0)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ImageLoadError
from ..io.atomic import atomic_save, atomic_write, atomic_write_json
from ..io.images import load_image
from .folders import ImageFolderDataset

__all__ = [
    "CACHE_FORMAT", "CachedImageFolder", "DecodedImageCache", "cache_location", "default_cache_root",
    "default_cache_size", "eval_cache_size", "open_cache",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Version of the on-disk layout; part of the key, so a new layout never reads an old cache.
CACHE_FORMAT = 1
#: Default training cache size as a multiple of the training resolution.
TRAIN_SIZE_FACTOR = 2.0

_FILTERS = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}  # fmt: skip
_IMAGES, _INDEX, _META = "images.u8", "index.npz", "meta.json"
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


# --------------------------------------------------------------------------------------------- sizes and places
def default_cache_root() -> Path:
    """``$CRATE_VIS_CACHE/decoded``, else ``~/.cache/crate-vis/decoded`` (beside downloaded weights)."""
    from ..io.paths import cache_dir

    return cache_dir() / "decoded"


def default_cache_size(img_size: int, factor: float = TRAIN_SIZE_FACTOR) -> int:
    """Shorter side of cached training images: ``round(factor * img_size)`` pixels.

    At twice the training resolution, a random-resized crop of at least a quarter of the image area is still
    shrunk, not enlarged, when resized to ``img_size``.

    Example:
        >>> default_cache_size(96)
        192
    """
    if img_size < 1 or factor <= 0:
        raise ValueError(f"img_size must be >= 1 and factor > 0, got {img_size} and {factor}")
    return max(1, round(factor * img_size))


def eval_cache_size(img_size: int, crop_pct: float) -> int:
    """Shorter side of cached validation images: timm's evaluation resize, ``floor(img_size / crop_pct)``.

    Example:
        >>> eval_cache_size(96, 0.875)
        109
    """
    if img_size < 1 or not 0 < crop_pct <= 1:
        raise ValueError(f"img_size must be >= 1 and crop_pct in (0, 1], got {img_size} and {crop_pct}")
    return math.floor(img_size / crop_pct)


def _check_resample(resample: str) -> str:
    if resample not in _FILTERS:
        raise ValueError(f"resize filter {resample!r} is not one of {', '.join(_FILTERS)}")
    return resample


def cache_location(
    root: str | os.PathLike[str], split: str, size: int, resample: str = "bicubic",
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The folder that holds (or will hold) the cache of ``root/split`` at ``size``.

    Args:
        root: ImageFolder root (the folder holding ``split``).
        split: the split's folder name (``train``, ``val``).
        size: shorter side of the cached images in pixels.
        resample: resize filter (``bicubic``, ``bilinear``, ...).
        cache_dir: cache root (default :func:`default_cache_root`).

    Example:
        >>> cache_location("/data/imagenette", "train", 192, cache_dir="/tmp/c").name  # doctest: +ELLIPSIS
        'imagenette-train-192px-...'
    """
    folder = (Path(root) / split).resolve()
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, str(folder), split, int(size), resample]).encode()).hexdigest()
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(root).resolve().name) or "data"
    base = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return base / f"{name}-{split}-{int(size)}px-{key[:16]}"


# -------------------------------------------------------------------------------------------------- fingerprint
class _Listing:
    """The files of a split as :class:`~crate_vis.data.folders.ImageFolderDataset` lists them, with their stats."""

    def __init__(self, folder: Path, classes: Sequence[str] | None) -> None:
        # same order, classes and errors as the uncached path; absolute, as the cache is shared across folders
        found = ImageFolderDataset(Path(folder).absolute(), classes=classes)
        self.folder = found.root
        self.classes = list(found.classes)
        self.paths = [p for p, _ in found.samples]
        self.labels = np.array([label for _, label in found.samples], dtype=np.int64)
        self.relpaths = [Path(p).relative_to(self.folder).as_posix() for p in self.paths]
        sizes, mtimes = [], []
        for p in self.paths:
            try:
                st = os.stat(p)
                sizes.append(st.st_size)
                mtimes.append(st.st_mtime_ns)
            except OSError:  # vanished since listing: fingerprinted as absent, and unreadable when decoded
                sizes.append(-1)
                mtimes.append(-1)
        self.sizes = np.array(sizes, dtype=np.int64)
        self.mtimes = np.array(mtimes, dtype=np.int64)
        self.fingerprint = _fingerprint(self.classes, self.relpaths, self.labels, self.sizes, self.mtimes)


def _fingerprint(
    classes: Sequence[str], relpaths: Sequence[str], labels: np.ndarray, sizes: np.ndarray, mtimes: np.ndarray
) -> str:
    h = hashlib.sha256(json.dumps(list(classes)).encode())
    for rel, label, size, mtime in zip(relpaths, labels.tolist(), sizes.tolist(), mtimes.tolist()):
        h.update(f"{rel}\0{label}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def _describe_changes(old: dict[str, tuple[int, int]], new: _Listing) -> str:
    now = {rel: (int(s), int(m)) for rel, s, m in zip(new.relpaths, new.sizes, new.mtimes)}
    added = len(now.keys() - old.keys())
    removed = len(old.keys() - now.keys())
    changed = sum(1 for k in now.keys() & old.keys() if now[k] != old[k])
    parts = [f"{n} {what}" for n, what in ((added, "added"), (removed, "removed"), (changed, "changed")) if n]
    return ", ".join(parts) or "class list or labels changed"


# ------------------------------------------------------------------------------------------------------ the cache
class DecodedImageCache:
    """A built cache folder, opened read-only; the pixels are memory-mapped on first use in each process.

    Use :func:`open_cache` to get one (it builds or rebuilds as needed).

    Args:
        path: the cache folder (see :func:`cache_location`).

    Attributes:
        path: the cache folder.
        folder: the split folder the images came from.
        split: its name.
        size: the longest the shorter side of a cached image can be.
        resample: the resize filter used.
        classes: class names in label order.
        paths: absolute path of every file of the split (valid or not), in label-then-path order.
        labels: ``(N,)`` labels.
        valid: ``(N,)`` bool, False for files that could not be decoded.
        invalid: ``(path, reason)`` of each invalid file.
        fingerprint: hash of the folder listing the cache was built from.

    Raises:
        ValueError: the folder is not a complete cache of this format.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            meta = json.loads((self.path / _META).read_text(encoding="utf-8"))
            with np.load(self.path / _INDEX, allow_pickle=False) as index:
                arrays = {k: index[k] for k in index.files}
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{self.path}: not a complete decoded-image cache ({err})") from None
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"{self.path}: cache format {meta.get('format')!r}, expected {CACHE_FORMAT}")
        self.meta = meta
        self.folder = Path(meta["folder"])
        self.split = str(meta["split"])
        self.size = int(meta["size"])
        self.resample = str(meta["resample"])
        self.classes = [str(c) for c in meta["classes"]]
        self.fingerprint = str(meta["fingerprint"])
        self.relpaths = [str(r) for r in arrays["relpaths"]]
        self.paths = [str(self.folder / r) for r in self.relpaths]
        self.labels = arrays["labels"].astype(np.int64)
        self.valid = arrays["valid"].astype(bool)
        self.offsets = arrays["offsets"].astype(np.int64)
        self.heights = arrays["heights"].astype(np.int64)
        self.widths = arrays["widths"].astype(np.int64)
        self._sizes, self._mtimes = arrays["sizes"], arrays["mtimes"]
        self.invalid = [(str(self.folder / rel), str(reason)) for rel, reason in meta["invalid"]]
        self.nbytes = int(meta["bytes"])
        self._data: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def file_stats(self) -> dict[str, tuple[int, int]]:
        """``relative path -> (byte size, mtime in ns)`` of the files the cache was built from."""
        return {r: (int(s), int(m)) for r, s, m in zip(self.relpaths, self._sizes.tolist(), self._mtimes.tolist())}

    def _pixels(self) -> np.ndarray:
        if self._data is None:
            if self.nbytes == 0:
                self._data = np.empty(0, dtype=np.uint8)
            else:
                self._data = np.memmap(self.path / _IMAGES, dtype=np.uint8, mode="r", shape=(self.nbytes,))
        return self._data

    def image(self, index: int) -> np.ndarray:
        """The ``(H, W, 3)`` uint8 RGB pixels of file ``index`` (a read-only view of the memory map).

        Raises:
            ValueError: the file could not be decoded when the cache was built.
        """
        if not self.valid[index]:
            raise ValueError(f"{self.paths[index]} is not in the cache: it could not be decoded")
        h, w, off = int(self.heights[index]), int(self.widths[index]), int(self.offsets[index])
        return self._pixels()[off : off + h * w * 3].reshape(h, w, 3)

    def __getstate__(self) -> dict[str, Any]:
        # A memory map would be pickled as a full copy of the pixels; worker processes map the file themselves.
        state = dict(self.__dict__)
        state["_data"] = None
        return state

    def __repr__(self) -> str:
        return (f"DecodedImageCache({str(self.path)!r}, {int(self.valid.sum())}/{len(self)} images, "
                f"size {self.size}, {self.nbytes / 1e6:.0f} MB)")  # fmt: skip


def _try_open(path: Path, listing: _Listing, quiet: bool = False) -> DecodedImageCache | None:
    """The cache at ``path`` if it is complete and matches the folder listing; otherwise ``None`` (and why, logged)."""
    if not (path / _META).is_file():
        return None
    try:
        cache = DecodedImageCache(path)
    except ValueError as err:
        if not quiet:
            log.warning("%s; rebuilding it", err)
        return None
    if cache.fingerprint != listing.fingerprint:
        if not quiet:
            log.info("decoded-image cache %s no longer matches %s (%s): rebuilding it", path, listing.folder,
                     _describe_changes(cache.file_stats(), listing))  # fmt: skip
        return None
    return cache


def _decode(job: tuple[str, int, str]) -> tuple[np.ndarray | None, str]:
    """Decode one file and shrink it so its shorter side is at most ``size``: ``(pixels, "")`` or ``(None, reason)``."""
    path, size, resample = job
    try:
        image = load_image(path)
    except ImageLoadError as err:
        return None, err.reason
    w, h = image.size
    short, long = min(w, h), max(w, h)
    if short > size:
        # torchvision's Resize(size) arithmetic (long side truncated), so that resizing a validation image cached at
        # the evaluation size to that size again is the identity, as on the original file
        new_long = max(1, int(size * long / short))
        image = image.resize((size, new_long) if w <= h else (new_long, size), resample=_FILTERS[resample])
    return np.asarray(image, dtype=np.uint8), ""


def _decoded(jobs: list[tuple[str, int, str]], workers: int) -> Iterator[tuple[np.ndarray | None, str]]:
    """:func:`_decode` of every job, in order, over ``workers`` processes (a crashed one raises, never hangs)."""
    if workers <= 0 or len(jobs) < 2:
        yield from map(_decode, jobs)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
        yield from pool.map(_decode, jobs, chunksize=max(1, min(32, len(jobs) // (4 * workers))))


def _build(
    listing: _Listing, tmp: Path, split: str, size: int, resample: str, workers: int, progress: bool
) -> tuple[int, int, float]:
    """Decode every file of ``listing`` into the folder ``tmp``; returns ``(invalid count, bytes, seconds)``."""
    from tqdm.auto import tqdm

    n = len(listing.paths)
    offsets = np.zeros(n, dtype=np.int64)
    heights = np.zeros(n, dtype=np.int64)
    widths = np.zeros(n, dtype=np.int64)
    valid = np.zeros(n, dtype=bool)
    invalid: list[list[str]] = []
    t0 = time.perf_counter()
    offset = 0
    jobs = [(p, size, resample) for p in listing.paths]
    bar = tqdm(total=n, desc=f"decoding {listing.folder}", unit="img", leave=False, disable=not progress)
    try:
        with atomic_write(tmp / _IMAGES, "wb") as fh:
            for i, (pixels, reason) in enumerate(_decoded(jobs, workers)):
                bar.update(1)
                if pixels is None:
                    invalid.append([listing.relpaths[i], reason])
                    log.warning("unreadable image left out of the cache: %s: %s", listing.paths[i], reason)
                    continue
                fh.write(np.ascontiguousarray(pixels).data)
                offsets[i], heights[i], widths[i] = offset, pixels.shape[0], pixels.shape[1]
                valid[i] = True
                offset += pixels.nbytes
    finally:
        bar.close()
    atomic_save(tmp / _INDEX, lambda p: np.savez(
        p, relpaths=np.array(listing.relpaths, dtype=np.str_), sizes=listing.sizes, mtimes=listing.mtimes,
        labels=listing.labels, offsets=offsets, heights=heights, widths=widths, valid=valid,
    ))  # fmt: skip
    seconds = time.perf_counter() - t0
    # written last: a folder without it is never taken for a cache
    atomic_write_json(tmp / _META, {
        "format": CACHE_FORMAT, "folder": str(listing.folder), "split": split, "size": size, "resample": resample,
        "classes": listing.classes, "fingerprint": listing.fingerprint, "count": n, "invalid": invalid,
        "bytes": offset, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_seconds": round(seconds, 3),
    }, indent=1)  # fmt: skip
    return len(invalid), offset, seconds


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for building the cache at ``path`` (waits for another builder to finish)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): builders each write their own temporary copy; renames stay atomic
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building %s; waiting for it", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _publish(tmp: Path, dest: Path) -> None:
    """Rename the finished build ``tmp`` to ``dest``, moving a stale ``dest`` out of the way first."""
    if dest.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, trash / "cache")  # readers that mapped the old files keep them until they close
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, dest)


def open_cache(
    root: str | os.PathLike[str],
    split: str,
    size: int,
    *,
    classes: Sequence[str] | None = None,
    resample: str = "bicubic",
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 0,
    progress: bool = False,
) -> DecodedImageCache:
    """The decoded cache of ``root/split`` at ``size``: reused when it matches the folder, else built first.

    Args:
        root: ImageFolder root holding the ``split`` folder (class sub-folders inside).
        split: the split's folder name.
        size: shorter side of the cached images in pixels (images already smaller are stored as they are).
        classes: force this class list (the training split's, for a validation split), as
            :class:`~crate_vis.data.folders.ImageFolderDataset` does.
        resample: resize filter for shrinking: ``bicubic`` (default), ``bilinear``, ``lanczos``, ``box``,
            ``hamming`` or ``nearest``.
        cache_dir: cache root (default :func:`default_cache_root`).
        workers: decoding processes (0: decode in this process).
        progress: show a progress bar while building.

    Returns:
        The opened cache.

    Raises:
        FileNotFoundError / ValueError: the split folder is missing, has no class folders or no images (the
            messages of :class:`~crate_vis.data.folders.ImageFolderDataset`), or bad ``size``/``resample``.
        OSError: the cache root cannot be written; with ``errno`` ENOSPC ("disk full", naming the cache folder) when
            its disk is full. Nothing of a failed build is left behind.
    """
    if int(size) < 1:
        raise ValueError(f"cache size must be >= 1 pixel, got {size}")
    _check_resample(resample)
    listing = _Listing(Path(root) / split, classes)
    dest = cache_location(root, split, size, resample, cache_dir)
    cache = _try_open(dest, listing)
    if cache is not None:
        log.info("decoded-image cache %s: %d images reused", dest, int(cache.valid.sum()))
        return cache
    with _build_lock(dest):
        cache = _try_open(dest, listing, quiet=True)  # another process may have built it while this one waited
        if cache is not None:
            return cache
        for suffix in ("building", "old"):  # left by builders killed mid-way
            for leftover in dest.parent.glob(f".{dest.name}.*.{suffix}"):
                shutil.rmtree(leftover, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".building", dir=dest.parent))
        try:
            n_invalid, nbytes, seconds = _build(listing, tmp, split, int(size), resample, workers, progress)
            _publish(tmp, dest)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
                raise OSError(err.errno, f"disk full: no room for the decoded-image cache of {listing.folder}; "
                              "free some space or choose another --cache-dir", str(dest)) from err  # fmt: skip
            raise
    if n_invalid:
        log.warning("%s: %d of %d image(s) could not be decoded and are left out (listed above)", listing.folder,
                    n_invalid, len(listing.paths))  # fmt: skip
    log.info("decoded-image cache %s: %d images, %.1f MB, built in %.1f s", dest, len(listing.paths) - n_invalid,
             nbytes / 1e6, seconds)  # fmt: skip
    return DecodedImageCache(dest)


class CachedImageFolder(Dataset):
    """The valid images of a :class:`DecodedImageCache` as a dataset: ``(transform(PIL RGB image), label)``.

    A drop-in for :class:`~crate_vis.data.folders.ImageFolderDataset`: the same transforms apply (they receive a
    PIL image of the cached uint8 pixels), and files that could not be decoded are left out
    instead of being returned as :class:`~crate_vis.data.folders.BadSample`.

    Args:
        cache: an opened cache (:func:`open_cache`).
        transform: applied to the PIL RGB image.

    Attributes:
        classes: class names in label order.
        class_to_idx: name -> label.
        samples: ``(path, label)`` of the served images.
        targets: their labels.
        skipped: ``(path, reason)`` of the files left out.

    Example:
        >>> from crate_vis.data.cache import CachedImageFolder, open_cache
        >>> data = CachedImageFolder(open_cache("imagenette", "val", 109), transform=None)  # doctest: +SKIP
        >>> len(data), data.classes[:2]  # doctest: +SKIP
        (3925, ['n01440764', 'n02102040'])
    """

    def __init__(self, cache: DecodedImageCache, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.cache = cache
        self.root = cache.folder
        self.transform = transform
        self.classes = list(cache.classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.ids = np.flatnonzero(cache.valid)  # served position -> file index of the cache
        self.samples = [(cache.paths[i], int(cache.labels[i])) for i in self.ids]
        self.targets = [label for _, label in self.samples]
        self.skipped = list(cache.invalid)
        if not self.samples:
            raise ValueError(f"{cache.folder}: none of the {len(cache)} images could be decoded (cache {cache.path})")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        i = int(self.ids[index])
        image: Any = Image.fromarray(self.cache.image(i))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.cache.labels[i])

    def __repr__(self) -> str:
        return (f"CachedImageFolder({str(self.root)!r}, {len(self)} images, {len(self.classes)} classes, "
                f"size {self.cache.size})")  # fmt: skip

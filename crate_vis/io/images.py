"""The one image loader used everywhere (CLI, datasets, examples).

Every image becomes an RGB uint8 PIL image; every failure raises :class:`ImageLoadError` carrying the path, so a
batch command can report the file and carry on with the next one (:class:`SkipReport`, :func:`iter_images`).

What :func:`load_image` does, in order:

1. Refuses what is not a readable regular file (missing, a folder, zero bytes).
2. Reads only the header and checks the pixel count against a limit (``max_pixels``; default
   :data:`DEFAULT_MAX_PIXELS`, overridable with ``$CRATE_VIS_MAX_PIXELS``) *before* decoding anything, so a
   decompression bomb (a tiny file that claims gigapixels) costs nothing.
3. Opens only the formats in :data:`ALLOWED_FORMATS`. EPS/PS in particular are never opened: Pillow would hand
   them to Ghostscript, an interpreter, which is no business of an image reader pointed at downloaded files.
4. Decodes the first frame only (animated GIF/PNG/WebP, multi-page TIFF, MPO). Truncated data is an error, never
   silently grey-filled; so are metadata chunks that inflate past Pillow's limits (PNG text and ICC bombs).
5. Converts the pixels to RGB uint8 (list below), then applies the EXIF orientation so that the array is upright
   as a viewer shows it.

Pixel modes (Pillow's names) and how they become RGB uint8:

* ``RGB``: as stored.
* ``1``: 0 -> 0, 1 -> 255, replicated to three channels. ``L``: replicated to three channels.
* ``P``: palette looked up.
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's conversion. No ICC colour management: embedded profiles are not
  applied. Adobe-inverted CMYK JPEGs are handled by Pillow's decoder.
* ``RGBA``, ``LA``, ``PA``, and ``P``/``L``/``RGB`` with a transparency entry: alpha-composited on ``background``
  (default white) with exact integer rounding, ``out = (c * a + bg * (255 - a) + 127) // 255`` per channel.
* ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit): the high byte, ``v >> 8`` (0 -> 0, 255 -> 0, 256 -> 1,
  65535 -> 255). Pillow's own decoders use the same rule for 16-bit RGB(A) PNG/TIFF, so 16-bit grey and 16-bit
  colour files of one scene agree.
* ``I`` (32-bit integer): values within [0, 65535] are treated as 16-bit (``v >> 8``); anything else is min-max
  scaled, ``round(255 * (v - min) / (max - min))``.
* ``F`` (32-bit float): finite values within [0, 1] give ``round(255 * v)``; otherwise min-max scaling over the
  finite values (a constant image is clipped to [0, 1] instead). NaN -> 0, +inf -> 255, -inf -> 0.

A single transparent value of a 16-bit, ``I`` or ``F`` image (PNG ``tRNS``) is composited like an alpha of 0.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageColor

from ..errors import DatasetError, ImageLoadError

__all__ = [
    "ALLOWED_FORMATS", "DEFAULT_BACKGROUND", "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "MAX_PIXELS_ENV",
    "ImageLoadError", "SkipReport", "image_size", "iter_images", "list_images", "load_image", "read_label_png",
    "resolve_max_pixels", "to_array",
]  # fmt: skip

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
    ".mpo", ".avif",
)  # fmt: skip

#: Formats :func:`load_image` opens (Pillow format names; whichever of them this Pillow build supports). JPEG
#: includes multi-picture (MPO) camera files, read as their first picture.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "TGA", "AVIF")

#: Default pixel limit: the count above which Pillow itself refuses an image as a decompression bomb
#: (2 x ``PIL.Image.MAX_IMAGE_PIXELS`` at its default), about 13,377 x 13,377.
DEFAULT_MAX_PIXELS = 178_956_970

#: Environment variable overriding :data:`DEFAULT_MAX_PIXELS`.
MAX_PIXELS_ENV = "CRATE_VIS_MAX_PIXELS"

#: Background on which transparent pixels are composited: white, as a browser shows a transparent PNG.
DEFAULT_BACKGROUND = (255, 255, 255)

#: EXIF orientation (tag 0x0112) -> the transpose that makes the image upright. Values 1 (upright) and anything
#: outside 1-8 need nothing. 6 is "the camera was turned clockwise", undone by a 270-degree counter-clockwise turn.
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "I;16S", "F"}

# Pillow keeps its own bomb guard in a module global; it is only lifted (under this lock) when a caller asks for a
# limit above it, and restored straight after.
_PIL_LIMIT_LOCK = threading.Lock()




# --------------------------------------------------------------------------------------------------- the loader
def resolve_max_pixels(max_pixels: int | None = None) -> int:
    """The pixel limit in force: ``max_pixels`` if given, else ``$CRATE_VIS_MAX_PIXELS``, else the default.

    Raises:
        ValueError: the limit (or the environment variable) is not a positive integer.
    """
    if max_pixels is None:
        raw = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
        if not raw:
            return DEFAULT_MAX_PIXELS
        try:
            max_pixels = int(raw)
        except ValueError:
            raise ValueError(f"${MAX_PIXELS_ENV}={raw!r} is not an integer pixel count") from None
        if max_pixels <= 0:
            raise ValueError(f"${MAX_PIXELS_ENV} must be a positive pixel count, got {max_pixels}")
        return max_pixels
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    return int(max_pixels)


def _parse_background(background: Sequence[int] | str) -> tuple[int, int, int]:
    if isinstance(background, str):
        rgb = ImageColor.getrgb(background)  # ValueError on an unknown colour name
        return (int(rgb[0]), int(rgb[1]), int(rgb[2]))
    values = tuple(int(v) for v in background)
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"background must be an (R, G, B) triple of 0..255 or a colour name, got {background!r}")
    return values  # type: ignore[return-value]


def _parse_min_size(min_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if min_size is None:
        return None
    if isinstance(min_size, (int, np.integer)):
        return (int(min_size), int(min_size))
    h, w = (int(v) for v in min_size)
    return (h, w)


def _allowed_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin once; later calls return at once
    return tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except OSError as err:
        raise ImageLoadError(path, f"cannot access the file ({err.strerror or err})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError(path, "is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError(path, "not a regular file")
    if st.st_size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")


def load_image(
    path: str | os.PathLike[str],
    *,
    background: Sequence[int] | str = DEFAULT_BACKGROUND,
    max_pixels: int | None = None,
    min_size: int | Sequence[int] | None = None,
) -> Image.Image:
    """Read an image file as an upright RGB uint8 PIL image.

    Args:
        path: the image file.
        background: colour that transparent pixels are composited on: an ``(R, G, B)`` triple or a colour name.
        max_pixels: refuse images with more pixels than this (decided from the header, before decoding). ``None``:
            ``$CRATE_VIS_MAX_PIXELS`` or :data:`DEFAULT_MAX_PIXELS`.
        min_size: refuse images smaller than this after orientation: an int (both sides, e.g. the model's patch
            size) or ``(min_height, min_width)``.

    Returns:
        A mode ``"RGB"`` image with the EXIF orientation applied (see the module docstring for the conversions).

    Raises:
        ImageLoadError: missing, empty, truncated, corrupt, non-image, unsupported, too large or too small files;
            ``.path`` names the file and ``.reason`` says why.
        ValueError: invalid arguments (``background``, ``max_pixels``, ``min_size``, ``$CRATE_VIS_MAX_PIXELS``).
    """
    bg = _parse_background(background)
    limit = resolve_max_pixels(max_pixels)
    minimum = _parse_min_size(min_size)
    p = Path(path)
    _check_file(p)
    try:
        image = _decode(p, limit, bg)
    except ImageLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - a decoder fed a corrupt file can fail in any way; keep the cause
        quiet = isinstance(err, (FileNotFoundError, PermissionError, Image.UnidentifiedImageError))
        raise _load_error(p, err, limit) from (None if quiet else err)
    if minimum is not None:
        w, h = image.size
        if h < minimum[0] or w < minimum[1]:
            want = f"{minimum[0]} pixels per side" if minimum[0] == minimum[1] else f"{minimum[0]}x{minimum[1]} (HxW)"
            raise ImageLoadError(p, f"image is {h}x{w} (HxW), smaller than the minimum {want}")
    return image


def image_size(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> tuple[int, int]:
    """The upright ``(H, W)`` of an image file, read from its header alone, by the rules of :func:`load_image`.

    The checks of :func:`load_image` that need no pixel data apply: a readable regular file, an allowed format
    and the pixel limit (``max_pixels``, else ``$CRATE_VIS_MAX_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`), so a
    decompression bomb is refused here as there. The EXIF orientation swaps the sides where it turns the picture.

    Raises:
        ImageLoadError: what :func:`load_image` would refuse before decoding (``.path`` names the file).
        ValueError: an invalid ``max_pixels`` or ``$CRATE_VIS_MAX_PIXELS``.
    """
    limit = resolve_max_pixels(max_pixels)
    p = Path(path)
    _check_file(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _pil_limit_at_least(limit), Image.open(p, formats=_allowed_formats()) as im:
                w, h = _checked_size(im, p, limit)
                orientation = _orientation(im, p)
    except ImageLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt header can fail in any way; keep the cause
        raise _load_error(p, err, limit) from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def _load_error(path: Path, err: Exception, limit: int) -> ImageLoadError:
    """The :class:`ImageLoadError` for an exception met while opening or decoding ``path``."""
    if isinstance(err, Image.DecompressionBombError):
        return ImageLoadError(path, f"image too large ({err}); the limit is {limit} pixels{_limit_hint()}")
    if isinstance(err, FileNotFoundError):
        return ImageLoadError(path, "file not found")
    if isinstance(err, PermissionError):
        return ImageLoadError(path, f"cannot read the file ({err.strerror or err})")
    if isinstance(err, Image.UnidentifiedImageError):
        return ImageLoadError(path, f"not an image, or a format that is not read (readable: "
                                    f"{', '.join(_allowed_formats())})")  # fmt: skip
    return ImageLoadError(path, f"corrupt or truncated image ({type(err).__name__}: {err})")


def _checked_size(im: Image.Image, path: Path, limit: int) -> tuple[int, int]:
    """``(W, H)`` of an opened image, refused when invalid or above ``limit`` pixels."""
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageLoadError(path, f"invalid image size {w}x{h} in the header")
    if w * h > limit:
        raise ImageLoadError(path, f"image is {w}x{h} = {w * h} pixels, more than the limit of {limit}{_limit_hint()}")
    return w, h


def _limit_hint() -> str:
    return f" (raise it with max_pixels= or ${MAX_PIXELS_ENV} if the file is trusted)"


def _decode(path: Path, limit: int, background: tuple[int, int, int]) -> Image.Image:
    """Open ``path`` (header), check its size, decode the first frame and convert it to upright RGB."""
    with warnings.catch_warnings():
        # Pillow warns between its two thresholds; the decision is ours (``limit``), taken below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with _pil_limit_at_least(limit), Image.open(path, formats=_allowed_formats()) as im:
            _checked_size(im, path, limit)
            im.load()  # the first frame; raises on truncated or corrupt data
            orientation = _orientation(im, path)
            rgb = _to_rgb(im, background, path)
    fix = _ORIENTATION_FIX.get(orientation)
    return rgb.transpose(fix) if fix is not None else rgb


class _pil_limit_at_least:
    """Context manager: make sure Pillow's own bomb guard does not fire below ``limit`` pixels."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.saved: int | None = None
        self.raised = False

    def __enter__(self) -> None:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and 2 * current < self.limit:
            _PIL_LIMIT_LOCK.acquire()
            self.saved, self.raised = Image.MAX_IMAGE_PIXELS, True
            Image.MAX_IMAGE_PIXELS = self.limit

    def __exit__(self, *exc: object) -> None:
        if self.raised:
            Image.MAX_IMAGE_PIXELS = self.saved
            _PIL_LIMIT_LOCK.release()


def _orientation(im: Image.Image, path: Path) -> int:
    """EXIF orientation (1..8), 1 when absent. A corrupt EXIF block is reported and treated as upright."""
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if isinstance(value, (int, np.integer)) else 1
    except Exception as err:  # noqa: BLE001 - a broken metadata block should not cost readable pixels
        warnings.warn(f"{path}: unreadable EXIF block ({type(err).__name__}: {err}); orientation ignored",
                      RuntimeWarning, stacklevel=4)  # fmt: skip
        return 1


def _to_rgb(im: Image.Image, background: tuple[int, int, int], path: Path) -> Image.Image:
    mode = im.mode
    if mode in _HIGH_DEPTH_MODES:
        grey = _high_depth_to_uint8(np.asarray(im), mode)  # (H, W) uint8
        rgb = np.repeat(grey[..., None], 3, axis=2)  # (H, W, 3)
        t = im.info.get("transparency")
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            alpha = np.where(np.asarray(im) == t, 0, 255).astype(np.uint8)  # (H, W)
            rgb = _composite(rgb, alpha, background)
        return Image.fromarray(rgb, "RGB")
    if mode == "La":
        im, mode = im.convert("LA"), "LA"
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"))  # (H, W, 4)
        return Image.fromarray(_composite(rgba[..., :3], rgba[..., 3], background), "RGB")
    if mode == "RGB":
        return im.copy()
    if mode == "1":
        im = im.convert("L")
    try:
        return im.convert("RGB")
    except ValueError as err:
        raise ImageLoadError(path, f"unsupported pixel mode {mode!r} ({err})") from None


def _composite(rgb: np.ndarray, alpha: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 over ``background`` with ``alpha`` (H, W) uint8, exactly rounded."""
    a = alpha.astype(np.uint32)[..., None]  # (H, W, 1)
    bg = np.asarray(background, dtype=np.uint32)  # (3,)
    out = (rgb.astype(np.uint32) * a + bg * (255 - a) + 127) // 255  # (H, W, 3)
    return out.astype(np.uint8)


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit integer or float greyscale (H, W) -> uint8 (H, W), by the rules in the module docstring."""
    if mode == "F":
        v = values.astype(np.float64)
        finite = np.isfinite(v)
        if finite.any():
            lo, hi = float(v[finite].min()), float(v[finite].max())
            in_unit = lo >= 0.0 and hi <= 1.0
            # ±inf land on the ends of the range through the clip; NaN stays NaN until the last line.
            scaled = np.clip(v, 0.0, 1.0) if in_unit or hi == lo else (np.clip(v, lo, hi) - lo) / (hi - lo)
        else:
            scaled = np.clip(v, 0.0, 1.0)  # nothing finite: +inf -> 1, -inf -> 0
        return np.rint(np.nan_to_num(scaled, nan=0.0) * 255.0).astype(np.uint8)
    ints = values.astype(np.int64)
    lo, hi = int(ints.min()), int(ints.max())
    if lo >= 0 and hi <= 0xFFFF:
        return (ints >> 8).astype(np.uint8)
    return np.rint((ints - lo) * (255.0 / (hi - lo))).astype(np.uint8)  # hi > lo: the range exceeds 16 bits


def to_array(image: Image.Image, *, background: Sequence[int] | str = DEFAULT_BACKGROUND) -> np.ndarray:
    """PIL image -> ``(H, W, 3)`` uint8 array, converting any pixel mode by the rules of :func:`load_image`.

    Raises:
        ImageLoadError: a pixel mode with no RGB conversion.
    """
    if image.mode != "RGB":
        image = _to_rgb(image, _parse_background(background), Path("<in-memory image>"))
    return np.asarray(image, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- batches of files
def list_images(root: str | os.PathLike[str], *, include_hidden: bool = False) -> list[Path]:
    """Image files under a folder (recursively, sorted, by extension) or the file itself.

    Hidden files and folders (names starting with ``.``: macOS ``._x.jpg`` resource forks, temporary files of
    :mod:`crate_vis.io.atomic` writes in progress) are left out unless ``include_hidden``. Symbolic links to
    folders are not followed, so a link loop cannot recurse forever.

    Raises:
        FileNotFoundError: ``root`` does not exist (a typo should not look like an empty folder).
    """
    p = Path(root)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such image file or folder", str(p))
    found: list[Path] = []
    for folder, dirs, files in os.walk(p, followlinks=False):
        if not include_hidden:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if (include_hidden or not name.startswith(".")) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                q = Path(folder, name)
                if q.is_file():
                    found.append(q)
    return sorted(found)


class SkipReport:
    """Bad files met by a batch command: reported as they come, counted and listed at the end.

    The command increments :attr:`processed` for every input it handled; :meth:`add` records a skipped one.

    Args:
        strict: raise the first error instead of skipping.
        stream: where each skip is reported as it happens (default ``sys.stderr``); ``None`` keeps quiet.

    Attributes:
        failures: ``(path, reason)`` for each skipped file, in order.
        processed: inputs handled successfully.
    """

    def __init__(self, strict: bool = False, stream: IO[str] | None | str = "stderr") -> None:
        self.strict = strict
        self._stream = stream
        self.failures: list[tuple[str, str]] = []
        self.processed = 0

    @property
    def skipped(self) -> int:
        """Number of skipped files."""
        return len(self.failures)

    def add(self, path: str | os.PathLike[str], reason: str) -> None:
        """Record a skipped file (reported at once); with ``strict`` raise :class:`ImageLoadError` instead."""
        if self.strict:
            raise ImageLoadError(path, reason)
        self.failures.append((str(path), reason))
        stream = sys.stderr if self._stream == "stderr" else self._stream
        if stream is not None:
            print(f"skipped {path}: {reason}", file=stream)  # type: ignore[arg-type]

    def summary(self) -> str:
        """One line of counts, then one line per skipped file."""
        lines = [f"{self.processed} processed, {len(self.failures)} skipped"]
        lines += [f"  {p}: {r}" for p, r in self.failures]
        return "\n".join(lines)

    def exit_code(self) -> int:
        """0 when anything was processed (or there was nothing to do), 1 when every input failed."""
        return 1 if self.failures and self.processed == 0 else 0


def iter_images(
    paths: Sequence[str | os.PathLike[str]],
    report: SkipReport,
    *,
    background: Sequence[int] | str = DEFAULT_BACKGROUND,
    max_pixels: int | None = None,
    min_size: int | Sequence[int] | None = None,
) -> Iterator[tuple[Path, Image.Image]]:
    """Load each path with :func:`load_image`, yielding ``(path, image)``; failures go to ``report`` and are skipped.

    The loader options are those of :func:`load_image`. With ``report.strict`` the first failure raises.
    """
    for path in paths:
        try:
            image = load_image(path, background=background, max_pixels=max_pixels, min_size=min_size)
        except ImageLoadError as err:
            report.add(err.path, err.reason)
            continue
        yield Path(path), image


def read_label_png(path: str | os.PathLike[str]) -> np.ndarray:
    """A label PNG (palette 'P' or greyscale 'L'/'I') as its raw ``(H, W)`` int64 indices, never converted to RGB.

    An RGB(A) PNG whose three colour channels are equal everywhere (a greyscale mask saved as colour) is read as
    greyscale; a colour-coded one is an error, since its colours are not labels.

    Raises:
        DatasetError: missing or unreadable file, or a colour image where labels were expected.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "L", "I", "I;16", "1"):
                return np.asarray(im, dtype=np.int64)
            if im.mode in ("LA", "RGB", "RGBA"):
                arr = np.asarray(im.convert("RGB"), dtype=np.int64)  # (H, W, 3)
                if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
                    return arr[..., 0]
            mode = im.mode
    except FileNotFoundError:
        raise DatasetError(path, "label map", "file not found") from None
    except OSError as err:
        raise DatasetError(path, "label map", f"unreadable ({err})") from None
    raise DatasetError(path, "label map", f"expected a palette or greyscale PNG, got a colour image (mode {mode})")

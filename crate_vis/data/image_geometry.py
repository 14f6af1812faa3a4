"""Photo -> model input -> patch grid -> back onto the photo: the one place this geometry is computed.

A photo of ``H x W`` pixels becomes a model input in two steps, recorded in an :class:`ImageGeometry`:

1. **resize** to ``resized_hw``: the short side to ``size`` with the aspect ratio kept (the default), or to
   ``size x size`` (``square=True``, MaskCut's fixed-size input), or not at all (``size=None``);
2. **fit** to whole patches: ``"crop"`` drops the bottom/right remainder (DINO's policy; less than one patch),
   ``"pad"`` zero-pads bottom/right instead, ``"center"`` cuts a centred ``size x size`` square out of the
   aspect-preserving resize (the evaluation crop; ``analyze`` batches images this way).

The model's tokens form the grid ``input_hw / patch_size``. Everything that goes back onto the photo (grid masks,
attention maps, label maps for scoring) goes through the same object, so ``segment``, ``attention``, ``heads``,
``analyze`` and the scorers agree to the pixel:

* :meth:`ImageGeometry.grid_to_image`: grid maps -> photo pixels. Each photo pixel's centre is carried into the
  resized frame and read from the patch under it; pixels of a cropped remainder take the nearest patch
  row/column (nearest), or the maps are resampled smoothly (bilinear).
* :meth:`ImageGeometry.mask_fraction`: a photo-resolution mask -> the fraction of each cell it covers.
* :meth:`ImageGeometry.labels_to_grid`: a label map -> the majority label of each cell.

Cells on the photo are the pixel-centre bins of the region the input covers, :attr:`ImageGeometry.extent`: the whole
photo, less the strip a crop removed.

Example:
    >>> g = plan_geometry((480, 640), patch_size=16, size=224)
    >>> g.resized_hw, g.input_hw, g.grid
    ((224, 299), (224, 288), (14, 18))
    >>> g.grid_to_image(np.ones(g.grid, dtype=bool)).shape
    (480, 640)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ImageLoadError, UsageError
from .transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor

__all__ = [
    "FIT_MODES", "ImageGeometry", "PreparedImage", "plan_geometry", "prepare_image", "resize_nearest",
    "shrink_for_display", "skip_reason", "DEFAULT_MAX_INPUT_SIDE", "UNNAMED_IMAGE",
]  # fmt: skip

#: How a resized photo is made a whole number of patches.
FIT_MODES = ("crop", "pad", "center")

#: Longest model-input side any command accepts without being told otherwise (``max_side``): a 5000 x 3 px photo
#: at ``--img-size 224`` would otherwise become a 373,000-pixel-wide input.
DEFAULT_MAX_INPUT_SIDE = 2048

#: The ``path`` of an :class:`~crate_vis.errors.ImageLoadError` raised here: the geometry sees pixels, not files,
#: so the caller, who knows the file, names it (:func:`skip_reason`).
UNNAMED_IMAGE = "<image>"


def skip_reason(err: Exception) -> str:
    """Why an image was refused, without the placeholder path of an error raised on pixels alone.

    A batch command reports ``skipped <its file>: <reason>``; an :class:`~crate_vis.errors.ImageLoadError` from
    :func:`plan_geometry` or :func:`prepare_image` (e.g. a photo smaller than one patch) carries
    :data:`UNNAMED_IMAGE` as its path, which must not show up in that line. Other errors keep their message.

    Example:
        >>> skip_reason(ImageLoadError(UNNAMED_IMAGE, "image of 1x1 px is smaller than one 8x8 patch"))
        'image of 1x1 px is smaller than one 8x8 patch'
    """
    if isinstance(err, ImageLoadError):
        return err.reason if err.path == UNNAMED_IMAGE else f"{err.path}: {err.reason}"
    return str(err)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    a, b = value
    return int(a), int(b)


@dataclass(frozen=True)
class ImageGeometry:
    """How one photo became a model input.

    Attributes:
        original_hw: the photo's ``(H, W)``.
        resized_hw: its size after the resize, before the fit to whole patches.
        input_hw: the model input's ``(h, w)``, multiples of the patch size.
        patch_size: ``(ph, pw)``.
        fit: ``"crop"`` (bottom/right remainder dropped), ``"pad"`` (zero-padded) or ``"center"`` (a centred
            window).
        offset: ``(top, left)`` of the input's window in the resized photo (non-zero for ``"center"``).
    """

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    input_hw: tuple[int, int]
    patch_size: tuple[int, int]
    fit: str = "crop"
    offset: tuple[int, int] = (0, 0)

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid ``(gh, gw)`` of the model input."""
        return self.input_hw[0] // self.patch_size[0], self.input_hw[1] // self.patch_size[1]

    @property
    def extent(self) -> tuple[float, float]:
        """``(eh, ew)``: how many photo pixels (from the input's top-left corner on) the model input covers."""
        h, w = self.original_hw
        rh, rw = self.resized_hw
        return min(float(h), self.input_hw[0] * h / rh), min(float(w), self.input_hw[1] * w / rw)

    def _cell_index(self, n: int, axis: int) -> np.ndarray:
        """Grid row (``axis`` 0) or column (1) under the centre of each of ``n`` output pixels; may fall outside."""
        r, p, o = self.resized_hw[axis], self.patch_size[axis], self.offset[axis]
        return np.floor(((np.arange(n) + 0.5) * (r / n) - o) / p).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the segment output records it per image)."""
        return {
            "original_hw": list(self.original_hw), "resized_hw": list(self.resized_hw), "input_hw": list(self.input_hw),
            "patch_size": list(self.patch_size), "fit": self.fit, "offset": list(self.offset),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageGeometry:
        """Inverse of :meth:`to_dict`."""
        return cls(
            _pair(d["original_hw"]), _pair(d["resized_hw"]), _pair(d["input_hw"]), _pair(d["patch_size"]),
            str(d.get("fit", "crop")), _pair(d.get("offset", (0, 0))),
        )  # fmt: skip

    # ---------------------------------------------------------------------------------------------- grid -> photo
    def _rows_cols(self, out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Grid row of each output row and grid column of each output column (pixel centres, nearest)."""
        gh, gw = self.grid
        rows = self._cell_index(out_hw[0], 0).clip(0, gh - 1)  # (H,)
        cols = self._cell_index(out_hw[1], 1).clip(0, gw - 1)  # (W,)
        return rows, cols

    def grid_to_image(
        self, maps: np.ndarray | torch.Tensor, mode: str = "nearest", out_hw: Sequence[int] | None = None
    ) -> np.ndarray:
        """Bring patch-grid maps back onto the photo.

        Args:
            maps: ``(..., gh, gw)`` maps on this input's grid (bool, integer or float).
            mode: ``"nearest"`` (each patch a block; always used for bool and integer maps) or ``"bilinear"``
                (smooth heat maps).
            out_hw: the size to draw at (default the photo's own); a smaller one with the same aspect ratio gives
                figure panels without resizing the photo twice.

        Returns:
            ``(..., H, W)`` array of the input's dtype (bool and integer maps stay exact).
        """
        if mode not in ("nearest", "bilinear"):
            raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
        arr = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
        if tuple(arr.shape[-2:]) != self.grid:
            raise ValueError(f"maps of grid {tuple(arr.shape[-2:])} do not match the input's grid {self.grid}")
        h, w = _pair(out_hw) if out_hw is not None else self.original_hw
        discrete = arr.dtype == bool or not np.issubdtype(arr.dtype, np.floating)
        if mode == "nearest" or discrete:
            rows, cols = self._rows_cols((h, w))
            return arr[..., rows[:, None], cols[None, :]]
        lead = arr.shape[:-2]
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(-1, 1, *self.grid)  # (M, 1, gh, gw)
        x = F.interpolate(x, size=self.input_hw, mode="bilinear", align_corners=False)  # (M, 1, h, w)
        top, left = self.offset
        pad_b = max(0, self.resized_hw[0] - self.input_hw[0] - top)
        pad_r = max(0, self.resized_hw[1] - self.input_hw[1] - left)
        if top or left or pad_b or pad_r:  # cropped strips take the values of their nearest kept pixels
            x = F.pad(x, (left, pad_r, top, pad_b), mode="replicate")
        x = x[..., : self.resized_hw[0], : self.resized_hw[1]]  # a padded input's padding is not on the photo
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return x.reshape(*lead, h, w).numpy().astype(arr.dtype, copy=False)

    # ---------------------------------------------------------------------------------------------- photo -> grid
    def _cells(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Cell row of each photo row and cell column of each photo column; ``-1`` past the extent."""
        if tuple(shape) != tuple(self.original_hw):
            raise ValueError(f"a map of {shape[0]}x{shape[1]} does not match the photo's {self.original_hw}")
        out = []
        for axis, g in enumerate(self.grid):
            cell = self._cell_index(shape[axis], axis)
            cell[(cell >= g) | (cell < 0)] = -1
            out.append(cell)
        return out[0], out[1]

    def mask_fraction(self, mask: np.ndarray | torch.Tensor) -> np.ndarray:
        """The fraction of each grid cell covered by a photo-resolution mask, ``(gh, gw)`` float64.

        A photo pixel belongs to the cell holding its centre; pixels past the :attr:`extent` to none.
        """
        m = (mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)).astype(np.float64)
        rows, cols = self._cells(m.shape)
        gh, gw = self.grid
        kr, kc = rows >= 0, cols >= 0
        sums = np.zeros((gh, gw))
        np.add.at(sums, (rows[kr][:, None], cols[kc][None, :]), m[np.ix_(kr, kc)])
        area = np.bincount(rows[kr], minlength=gh)[:, None] * np.bincount(cols[kc], minlength=gw)[None, :]
        if (area == 0).any():
            raise ValueError(f"grid {gh}x{gw} over {self.extent} photo pixels leaves cells without pixels")
        return sums / area

    def labels_to_grid(self, labels: np.ndarray, void: int = 255) -> np.ndarray:
        """A label map at token resolution: each cell takes the most frequent label among its pixels.

        Void pixels vote like a label, so a mostly-void cell stays void; ties go to the smaller label.
        """
        lab = np.asarray(labels).astype(np.int64)
        if lab.ndim != 2:
            raise ValueError(f"labels must be (H, W), got shape {lab.shape}")
        if lab.size and lab.min() < 0:
            raise ValueError("labels must be non-negative")
        rows, cols = self._cells(lab.shape)
        gh, gw = self.grid
        values, inv = np.unique(lab, return_inverse=True)
        inv = inv.reshape(lab.shape)
        kr, kc = rows >= 0, cols >= 0
        cell = rows[kr][:, None] * gw + cols[kc][None, :]  # cell index of each covered pixel
        counts = np.zeros((gh * gw, values.size), dtype=np.int64)
        np.add.at(counts, (cell.reshape(-1), inv[np.ix_(kr, kc)].reshape(-1)), 1)
        if (counts.sum(1) == 0).any():
            raise ValueError(f"grid {gh}x{gw} over {self.extent} photo pixels leaves cells without pixels")
        return values[counts.argmax(1)].reshape(gh, gw)

    @classmethod
    def covering(cls, original_hw: Sequence[int], grid: Sequence[int], extent: Sequence[float] | None = None) -> ImageGeometry:
        """The geometry of a ``grid`` laid over the top-left ``extent`` pixels of a photo (default all of it).

        For scoring predictions made elsewhere, where only the grid (and the covered region) is known.
        """
        h, w = _pair(original_hw)
        gh, gw = _pair(grid)
        if not (1 <= gh <= h and 1 <= gw <= w):
            raise ValueError(f"grid {gh}x{gw} must be between 1x1 and the map size {h}x{w}")
        eh, ew = (float(h), float(w)) if extent is None else (float(extent[0]), float(extent[1]))
        if not (0 < eh <= h + 1e-6 and 0 < ew <= w + 1e-6):
            raise ValueError(f"extent {extent} must lie within the photo {h}x{w}")
        # one "pixel" per cell: input = grid, resized (fractionally) so that the grid spans the extent exactly
        rh, rw = gh * h / eh, gw * w / ew
        return cls((h, w), (rh, rw), (gh, gw), (1, 1), "crop")  # type: ignore[arg-type]


def plan_geometry(
    original_hw: Sequence[int],
    patch_size: int | Sequence[int],
    size: int | None = None,
    *,
    square: bool = False,
    fit: str = "crop",
    max_side: int | None = DEFAULT_MAX_INPUT_SIDE,
) -> ImageGeometry:
    """Decide how a photo of ``original_hw`` becomes a model input (nothing is resized here).

    Args:
        original_hw: the photo's ``(H, W)``.
        patch_size: ``p`` or ``(ph, pw)``.
        size: the short side of the input (aspect ratio kept), the side of a square input with ``square``; ``None``
            keeps the photo's size.
        square: resize to ``size x size``.
        fit: ``"crop"`` or ``"pad"`` to whole patches.
        max_side: refuse an input whose longer side would exceed this (``None``: no limit).

    Raises:
        ImageLoadError: the photo is smaller than one patch (a property of the photo: batch commands skip it).
        UsageError: bad ``size``/``fit`` or an input longer than ``max_side`` (say ``--img-size`` or resize first).
    """
    h, w = _pair(original_hw)
    ph, pw = _pair(patch_size)
    if fit not in FIT_MODES:
        raise UsageError(f"fit must be one of {FIT_MODES}, got {fit!r}")
    if size is not None and (isinstance(size, bool) or int(size) < max(ph, pw)):
        raise UsageError(f"the input size must be at least one {ph}x{pw} patch, got {size}")
    if fit == "center" and (size is None or square):
        raise UsageError("fit='center' cuts a size x size window out of an aspect-preserving resize: give a size")
    if h < ph or w < pw:
        raise ImageLoadError(UNNAMED_IMAGE, f"image of {w}x{h} px is smaller than one {pw}x{ph} patch")
    if size is None:
        rh, rw = h, w
    elif square:
        rh = rw = int(size)
    else:
        scale = int(size) / min(w, h)
        rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
    offset = (0, 0)
    if fit == "crop":
        ih, iw = rh - rh % ph, rw - rw % pw
    elif fit == "pad":
        ih, iw = rh + (-rh) % ph, rw + (-rw) % pw
    else:
        assert size is not None  # fit="center" without a size is refused above
        if int(size) % ph or int(size) % pw:
            raise UsageError(f"a centred {size}x{size} window is not a whole number of {ph}x{pw} patches")
        rh, rw = max(rh, int(size)), max(rw, int(size))
        ih = iw = int(size)
        offset = ((rh - ih) // 2, (rw - iw) // 2)
    if ih < ph or iw < pw:
        raise ImageLoadError(UNNAMED_IMAGE, f"image of {w}x{h} px gives {rw}x{rh} after resizing: smaller than one {pw}x{ph} patch")
    if max_side is not None and max(ih, iw) > max_side:
        raise UsageError(
            f"a {w}x{h} px photo at input size {size} would be a {iw}x{ih} px model input, longer than {max_side} px "
            f"(aspect ratio {max(w, h) / min(w, h):.0f}:1); pass a smaller --img-size, --square, or raise --max-side"
        )
    return ImageGeometry((h, w), (rh, rw), (ih, iw), (ph, pw), fit, offset)


@dataclass(frozen=True)
class PreparedImage:
    """A photo, the model input made from it, and the geometry linking them.

    Attributes:
        original: the photo ``(H, W, 3)`` uint8.
        tensor: normalised model input ``(3, h, w)``.
        geometry: how one became the other.
    """

    original: np.ndarray
    tensor: torch.Tensor
    geometry: ImageGeometry

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid ``(gh, gw)``."""
        return self.geometry.grid

    @property
    def original_hw(self) -> tuple[int, int]:
        """``(H, W)`` of the photo."""
        return self.geometry.original_hw

    @property
    def input_hw(self) -> tuple[int, int]:
        """``(h, w)`` of the model input."""
        return self.geometry.input_hw

    def grid_to_image(self, maps: np.ndarray | torch.Tensor, mode: str = "nearest") -> np.ndarray:
        """Grid maps at the resolution of :attr:`original` (see :meth:`ImageGeometry.grid_to_image`)."""
        return self.geometry.grid_to_image(maps, mode, out_hw=self.original.shape[:2])


def prepare_image(
    image: Image.Image | np.ndarray,
    patch_size: int | Sequence[int],
    size: int | None = None,
    *,
    square: bool = False,
    fit: str = "crop",
    max_side: int | None = DEFAULT_MAX_INPUT_SIDE,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> PreparedImage:
    """Resize a photo for a patch model, fit it to whole patches, normalise it, and keep the geometry.

    Args:
        image: RGB PIL image or ``(H, W, 3)`` uint8 array.
        patch_size: ``p`` or ``(ph, pw)``.
        size, square, fit, max_side: see :func:`plan_geometry`.
        mean, std: normalisation (ImageNet statistics, as training uses).

    Returns:
        The :class:`PreparedImage`.

    Example:
        >>> img = Image.new("RGB", (100, 60))
        >>> p = prepare_image(img, 8, size=48)
        >>> tuple(p.tensor.shape), p.grid
        ((3, 48, 80), (6, 10))
    """
    pil = Image.fromarray(np.asarray(image, dtype=np.uint8)) if isinstance(image, np.ndarray) else image
    if pil.mode != "RGB":
        pil = pil.convert("RGB")
    geometry = plan_geometry((pil.height, pil.width), patch_size, size, square=square, fit=fit, max_side=max_side)
    rh, rw = geometry.resized_hw
    resized = pil if (rh, rw) == (pil.height, pil.width) else pil.resize((rw, rh), Image.Resampling.BICUBIC)
    ih, iw = geometry.input_hw
    top, left = geometry.offset
    if (ih, iw) != (rh, rw):
        resized = resized.crop((left, top, left + iw, top + ih))  # past the edge (fit="pad") PIL fills zeros
    tensor = to_tensor(resized, mean, std)
    if fit == "pad" and (ih, iw) != (rh, rw):
        tensor[:, rh:, :] = 0.0  # padding is zero in the normalised input, as F.pad would make it
        tensor[:, :, rw:] = 0.0
    return PreparedImage(np.asarray(pil, dtype=np.uint8), tensor, geometry)


def shrink_for_display(prepared: PreparedImage, max_side: int | None) -> PreparedImage:
    """The same geometry with the photo scaled down (aspect ratio kept) so its longer side is at most ``max_side``.

    Figures do not need a 12-megapixel photo per panel; maps brought back with :meth:`PreparedImage.grid_to_image`
    then come out at the smaller size. ``None`` (or a photo already small enough) returns ``prepared`` unchanged.
    """
    h, w = prepared.original.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return prepared
    if max_side < 1:
        raise UsageError(f"the display size must be positive, got {max_side}")
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL order (W, H)
    small = np.asarray(Image.fromarray(prepared.original).resize(size, Image.Resampling.LANCZOS), dtype=np.uint8)
    return replace(prepared, original=small)


def resize_nearest(arr: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of ``(..., h, w[, C])`` maps to ``size = (H, W)`` by pixel centres.

    Output pixel ``y`` reads source row ``floor((y + 0.5) * h / H)``; with ``channels_last`` arrays (``(h, w, 3)``
    RGB) pass them as they are: a trailing axis of size 3 or 4 on a 3-D array is kept.
    """
    a = np.asarray(arr)
    rgb = a.ndim == 3 and a.shape[-1] in (3, 4) and a.dtype == np.uint8
    h, w = (a.shape[0], a.shape[1]) if rgb else a.shape[-2:]
    H, W = _pair(size)
    rows = np.floor((np.arange(H) + 0.5) * h / H).astype(np.int64).clip(0, h - 1)
    cols = np.floor((np.arange(W) + 0.5) * w / W).astype(np.int64).clip(0, w - 1)
    if rgb:
        return a[rows[:, None], cols[None, :]]
    return a[..., rows[:, None], cols[None, :]]

"""Mask helpers shared by the segmentation methods: upsampling, connected components, IoU of two masks.

Grid masks are boolean arrays ``(..., gh, gw)`` over patch tokens (row-major token order, as the models emit them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..io.coco import mask_bbox
from ..metrics.iou import binary_iou
from ..models.crate import to_2tuple as as_pair

__all__ = [
    "as_pair",
    "upsample_masks",
    "upsample_maps",
    "label_components",
    "component_at",
    "largest_component",
    "mask_iou",
    "mask_bbox",
]

_STRUCTURES = {
    4: ndimage.generate_binary_structure(2, 1),  # edge neighbours (scipy.ndimage.label's default)
    8: ndimage.generate_binary_structure(2, 2),  # edge and corner neighbours
}


def upsample_masks(masks: torch.Tensor, patch_size: int | Sequence[int]) -> torch.Tensor:
    """Nearest upsampling of grid masks by the patch size: each token becomes a ``ph x pw`` block.

    Args:
        masks: ``(..., gh, gw)`` boolean (or 0/1) tensor.
        patch_size: ``p`` or ``(ph, pw)``.

    Returns:
        ``(..., gh * ph, gw * pw)`` tensor of the input dtype.
    """
    ph, pw = as_pair(patch_size)
    # repeat_interleave is exactly F.interpolate(mode="nearest", scale_factor=p) for integer factors, on any dtype.
    return masks.repeat_interleave(ph, dim=-2).repeat_interleave(pw, dim=-1)


def upsample_maps(
    maps: torch.Tensor, size: Sequence[int], mode: str = "bilinear"
) -> torch.Tensor:
    """Resize float maps ``(..., gh, gw)`` to ``size = (H, W)`` (``"nearest"``, ``"bilinear"`` or ``"bicubic"``)."""
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]).float()  # (M, 1, gh, gw)
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    y = F.interpolate(x, size=tuple(int(s) for s in size), mode=mode, **kwargs)  # (M, 1, H, W)
    return y.reshape(*lead, *y.shape[-2:])


def label_components(mask: np.ndarray, connectivity: int = 4) -> tuple[np.ndarray, int]:
    """Connected components of a 2-D boolean mask: ``(labels (H, W) int, count)``; background is 0."""
    if connectivity not in _STRUCTURES:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=_STRUCTURES[connectivity])
    return labels, int(count)


def component_at(mask: np.ndarray, index: int | tuple[int, int], connectivity: int = 4) -> np.ndarray:
    """The connected component of ``mask`` containing a pixel (flat index or ``(row, col)``); empty if it is off."""
    m = np.asarray(mask, dtype=bool)
    rc: tuple[Any, ...]
    if np.isscalar(index):  # NumPy's TypeIs for isscalar does not narrow ``int | tuple`` to int
        rc = np.unravel_index(int(cast(int, index)), m.shape)
    else:
        rc = tuple(cast("tuple[int, int]", index))
    labels, _ = label_components(m, connectivity)
    lab = labels[rc]
    if lab == 0:
        return np.zeros_like(m)
    return labels == lab


def largest_component(mask: np.ndarray, connectivity: int = 4) -> np.ndarray:
    """The largest connected component of a 2-D mask (ties: the lowest label, i.e. first in raster order)."""
    m = np.asarray(mask, dtype=bool)
    labels, count = label_components(m, connectivity)
    if count <= 1:
        return m.copy()
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty, so an empty repeat never matches)."""
    return binary_iou(a, b, empty=0.0)

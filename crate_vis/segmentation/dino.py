"""DINO-style masks from CLS attention: keep the most-attended patches holding a fraction of the attention mass.

The procedure of DINO's ``visualize_attention.py`` (Caron et al., 2021), per head: sort the CLS-to-patch attention
ascending, renormalise it over the patch tokens, take the cumulative sum and keep the tokens whose cumulative value
exceeds ``1 - mass``; undo the sort; upsample by the patch size with nearest neighbours. The kept set is the smallest
set of most-attended tokens holding at least ``mass`` of the attention.

Ties (equal attention values) are resolved with a stable ascending sort: among equal values the token that comes
first in raster order is treated as less attended. DINO calls an unstable sort, whose order of ties is unspecified;
on untied inputs both agree exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .masks import as_pair, largest_component, upsample_maps, upsample_masks

__all__ = [
    "dino_threshold",
    "dino_masks",
    "dino_foreground",
    "attention_maps",
    "attention_contrast",
]


def _check_mass(mass: float) -> None:
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")


def _check_attention(cls_attn: torch.Tensor) -> None:
    if cls_attn.dim() != 4:
        raise ValueError(f"expected CLS attention of shape (B, heads, gh, gw), got {tuple(cls_attn.shape)}")
    if not torch.isfinite(cls_attn).all():
        raise ValueError("CLS attention contains NaN or infinite values")


def dino_threshold(attn: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """Keep the most-attended tokens holding ``mass`` of the attention, along the last dimension.

    Args:
        attn: ``(..., N)`` non-negative attention over patch tokens (need not sum to one: it is renormalised).
        mass: fraction of the attention to keep, in ``(0, 1]``.

    Returns:
        ``(..., N)`` boolean mask.
    """
    _check_mass(mass)
    if not torch.isfinite(attn).all():
        raise ValueError("attention holds NaN or infinite values")
    if (attn < 0).any():
        raise ValueError("attention must be non-negative (softmax probabilities or other non-negative scores)")
    val, idx = torch.sort(attn, dim=-1, stable=True)  # (..., N) ascending
    total = val.sum(dim=-1, keepdim=True)  # (..., 1)
    if (total == 0).any():
        raise ValueError("attention sums to zero over the tokens: no mass to threshold")
    if not torch.isfinite(total).all():  # values near the dtype's maximum: rescale before summing
        val = val / val[..., -1:]
        total = val.sum(dim=-1, keepdim=True)
    # Normalise the sorted values (summing them in sorted order, as the reference does, so that results agree to
    # the last bit), then keep everything above the (1 - mass) quantile of the cumulative mass.
    if torch.finfo(val.dtype).eps / 2 >= mass:  # 1 - mass rounds to 1 in this dtype: work in float64
        val, total = val.double(), val.double().sum(dim=-1, keepdim=True)
    val = val / total
    keep_sorted = torch.cumsum(val, dim=-1) > (1.0 - mass)  # (..., N)
    return torch.empty_like(keep_sorted).scatter_(-1, idx, keep_sorted)  # undo the sort


def _select_heads(cls_attn: torch.Tensor, heads: Sequence[int] | None) -> torch.Tensor:
    if heads is None:
        return cls_attn
    n = cls_attn.shape[1]
    bad = [h for h in heads if not -n <= h < n]
    if bad or not len(heads):
        raise ValueError(f"heads {list(heads)} out of range for a model with {n} heads")
    return cls_attn[:, list(heads)]


def dino_masks(
    cls_attn: torch.Tensor,
    mass: float = 0.6,
    patch_size: int | Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-head DINO masks.

    Args:
        cls_attn: ``(B, heads, gh, gw)`` attention of the CLS query to the patch tokens.
        mass: fraction of each head's attention to keep.
        patch_size: upsample by this (nearest) to pixels; ``None`` keeps the token grid.
        heads: indices of the heads to use (default all).

    Returns:
        ``(B, heads', gh, gw)`` or ``(B, heads', gh * ph, gw * pw)`` boolean masks.
    """
    _check_attention(cls_attn)
    attn = _select_heads(cls_attn, heads)
    b, h, gh, gw = attn.shape
    keep = dino_threshold(attn.reshape(b, h, gh * gw), mass).reshape(b, h, gh, gw)  # (B, h, gh, gw)
    return keep if patch_size is None else upsample_masks(keep, patch_size)


def dino_foreground(
    cls_attn: torch.Tensor,
    mass: float = 0.6,
    heads: Sequence[int] | None = None,
    combine: str = "mean",
    largest: bool = False,
    connectivity: int = 4,
) -> torch.Tensor:
    """One foreground mask per image from several heads.

    Args:
        cls_attn: ``(B, heads, gh, gw)`` CLS attention.
        mass: fraction of the attention to keep.
        heads: heads to combine (default all).
        combine: ``"mean"`` thresholds the head-averaged attention (each head first renormalised over the patch
            tokens, so every head weighs the same); ``"union"`` takes the union of the per-head masks.
        largest: keep only the largest connected component.
        connectivity: 4 or 8 neighbours for ``largest``.

    Returns:
        ``(B, gh, gw)`` boolean masks on the token grid.
    """
    _check_attention(cls_attn)
    attn = _select_heads(cls_attn, heads)
    b, h, gh, gw = attn.shape
    if combine == "mean":
        flat = attn.reshape(b, h, gh * gw)
        flat = flat / flat.sum(dim=-1, keepdim=True)  # (B, h, N)
        fg = dino_threshold(flat.mean(dim=1), mass).reshape(b, gh, gw)  # (B, gh, gw)
    elif combine == "union":
        fg = dino_masks(attn, mass).any(dim=1)  # (B, gh, gw)
    else:
        raise ValueError(f"combine must be 'mean' or 'union', got {combine!r}")
    if largest:
        fg_np = fg.cpu().numpy()
        fg = torch.from_numpy(np.stack([largest_component(m, connectivity) for m in fg_np])).to(fg.device)
    return fg


def attention_maps(
    cls_attn: torch.Tensor,
    size: Sequence[int] | None = None,
    patch_size: int | Sequence[int] | None = None,
    mode: str = "bilinear",
    renormalize: bool = True,
) -> torch.Tensor:
    """Soft attention maps for display, per head.

    Args:
        cls_attn: ``(B, heads, gh, gw)`` CLS attention.
        size: output ``(H, W)``; or give ``patch_size`` for ``(gh * ph, gw * pw)``; neither keeps the grid.
        patch_size: see ``size``.
        mode: ``"nearest"``, ``"bilinear"`` or ``"bicubic"``.
        renormalize: divide each head's map by its sum over the patch tokens (the CLS self-attention removed).

    Returns:
        ``(B, heads, H, W)`` float maps.
    """
    _check_attention(cls_attn)
    maps = cls_attn.float()
    if renormalize:
        maps = maps / maps.sum(dim=(-2, -1), keepdim=True)
    if size is None and patch_size is not None:
        ph, pw = as_pair(patch_size)
        size = (maps.shape[-2] * ph, maps.shape[-1] * pw)
    if size is None:
        return maps
    return upsample_maps(maps, size, mode=mode)


def attention_contrast(attn: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> float:
    """Confidence of a foreground mask: ``1 - mean attention outside / mean attention inside``, in ``[0, 1]``.

    1 when all attention falls in the mask, 0 when the mask is no more attended than the rest (or empty, or the
    whole grid, where nothing is separated).

    Args:
        attn: ``(gh, gw)`` non-negative attention (e.g. the head average).
        mask: ``(gh, gw)`` boolean mask.
    """
    a = np.asarray(attn.detach().cpu() if isinstance(attn, torch.Tensor) else attn, dtype=np.float64)
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool)
    if not m.any() or m.all():
        return 0.0
    inside, outside = a[m].mean(), a[~m].mean()
    if inside <= 0:
        return 0.0
    return float(np.clip(1.0 - outside / inside, 0.0, 1.0))

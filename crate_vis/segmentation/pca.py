"""PCA feature maps (the CRATE emergence paper, appendix B.2).

1. Fit the first principal component on the patch features (of one image, or of a set of images jointly), min-max
   normalise the projections to ``[0, 1]`` and threshold them (default 0.5) to split foreground from background.
   Principal components have no sign, so the side taken as foreground is the one holding the smaller share of the
   grid's border tokens (objects rarely fill the border); ties go to the smaller side.
2. Fit PCA again on the foreground tokens only and map their first three components, each min-max normalised over
   the foreground tokens (jointly over the set), to red, green and blue. Background tokens are black.

Component signs are fixed so that each component's largest-magnitude loading is positive, which makes the colours
deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..data.image_geometry import resize_nearest
from .masks import as_pair

__all__ = ["pca_fit", "pca_foreground", "pca_maps", "pca_map"]


def _features(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    f = np.asarray(x, dtype=np.float64)
    if f.ndim == 3:  # (gh, gw, d)
        f = f.reshape(-1, f.shape[-1])
    if f.ndim != 2:
        raise ValueError(f"features must be (N, d) or (gh, gw, d), got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or infinite values")
    return f


def pca_fit(x: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Principal axes of the rows of ``x``.

    Args:
        x: ``(M, d)`` samples.
        n_components: number of axes wanted; fewer come back when ``min(M - 1, d)`` is smaller.

    Returns:
        ``(mean (d,), components (k, d))`` with unit-norm rows, by decreasing variance, largest-magnitude loading
        positive.
    """
    mean = x.mean(axis=0)
    if x.shape[0] < 2:
        return mean, np.zeros((0, x.shape[1]))
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)  # (min(M, d), d)
    k = min(n_components, x.shape[0] - 1, x.shape[1])
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    signs[signs == 0] = 1.0
    return mean, comps * signs[:, None]


def _minmax(v: np.ndarray, axis: int = 0) -> np.ndarray:
    lo = v.min(axis=axis, keepdims=True)
    span = v.max(axis=axis, keepdims=True) - lo
    return np.where(span > 0, (v - lo) / np.where(span > 0, span, 1.0), 0.0)


def _border(grid: Sequence[int]) -> np.ndarray:
    b = np.zeros(grid, dtype=bool)
    b[0, :] = b[-1, :] = b[:, 0] = b[:, -1] = True
    return b.ravel()


def pca_foreground(
    features: Sequence[np.ndarray | torch.Tensor],
    grids: Sequence[Sequence[int]],
    threshold: float = 0.5,
) -> list[np.ndarray]:
    """Foreground masks from the first principal component, fitted jointly over the images given.

    Args:
        features: per image ``(N_i, d)`` patch features.
        grids: per image ``(gh, gw)``.
        threshold: cut on the min-max normalised first component.

    Returns:
        Per image a ``(gh, gw)`` boolean mask.
    """
    feats = [_features(f) for f in features]
    grids = [as_pair(g) for g in grids]
    _check(feats, grids)
    allf = np.concatenate(feats)  # (sum N_i, d)
    mean, comps = pca_fit(allf, 1)
    if comps.shape[0] == 0:
        return [np.ones(g, dtype=bool) for g in grids]
    t = _minmax((allf - mean) @ comps[0])  # (sum N_i,)
    border = np.concatenate([_border(g) for g in grids])
    high, low = t > threshold, t < 1.0 - threshold  # foreground if the component's sign is kept / flipped

    def key(side: np.ndarray) -> tuple[float, int]:
        return float(side[border].mean()), int(side.sum())

    fg = high if key(high) <= key(low) else low
    splits = np.cumsum([f.shape[0] for f in feats])[:-1]
    return [m.reshape(g) for m, g in zip(np.split(fg, splits), grids)]


def _check(feats: list[np.ndarray], grids: Sequence[Sequence[int]]) -> None:
    if not feats:
        raise ValueError("no features given")
    if len(feats) != len(grids):
        raise ValueError(f"{len(feats)} feature arrays but {len(grids)} grids")
    dims = {f.shape[1] for f in feats}
    if len(dims) != 1:
        raise ValueError(f"feature widths differ between images: {sorted(dims)}")
    for f, g in zip(feats, grids):
        if f.shape[0] != g[0] * g[1]:
            raise ValueError(f"{f.shape[0]} tokens do not fit the grid {g}")


def pca_maps(
    features: Sequence[np.ndarray | torch.Tensor],
    grids: Sequence[Sequence[int]],
    foreground: str | Sequence[np.ndarray] = "pc1",
    threshold: float = 0.5,
    image_sizes: Sequence[Sequence[int]] | None = None,
) -> list[np.ndarray]:
    """RGB maps of the first three principal components of the foreground tokens, fitted jointly over images.

    Args:
        features: per image ``(N_i, d)`` (or ``(gh, gw, d)``) patch features.
        grids: per image ``(gh, gw)``.
        foreground: ``"pc1"`` (threshold the first component, see the module docstring), ``"all"`` (no background
            removal) or per image ``(gh, gw)`` boolean masks.
        threshold: cut on the normalised first component for ``"pc1"``.
        image_sizes: per image ``(H, W)`` to resize to (nearest); default the token grid.

    Returns:
        Per image an ``(gh, gw, 3)`` (or ``(H, W, 3)``) uint8 array; background black.
    """
    feats = [_features(f) for f in features]
    grids = [as_pair(g) for g in grids]
    _check(feats, grids)
    if isinstance(foreground, str):
        if foreground == "pc1":
            fgs = pca_foreground(feats, grids, threshold)
        elif foreground == "all":
            fgs = [np.ones(g, dtype=bool) for g in grids]
        else:
            raise ValueError(f"foreground must be 'pc1', 'all' or a list of masks, got {foreground!r}")
    else:
        fgs = [np.asarray(m, dtype=bool) for m in foreground]
        if len(fgs) != len(feats) or any(m.shape != g for m, g in zip(fgs, grids)):
            raise ValueError("foreground masks must be one (gh, gw) mask per image")
    flat = [m.ravel() for m in fgs]
    fg_feats = np.concatenate([f[m] for f, m in zip(feats, flat)])  # (M, d)
    out: list[np.ndarray] = []
    if fg_feats.shape[0] == 0:
        proj = np.zeros((0, 3))
    else:
        mean, comps = pca_fit(fg_feats, 3)
        proj = np.zeros((fg_feats.shape[0], 3))
        proj[:, : comps.shape[0]] = (fg_feats - mean) @ comps.T  # (M, k)
        proj[:, : comps.shape[0]] = _minmax(proj[:, : comps.shape[0]])
    start = 0
    for m, g in zip(flat, grids):
        rgb = np.zeros((g[0] * g[1], 3), dtype=np.uint8)
        k = int(m.sum())
        rgb[m] = np.round(proj[start : start + k] * 255).astype(np.uint8)
        start += k
        out.append(rgb.reshape(g[0], g[1], 3))
    if image_sizes is not None:
        out = [resize_nearest(o, size) for o, size in zip(out, image_sizes)]
    return out


def pca_map(
    features: np.ndarray | torch.Tensor,
    grid: Sequence[int],
    foreground: str | np.ndarray = "pc1",
    threshold: float = 0.5,
    image_size: Sequence[int] | None = None,
) -> np.ndarray:
    """:func:`pca_maps` for one image: an ``(gh, gw, 3)`` (or ``(H, W, 3)``) uint8 RGB map."""
    fg = foreground if isinstance(foreground, str) else [foreground]
    return pca_maps([features], [grid], fg, threshold, None if image_size is None else [image_size])[0]


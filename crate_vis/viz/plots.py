"""Publication figures: per-image attention sheets, the head-wise part grid, layer-wise curves, rollout and PCA maps.

Each function returns a matplotlib :class:`~matplotlib.figure.Figure` (built on the Agg canvas, never shown) or an
``(H, W, 3)`` uint8 array; :func:`save_figure` writes either atomically as PNG, PDF or SVG at a chosen DPI.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from torch import nn

from ..data.image_geometry import PreparedImage, resize_nearest
from ..io.atomic import atomic_save
from .colors import OKABE_ITO, head_colors, hex_to_rgb
from .grid import image_grid, new_figure, panel_grid
from .overlay import colored_attention, heatmap_overlay, mask_overlay, part_map_overlay

__all__ = [
    "save_figure", "attention_figure", "HeadBlock", "head_grid_figure", "plot_layer_metric", "LayerSeries",
    "rollout_figure", "pca_rgb_image", "pca_figure", "fit_map", "model_label",
]  # fmt: skip


def model_label(model: nn.Module) -> str:
    """A short name for figure titles (the registered name when known)."""
    return str(getattr(model, "model_name", None) or type(model).__name__)

_VECTOR = {".pdf", ".svg", ".eps"}
_RASTER = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"}


def save_figure(fig: Figure | np.ndarray, path: str | os.PathLike[str], dpi: int = 200) -> Path:
    """Write a Figure or an ``(H, W, 3)`` uint8 array atomically; the format follows the suffix.

    Args:
        fig: a matplotlib Figure, or an image array (saved at its own pixel size; ``dpi`` is stored as metadata).
        path: destination ``.png``, ``.pdf``, ``.svg`` (figures) or ``.png``/``.jpg``/``.pdf``/``.tif`` (arrays).
        dpi: resolution of raster output (and of images embedded in vector output).

    Returns:
        The path written.
    """
    dest = Path(path)
    suffix = dest.suffix.lower()
    if dpi <= 0:
        raise ValueError(f"dpi must be positive, got {dpi}")
    if isinstance(fig, np.ndarray):
        from PIL import Image

        if fig.dtype != np.uint8 or fig.ndim not in (2, 3):
            raise ValueError(f"expected an (H, W[, 3]) uint8 array, got {fig.shape} {fig.dtype}")
        if suffix not in _RASTER | {".pdf"}:
            raise ValueError(f"cannot save an image array as {suffix!r}; use .png, .jpg, .tif or .pdf")
        image = Image.fromarray(fig)
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(suffix, suffix[1:].upper())
        atomic_save(dest, lambda p: image.save(p, format=fmt, dpi=(dpi, dpi)))
        return dest
    if suffix not in _VECTOR | _RASTER:
        raise ValueError(f"unknown figure format {suffix!r}; use .png or .pdf (or .svg)")
    # savefig picks the writer from the format, whatever canvas (pyplot or Agg) the figure has.
    atomic_save(dest, lambda p: fig.savefig(p, dpi=dpi, format=suffix[1:], facecolor="white"))
    return dest


def _rgb(c: str | Sequence[int]) -> tuple[int, int, int]:
    return hex_to_rgb(c) if isinstance(c, str) else (int(c[0]), int(c[1]), int(c[2]))


# ------------------------------------------------------------------------------------------- attention per image
def attention_figure(
    image: np.ndarray,
    heat: np.ndarray,
    masks: np.ndarray,
    mean_heat: np.ndarray | None = None,
    mean_mask: np.ndarray | None = None,
    head_ids: Sequence[int] | None = None,
    head_mass: Sequence[float] | None = None,
    title: str | None = None,
    max_cols: int = 8,
    cmap: str = "inferno",
    mass: float | None = None,
    cell_width: float = 1.7,
    normalize: str = "max",
) -> Figure:
    """One image's attention sheet: per head, the heat map over the image and, below it, its thresholded mask.

    Columns are ``image, mean, head 0, head 1, ...`` wrapped every ``max_cols`` columns; each block of columns has
    a heat-map row and a mask row.

    Args:
        image: ``(H, W, 3)`` uint8 photo.
        heat: ``(K, H, W)`` per-head attention at the photo's resolution (see :meth:`~crate_vis.data.image_geometry.PreparedImage.grid_to_image`).
        masks: ``(K, H, W)`` bool thresholded masks.
        mean_heat: ``(H, W)`` head-averaged map (optional column).
        mean_mask: ``(H, W)`` its mask.
        head_ids: labels of the heads (default ``0..K-1``).
        head_mass: per head, the attention mass on patch tokens (shown in the title: the rest goes to CLS).
        title: figure title.
        max_cols: columns per block.
        cmap: heat-map colormap.
        mass: the mask's kept attention fraction, for the row label.
        cell_width: inches per panel.
        normalize: how maps become colours (:func:`normalize_map`); ``"none"`` when ``heat`` and ``mean_heat``
            are already in ``[0, 1]`` (e.g. from :func:`attention_opacity`).
    """
    k = heat.shape[0]
    if masks.shape[0] != k:
        raise ValueError(f"{k} heat maps but {masks.shape[0]} masks")
    head_ids = list(range(k)) if head_ids is None else list(head_ids)
    mask_color = _rgb(OKABE_ITO[1])  # sky blue: visible on dark and bright photos
    heats: list[np.ndarray | None] = [image]
    mask_cells: list[np.ndarray | None] = [None]
    titles: list[str | None] = ["image"]
    if mean_heat is not None:
        heats.append(heatmap_overlay(image, mean_heat, cmap=cmap, normalize=normalize))
        mask_cells.append(mask_overlay(image, mean_mask, mask_color) if mean_mask is not None else None)
        titles.append("mean of heads")
    for j in range(k):
        heats.append(heatmap_overlay(image, heat[j], cmap=cmap, normalize=normalize))
        mask_cells.append(mask_overlay(image, masks[j], mask_color))
        t = f"head {head_ids[j]}"
        if head_mass is not None:
            t += f"  (Σ {head_mass[j]:.2f})"
        titles.append(t)
    # Balance the blocks (8 panels at 7 per row become 4 + 4, not 7 + 1).
    nblocks = -(-len(heats) // max(1, max_cols))
    ncols = -(-len(heats) // nblocks)
    panels: list[np.ndarray | None] = []
    all_titles: list[str | None] = []
    mask_label = f"mask ({round(100 * mass)}% mass)" if mass is not None else "mask"
    for start in range(0, len(heats), ncols):
        block_h = heats[start : start + ncols]
        block_m = mask_cells[start : start + ncols]
        pad = ncols - len(block_h)
        panels += block_h + [None] * pad + block_m + [None] * pad
        tb = titles[start : start + ncols]
        all_titles += tb + [None] * pad
        all_titles += [None if m is None else mask_label for m in block_m] + [None] * pad
    return panel_grid(panels, all_titles, ncols=ncols, title=title, cell_width=cell_width)


# ---------------------------------------------------------------------------------------------- head-wise grid
@dataclass
class HeadBlock:
    """One model's part of the head-wise figure.

    Attributes:
        name: model label (column-group title).
        head_ids: the heads shown, in column order.
        heat: per image, ``(K, H, W)`` attention at the photo's resolution.
        parts: per image, ``(H, W)`` int part labels (``0..K-1`` indexes ``head_ids``; ``-1`` no confident head),
            or ``None`` to omit the part-map column.
        scores: score name -> ``(K,)`` values written under each head column (NaN shows as "-").
        colors: ``(K, 3)`` uint8 head colours (default: :func:`head_colors`).
        normalize: how ``heat`` becomes opacity (:func:`normalize_map`); ``"none"`` when ``heat`` already is an
            opacity in ``[0, 1]`` (e.g. from :func:`attention_opacity`).
    """

    name: str
    head_ids: Sequence[int]
    heat: Sequence[np.ndarray]
    parts: Sequence[np.ndarray] | None = None
    scores: Mapping[str, np.ndarray] = field(default_factory=dict)
    colors: np.ndarray | None = None
    normalize: str = "max"


def head_grid_figure(
    images: Sequence[np.ndarray],
    blocks: Sequence[HeadBlock],
    row_titles: Sequence[str | None] | None = None,
    row_gap_after: Sequence[int] = (),
    title: str | None = None,
    cell_width: float = 1.3,
    part_alpha: float = 0.7,
) -> Figure:
    """The head-wise figure of the CRATE papers: images in rows, heads in columns, one colour per head.

    Each cell shows one head's attention in that head's colour over the greyscale image; the "part map" column
    colours each patch with the head attending to it most (see :func:`crate_vis.parts.part_assignment`). With
    several blocks (models) the column groups sit side by side, sharing the image column.

    Args:
        images: ``(H, W, 3)`` uint8 photos, one per row.
        blocks: one :class:`HeadBlock` per model.
        row_titles: a label per row (e.g. the class of a group's first image).
        row_gap_after: rows after which a gap separates groups.
        title: figure title.
        cell_width: inches per cell.
        part_alpha: opacity of the part colours.
    """
    n = len(images)
    if n == 0 or not blocks:
        raise ValueError("nothing to draw: no images or no models")
    cells: list[list[np.ndarray | None]] = [[img] for img in images]
    col_titles: list[str | None] = ["image"]
    col_colors: list[Sequence[int] | None] = [None]
    footers: list[str | None] = [None]
    groups: list[tuple[str, int, int]] = []
    gaps: list[int] = []
    for block in blocks:
        k = len(block.head_ids)
        if len(block.heat) != n or (block.parts is not None and len(block.parts) != n):
            raise ValueError(f"block {block.name!r} has maps for {len(block.heat)} images, expected {n}")
        colors = head_colors(k) if block.colors is None else np.asarray(block.colors, dtype=np.uint8)
        first = len(col_titles)
        gaps.append(first - 1)
        for r, img in enumerate(images):
            if block.heat[r].shape[0] != k:
                raise ValueError(f"block {block.name!r} image {r}: {block.heat[r].shape[0]} maps for {k} heads")
            cells[r] += [colored_attention(img, block.heat[r][j], colors[j], normalize=block.normalize) for j in range(k)]
            if block.parts is not None:
                cells[r].append(part_map_overlay(img, block.parts[r], colors, alpha=part_alpha))
        col_titles += [f"head {h}" for h in block.head_ids]
        col_colors += [tuple(int(v) for v in c) for c in colors]
        for j in range(k):
            lines = [f"{name} {_fmt(vals[j])}" for name, vals in block.scores.items()]
            footers.append("\n".join(lines) if lines else None)
        if block.parts is not None:
            col_titles.append("part map")
            col_colors.append(None)
            footers.append(None)
        groups.append((block.name, first, len(col_titles) - 1))
    return image_grid(
        cells,
        row_titles=row_titles,
        col_titles=col_titles,
        col_colors=col_colors,
        col_footers=footers if any(footers) else None,
        col_groups=groups if len(blocks) > 1 or blocks[0].name else None,
        row_gap_after=row_gap_after,
        col_gap_after=gaps,
        title=title,
        cell_width=cell_width,
    )


def _fmt(v: float) -> str:
    return "  -  " if v is None or not np.isfinite(v) else f"{v:5.2f}"


# ------------------------------------------------------------------------------------------- layer-wise curves
@dataclass
class LayerSeries:
    """Values per layer with an error bar (e.g. mean and std over images).

    Attributes:
        label: legend entry.
        mean: ``(L,)`` values.
        err: ``(L,)`` half-widths of the error bars, or ``None``.
        layers: x positions (default ``0..L-1``: layers numbered from 0, as ``--layer`` numbers them).
    """

    label: str
    mean: Sequence[float]
    err: Sequence[float] | None = None
    layers: Sequence[float] | None = None


def plot_layer_metric(
    series: Sequence[LayerSeries] | LayerSeries,
    ylabel: str,
    baseline: LayerSeries | None = None,
    title: str | None = None,
    xlabel: str = "layer",
    logy: bool = False,
    size: tuple[float, float] = (3.4, 2.4),
) -> Figure:
    """A layer-wise curve (e.g. coding rate or sparsity of the tokens after each layer) with error bars.

    Args:
        series: one or more series (e.g. trained models), drawn with distinct colour-blind-safe colours and markers.
        ylabel: axis label, e.g. ``"coding rate R^c(Z)"`` or ``"sparsity (fraction of zeros)"``.
        baseline: a reference series (e.g. the same architecture at random initialisation), drawn dashed in grey.
        title: axes title.
        xlabel: x-axis label.
        logy: log-scale y axis.
        size: figure size in inches (3.4 in is one column of a two-column paper).
    """
    from matplotlib.ticker import MaxNLocator

    if isinstance(series, LayerSeries):
        series = [series]
    if not series:
        raise ValueError("no series to plot")
    fig = new_figure(size, layout="constrained")
    ax = fig.add_subplot()
    markers = "osD^vP*X"
    for i, s in enumerate(series):
        _errorbar(ax, s, color=OKABE_ITO[(4, 5, 2, 0, 1, 6, 3)[i % 7]], marker=markers[i % len(markers)], ls="-")
    if baseline is not None:
        _errorbar(ax, baseline, color="#777777", marker="x", ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3, linewidth=0.5)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    return fig


def _errorbar(ax: Axes, s: LayerSeries, color: str, marker: str, ls: str) -> None:
    y = np.asarray(s.mean, dtype=float)
    x = np.arange(len(y)) if s.layers is None else np.asarray(s.layers, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"series {s.label!r}: {len(x)} layers but {len(y)} values")
    err = None if s.err is None else np.asarray(s.err, dtype=float)
    if err is not None and err.shape != y.shape:
        raise ValueError(f"series {s.label!r}: {len(err)} error bars for {len(y)} values")
    ax.errorbar(x, y, yerr=err, color=color, marker=marker, ls=ls, lw=1.2, ms=3.5, capsize=2, label=s.label)


# ---------------------------------------------------------------------------------------------- rollout and PCA
def fit_map(
    values: np.ndarray, image_hw: tuple[int, int], prepared: PreparedImage | None = None, mode: str = "nearest"
) -> np.ndarray:
    """A grid map ``(gh, gw[, C])`` brought to ``image_hw``: through ``prepared``'s geometry when given (the map was
    computed on a photo resized for the model), else by a plain resize (the image *is* the model input)."""
    v = np.asarray(values)
    channels_last = v.ndim == 3
    grid = np.moveaxis(v, -1, 0) if channels_last else v
    if prepared is not None:
        out = prepared.geometry.grid_to_image(grid.astype(np.float32), mode=mode, out_hw=image_hw)
    elif mode == "nearest":
        out = resize_nearest(grid, image_hw)
    else:
        import torch
        import torch.nn.functional as F

        t = torch.as_tensor(grid, dtype=torch.float32).reshape(-1, 1, *grid.shape[-2:])
        t = F.interpolate(t, size=image_hw, mode="bilinear", align_corners=False, antialias=True)
        out = t.reshape(*grid.shape[:-2], *image_hw).numpy()
    if tuple(out.shape[-2:]) != tuple(image_hw):
        raise ValueError(f"map brought to {out.shape[-2:]} but the image is {image_hw}")
    return np.moveaxis(out, 0, -1) if channels_last else out


def rollout_figure(
    image: np.ndarray,
    rollout_map: np.ndarray,
    prepared: PreparedImage | None = None,
    title: str | None = None,
    cmap: str = "inferno",
    mode: str = "bilinear",
    normalize: str = "minmax",
) -> Figure:
    """Image and its attention-rollout map (e.g. the CLS row of :func:`crate_vis.hooks.attention_rollout` over the
    patch tokens, reshaped to ``(gh, gw)``) side by side.

    Rollout maps carry a large common offset from the identity paths, so by default they are stretched min..max
    (``normalize``, see :func:`normalize_map`) and the panel title says so.
    """
    heat = fit_map(rollout_map, image.shape[:2], prepared, mode)
    label = "attention rollout" + (" (min..max)" if normalize == "minmax" else "")
    return panel_grid([image, heatmap_overlay(image, heat, cmap=cmap, normalize=normalize)], ["image", label],
                      ncols=2, title=title)  # fmt: skip


def pca_rgb_image(
    pca_rgb: np.ndarray, image_hw: tuple[int, int] | None = None, prepared: PreparedImage | None = None,
    background: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """Display a PCA-RGB feature map (the first three components as colours) as an ``(H, W, 3)`` uint8 image.

    Args:
        pca_rgb: ``(gh, gw, 3)`` values in ``[0, 1]`` (floats) or uint8, e.g. from :mod:`crate_vis.segmentation.pca`.
        image_hw: output size (default: the grid scaled by nothing, i.e. one pixel per patch).
        prepared: geometry to bring the grid onto the original photo.
        background: optional ``(gh, gw)`` bool, ``False`` patches drawn black (foreground-only PCA).
    """
    v = np.asarray(pca_rgb)
    if v.ndim != 3 or v.shape[-1] != 3:
        raise ValueError(f"expected a (gh, gw, 3) PCA map, got {v.shape}")
    v = v.astype(np.float32) / 255.0 if v.dtype == np.uint8 else v.astype(np.float32)
    if background is not None:
        v = v * np.asarray(background, dtype=np.float32)[..., None]
    if prepared is not None:
        v = fit_map(v, prepared.original_hw, prepared, "nearest")
    elif image_hw is not None:
        v = fit_map(v, image_hw, None, "nearest")
    return np.clip(v * 255.0 + 0.5, 0, 255).astype(np.uint8)


def pca_figure(
    images: Sequence[np.ndarray], pca_maps: Sequence[np.ndarray], titles: Sequence[str | None] | None = None,
    title: str | None = None,
) -> Figure:  # fmt: skip
    """One row per photo: the photo and its PCA-RGB map (``pca_maps[i]`` at ``images[i]``'s resolution, see
    :func:`pca_rgb_image`); rows of different aspect ratios each keep their own."""
    if len(images) != len(pca_maps):
        raise ValueError(f"{len(images)} images but {len(pca_maps)} PCA maps")
    rows = [[img, pca] for img, pca in zip(images, pca_maps)]
    return image_grid(rows, row_titles=titles, col_titles=["image", "PCA of features (RGB)"], title=title)

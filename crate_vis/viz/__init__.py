"""Drawing: overlays, masks, grids and publication figures (matplotlib on the Agg backend, never a window).

* :mod:`crate_vis.viz.overlay`: heat maps, masks, contours and part maps over a photo (grid maps are brought to the
  photo by :mod:`crate_vis.data.image_geometry`).
* :mod:`crate_vis.viz.grid`: image grids with titles that keep every image's aspect ratio.
* :mod:`crate_vis.viz.plots`: attention sheets, the head-wise part figure, layer-wise curves, rollout and PCA
  figures, and :func:`save_figure` (atomic PNG/PDF/SVG at a chosen DPI).
* :mod:`crate_vis.viz.colors`: colour-blind-safe head palettes.
"""

from __future__ import annotations

# Figures are built directly on the Agg canvas (``new_figure``), never through pyplot: nothing here opens a
# window or changes the global matplotlib backend a notebook user has chosen.
from .colors import OKABE_ITO, TOL_BRIGHT, TOL_MUTED, head_colors
from .grid import image_grid, new_figure, panel_grid
from .overlay import (
    attention_opacity,
    colored_attention,
    draw_mask_contours,
    grey_background,
    heatmap_overlay,
    mask_contours,
    mask_overlay,
    masks_overlay,
    normalize_map,
    part_map_overlay,
)
from .plots import (
    HeadBlock,
    LayerSeries,
    attention_figure,
    fit_map,
    head_grid_figure,
    model_label,
    pca_figure,
    pca_rgb_image,
    plot_layer_metric,
    rollout_figure,
    save_figure,
)

__all__ = [
    "OKABE_ITO", "TOL_BRIGHT", "TOL_MUTED", "head_colors", "image_grid", "new_figure", "panel_grid",
    "attention_opacity", "colored_attention", "draw_mask_contours", "grey_background", "heatmap_overlay",
    "mask_contours", "mask_overlay", "masks_overlay", "model_label", "normalize_map", "part_map_overlay",
    "HeadBlock", "LayerSeries", "attention_figure", "fit_map", "head_grid_figure", "pca_figure", "pca_rgb_image",
    "plot_layer_metric", "rollout_figure", "save_figure",
]  # fmt: skip

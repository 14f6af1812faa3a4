"""Image grids with titles: rows x columns of equal-width cells whose heights follow each row's aspect ratio.

The layout is computed in inches (not left to a layout engine), so images are never stretched, the spacing is
identical in every figure, and the text stays the same size whatever the number of rows and columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

__all__ = ["image_grid", "panel_grid", "new_figure"]

_PAD = 0.06  # in, between cells
_TITLE_LINE = 0.17  # in, per line of 8 pt text


def new_figure(figsize: tuple[float, float], **kwargs: Any) -> Figure:
    """A matplotlib Figure on an Agg canvas (no pyplot, no window, the global backend untouched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _wrap(text: str | None, width_in: float, fontsize: float) -> str | None:
    """Wrap ``text`` so that each line fits ``width_in`` inches at ``fontsize`` points (existing breaks kept)."""
    if not text:
        return text
    import textwrap

    chars = max(10, int(width_in * 72.0 / (0.55 * fontsize)))  # ~0.55 em per character in the default sans font
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def _lines(text: str | None) -> int:
    return 0 if not text else text.count("\n") + 1


def image_grid(
    cells: Sequence[Sequence[np.ndarray | None]],
    row_titles: Sequence[str | None] | None = None,
    col_titles: Sequence[str | None] | None = None,
    col_colors: Sequence[Sequence[int] | None] | None = None,
    col_footers: Sequence[str | None] | None = None,
    col_groups: Sequence[tuple[str, int, int]] | None = None,
    row_gap_after: Sequence[int] = (),
    col_gap_after: Sequence[int] = (),
    title: str | None = None,
    cell_width: float = 1.5,
    fontsize: float = 8.0,
) -> Figure:
    """Draw ``cells[row][col]`` images in a grid.

    Args:
        cells: rows of ``(H, W, 3)`` uint8 (or ``(H, W)``) images; ``None`` leaves a cell empty.
        row_titles: one label per row, written vertically at the left.
        col_titles: one label per column, above the first row.
        col_colors: an RGB colour per column drawn as a bar under its title (head colours), or ``None``.
        col_footers: text under each column (e.g. scores).
        col_groups: ``(label, first_col, last_col)`` spans labelled above the column titles (e.g. model names).
        row_gap_after: rows after which a larger gap separates groups (e.g. classes).
        col_gap_after: columns after which a larger gap separates groups (e.g. models).
        title: figure title.
        cell_width: width of one cell in inches; row heights follow the aspect ratio of the row's first image.
        fontsize: base font size in points.

    Returns:
        A matplotlib Figure (Agg, not shown).
    """
    nrows = len(cells)
    if nrows == 0:
        raise ValueError("nothing to draw: no rows")
    ncols = max(len(r) for r in cells)
    if ncols == 0:
        raise ValueError("nothing to draw: no columns")
    for name, seq, n in (("row_titles", row_titles, nrows), ("col_titles", col_titles, ncols),
                         ("col_colors", col_colors, ncols), ("col_footers", col_footers, ncols)):  # fmt: skip
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} {'rows' if name.startswith('row') else 'columns'}")

    aspects = []
    for row in cells:
        first = next((c for c in row if c is not None), None)
        aspects.append(first.shape[0] / first.shape[1] if first is not None else 1.0)

    line = _TITLE_LINE * fontsize / 8.0
    big = 3 * _PAD
    left = _PAD + (line * max(_lines(t) for t in row_titles) + _PAD if row_titles else 0.0)
    col_x = []
    x = left
    for c in range(ncols):
        col_x.append(x)
        x += cell_width + _PAD + (big if c in col_gap_after else 0.0)
    width = x
    title = _wrap(title, width - 2 * _PAD, fontsize * 1.25)
    top = _PAD
    title_h = (1.3 * line * _lines(title) + _PAD) if title else 0.0
    group_h = (line + 2 * _PAD) if col_groups else 0.0
    ctitle_h = (line * max(_lines(t) for t in col_titles) + _PAD) if col_titles and any(col_titles) else 0.0
    color_h = 0.05 + _PAD if col_colors is not None and any(c is not None for c in col_colors) else 0.0
    top += title_h + group_h + ctitle_h + color_h
    row_y = []
    y = top
    for r in range(nrows):
        row_y.append(y)
        y += cell_width * aspects[r] + _PAD + (big if r in row_gap_after else 0.0)
    footer_h = (line * max(_lines(t) for t in col_footers) + _PAD) if col_footers and any(col_footers) else 0.0
    height = y + footer_h + _PAD

    fig = new_figure((width, height))
    W, H = width, height

    def box(x0: float, y0: float, w: float, h: float) -> tuple[float, float, float, float]:
        return (x0 / W, 1.0 - (y0 + h) / H, w / W, h / H)  # inches from top-left -> figure fraction

    for r, row in enumerate(cells):
        h = cell_width * aspects[r]
        for c in range(ncols):
            img = row[c] if c < len(row) else None
            ax = fig.add_axes(box(col_x[c], row_y[r], cell_width, h))
            ax.set_axis_off()
            if img is None:
                continue
            # aspect 'equal' never stretches: a cell whose aspect differs from its row's is letterboxed.
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="antialiased")
            ax.set_aspect("equal")
        if row_titles and (row_title := row_titles[r]):
            fig.text(box(left - _PAD, row_y[r], 0, h)[0], 1.0 - (row_y[r] + h / 2) / H, row_title,
                     rotation=90, ha="right", va="center", fontsize=fontsize)  # fmt: skip
    if title:
        fig.text(0.5, 1.0 - (_PAD + title_h / 2) / H, title, ha="center", va="center", fontsize=fontsize * 1.25)
    if col_groups:
        y0 = _PAD + title_h
        for label, c0, c1 in col_groups:
            if not (0 <= c0 <= c1 < ncols):
                raise ValueError(f"column group {label!r} spans {c0}..{c1} outside 0..{ncols - 1}")
            x0, x1 = col_x[c0], col_x[c1] + cell_width
            ymid = 1.0 - (y0 + line / 2) / H
            fig.text((x0 + x1) / 2 / W, ymid, label, ha="center", va="center", fontsize=fontsize * 1.15,
                     fontweight="bold")  # fmt: skip
            yl = 1.0 - (y0 + line + _PAD) / H
            fig.add_artist(_hline(x0 / W, x1 / W, yl))
    if ctitle_h and col_titles:
        y0 = _PAD + title_h + group_h
        for c, t in enumerate(col_titles):
            if t:
                fig.text((col_x[c] + cell_width / 2) / W, 1.0 - (y0 + ctitle_h - _PAD) / H, t, ha="center",
                         va="bottom", fontsize=fontsize)  # fmt: skip
    if color_h and col_colors is not None:
        y0 = top - color_h
        for c, color in enumerate(col_colors):
            if color is not None:
                ax = fig.add_axes(box(col_x[c], y0, cell_width, 0.05))
                ax.set_axis_off()
                ax.imshow(np.asarray(color, dtype=np.uint8).reshape(1, 1, 3), aspect="auto")
    if footer_h and col_footers:
        y0 = y + _PAD / 2
        for c, t in enumerate(col_footers):
            if t:
                fig.text((col_x[c] + cell_width / 2) / W, 1.0 - y0 / H, t, ha="center", va="top",
                         fontsize=fontsize * 0.95, family="monospace")  # fmt: skip
    return fig


def _hline(x0: float, x1: float, y: float) -> Line2D:
    from matplotlib.lines import Line2D

    return Line2D([x0, x1], [y, y], color="black", linewidth=0.8)


def panel_grid(
    panels: Sequence[np.ndarray | None],
    titles: Sequence[str | None] | None = None,
    ncols: int = 4,
    colors: Sequence[Sequence[int] | None] | None = None,
    title: str | None = None,
    cell_width: float = 1.8,
    fontsize: float = 8.0,
) -> Figure:
    """A flat list of panels wrapped into rows of ``ncols``, each with its own title above it.

    Args:
        panels: images (``None`` leaves a gap).
        titles: one per panel.
        ncols: panels per row.
        colors: an optional colour bar per panel under its title.
        title: figure title.
        cell_width: inches per panel.
        fontsize: base font size.
    """
    if ncols < 1:
        raise ValueError(f"ncols must be positive, got {ncols}")
    n = len(panels)
    if n == 0:
        raise ValueError("nothing to draw: no panels")
    rows = [list(panels[i : i + ncols]) for i in range(0, n, ncols)]
    rows[-1] += [None] * (ncols - len(rows[-1]))
    titles = list(titles) if titles is not None else [None] * n
    colors = list(colors) if colors is not None else [None] * n
    # Unlike image_grid, every panel has its own title, so each row reserves title space above itself.
    line = _TITLE_LINE * fontsize / 8.0
    W = _PAD + ncols * (cell_width + _PAD)
    title = _wrap(title, W - 2 * _PAD, fontsize * 1.25)
    title_h = (1.3 * line * _lines(title) + _PAD) if title else 0.0
    per_title = max([_lines(t) for t in titles] + [1]) * line + _PAD
    color_h = 0.05 + _PAD if any(c is not None for c in colors) else 0.0
    ys, y = [], _PAD + title_h
    heights = []
    for row in rows:
        first = next((p for p in row if p is not None), None)
        h = cell_width * (first.shape[0] / first.shape[1] if first is not None else 1.0)
        ys.append(y + per_title + color_h)
        heights.append(h)
        y += per_title + color_h + h + 2 * _PAD
    H = y
    fig = new_figure((W, H))

    def box(x0: float, y0: float, w: float, h: float) -> tuple[float, float, float, float]:
        return (x0 / W, 1.0 - (y0 + h) / H, w / W, h / H)

    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            i = r * ncols + c
            x0 = _PAD + c * (cell_width + _PAD)
            if img is None:
                continue
            ax = fig.add_axes(box(x0, ys[r], cell_width, heights[r]))
            ax.set_axis_off()
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="antialiased")
            ax.set_aspect("equal")
            if i < len(titles) and (panel_title := titles[i]):
                fig.text((x0 + cell_width / 2) / W, 1.0 - (ys[r] - color_h - _PAD / 2) / H, panel_title,
                         ha="center", va="bottom", fontsize=fontsize)  # fmt: skip
            if i < len(colors) and colors[i] is not None:
                cax = fig.add_axes(box(x0, ys[r] - color_h, cell_width, 0.05))
                cax.set_axis_off()
                cax.imshow(np.asarray(colors[i], dtype=np.uint8).reshape(1, 1, 3), aspect="auto")
    if title:
        fig.text(0.5, 1.0 - (_PAD + title_h / 2) / H, title, ha="center", va="center", fontsize=fontsize * 1.25)
    return fig

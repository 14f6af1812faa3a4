"""The head-wise part figure (images x heads, one colour per head, a part-map column) and per-head consistency
scores: the Python side of ``crate-vis heads``.

With ``by_class`` the images are grouped by class (the sub-folders of an ImageFolder root); several models sit side
by side in one figure (``separate`` writes one figure per model), so CRATE vs ViT is a single call.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.image_geometry import DEFAULT_MAX_INPUT_SIDE, shrink_for_display, skip_reason
from ..errors import UsageError
from ..hooks import layer_heads, resolve_heads, resolve_layer
from ..io.atomic import atomic_write_json
from ..io.images import SkipReport, iter_images, list_images
from ..io.outputs import writable_file
from ..metrics.parts import head_consistency, part_assignment
from ..models import recommended_settings
from .attention import check_figure_options, image_attention

__all__ = ["HeadsConfig", "heads_figure", "select_images"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadsConfig:
    """Settings of :func:`heads_figure` (the flags of ``crate-vis heads``).

    ``layer`` and ``size`` left at ``None`` take each model's recommended settings
    (:func:`crate_vis.models.recommended_settings`), else the last layer and the model's training size.
    """

    layer: int | None = None
    heads: tuple[int, ...] | None = None
    by_class: bool = False
    per_class: int = 3
    max_images: int = 6
    gt: str | None = None
    size: int | None = None
    max_side: int | None = DEFAULT_MAX_INPUT_SIDE
    mass: float = 0.6
    all_patches: bool = False
    separate: bool = False
    cell_width: float = 1.3
    display_size: int | None = 600
    scores_out: str | None = None
    dpi: int = 200
    title: str | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        check_figure_options(self.mass, self.cell_width, self.display_size, self.size,
                             (("--per-class", self.per_class), ("--max-images", self.max_images), ("--dpi", self.dpi)))  # fmt: skip


def _evenly(items: list[Any], n: int) -> list[Any]:
    """``n`` items spread evenly through ``items`` (all of them when there are fewer)."""
    if n <= 0:
        raise UsageError(f"the number of images must be positive, got {n}")
    if len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def select_images(
    inputs: list[str], by_class: bool, per_class: int, max_images: int
) -> list[tuple[Path, str | None]]:
    """The images of the figure, with their class when grouping by class.

    Args:
        inputs: files or folders.
        by_class: group by the first folder level under each folder given (a file given directly takes its parent
            folder's name).
        per_class: images per class.
        max_images: images without grouping.

    Returns:
        ``(path, class or None)`` in figure order.
    """
    found: list[tuple[Path, str | None]] = []
    for item in inputs:
        root = Path(item)
        if root.is_dir():
            for p in list_images(root):
                rel = p.relative_to(root)
                found.append((p, rel.parts[0] if len(rel.parts) > 1 else root.name))
        else:
            found.append((root, root.parent.name or None))
    if not found:
        raise FileNotFoundError(f"no images found in {', '.join(inputs)}")
    if not by_class:
        return [(p, None) for p, _ in _evenly(found, max_images)]
    classes: dict[str, list[Path]] = {}
    for p, c in found:
        classes.setdefault(c or "", []).append(p)
    return [(p, c) for c in sorted(classes) for p in _evenly(classes[c], per_class)]


def _ground_truth(gt_path: str | None) -> tuple[Any, dict[str, Any]] | None:
    """The ground truth of ``--gt`` and its image ids by file name (``None`` without ``--gt``)."""
    if gt_path is None:
        return None
    from ..groundtruth import open_dataset

    ds = open_dataset(gt_path)
    by_name = {ds.image_path(i).name: i for i in ds.image_ids}
    return ds, by_name


def heads_figure(
    inputs: Sequence[str | Path],
    models: Sequence[nn.Module],
    out: str | Path,
    config: HeadsConfig = HeadsConfig(),
) -> tuple[list[Path], SkipReport]:
    """Draw the head-wise figure of ``models`` on the images of ``inputs`` and print the per-head scores.

    Returns:
        ``(files written, skip report)``.
    """
    from ..viz.overlay import attention_opacity
    from ..viz.plots import HeadBlock, head_grid_figure, model_label, save_figure

    out = Path(out)
    if out.suffix.lower() not in {".png", ".pdf", ".svg"}:
        raise UsageError(f"--out must end in .png, .pdf or .svg, got {out.name!r}")
    writable_file(out, "--out", inputs=[str(i) for i in inputs])  # before the work
    wanted = list(config.heads) if config.heads is not None else None
    selection = select_images(list(map(str, inputs)), config.by_class, config.per_class, config.max_images)
    labels = _unique([model_label(m) for m in models])
    recommended = [recommended_settings(m) for m in models]
    layers = [resolve_layer(m, config.layer if config.layer is not None else r.get("layer", -1))
              for m, r in zip(models, recommended)]  # fmt: skip
    sizes = [config.size if config.size is not None else r.get("img_size") for r in recommended]
    # Validate the head selection before any image runs.
    head_sets = [resolve_heads(wanted, layer_heads(m, ly)) for m, ly in zip(models, layers)]
    gt_source = _ground_truth(config.gt)

    report = SkipReport(strict=config.strict)
    cls_of = dict(selection)
    rows: list[dict[str, Any]] = []  # per image: photo, class, and per model its attention
    for path, image in iter_images([p for p, _ in selection], report):
        try:
            results = [image_attention(m, image, layer=ly, size=sz, mass=config.mass, features=True,
                                       max_side=config.max_side) for m, ly, sz in zip(models, layers, sizes)]  # fmt: skip
        except (ValueError, RuntimeError) as err:  # e.g. a photo smaller than one patch
            report.add(path, skip_reason(err))
            continue
        gts: list[torch.Tensor | None] = [None] * len(models)
        if gt_source is not None:
            ds, by_name = gt_source
            if path.name not in by_name:
                log.warning("%s is not in %s: no ground truth for it", path.name, config.gt)
            else:
                fg = ds.foreground(by_name[path.name])
                if fg.shape != results[0].prepared.original_hw:
                    log.warning("%s: annotation size %s differs from the image's %s; no ground truth used",
                                path, fg.shape, results[0].prepared.original_hw)  # fmt: skip
                else:
                    gts = [torch.from_numpy(r.prepared.geometry.mask_fraction(fg) >= 0.5) for r in results]
        report.processed += 1
        rows.append({"path": path, "class": cls_of.get(path), "results": results, "gt": gts})
    if not rows:
        return [], report

    blocks = []
    all_scores: dict[str, Any] = {"layer": layers[0] if len(set(layers)) == 1 else layers, "mass": config.mass, "images": [str(r["path"]) for r in rows]}
    for mi, (_model, label) in enumerate(zip(models, labels)):
        heads = head_sets[mi]
        attn = [r["results"][mi].attn[heads] for r in rows]  # (K, gh, gw) per image
        masks = [r["results"][mi].masks[heads] for r in rows]
        feats = [r["results"][mi].features for r in rows]
        model_gts = [r["gt"][mi] for r in rows] if gt_source is not None else None
        scores = head_consistency(attn, masks, feats, model_gts, head_ids=heads)
        print(scores.table(f"{label}, layer {layers[mi]}: per-head consistency over {len(rows)} images"))
        model_scores = {"layer": layers[mi], "overall": scores.rows(), "entropy": scores.entropy}
        if config.by_class:
            for c in dict.fromkeys(r["class"] for r in rows):
                idx = [i for i, r in enumerate(rows) if r["class"] == c]
                sub = head_consistency([attn[i] for i in idx], [masks[i] for i in idx], [feats[i] for i in idx],
                                       [model_gts[i] for i in idx] if model_gts is not None else None,
                                       head_ids=heads)  # fmt: skip
                print(sub.table(f"  class {c}"))
                model_scores[f"class:{c}"] = sub.rows()
        all_scores[label] = model_scores
        heat, parts = [], []
        for i, r in enumerate(rows):
            prep = shrink_for_display(r["results"][mi].prepared, config.display_size)
            heat.append(prep.grid_to_image(attention_opacity(attn[i])))
            lab = part_assignment(attn[i], None if config.all_patches else masks[i])
            parts.append(prep.grid_to_image(lab.numpy()))
        shown = {"IoU": "iou", "in": "mass_in", "cons": "consistency", "area": "area"}
        block_scores = {k: scores.scores[v] for k, v in shown.items() if v in scores.scores}
        blocks.append(HeadBlock(f"{label} · layer {layers[mi]}", heads, heat, parts, block_scores, normalize="none"))

    images = [shrink_for_display(r["results"][0].prepared, config.display_size).original for r in rows]
    if config.by_class:
        row_titles = [r["class"] if i == 0 or rows[i - 1]["class"] != r["class"] else None for i, r in enumerate(rows)]
        gaps = [i for i in range(len(rows) - 1) if rows[i]["class"] != rows[i + 1]["class"]]
    else:
        row_titles = [_short(r["path"].stem) for r in rows]
        gaps = []
    region = "every patch" if config.all_patches else f"patches in some head's {round(100 * config.mass)}% mask"
    title = config.title or (f"CLS attention per head (colour strength: attention above the uniform share); part map: "
                           f"the most-attending head over {region}")  # fmt: skip
    written = []
    if config.separate and len(blocks) > 1:
        for label, block in zip(labels, blocks):
            dest = out.with_name(f"{out.stem}_{_safe(label)}{out.suffix}")
            fig = head_grid_figure(images, [block], row_titles, gaps, title, cell_width=config.cell_width)
            written.append(save_figure(fig, dest, dpi=config.dpi))
    else:
        fig = head_grid_figure(images, blocks, row_titles, gaps, title, cell_width=config.cell_width)
        written.append(save_figure(fig, out, dpi=config.dpi))
    if config.scores_out:
        atomic_write_json(config.scores_out, _json_safe(all_scores), indent=2)
        written.append(Path(config.scores_out))
    return written, report


def _unique(labels: list[str]) -> list[str]:
    """Model labels made distinct (two checkpoints of one architecture get ``#2``, ``#3``...)."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def _short(text: str, n: int = 16) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj

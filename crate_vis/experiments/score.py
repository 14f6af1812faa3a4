"""Score predictions on disk against ground truth: the Python side of ``crate-vis score``.

* ``coco``: class-agnostic COCO AP of a segmentation output (its ``results.json``, ids translated to the ground
  truth's through the output's ``images.json`` file names) or of any COCO results json (ids as in the ground truth).
* ``jaccard`` / ``miou``: masks of a segmentation output or a folder of masks named after the images.
* ``corloc``: one box per image: a segmentation output's top-scoring mask, a results json's top detection, or a
  mask folder's masks (``box_from``).
* ``saliency``: a folder of soft maps in ``[0, 1]`` (``<stem>.npy`` or greyscale ``<stem>.png`` read as v / 255).
* ``parts``: a folder of attention maps ``<stem>.npy`` of shape ``(heads, h, w)`` (``crate-vis attention
  --save-maps`` writes them): each head's attention mass on the objects.

Predictions are matched to ground-truth images by file name (:mod:`crate_vis.metrics.scoring`).

Example:
    >>> format_table({"protocol": "corloc", "box_source": "x", "n_images": 2, "n_skipped": 0, "n_missing": 0,
    ...               "corloc": 0.5, "n_correct": 1, "dataset": "d", "pred": "p"}).splitlines()[-1]
    'CorLoc        0.5000   (1/2)'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.image_geometry import ImageGeometry
from ..errors import DatasetError, UsageError
from ..groundtruth import COCODataset, open_dataset
from ..io.coco import check_image_id, read_results
from ..io.images import read_label_png
from ..io.jsonfile import read_json
from ..io.segment_output import is_segment_output, load_prediction_masks, load_segment_output
from ..metrics import COCO_STAT_NAMES, scoring

__all__ = ["PROTOCOLS", "ScoreConfig", "score_predictions", "format_table", "jsonable"]

PROTOCOLS = ("coco", "jaccard", "miou", "corloc", "saliency", "parts")


@dataclass(frozen=True)
class ScoreConfig:
    """Settings of :func:`score_predictions` (the flags of ``crate-vis score``)."""

    protocol: str = "coco"
    image_root: str | None = None
    split: str | None = "val"
    iou_type: str = "both"
    class_aware: bool = False
    allow_missing: bool = False
    resize_pred: bool = False
    patch_size: int | None = None
    background: bool = True
    box_from: str = "union"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise UsageError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.iou_type not in ("segm", "bbox", "both"):
            raise UsageError(f"--iou-type must be segm, bbox or both, got {self.iou_type!r}")
        if self.patch_size is not None and self.patch_size < 1:
            raise UsageError(f"--patch-size must be at least 1, got {self.patch_size}")
        if self.box_from not in ("union", "first"):
            raise UsageError(f"--box-from must be union or first, got {self.box_from!r}")


def _results_path(pred: Path) -> Path:
    if pred.is_dir():
        cand = pred / "results.json"
        if not cand.is_file():
            raise FileNotFoundError(f"{pred}: a folder without results.json (run `crate-vis segment` into it first)")
        return cand
    return pred


def _index_entries(entries: Any, path: Path, id_key: str) -> dict[Any, str]:
    """``id -> file_name`` of a list of ``{id_key, file_name}`` objects; ids unique, of the image-id rule."""
    if not isinstance(entries, list):
        raise DatasetError(path, "top level", f"expected a list of images, got {type(entries).__name__}")
    out: dict[Any, str] = {}
    for k, e in enumerate(entries):
        entry = f"[{k}]"
        if not isinstance(e, dict) or id_key not in e or "file_name" not in e:
            raise DatasetError(path, entry, f"needs {id_key!r} and 'file_name'")
        check_image_id(e[id_key], path, entry, id_key)
        if not isinstance(e["file_name"], str) or not e["file_name"]:
            raise DatasetError(path, entry, f"file_name must be a non-empty string, got {e['file_name']!r}")
        if e[id_key] in out:
            raise DatasetError(path, entry, f"a second image with {id_key} {e[id_key]!r} ({out[e[id_key]]!r} and "
                               f"{e['file_name']!r})")  # fmt: skip
        out[e[id_key]] = e["file_name"]
    return out


def _id_to_file(pred: Path) -> dict[Any, str] | None:
    """The ``image_id -> file_name`` of a segmentation output, else ``None`` (a results json of the ground truth's ids).

    Read from the output's ``images.json``, or, when that index is missing, rebuilt from its per-image records
    (``images/<name>.json``, each holding its ``image_id`` and ``file_name``).

    Raises:
        DatasetError: an unreadable or inconsistent index, or a segmentation output (it has ``run.json``) with
            neither the index nor the records: its ids could not be paired with file names.
    """
    folder = pred if pred.is_dir() else pred.parent
    if not (pred.is_dir() or pred.name == "results.json"):
        return None
    index = folder / "images.json"
    if index.exists():
        return _index_entries(read_json(index, "images"), index, "id")
    records = sorted((folder / "images").glob("*.json")) if (folder / "images").is_dir() else []
    if records:
        entries = []
        for rec in records:
            data = read_json(rec, "segment record")
            if not isinstance(data, dict) or "image_id" not in data or "file_name" not in data:
                raise DatasetError(rec, "segment record", "needs 'image_id' and 'file_name'")
            entries.append(data)
        return _index_entries(entries, folder / "images", "image_id")
    if (folder / "run.json").is_file():
        raise DatasetError(folder, "segment output", "has neither images.json nor per-image records (images/*.json): "
                           "its image ids cannot be paired with file names; run `crate-vis segment` again")  # fmt: skip
    return None


def _read_maps(folder: Path, what: str) -> dict[str, np.ndarray]:
    """``<stem>.npy`` (or greyscale ``<stem>.png`` as v / 255) maps keyed by stem."""
    if not folder.is_dir():
        raise DatasetError(folder, f"{what} folder", "not found (a folder of <image stem>.npy files)")
    out: dict[str, np.ndarray] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix == ".npy":
            try:
                arr = np.load(p, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise DatasetError(p, what, f"unreadable ({err})") from None
        elif p.suffix.lower() == ".png" and what == "saliency map":
            arr = read_label_png(p).astype(np.float64) / 255.0
        else:
            continue
        if not np.isfinite(arr).all():
            raise DatasetError(p, what, "holds NaN or infinite values")
        out[p.stem] = arr
    if not out:
        raise DatasetError(folder, f"{what} folder", "holds no .npy maps")
    return out


def score_predictions(pred: str | Path, gt: str | Path, config: ScoreConfig = ScoreConfig()) -> dict[str, Any]:
    """Score ``pred`` against ``gt`` under ``config.protocol``.

    Returns:
        A JSON-ready dict naming the protocol, its definition, oracle choices and the numbers.

    Raises:
        DatasetError / UsageError / FileNotFoundError: unreadable, unmatched or mismatched inputs (one line each).
    """
    pred = Path(pred)
    if not pred.exists():
        raise FileNotFoundError(f"{pred}: not found")
    dataset = open_dataset(gt, image_root=config.image_root, split=config.split)
    res: dict[str, Any]
    if config.protocol == "coco":
        if not isinstance(dataset, COCODataset):
            raise UsageError(f"--protocol coco needs a COCO instance json as --gt, got {dataset!r}")
        types = ("segm", "bbox") if config.iou_type == "both" else (config.iou_type,)
        results_path = _results_path(pred)
        results = read_results(results_path)
        res = scoring.score_coco(dataset, results, types, class_agnostic=not config.class_aware,
                                 id_to_file=_id_to_file(pred), allow_missing=config.allow_missing,
                                 source=str(results_path))  # fmt: skip
    elif config.protocol in ("jaccard", "miou"):
        seg = load_segment_output(pred) if is_segment_output(pred) else None
        masks = seg.masks if seg is not None else load_prediction_masks(pred)
        if config.protocol == "jaccard":
            res = scoring.score_jaccard(dataset, masks, config.allow_missing, config.resize_pred)
        else:
            grids = seg.grids if seg is not None else None
            extents = {k: ImageGeometry.from_dict(g).extent for k, g in seg.geometries.items()} if seg else None
            res = scoring.score_miou(dataset, masks, config.allow_missing, config.background, config.patch_size,
                                     grids, extents)  # fmt: skip
    elif config.protocol == "corloc":
        boxes: dict[Any, Any]
        if is_segment_output(pred):
            seg = load_segment_output(pred)
            boxes = scoring.boxes_from_masks(dataset, seg.masks, "first", scores=seg.scores)
            source = "box of the top-scoring mask per image (segmentation output)"
        elif pred.suffix == ".json":
            results = read_results(pred)
            id_to_file = _id_to_file(pred)
            if id_to_file is not None:  # a segmentation output's results.json: its own ids, paired by file name
                results = scoring.translate_ids(dataset, results, id_to_file, str(pred))[0]
            boxes = scoring.top_boxes_from_results(results, str(pred), dataset)
            source = "top-scoring detection per image"
        else:
            boxes = scoring.boxes_from_masks(dataset, load_prediction_masks(pred), config.box_from)
            source = f"box of the {config.box_from} of each image's masks"
        res = scoring.score_corloc(dataset, boxes, config.allow_missing)
        res["box_source"] = source
    elif config.protocol == "saliency":
        res = scoring.score_saliency(dataset, _read_maps(pred, "saliency map"), config.allow_missing,
                                     config.resize_pred)  # fmt: skip
    else:
        res = scoring.score_head_parts(dataset, _read_maps(pred, "attention map"), config.allow_missing)
    res.update(gt=str(gt), pred=str(pred), dataset=dataset.name)
    return res


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def format_table(res: dict[str, Any]) -> str:
    """A readable table of a :func:`score_predictions` result: only the rows that mean something."""
    lines = [f"protocol: {res['protocol']}   gt: {res.get('dataset', res.get('gt'))}   pred: {res.get('pred')}"]
    protocol = res["protocol"]
    if protocol == "coco":
        types = [t for t in ("segm", "bbox") if t in res]
        agn = "class-agnostic" if res["class_agnostic"] else "class-aware"
        first = res[types[0]]
        lines.append(f"COCOeval ({agn}), {first['n_images']} images, {first['n_detections']} detections"
                     + (f", {res['n_missing']} images not segmented (counted as missed)" if res.get("n_missing") else ""))
        lines.append(f"{'metric':<8}" + "".join(f"{t:>10}" for t in types))
        for name in COCO_STAT_NAMES:
            lines.append(f"{name:<8}" + "".join(f"{_fmt(res[t][name]):>10}" for t in types))
        lines.append("(-1: no ground truth in that area range, as COCOeval reports)")
    elif protocol == "jaccard":
        lines.append(f"images: {res['n_images']} scored, {res['n_missing']} without prediction (counted as empty)")
        if res.get("masks_per_image") == "one":
            lines.append(f"{'one mask per image':<28}{_fmt(res['mean']):>10}")
        else:
            lines.append(f"{'mask choice':<28}{'Jaccard':>10}")
            lines.append(f"{'mean over masks':<28}{_fmt(res['mean']):>10}")
            lines.append(f"{'union of masks':<28}{_fmt(res['union']):>10}")
            lines.append(f"{'best mask per image (oracle)':<28}{_fmt(res['best']):>10}")
            if res.get("per_head") and len(res["per_head"]) > 1:
                lines.append("per mask index: " + " ".join(f"{k}:{v:.3f}" for k, v in enumerate(res["per_head"])))
                lines.append(f"best fixed mask index (chosen on GT): {res['best_fixed_head']}")
    elif protocol == "miou":
        bg = "with" if res["include_background"] else "without"
        lines.append(f"images: {res['n_images']} scored, {res['n_skipped']} without classes, {res['n_missing']} "
                     f"without prediction; {bg} background; {res['resolution']} resolution")  # fmt: skip
        lines.append(f"{'coarse mIoU, best mask per class (oracle)':<44}{_fmt(res['miou']):>10}")
        names = res.get("class_names") or {}
        lines.append("per class (averaged over the images holding the class):")
        for c, v in res["per_class"].items():
            lines.append(f"  {c:>4} {names.get(c, ''):<20}{v:>10.4f}")
        lines.append("best-mask counts: " + " ".join(f"{k}:{v}" for k, v in res["head_counts"].items()))
    elif protocol == "corloc":
        lines.append(f"boxes: {res['box_source']}")
        lines.append(f"images: {res['n_images']} scored, {res['n_skipped']} without GT boxes, {res['n_missing']} "
                     "without prediction (counted wrong)")  # fmt: skip
        lines.append(f"{'CorLoc':<10}{_fmt(res['corloc']):>10}   ({res['n_correct']}/{res['n_images']})")
    elif protocol == "saliency":
        lines.append(f"images: {res.get('n_images', '?')} scored, {res['n_missing']} without a map")
        for k in ("iou", "accuracy", "max_fbeta"):
            if k in res:
                lines.append(f"{k:<24}{_fmt(res[k]):>10}")
    else:
        lines.append(f"images: {res['n_images']} scored; chance (object share of the cells) {res['chance']:.4f}")
        lines.append("attention mass on objects, per head: "
                     + " ".join(f"{k}:{v:.3f}" for k, v in enumerate(res["per_head"])))  # fmt: skip
    return "\n".join(lines)


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers, NaN as ``None`` and keys as strings (for JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj

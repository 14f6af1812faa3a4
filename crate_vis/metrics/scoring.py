"""Dataset-level scoring: predictions against a ground-truth dataset, matched by image **file name**.

This is the Python API under ``crate-vis score``. Each ``score_*`` function pairs predictions with the dataset's
images (:func:`match_predictions`), runs the metric's accumulating class, and returns a JSON-ready dict that names
its protocol and every oracle choice.

Matching never relies on position or on numeric ids a segmenter made up: a prediction keyed ``"a/x.jpg"`` pairs
with the image whose ``file_name`` is ``a/x.jpg``, else the one whose base name is ``x.jpg``, else (plain mask
folders, keyed by stem) the one whose stem is ``x``. A key that matches no image, or more than one, is refused; so
is a ground-truth image without a prediction unless ``allow_missing`` says to count it as missed.

Example:
    >>> import numpy as np
    >>> from crate_vis.groundtruth.base import BaseSegmentationDataset
    >>> class One(BaseSegmentationDataset):
    ...     image_ids = [7]
    ...     def image_path(self, i): return __import__("pathlib").Path("a.jpg")
    ...     def image_size(self, i): return (4, 4)
    ...     def instances(self, i): return []
    ...     def foreground(self, i): m = np.zeros((4, 4), bool); m[:2] = True; return m
    >>> score_jaccard(One(), {"a.jpg": One().foreground(7)[None]})["mean"]
    1.0
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from ..data.image_geometry import ImageGeometry, resize_nearest
from ..errors import DatasetError, UsageError
from ..io.coco import check_image_id, mask_bbox, validate_detections
from .base import to_numpy
from .coco_ap import CocoAP
from .corloc import CorLoc
from .jaccard import FgJaccard
from .miou import CoarseMIoU
from .parts import HeadPartScore
from .saliency import Saliency

__all__ = [
    "match_predictions", "match_key", "score_coco", "score_jaccard", "score_miou", "score_corloc",
    "score_head_parts", "score_saliency", "top_boxes_from_results", "boxes_from_masks", "translate_ids",
]  # fmt: skip


def _file_name(dataset: Any, image_id: Any) -> str:
    fn = getattr(dataset, "file_name", None)
    return PurePosixPath(str(fn(image_id) if fn is not None else dataset.image_path(image_id).name)).as_posix()


class _Index:
    """The dataset's images by file name, base name and stem."""

    def __init__(self, dataset: Any) -> None:
        self.ids = list(dataset.image_ids)
        self.full: dict[str, list[Any]] = {}
        self.base: dict[str, list[Any]] = {}
        self.stem: dict[str, list[Any]] = {}
        for i in self.ids:
            f = PurePosixPath(_file_name(dataset, i))
            self.full.setdefault(f.as_posix(), []).append(i)
            self.base.setdefault(f.name, []).append(i)
            self.stem.setdefault(f.stem, []).append(i)

    def lookup(self, key: str) -> list[Any]:
        k = PurePosixPath(str(key).replace("\\", "/"))
        for table, probe in ((self.full, k.as_posix()), (self.base, k.name), (self.stem, k.stem if k.suffix else k.name)):
            if probe in table:
                return table[probe]
        return []


def match_key(dataset: Any, key: str) -> Any:
    """The image id of ``dataset`` that a prediction keyed ``key`` (file name, base name or stem) belongs to.

    Raises:
        DatasetError: no image, or several, match.
    """
    hits = _Index(dataset).lookup(key)
    if len(hits) != 1:
        what = "no image" if not hits else f"{len(hits)} images ({', '.join(map(repr, hits[:5]))})"
        raise DatasetError(str(key), "prediction", f"matches {what} of the ground truth by file name")
    return hits[0]


def match_predictions(
    dataset: Any, preds: Mapping[str, Any], allow_missing: bool = False
) -> tuple[list[tuple[Any, str, Any]], list[Any]]:
    """Pair predictions keyed by file name (or stem) with the dataset's images.

    Returns:
        ``([(image_id, key, prediction), ...], missing_ids)`` in dataset order.

    Raises:
        DatasetError: keys matching no image or several, two predictions for one image, or images without a
            prediction unless ``allow_missing``.
    """
    index = _Index(dataset)
    taken: dict[Any, str] = {}
    unknown, ambiguous = [], []
    for key in preds:
        hits = index.lookup(key)
        if not hits:
            unknown.append(key)
        elif len(hits) > 1:
            ambiguous.append(key)
        elif hits[0] in taken:
            raise DatasetError(str(key), "prediction", f"a second prediction for the image of {taken[hits[0]]!r}")
        else:
            taken[hits[0]] = key
    if unknown:
        shown = ", ".join(map(str, unknown[:10]))
        raise DatasetError("predictions", "file names", f"{len(unknown)} prediction(s) for images the ground truth "
                           f"does not have: {shown}")  # fmt: skip
    if ambiguous:
        shown = ", ".join(map(str, ambiguous[:10]))
        raise DatasetError("predictions", "file names", f"{len(ambiguous)} prediction(s) match several ground-truth "
                           f"images (same base name or stem in different folders): {shown}")  # fmt: skip
    pairs = [(i, taken[i], preds[taken[i]]) for i in index.ids if i in taken]
    missing = [i for i in index.ids if i not in taken]
    if missing and not allow_missing:
        shown = ", ".join(_file_name(dataset, i) for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise DatasetError(
            "predictions", "missing", f"{len(missing)} of {len(index.ids)} ground-truth images have no prediction "
            f"({shown}); pass --allow-missing to count them as missed"
        )  # fmt: skip
    if not pairs:
        raise DatasetError("predictions", "file names", "no prediction matches a ground-truth image")
    return pairs, missing


def translate_ids(
    gt: Any, results: Sequence[Any], id_to_file: Mapping[Any, str], source: str = "results"
) -> tuple[list[Any], list[Any]]:
    """Detections under the predictions' own image ids (``id_to_file``: a segmentation output's ``images.json``)
    moved to the ground truth's ids, the images paired by file name (:func:`match_key`).

    Returns:
        ``(detections, missing)``: copies of the detections with the ground truth's ids (entries that are not
        objects are passed on for the detection check to refuse), and the ground-truth ids ``id_to_file`` lists
        no file of.

    Raises:
        DatasetError: a listed file name matching no ground-truth image or several, two listed files matching one
            image, or a detection whose id ``id_to_file`` does not list.
    """
    translated: dict[Any, Any] = {}
    owner: dict[Any, str] = {}
    for pid, fname in id_to_file.items():
        gid = match_key(gt, fname)
        if gid in owner:
            raise DatasetError(str(fname), "prediction", f"matches the same ground-truth image as {owner[gid]!r}")
        owner[gid] = str(fname)
        translated[pid] = gid
    out: list[Any] = []
    for i, det in enumerate(results):
        if not isinstance(det, Mapping) or "image_id" not in det:
            out.append(det)
            continue
        check_image_id(det["image_id"], f"{source}[{i}]", "", "image_id")
        if det["image_id"] not in translated:
            raise DatasetError(f"{source}[{i}]", "", f"image_id {det['image_id']!r} is not among the images the "
                               "predictions list (a segmentation output's images.json or images/*.json)")  # fmt: skip
        out.append({**det, "image_id": translated[det["image_id"]]})
    missing = [i for i in gt.image_ids if i not in owner]
    return out, missing


def score_coco(
    gt: Any,
    results: Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] = ("segm", "bbox"),
    class_agnostic: bool = True,
    id_to_file: Mapping[Any, str] | None = None,
    allow_missing: bool = True,
    source: str = "results",
) -> dict[str, Any]:
    """COCO AP for each ``iou_type`` (see :func:`~crate_vis.metrics.coco_ap.coco_ap`).

    Args:
        gt: a :class:`~crate_vis.groundtruth.COCODataset`.
        results: COCO detections.
        iou_types: ``"segm"`` and/or ``"bbox"``; a type the results cannot provide (``segm`` from box-only
            detections) is refused.
        class_agnostic: ignore categories.
        id_to_file: the predictions' own ``image_id -> file_name`` (a segmentation output's ``images.json``): ids
            are then translated to the ground truth's by file name. Without it the ids must be the ground truth's.
        allow_missing: score when some ground-truth images have no detection (they count as missed, lowering AP);
            with ``id_to_file``, images the predictions never listed are refused unless this is set.

    Returns:
        ``{"protocol": "coco", "class_agnostic": ..., "segm": {...}, "bbox": {...}}``.
    """
    dets: list[Any] = list(results)
    n_missing = 0
    if id_to_file is not None:
        dets, missing = translate_ids(gt, dets, id_to_file, source)
        n_missing = len(missing)
        if missing and not allow_missing:
            shown = ", ".join(_file_name(gt, i) for i in missing[:10])
            raise DatasetError("predictions", "missing", f"{len(missing)} of {len(gt.image_ids)} ground-truth images "
                               f"were not segmented ({shown}); pass --allow-missing to count them as missed")  # fmt: skip
    has_segm = all(isinstance(d, Mapping) and "segmentation" in d for d in dets)
    out: dict[str, Any] = {"protocol": "coco", "class_agnostic": class_agnostic, "n_missing": n_missing}
    for t in iou_types:
        if t == "segm" and not has_segm:
            raise UsageError("the results hold boxes only: score them with --iou-type bbox")
        metric = CocoAP(gt, iou_type=t, class_agnostic=class_agnostic)
        metric.update(dets, source=source)
        out[t] = metric.compute()
    return out


def _fit_pred(pred: np.ndarray, size: tuple[int, int], key: str, resize: bool) -> np.ndarray:
    if tuple(pred.shape[-2:]) == tuple(size):
        return pred
    if not resize:
        raise DatasetError(
            key, "prediction", f"is {pred.shape[-2]}x{pred.shape[-1]}, the ground truth {size[0]}x{size[1]}: write "
            "masks at image size or pass --resize-pred (nearest)"
        )  # fmt: skip
    return resize_nearest(pred, size)


def score_jaccard(
    dataset: Any, preds: Mapping[str, Any], allow_missing: bool = False, resize: bool = False, empty: float = 1.0
) -> dict[str, Any]:
    """Foreground Jaccard (DINO protocol) of per-image ``(heads, H, W)`` masks keyed by file name.

    The ground-truth foreground is ``dataset.foreground(id)``; ``dataset.ignore(id)`` pixels (VOC void) are left out.
    Missing images (with ``allow_missing``) count as an empty prediction (IoU 0 where the image has an object).
    When every prediction holds one mask, only the ``mean`` row is reported (union and best would repeat it).
    """
    pairs, missing = match_predictions(dataset, preds, allow_missing)
    metric = FgJaccard(empty=empty)
    heads = set()
    for image_id, key, pred in pairs:
        size = dataset.image_size(image_id)
        p = _fit_pred(np.asarray(pred), size, key, resize)
        heads.add(1 if p.ndim == 2 else p.shape[0])
        metric.update([p], [dataset.foreground(image_id)], [dataset.ignore(image_id)])
    for image_id in missing:
        metric.update([np.zeros(dataset.image_size(image_id), bool)], [dataset.foreground(image_id)],
                      [dataset.ignore(image_id)])  # fmt: skip
    res = metric.compute()
    res.pop("per_image")
    single = heads == {1}
    if single:
        for k in ("union", "best", "best_fixed_head", "best_head", "per_head"):
            res.pop(k, None)
    return {
        "protocol": "jaccard",
        "definition": "per image IoU of predicted vs ground-truth foreground (void ignored), mean over images"
        + ("" if single else "; mean = mean over masks, union = union of masks, best = best mask per image (oracle)"),
        "oracle": [] if single else ["best", "best_fixed_head"],
        "masks_per_image": "one" if single else "several",
        **res,
        "n_missing": len(missing),
    }


def _check_grid(grid: tuple[int, int], size: tuple[int, int], key: str) -> None:
    h, w = grid
    H, W = size
    if h > H or w > W:
        raise DatasetError(key, "prediction", f"is {h}x{w}, larger than the ground truth {H}x{W}")
    # a token grid of an aspect-preserving resize, bottom/right remainder cropped, is within one cell of H:W
    if abs(h - w * H / W) > max(1.0, H / W) + 1e-6:
        raise DatasetError(key, "prediction", f"grid {h}x{w} does not match the ground truth's aspect ({H}x{W})")


def score_miou(
    dataset: Any,
    preds: Mapping[str, Any],
    allow_missing: bool = False,
    include_background: bool = True,
    patch_size: int | None = None,
    grids: Mapping[str, Sequence[int]] | None = None,
    extents: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Coarse mIoU of the CRATE emergence paper (see :func:`~crate_vis.metrics.miou.coarse_miou`).

    Predictions smaller than the image are token grids; the ground-truth labels are brought to them by majority
    vote per cell. Predictions at image size are brought to a token grid the same way when one is known:
    ``grids[key]`` (segmentation outputs record it), else ``(H // patch_size, W // patch_size)``; otherwise they are
    scored at pixel resolution, reported as such. ``extents[key]`` gives the pixels the grid covers when the model
    input was cropped to whole patches.
    """
    if not getattr(dataset, "has_semantic", False):
        raise UsageError(f"{dataset!r} has no semantic labels for mIoU")
    if patch_size is not None and patch_size < 1:
        raise UsageError(f"--patch-size must be at least 1, got {patch_size}")
    pairs, missing = match_predictions(dataset, preds, allow_missing)
    metric = CoarseMIoU(include_background=include_background)
    resolutions = set()
    for image_id, key, pred in pairs:
        p = np.asarray(pred).astype(bool)
        p = p if p.ndim == 3 else p[None]
        labels = dataset.semantic(image_id)
        size = labels.shape
        grid = None
        if grids is not None and key in grids:
            grid = (int(grids[key][0]), int(grids[key][1]))
        elif patch_size:
            grid = (max(1, size[0] // patch_size), max(1, size[1] // patch_size))  # (rows, cols): height first
        extent = None if extents is None or key not in extents else tuple(extents[key])
        if p.shape[-2:] == size and grid is not None and grid != size:
            p = _masks_to_grid(p, ImageGeometry.covering(size, grid, extent))
        if p.shape[-2:] == size:
            resolutions.add("pixel")
            metric.update([p], [labels])
            continue
        _check_grid(p.shape[-2:], size, key)
        resolutions.add("token")
        metric.update([p], [ImageGeometry.covering(size, p.shape[-2:], extent).labels_to_grid(labels)])
    res = metric.compute()
    cats = getattr(dataset, "categories", None) or {}
    names = {}
    for c in res["per_class"]:
        entry = cats.get(c, "background" if c == 0 else None)
        if entry is not None:
            names[str(c)] = entry["name"] if isinstance(entry, dict) else str(entry)
    return {
        "protocol": "miou",
        "definition": "per image and ground-truth class the best mask's IoU at token resolution (oracle; the "
        "background against the tokens no mask claims), mean over the image's classes, then over images (CRATE "
        "emergence paper, App. B.3)",
        "oracle": ["miou"],
        "include_background": include_background,
        "resolution": "+".join(sorted(resolutions)),
        **{k: v for k, v in res.items() if k != "per_class"},
        "per_class": {str(k): v for k, v in res["per_class"].items()},
        "class_names": names,
        "n_missing": len(missing),
    }


def _masks_to_grid(masks: np.ndarray, geom: ImageGeometry) -> np.ndarray:
    """Image-size masks ``(K, H, W)`` on a token grid, by the rule the ground truth's labels follow.

    Disjoint masks (a partition, e.g. one mask per class) are brought down together as a label map, by the same
    plurality vote as the labels, so a prediction equal to the ground truth stays equal to it; overlapping masks
    (heads) one by one, each cell on where the mask covers more than half of it.
    """
    if masks.shape[0] > 1 and not (masks.sum(0) > 1).any():
        labels = np.where(masks.any(0), masks.argmax(0) + 1, 0)  # 0: no mask
        low = geom.labels_to_grid(labels, void=-1)
        return np.stack([low == k + 1 for k in range(masks.shape[0])])
    return np.stack([geom.mask_fraction(m) > 0.5 for m in masks])  # a tie goes to "off", as in the label vote


class _Sizes(Mapping[Any, tuple[int, int]]):
    """A dataset's image sizes by id, each read when first asked for."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.ids = list(dataset.image_ids)
        self.known = set(self.ids)
        self.cache: dict[Any, tuple[int, int]] = {}

    def __getitem__(self, image_id: Any) -> tuple[int, int]:
        if image_id not in self.known:
            raise KeyError(image_id)
        if image_id not in self.cache:
            h, w = self.dataset.image_size(image_id)
            self.cache[image_id] = (int(h), int(w))
        return self.cache[image_id]

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.known

    def __iter__(self) -> Iterator[Any]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def top_boxes_from_results(
    results: Sequence[Mapping[str, Any]], source: str = "results", dataset: Any = None
) -> dict[Any, list[float]]:
    """The box of the highest-scoring detection of each image (ties: the first listed), after the one detection
    check (:func:`crate_vis.io.coco.validate_detections`) that COCO AP runs: with ``dataset``, against its image ids
    and sizes (a mask of another size than its image is refused, as COCO AP refuses it)."""
    sizes = _Sizes(dataset) if dataset is not None else None
    best: dict[Any, tuple[float, list[float]]] = {}
    for det in validate_detections(results, sizes, source, need="bbox"):
        if det["image_id"] not in best or det["score"] > best[det["image_id"]][0]:
            best[det["image_id"]] = (float(det["score"]), det["bbox"])
    return {k: v[1] for k, v in best.items()}


def boxes_from_masks(
    dataset: Any, masks: Mapping[str, np.ndarray], box_from: str = "union", scores: Mapping[str, np.ndarray] | None = None
) -> dict[Any, list[float] | None]:
    """One box per image from predicted masks keyed by file name: of the top-scoring mask (``scores`` given), of
    the union of the masks (``"union"``) or of the first (``"first"``); ``None`` for an empty mask.

    Raises:
        DatasetError: masks of another size than their image.
    """
    out: dict[Any, list[float] | None] = {}
    for image_id, key, m in match_predictions(dataset, masks, allow_missing=True)[0]:
        m = np.asarray(m)
        m = m if m.ndim == 3 else m[None]
        size = tuple(dataset.image_size(image_id))
        if tuple(m.shape[-2:]) != size:
            raise DatasetError(key, "prediction", f"is {m.shape[-2]}x{m.shape[-1]}, the image {size[0]}x{size[1]}")
        if scores is not None and key in scores and len(scores[key]):
            one = m[int(np.argmax(scores[key]))]
        else:
            one = m[0] if box_from == "first" else m.any(0)
        out[image_id] = mask_bbox(one) if one.any() else None
    return out


def score_corloc(
    dataset: Any, pred_boxes: Mapping[Any, Any], allow_missing: bool = False, iou_threshold: float = 0.5
) -> dict[str, Any]:
    """CorLoc of one box per image keyed by the dataset's image id (``None``: no prediction, counted wrong).

    Raises:
        DatasetError: boxes for image ids the dataset does not have; images without a box unless
            ``allow_missing`` (they then count as wrong).
    """
    ids = list(dataset.image_ids)
    known = set(ids)
    unknown = [k for k in pred_boxes if k not in known]
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:10])
        raise DatasetError("predictions", "image ids", f"{len(unknown)} box(es) for images the ground truth does not have: {shown}")
    missing = [i for i in ids if i not in pred_boxes]
    if missing and not allow_missing:
        raise DatasetError("predictions", "missing", f"{len(missing)} of {len(ids)} ground-truth images have no box; "
                           "pass --allow-missing to count them as wrong")  # fmt: skip
    metric = CorLoc(iou_threshold)
    for i in ids:
        metric.update([pred_boxes.get(i)], [dataset.boxes(i)])
    return {
        "protocol": "corloc",
        "definition": f"share of images whose one predicted box has IoU >= {iou_threshold} with any ground-truth box",
        "oracle": [],
        **metric.compute(),
        "n_missing": len(missing),
    }


def score_head_parts(
    dataset: Any,
    attn: Mapping[str, Any],
    allow_missing: bool = False,
    extents: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Per-head share of attention mass inside ground-truth objects (see
    :func:`~crate_vis.metrics.parts.head_part_scores`).

    Args:
        dataset: ground truth; its :meth:`foreground` is brought to each map's grid as the fraction of object pixels
            per cell (:meth:`~crate_vis.data.image_geometry.ImageGeometry.mask_fraction`).
        attn: file name -> ``(heads, h, w)`` non-negative attention maps.
        allow_missing: score when some images have no maps.
        extents: file name -> pixels covered by the grid.
    """
    pairs, missing = match_predictions(dataset, attn, allow_missing)
    metric = HeadPartScore()
    for image_id, key, a in pairs:
        a = to_numpy(a)
        if a.ndim != 3:
            raise DatasetError(key, "attention", f"must be (heads, h, w), got shape {a.shape}")
        fg = dataset.foreground(image_id)
        _check_grid(a.shape[-2:], fg.shape, key)
        extent = None if extents is None or key not in extents else tuple(extents[key])
        metric.update([a], [ImageGeometry.covering(fg.shape, a.shape[-2:], extent).mask_fraction(fg)])
    return {
        "protocol": "parts",
        "definition": "per head: attention mass inside ground-truth objects / all its attention mass, pooled over "
        "images; chance = the object share of all cells",
        "oracle": [],
        **metric.compute(),
        "n_images": len(pairs),
        "n_missing": len(missing),
    }


def score_saliency(
    dataset: Any,
    maps: Mapping[str, Any],
    allow_missing: bool = False,
    resize: bool = False,
    thresholds: int | Sequence[float] = 255,
) -> dict[str, Any]:
    """Saliency IoU, accuracy and max F-beta (beta^2 = 0.3) of ``(H, W)`` maps in [0, 1] keyed by file name (see
    :func:`~crate_vis.metrics.saliency.saliency_scores`)."""
    pairs, missing = match_predictions(dataset, maps, allow_missing)
    metric = Saliency(thresholds=thresholds)
    for image_id, key, m in pairs:
        m = np.asarray(to_numpy(m), dtype=np.float64)
        if m.ndim == 3 and m.shape[0] == 1:
            m = m[0]
        m = _fit_pred(m, dataset.image_size(image_id), key, resize)
        metric.update([m], [dataset.foreground(image_id)])
    return {
        "protocol": "saliency",
        "definition": "per image IoU and pixel accuracy of map >= 0.5, and F-beta (beta^2 = 0.3) per threshold; "
        "means over images; max_fbeta = the best threshold shared by all images",
        "oracle": ["max_fbeta (threshold chosen on the ground truth)"],
        **metric.compute(),
        "n_missing": len(missing),
    }

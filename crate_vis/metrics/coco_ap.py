"""Class-agnostic COCO AP/AR of masks or boxes through pycocotools' COCOeval."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..io.coco import masks_to_results, quiet_coco, read_results, validate_coco_instances, validate_detections
from .base import Metric

__all__ = ['COCO_STAT_NAMES', 'IOU_TYPES', 'coco_ap', 'CocoAP']


#: names of COCOeval's 12 summary numbers, in its order
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("segm", "bbox")


def _coco_gt(gt: Any) -> Any:
    """A pycocotools ``COCO`` from a path, a dict, a :class:`~crate_vis.groundtruth.COCODataset` or a ``COCO``."""
    from pycocotools.coco import COCO

    from ..groundtruth.coco import COCODataset

    if isinstance(gt, COCO):
        return gt
    if isinstance(gt, COCODataset):
        return gt.coco
    if isinstance(gt, dict):
        return quiet_coco(validate_coco_instances(gt))
    return COCODataset(gt).coco


def _coco_validate_results(
    results: Sequence[Any], gt: Any, iou_type: str, source: str = "results", class_agnostic: bool = True
) -> list[dict[str, Any]]:
    """The one detection check (:func:`crate_vis.io.coco.validate_detections`) against the ground truth's images,
    plus categories when class-aware; returns the normalised detections."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    sizes = {i: (int(img["height"]), int(img["width"])) for i, img in gt.imgs.items()}
    dets = validate_detections(results, sizes, source, need=iou_type)
    if not class_agnostic:
        for i, det in enumerate(dets):
            if det.get("category_id") not in gt.cats:
                raise ValueError(f"{source}[{i}]: category_id {det.get('category_id')!r} is not a ground-truth category")
    return dets


def _coco_update(results: Sequence[dict[str, Any]], class_agnostic: bool = True) -> list[dict[str, Any]]:
    """Normalised copies of the detections (the sufficient statistics of COCO AP are the detections themselves).

    Class-agnostic detections without a ``category_id`` get 1; RLE ``counts`` given as bytes become str.
    """
    out = []
    for det in results:
        d = dict(det)
        if class_agnostic:
            d.setdefault("category_id", 1)
        seg = d.get("segmentation")
        if isinstance(seg, dict) and isinstance(seg.get("counts"), bytes):
            d["segmentation"] = {**d["segmentation"], "counts": d["segmentation"]["counts"].decode("ascii")}
        out.append(d)
    return out


def _coco_compute(
    gt: Any, detections: Sequence[dict[str, Any]], iou_type: str = "segm", class_agnostic: bool = True
) -> dict[str, Any]:
    """Run COCOeval (``params.useCats = 0`` when class-agnostic) on all ground-truth images.

    With no detections at all pycocotools' ``loadRes`` cannot build a result set; an empty one is built instead,
    which gives what COCOeval gives for images without detections: AP/AR 0 where the ground truth has objects and
    -1 where an area range has none.
    """
    import contextlib
    import copy
    import io

    from pycocotools.cocoeval import COCOeval


    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if detections:
            dt = gt.loadRes(copy.deepcopy(list(detections)))
        else:
            dt = quiet_coco({"images": copy.deepcopy(gt.dataset["images"]), "annotations": [],
                             "categories": copy.deepcopy(gt.dataset.get("categories", []))})  # fmt: skip
        ev = COCOeval(gt, dt, iouType=iou_type)
        ev.params.useCats = 0 if class_agnostic else 1
        if class_agnostic:
            # COCOeval gathers detections of p.catIds only, even with useCats = 0: a detection whose category the
            # ground truth lacks (category_id 1 of a class-agnostic segmenter, say) would be dropped silently
            ev.params.catIds = sorted(set(gt.getCatIds()) | {d["category_id"] for d in detections})
        ev.params.imgIds = sorted(gt.getImgIds())
        ev.evaluate()
        ev.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        ev.summarize()
    out: dict[str, Any] = {name: float(v) for name, v in zip(COCO_STAT_NAMES, ev.stats)}
    out.update(
        iou_type=iou_type,
        class_agnostic=class_agnostic,
        n_images=len(ev.params.imgIds),
        n_detections=len(detections),
        summary=summary.getvalue().rstrip(),
    )
    return out


def coco_ap(
    gt: Any, results: Any, iou_type: str = "segm", class_agnostic: bool = True
) -> dict[str, Any]:
    """COCO average precision of masks (``segm``) or boxes (``bbox``) through pycocotools' COCOeval.

    Class-agnostic by default (``params.useCats = 0``): every detection may match any ground-truth object, as
    unsupervised segmenters predict no categories. Every ground-truth image counts, with or without detections.

    Args:
        gt: COCO instance json path, dict, :class:`~crate_vis.groundtruth.COCODataset` or pycocotools ``COCO``.
        results: a results json path or a list of ``{image_id, score, segmentation (RLE) | bbox, category_id?}``.
        iou_type: ``"segm"`` or ``"bbox"``.
        class_agnostic: ignore categories.

    Returns:
        ``AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl`` (COCOeval's stats; -1 where no ground
        truth falls in an area range), ``n_images``, ``n_detections``, ``summary`` (COCOeval's printout).

    Raises:
        ValueError: detections for unknown image ids, missing fields, masks of the wrong size.

    Example:
        >>> import numpy as np
        >>> from crate_vis.io.coco import mask_to_rle
        >>> m = np.zeros((8, 8), bool); m[2:6, 2:6] = True
        >>> gt = {"images": [{"id": 1, "width": 8, "height": 8, "file_name": "a.jpg"}],
        ...       "categories": [{"id": 3, "name": "thing"}],
        ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "segmentation": mask_to_rle(m)}]}
        >>> r = coco_ap(gt, [{"image_id": 1, "score": 0.9, "segmentation": mask_to_rle(m)}])
        >>> round(r["AP"], 6), round(r["AP50"], 6)
        (1.0, 1.0)
    """
    coco_gt = _coco_gt(gt)
    source = "results"
    if not isinstance(results, (list, tuple)):
        source = str(results)
        results = read_results(results)
    dets = _coco_validate_results(results, coco_gt, iou_type, source, class_agnostic)
    return _coco_compute(coco_gt, _coco_update(dets, class_agnostic), iou_type, class_agnostic)


class CocoAP(Metric):
    """Class-agnostic COCO AP through COCOeval, see :func:`~crate_vis.metrics.coco_ap`.

    Args:
        gt: COCO instance json path, dict, :class:`~crate_vis.groundtruth.COCODataset` or pycocotools ``COCO``.
        iou_type: ``"segm"`` or ``"bbox"``.
        class_agnostic: ignore categories (``params.useCats = 0``).
    """

    def __init__(self, gt: Any, iou_type: str = "segm", class_agnostic: bool = True) -> None:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
        self.gt = _coco_gt(gt)
        self.iou_type = iou_type
        self.class_agnostic = class_agnostic
        super().__init__()

    def reset(self) -> None:
        self.detections: list[dict[str, Any]] = []

    def update(self, results: Sequence[dict[str, Any]], source: str = "results") -> None:
        """Add COCO result dicts (e.g. from :func:`~crate_vis.io.coco.masks_to_results`)."""
        dets = _coco_validate_results(list(results), self.gt, self.iou_type, source, self.class_agnostic)
        self.detections.extend(_coco_update(dets, self.class_agnostic))

    def update_masks(self, image_id: Any, masks: Any, scores: Any) -> None:
        """Add the ``(N, H, W)`` masks of one image with their scores."""
        self.update(masks_to_results(image_id, masks, scores))

    def compute(self) -> dict[str, Any]:
        return _coco_compute(self.gt, self.detections, self.iou_type, self.class_agnostic)

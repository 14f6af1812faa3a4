"""CorLoc: one box per image, correct at IoU >= 0.5 with any ground-truth box."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import Metric, _pair, to_numpy
from .iou import box_iou

__all__ = ['corloc', 'CorLoc']


def _corloc_update(pred_box: Any, gt_boxes: Any, iou_threshold: float = 0.5) -> int:
    """1 when the predicted box overlaps some ground-truth box with IoU >= ``iou_threshold``; 0 otherwise (and for
    ``pred_box=None``); -1 when the image has no ground-truth box (not scored)."""
    gt = to_numpy(gt_boxes).astype(np.float64).reshape(-1, 4)
    if gt.shape[0] == 0:
        return -1
    if pred_box is None:
        return 0
    pb = to_numpy(pred_box).astype(np.float64)
    if pb.shape != (4,):
        raise ValueError(f"CorLoc takes exactly one [x, y, w, h] box per image, got shape {pb.shape}")
    return int((box_iou(pb, gt) >= iou_threshold).any())


def _corloc_compute(hits: Sequence[int]) -> dict[str, Any]:
    scored = [h for h in hits if h >= 0]
    if not scored:
        raise ValueError("no image with a ground-truth box was scored")
    return {
        "corloc": float(np.mean(scored)),
        "n_correct": int(sum(scored)),
        "n_images": len(scored),
        "n_skipped": len(hits) - len(scored),
    }


def corloc(pred_boxes: Sequence[Any], gt_boxes: Sequence[Any], iou_threshold: float = 0.5) -> dict[str, Any]:
    """Correct localisation: the share of images whose one predicted box has IoU >= 0.5 with any ground-truth box.

    An image without a prediction (``None``) counts as wrong; an image without ground-truth boxes is skipped and
    counted in ``n_skipped``.

    Example:
        >>> corloc([[0, 0, 10, 10], [0, 0, 10, 10], None], [[[0, 0, 10, 12]], [[50, 50, 5, 5]], [[0, 0, 1, 1]]])
        {'corloc': 0.3333333333333333, 'n_correct': 1, 'n_images': 3, 'n_skipped': 0}
    """
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"{len(pred_boxes)} predicted boxes for {len(gt_boxes)} images")
    return _corloc_compute([_corloc_update(p, g, iou_threshold) for p, g in zip(pred_boxes, gt_boxes)])


class CorLoc(Metric):
    """Correct localisation, see :func:`~crate_vis.metrics.corloc`."""

    def __init__(self, iou_threshold: float = 0.5) -> None:
        self.iou_threshold = iou_threshold
        super().__init__()

    def reset(self) -> None:
        self.hits: list[int] = []

    def update(self, pred_boxes: Sequence[Any], gt_boxes: Sequence[Any]) -> None:
        """Add a batch: per image one ``[x, y, w, h]`` box (or ``None``) and ``(n, 4)`` ground-truth boxes."""
        for p, g in zip(*_pair(pred_boxes, gt_boxes)):
            self.hits.append(_corloc_update(p, g, self.iou_threshold))

    def compute(self) -> dict[str, Any]:
        return _corloc_compute(self.hits)

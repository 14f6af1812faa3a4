"""Scores for emergent segmentation, one module per metric: COCO AP, foreground Jaccard, coarse mIoU, CorLoc,
saliency, per-head part scores, and the one definition of IoU and of attention mass on the object.

Each module holds a functional core (``_<metric>_validate_args`` / ``_update`` / ``_compute``), the public function
and a thin accumulating class (:class:`~crate_vis.metrics.base.Metric`). :mod:`crate_vis.metrics.scoring` scores
whole datasets, matching predictions to ground truth by file name. RLE and the COCO format live in
:mod:`crate_vis.io.coco`.
"""

from __future__ import annotations

from .attention_mass import attention_mass_inside, attention_mass_stats
from .base import VOID, Metric
from .coco_ap import COCO_STAT_NAMES, CocoAP, coco_ap
from .corloc import CorLoc, corloc
from .iou import ConfusionMatrix, binary_iou, box_iou, confusion_matrix, iou_from_confusion, mask_iou_per_head, mean_iou
from .jaccard import HEAD_CHOICES, FgJaccard, fg_jaccard
from .miou import CoarseMIoU, coarse_miou
from .parts import HeadPartScore, HeadScores, head_consistency, head_part_scores, part_assignment
from .saliency import Saliency, fbeta_from_counts, saliency_scores

__all__ = [
    "COCO_STAT_NAMES", "HEAD_CHOICES", "VOID", "CocoAP", "CoarseMIoU", "ConfusionMatrix", "CorLoc", "FgJaccard",
    "HeadPartScore", "HeadScores", "Metric", "Saliency", "attention_mass_inside", "attention_mass_stats",
    "binary_iou", "box_iou", "coarse_miou", "coco_ap", "confusion_matrix", "corloc", "fbeta_from_counts",
    "fg_jaccard", "head_consistency", "head_part_scores", "iou_from_confusion", "mask_iou_per_head", "mean_iou",
    "part_assignment", "saliency_scores",
]  # fmt: skip

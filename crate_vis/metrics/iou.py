"""Intersection over union of masks and boxes, and the class confusion matrix (mIoU)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import VOID, Metric, _pair, _safe_div, to_numpy

__all__ = [
    "binary_iou", "box_iou", "mask_iou_per_head", "confusion_matrix", "iou_from_confusion", "mean_iou", "ConfusionMatrix",
]  # fmt: skip


def _binary_validate_args(pred: np.ndarray, target: np.ndarray, ignore: np.ndarray | None = None) -> None:
    if pred.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"prediction of size {pred.shape[-2:]} for a ground truth of size {target.shape[-2:]}")
    if ignore is not None and ignore.shape != target.shape:
        raise ValueError(f"ignore mask of shape {ignore.shape} for a ground truth of shape {target.shape}")


def _binary_update(
    pred: np.ndarray, target: np.ndarray, ignore: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersection, union and target area of ``pred (..., H, W)`` against ``target (H, W)``; all ``(...)``."""
    p = pred.astype(bool)
    t = target.astype(bool)
    if ignore is not None:
        keep = ~ignore.astype(bool)
        p = p & keep
        t = t & keep
    inter = (p & t).sum(axis=(-2, -1))
    union = (p | t).sum(axis=(-2, -1))
    return inter.astype(np.int64), union.astype(np.int64), np.broadcast_to(t.sum(), inter.shape).astype(np.int64)


def binary_iou(pred: Any, target: Any, ignore: Any = None, empty: float = 1.0) -> float:
    """IoU (Jaccard index) of two ``(H, W)`` masks.

    Args:
        pred: predicted mask (non-zero = foreground).
        target: ground-truth mask.
        ignore: optional ``(H, W)`` mask of pixels left out of both.
        empty: value when both masks are empty (default 1: they agree perfectly).

    Example:
        >>> a = np.zeros((4, 4), bool); a[:2] = True
        >>> b = np.zeros((4, 4), bool); b[1:3] = True
        >>> binary_iou(a, b)
        0.3333333333333333
    """
    p, t = to_numpy(pred), to_numpy(target)
    ig = None if ignore is None else to_numpy(ignore)
    if p.ndim != 2 or t.ndim != 2:
        raise ValueError(f"binary_iou takes two (H, W) masks, got {p.shape} and {t.shape}")
    _binary_validate_args(p, t, ig)
    inter, union, _ = _binary_update(p, t, ig)
    return float(_safe_div(inter, union, empty))


def mask_iou_per_head(masks: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """IoU of each head's mask with one object mask, batched in torch: the per-head form of :func:`binary_iou`.

    Args:
        masks: ``(..., K, gh, gw)`` bool.
        gt: ``(..., gh, gw)`` bool object mask.

    Returns:
        ``(..., K)`` float64; NaN where both masks are empty.
    """
    m = masks.bool()
    g = gt.bool().unsqueeze(-3)  # (..., 1, gh, gw)
    inter = (m & g).sum(dim=(-2, -1)).double()
    union = (m | g).sum(dim=(-2, -1)).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))


def box_iou(boxes_a: Any, boxes_b: Any) -> np.ndarray:
    """Pairwise IoU of ``[x, y, w, h]`` boxes: ``(n, 4) x (m, 4) -> (n, m)`` (0 where both are empty).

    Example:
        >>> box_iou([[0, 0, 2, 2]], [[1, 0, 2, 2], [5, 5, 1, 1]]).round(4).tolist()
        [[0.3333, 0.0]]
    """
    a = to_numpy(boxes_a).astype(np.float64).reshape(-1, 4)
    b = to_numpy(boxes_b).astype(np.float64).reshape(-1, 4)
    if (a[:, 2:] < 0).any() or (b[:, 2:] < 0).any():
        raise ValueError("boxes must be [x, y, w, h] with w, h >= 0")
    ax0, ay0, ax1, ay1 = a[:, 0, None], a[:, 1, None], (a[:, 0] + a[:, 2])[:, None], (a[:, 1] + a[:, 3])[:, None]
    bx0, by0, bx1, by1 = b[None, :, 0], b[None, :, 1], (b[:, 0] + b[:, 2])[None], (b[:, 1] + b[:, 3])[None]
    iw = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None)  # (n, m)
    ih = np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None)  # (n, m)
    area_a, area_b = (a[:, 2] * a[:, 3])[:, None], (b[:, 2] * b[:, 3])[None]
    # x + w - x need not give w back in floating point: keep the overlap within both areas so IoU <= 1
    inter = np.minimum(iw * ih, np.minimum(area_a, area_b))
    union = area_a + area_b - inter
    return _safe_div(inter, union, 0.0)


def _confusion_validate_args(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"prediction of shape {pred.shape} for a ground truth of shape {target.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    valid_t = target if ignore_index is None else target[target != ignore_index]
    for name, arr in (("prediction", pred), ("ground truth", valid_t)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}), got [{arr.min()}, {arr.max()}]")


def _confusion_update(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None) -> np.ndarray:
    """``(C, C)`` int64 counts, rows = ground truth, columns = prediction (scikit-learn's layout)."""
    t = target.reshape(-1).astype(np.int64)
    p = pred.reshape(-1).astype(np.int64)
    if ignore_index is not None:
        keep = t != ignore_index
        t, p = t[keep], p[keep]
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion_matrix(pred: Any, target: Any, num_classes: int, ignore_index: int | None = VOID) -> np.ndarray:
    """Class confusion matrix (rows ground truth, columns prediction), ``ignore_index`` pixels left out.

    Example:
        >>> confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 255]), 3).tolist()
        [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    """
    p, t = to_numpy(pred), to_numpy(target)
    _confusion_validate_args(p, t, num_classes, ignore_index)
    return _confusion_update(p, t, num_classes, ignore_index)


def iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU ``tp / (tp + fp + fn)``; NaN for a class absent from both prediction and ground truth."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    return _safe_div(tp, cm.sum(0) + cm.sum(1) - tp, np.nan)


def mean_iou(pred: Any, target: Any, num_classes: int, ignore_index: int | None = VOID) -> float:
    """Dataset mIoU of label maps: per-class IoU from the pooled confusion matrix, averaged over classes present.

    Example:
        >>> mean_iou(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [0, 1]]), 2)
        0.5833333333333333
    """
    return float(np.nanmean(iou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))))


class ConfusionMatrix(Metric):
    """Pooled class confusion matrix of label maps, with per-class IoU and mIoU.

    Args:
        num_classes: number of classes.
        ignore_index: ground-truth label left out (255, VOC's void), or ``None``.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = VOID) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        super().__init__()

    def reset(self) -> None:
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, preds: Any, targets: Any) -> None:
        for p, t in zip(*_pair(preds, targets)):
            p, t = to_numpy(p), to_numpy(t)
            _confusion_validate_args(p, t, self.num_classes, self.ignore_index)
            self.matrix += _confusion_update(p, t, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, Any]:
        """``matrix`` (rows ground truth), ``iou`` per class (NaN when absent), ``miou`` over present classes."""
        iou = iou_from_confusion(self.matrix)
        return {
            "matrix": self.matrix.copy(),
            "iou": iou,
            "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        }

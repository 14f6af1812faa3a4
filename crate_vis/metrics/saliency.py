"""Saliency scores: IoU and pixel accuracy of a binarised map, max F-beta (beta^2 = 0.3) over thresholds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

import numpy as np

from .base import Metric, _pair, _safe_div, to_numpy
from .iou import _binary_update, _binary_validate_args

__all__ = ['fbeta_from_counts', 'saliency_scores', 'Saliency']


def _thresholds(thresholds: int | Sequence[float]) -> np.ndarray:
    if isinstance(thresholds, int):
        if thresholds < 1:
            raise ValueError("thresholds must be >= 1")
        # evenly spaced in [0, 1): a prediction is foreground where its value is >= the threshold
        return np.arange(thresholds, dtype=np.float64) / thresholds
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if t.size == 0:
        raise ValueError("no thresholds given")
    return t


def fbeta_from_counts(tp: Any, fp: Any, fn: Any, beta2: float = 0.3) -> np.ndarray:
    """F-beta from counts: ``(1 + b2) P R / (b2 P + R)``, 0 where precision and recall are both 0.

    Precision is 0 when nothing is predicted and recall 0 when the ground truth is empty.
    """
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    prec = _safe_div(tp, tp + fp, 0.0)
    rec = _safe_div(tp, tp + fn, 0.0)
    return _safe_div((1 + beta2) * prec * rec, beta2 * prec + rec, 0.0)


def _saliency_validate_args(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.ndim != 2 or target.ndim != 2:
        raise ValueError(f"saliency takes (H, W) maps, got {pred.shape} and {target.shape}")
    _binary_validate_args(pred, target)
    if pred.size and (pred.min() < 0 or pred.max() > 1):
        raise ValueError(f"saliency maps must lie in [0, 1], got [{pred.min()}, {pred.max()}]")


class _SaliencyStats(TypedDict):
    iou: np.ndarray  # ()
    accuracy: np.float64
    fbeta: np.ndarray  # (T,)


def _saliency_update(
    pred: Any, target: Any, thresholds: np.ndarray, binarize: float = 0.5, beta2: float = 0.3, empty: float = 1.0
) -> _SaliencyStats:
    """One image: IoU and accuracy of ``pred >= binarize``; F-beta at each threshold ``(T,)``."""
    p = to_numpy(pred).astype(np.float64)
    t = to_numpy(target).astype(bool)
    _saliency_validate_args(p, t)
    b = p >= binarize
    inter, union, _ = _binary_update(b, t)
    order = np.sort(p.reshape(-1))
    t_vals = p.reshape(-1)[t.reshape(-1)]
    t_sorted = np.sort(t_vals)
    # counts at each threshold through sorted searches: O((HW + T) log HW) instead of O(HW * T)
    n_pred = order.size - np.searchsorted(order, thresholds, side="left")  # (T,) pixels >= thr
    tp = t_sorted.size - np.searchsorted(t_sorted, thresholds, side="left")  # (T,)
    fp = n_pred - tp
    fn = t_sorted.size - tp
    return {
        "iou": _safe_div(inter, union, empty),
        "accuracy": np.float64((b == t).mean()),
        "fbeta": fbeta_from_counts(tp, fp, fn, beta2),  # (T,)
    }


def _saliency_compute(iou: Sequence[float], accuracy: Sequence[float], fbeta: Sequence[np.ndarray],
                      thresholds: np.ndarray) -> dict[str, Any]:  # fmt: skip
    """Means over images; ``max_fbeta`` is the maximum over thresholds of the image-mean F-beta."""
    if not iou:
        raise ValueError("no images were scored")
    mean_f = np.stack(fbeta).mean(0)  # (T,)
    k = int(mean_f.argmax())
    return {
        "iou": float(np.mean(iou)),
        "accuracy": float(np.mean(accuracy)),
        "max_fbeta": float(mean_f[k]),
        "best_threshold": float(thresholds[k]),
        "n_images": len(iou),
    }


def saliency_scores(
    preds: Sequence[Any],
    targets: Sequence[Any],
    thresholds: int | Sequence[float] = 255,
    binarize: float = 0.5,
    beta2: float = 0.3,
) -> dict[str, Any]:
    """Saliency detection measures, each averaged over images.

    * ``iou`` and ``accuracy``: of the map binarised at ``pred >= binarize`` (0.5) against the ground truth;
    * ``max_fbeta``: for each threshold ``t`` the F-beta (``beta^2 = 0.3``) of ``pred >= t`` per image, averaged
      over images, then the maximum over thresholds (the threshold is shared by all images).

    Args:
        preds: per image ``(H, W)`` saliency in [0, 1] (a binary mask works too).
        targets: per image ``(H, W)`` ground-truth foreground.
        thresholds: a count ``T`` (``0, 1/T, ..., (T-1)/T``) or explicit values.
        binarize: threshold of ``iou``/``accuracy``.
        beta2: ``beta^2`` of the F-measure.

    Example:
        >>> gt = np.array([[1, 1], [0, 0]], bool)
        >>> r = saliency_scores([np.array([[0.9, 0.4], [0.2, 0.0]])], [gt], thresholds=[0.3, 0.5])
        >>> r["iou"], r["accuracy"], round(r["max_fbeta"], 4), r["best_threshold"]
        (0.5, 0.75, 1.0, 0.3)
    """
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} ground truths")
    thr = _thresholds(thresholds)
    stats = [_saliency_update(p, t, thr, binarize, beta2) for p, t in zip(preds, targets)]
    return _saliency_compute([float(s["iou"]) for s in stats], [float(s["accuracy"]) for s in stats],
                             [s["fbeta"] for s in stats], thr)  # fmt: skip


class Saliency(Metric):
    """Saliency IoU, accuracy and max F-beta, see :func:`~crate_vis.metrics.saliency_scores`."""

    def __init__(self, thresholds: int | Sequence[float] = 255, binarize: float = 0.5, beta2: float = 0.3) -> None:
        self.thresholds = _thresholds(thresholds)
        self.binarize = binarize
        self.beta2 = beta2
        super().__init__()

    def reset(self) -> None:
        self.iou: list[float] = []
        self.accuracy: list[float] = []
        self.fbeta: list[np.ndarray] = []

    def update(self, preds: Any, targets: Any) -> None:
        for p, t in zip(*_pair(preds, targets)):
            s = _saliency_update(p, t, self.thresholds, self.binarize, self.beta2)
            self.iou.append(float(s["iou"]))
            self.accuracy.append(float(s["accuracy"]))
            self.fbeta.append(s["fbeta"])

    def compute(self) -> dict[str, Any]:
        return _saliency_compute(self.iou, self.accuracy, self.fbeta, self.thresholds)

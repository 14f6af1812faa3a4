"""DINO's foreground Jaccard: per image IoU of predicted vs ground-truth foreground, mean over images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from .base import Metric, _items, _pair, _safe_div, to_numpy
from .iou import _binary_update, _binary_validate_args

HEAD_CHOICES = ("mean", "union", "best")

__all__ = ['HEAD_CHOICES', 'fg_jaccard', 'FgJaccard']


def _as_heads(pred: Any, what: str = "prediction") -> np.ndarray:
    p = to_numpy(pred)
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3:
        raise ValueError(f"{what} must be (H, W) or (heads, H, W), got shape {p.shape}")
    if p.shape[0] == 0:
        raise ValueError(f"{what} has zero heads")
    return p


def _fg_jaccard_validate_args(pred: np.ndarray, target: np.ndarray, ignore: np.ndarray | None) -> None:
    if target.ndim != 2:
        raise ValueError(f"ground-truth foreground must be (H, W), got shape {target.shape}")
    _binary_validate_args(pred, target, ignore)


def _fg_jaccard_update(pred: Any, target: Any, ignore: Any = None, empty: float = 1.0) -> dict[str, np.ndarray]:
    """Per-image statistics: IoU of each head, and of the union of heads.

    Returns:
        ``{"head_iou": (heads,), "union_iou": ()}`` float64.
    """
    p = _as_heads(pred)
    t = to_numpy(target)
    ig = None if ignore is None else to_numpy(ignore)
    _fg_jaccard_validate_args(p, t, ig)
    inter, union, _ = _binary_update(p, t, ig)  # (heads,)
    any_head = cast(np.ndarray, p.astype(bool).any(0))  # (H, W); NumPy types a reduction as possibly a scalar
    u_inter, u_union, _ = _binary_update(any_head, t, ig)  # ()
    return {"head_iou": _safe_div(inter, union, empty), "union_iou": _safe_div(u_inter, u_union, empty)}


def _fg_jaccard_compute(head_iou: Sequence[np.ndarray], union_iou: Sequence[np.ndarray]) -> dict[str, Any]:
    """Average the per-image statistics over images.

    Returns:
        ``mean`` (per image the mean over heads of the head IoU), ``union`` (IoU of the union of the heads'
        masks), ``best`` (per image the best head: an oracle), ``per_head`` (each head's IoU averaged over images,
        when all images have the same number of heads; else ``None``), ``best_fixed_head`` (the head with the best
        ``per_head`` score, also chosen with the ground truth), ``n_images``.
    """
    n = len(head_iou)
    if n == 0:
        raise ValueError("no images were scored")
    per_image = {
        "mean": np.array([h.mean() for h in head_iou]),
        "union": np.array([float(u) for u in union_iou]),
        "best": np.array([h.max() for h in head_iou]),
    }
    out: dict[str, Any] = {k: float(v.mean()) for k, v in per_image.items()}
    heads = {h.shape[0] for h in head_iou}
    if len(heads) == 1:
        per_head = np.stack(head_iou).mean(0)
        out["per_head"] = per_head.tolist()
        out["best_fixed_head"] = int(per_head.argmax())
    else:
        out["per_head"] = None
        out["best_fixed_head"] = None
    out["per_image"] = {k: v.tolist() for k, v in per_image.items()}
    out["n_images"] = n
    return out


def fg_jaccard(
    preds: Sequence[Any], targets: Sequence[Any], ignores: Sequence[Any] | None = None, empty: float = 1.0
) -> dict[str, Any]:
    """Foreground/background Jaccard (DINO protocol) over a dataset.

    Per image, the predicted foreground mask of each head is compared with the ground-truth foreground (IoU over
    the pixels not ignored). Head choices, each averaged over images:

    * ``mean``: the mean over heads of each head's IoU;
    * ``union``: the IoU of the union of all heads' masks;
    * ``best``: the best head *for each image* -- an oracle, since it picks with the ground truth.

    A single ``(H, W)`` mask per image is one head; the three then coincide. When prediction and ground truth are
    both empty the IoU is ``empty`` (1 by default).

    Args:
        preds: per image ``(heads, H, W)`` or ``(H, W)`` masks.
        targets: per image ``(H, W)`` ground-truth foreground.
        ignores: per image ``(H, W)`` pixels to leave out (VOC void), or ``None``.
        empty: IoU of an empty prediction against an empty ground truth.

    Example:
        >>> gt = np.zeros((4, 4), bool); gt[:2] = True
        >>> heads = np.stack([gt, ~gt])
        >>> r = fg_jaccard([heads], [gt])
        >>> r["mean"], r["union"], r["best"]
        (0.5, 0.5, 1.0)
    """
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} ground truths")
    if ignores is not None and len(ignores) != len(targets):
        raise ValueError(f"{len(ignores)} ignore masks for {len(targets)} ground truths")
    stats = [
        _fg_jaccard_update(p, t, None if ignores is None else ignores[i], empty)
        for i, (p, t) in enumerate(zip(preds, targets))
    ]
    return _fg_jaccard_compute([s["head_iou"] for s in stats], [s["union_iou"] for s in stats])


class FgJaccard(Metric):
    """Foreground Jaccard (DINO protocol), see :func:`~crate_vis.metrics.fg_jaccard`.

    Args:
        empty: IoU when prediction and ground truth are both empty.
    """

    def __init__(self, empty: float = 1.0) -> None:
        self.empty = empty
        super().__init__()

    def reset(self) -> None:
        self.head_iou: list[np.ndarray] = []
        self.union_iou: list[np.ndarray] = []

    def update(self, preds: Any, targets: Any, ignores: Any = None) -> None:
        """Add a batch: per image ``(heads, H, W)`` or ``(H, W)`` predictions and ``(H, W)`` ground truth."""
        p, t = _pair(preds, targets)
        ig = [None] * len(t) if ignores is None else _items(ignores)
        for pi, ti, ii in zip(p, t, ig):
            s = _fg_jaccard_update(pi, ti, ii, self.empty)
            self.head_iou.append(s["head_iou"])
            self.union_iou.append(s["union_iou"])

    def compute(self) -> dict[str, Any]:
        return _fg_jaccard_compute(self.head_iou, self.union_iou)

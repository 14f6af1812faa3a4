"""The CRATE emergence paper's coarse-segmentation mIoU (Appendix B.3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import VOID, Metric, _pair, to_numpy
from .jaccard import _as_heads

__all__ = ['coarse_miou', 'CoarseMIoU']


def _coarse_miou_validate_args(masks: np.ndarray, labels: np.ndarray) -> None:
    if labels.ndim != 2:
        raise ValueError(f"labels must be (h, w), got shape {labels.shape}")
    if masks.shape[1:] != labels.shape:
        raise ValueError(
            f"head masks of size {masks.shape[1:]} for labels of size {labels.shape}: downsample the labels to the "
            "token grid first (ImageGeometry.labels_to_grid)"
        )


def _coarse_miou_update(
    masks: Any, labels: Any, include_background: bool = True, void: int = VOID
) -> dict[int, tuple[float, int]]:
    """One image: for each ground-truth class present, the best head's IoU and that head.

    Args:
        masks: ``(heads, h, w)`` (or ``(h, w)``) binary head masks at token resolution.
        labels: ``(h, w)`` labels at the same resolution; ``void`` cells are left out of every IoU.
        include_background: score class 0 as well (the paper's classes partition all tokens).
        void: the void label.

    Returns:
        ``{class: (best IoU, best head)}`` for each class present (ties: the lowest head index); the background
        (class 0) may also be the tokens no mask claims (head ``-1``), and with a single mask it is only that.
    """
    m = _as_heads(masks, "head masks").astype(bool)
    lab = to_numpy(labels).astype(np.int64)
    _coarse_miou_validate_args(m, lab)
    keep = lab != void
    m = m & keep  # void tokens count neither as predicted nor as ground truth
    out: dict[int, tuple[float, int]] = {}
    for c in np.unique(lab[keep]):
        if c == 0 and not include_background:
            continue
        s = lab == c  # (h, w)
        if c == 0:
            # A single predicted mask is foreground: the background is its complement, never the mask itself
            # (else an inverted mask would score like a perfect one). Several masks (heads) may each be the
            # background, as in the paper, and so may what none of them claims.
            unclaimed = ~m.any(0) & keep  # (h, w)
            cands = [unclaimed] if m.shape[0] == 1 else [*m, unclaimed]
            ious = [float((x & s).sum() / (x | s).sum()) for x in cands]
            k = int(np.argmax(ious))
            out[0] = (ious[k], -1 if k == len(cands) - 1 else k)
            continue
        inter = (m & s).sum((1, 2))  # (heads,)
        union = (m | s).sum((1, 2))  # (heads,)
        iou = inter / union  # union >= |s| > 0
        k = int(iou.argmax())
        out[int(c)] = (float(iou[k]), k)
    return out


def _coarse_miou_compute(per_image: Sequence[dict[int, tuple[float, int]]]) -> dict[str, Any]:
    """Mean over the classes of each image, then over images (images without a scored class are skipped).

    Returns:
        ``miou`` (the paper's number), ``per_class`` (each class's best-head IoU averaged over the images holding
        it: a diagnostic), ``head_counts`` (how often each head was the best), ``n_images`` (images with at least
        one class), ``n_skipped`` (images with none).
    """
    scored = [d for d in per_image if d]
    if not scored:
        raise ValueError("no image had a ground-truth class to score")
    image_means = np.array([np.mean([v[0] for v in d.values()]) for d in scored])
    per_class: dict[int, list[float]] = {}
    heads: dict[int, int] = {}
    for d in scored:
        for c, (iou, k) in d.items():
            per_class.setdefault(c, []).append(iou)
            if k >= 0:
                heads[k] = heads.get(k, 0) + 1
    return {
        "miou": float(image_means.mean()),
        "per_class": {c: float(np.mean(v)) for c, v in sorted(per_class.items())},
        "head_counts": dict(sorted(heads.items())),
        "n_images": len(scored),
        "n_skipped": len(per_image) - len(scored),
    }


def coarse_miou(
    masks: Sequence[Any], labels: Sequence[Any], include_background: bool = True, void: int = VOID
) -> dict[str, Any]:
    """Coarse-segmentation mIoU of the CRATE emergence paper (Yu et al. 2023, Appendix B.3, Eq. 13-14).

    Per image: the ground-truth label map is brought to the token grid (:meth:`~crate_vis.data.image_geometry.ImageGeometry.labels_to_grid`, majority vote
    per cell); for each class ``m`` present, ``IoU_m = max_k IoU(S_m, A_k)`` over the heads' binary masks ``A_k``
    (an **oracle**: the head is chosen per image and per class with the ground truth); the image's score is the
    mean over its classes; the result is the mean over images.

    Choices where the paper is silent: background (0) is one of the classes by default (the paper's classes
    partition the tokens). Its candidates are the heads' masks and the tokens no mask claims; a prediction of a
    single mask is a foreground, so its background is only its complement (the ground truth then scores 1 and its
    inverse 0). Void cells are left out of both masks; an image without any class is skipped and counted.

    Args:
        masks: per image ``(heads, h, w)`` binary head masks (e.g. each head's CLS attention, top 60% kept).
        labels: per image ``(h, w)`` labels at the same grid.
        include_background: score the background class.
        void: the void label.

    Example:
        >>> lab = np.array([[0, 1], [0, 1]])
        >>> heads = np.array([[[0, 1], [0, 1]], [[0, 0], [0, 1]]])
        >>> r = coarse_miou([heads], [lab])
        >>> r["miou"], r["per_class"]
        (1.0, {0: 1.0, 1: 1.0})
        >>> coarse_miou([~lab.astype(bool)], [lab])["miou"]
        0.0
    """
    if len(masks) != len(labels):
        raise ValueError(f"{len(masks)} predictions for {len(labels)} label maps")
    stats = [_coarse_miou_update(m, lab, include_background, void) for m, lab in zip(masks, labels)]
    return _coarse_miou_compute(stats)


class CoarseMIoU(Metric):
    """The CRATE emergence paper's coarse mIoU, see :func:`~crate_vis.metrics.coarse_miou`."""

    def __init__(self, include_background: bool = True, void: int = VOID) -> None:
        self.include_background = include_background
        self.void = void
        super().__init__()

    def reset(self) -> None:
        self.per_image: list[dict[int, tuple[float, int]]] = []

    def update(self, masks: Any, labels: Any) -> None:
        """Add a batch: per image ``(heads, h, w)`` head masks and ``(h, w)`` labels at token resolution."""
        for m, lab in zip(*_pair(masks, labels)):
            self.per_image.append(_coarse_miou_update(m, lab, self.include_background, self.void))

    def compute(self) -> dict[str, Any]:
        return _coarse_miou_compute(self.per_image)

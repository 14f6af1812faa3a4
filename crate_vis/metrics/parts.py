"""Do attention heads carry consistent semantic parts? Per-head scores on tensors.

A head is *consistent* when, across images, it attends to the same kind of region. Two families of scores:

* **With ground truth** (object masks on the patch grid): the mean over images of the IoU between the head's
  thresholded mask (DINO-style, see :func:`crate_vis.segmentation.dino.dino_masks`) and the object, and the share of
  the head's attention that falls inside the object ("mass inside").
* **Without ground truth**: the stability of the feature centroid the head attends to. Per image, the centroid is
  the attention-weighted mean of the unit-length patch features *minus their plain mean over the image*: what the
  head selects, relative to the image as a whole. The subtraction removes the component every token shares (which
  would make all centroids look alike) and sends a head that attends uniformly to the zero vector. The score is the
  mean pairwise cosine similarity of a head's centroids over images, in ``[-1, 1]``: close to 1 when the head always
  picks the same kind of features, near 0 when it picks arbitrary ones (or none).

The part map assigns each patch to the head that attends to it most. Heads are compared on their attention
*distributions* (each head's map divided by its sum over the patches), since raw CLS attention also flows to the
CLS token in head-dependent amounts. Its normalised entropy summarises how evenly heads share an image.

All functions take a leading batch shape ``...`` unless said otherwise; lists of per-image tensors handle images
whose patch grids differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np
import torch

from .attention_mass import attention_mass_inside, attention_mass_stats
from .base import Metric, _pair
from .iou import mask_iou_per_head

__all__ = [
    "head_distributions", "part_assignment", "attended_centroids", "centroid_consistency", "part_entropy",
    "HeadScores", "head_consistency", "head_part_scores", "HeadPartScore",
]  # fmt: skip

_EPS = 1e-12


def head_distributions(attn: torch.Tensor) -> torch.Tensor:
    """Each head's map divided by its sum over the patches: ``(..., K, gh, gw)`` -> same shape, sums of 1."""
    a = attn.float().clamp_min(0)
    total = a.sum(dim=(-2, -1), keepdim=True)  # (..., K, 1, 1)
    if (total <= 0).any():
        raise ValueError("a head's attention over the patches sums to zero: nothing to normalise")
    return a / total


def part_assignment(attn: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """The part map: each patch labelled with the head that attends to it most.

    Args:
        attn: ``(..., K, gh, gw)`` CLS attention of ``K`` heads.
        masks: optional ``(..., K, gh, gw)`` bool "confident" regions (e.g. DINO masks): a head competes for a patch
            only where its mask holds, and patches in no head's mask get ``-1`` (background).

    Returns:
        ``(..., gh, gw)`` int64 labels in ``0..K-1`` (indices into the ``K`` heads given), ``-1`` for background.
    """
    p = head_distributions(attn)  # (..., K, gh, gw)
    if masks is None:
        return p.argmax(dim=-3)
    if masks.shape != attn.shape:
        raise ValueError(f"masks {tuple(masks.shape)} do not match attention {tuple(attn.shape)}")
    m = masks.bool()
    p = p.masked_fill(~m, -1.0)  # distributions are >= 0, so a masked-out head never wins where another is in
    labels = p.argmax(dim=-3)  # (..., gh, gw)
    return labels.masked_fill(~m.any(dim=-3), -1)


def attended_centroids(attn: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """What each head selects: ``sum_n (a_n - 1/N) f_n`` over unit-length patch features ``f_n``.

    Args:
        attn: ``(..., K, gh, gw)`` or ``(..., K, N)`` attention over the ``N`` patch tokens (renormalised here).
        features: ``(..., N, D)`` patch features in the same (row-major) token order.

    Returns:
        ``(..., K, D)`` centroids relative to the image's mean feature (zero for uniform attention).
    """
    a = attn.flatten(-2) if attn.dim() == features.dim() + 1 else attn  # grid form -> (..., K, N)
    if a.shape[-1] != features.shape[-2]:
        raise ValueError(f"attention over {a.shape[-1]} tokens but {features.shape[-2]} feature tokens")
    f = features.double()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(_EPS)  # (..., N, D)
    w = a.double().clamp_min(0)
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(_EPS)  # (..., K, N)
    w = w - 1.0 / w.shape[-1]  # relative to the uniform average
    return torch.matmul(w, f).float()  # (..., K, D)


def centroid_consistency(centroids: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of each head's centroids across images.

    Args:
        centroids: ``(B, K, D)`` for ``B >= 2`` images.

    Returns:
        ``(K,)`` in ``[-1, 1]``; NaN when ``B < 2``.
    """
    b, k, _ = centroids.shape
    if b < 2:
        return torch.full((k,), float("nan"))
    u = centroids.double()
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(_EPS)  # (B, K, D)
    s = u.sum(dim=0)  # (K, D)
    # sum_{i != j} <u_i, u_j> = |sum u|^2 - sum |u_i|^2; every |u_i| is 1, or 0 for a vanishing centroid, which
    # then counts as dissimilar to everything.
    self_sim = (u * u).sum(dim=(0, 2))  # (K,)
    return ((s * s).sum(dim=-1) - self_sim) / (b * (b - 1))


def part_entropy(labels: torch.Tensor, num_parts: int) -> torch.Tensor:
    """Normalised entropy of the part shares of each part map (background ``-1`` ignored).

    Args:
        labels: ``(..., gh, gw)`` part labels.
        num_parts: ``K``.

    Returns:
        ``(...)`` in ``[0, 1]``: 0 when a single head takes every labelled patch, 1 when all ``K`` share evenly;
        NaN when nothing is labelled (or ``K == 1``).
    """
    flat = labels.flatten(-2)  # (..., N)
    counts = torch.stack([(flat == k).sum(dim=-1) for k in range(num_parts)], dim=-1).double()  # (..., K)
    total = counts.sum(dim=-1, keepdim=True)
    p = counts / total.clamp_min(1)
    h = -(p * torch.log(p.clamp_min(_EPS))).sum(dim=-1)
    h = h / math.log(num_parts) if num_parts > 1 else torch.full_like(h, float("nan"))
    return torch.where(total.squeeze(-1) > 0, h, torch.full_like(h, float("nan")))


@dataclass
class HeadScores:
    """Per-head consistency scores over a set of images.

    Attributes:
        head_ids: the heads scored.
        scores: name -> ``(K,)`` array: ``"iou"`` and ``"mass_in"`` (with ground truth), ``"consistency"`` (feature
            centroids), ``"area"`` (mean fraction of the image in the head's mask: close to the mask's attention
            mass for a head that attends uniformly, i.e. selects nothing), ``"share"`` (mean share of the part map).
        per_image: name -> ``(B, K)`` per-image values behind the means (NaN where undefined).
        num_images: images used.
        entropy: mean normalised part-map entropy (see :func:`part_entropy`), or NaN.
    """

    head_ids: list[int]
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    per_image: dict[str, np.ndarray] = field(default_factory=dict)
    num_images: int = 0
    entropy: float = float("nan")

    def table(self, title: str | None = None) -> str:
        """A plain-text table: one row per head, one column per score."""
        names = list(self.scores)
        head = ["head"] + names
        rows = [[str(h)] + [_cell(self.scores[n][i]) for n in names] for i, h in enumerate(self.head_ids)]
        widths = [max(len(r[c]) for r in [head] + rows) for c in range(len(head))]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        lines = [title] if title else []
        lines += [fmt.format(*head), fmt.format(*["-" * w for w in widths])]
        lines += [fmt.format(*r) for r in rows]
        lines.append(f"({self.num_images} images; part-map entropy {_cell(self.entropy)})")
        return "\n".join(lines)

    def rows(self) -> list[dict[str, float | int]]:
        """One dict per head (for CSV/JSON)."""
        return [
            {"head": int(h), **{n: float(v[i]) for n, v in self.scores.items()}} for i, h in enumerate(self.head_ids)
        ]


def _cell(v: float) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.3f}"


def _nanmean(x: torch.Tensor) -> np.ndarray:
    a = x.double().numpy()
    valid = np.isfinite(a)
    count = valid.sum(axis=0)
    total = np.where(valid, a, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def head_consistency(
    attn: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor] | None = None,
    features: Sequence[torch.Tensor] | None = None,
    gt: Sequence[torch.Tensor | None] | None = None,
    head_ids: Sequence[int] | None = None,
) -> HeadScores:
    """Score every head over a set of images.

    Args:
        attn: per image ``(K, gh, gw)`` CLS attention (grids may differ between images).
        masks: per image ``(K, gh, gw)`` bool thresholded masks (needed for ``iou``; also restrict the part map).
        features: per image ``(gh * gw, D)`` patch features of the same layer (for ``consistency``).
        gt: per image ``(gh, gw)`` bool object mask, or ``None`` for an image without annotation.
        head_ids: labels of the ``K`` heads (default ``0..K-1``).

    Returns:
        :class:`HeadScores`.
    """
    if not attn:
        raise ValueError("no images to score")
    k = attn[0].shape[0]
    if any(a.shape[0] != k for a in attn):
        raise ValueError("every image must have the same number of heads")
    for name, seq in (("masks", masks), ("features", features), ("gt", gt)):
        if seq is not None and len(seq) != len(attn):
            raise ValueError(f"{len(seq)} {name} for {len(attn)} images")
    out = HeadScores(list(range(k)) if head_ids is None else [int(h) for h in head_ids], num_images=len(attn))
    if len(out.head_ids) != k:
        raise ValueError(f"{len(out.head_ids)} head ids for {k} heads")

    if gt is not None:
        ious, inside = [], []
        for i, (a, g) in enumerate(zip(attn, gt)):
            if g is None:
                ious.append(torch.full((k,), float("nan"), dtype=torch.float64))
                inside.append(torch.full((k,), float("nan"), dtype=torch.float64))
                continue
            if tuple(g.shape) != tuple(a.shape[-2:]):
                raise ValueError(f"image {i}: ground truth {tuple(g.shape)} but attention grid {tuple(a.shape[-2:])}")
            if masks is not None:
                ious.append(mask_iou_per_head(masks[i], g))
            inside.append(attention_mass_inside(a, g))
        if masks is not None:
            out.per_image["iou"] = torch.stack(ious).numpy()
            out.scores["iou"] = _nanmean(torch.stack(ious))
        out.per_image["mass_in"] = torch.stack(inside).numpy()
        out.scores["mass_in"] = _nanmean(torch.stack(inside))

    if features is not None:
        cents = torch.stack([attended_centroids(a, f) for a, f in zip(attn, features)])  # (B, K, D)
        out.scores["consistency"] = centroid_consistency(cents).numpy()

    if masks is not None:
        # How much of the image a head's mask takes: near ``mass`` for a head attending uniformly, small for a
        # focused one. Feature consistency only means something for heads that select (small area).
        out.per_image["area"] = torch.stack([m.flatten(-2).double().mean(dim=-1) for m in masks]).numpy()
        out.scores["area"] = out.per_image["area"].mean(axis=0)

    labels = [part_assignment(a, None if masks is None else masks[i]) for i, a in enumerate(attn)]
    shares = []
    for lab in labels:
        valid = lab >= 0
        n = max(int(valid.sum()), 1)
        shares.append(torch.stack([(lab == j).sum() / n for j in range(k)]).double())
    out.per_image["share"] = torch.stack(shares).numpy()
    out.scores["share"] = out.per_image["share"].mean(axis=0)
    ent = torch.stack([part_entropy(lab, k) for lab in labels])
    out.entropy = float(_nanmean(ent.unsqueeze(-1))[0])
    return out


# ------------------------------------------------------------------------ per-head part scores over a dataset
class _PartStats(TypedDict):
    inside: np.ndarray  # (heads,)
    total: np.ndarray  # (heads,)
    fg_area: np.float64
    area: np.float64


def _part_update(attn: Any, fg: Any) -> _PartStats:
    """One image: attention mass inside the objects and in total per head, and the foreground area.

    Returns:
        ``inside (heads,)``, ``total (heads,)``, ``fg_area ()``, ``area ()`` (float64).
    """
    f = np.asarray(fg.detach().cpu() if hasattr(fg, "detach") else fg, dtype=np.float64)
    a = attn.detach().cpu() if hasattr(attn, "detach") else np.asarray(attn)
    if np.ndim(a) != 3:
        raise ValueError(f"attention must be (heads, h, w), got shape {np.shape(a)}")
    inside, total = attention_mass_stats(a, f)
    return {"inside": inside.numpy(), "total": total.numpy(), "fg_area": np.float64(f.sum()), "area": np.float64(f.size)}


def _part_compute(inside: np.ndarray | float, total: np.ndarray | float, fg_area: float, area: float) -> dict[str, Any]:
    """Pooled ratio per head and the chance level (the foreground share of all cells)."""
    if (np.asarray(total) <= 0).any():
        raise ValueError("a head has no attention mass over the dataset")
    score = np.asarray(inside) / np.asarray(total)
    return {"per_head": score.tolist(), "chance": float(fg_area / area), "ranking": np.argsort(-score).tolist()}


def head_part_scores(attn: Sequence[Any], fg: Sequence[Any]) -> dict[str, Any]:
    """Per head, the fraction of its attention mass that falls inside ground-truth objects, over a dataset.

    ``score_k = sum_images sum_cells A_k * F / sum_images sum_cells A_k`` with ``A_k`` the head's attention map and
    ``F`` the ground-truth foreground at the map's resolution (bool, or the fraction of foreground pixels per cell
    from :func:`mask_to_grid`). ``chance`` is the foreground share of all cells: a head spreading its mass
    uniformly scores it.

    Args:
        attn: per image ``(heads, h, w)`` non-negative maps (e.g. CLS attention).
        fg: per image ``(h, w)`` foreground in [0, 1].

    Example:
        >>> a = np.array([[[0.5, 0.5], [0, 0]], [[0.25, 0.25], [0.25, 0.25]]])
        >>> f = np.array([[1, 1], [0, 0]])
        >>> head_part_scores([a], [f])
        {'per_head': [1.0, 0.5], 'chance': 0.5, 'ranking': [0, 1]}
    """
    if len(attn) != len(fg):
        raise ValueError(f"{len(attn)} attention maps for {len(fg)} foreground masks")
    if not attn:
        raise ValueError("no images were scored")
    stats = [_part_update(a, f) for a, f in zip(attn, fg)]
    if len({s["inside"].shape for s in stats}) > 1:
        raise ValueError("all images must have the same number of heads")
    return _part_compute(
        sum(s["inside"] for s in stats), sum(s["total"] for s in stats),
        float(sum(s["fg_area"] for s in stats)), float(sum(s["area"] for s in stats)),
    )  # fmt: skip


class HeadPartScore(Metric):
    """Per-head attention mass inside objects, see :func:`~crate_vis.metrics.head_part_scores`."""

    def reset(self) -> None:
        self.inside: np.ndarray | None = None
        self.total: np.ndarray | None = None
        self.fg_area = 0.0
        self.area = 0.0

    def update(self, attn: Any, fg: Any) -> None:
        """Add a batch: per image ``(heads, h, w)`` attention and ``(h, w)`` foreground in [0, 1]."""
        for a, f in zip(*_pair(attn, fg)):
            s = _part_update(a, f)
            if self.inside is None:
                self.inside, self.total = s["inside"].copy(), s["total"].copy()
            elif s["inside"].shape != self.inside.shape:
                raise ValueError(f"{s['inside'].shape[0]} heads after {self.inside.shape[0]}")
            else:
                self.inside += s["inside"]
                self.total += s["total"]
            self.fg_area += float(s["fg_area"])
            self.area += float(s["area"])

    def compute(self) -> dict[str, Any]:
        if self.inside is None or self.total is None:
            raise ValueError("no images were scored")
        return _part_compute(self.inside, self.total, self.fg_area, self.area)

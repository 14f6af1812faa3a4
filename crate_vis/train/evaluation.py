"""Evaluate a classifier: top-1, top-k, per-class accuracy and the confusion matrix, with a report folder.

Top-k is capped at the number of classes (top-5 of a 2-class problem is top-2, which is always 100%).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..io.atomic import atomic_write, atomic_write_json

__all__ = ["EvalResult", "confusion_matrix", "evaluate_model", "write_eval_report"]

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Classification metrics of one evaluation.

    Attributes:
        classes: class names in label order.
        confusion: ``(C, C)`` int64 counts; ``confusion[t, p]`` = images of true class ``t`` predicted as ``p``.
        top1: top-1 accuracy (%).
        topk: top-``k`` accuracy (%).
        k: the ``k`` used (``min(5, C)``).
        loss: mean cross-entropy.
        num_images: images evaluated.
        skipped: ``(path, reason)`` of unreadable images.
    """

    classes: list[str]
    confusion: np.ndarray
    top1: float
    topk: float
    k: int
    loss: float
    num_images: int
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def per_class(self) -> list[dict[str, Any]]:
        """``{"class", "images", "correct", "accuracy"}`` per class (accuracy in %, ``None`` for an empty class)."""
        rows = []
        for i, name in enumerate(self.classes):
            total = int(self.confusion[i].sum())
            correct = int(self.confusion[i, i])
            rows.append({"class": name, "images": total, "correct": correct,
                         "accuracy": 100.0 * correct / total if total else None})  # fmt: skip
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        return {
            "num_images": self.num_images, "top1": self.top1, f"top{self.k}": self.topk, "k": self.k,
            "loss": self.loss, "classes": self.classes, "per_class": self.per_class,
            "confusion": self.confusion.tolist(), "skipped": [list(s) for s in self.skipped],
        }  # fmt: skip

    def table(self) -> str:
        """Per-class accuracy as a plain-text table."""
        width = max([len("class")] + [len(c) for c in self.classes])
        lines = [f"{'class':<{width}}  {'images':>6}  {'correct':>7}  {'accuracy':>8}"]
        for row in self.per_class:
            acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.2f}%"
            lines.append(f"{row['class']:<{width}}  {row['images']:>6}  {row['correct']:>7}  {acc:>8}")
        return "\n".join(lines)


def confusion_matrix(target: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` counts with true labels on rows and predictions on columns (scikit-learn's convention)."""
    flat = target.astype(np.int64) * num_classes + pred.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    batches: Iterable[Any],
    classes: Sequence[str],
    device: str | torch.device = "cpu",
    amp: str = "none",
    progress: bool = False,
) -> EvalResult:
    """Run ``model`` over ``batches`` and collect the metrics.

    Args:
        model: classifier returning ``(B, C)`` logits with ``C == len(classes)``; a CRATE-MAE (a masked
            autoencoder, no classifier) is refused with :class:`~crate_vis.errors.UsageError`.
        batches: iterable of ``(images, labels)`` or ``(images, labels, skipped)`` (a loader built with
            :func:`~crate_vis.data.folders.collate_skip_bad`).
        classes: class names.
        device: where to run.
        amp: ``none`` or ``bf16`` autocast.
        progress: show a progress bar.
    """
    from ..models.registry import family_of

    if family_of(model) == "crate_mae":
        raise UsageError(
            f"{getattr(model, 'model_name', None) or 'this model'} is a CRATE-MAE, a masked autoencoder without a "
            "classifier: it has no top-1 to evaluate (see its reconstructions with crate-vis reconstruct, or fine-tune "
            "a classifier from it)"
        )
    device = torch.device(device)
    c = len(classes)
    k = min(5, c)
    model.eval()
    confusion = np.zeros((c, c), dtype=np.int64)
    topk_hits, loss_sum, n = 0, 0.0, 0
    skipped: list[tuple[str, str]] = []
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
    from tqdm.auto import tqdm

    for batch in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False):
        images, labels = batch[0], batch[1]
        if len(batch) > 2:
            skipped += list(batch[2])
        if images.numel() == 0:
            continue
        images, labels = images.to(device), labels.to(device)
        with ctx:
            logits = model(images).float()  # (B, C)
        if logits.shape[1] != c:
            raise ValueError(f"the model has {logits.shape[1]} outputs but the data has {c} classes ({', '.join(classes)})")
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(k, dim=1).indices  # (B, k)
        topk_hits += int(top.eq(labels[:, None]).any(dim=1).sum())
        confusion += confusion_matrix(labels.cpu().numpy(), top[:, 0].cpu().numpy(), c)
        n += labels.shape[0]
    for path, reason in skipped:
        log.warning("skipped unreadable image %s: %s", path, reason)
    if n == 0:
        raise ValueError("no image could be evaluated" + (f" ({len(skipped)} unreadable)" if skipped else ""))
    return EvalResult(
        classes=list(classes), confusion=confusion, top1=100.0 * np.trace(confusion) / n, topk=100.0 * topk_hits / n,
        k=k, loss=loss_sum / n, num_images=n, skipped=skipped,
    )  # fmt: skip


def write_eval_report(result: EvalResult, out_dir: str | os.PathLike[str], title: str = "") -> dict[str, Path]:
    """Write ``metrics.json``, ``per_class.csv`` and ``confusion.png`` into ``out_dir`` (atomically)."""
    from .plots import plot_confusion

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "per_class": out / "per_class.csv", "confusion": out / "confusion.png"}
    atomic_write_json(paths["metrics"], result.to_dict(), indent=2)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["class", "images", "correct", "accuracy"], lineterminator="\n")
    writer.writeheader()
    for row in result.per_class:
        writer.writerow({**row, "accuracy": "" if row["accuracy"] is None else f"{row['accuracy']:.4f}"})
    with atomic_write(paths["per_class"], "w", newline="") as fh:
        fh.write(buf.getvalue())
    plot_confusion(result.confusion, result.classes, paths["confusion"],
                   title=title or f"top-1 {result.top1:.2f}% ({result.num_images} images)")  # fmt: skip
    return paths

"""Figures of a run: loss / accuracy curves and confusion matrices, written atomically as PNG."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io.atomic import atomic_save

__all__ = ["plot_curves", "plot_confusion"]


def _figure(*args: Any, **kwargs: Any) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, safe in threads and notebooks

    return Figure(*args, **kwargs)


def _values(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if value is None or value == "" or (isinstance(value, float) and not np.isfinite(value)):
            continue
        xs.append(float(row["epoch"]))
        ys.append(float(value))
    return xs, ys


def plot_curves(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str = "", num_classes: int | None = None
) -> Path:
    """Loss (train, val) and accuracy (train, val top-1, val top-5) against epoch, side by side.

    Args:
        rows: per-epoch metric rows (keys of the metrics CSV).
        path: PNG to write.
        title: figure title (e.g. the model name).
        num_classes: with 5 classes or fewer, top-5 is always 100% and is not drawn.
    """
    fig = _figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        xs, ys = _values(rows, key)
        if xs:
            ax_loss.plot(xs, ys, marker="o", markersize=3, label=label)
    acc_keys = [("train_acc", "train (augmented)"), ("val_top1", "val top-1")]
    if num_classes is None or num_classes > 5:
        acc_keys.append(("val_top5", "val top-5"))
    for key, label in acc_keys:
        xs, ys = _values(rows, key)
        if xs:
            ax_acc.plot(xs, ys, marker="o", markersize=3, label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy", ylim=(0, 102))
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    atomic_save(out, lambda tmp: fig.savefig(tmp, format="png"))
    return out


def plot_confusion(
    matrix: np.ndarray, classes: Sequence[str], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Row-normalised confusion matrix (true class per row), with counts written in cells for up to 30 classes.

    Args:
        matrix: ``(C, C)`` counts, ``matrix[t, p]`` = images of true class ``t`` predicted as ``p``.
        classes: class names.
        path: PNG to write.
        title: figure title.
    """
    c = matrix.shape[0]
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)  # (C, C) row fractions
    side = min(3 + 0.45 * c, 20)
    fig = _figure(figsize=(side + 1.5, side), dpi=100)
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if c <= 30:
        ax.set_xticks(range(c), labels=list(classes), rotation=60, ha="right")
        ax.set_yticks(range(c), labels=list(classes))
        for t in range(c):
            for p in range(c):
                ax.text(p, t, str(int(matrix[t, p])), ha="center", va="center", fontsize=8,
                        color="white" if norm[t, p] > 0.5 else "black")  # fmt: skip
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    fig.tight_layout()
    out = Path(path)
    atomic_save(out, lambda tmp: fig.savefig(tmp, format="png"))
    return out

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
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str = "", num_classes: int | None = None,
    *, loss_label: str = "cross-entropy", accuracy: bool = True,
) -> Path:
    """Loss (train, val) and accuracy (train, val top-1, val top-5) against epoch, side by side.

    Args:
        rows: per-epoch metric rows (keys of the metrics CSV).
        path: PNG to write.
        title: figure title (e.g. the model name).
        num_classes: with 5 classes or fewer, top-5 is always 100% and is not drawn.
        loss_label: what the loss is (the y-axis label).
        accuracy: draw the accuracy panel (``False`` for masked autoencoding: the loss panel alone).

    Example:
        >>> import tempfile, pathlib
        >>> rows = [{"epoch": 1, "train_loss": 0.9, "val_loss": 0.8}, {"epoch": 2, "train_loss": 0.7, "val_loss": 0.75}]
        >>> plot_curves(rows, pathlib.Path(tempfile.mkdtemp()) / "c.png", accuracy=False).name
        'c.png'
    """
    fig = _figure(figsize=(10, 4) if accuracy else (5.5, 4), dpi=100)
    if accuracy:
        ax_loss, ax_acc = fig.subplots(1, 2)
    else:
        ax_loss, ax_acc = fig.subplots(1, 1), None
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        xs, ys = _values(rows, key)
        if xs:
            ax_loss.plot(xs, ys, marker="o", markersize=3, label=label)
    ax_loss.set(xlabel="epoch", ylabel=loss_label, title="loss")
    axes = [ax_loss]
    if ax_acc is not None:
        acc_keys = [("train_acc", "train (augmented)"), ("val_top1", "val top-1")]
        if num_classes is None or num_classes > 5:
            acc_keys.append(("val_top5", "val top-5"))
        for key, label in acc_keys:
            xs, ys = _values(rows, key)
            if xs:
                ax_acc.plot(xs, ys, marker="o", markersize=3, label=label)
        ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy", ylim=(0, 102))
        axes.append(ax_acc)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
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

"""What every metric shares: the accumulating base class and array helpers.

Each metric is one module with a functional core, as torchmetrics structures them: ``_<metric>_validate_args``
(clear errors for bad input), ``_<metric>_update`` (the *sufficient statistics* of one image or batch, small and
mergeable) and ``_<metric>_compute`` (the number from accumulated statistics); the public function chains them for
one call and a thin :class:`Metric` subclass accumulates the statistics across calls. Arrays may be numpy arrays or
torch tensors; statistics are numpy float64/int64.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

__all__ = ["Metric", "VOID", "to_numpy"]

VOID = 255


def to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like or a (possibly CUDA, grad-tracking) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _safe_div(num: np.ndarray | float, den: np.ndarray | float, empty: float) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, float(empty))
    np.divide(num, den, out=out, where=den > 0)
    return out


def _items(batch: Any) -> list[Any]:
    """Per-image items of a batch (a list, tuple, array or tensor with the image on the first axis)."""
    if batch is None:
        raise ValueError("a batch may not be None")
    return list(batch)


def _pair(preds: Any, targets: Any) -> tuple[list[Any], list[Any]]:
    p, t = _items(preds), _items(targets)
    if len(p) != len(t):
        raise ValueError(f"{len(p)} predictions for {len(t)} targets in a batch")
    return p, t


class Metric(abc.ABC):
    """Base of the accumulating metrics."""

    def __init__(self) -> None:
        self.reset()

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything accumulated."""

    @abc.abstractmethod
    def update(self, *args: Any, **kwargs: Any) -> None:
        """Add a batch."""

    @abc.abstractmethod
    def compute(self) -> Any:
        """The metric over everything added since the last reset."""

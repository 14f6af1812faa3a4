"""How much of a head's attention falls on the object: the one definition used by every score and figure.

For a head's non-negative attention ``A`` over the patches and the object's coverage ``F`` of each patch (bool, or
the fraction of object pixels in the patch, in ``[0, 1]``)::

    mass_inside = sum_patches A * F / sum_patches A

A head spreading its mass uniformly scores the object's share of the patches (the chance level); a head attending
only to the object scores 1.

Example:
    >>> import torch
    >>> a = torch.tensor([[[0.5, 0.5], [0.0, 0.0]], [[0.25, 0.25], [0.25, 0.25]]])  # (K=2, 2, 2)
    >>> f = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    >>> attention_mass_inside(a, f).tolist()
    [1.0, 0.5]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["attention_mass_stats", "attention_mass_inside"]


def _tensor(x: Any) -> torch.Tensor:
    return x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def attention_mass_stats(attn: Any, fg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The sufficient statistics: attention mass on the object and in total, per head.

    Args:
        attn: ``(..., K, gh, gw)`` non-negative attention (numpy or torch).
        fg: ``(..., gh, gw)`` object coverage in ``[0, 1]`` (bool or float).

    Returns:
        ``(inside, total)``, each ``(..., K)`` float64.

    Raises:
        ValueError: negative attention, coverage outside ``[0, 1]``, or mismatched grids.
    """
    a = _tensor(attn).double()
    f = _tensor(fg).double()
    if a.dim() < 3:
        raise ValueError(f"attention must be (..., heads, h, w), got shape {tuple(a.shape)}")
    if tuple(f.shape[-2:]) != tuple(a.shape[-2:]):
        raise ValueError(
            f"object coverage of size {tuple(f.shape[-2:])} for attention maps of size {tuple(a.shape[-2:])}: bring "
            "it to the grid first (ImageGeometry.mask_fraction)"
        )
    if bool((a < 0).any()):
        raise ValueError("attention maps must be non-negative")
    if f.numel() and (float(f.min()) < 0 or float(f.max()) > 1):
        raise ValueError("object coverage must lie in [0, 1]")
    inside = (a * f.unsqueeze(-3)).sum(dim=(-2, -1))  # (..., K)
    return inside, a.sum(dim=(-2, -1))


def attention_mass_inside(attn: Any, fg: Any) -> torch.Tensor:
    """The share of each head's attention that falls on the object: ``(..., K)`` in ``[0, 1]``.

    NaN where the image has no object (``fg`` all zero) or a head has no attention mass.
    """
    inside, total = attention_mass_stats(attn, fg)
    has_object = (_tensor(fg).double().flatten(-2).sum(dim=-1) > 0).unsqueeze(-1)  # (..., 1)
    ok = has_object & (total > 0)
    return torch.where(ok, inside / total.clamp_min(1e-300), torch.full_like(inside, float("nan")))

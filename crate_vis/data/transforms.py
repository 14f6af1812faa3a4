"""Normalisation of model inputs (ImageNet statistics) and its inverse for drawing; the geometry of a model input
is :mod:`crate_vis.data.image_geometry`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "to_tensor", "denormalize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(
    image: Image.Image, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor ``(3, H, W)``."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    x = torch.from_numpy(arr).permute(2, 0, 1)  # (3, H, W)
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x - m) / s


def denormalize(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """Normalised ``(3, H, W)`` tensor -> ``(H, W, 3)`` uint8 array for drawing."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    arr = ((x * s + m).clamp(0, 1) * 255).round().byte().permute(1, 2, 0)  # (H, W, 3)
    return arr.cpu().numpy()

"""Token geometry read from a model: patch size, grid and prefix-token count, for CRATE and timm ViTs alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .crate import CRATE, layer_index, to_2tuple

__all__ = [
    "TokenGeometry", "token_geometry", "model_input_size", "model_patch_size", "num_prefix_tokens", "layer_index",
]  # fmt: skip


class ViTLike(Protocol):
    """The trunk methods CRATE-family models and timm ViTs share, for code that holds either as an ``nn.Module``."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...


@dataclass(frozen=True)
class TokenGeometry:
    """How the tokens of one input are laid out.

    Attributes:
        patch_size: ``(ph, pw)`` pixels per patch.
        grid: ``(gh, gw)`` patches.
        num_prefix_tokens: tokens before the patch tokens (CLS, registers, distillation).
    """

    patch_size: tuple[int, int]
    grid: tuple[int, int]
    num_prefix_tokens: int

    @property
    def num_patches(self) -> int:
        """Number of patch tokens ``gh * gw``."""
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        """All tokens, prefix included."""
        return self.num_prefix_tokens + self.num_patches

    @property
    def image_size(self) -> tuple[int, int]:
        """Pixels covered by the grid ``(gh * ph, gw * pw)``."""
        return self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1]


def model_patch_size(model: nn.Module) -> tuple[int, int]:
    """Patch size of a CRATE or timm ViT-like model."""
    if isinstance(model, CRATE):
        return model.patch_size
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and hasattr(patch_embed, "patch_size"):
        return to_2tuple(patch_embed.patch_size)
    raise TypeError(f"cannot read the patch size of {type(model).__name__}: it has no patch_embed.patch_size")


def model_input_size(model: nn.Module) -> int:
    """The short side a model was trained at (CRATE ``image_size``, timm ``patch_embed.img_size``); 224 if unknown."""
    size = getattr(model, "image_size", None)
    if size is None:
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        return 224
    return int(min(size)) if isinstance(size, (tuple, list)) else int(size)


def num_prefix_tokens(model: nn.Module) -> int:
    """CLS/register/distillation tokens in front of the patch tokens."""
    n = getattr(model, "num_prefix_tokens", None)
    if n is None:
        raise TypeError(f"cannot read the prefix-token count of {type(model).__name__}")
    return int(n)


def token_geometry(model: nn.Module, image_hw: Sequence[int]) -> TokenGeometry:
    """Token geometry of ``model`` for an input of ``image_hw = (H, W)`` pixels.

    Raises:
        ValueError: when the image is smaller than a patch or not divisible by it.
    """
    ph, pw = model_patch_size(model)
    h, w = int(image_hw[0]), int(image_hw[1])
    if h < ph or w < pw:
        raise ValueError(f"image of {h}x{w} px is smaller than one {ph}x{pw} patch")
    if isinstance(model, CRATE):
        grid = model.feature_grid(h, w)
    else:
        if h % ph or w % pw:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        grid = (h // ph, w // pw)
    return TokenGeometry((ph, pw), grid, num_prefix_tokens(model))


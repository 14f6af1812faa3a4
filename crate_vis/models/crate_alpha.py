"""CRATE-alpha: CRATE with an overcomplete, decoupled sparse-coding block and a residual around it.

One layer is ``Z_half = Z + MSSA(LN(Z))`` followed by ``Z_next = Z_half + ODL(LN(Z_half))``:

* **MSSA**: CRATE's multi-head subspace self-attention (:class:`crate_vis.models.crate.MSSA`), one projection per
  head serving as query, key and value, here with an output projection without bias.
* **ODL** (overcomplete dictionary learning): two ISTA steps from ``z0 = 0`` toward a sparse code of ``x`` under an
  overcomplete dictionary ``D`` of shape ``(dim, ratio * dim)``, then synthesis with a second dictionary ``D1`` of
  the same shape::

      z1  = ReLU(eta * D^T x - eta * lambda)
      z2  = ReLU(z1 - eta * D^T (D z1 - x) - eta * lambda)
      out = D1 z2

The numerics follow the official PyTorch implementation, ``torch_inference/model/crate_alpha.py`` of
UCSC-VLAA/CRATE-alpha (commit edbd624): a ``Conv2d`` patch embedding with bias, learned CLS token and position
embedding, pre-norm LayerNorms with ``eps=1e-6``, no final norm after the last layer, and a head
``LayerNorm(eps=1e-5) -> Linear`` on the CLS token. Dropout sits where the reference puts it: on the attention weights
and after the attention's output projection; the sparse-coding block has none. Published checkpoints
(``crate_alpha_B16.pth``, ``crate_alpha_L14.pth``: bare state dicts) are renamed through the explicit key table
:data:`crate_vis.models.conversion.OFFICIAL_TO_CRATE_VIS_ALPHA` when :func:`crate_vis.load_checkpoint` reads them.

Differences from the reference, all of which leave its outputs at the training size unchanged:

* **Other input sizes.** The reference adds ``pos_embedding[:, :N + 1]``, the first ``N + 1`` rows, whatever the grid:
  for a smaller or non-square grid the patches get the positions of other patches (the first rows of the training
  grid, in raster order), and a larger grid fails. Here the patch part is resampled bicubically to the input grid
  with :func:`crate_vis.models.crate.resample_pos_embed` and the CLS row is kept, as DINO and timm do.
* ``emb_dropout`` is applied after the position embedding (as in CRATE and in the JAX training code); the reference
  builds this dropout but never calls it. Its default, and every published configuration, is 0.
* ``channels`` sets the input channels; the reference hard-codes 3.
* ``pool="mean"`` (mean over all tokens, CLS included, as CRATE's option) is offered; the reference pools the CLS
  token only, which is the default.

As in CRATE, each sub-layer has a *fused* path (default: ``F.scaled_dot_product_attention``, and the sparse code in
four matrix products with the additions folded into them) and an *explicit* one (the attention matrix through the
``attend`` softmax, the code term by term as the reference writes it). The code ``z2`` passes the identity module
``ista.sparse_code`` on both paths, so a forward hook there records it as ``(B, N, ratio * dim)``.

Published sizes (:data:`CRATE_ALPHA_VARIANTS`; ``dim_head = dim / heads``; 1000 classes at 224 px):

=========================================  =====  =====  =====  ========  ===========================================
name                                       dim    depth  heads  dim_head  source
=========================================  =====  =====  =====  ========  ===========================================
crate_alpha_base_patch{8,16,32}_224          768     12     12       64    paper / README (B/8, B/16, B/32)
crate_alpha_large_patch{8,14,32}_224        1024     24     16       64    paper / README (L/8, L/14, L/32)
crate_alpha_tiny_patch16_224                 192     12      3       64    JAX variant table ``Ti``; nothing published
crate_alpha_small_patch16_224                576     12     12       48    JAX variant table ``S``; nothing published
crate_alpha_test_patch8_32                    64      3      4       16    golden-reference test config (10 classes)
=========================================  =====  =====  =====  ========  ===========================================

PyTorch weights are published for B/16 and L/14.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .crate import CRATE, MSSA, PatchEmbed, to_2tuple

__all__ = [
    "CRATEAlpha", "CRATEAlphaBlock", "CRATE_ALPHA_VARIANTS", "ConvPatchEmbed", "OvercompleteISTA",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------------ variants
_SIZES: dict[str, dict[str, int]] = {  # models/crate.py ``decode_variant`` of the official repository
    "tiny": dict(dim=192, depth=12, heads=3, dim_head=64),
    "small": dict(dim=576, depth=12, heads=12, dim_head=48),
    "base": dict(dim=768, depth=12, heads=12, dim_head=64),
    "large": dict(dim=1024, depth=24, heads=16, dim_head=64),
}
_PUBLISHED_PATCHES: dict[str, tuple[int, ...]] = {
    "base": (8, 16, 32),  # B/8, B/16, B/32 (paper and README; PyTorch weights for B/16)
    "large": (8, 14, 32),  # L/8, L/14, L/32 (paper and README; PyTorch weights for L/14)
    "tiny": (16,),  # defined in the variant table only
    "small": (16,),  # defined in the variant table only
}

#: Variant name -> :class:`CRATEAlpha` constructor keywords.
CRATE_ALPHA_VARIANTS: dict[str, dict[str, Any]] = {
    f"crate_alpha_{size}_patch{patch}_224": dict(image_size=224, patch_size=patch, num_classes=1000, **_SIZES[size])
    for size, patches in _PUBLISHED_PATCHES.items()
    for patch in patches
}
CRATE_ALPHA_VARIANTS["crate_alpha_test_patch8_32"] = dict(
    image_size=32, patch_size=8, num_classes=10, dim=64, depth=3, heads=4, dim_head=16
)


# ------------------------------------------------------------------------------------------------------- modules
class ConvPatchEmbed(nn.Module):
    """Patch embedding by a strided ``Conv2d`` (with bias), tokens in row-major grid order.

    Args:
        patch_size: ``(ph, pw)``.
        channels: input channels.
        dim: token width.

    Example:
        >>> embed = ConvPatchEmbed((8, 8), 3, 16)
        >>> embed(torch.zeros(2, 3, 32, 24)).shape, embed.grid(32, 24)
        (torch.Size([2, 12, 16]), (4, 3))
    """

    # The same size checks (and messages) as CRATE's patch embedding; they read only ``self.patch_size``.
    grid = PatchEmbed.grid

    def __init__(self, patch_size: tuple[int, int], channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.channels = channels
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        _, c, h, w = x.shape
        if c != self.channels:
            raise ValueError(f"expected {self.channels} input channels, got {c}")
        self.grid(h, w)  # raises on sizes the convolution would silently crop
        x = self.proj(x)  # (B, dim, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, gh*gw, dim)


class OvercompleteISTA(nn.Module):
    """Two ISTA steps under an overcomplete dictionary ``D``, then synthesis with ``D1`` (see the module docstring).

    ``D`` and ``D1`` are ``(dim, ratio * dim)`` as the reference stores them. Tokens are rows, so ``D^T x`` is
    ``x @ D`` and ``D z`` is ``z @ D.T``. The code ``z2`` passes the identity ``sparse_code`` before the synthesis.

    Args:
        dim: token width.
        overcomplete_ratio: code width over token width.
        eta: ISTA step size.
        lambd: sparsity weight.
        fused: four matrix products with the additions folded in (default) instead of the term-by-term path.

    Example:
        >>> ista = OvercompleteISTA(8, overcomplete_ratio=2)
        >>> ista(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(
        self, dim: int, overcomplete_ratio: int = 4, eta: float = 0.1, lambd: float = 0.1, fused: bool = True
    ) -> None:
        super().__init__()
        self.D = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(dim, overcomplete_ratio * dim)))
        self.D1 = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(dim, overcomplete_ratio * dim)))
        self.sparse_code = nn.Identity()
        self.eta = eta
        self.lambd = lambd
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            z = x.reshape(-1, x.shape[-1])  # (B*N, dim)
            shift = z.new_full((), -self.eta * self.lambd)
            z1 = F.relu(torch.addmm(shift, z, self.D, alpha=self.eta), inplace=True)  # (B*N, r*dim)
            residual = torch.addmm(z, z1, self.D.t(), alpha=-1.0)  # x - D z1, (B*N, dim)
            z2 = torch.addmm(z1, residual, self.D, alpha=self.eta).add_(shift)  # z1 + eta D^T (x - D z1) - eta lambda
            code = self.sparse_code(F.relu(z2, inplace=True).view(*x.shape[:-1], -1))  # (B, N, r*dim)
            return torch.matmul(code, self.D1.t())  # (B, N, dim)
        negative_lasso_grad = torch.matmul(x, self.D)  # D^T x, (B, N, r*dim)
        z1 = F.relu(self.eta * negative_lasso_grad - self.eta * self.lambd)
        dz1 = torch.matmul(z1, self.D.t())  # D z1, (B, N, dim)
        lasso_grad = torch.matmul(dz1 - x, self.D)  # D^T (D z1 - x), (B, N, r*dim)
        z2 = F.relu(z1 - self.eta * lasso_grad - self.eta * self.lambd)
        code = self.sparse_code(z2)
        return torch.matmul(code, self.D1.t())  # D1 z2, (B, N, dim)

    def extra_repr(self) -> str:
        dim, code = self.D.shape
        return f"dim={dim}, code_dim={code}, eta={self.eta}, lambd={self.lambd}, fused={self.fused}"


class CRATEAlphaBlock(nn.Module):
    """One CRATE-alpha layer: ``z = z + MSSA(LN(z))`` then ``z = z + ODL(LN(z))``.

    Example:
        >>> block = CRATEAlphaBlock(16, heads=2, dim_head=8)
        >>> block(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        overcomplete_ratio: int = 4,
        dropout: float = 0.0,
        ista: float = 0.1,
        lambd: float = 0.1,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSSA(dim, heads=heads, dim_head=dim_head, dropout=dropout, fused=fused, proj_bias=False)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ista = OvercompleteISTA(dim, overcomplete_ratio, eta=ista, lambd=lambd, fused=fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # compression
        return x + self.ista(self.norm2(x))  # sparse coding, with a residual (unlike CRATE)


# --------------------------------------------------------------------------------------------------------- model
class CRATEAlpha(nn.Module):
    """CRATE-alpha image classifier with the reference constructor's keywords and CRATE's trunk API.

    Args:
        image_size: training image size, int or ``(h, w)``; sets the learned position-embedding grid.
        patch_size: patch size, int or ``(h, w)``.
        num_classes: classifier outputs; 0 gives an identity head (features only).
        dim: token width.
        depth: number of layers.
        heads: attention heads (subspaces) per layer.
        dim_head: width of each head's subspace.
        overcomplete_ratio: sparse-code width over ``dim`` (the reference fixes 4).
        ista: ISTA step size ``eta`` (the reference fixes 0.1).
        lambd: sparsity weight ``lambda`` (the reference fixes 0.1).
        dropout: dropout on attention weights and the attention output.
        emb_dropout: dropout after adding the position embedding.
        channels: input channels.
        pool: ``"cls"`` (CLS token, the reference) or ``"mean"`` (mean of all tokens, CLS included).
        fused: use the fused attention / sparse-coding path (default) instead of the explicit one.

    Example:
        >>> model = CRATEAlpha(**CRATE_ALPHA_VARIANTS["crate_alpha_test_patch8_32"]).eval()
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> model.forward_features(torch.randn(1, 3, 40, 24)).shape  # other sizes: resampled position embedding
        torch.Size([1, 16, 64])
    """

    num_prefix_tokens: int = 1

    def __init__(
        self,
        *,
        image_size: int | Sequence[int],
        patch_size: int | Sequence[int],
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int = 64,
        overcomplete_ratio: int = 4,
        ista: float = 0.1,
        lambd: float = 0.1,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        channels: int = 3,
        pool: str = "cls",
        fused: bool = True,
    ) -> None:
        super().__init__()
        image_hw = to_2tuple(image_size)
        patch_hw = to_2tuple(patch_size)
        if image_hw[0] % patch_hw[0] or image_hw[1] % patch_hw[1]:
            raise ValueError(f"image_size {image_hw} must be divisible by patch_size {patch_hw}")
        if pool not in {"cls", "mean"}:
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        sizes = dict(dim=dim, depth=depth, heads=heads, dim_head=dim_head, overcomplete_ratio=overcomplete_ratio)
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")

        self.config: dict[str, Any] = dict(
            image_size=list(image_hw), patch_size=list(patch_hw), num_classes=num_classes, dim=dim, depth=depth,
            heads=heads, dim_head=dim_head, overcomplete_ratio=overcomplete_ratio, ista=ista, lambd=lambd,
            dropout=dropout, emb_dropout=emb_dropout, channels=channels, pool=pool,
        )  # fmt: skip
        self.image_size = image_hw
        self.patch_size = patch_hw
        self.grid_size = (image_hw[0] // patch_hw[0], image_hw[1] // patch_hw[1])
        self.num_classes = num_classes
        self.embed_dim = self.num_features = dim
        self.num_heads = heads
        self.dim_head = dim_head
        self.depth = depth
        self.overcomplete_ratio = overcomplete_ratio
        self.pool = pool

        # Parameters are created in the reference's order, so one seed gives the reference's initial weights.
        self.patch_embed = ConvPatchEmbed(patch_hw, channels, dim)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + self.num_prefix_tokens, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_drop = nn.Dropout(emb_dropout)
        self.blocks = nn.ModuleList(
            CRATEAlphaBlock(dim, heads, dim_head, overcomplete_ratio, dropout, ista=ista, lambd=lambd, fused=fused)
            for _ in range(depth)
        )
        self.fc_norm = nn.LayerNorm(dim)  # eps 1e-5, as the reference's head
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    # The trunk API is CRATE's own code: these methods read only the attributes set above (patch_embed, pos_embed,
    # cls_token, pos_drop, blocks[i].attn/.ista, fc_norm, head, pool, depth, grid_size, num_prefix_tokens), so
    # every tool written for CRATE sees the same geometry, paths and intermediates here.
    feature_grid = CRATE.feature_grid
    set_fused = CRATE.set_fused
    fused = CRATE.fused
    _pos_embed = CRATE._pos_embed
    embed = CRATE.embed
    forward_features = CRATE.forward_features
    forward_head = CRATE.forward_head
    forward = CRATE.forward
    forward_intermediates = CRATE.forward_intermediates
    _format = CRATE._format
    _layer_indices = CRATE._layer_indices
    reset_classifier = CRATE.reset_classifier
    get_classifier = CRATE.get_classifier

    def flops_per_image(self, height: int | None = None, width: int | None = None) -> float:
        """Multiply-accumulate count x 2 of one forward pass (matrix products only), for throughput reports."""
        h, w = (height or self.image_size[0]), (width or self.image_size[1])
        gh, gw = self.patch_embed.grid(h, w)
        n = gh * gw + 1
        d, inner, code = self.embed_dim, self.num_heads * self.dim_head, self.overcomplete_ratio * self.embed_dim
        ph, pw = self.patch_size
        per_layer = n * d * inner  # qkv
        per_layer += 2 * n * n * inner  # QK^T and AV
        per_layer += n * inner * d  # output projection
        per_layer += 4 * n * d * code  # D^T x, D z1, D^T r, D1 z2
        patch_dim = self.patch_embed.channels * ph * pw
        total = self.depth * per_layer + (n - 1) * patch_dim * d + d * max(self.num_classes, 0)
        return 2.0 * total

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, patch_size={self.patch_size}, dim={self.embed_dim}, depth={self.depth}, "
            f"heads={self.num_heads}, dim_head={self.dim_head}, overcomplete_ratio={self.overcomplete_ratio}, "
            f"pool={self.pool!r}"
        )

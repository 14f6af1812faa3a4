"""CRATE-MAE: masked autoencoding with a CRATE encoder and a CRATE decoder that runs the layers backwards.

With tokens as rows, ``M`` the set of removed patches, ``m`` the learned mask token and ``P`` the fixed 2-D sin-cos
position table (zero row for the CLS token):

* **Input**: ``Z^0 = [cls; t_1 ... t_L] + P`` with ``t_i = E(x_i)`` (a strided convolution) for kept patches and
  ``t_i = m`` for removed ones. The encoder sees all ``1 + L`` tokens, mask tokens in place.
* **Encoder layer** (as CRATE, ISTA sparsity ``lambda = 0.5``):
  ``Z^{l+1/2} = Z^l + MSSA(LN(Z^l))``, then ``Z^{l+1} = ReLU(z + eta D^T (z - D z) - eta lambda)`` with
  ``z = LN(Z^{l+1/2})``.
  The latent is ``LN(Z^L)``.
* **Decoder layer** (the inverse of an encoder layer): ``Y^{l+1/2} = D_l LN(Y^l)`` (a linear dictionary, undoing the
  sparse coding), then ``Y^{l+1} = Y^{l+1/2} - MSSA(LN(Y^{l+1/2}))`` (undoing the compression).
* **Prediction and loss**: ``pred = Linear(LN(Y^L))`` without the CLS token, one ``ph * pw * C`` pixel vector per
  patch in ``(p1 p2 c)`` order; ``loss = sum_{i in M} mean_pixels (pred_i - x_i)^2 / |M|``, with each target patch
  standardised first (mean 0, unbiased variance 1, eps 1e-6) when ``norm_pix_loss`` is on.

The numerics follow the official implementation, ``model/crate_ae/`` of Ma-Lab-Berkeley/CRATE (commit 674408f),
including the points where it departs from the original MAE:

1. The encoder does not drop the removed patches: it runs on every position, mask tokens in place, and adds the
   table stored as ``decoder_pos_embed``. The table stored as ``pos_embed`` is never read (both hold the same
   values, since the encoder and decoder widths must be equal).
2. The decoder takes the latent as it is: ``decoder_embed`` exists (so checkpoints carry it) but is never applied,
   and no mask tokens are inserted there; hence no ``ids_restore`` argument to :meth:`CRATEMAE.forward_decoder`.
3. The LayerNorms inside the blocks use eps 1e-5; the encoder's and decoder's final norms use ``norm_eps`` (1e-6 in
   every configuration the reference defines).
4. The attention-map path (:meth:`CRATEMAE.get_selfattention_enc`, :meth:`CRATEMAE.get_last_key_enc`) embeds the
   whole image without masking. The reference's default ``layer=10`` is the 11th block; here the default is the
   last block, the one the reference's feature extractor uses (``layer=11`` of 12).

Deliberate difference: for an input whose patch grid is not the training grid, the position table is the exact 2-D
sin-cos table of the new grid (square or not), where the reference resamples the stored table bicubically (and its
masked forward accepts only the training size). At the training grid the stored ``decoder_pos_embed`` is used.

As in CRATE, every layer has a fused path (default) and an explicit one that materialises the attention matrix
through the ``attend`` softmax (:meth:`CRATEMAE.set_fused`). Encoder blocks are
:class:`crate_vis.models.crate.CRATEBlock` (``norm1``, ``attn``, ``norm2``, ``ista``), so the recorders of
:mod:`crate_vis.hooks` work on ``model`` as on CRATE; decoder attention is recorded through
:meth:`CRATEMAE.decoder_view`. Official checkpoints (the MAE codebase layout, whose ``args`` is an
``argparse.Namespace``: the one class :func:`crate_vis.models.checkpoint.safe_torch_load` allows) are renamed through
:data:`crate_vis.models.conversion.OFFICIAL_TO_CRATE_VIS_MAE` when :func:`crate_vis.load_checkpoint` reads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .crate import CRATE, MSSA, CRATEBlock, PatchEmbed, _switchable, to_2tuple

__all__ = [
    "CRATEMAE", "CRATEDecoderBlock", "ConvPatchEmbed", "LinearDictionary", "CRATE_MAE_VARIANTS",
    "sincos_pos_embed_2d",
    "masking_from_noise", "noise_from_kept",
]  # fmt: skip

#: Named configurations: the sizes ``model/crate_ae/crate_ae.py`` defines (``mae_crate_{tiny,small,base,large}``, all
#: patch 16 at the default 224 px; only base has released weights), plus the tiny golden-test configuration.
CRATE_MAE_VARIANTS: dict[str, dict[str, Any]] = {
    "crate_mae_tiny_patch16_224": dict(
        img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
        decoder_embed_dim=384, decoder_depth=12, decoder_num_heads=6,
    ),
    "crate_mae_small_patch16_224": dict(
        img_size=224, patch_size=16, embed_dim=576, depth=12, num_heads=12,
        decoder_embed_dim=576, decoder_depth=12, decoder_num_heads=12,
    ),
    "crate_mae_base_patch16_224": dict(
        img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
        decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12,
    ),
    "crate_mae_large_patch16_224": dict(
        img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
        decoder_embed_dim=1024, decoder_depth=24, decoder_num_heads=16,
    ),
    "crate_mae_test_patch8_32": dict(
        img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- position table
def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """``(M,)`` positions -> ``(M, dim)``: ``[sin(pos * w_k), cos(pos * w_k)]``, ``w_k = 10000^(-k / (dim/2))``."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega  # (dim/2,), float32 throughout, as the reference computes it
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, dim/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid: int | Sequence[int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position table of MAE, for any grid.

    The first ``dim / 2`` channels encode the column index and the last ``dim / 2`` the row index, each as
    ``[sin, cos]`` over ``dim / 4`` frequencies; patches are in row-major order. Computed in float32 as the
    reference computes it, so the table of a square grid equals the stored ``decoder_pos_embed`` bit for bit.

    Args:
        dim: channels, a multiple of 4.
        grid: ``(gh, gw)`` patches, or an int for a square grid.
        cls_token: put a zero row in front for the CLS token.

    Returns:
        ``(1, [1 +] gh * gw, dim)`` float32 table.

    Example:
        >>> sincos_pos_embed_2d(8, (2, 3)).shape
        torch.Size([1, 7, 8])
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos table needs a width divisible by 4, got {dim}")
    gh, gw = to_2tuple(grid)
    cols, rows = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))  # (gh, gw) each
    table = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)  # (gh*gw, dim)
    if cls_token:
        table = np.concatenate([np.zeros([1, dim], dtype=np.float32), table], axis=0)  # (1 + gh*gw, dim)
    return torch.from_numpy(table).float().unsqueeze(0)  # (1, [1 +] gh*gw, dim)


# ------------------------------------------------------------------------------------------------------ masking
def masking_from_noise(noise: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking from given noise: the ``len_keep`` patches of smallest noise are kept.

    Args:
        noise: ``(B, L)`` scores, one per patch.
        len_keep: patches kept per sample, ``0..L``.

    Returns:
        ``(ids_keep, mask, ids_restore)``: kept patch indices ``(B, len_keep)`` in order of increasing noise; the
        mask ``(B, L)`` float, 1 = removed, 0 = kept; and ``ids_restore`` ``(B, L)``, the inverse of the noise sort.

    Example:
        >>> ids_keep, mask, _ = masking_from_noise(torch.tensor([[0.9, 0.1, 0.5, 0.3]]), 2)
        >>> ids_keep.tolist(), mask.tolist()
        ([[1, 3]], [[1.0, 0.0, 1.0, 0.0]])
    """
    if noise.ndim != 2:
        raise ValueError(f"noise must be (B, L), got shape {tuple(noise.shape)}")
    b, length = noise.shape
    if not 0 <= len_keep <= length:
        raise ValueError(f"len_keep must be in 0..{length}, got {len_keep}")
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, L) ascending: small is kept, large is removed
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L)
    ids_keep = ids_shuffle[:, :len_keep]  # (B, len_keep)
    mask = torch.ones(b, length, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # (B, L) back in patch order
    return ids_keep, mask, ids_restore


def noise_from_kept(ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    """Noise that makes :func:`masking_from_noise` keep exactly ``ids_keep``, in that order.

    Kept patch ``ids_keep[b, j]`` scores ``j``; every other patch ``i`` scores ``len_keep + i``.

    Args:
        ids_keep: ``(B, K)`` distinct patch indices per row, each in ``0..length-1``.
        length: patches per sample ``L``.

    Returns:
        ``(B, L)`` float32 noise.
    """
    if ids_keep.ndim != 2:
        raise ValueError(f"ids_keep must be (B, K), got shape {tuple(ids_keep.shape)}")
    if ids_keep.dtype.is_floating_point or ids_keep.dtype == torch.bool or ids_keep.is_complex():
        raise TypeError(f"ids_keep must hold integer patch indices, got dtype {ids_keep.dtype}")
    b, k = ids_keep.shape
    if k > length:
        raise ValueError(f"ids_keep keeps {k} patches of {length}")
    if k and (int(ids_keep.min()) < 0 or int(ids_keep.max()) >= length):
        raise ValueError(
            f"ids_keep must be in 0..{length - 1}, found {int(ids_keep.min())}..{int(ids_keep.max())}"
        )
    ids_keep = ids_keep.long()
    if k > 1 and bool((ids_keep.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise ValueError("ids_keep repeats a patch index within a row; each kept patch must be listed once")
    noise = (k + torch.arange(length, device=ids_keep.device, dtype=torch.float32)).expand(b, length).clone()
    order = torch.arange(k, device=ids_keep.device, dtype=torch.float32).expand(b, k)  # (B, K)
    return noise.scatter_(1, ids_keep, order)  # (B, L)


# ------------------------------------------------------------------------------------------------------- layers
class ConvPatchEmbed(nn.Module):
    """Patch embedding by a strided convolution (MAE's): ``(B, C, H, W) -> (B, gh * gw, dim)``, row-major patches."""

    grid = PatchEmbed.grid  # the same geometry check and message as CRATE's patch embedding

    def __init__(self, patch_size: tuple[int, int], channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.channels = channels
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} input channels, got {x.shape[1]}")
        self.grid(x.shape[-2], x.shape[-1])  # raises unless H and W are multiples of the patch size
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, dim, gh, gw) -> (B, gh*gw, dim)


class LinearDictionary(nn.Module):
    """The decoder's synthesis step ``z -> D z`` with a square dictionary ``D`` (``weight``, no bias).

    Initialised as the reference initialises it (Kaiming-uniform), and kept apart from ``nn.Linear`` so that the
    Xavier initialisation of linear layers leaves it alone, as in the reference.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # tokens are rows: z @ D^T

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}"


class CRATEDecoderBlock(nn.Module):
    """One decoder layer: ``z = D LN(z)``, then ``z = z - MSSA(LN(z))``."""

    def __init__(self, dim: int, heads: int, dim_head: int, fused: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.dictionary = LinearDictionary(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = MSSA(dim, heads=heads, dim_head=dim_head, fused=fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dictionary(self.norm1(x))  # inverse of the sparse coding
        return x - self.attn(self.norm2(x))  # inverse of the compression


class _BlocksView(nn.Module):
    """A module whose ``blocks`` are another model's blocks, for tools that look for ``model.blocks``."""

    def __init__(self, blocks: nn.ModuleList, cls_token: torch.Tensor | None) -> None:
        super().__init__()
        self.blocks = blocks
        self.cls_token = cls_token
        self.num_prefix_tokens = 1


# -------------------------------------------------------------------------------------------------------- model
class CRATEMAE(nn.Module):
    """CRATE masked autoencoder with the reference constructor's keywords.

    Args:
        img_size: training image size, int or ``(h, w)``; sets the grid of the stored position tables.
        patch_size: patch size, int or ``(h, w)``.
        in_chans: input channels.
        embed_dim: encoder width.
        depth: encoder layers.
        num_heads: encoder heads; each has width ``embed_dim // num_heads``.
        decoder_embed_dim: decoder width; must equal ``embed_dim``, because the reference feeds the latent to the
            decoder without a projection (its ``decoder_embed`` is built but never applied).
        decoder_depth: decoder layers.
        decoder_num_heads: decoder heads; each has width ``decoder_embed_dim // decoder_num_heads``.
        mlp_ratio: accepted for compatibility with the reference constructor, which passes it to no CRATE block:
            the dictionaries are ``dim x dim`` whatever its value. A value other than 4 raises.
        norm_pix_loss: standardise each target patch before the loss.
        lambd: sparsity weight ``lambda`` of the encoder's ISTA steps.
        ista: ISTA step size ``eta`` (the reference blocks' ``ista`` keyword).
        norm_eps: eps of the encoder's and decoder's final LayerNorms (the reference's ``norm_layer``).
        fused: use the fused attention / two-matmul ISTA path (default) instead of the explicit one.

    Example:
        >>> model = CRATEMAE(**CRATE_MAE_VARIANTS["crate_mae_test_patch8_32"]).eval()
        >>> images = torch.randn(2, 3, 32, 32)
        >>> loss, pred, mask = model(images, mask_ratio=0.75, noise=torch.rand(2, 16))
        >>> pred.shape, int(mask.sum())
        (torch.Size([2, 16, 192]), 24)
        >>> model.forward_features(torch.randn(1, 3, 32, 48)).shape  # any size divisible by the patch
        torch.Size([1, 25, 64])
    """

    num_prefix_tokens: int = 1
    num_classes: int = 0
    pos_embed: torch.Tensor  # buffers (registered in __init__)
    decoder_pos_embed: torch.Tensor

    def __init__(
        self,
        *,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        lambd: float = 0.5,
        ista: float = 0.1,
        norm_eps: float = 1e-6,
        fused: bool = True,
    ) -> None:
        super().__init__()
        image_hw, patch_hw = to_2tuple(img_size), to_2tuple(patch_size)
        if image_hw[0] % patch_hw[0] or image_hw[1] % patch_hw[1]:
            raise ValueError(f"img_size {image_hw} must be divisible by patch_size {patch_hw}")
        for name, value in {
            "in_chans": in_chans, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads,
            "decoder_depth": decoder_depth, "decoder_num_heads": decoder_num_heads,
        }.items():  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if decoder_embed_dim != embed_dim:
            raise ValueError(
                f"decoder_embed_dim={decoder_embed_dim} differs from embed_dim={embed_dim}; CRATE-MAE feeds the latent "
                "to the decoder without a projection, so both widths must be equal"
            )
        if embed_dim % 4:
            raise ValueError(f"embed_dim must be divisible by 4 for the 2-D sin-cos position table, got {embed_dim}")
        if num_heads > embed_dim or decoder_num_heads > decoder_embed_dim:
            raise ValueError(
                f"heads must not exceed the width: num_heads={num_heads} for embed_dim={embed_dim}, "
                f"decoder_num_heads={decoder_num_heads} for decoder_embed_dim={decoder_embed_dim}"
            )
        if float(mlp_ratio) != 4.0:
            raise ValueError(
                f"mlp_ratio={mlp_ratio} has no effect in CRATE-MAE (every dictionary is dim x dim); leave it at 4"
            )

        self.config: dict[str, Any] = dict(
            img_size=list(image_hw), patch_size=list(patch_hw), in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads, mlp_ratio=float(mlp_ratio), norm_pix_loss=bool(norm_pix_loss),
            lambd=lambd, ista=ista, norm_eps=norm_eps,
        )  # fmt: skip
        self.image_size = image_hw
        self.patch_size = patch_hw
        self.grid_size = (image_hw[0] // patch_hw[0], image_hw[1] // patch_hw[1])
        self.in_chans = in_chans
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.dim_head = embed_dim // num_heads
        self.depth = depth
        self.decoder_depth = decoder_depth
        self.norm_pix_loss = norm_pix_loss

        # Registration order follows the reference, so that under one seed both draw the same initial weights.
        # Encoder.
        self.patch_embed = ConvPatchEmbed(patch_hw, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, self.grid_size))  # stored, never read
        self.blocks = nn.ModuleList(
            CRATEBlock(embed_dim, num_heads, self.dim_head, ista=ista, lambd=lambd, fused=fused) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        # Decoder.
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)  # never applied; see the module docstring
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_embed_dim, self.grid_size))
        self.decoder_blocks = nn.ModuleList(
            CRATEDecoderBlock(decoder_embed_dim, decoder_num_heads, decoder_embed_dim // decoder_num_heads, fused=fused)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=norm_eps)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_hw[0] * patch_hw[1] * in_chans)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The reference initialisation: Xavier-uniform linear layers (zero bias) and patch projection (as a matrix;
        its bias keeps PyTorch's default), unit LayerNorms, ``N(0, 0.02^2)`` CLS and mask tokens."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # (dim, C*ph*pw)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------------- geometry
    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(h, w)`` the model uses for an input of ``height x width`` pixels."""
        return self.patch_embed.grid(height, width)

    def set_fused(self, enabled: bool = True) -> None:
        """Switch every encoder and decoder layer between the fused and explicit (attention-materialising) paths."""
        for block in _switchable(self.blocks):
            block.attn.fused = enabled
            block.ista.fused = enabled
        for decoder_block in self._decoder_layers():
            decoder_block.attn.fused = enabled

    @property
    def fused(self) -> bool:
        """Whether the fused path is on (in every layer)."""
        return all(b.attn.fused and b.ista.fused for b in _switchable(self.blocks)) and all(
            b.attn.fused for b in self._decoder_layers()
        )

    def _decoder_layers(self) -> Iterable[CRATEDecoderBlock]:
        return cast("Iterable[CRATEDecoderBlock]", self.decoder_blocks)  # nn.ModuleList yields plain nn.Module

    def position_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position table ``(1, 1 + gh * gw, dim)`` for a patch grid: the stored ``decoder_pos_embed`` at the training
        grid, else the exact sin-cos table of ``grid``."""
        if tuple(grid) == self.grid_size:
            return self.decoder_pos_embed
        table = sincos_pos_embed_2d(self.embed_dim, grid)
        return table.to(device=self.decoder_pos_embed.device, dtype=self.decoder_pos_embed.dtype)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> patches ``(B, gh * gw, ph * pw * C)``, pixels in ``(p1 p2 c)`` order."""
        if imgs.ndim != 4 or imgs.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(imgs.shape)}")
        b, c, h, w = imgs.shape
        gh, gw = self.patch_embed.grid(h, w)
        ph, pw = self.patch_size
        x = imgs.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p1, p2, C)
        return x.reshape(b, gh * gw, ph * pw * c)  # (B, L, p1*p2*C)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Patches ``(B, gh * gw, ph * pw * C)`` -> images ``(B, C, gh * ph, gw * pw)``.

        Args:
            x: patch pixels in ``(p1 p2 c)`` order, as :meth:`patchify` and the decoder produce them.
            grid: ``(gh, gw)``; by default the grid must be square.
        """
        ph, pw = self.patch_size
        c = self.in_chans
        if x.ndim != 3 or x.shape[2] != ph * pw * c:
            raise ValueError(f"expected patches of shape (B, L, {ph * pw * c}), got {tuple(x.shape)}")
        b, length, _ = x.shape
        if grid is None:
            side = int(round(length**0.5))
            if side * side != length:
                raise ValueError(f"{length} patches do not form a square grid; pass grid=(gh, gw)")
            grid = (side, side)
        gh, gw = grid
        if gh * gw != length:
            raise ValueError(f"grid {grid} holds {gh * gw} patches, got {length}")
        x = x.reshape(b, gh, gw, ph, pw, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p1, gw, p2)
        return x.reshape(b, c, gh * ph, gw * pw)  # (B, C, H, W)

    # ------------------------------------------------------------------------------------- masked autoencoding
    def masking(
        self,
        batch: int,
        length: int,
        mask_ratio: float,
        noise: torch.Tensor | None = None,
        ids_keep: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Choose the kept patches: from ``noise`` ``(B, L)``, from ``ids_keep`` ``(B, K)``, or from ``torch.rand``.

        ``int(L * (1 - mask_ratio))`` patches are kept. Returns ``(ids_keep, mask, ids_restore)`` as
        :func:`masking_from_noise` does.
        """
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        len_keep = int(length * (1 - mask_ratio))
        if noise is not None and ids_keep is not None:
            raise ValueError("pass noise or ids_keep, not both")
        if ids_keep is not None:
            if tuple(ids_keep.shape) != (batch, len_keep):
                raise ValueError(
                    f"ids_keep has shape {tuple(ids_keep.shape)}; mask_ratio={mask_ratio} of {length} patches keeps "
                    f"{len_keep}, so expected ({batch}, {len_keep})"
                )
            noise = noise_from_kept(ids_keep, length)
        elif noise is None:
            noise = torch.rand(batch, length, device=device)  # noise in [0, 1]
        elif tuple(noise.shape) != (batch, length):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected (batch, patches) = ({batch}, {length})")
        return masking_from_noise(noise if device is None else noise.to(device), len_keep)

    def forward_encoder(
        self,
        imgs: torch.Tensor,
        mask_ratio: float = 0.75,
        noise: torch.Tensor | None = None,
        *,
        ids_keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode with a share of the patches replaced by the mask token.

        Args:
            imgs: ``(B, C, H, W)``.
            mask_ratio: share of patches removed; ``int(L * (1 - mask_ratio))`` are kept.
            noise: ``(B, L)`` scores; the patches of smallest noise are kept. Drawn with ``torch.rand`` when neither
                ``noise`` nor ``ids_keep`` is given.
            ids_keep: ``(B, K)`` indices of the kept patches, instead of ``noise``.

        Returns:
            ``(latent, mask, ids_restore)``: the normalised encoder output ``(B, 1 + L, dim)`` over all positions (CLS
            first), the mask ``(B, L)`` (1 = removed), and the inverse of the noise sort ``(B, L)``.
        """
        grid = self.patch_embed.grid(imgs.shape[-2], imgs.shape[-1])
        x = self.patch_embed(imgs)  # (B, L, dim)
        b, length, dim = x.shape
        _, mask, ids_restore = self.masking(b, length, mask_ratio, noise, ids_keep, device=x.device)
        x = torch.where(mask.unsqueeze(-1).bool(), self.mask_token.to(x.dtype), x)  # (B, L, dim), mask tokens in place
        cls = self.cls_token.expand(b, -1, -1)  # (B, 1, dim)
        x = torch.cat([cls, x], dim=1) + self.position_table(grid)  # (B, 1 + L, dim)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, 1 + L, dim)`` -> predicted patch pixels ``(B, L, ph * pw * C)`` (CLS dropped)."""
        x = latent
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))  # (B, 1 + L, ph*pw*C)
        return x[:, self.num_prefix_tokens :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the removed patches.

        Args:
            imgs: ``(B, C, H, W)``.
            pred: ``(B, L, ph * pw * C)``.
            mask: ``(B, L)``, 1 = removed. With no patch removed the loss is NaN (0 / 0), as in the reference.

        Returns:
            Scalar loss: per-patch mean over pixels, averaged over the removed patches.
        """
        target = self.patchify(imgs)  # (B, L, ph*pw*C)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the reference
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)  # (B, L)
        return (loss * mask).sum() / mask.sum()

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float = 0.75,
        noise: torch.Tensor | None = None,
        *,
        ids_keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masked autoencoding: ``(loss, pred, mask)`` with ``pred`` ``(B, L, ph * pw * C)`` and ``mask`` ``(B, L)``.

        Masking as in :meth:`forward_encoder`; pass ``noise`` or ``ids_keep`` for a reproducible mask.
        """
        latent, mask, _ = self.forward_encoder(imgs, mask_ratio, noise, ids_keep=ids_keep)
        pred = self.forward_decoder(latent)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # ----------------------------------------------------------------------------------- trunk (no masking)
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> input tokens of the first encoder layer ``(B, 1 + N, dim)``, nothing masked."""
        grid = self.patch_embed.grid(x.shape[-2], x.shape[-1])
        tokens = self.patch_embed(x)  # (B, N, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, dim)
        return torch.cat([cls, tokens], dim=1) + self.position_table(grid)  # (B, 1 + N, dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> encoder tokens after the last layer ``(B, 1 + N, dim)``, before the final norm.

        Every patch is seen (no masking), as in the reference's attention-map path. Any input size divisible by
        the patch size works; the position table is the exact sin-cos table of its grid.
        """
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``(B, 1 + N, dim)`` -> the normalised CLS token ``(B, dim)``.

        There is no classifier, so ``pre_logits`` changes nothing.
        """
        return self.norm(x[:, 0])

    # The layer selection and output formats are CRATE's own (they read only blocks, depth, embed and geometry).
    forward_intermediates = CRATE.forward_intermediates
    _format = CRATE._format
    _layer_indices = CRATE._layer_indices

    def _tokens_before(self, x: torch.Tensor, layer: int) -> tuple[CRATEBlock, torch.Tensor]:
        (index,) = self._layer_indices([layer])
        x = self.embed(x)
        for block in self.blocks[:index]:
            x = block(x)
        return cast(CRATEBlock, self.blocks[index]), x

    def get_selfattention_enc(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Softmax attention ``(B, heads, 1 + N, 1 + N)`` of encoder layer ``layer`` on the unmasked image."""
        block, tokens = self._tokens_before(x, layer)
        return block.attn.attention(block.attn.project(block.norm1(tokens)))

    def get_last_key_enc(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Shared query/key/value projection ``U^T LN(z)`` ``(B, 1 + N, heads * dim_head)`` of encoder layer
        ``layer`` on the unmasked image (heads concatenated, CLS first)."""
        block, tokens = self._tokens_before(x, layer)
        return block.attn.qkv(block.norm1(tokens))

    def decoder_view(self) -> nn.Module:
        """A module whose ``blocks`` are the decoder blocks, so that
        :class:`crate_vis.hooks.AttentionRecorder` records the decoder's attention:
        ``AttentionRecorder(model.decoder_view())`` around ``model(images, ...)``."""
        return _BlocksView(self.decoder_blocks, self.cls_token)

    def extra_repr(self) -> str:
        return (
            f"img_size={self.image_size}, patch_size={self.patch_size}, embed_dim={self.embed_dim}, "
            f"depth={self.depth}, num_heads={self.num_heads}, decoder_depth={self.decoder_depth}, "
            f"norm_pix_loss={self.norm_pix_loss}"
        )

"""CRATE: the Coding RAte reduction TransformEr.

One layer is ``Z_half = Z + MSSA(LN(Z))`` followed by ``Z_next = ISTA(LN(Z_half))``:

* **MSSA** (multi-head subspace self-attention): a single projection ``U_k^T z`` per head serves as query, key and
  value, ``softmax(W W^T / sqrt(d_head)) W`` per head, then an output projection.
* **ISTA**: one proximal-gradient step toward a sparse code under the dictionary ``D``,
  ``ReLU(z + eta * D^T (z - D z) - eta * lambda)``.

The numerics follow the official implementation (``model/crate.py`` of Ma-Lab-Berkeley/CRATE): patch pixels are
flattened in ``(p1 p2 c)`` order, the stem is ``LayerNorm -> Linear -> LayerNorm``, the CLS token and position
embedding are learned, pooling is the CLS token or the mean over all tokens (CLS included), and the head is
``LayerNorm -> Linear``. Official checkpoints are read through the explicit key table in
:mod:`crate_vis.models.conversion`.

Two numerically equivalent paths exist for each sub-layer: a *fused* one used by default, and an *explicit* one that
materialises the attention matrix through the ``attend`` softmax module and computes ISTA term by term as the
reference does. The fused path:

* **MSSA**: ``F.scaled_dot_product_attention``; on the CPU in bfloat16/float16 a materialised-softmax attention with
  its own backward (:class:`SubspaceAttention`), because PyTorch's CPU flash-attention backward is several times
  slower than batched matrix products at these sizes in half precision.
* **ISTA** (:class:`ISTAStep`, an autograd function with a hand-written backward). The step is linear before the
  shrinkage: ``z + eta D^T (z - D z) = (I + eta (D^T - D^T D)) z``. With at least as many tokens as channels it
  forms ``E = eta (D^T - D^T D)`` once (``dim^3``) and runs one token-sized product ``z + E z`` forward and two
  backward, instead of two and four; with fewer tokens it runs the two products ``r = z - D z``, ``z + eta D^T r``
  and reuses ``r`` in the backward.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import SelectionError

__all__ = [
    "CRATE", "MSSA", "ISTA", "ISTAStep", "SubspaceAttention", "CRATEBlock", "PatchEmbed", "fit_to_patches",
    "resample_pos_embed", "to_2tuple",
]  # fmt: skip


def to_2tuple(value: int | Sequence[int]) -> tuple[int, int]:
    """Return ``(h, w)`` from an int or a pair."""
    if isinstance(value, (int, numbers.Integral)):
        return (int(value), int(value))
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair (h, w), got {value!r}")
    return (int(value[0]), int(value[1]))


def layer_index(depth: int, layer: int) -> int:
    """``layer`` (negative counts from the end) as an index in ``0 .. depth-1``: the one layer-index check.

    Raises:
        SelectionError: out of range (the message names the valid range); also an ``IndexError`` and ``ValueError``.

    Example:
        >>> layer_index(12, -1)
        11
    """
    if isinstance(layer, bool) or not isinstance(layer, (int,)) and not hasattr(layer, "__index__"):
        raise SelectionError(f"a layer index must be an integer, got {layer!r}")
    layer = int(layer)
    if not -depth <= layer < depth:
        raise SelectionError(f"layer {layer} out of range: this model has layers 0..{depth - 1} (or -{depth}..-1)")
    return layer % depth


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resample the patch part of a position embedding to a new grid (bicubic, as DINO does).

    Args:
        pos_embed: ``(1, num_prefix_tokens + old_h * old_w, dim)`` embedding.
        new_grid: target grid ``(h, w)`` in patches.
        old_grid: grid the embedding was trained for.
        num_prefix_tokens: leading tokens (CLS) that are kept as they are.

    Returns:
        ``(1, num_prefix_tokens + new_h * new_w, dim)`` embedding.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, patch = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = patch.shape[-1]
    if patch.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(f"position embedding has {patch.shape[1]} patch tokens, expected grid {old_grid}")
    orig_dtype = patch.dtype
    patch = patch.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()  # (1, dim, h, w)
    patch = F.interpolate(patch, size=tuple(new_grid), mode="bicubic", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(orig_dtype)
    return torch.cat([prefix, patch], dim=1)


class _HasPatchSize(Protocol):
    """A patch embedding as :meth:`PatchEmbed.grid` reads it (the convolutional embeddings share that method)."""

    patch_size: tuple[int, int]


class _HasDepth(Protocol):
    """A model as :meth:`CRATE._layer_indices` reads it (the other families share that method)."""

    depth: int


class _PathSwitch(Protocol):
    fused: bool


class _SwitchableLayer(Protocol):
    """A layer as :meth:`CRATE.set_fused` and :attr:`CRATE.fused` read it: attention and ISTA with a ``fused`` flag."""

    @property
    def attn(self) -> _PathSwitch: ...

    @property
    def ista(self) -> _PathSwitch: ...


def _switchable(blocks: nn.ModuleList) -> Iterable[_SwitchableLayer]:
    """``blocks`` typed as the layers they are (iterating an ``nn.ModuleList`` gives plain ``nn.Module``)."""
    return cast("Iterable[_SwitchableLayer]", blocks)


class PatchEmbed(nn.Module):
    """Cut an image into patches flattened in ``(p1 p2 c)`` order, then ``LayerNorm -> Linear -> LayerNorm``."""

    def __init__(self, patch_size: tuple[int, int], channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.channels = channels
        patch_dim = channels * patch_size[0] * patch_size[1]
        self.norm_in = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def grid(self: _HasPatchSize, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of an image of ``height x width`` pixels; raises if not divisible."""
        ph, pw = self.patch_size
        if height < ph or width < pw:
            raise ValueError(f"image of {height}x{width} px is smaller than one {ph}x{pw} patch")
        if height % ph or width % pw:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the patch size {ph}x{pw}; resize, or crop with "
                "crate_vis.models.fit_to_patches(x, patch_size) first"
            )
        return height // ph, width // pw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        b, c, h, w = x.shape
        if c != self.channels:
            raise ValueError(f"expected {self.channels} input channels, got {c}")
        gh, gw = self.grid(h, w)
        ph, pw = self.patch_size
        x = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p1, p2, C)
        x = x.reshape(b, gh * gw, ph * pw * c)  # (B, N, p1*p2*C)
        return self.norm_out(self.proj(self.norm_in(x)))  # (B, N, dim)


class MSSA(nn.Module):
    """Multi-head subspace self-attention: one projection per head is query, key and value.

    ``subspace`` (an identity) marks the per-head projections ``U_k^T z`` of shape ``(B, heads, N, dim_head)`` and
    ``attend`` (the softmax) the attention matrix, so that hooks can record both without editing ``forward``.
    The fused path never materialises the attention matrix; recorders recompute it from ``subspace``.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        fused: bool = True,
        proj_bias: bool = True,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.fused = fused
        self.qkv = nn.Linear(dim, inner_dim, bias=False)
        self.subspace = nn.Identity()
        self.attend = nn.Softmax(dim=-1)
        self.attn_drop = nn.Dropout(dropout)
        # The reference drops the output projection when a single head spans the whole width.
        self.proj = nn.Linear(inner_dim, dim, bias=proj_bias) if not (heads == 1 and dim_head == dim) else nn.Identity()
        self.proj_drop = nn.Dropout(dropout)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head subspace projections ``U_k^T z``: ``(B, N, dim) -> (B, heads, N, dim_head)``."""
        b, n, _ = x.shape
        return self.qkv(x).reshape(b, n, self.heads, self.dim_head).transpose(1, 2)

    def attention(self, w: torch.Tensor) -> torch.Tensor:
        """Softmax attention of projections ``w`` ``(B, heads, N, dim_head)`` -> ``(B, heads, N, N)``."""
        return torch.softmax(torch.matmul(w, w.transpose(-1, -2)) * self.scale, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        w = self.subspace(self.project(x))  # (B, h, N, dh)
        if self.fused:
            p = self.attn_drop.p if self.training else 0.0
            if p == 0.0 and w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16):
                out = SubspaceAttention.apply(w, self.scale)  # (B, h, N, dh)
            else:
                out = F.scaled_dot_product_attention(w, w, w, dropout_p=p, scale=self.scale)  # (B, h, N, dh)
        else:
            dots = torch.matmul(w, w.transpose(-1, -2)) * self.scale  # (B, h, N, N)
            attn = self.attn_drop(self.attend(dots))
            out = torch.matmul(attn, w)  # (B, h, N, dh)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)  # (B, N, h*dh)
        return self.proj_drop(self.proj(out))


class SubspaceAttention(torch.autograd.Function):
    """``softmax(W W^T * scale) W`` per head, the attention matrix materialised, with its own backward.

    The subspace projection ``W`` ``(B, h, N, dh)`` is query, key and value at once, so one saved copy serves all
    three and the backward is four batched products: with ``A = softmax(S)``, ``S = scale W W^T`` and the output
    gradient ``G``, ``dA = G W^T``, ``dS = A * (dA - rowsum(dA * A))`` and
    ``dW = A^T G + scale (dS + dS^T) W``. The softmax reads the logits in the input precision and accumulates in
    float32 (the logits are rounded to the input precision first, unlike flash attention). Used by
    :class:`MSSA`'s fused path on the CPU in bfloat16/float16 without attention dropout.
    """

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, scale: float) -> torch.Tensor:
        b, h, n, dh = w.shape
        wc = w.contiguous().view(b * h, n, dh)  # (B*h, N, dh)
        logits = torch.baddbmm(wc.new_zeros(()), wc, wc.transpose(1, 2), beta=0.0, alpha=scale)  # (B*h, N, N)
        attn = torch.softmax(logits, dim=-1)
        ctx.save_for_backward(wc, attn)
        ctx.scale = scale
        return torch.bmm(attn, wc).view(b, h, n, dh)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        wc, attn = ctx.saved_tensors
        b, h, n, dh = grad.shape
        g = grad.reshape(b * h, n, dh)  # (B*h, N, dh)
        d_attn = torch.bmm(g, wc.transpose(1, 2))  # (B*h, N, N)
        d_logits = torch._softmax_backward_data(d_attn, attn, -1, attn.dtype)
        dw = torch.bmm(attn.transpose(1, 2), g)  # as value
        dw.baddbmm_(d_logits, wc, alpha=ctx.scale)  # as query
        dw.baddbmm_(d_logits.transpose(1, 2), wc, alpha=ctx.scale)  # as key
        return dw.view(b, h, n, dh), None


class ISTAStep(torch.autograd.Function):
    """``ReLU(z + eta D^T (z - D z) - eta lambda)`` on token rows ``z`` ``(M, d)``, with a hand-written backward.

    Tokens are rows, so ``D z`` is ``z @ D.T``. With ``g`` the output gradient masked by the ReLU:

    * ``M >= d`` (collapsed): ``y = ReLU(z + z E - eta lambda)`` with ``E = eta (D - D^T D)``, the row form of
      ``eta (D^T - D^T D)``; backward ``dz = g + g E^T`` and, with ``G = z^T g``, ``dD = eta (G - D (G + G^T))``.
      One ``(M, d) x (d, d)`` product forward and two backward, plus two ``d^3`` ones.
    * ``M < d`` (two products): ``r = z - z D^T``, ``y = ReLU(z + eta r D - eta lambda)``; backward with
      ``q = g D^T``: ``dz = g + eta (q - q D)``, ``dD = eta (r^T g - q^T z)``.

    All products run in the dtype of ``z`` and ``weight`` (the caller casts them alike, as autocast would).
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, weight: torch.Tensor, eta: float, lambd: float) -> torch.Tensor:
        collapsed = z.shape[0] >= z.shape[1]
        y = z.sub(eta * lambd)  # (M, d), written once here and then updated in place
        if collapsed:
            e = torch.addmm(weight, weight.t(), weight, beta=eta, alpha=-eta)  # eta (D - D^T D), (d, d)
            y.addmm_(z, e)
            other = e
        else:
            other = torch.addmm(z, z, weight.t(), alpha=-1.0)  # r = z - D z, (M, d)
            y.addmm_(other, weight, alpha=eta)
        y.relu_()
        ctx.save_for_backward(z, weight, other, y)
        ctx.eta, ctx.collapsed = eta, collapsed
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        z, weight, other, y = ctx.saved_tensors
        eta = ctx.eta
        g = torch.ops.aten.threshold_backward(grad, y, 0)  # grad where the ReLU passed, else 0
        dz = dw = None
        if ctx.collapsed:
            e = other
            if ctx.needs_input_grad[0]:
                dz = torch.addmm(g, g, e.t())  # g + g E^T
            if ctx.needs_input_grad[1]:
                gm = torch.mm(z.t(), g)  # dL/d(I + E), (d, d)
                dw = torch.addmm(gm, weight, gm + gm.t(), beta=eta, alpha=-eta)
            return dz, dw, None, None
        r = other
        q = torch.mm(g, weight.t())  # (M, d)
        if ctx.needs_input_grad[0]:
            dz = torch.addmm(g, q, weight, alpha=-eta).add_(q, alpha=eta)  # g + eta (q - q D)
        if ctx.needs_input_grad[1]:
            dw = torch.mm(r.t(), g).addmm_(q.t(), z, beta=eta, alpha=-eta)  # eta (r^T g - q^T z)
        return dz, dw, None, None


class ISTA(nn.Module):
    """One ISTA step toward a sparse code: ``ReLU(z + eta * D^T (z - D z) - eta * lambda)``.

    ``weight`` is the dictionary ``D`` (``dim x dim``) as the reference stores it. Tokens are rows, so ``D z`` is
    ``z @ D.T`` and ``D^T r`` is ``r @ D``. The fused path is :class:`ISTAStep` (under autocast its products run in
    the autocast dtype, as ``addmm`` would); the explicit one computes the reference's three products term by term.
    """

    def __init__(self, dim: int, eta: float = 0.1, lambd: float = 0.1, fused: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)
        self.eta = eta
        self.lambd = lambd
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            z = x.reshape(-1, x.shape[-1])  # (B*N, dim)
            weight: torch.Tensor = self.weight
            device = z.device.type
            if torch.is_autocast_enabled(device) and z.dtype != torch.float64:  # cast as autocast casts a product
                dtype = torch.get_autocast_dtype(device)
                z, weight = z.to(dtype), weight.to(dtype)
            return ISTAStep.apply(z, weight, self.eta, self.lambd).view(*x.shape[:-1], -1)
        dtdx = F.linear(F.linear(x, self.weight), self.weight.t())  # D^T D z
        dtx = F.linear(x, self.weight.t())  # D^T z
        return F.relu(x + (self.eta * (dtx - dtdx) - self.eta * self.lambd))

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}, eta={self.eta}, lambd={self.lambd}, fused={self.fused}"


class CRATEBlock(nn.Module):
    """One CRATE layer: ``z = z + MSSA(LN(z))`` then ``z = ISTA(LN(z))``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        dropout: float = 0.0,
        ista: float = 0.1,
        lambd: float = 0.1,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MSSA(dim, heads=heads, dim_head=dim_head, dropout=dropout, fused=fused)
        self.norm2 = nn.LayerNorm(dim)
        self.ista = ISTA(dim, eta=ista, lambd=lambd, fused=fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # compression: Z^{l+1/2}
        return self.ista(self.norm2(x))  # sparsification: Z^{l+1}


class CRATE(nn.Module):
    """CRATE image classifier with the reference constructor's keywords.

    Args:
        image_size: training image size, int or ``(h, w)``; sets the learned position-embedding grid.
        patch_size: patch size, int or ``(h, w)``.
        num_classes: classifier outputs; 0 gives an identity head (features only).
        dim: token width.
        depth: number of layers.
        heads: attention heads (subspaces) per layer.
        mlp_dim: accepted for compatibility with the reference constructor, which also ignores it: the ISTA
            dictionary is always ``dim x dim``. A value other than ``None`` or ``dim`` raises.
        pool: ``"cls"`` (CLS token) or ``"mean"`` (mean of all tokens, CLS included, as the reference does).
        channels: input channels.
        dim_head: width of each head's subspace, independent of ``dim`` and ``heads``.
        dropout: dropout on attention weights and the attention output.
        emb_dropout: dropout after adding the position embedding.
        ista: ISTA step size ``eta``.
        lambd: ISTA sparsity weight ``lambda`` (the reference hard-codes 0.1).
        fused: use the fused attention / ISTA path (default; see the module docstring) instead of the explicit one.
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
        mlp_dim: int | None = None,
        pool: str = "cls",
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        ista: float = 0.1,
        lambd: float = 0.1,
        fused: bool = True,
    ) -> None:
        super().__init__()
        image_hw = to_2tuple(image_size)
        patch_hw = to_2tuple(patch_size)
        if image_hw[0] % patch_hw[0] or image_hw[1] % patch_hw[1]:
            raise ValueError(f"image_size {image_hw} must be divisible by patch_size {patch_hw}")
        if pool not in {"cls", "mean"}:
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if mlp_dim is not None and mlp_dim != dim:
            raise ValueError(
                f"mlp_dim={mlp_dim} has no effect in CRATE (the ISTA dictionary is dim x dim = {dim}); "
                "leave it unset"
            )
        for name, value in {"dim": dim, "depth": depth, "heads": heads, "dim_head": dim_head}.items():
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")

        self.config: dict[str, Any] = dict(
            image_size=list(image_hw), patch_size=list(patch_hw), num_classes=num_classes, dim=dim, depth=depth,
            heads=heads, pool=pool, channels=channels, dim_head=dim_head, dropout=dropout, emb_dropout=emb_dropout,
            ista=ista, lambd=lambd,
        )  # fmt: skip
        self.image_size = image_hw
        self.patch_size = patch_hw
        self.grid_size = (image_hw[0] // patch_hw[0], image_hw[1] // patch_hw[1])
        self.num_classes = num_classes
        self.embed_dim = self.num_features = dim
        self.num_heads = heads
        self.dim_head = dim_head
        self.depth = depth
        self.pool = pool

        self.patch_embed = PatchEmbed(patch_hw, channels, dim)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + self.num_prefix_tokens, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_drop = nn.Dropout(emb_dropout)
        self.blocks = nn.ModuleList(
            CRATEBlock(dim, heads, dim_head, dropout=dropout, ista=ista, lambd=lambd, fused=fused)
            for _ in range(depth)
        )
        self.fc_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    # ----------------------------------------------------------------------------------------------- geometry
    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(h, w)`` the model uses for an input of ``height x width`` pixels."""
        return self.patch_embed.grid(height, width)

    def set_fused(self, enabled: bool = True) -> None:
        """Switch every layer between the fused (fast) and explicit (attention-materialising) paths."""
        for block in _switchable(self.blocks):
            block.attn.fused = enabled
            block.ista.fused = enabled

    @property
    def fused(self) -> bool:
        """Whether the fused path is on (in every layer)."""
        return all(b.attn.fused and b.ista.fused for b in _switchable(self.blocks))

    # ------------------------------------------------------------------------------------------------ forward
    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos = resample_pos_embed(self.pos_embed, grid, self.grid_size, self.num_prefix_tokens)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, dim)
        x = torch.cat([cls, x], dim=1) + pos  # (B, 1 + N, dim)
        return self.pos_drop(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> input tokens of the first layer ``(B, 1 + N, dim)``."""
        tokens = self.patch_embed(x)  # (B, N, dim); validates the input shape
        return self._pos_embed(tokens, self.patch_embed.grid(x.shape[-2], x.shape[-1]))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> tokens after the last layer ``(B, 1 + N, dim)`` (CLS first)."""
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``(B, 1 + N, dim)`` -> logits ``(B, num_classes)`` (or pooled, normalised features)."""
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]  # (B, dim)
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        output_fmt: str = "NLC",
        return_prefix_tokens: bool = True,
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the trunk and return the outputs of chosen layers.

        Args:
            x: images ``(B, C, H, W)``.
            indices: layers to return: ``None`` for all, an int ``n`` for the last ``n``, or a list of indices
                (negative indices count from the end).
            output_fmt: ``"NLC"`` for tokens ``(B, [1 +] N, dim)``, ``"NCHW"`` for spatial maps
                ``(B, dim, gh, gw)`` (prefix tokens dropped from the map).
            return_prefix_tokens: with ``"NLC"``, keep the CLS token in front; with ``"NCHW"``, return
                ``(map, prefix)`` pairs where ``prefix`` is ``(B, 1, dim)``.
            intermediates_only: return only the list of intermediates.

        Returns:
            ``(final_tokens, intermediates)`` or just ``intermediates``.
        """
        if output_fmt not in {"NLC", "NCHW"}:
            raise ValueError(f"output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}")
        take = self._layer_indices(indices)
        grid = self.patch_embed.grid(x.shape[-2], x.shape[-1])
        x = self.embed(x)
        outputs: list[Any] = []
        last = max(take) if take else -1
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in take:
                outputs.append(self._format(x, grid, output_fmt, return_prefix_tokens))
            if intermediates_only and i >= last:
                break
        return outputs if intermediates_only else (x, outputs)

    def _format(self, x: torch.Tensor, grid: tuple[int, int], fmt: str, with_prefix: bool) -> Any:
        if fmt == "NLC":
            return x if with_prefix else x[:, self.num_prefix_tokens :]
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        spatial = patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)  # (B, dim, gh, gw)
        return (spatial, prefix) if with_prefix else spatial

    def _layer_indices(self: _HasDepth, indices: int | Sequence[int] | None) -> list[int]:
        if indices is None:
            return list(range(self.depth))
        if isinstance(indices, int):
            if not 0 < indices <= self.depth:
                raise ValueError(f"ask for the last 1..{self.depth} layers, got {indices}")
            return list(range(self.depth - indices, self.depth))
        return [layer_index(self.depth, i) for i in indices]

    def reset_classifier(self, num_classes: int, pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one of ``num_classes`` outputs."""
        if pool is not None:
            if pool not in {"cls", "mean"}:
                raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
            self.pool = self.config["pool"] = pool
        self.num_classes = self.config["num_classes"] = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.head

    def flops_per_image(self, height: int | None = None, width: int | None = None) -> float:
        """Multiply-accumulate count x 2 of one forward pass (matrix products only), for throughput reports."""
        h, w = (height or self.image_size[0]), (width or self.image_size[1])
        gh, gw = self.patch_embed.grid(h, w)
        n = gh * gw + 1
        d, inner = self.embed_dim, self.num_heads * self.dim_head
        patch_dim = self.patch_embed.proj.in_features
        per_layer = n * d * inner  # qkv
        per_layer += 2 * n * n * inner  # QK^T and AV
        per_layer += n * inner * d  # output projection
        per_layer += 2 * n * d * d  # ISTA, two products
        total = self.depth * per_layer + (n - 1) * patch_dim * d + d * max(self.num_classes, 0)
        return 2.0 * total

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, patch_size={self.patch_size}, dim={self.embed_dim}, depth={self.depth}, "
            f"heads={self.num_heads}, dim_head={self.dim_head}, pool={self.pool!r}"
        )


def fit_to_patches(x: torch.Tensor, patch_size: int | Sequence[int], mode: str = "crop") -> torch.Tensor:
    """Make ``(..., H, W)`` divisible by the patch size.

    Args:
        x: image tensor with the spatial size last.
        patch_size: int or ``(h, w)``.
        mode: ``"crop"`` drops the bottom/right remainder (DINO's policy); ``"pad"`` zero-pads bottom/right.

    Returns:
        The cropped or padded tensor.
    """
    ph, pw = to_2tuple(patch_size)
    h, w = x.shape[-2:]
    if h < ph or w < pw:
        raise ValueError(f"image of {h}x{w} px is smaller than one {ph}x{pw} patch")
    if mode == "crop":
        return x[..., : h - h % ph, : w - w % pw]
    if mode == "pad":
        return F.pad(x, (0, (-w) % pw, 0, (-h) % ph))
    raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")


"""Record attention maps and intermediate features with forward hooks, without editing model code.

Both CRATE and timm Vision Transformers run attention through ``F.scaled_dot_product_attention`` by default, which
never materialises the attention matrix. The recorders therefore hook the module whose output carries the
projections and recompute the softmax themselves:

* **CRATE** (:class:`crate_vis.models.MSSA`): the output of ``attn.subspace`` is ``W = U^T z`` per head,
  ``(B, heads, N, dim_head)``, which is query, key and value at once; attention is ``softmax(W W^T * attn.scale)``.
* **timm** (``timm.models.vision_transformer.Attention``): the output of ``attn.qkv`` is split into heads as timm
  does, ``attn.q_norm`` / ``attn.k_norm`` are applied, and attention is ``softmax(q k^T * attn.scale)``, which is
  exactly timm's own explicit (non-fused) path.

With ``cls_only=True`` only the CLS query's row is formed, ``(B, heads, N)``: memory is ``O(N)`` per head instead of
``O(N^2)``, which matters for patch-8 models at high resolution.

Typical use::

    with AttentionRecorder(model, layers=[-1]) as rec:
        model(images)
    attn = rec.attentions[-1]  # (B, heads, N, N)

Hooks are removed when the ``with`` block ends, also on exceptions. If the model runs several times inside one block,
each run overwrites the previous one's recordings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import RecorderError, SelectionError, UsageError
from .models.crate import MSSA
from .models.geometry import layer_index, token_geometry

__all__ = [
    "AttentionRecorder",
    "FeatureRecorder",
    "LayerDict",
    "FEATURES",
    "attention_rollout",
    "cls_attention_maps",
    "subspace_features",
    "model_layers",
    "RecorderError",
    "layer_heads",
    "resolve_heads",
    "resolve_layer",
    "run_until",
]

#: Feature names :class:`FeatureRecorder` knows, in the order they occur inside a block.
FEATURES: tuple[str, ...] = ("mssa_in", "subspace", "mssa_out", "ista_in", "sparse_code", "ista_out")




# --------------------------------------------------------------------------------------------------- layer access
def _child(module: nn.Module, name: str) -> nn.Module:
    """The sub-module ``module.<name>`` (``nn.Module.__getattr__`` is typed ``Tensor | Module``)."""
    return cast(nn.Module, getattr(module, name))


@dataclass(frozen=True)
class _Layer:
    """Where one transformer block keeps the pieces the recorders hook."""

    index: int
    block: nn.Module
    attn: nn.Module
    kind: str  # "crate" or "timm"
    heads: int
    dim_head: int
    scale: float

    @property
    def projection_module(self) -> nn.Module:
        """The module whose forward output carries the per-head projections."""
        return _child(self.attn, "subspace" if self.kind == "crate" else "qkv")

    def query_key(self, out: torch.Tensor, cls_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys ``(B, heads, N, dim_head)`` from :attr:`projection_module`'s output.

        With ``cls_only`` the queries are those of the CLS token alone, ``(B, heads, 1, dim_head)`` (the CLS token is
        always the first token, in CRATE and timm alike).
        """
        if self.kind == "crate":
            return (out[:, :, :1] if cls_only else out), out  # one projection is query, key and value
        b, n, _ = out.shape
        qkv = out.reshape(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)  # (3, B, h, N, dh)
        q, k = qkv[0], qkv[1]
        if cls_only:
            q = q[:, :, :1]  # q_norm acts per token, so normalising the CLS query alone is the same
        return _child(self.attn, "q_norm")(q), _child(self.attn, "k_norm")(k)

    def attention(self, out: torch.Tensor, cls_only: bool) -> torch.Tensor:
        """Softmax attention from the projections: ``(B, h, N, N)``, or ``(B, h, N)`` for the CLS query only."""
        q, k = self.query_key(out, cls_only)  # (B, h, Nq, dh), (B, h, N, dh)
        if q.dtype in (torch.float16, torch.bfloat16):
            # Recorded maps are for analysis: form them in float32 rather than reproduce low-precision rounding.
            q, k = q.float(), k.float()
        dots = torch.matmul(q * self.scale, k.transpose(-1, -2))  # (B, h, Nq, N)
        attn = dots.softmax(dim=-1)
        return attn[:, :, 0] if cls_only else attn  # (B, h, N) or (B, h, N, N)


_LOOKED_FOR = (
    "model.blocks[i].attn being a CRATE MSSA (with .subspace, .heads, .dim_head, .scale) or a timm Attention "
    "(with .qkv, .q_norm, .k_norm, .num_heads, .head_dim, .scale)"
)


def _describe(block: nn.Module, index: int) -> _Layer:
    attn = getattr(block, "attn", None)
    if attn is None:
        raise RecorderError(f"block {index} ({type(block).__name__}) has no .attn module; looked for {_LOOKED_FOR}")
    if isinstance(attn, MSSA) or all(hasattr(attn, a) for a in ("subspace", "heads", "dim_head", "scale")):
        return _Layer(index, block, attn, "crate", int(attn.heads), int(attn.dim_head), float(attn.scale))
    if all(hasattr(attn, a) for a in ("qkv", "q_norm", "k_norm", "num_heads", "head_dim", "scale")):
        heads, dh = int(attn.num_heads), int(attn.head_dim)
        out_features = getattr(attn.qkv, "out_features", None)
        if out_features != 3 * heads * dh:
            raise RecorderError(
                f"block {index}: attn.qkv has {out_features} outputs, expected 3 * num_heads * head_dim = "
                f"{3 * heads * dh} (a fused q/k/v projection as in timm's Attention)"
            )
        return _Layer(index, block, attn, "timm", heads, dh, float(attn.scale))
    raise RecorderError(
        f"block {index}: attention module {type(attn).__name__} is not understood; looked for {_LOOKED_FOR}"
    )


def model_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a CRATE or timm ViT (``model.blocks``), in order.

    Raises:
        RecorderError: the model has no ``blocks`` sequence.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise RecorderError(
            f"{type(model).__name__} has no non-empty .blocks (nn.ModuleList / nn.Sequential); looked for {_LOOKED_FOR}"
        )
    return list(blocks)


def _resolve_layers(depth: int, layers: int | Iterable[int] | None) -> list[int]:
    """Layer indices (negative allowed) -> sorted unique non-negative indices."""
    if layers is None:
        return list(range(depth))
    if isinstance(layers, int):
        layers = [layers]
    out = {layer_index(depth, i) for i in layers}
    if not out:
        raise ValueError("no layers selected")
    return sorted(out)


def resolve_layer(model: nn.Module, layer: int) -> int:
    """``layer`` of ``model`` as a non-negative index (see :func:`crate_vis.models.geometry.layer_index`)."""
    return layer_index(len(model_layers(model)), layer)


def layer_heads(model: nn.Module, layer: int) -> int:
    """Number of attention heads in block ``layer`` (CRATE ``attn.heads`` or timm ``attn.num_heads``)."""
    return _describe(model_layers(model)[resolve_layer(model, layer)], layer).heads


def resolve_heads(heads: Sequence[int] | None, num_heads: int) -> list[int]:
    """Validate head indices (negative count from the end); ``None`` means all.

    Raises:
        SelectionError: a head out of range (the message names the valid range).
        UsageError: no heads, or a head named twice.
    """
    if heads is None:
        return list(range(num_heads))
    bad = [h for h in heads if not -num_heads <= h < num_heads]
    if bad:
        raise SelectionError(f"head {bad[0]} out of range: this layer has heads 0..{num_heads - 1}")
    if not heads:
        raise UsageError("no heads selected")
    out = [h % num_heads for h in heads]
    if len(set(out)) != len(out):
        raise UsageError(f"--heads names a head twice: {','.join(map(str, heads))}")
    return out


class LayerDict(dict):
    """``dict`` keyed by non-negative layer index that also answers negative indices (``d[-1]`` is the last layer
    of the model, as in Python sequences)."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.depth = depth

    def _key(self, key: Any) -> Any:
        if isinstance(key, int) and not isinstance(key, bool) and -self.depth <= key < 0:
            return key % self.depth
        return key

    def __getitem__(self, key: Any) -> Any:
        k = self._key(key)
        if not dict.__contains__(self, k):
            raise KeyError(f"layer {key} was not recorded (recorded: {sorted(dict.keys(self))})")
        return dict.__getitem__(self, k)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, self._key(key))

    def get(self, key: Any, default: Any = None) -> Any:
        return dict.get(self, self._key(key), default)


# ------------------------------------------------------------------------------------------------------ recorders
class _Recorder:
    """Shared context-manager machinery: register hooks on enter, remove them on exit (also on exceptions)."""

    def __init__(self, model: nn.Module, layers: int | Iterable[int] | None, detach: bool) -> None:
        blocks = model_layers(model)
        self.model = model
        self.depth = len(blocks)
        self.layers: list[int] = _resolve_layers(self.depth, layers)
        # Validate every selected block now, so an unsupported model fails before anything runs.
        self._sites = {i: _describe(blocks[i], i) for i in self.layers}
        self.detach = detach
        self._handles: list[RemovableHandle] = []
        self._active = False

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach() if self.detach else t

    def _hook(self, module: nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
        def forward_hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            fn(out)

        self._handles.append(module.register_forward_hook(forward_hook))

    def _register(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def clear(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204
        if self._active:
            raise RuntimeError(f"{type(self).__name__} is already active; it cannot be entered twice")
        self.clear()
        try:
            self._register()
        except BaseException:
            self.remove()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this recorder registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False


class AttentionRecorder(_Recorder):
    """Record the attention maps of chosen layers during a forward pass.

    Works on CRATE and timm ViTs with the fused attention path on: the softmax is recomputed from the hooked
    projections (see the module docstring), so it equals what the explicit path would have materialised.

    Args:
        model: a CRATE or timm VisionTransformer (anything with ``blocks[i].attn`` of either kind).
        layers: layer indices to record (negative indices count from the end); ``None`` records every layer.
        cls_only: record only the CLS query's row over all keys (prefix tokens included; not renormalised).
        detach: store detached tensors (set ``False`` to keep the autograd graph, e.g. for gradient attribution).

    Attributes:
        attentions: :class:`LayerDict` layer index -> ``(B, heads, N, N)``, or ``(B, heads, N)`` with ``cls_only``;
            rows are softmax distributions over all ``N`` tokens (prefix tokens first).

    Raises:
        RecorderError: the model's blocks are not understood (the message names the modules looked for).
        IndexError: a layer index is out of range (the message names the valid range).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: int | Iterable[int] | None = None,
        cls_only: bool = False,
        detach: bool = True,
    ) -> None:
        super().__init__(model, layers, detach)
        if cls_only and getattr(model, "cls_token", True) is None:
            raise ValueError(f"{type(model).__name__} has no class token, so there is no CLS row to record")
        self.cls_only = cls_only
        self.attentions: LayerDict = LayerDict(self.depth)

    def clear(self) -> None:
        """Forget what was recorded."""
        self.attentions = LayerDict(self.depth)

    def _register(self) -> None:
        for i, site in self._sites.items():

            def record(out: torch.Tensor, site: _Layer = site, i: int = i) -> None:
                self.attentions[i] = self._keep(site.attention(out, self.cls_only))

            self._hook(site.projection_module, record)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(layer, attention)`` pairs in layer order."""
        return iter(sorted(self.attentions.items()))


class FeatureRecorder(_Recorder):
    """Record intermediate features of chosen layers during a forward pass.

    Features per layer (names in :data:`FEATURES`), for CRATE and, by analogy, timm ViT blocks:

    ========== ======================================================= ==========================================
    name       CRATE                                                   timm ViT block
    ========== ======================================================= ==========================================
    mssa_in    ``norm1`` output, MSSA input ``(B, N, dim)``               ``norm1`` output
    subspace   ``U_k^T z`` per head ``(B, heads, N, dim_head)``          keys after ``k_norm`` ``(B, h, N, dh)``
    mssa_out   MSSA output before the residual ``(B, N, dim)``         attention output before the residual
    ista_in    ``norm2`` output, ISTA input ``(B, N, dim)``              ``norm2`` output (MLP input)
    sparse_code the ISTA sparse code: CRATE's ISTA output ``(B, N,       block output (after both residuals)
               dim)``; CRATE-alpha's overcomplete code ``ista.sparse_
               code`` ``(B, N, ratio * dim)``
    ista_out   block output (= ISTA output) ``(B, N, dim)``            block output (after both residuals)
    ========== ======================================================= ==========================================

    Args:
        model: a CRATE or timm VisionTransformer.
        layers: layer indices to record (negative allowed); ``None`` for every layer.
        features: which of :data:`FEATURES` to record.
        detach: store detached tensors.

    Attributes:
        features: :class:`LayerDict` layer -> ``{name: tensor}``.
        final: output tokens of the last block ``(B, N, dim)`` (before any final norm), recorded whatever
            ``layers`` says.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: int | Iterable[int] | None = None,
        features: Sequence[str] = FEATURES,
        detach: bool = True,
    ) -> None:
        super().__init__(model, layers, detach)
        if isinstance(features, str):
            features = (features,)
        unknown = [f for f in features if f not in FEATURES]
        if unknown or not features:
            raise ValueError(f"unknown feature names {unknown}; choose from {list(FEATURES)}")
        self.feature_names = tuple(dict.fromkeys(features))
        for i, site in self._sites.items():
            for name, attr in (("mssa_in", "norm1"), ("ista_in", "norm2")):
                if name in self.feature_names and not isinstance(getattr(site.block, attr, None), nn.Module):
                    raise RecorderError(f"block {i} has no .{attr} module, needed for feature {name!r}")
        self.features: LayerDict = LayerDict(self.depth)
        self.final: torch.Tensor | None = None

    def clear(self) -> None:
        """Forget what was recorded."""
        self.features = LayerDict(self.depth)
        self.final = None

    def _store(self, layer: int, name: str, value: torch.Tensor) -> None:
        self.features.setdefault(layer, {})[name] = self._keep(value)

    def _register(self) -> None:
        for i, site in self._sites.items():
            ista = getattr(site.block, "ista", None)
            modules: dict[str, nn.Module | None] = {
                "mssa_in": _child(site.block, "norm1") if "mssa_in" in self.feature_names else None,
                "mssa_out": site.attn,
                "ista_in": _child(site.block, "norm2") if "ista_in" in self.feature_names else None,
                # the sparse code: CRATE-alpha's overcomplete code, CRATE's ISTA output, a ViT's block output
                "sparse_code": getattr(ista, "sparse_code", None) or ista or site.block,
                "ista_out": site.block,
            }
            for name in self.feature_names:
                if name == "subspace":

                    def record_subspace(out: torch.Tensor, site: _Layer = site, i: int = i) -> None:
                        self._store(i, "subspace", site.query_key(out)[1])  # keys (= the projection for CRATE)

                    self._hook(site.projection_module, record_subspace)
                else:

                    def record(out: torch.Tensor, i: int = i, name: str = name) -> None:
                        self._store(i, name, out)

                    module = modules[name]
                    assert module is not None  # None only for the inputs of features not asked for
                    self._hook(module, record)
        last = model_layers(self.model)[-1]

        def record_final(out: torch.Tensor) -> None:
            self.final = self._keep(out)

        self._hook(last, record_final)


# ------------------------------------------------------------------------------------------------------- rollout
def attention_rollout(
    attentions: Sequence[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) across layers.

    Per layer: fuse heads (``mean`` / ``max`` / ``min``), optionally zero the ``discard_ratio`` fraction of smallest
    entries per row (never the diagonal, as is customary, so the identity path survives), add the identity, and
    normalise each row to sum 1: ``A' = rownorm(A + I)``. The rollout is ``A'_L ... A'_2 A'_1`` (later layers
    multiply on the left).

    Args:
        attentions: per-layer maps ``(B, h, N, N)`` in forward order.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        discard_ratio: fraction in ``[0, 1)`` of each row's smallest fused weights set to zero before adding ``I``.

    Returns:
        ``(B, N, N)`` rollout; row ``i`` is how token ``i`` of the last layer draws on the input tokens.
    """
    if not attentions:
        raise ValueError("attention_rollout needs at least one layer")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    fuse = {"mean": lambda a: a.mean(dim=1), "max": lambda a: a.amax(dim=1), "min": lambda a: a.amin(dim=1)}
    if head_fusion not in fuse:
        raise ValueError(f"head_fusion must be one of {sorted(fuse)}, got {head_fusion!r}")
    result: torch.Tensor | None = None
    for a in attentions:
        if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"expected attention maps (B, h, N, N), got {tuple(a.shape)}")
        fused = fuse[head_fusion](a.double())  # (B, N, N); float64 so long products stay accurate
        n = fused.shape[-1]
        eye = torch.eye(n, dtype=fused.dtype, device=fused.device)
        if discard_ratio > 0:
            k = int(n * discard_ratio)
            if k > 0:
                off = fused.masked_fill(eye.bool(), float("inf"))  # keep the diagonal out of the discard
                idx = off.topk(k, dim=-1, largest=False).indices  # (B, N, k)
                fused = fused.scatter(-1, idx, 0.0)
        fused = fused + eye
        fused = fused / fused.sum(dim=-1, keepdim=True)
        result = fused if result is None else torch.matmul(fused, result)  # later layers on the left
        if result.shape[0] != fused.shape[0]:
            raise ValueError("all layers must have the same batch size")
    assert result is not None
    return result.to(attentions[0].dtype)


# ------------------------------------------------------------------------------------------ convenience wrappers
class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the layers of interest have run."""


def run_until(model: nn.Module, images: torch.Tensor, last_layer: int) -> None:
    """Run the model's trunk on ``images`` and stop right after block ``last_layer`` (later blocks would only cost
    time).

    Register recorders before calling: forward hooks run in registration order, so they have seen the block's
    output when the stopping hook fires.
    """
    block = model_layers(model)[last_layer]

    def stop(_mod: nn.Module, _inp: Any, _out: Any) -> None:
        raise _StopForward

    handle = block.register_forward_hook(stop)
    try:
        forward = getattr(model, "forward_features", None) or model
        forward(images)
    except _StopForward:
        pass
    finally:
        handle.remove()


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images as a tensor (B, C, H, W), got {shape}")


@torch.no_grad()
def cls_attention_maps(model: nn.Module, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """The CLS query's attention to the patch tokens of one layer, on the patch grid.

    Values are the raw softmax weights (not renormalised after dropping the prefix columns), so the maps of one
    head sum to ``1 - attention to prefix tokens``.

    Args:
        model: CRATE or timm ViT (fused path on or off); its train/eval mode is left as it is.
        images: ``(B, C, H, W)`` with ``H, W`` multiples of the patch size.
        layer: layer index (negative counts from the end).

    Returns:
        ``(B, heads, gh, gw)`` with the grid read from :func:`crate_vis.models.token_geometry`.
    """
    _check_images(images)
    geom = token_geometry(model, tuple(images.shape[-2:]))
    rec = AttentionRecorder(model, layers=[layer], cls_only=True)
    with rec:
        run_until(model, images, rec.layers[-1])
    attn = rec.attentions[rec.layers[0]]  # (B, h, N)
    patches = attn[..., geom.num_prefix_tokens :]  # (B, h, gh*gw)
    if patches.shape[-1] != geom.num_patches:
        raise RuntimeError(f"recorded {patches.shape[-1]} patch tokens, expected {geom.num_patches} for {geom}")
    return patches.reshape(*patches.shape[:2], *geom.grid)


@torch.no_grad()
def subspace_features(model: nn.Module, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """Per-head features of the patch tokens of one layer, e.g. for MaskCut affinities.

    CRATE: the MSSA subspace projections ``U_k^T z`` (query = key = value). timm ViT: the keys after ``k_norm``.

    Args:
        model: CRATE or timm ViT.
        images: ``(B, C, H, W)``.
        layer: layer index (negative counts from the end).

    Returns:
        ``(B, heads, N_patches, dim_head)``, patch tokens in row-major grid order (prefix tokens dropped).
    """
    _check_images(images)
    geom = token_geometry(model, tuple(images.shape[-2:]))
    rec = FeatureRecorder(model, layers=[layer], features=("subspace",))
    with rec:
        run_until(model, images, rec.layers[-1])
    feats = rec.features[rec.layers[0]]["subspace"]  # (B, h, N, dh)
    return feats[:, :, geom.num_prefix_tokens :]

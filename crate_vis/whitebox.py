"""White-box diagnostics of CRATE layers: coding rates, rate reduction and sparsity, per layer and over datasets.

Definitions (``Z`` holds ``N`` tokens of width ``d`` as rows; ``U_k`` is head ``k``'s ``d x p`` subspace basis, so the
per-head projections are the rows of ``Z U_k``; ``eps`` is the distortion):

* **Measured coding rate** (:func:`coding_rate`), exactly as the reference measurement of the official CRATE code
  computes it: per head, each token's projection is scaled to unit length (a zero vector stays zero), then

  ``R_meas = 1/2 sum_k logdet(I_p + p / (N eps) X_k^T X_k)``, ``X_k`` the ``N x p`` normalised projections,

  with ``eps = 0.01``. Note ``eps`` (not ``eps^2``) in the normalisation: that is what the reference does.
  :func:`measure_layers` applies it per layer to that layer's MSSA projections ``qkv(LN(z))`` split into heads.

* **Compression term** (:func:`compression_rate`), as in "White-Box Transformers via Sparse Rate Reduction"
  (Yu et al., NeurIPS 2023), eq. for ``R^c``:

  ``R^c(Z; U_[K]) = sum_k R(U_k^T Z) = 1/2 sum_k logdet(I + p / (N eps^2) (Z U_k)^T (Z U_k))`` (no normalisation of
  the tokens).

* **Total coding rate** (:func:`total_rate`), same paper: ``R(Z) = 1/2 logdet(I_d + d / (N eps^2) Z^T Z)``.

* **Rate reduction** (:func:`rate_reduction`): ``Delta R(Z; U) = R(Z) - R^c(Z; U)``; the sparse rate reduction
  objective of the paper is ``Delta R - lambda ||Z||_0``.

* **Sparsity** (:func:`sparsity`): the fraction of exact zeros of the tokens (the ISTA output is a ReLU, so many
  entries are exactly zero), i.e. ``||Z||_0 / (N d)`` subtracted from 1; and the ``l1/l2`` measure
  (:func:`l1_l2_ratio`) ``mean_i ||z_i||_1 / (sqrt(d) ||z_i||_2)``, in ``[1/sqrt(d), 1]``: 1 for a token whose
  entries all have equal magnitude, ``1/sqrt(d)`` for a 1-sparse token (a zero token counts as 0).

All log-determinants are taken in float64 through a Cholesky factorisation of the smaller Gram matrix
(``logdet(I_p + a X^T X) = logdet(I_N + a X X^T)``), falling back to ``slogdet`` where Cholesky fails.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .hooks import FeatureRecorder, model_layers, run_until
from .models.crate import MSSA

__all__ = [
    "DEFAULT_EPS",
    "METRICS",
    "REFERENCE_DDOF",
    "LayerStatsAccumulator",
    "coding_rate",
    "compression_rate",
    "l1_l2_ratio",
    "logdet_identity_plus_gram",
    "measure_layers",
    "rate_reduction",
    "sparsity",
    "subspace_bases",
    "total_rate",
    "unit_normalize",
]

DEFAULT_EPS = 0.01

#: Per-image metrics :func:`measure_layers` returns for every layer.
METRICS: tuple[str, ...] = (
    "coding_rate", "sparsity", "l1l2", "compression_rate", "total_rate", "rate_reduction",
)  # fmt: skip

#: Standard-deviation convention of the reference statistics (golden ``coding_rate`` / ``sparsity``): the coding
#: rate's std over images is the sample std (``ddof=1``), the sparsity's the population std (``ddof=0``). Other
#: metrics use the sample std.
REFERENCE_DDOF: dict[str, int] = {"coding_rate": 1, "sparsity": 0}


# ------------------------------------------------------------------------------------------------- primitives
def unit_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Scale vectors along ``dim`` to unit Euclidean length; a zero vector stays zero (its direction is undefined,
    so it contributes nothing to a coding rate)."""
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(x))


def logdet_identity_plus_gram(x: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """``logdet(I + alpha X^T X)`` for ``X`` of shape ``(..., n, m)``, in float64.

    Uses whichever Gram matrix is smaller (``m x m`` or ``n x n``; the determinants are equal by Sylvester's
    identity) and a Cholesky factorisation, which is safe since ``I + alpha X^T X`` is positive definite for
    ``alpha >= 0``; batches where Cholesky reports failure fall back to ``slogdet``.

    Returns:
        ``(...)`` float64.
    """
    x = x.double()
    n, m = x.shape[-2], x.shape[-1]
    gram = x.transpose(-1, -2) @ x if m <= n else x @ x.transpose(-1, -2)  # (..., k, k), k = min(n, m)
    k = gram.shape[-1]
    mat = torch.eye(k, dtype=torch.float64, device=x.device) + alpha * gram
    chol, info = torch.linalg.cholesky_ex(mat)
    out = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (...)
    bad = info != 0
    if bool(bad.any()):
        sign, logabs = torch.linalg.slogdet(mat[bad])
        if bool((sign <= 0).any()):
            raise FloatingPointError("I + alpha X^T X is not positive definite: the input holds inf or NaN")
        out = out.clone()
        out[bad] = logabs
    return out


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or inf")


def _check_rate_input(x: torch.Tensor, eps: float, what: str) -> tuple[int, int]:
    """Shared checks of the rate functions; returns ``(N, features)`` of ``x`` ``(..., N, features)``."""
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    n, f = x.shape[-2], x.shape[-1]
    if n == 0 or f == 0:
        raise ValueError(f"need at least one token and one feature, got N={n}, features={f}")
    _check_finite(x, what)
    return n, f


def coding_rate(x: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """The reference's measured coding rate of per-head projections.

    ``R = 1/2 sum_k logdet(I_p + p / (N eps) X_k^T X_k)`` where ``X_k`` (``N x p``) holds head ``k``'s projections,
    each token's row scaled to unit length (zero rows stay zero).

    Args:
        x: ``(B, heads, N, p)`` or ``(heads, N, p)`` per-head projections (e.g. ``FeatureRecorder``'s
            ``"subspace"``).
        eps: distortion (the reference uses 0.01).

    Returns:
        ``(B,)`` (or a scalar) float64 coding rates.
    """
    if x.ndim not in (3, 4):
        raise ValueError(f"expected per-head projections (B, heads, N, p) or (heads, N, p), got {tuple(x.shape)}")
    n, p = _check_rate_input(x, eps, "the projections")
    xn = unit_normalize(x.double())  # (..., h, N, p)
    return 0.5 * logdet_identity_plus_gram(xn, p / (n * eps)).sum(-1)


def total_rate(z: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Coding rate of the tokens, ``R(Z) = 1/2 logdet(I_d + d / (N eps^2) Z^T Z)`` (Yu et al., 2023).

    Args:
        z: ``(B, N, d)`` or ``(N, d)`` tokens.
        eps: distortion.

    Returns:
        ``(B,)`` (or a scalar) float64.
    """
    if z.ndim not in (2, 3):
        raise ValueError(f"expected tokens (B, N, d) or (N, d), got {tuple(z.shape)}")
    n, d = _check_rate_input(z, eps, "the tokens")
    return 0.5 * logdet_identity_plus_gram(z, d / (n * eps**2))


def subspace_bases(source: nn.Module | torch.Tensor) -> torch.Tensor:
    """Per-head subspace bases ``U`` as ``(heads, d, p)``.

    Args:
        source: a CRATE block, its :class:`~crate_vis.models.MSSA`, or a tensor ``(heads, d, p)`` of bases.
            The MSSA's ``qkv`` weight ``(heads * p, d)`` stacks ``U_k^T`` head after head.
    """
    if isinstance(source, torch.Tensor):
        if source.ndim != 3:
            raise ValueError(f"expected bases (heads, d, p), got {tuple(source.shape)}")
        return source
    attn = getattr(source, "attn", source)
    if not isinstance(attn, MSSA):
        raise TypeError(f"expected a CRATE block, an MSSA module or a (heads, d, p) tensor, got {type(source).__name__}")
    w = attn.qkv.weight  # (heads * p, d)
    return w.reshape(attn.heads, attn.dim_head, w.shape[-1]).transpose(1, 2)  # (heads, d, p)


def compression_rate(z: torch.Tensor, source: nn.Module | torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """The compression term ``R^c(Z; U) = 1/2 sum_k logdet(I_p + p / (N eps^2) (Z U_k)^T (Z U_k))``.

    Args:
        z: ``(B, N, d)`` or ``(N, d)`` tokens the subspaces act on (for a CRATE block: the MSSA input, i.e. the
            ``norm1`` output, as in the paper's layer ``Z^{l+1/2} = Z^l + MSSA(Z^l)`` up to the LayerNorm).
        source: a CRATE block / MSSA (bases read from its ``qkv`` weight) or bases ``(heads, d, p)``.
        eps: distortion.

    Returns:
        ``(B,)`` (or a scalar) float64.
    """
    if z.ndim not in (2, 3):
        raise ValueError(f"expected tokens (B, N, d) or (N, d), got {tuple(z.shape)}")
    u = subspace_bases(source).detach().double()  # (h, d, p)
    if u.shape[1] != z.shape[-1]:
        raise ValueError(f"bases have width {u.shape[1]}, tokens {z.shape[-1]}")
    n, p = z.shape[-2], u.shape[-1]
    if n == 0:
        raise ValueError("need at least one token")
    _check_finite(z, "the tokens")
    proj = z.double().unsqueeze(-3) @ u  # (..., h, N, p)
    return 0.5 * logdet_identity_plus_gram(proj, p / (n * eps**2)).sum(-1)


def rate_reduction(z: torch.Tensor, source: nn.Module | torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``Delta R(Z; U) = R(Z) - R^c(Z; U)`` (see :func:`total_rate`, :func:`compression_rate`)."""
    return total_rate(z, eps) - compression_rate(z, source, eps)


def sparsity(z: torch.Tensor) -> torch.Tensor:
    """Fraction of exact zeros per sample: ``1 - ||Z||_0 / (N d)``.

    Args:
        z: ``(B, N, d)`` (or ``(N, d)``) tokens, e.g. the ISTA output; all tokens count, CLS included, as in the
            reference measurement.

    Returns:
        ``(B,)`` (or a scalar) float64.
    """
    if z.ndim not in (2, 3) or z.shape[-1] == 0 or z.shape[-2] == 0:
        raise ValueError(f"expected non-empty tokens (B, N, d) or (N, d), got {tuple(z.shape)}")
    return (z == 0).double().mean(dim=(-2, -1))


def l1_l2_ratio(z: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``||z_i||_1 / (sqrt(d) ||z_i||_2)`` (a zero token counts as 0).

    In ``[1/sqrt(d), 1]`` for non-zero tokens: lower is sparser, 1 means every entry has the same magnitude.

    Args:
        z: ``(B, N, d)`` or ``(N, d)`` tokens.

    Returns:
        ``(B,)`` (or a scalar) float64.
    """
    if z.ndim not in (2, 3) or z.shape[-1] == 0 or z.shape[-2] == 0:
        raise ValueError(f"expected non-empty tokens (B, N, d) or (N, d), got {tuple(z.shape)}")
    _check_finite(z, "the tokens")
    z = z.double()
    l1 = z.abs().sum(-1)  # (..., N)
    l2 = torch.linalg.vector_norm(z, dim=-1)
    ratio = torch.where(l2 > 0, l1 / (math.sqrt(z.shape[-1]) * torch.where(l2 > 0, l2, 1.0)), 0.0)
    return ratio.mean(-1)


# ------------------------------------------------------------------------------------------------- per layer
@torch.no_grad()
def measure_layers(
    model: nn.Module,
    images: torch.Tensor,
    layers: int | Iterable[int] | None = None,
    eps: float = DEFAULT_EPS,
) -> dict[int, dict[str, torch.Tensor]]:
    """Per-layer, per-image white-box measurements of one batch.

    For layer ``l`` with input ``z``: ``coding_rate`` of the MSSA projections ``qkv(LN(z))`` split into heads
    (:func:`coding_rate`); ``sparsity`` and ``l1l2`` of the layer's sparse code (CRATE's ISTA output, CRATE-alpha's
    overcomplete code ``ista.sparse_code``, the CRATE-MAE encoder's ISTA output; a ViT's block output);
    ``compression_rate`` ``R^c(LN(z); U)``, ``total_rate`` ``R(LN(z))`` and ``rate_reduction`` their difference
    (CRATE only, where the bases ``U`` are the MSSA projection).

    For timm ViTs the same quantities are computed by analogy (coding rate of the per-head keys, sparsity of the
    block output); the ``R^c`` terms are left out since a ViT has no single subspace per head.

    Args:
        model: CRATE or timm ViT; its train/eval mode is left as it is.
        images: ``(B, C, H, W)``.
        layers: layers to measure (negative allowed); ``None`` for all.
        eps: distortion for every rate.

    Returns:
        ``{layer: {metric: (B,) float64}}`` with metrics from :data:`METRICS`.
    """
    rec = FeatureRecorder(model, layers=layers, features=("mssa_in", "subspace", "sparse_code"))
    with rec:
        run_until(model, images, rec.layers[-1])  # layers after the last one measured need not run
    blocks = model_layers(model)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for i in rec.layers:
        f = rec.features[i]
        m = {
            "coding_rate": coding_rate(f["subspace"], eps),
            "sparsity": sparsity(f["sparse_code"]),
            "l1l2": l1_l2_ratio(f["sparse_code"]),
        }
        if isinstance(getattr(blocks[i], "attn", None), MSSA):
            m["compression_rate"] = compression_rate(f["mssa_in"], blocks[i], eps)
            m["total_rate"] = total_rate(f["mssa_in"], eps)
            m["rate_reduction"] = m["total_rate"] - m["compression_rate"]
        out[i] = {k: v.detach().cpu() for k, v in m.items()}
    return out


class LayerStatsAccumulator:
    """Streaming per-layer mean and standard deviation over images (Chan/Welford merging in float64).

    Feed it the output of :func:`measure_layers` batch after batch::

        acc = LayerStatsAccumulator()
        for images in loader:
            acc.update(measure_layers(model, images))
        acc.mean("coding_rate"), acc.std("coding_rate")  # (L,) arrays

    The result does not depend on how the images were split into batches (up to float64 rounding).
    """

    def __init__(self) -> None:
        self._count: dict[tuple[int, str], int] = {}
        self._mean: dict[tuple[int, str], float] = {}
        self._m2: dict[tuple[int, str], float] = {}

    def update(self, values: Mapping[int, Mapping[str, torch.Tensor | np.ndarray]]) -> None:
        """Add one batch: ``{layer: {metric: (B,) values}}``."""
        for layer, metrics in values.items():
            for name, v in metrics.items():
                arr = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64).ravel()
                if arr.size == 0:
                    continue
                if not np.all(np.isfinite(arr)):
                    raise ValueError(f"layer {layer} {name}: non-finite values")
                key = (int(layer), name)
                nb, mb = arr.size, float(arr.mean())
                m2b = float(((arr - mb) ** 2).sum())
                na = self._count.get(key, 0)
                if na == 0:
                    self._count[key], self._mean[key], self._m2[key] = nb, mb, m2b
                    continue
                ma, m2a = self._mean[key], self._m2[key]
                n = na + nb
                delta = mb - ma
                self._count[key] = n
                self._mean[key] = ma + delta * nb / n
                self._m2[key] = m2a + m2b + delta * delta * na * nb / n

    @property
    def layers(self) -> list[int]:
        """Layers seen, sorted."""
        return sorted({k[0] for k in self._count})

    @property
    def metrics(self) -> list[str]:
        """Metric names seen, in :data:`METRICS` order first."""
        names = {k[1] for k in self._count}
        return [m for m in METRICS if m in names] + sorted(names - set(METRICS))

    def count(self, metric: str) -> np.ndarray:
        """``(L,)`` number of values per layer."""
        return np.array([self._count.get((layer, metric), 0) for layer in self.layers], dtype=np.int64)

    def _get(self, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = [(layer, metric) for layer in self.layers]
        if not any(k in self._count for k in keys):
            raise KeyError(f"no values for metric {metric!r} (have {self.metrics})")
        n = np.array([self._count.get(k, 0) for k in keys], dtype=np.float64)
        mean = np.array([self._mean.get(k, np.nan) for k in keys])
        m2 = np.array([self._m2.get(k, np.nan) for k in keys])
        return n, mean, m2

    def mean(self, metric: str) -> np.ndarray:
        """``(L,)`` mean per layer (NaN for a layer without values)."""
        return self._get(metric)[1]

    def std(self, metric: str, ddof: int | None = None) -> np.ndarray:
        """``(L,)`` standard deviation per layer.

        Args:
            metric: metric name.
            ddof: delta degrees of freedom; ``None`` uses the reference convention :data:`REFERENCE_DDOF`
                (sample std, except population std for ``sparsity``). NaN where fewer than ``ddof + 1`` values.
        """
        d = REFERENCE_DDOF.get(metric, 1) if ddof is None else ddof
        n, _, m2 = self._get(metric)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > d, np.sqrt(m2 / np.maximum(n - d, 1e-300)), np.nan)

    def summary(self) -> dict[str, dict[str, np.ndarray]]:
        """``{metric: {"mean": (L,), "std": (L,), "count": (L,)}}`` with the reference std convention."""
        return {m: {"mean": self.mean(m), "std": self.std(m), "count": self.count(m)} for m in self.metrics}


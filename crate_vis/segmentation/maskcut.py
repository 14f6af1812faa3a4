"""MaskCut and TokenCut: normalized cuts on a patch-affinity graph, one object at a time.

The procedure of MaskCut (Wang et al., "Cut and Learn", CVPR 2023, ``maskcut/maskcut.py`` of
facebookresearch/CutLER, function ``maskcut_forward``), without the CRF, as the CRATE emergence paper (Yu et al.,
2023) applied it to CRATE features:

1. Features ``(N, d)`` of the patch tokens (for CRATE the per-head subspace projections ``U_k^T z`` of a layer,
   concatenated over heads; for a ViT the attention keys) are L2-normalised; the affinity is their cosine
   similarity, binarised: ``A_ij = 1`` where ``sim_ij > tau``, else a small ``eps`` (1e-5) so the graph stays
   connected.
2. With ``D = diag(A 1)``, the second-smallest generalised eigenvector ``x`` of ``(D - A) x = lambda D x`` (the
   relaxed normalized cut) is split at its mean: ``P = {x > mean(x)}`` and its complement.
3. Foreground choice: the side holding the seed ``argmax |x|``, unless a corner rule (object-centric prior: the
   background touches the image corners) says otherwise; the eigenvector is oriented so the foreground is its
   positive side and the final seed is the foreground token with the largest oriented value.
4. The mask is the 4-connected component of the foreground containing that seed.
5. Up to ``max_masks`` masks: before each further cut the features of all tokens of earlier masks are zeroed, so
   those tokens keep only ``eps`` edges. A further mask (never the first) is dropped when its IoU with the previous
   mask exceeds 0.5 or when it covers at most 1 % of the grid. Returned masks are made disjoint (pixels of earlier
   masks removed).

Two sets of rules for steps 3 and 5 (``maskcut(..., rules=...)``):

* ``"default"``: the corner rule does not depend on the eigenvector's sign, which eigen-solvers leave arbitrary:
  if the seed's side holds 3 or 4 of the 4 grid corners, the other side is the foreground. The search stops at the
  first dropped mask. Every solver (dense, Lanczos, torch) gives the same masks, up to exact ties (see TokenCut
  below).
* ``"cutler"``: ``maskcut_forward`` exactly (its ``cpu=True`` path), for reproducing CutLER's pseudo-masks:

  - Step 3 counts the corners of ``P = {x > mean}`` before looking at the seed: with 3+ corners the foreground is
    the complement of ``P``, otherwise the seed's side. Where the seed's side holds 3+ corners and the solver
    returns ``-x`` (so that side is the complement of ``P``), the corner-heavy side is kept. The result therefore
    depends on the sign of the eigenvector, which is why this rule uses the reference's solver call,
    ``scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])`` (first column), and no other solver. The sign is
    LAPACK's: with another LAPACK build the reference itself can return other masks.
  - After a dropped mask the reference keeps cutting: the graph is unchanged (a dropped mask paints nothing), so
    the next cut repeats the dropped one, is compared against the empty "previous" mask (IoU 0) and is kept when
    larger than 1 %; what it adds beyond earlier masks is returned as a further mask.
  - The similarities are computed as the reference computes them, with torch in the features' precision (float32
    features give float32 similarities, compared to ``tau`` in float32); from the second cut on, painting the
    features with a float64 mask promotes them to float64, as in the reference. Pass the features in the dtype the
    model produced to reproduce the reference bit for bit.
  - The reference always returns ``N`` arrays, all-zero where a mask was dropped or lay inside earlier masks;
    CutLER's annotation writer skips those (area < 1). Here they are left out, so the result holds the reference's
    non-empty masks in its order.

  The reference only runs on square grids (it reshapes the painting with ``view(dim, ps, ps)``); here the same
  rules run on any grid, painting by token.

On the 30 feature sets of ``tests/test_maskcut_reference.py`` the two rules give the same masks on 21; 7 differ by
the corner rule and 2 by the cuts after a drop. The dense solve costs O(N^3) per cut: at 3600 tokens (a 60x60 grid)
the ``"cutler"`` search takes tens of seconds on a CPU, the default one with Lanczos about a second or two.

TokenCut (Wang et al., CVPR 2022, ``object_discovery.py::ncut`` of YangtaoWANG95/TokenCut) is a single cut
(:func:`tokencut`, ``tau=0.2``) with its own step 3: the foreground is the side of ``P`` holding the seed
``argmax |x|``, with no corner rule, and the mask is the seed's 4-connected component. This rule does not depend on
the eigenvector's sign, so any solver may be used; the solvers' rounding only decides where the exact answer is a
tie: tokens exactly at the mean, or a largest ``|x|`` shared by tokens (tokens with the same neighbours in the
binarised graph have equal entries) in different components.

Scores: each mask's score is ``1 - Ncut(S) / 2`` with ``Ncut(S) = cut(S, V\\S) / assoc(S, V) + cut(S, V\\S) /
assoc(V\\S, V)`` evaluated on the graph the mask was cut from, with ``S`` its connected component. It lies in
``[0, 1]``; 1 is a perfectly separated object.

Solvers (:func:`second_smallest_eigenvector`): ``"dense"`` is the reference's call (``scipy.linalg.eigh`` on the
generalised pair, O(N^3)); ``"lanczos"`` runs ``scipy.sparse.linalg.eigsh`` on the symmetric normalised affinity
``D^-1/2 A D^-1/2`` with its known top eigenvector ``D^1/2 1`` deflated, which needs only matrix-vector products;
``"torch"`` runs ``torch.linalg.eigh`` on the same deflated matrix in float64 on a torch device (a GPU, or the CPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch
import torch.nn.functional as F

from .masks import as_pair, component_at, mask_iou

__all__ = [
    "MaskCutResult",
    "affinity_matrix",
    "second_smallest_eigenvector",
    "ncut_value",
    "bipartition",
    "maskcut",
    "tokencut",
    "DENSE_MAX_TOKENS",
    "SOLVERS",
    "MASKCUT_RULES",
    "TOKENCUT_RULES",
]

#: ``solver="auto"`` uses the dense generalised solver up to this many tokens, Lanczos above.
DENSE_MAX_TOKENS = 256

#: Graphs up to this many tokens are solved with one BLAS thread: on small matrices OpenBLAS's thread hand-offs
#: cost more than the arithmetic, up to 100x more on a busy machine.
SINGLE_THREAD_MAX_TOKENS = 1024

#: Eigen-solvers of :func:`second_smallest_eigenvector`.
SOLVERS = ("auto", "dense", "lanczos", "torch")
#: ``rules`` of :func:`maskcut`.
MASKCUT_RULES = ("default", "cutler")
#: ``rules`` of :func:`tokencut`.
TOKENCUT_RULES = ("tokencut", "maskcut")
#: Rules of one cut (:func:`bipartition`).
_CUT_RULES = ("default", "cutler", "tokencut")

_CONTROLLER = None


def _blas_threads(n: int) -> contextlib.AbstractContextManager:
    """One BLAS thread for small graphs, the library's default otherwise."""
    global _CONTROLLER
    if n > SINGLE_THREAD_MAX_TOKENS:
        return contextlib.nullcontext()
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


@dataclass
class MaskCutResult:
    """Masks found by :func:`maskcut` or :func:`tokencut` for one image.

    Attributes:
        masks: ``(K, gh, gw)`` boolean, disjoint, in the order found (K may be 0).
        scores: ``(K,)`` ``1 - Ncut / 2`` of each mask's cut, in ``[0, 1]``.
        eigenvectors: ``(K, gh, gw)`` the oriented second eigenvector of the cut that produced each mask
            (foreground on the positive side of its mean split).
        seeds: ``(row, col)`` of each mask's seed token.
        stop_reason: why the search ended before ``max_masks`` cuts (``""`` when it did not).
    """

    masks: np.ndarray
    scores: np.ndarray
    eigenvectors: np.ndarray
    seeds: list[tuple[int, int]] = field(default_factory=list)
    stop_reason: str = ""

    def __len__(self) -> int:
        return int(self.masks.shape[0])


def _as_numpy_features(features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, d), got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or infinite values")
    return f


def _as_torch_features(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(N, d)`` CPU tensor in the features' own precision: float32 (also for half types) or float64."""
    t = features.detach().cpu() if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    if t.ndim != 2:
        raise ValueError(f"features must be (N, d), got shape {tuple(t.shape)}")
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    elif t.dtype not in (torch.float32, torch.float64):
        t = t.double()
    if not torch.isfinite(t).all():
        raise ValueError("features contain NaN or infinite values")
    return t.contiguous()


def affinity_matrix(features: np.ndarray | torch.Tensor, tau: float = 0.15, eps: float = 1e-5) -> np.ndarray:
    """Binarised cosine-similarity graph of the tokens, computed in float64.

    Args:
        features: ``(N, d)`` token features; all-zero rows (painted-out tokens) have similarity 0 to everything.
        tau: edge threshold on the cosine similarity.
        eps: weight of the non-edges (keeps the graph connected).

    Returns:
        ``(N, N)`` float64 affinity with entries 1 or ``eps``.
    """
    f = _as_numpy_features(features)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    f = f / np.maximum(norms, 1e-12)  # (N, d); zero rows stay zero, as F.normalize does
    sim = f @ f.T  # (N, N)
    return np.where(sim > tau, 1.0, eps)


def _reference_affinity(features: torch.Tensor, tau: float, eps: float) -> np.ndarray:
    """The affinity as CutLER and TokenCut compute it: torch in the features' dtype, thresholded in numpy.

    ``features`` is ``(N, d)`` contiguous; the normalisation runs along its rows and the product is ``X X^T`` with
    ``X`` row-major, which is the memory layout of both references (CutLER's ``(d, N)`` keys are a transposed
    view of ``(N, d)``), so the float32 similarities are bit-identical to theirs.
    """
    fn = F.normalize(features, p=2, dim=1)  # (N, d); zero rows stay zero
    sim = (fn @ fn.T).numpy()  # (N, N) in the features' dtype
    return np.where(sim > tau, 1.0, eps)  # ``sim > tau`` compares in that dtype, as the reference's ``A > tau``


def second_smallest_eigenvector(
    affinity: np.ndarray,
    solver: str = "auto",
    tol: float = 1e-10,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, float]:
    """Second-smallest generalised eigenvector of ``(D - A) x = lambda D x``.

    Args:
        affinity: ``(N, N)`` symmetric non-negative affinity with positive degrees.
        solver: ``"dense"`` (``scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])``, the call of CutLER and
            TokenCut, so the same eigenvector including its sign), ``"lanczos"`` (``eigsh`` on ``D^-1/2 A D^-1/2``
            with ``D^1/2 1`` deflated), ``"torch"`` (``torch.linalg.eigh`` on that deflated matrix in float64 on
            ``device``) or ``"auto"`` (dense up to :data:`DENSE_MAX_TOKENS` tokens, Lanczos above).
        tol: relative accuracy of the Lanczos eigenpair.
        device: torch device of the ``"torch"`` solver (default CPU); ignored by the others.

    Returns:
        ``(x, lambda)``: ``x`` of shape ``(N,)`` normalised so ``x^T D x = 1`` (sign: the solver's), and its
        eigenvalue.

    Raises:
        ValueError: for a non-square affinity, fewer than 2 tokens, a zero degree or an unknown solver.

    Example:
        >>> a = np.array([[1, 1, 0.01, 0], [1, 1, 0, 0], [0.01, 0, 1, 1], [0, 0, 1, 1]])
        >>> x, lam = second_smallest_eigenvector(a, "dense")
        >>> bool(np.sign(x[0]) == np.sign(x[1]) != np.sign(x[2]) == np.sign(x[3]))
        True
    """
    a = np.asarray(affinity, dtype=np.float64)
    n = a.shape[0]
    if a.ndim != 2 or a.shape[1] != n:
        raise ValueError(f"affinity must be square, got shape {a.shape}")
    if n < 2:
        raise ValueError(f"a normalized cut needs at least 2 tokens, got {n}")
    d = a.sum(axis=1)  # (N,)
    if (d <= 0).any():
        raise ValueError("every token needs a positive degree (use eps > 0)")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "auto":
        solver = "dense" if n <= DENSE_MAX_TOKENS else "lanczos"
    if solver == "torch":
        return _solve_torch(a, device)
    with _blas_threads(n):
        return _solve(a, d, solver, tol)


def _solve(a: np.ndarray, d: np.ndarray, solver: str, tol: float) -> tuple[np.ndarray, float]:
    n = a.shape[0]
    if solver == "dense" or n < 4:  # ARPACK needs k < N - 1
        # The references ask for eigenpairs 1 and 2; the subset changes LAPACK's path and with it the sign.
        deg = np.diag(d)
        vals, vecs = scipy.linalg.eigh(deg - a, deg, subset_by_index=[1, min(2, n - 1)])
        return vecs[:, 0], float(vals[0])
    s = 1.0 / np.sqrt(d)  # (N,)
    m = a * s[:, None] * s[None, :]  # (N, N) D^-1/2 A D^-1/2: eigenvalues in [-1, 1], top one 1 at D^1/2 1
    q0 = np.sqrt(d) / np.linalg.norm(np.sqrt(d))  # (N,)
    # Move the trivial eigenvalue 1 to -2, below the spectrum, so the largest eigenvalue left is the one wanted.
    op = scipy.sparse.linalg.LinearOperator(
        (n, n), matvec=lambda v: m @ v - 3.0 * q0 * (q0 @ v), dtype=np.float64
    )
    v0 = np.random.default_rng(0).standard_normal(n)  # fixed start: ARPACK is otherwise randomly seeded
    vals, vecs = scipy.sparse.linalg.eigsh(op, k=1, which="LA", v0=v0, tol=tol, ncv=min(n - 1, 16))
    x = vecs[:, 0] * s  # generalised eigenvector x = D^-1/2 y, with x^T D x = y^T y = 1
    return x, float(1.0 - vals[0])


def _solve_torch(a: np.ndarray, device: str | torch.device | None) -> tuple[np.ndarray, float]:
    at = torch.as_tensor(a, dtype=torch.float64, device=torch.device("cpu") if device is None else device)
    d = at.sum(dim=1)  # (N,)
    s = d.rsqrt()  # (N,)
    q0 = d.sqrt() / d.sqrt().norm()  # (N,) top eigenvector of D^-1/2 A D^-1/2, eigenvalue 1
    m = at * s[:, None] * s[None, :] - 3.0 * torch.outer(q0, q0)  # (N, N) trivial eigenvalue moved to -2
    vals, vecs = torch.linalg.eigh(m)  # ascending
    x = vecs[:, -1] * s  # (N,) x = D^-1/2 y, x^T D x = 1
    return x.cpu().numpy(), float(1.0 - vals[-1].item())


def ncut_value(affinity: np.ndarray, mask: np.ndarray) -> float:
    """Normalized-cut value ``cut(S, S') / assoc(S, V) + cut(S, S') / assoc(S', V)`` of the token set ``mask``.

    Returns 2.0 (the worst) when ``S`` or its complement is empty.
    """
    a = np.asarray(affinity, dtype=np.float64)
    s = np.asarray(mask, dtype=bool).ravel()
    if not s.any() or s.all():
        return 2.0
    assoc_s = a[s].sum()
    assoc_t = a[~s].sum()
    cut = a[np.ix_(s, ~s)].sum()
    return float(cut / assoc_s + cut / assoc_t)


def _corner_count(side: np.ndarray, grid: tuple[int, int]) -> int:
    g = side.reshape(grid)
    return int(g[0, 0]) + int(g[0, -1]) + int(g[-1, 0]) + int(g[-1, -1])


def bipartition(
    eigenvector: np.ndarray, grid: tuple[int, int], connectivity: int = 4, rule: str = "default"
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Foreground of one cut: split at the mean, choose a side, keep the seed's connected component.

    Args:
        eigenvector: ``(N,)`` second eigenvector (any sign).
        grid: ``(gh, gw)`` with ``gh * gw == N``.
        connectivity: neighbourhood of the connected component (MaskCut and TokenCut: 4).
        rule: how the side is chosen (see the module docstring): ``"default"`` (the seed's side, the other one if
            it holds 3+ grid corners; sign-independent), ``"cutler"`` (CutLER: the complement of ``{x > mean}``
            if that holds 3+ corners, else the seed's side; depends on the sign) or ``"tokencut"`` (the seed's
            side, no corner rule).

    Returns:
        ``(mask (gh, gw) bool, oriented eigenvector (gh, gw), seed (row, col))``; the foreground is the positive
        side of the oriented eigenvector and the seed its component's anchor.

    Example:
        >>> x = np.array([2.0, 1, 1, 1, -1, -1, 1, 1, 1])  # 3x3 grid; the seed (2.0) is in a corner
        >>> bipartition(x, (3, 3))[0].astype(int).tolist()  # its side holds 4 corners: the other side
        [[0, 0, 0], [0, 1, 1], [0, 0, 0]]
        >>> bipartition(-x, (3, 3))[0].astype(int).tolist()
        [[0, 0, 0], [0, 1, 1], [0, 0, 0]]
        >>> bipartition(-x, (3, 3), rule="cutler")[0].astype(int).tolist()  # sign-dependent: keeps the corners
        [[1, 1, 1], [1, 0, 0], [1, 1, 1]]
        >>> bipartition(x, (3, 3), rule="tokencut")[0].astype(int).tolist()  # no corner rule
        [[1, 1, 1], [1, 0, 0], [1, 1, 1]]
    """
    if rule not in _CUT_RULES:
        raise ValueError(f"rule must be one of {_CUT_RULES}, got {rule!r}")
    x = np.asarray(eigenvector, dtype=np.float64).ravel()
    gh, gw = grid
    if x.size != gh * gw:
        raise ValueError(f"eigenvector of {x.size} entries does not fit the grid {grid}")
    # The references' mean, ``np.sum(x) / len(x)``, written as they write it.
    positive = x > np.sum(x) / len(x)  # (N,) the side MaskCut calls the bipartition
    first_seed = int(np.argmax(np.abs(x)))
    if rule == "cutler":
        fg_is_positive = _corner_count(positive, grid) < 3 and bool(positive[first_seed])
    else:
        fg_is_positive = bool(positive[first_seed])
        if rule == "default" and _corner_count(positive if fg_is_positive else ~positive, grid) >= 3:
            fg_is_positive = not fg_is_positive
    oriented = x if fg_is_positive else -x
    fg = positive if fg_is_positive else ~positive
    # MaskCut re-seeds at the most extreme foreground token; TokenCut keeps argmax |x|, the same token here (a
    # token of largest |x| on the side it picks is that side's extreme), except for ties in |x|.
    seed = first_seed if rule == "tokencut" else int(np.argmax(oriented))
    mask = component_at(fg.reshape(grid), seed, connectivity)
    return mask, oriented.reshape(grid), (seed // gw, seed % gw)


def _check_grid(features: np.ndarray | torch.Tensor, grid: Sequence[int]) -> tuple[np.ndarray | torch.Tensor, int, int]:
    gh, gw = as_pair(grid)
    if features.ndim == 3:
        features = features.reshape(-1, features.shape[-1])  # (gh, gw, d) -> (N, d)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, d) or (gh, gw, d), got shape {tuple(features.shape)}")
    n = features.shape[0]
    if n != gh * gw:
        raise ValueError(f"{n} feature rows do not fit the grid {gh}x{gw}")
    if n < 2:
        raise ValueError(f"MaskCut needs at least 2 patch tokens, got {n} (is the image smaller than 2 patches?)")
    return features, gh, gw


def maskcut(
    features: np.ndarray | torch.Tensor,
    grid: Sequence[int],
    tau: float = 0.15,
    max_masks: int = 3,
    eps: float = 1e-5,
    solver: str = "auto",
    iou_drop: float = 0.5,
    min_area: float = 0.01,
    rules: str = "default",
    device: str | torch.device | None = None,
) -> MaskCutResult:
    """MaskCut on one image's patch features (see the module docstring for the rules).

    Args:
        features: ``(N, d)`` patch-token features in row-major grid order, or ``(gh, gw, d)``.
        grid: ``(gh, gw)`` with ``gh * gw == N``.
        tau: edge threshold on the cosine similarity (the CRATE paper: 0.15; CutLER's script: 0.2).
        max_masks: largest number of cuts per image (CutLER's ``N``).
        eps: weight of non-edges.
        solver: eigen-solver, see :func:`second_smallest_eigenvector`; ``rules="cutler"`` takes only ``"auto"``
            or ``"dense"`` (both the reference's dense call).
        iou_drop: drop a mask whose IoU with the previous mask exceeds this.
        min_area: drop a further mask covering at most this fraction of the grid.
        rules: ``"default"`` (sign-independent corner rule, stop at the first dropped mask) or ``"cutler"``
            (CutLER's ``maskcut_forward`` exactly, including its arithmetic).
        device: torch device of ``solver="torch"``; default: the features' device if they are a tensor, else CPU.

    Returns:
        :class:`MaskCutResult`.

    Raises:
        ValueError: for fewer than 2 tokens, a grid that does not match the features, non-finite features, an
            unknown rule or solver, or ``rules="cutler"`` with a solver other than the reference's.

    Example:
        >>> f = np.zeros((6, 6, 2)); f[..., 0] = 1; f[1:4, 2:5] = [0, 1]  # a 3x3 object on a background
        >>> res = maskcut(f, (6, 6), rules="cutler")
        >>> len(res), int(res.masks[0].sum()), res.seeds[0] in [(r, c) for r in range(1, 4) for c in range(2, 5)]
        (1, 9, True)
    """
    if rules not in MASKCUT_RULES:
        raise ValueError(f"rules must be one of {MASKCUT_RULES}, got {rules!r}")
    return _run(features, grid, tau, max_masks, eps, solver, iou_drop, min_area, rules, device)


def tokencut(
    features: np.ndarray | torch.Tensor,
    grid: Sequence[int],
    tau: float = 0.2,
    eps: float = 1e-5,
    solver: str = "auto",
    rules: str = "tokencut",
    device: str | torch.device | None = None,
) -> MaskCutResult:
    """TokenCut: a single normalized cut.

    Args:
        features: ``(N, d)`` patch-token features in row-major grid order (no CLS token), or ``(gh, gw, d)``.
        grid: ``(gh, gw)`` with ``gh * gw == N``.
        tau: edge threshold on the cosine similarity (TokenCut's default 0.2).
        eps: weight of non-edges.
        solver: eigen-solver, see :func:`second_smallest_eigenvector`. The TokenCut rule does not depend on the
            eigenvector's sign, so every solver gives the reference's mask except at exact ties (see the module
            docstring); ``"dense"`` is the reference's call.
        rules: ``"tokencut"`` (official ``ncut``: the seed's side, its connected component, no corner rule,
            similarities in the features' precision) or ``"maskcut"`` (one cut of :func:`maskcut` with its default
            rule: the seed's side is rejected when it holds 3+ grid corners; float64 similarities).
        device: torch device of ``solver="torch"``; default: the features' device if they are a tensor, else CPU.

    Returns:
        :class:`MaskCutResult` with at most one mask.

    Example:
        >>> f = np.zeros((5, 5, 2)); f[..., 0] = 1; f[0, :] = [0, 1]; f[:, 0] = [0, 1]  # an L along two edges
        >>> int(tokencut(f, (5, 5)).masks[0].sum())  # the L, which touches 3 corners
        9
        >>> int(tokencut(f, (5, 5), rules="maskcut").masks[0].sum())  # the corner rule takes the rest
        16
    """
    if rules not in TOKENCUT_RULES:
        raise ValueError(f"rules must be one of {TOKENCUT_RULES}, got {rules!r}")
    rule = "tokencut" if rules == "tokencut" else "default"
    return _run(features, grid, tau, 1, eps, solver, 0.5, 0.01, rule, device)


def _run(
    features: np.ndarray | torch.Tensor,
    grid: Sequence[int],
    tau: float,
    max_masks: int,
    eps: float,
    solver: str,
    iou_drop: float,
    min_area: float,
    rule: str,
    device: str | torch.device | None,
) -> MaskCutResult:
    features, gh, gw = _check_grid(features, grid)
    if max_masks < 1:
        raise ValueError(f"max_masks must be >= 1, got {max_masks}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if rule == "cutler" and solver not in ("auto", "dense"):
        raise ValueError(
            f"rules='cutler' depends on the sign of the eigenvector that the reference's dense scipy.linalg.eigh "
            f"returns; use solver='auto' or 'dense', not {solver!r}"
        )
    if solver == "torch" and device is None and isinstance(features, torch.Tensor):
        device = features.device
    n = gh * gw
    with _blas_threads(n):
        if rule == "default":
            return _maskcut_default(
                _as_numpy_features(features).copy(), (gh, gw), tau, max_masks, eps, solver, iou_drop, min_area,
                device,
            )  # fmt: skip
        return _maskcut_reference(
            _as_torch_features(features), (gh, gw), tau, max_masks, eps, "dense" if rule == "cutler" else solver,
            iou_drop, min_area, rule, device,
        )  # fmt: skip


def _result(cuts: list[tuple[np.ndarray, float, np.ndarray, tuple[int, int]]], grid, stop: str) -> MaskCutResult:
    gh, gw = grid
    if not cuts:
        return MaskCutResult(np.zeros((0, gh, gw), bool), np.zeros(0), np.zeros((0, gh, gw)), [], stop)
    masks, scores, vecs, seeds = zip(*cuts)
    return MaskCutResult(np.stack(masks), np.asarray(scores, dtype=np.float64), np.stack(vecs), list(seeds), stop)


def _maskcut_default(
    f: np.ndarray,
    grid: tuple[int, int],
    tau: float,
    max_masks: int,
    eps: float,
    solver: str,
    iou_drop: float,
    min_area: float,
    device: str | torch.device | None,
) -> MaskCutResult:
    gh, gw = grid
    n = f.shape[0]
    cuts = []
    painted = np.zeros(n, dtype=bool)
    covered = np.zeros((gh, gw), dtype=bool)
    previous: np.ndarray | None = None
    stop = ""
    for masks_tried in range(max_masks):
        f[painted] = 0.0  # tokens of earlier masks lose their features: only eps edges remain
        a = affinity_matrix(f, tau, eps)  # (N, N)
        if np.all(a == a.flat[0]):
            stop = "no structure left to cut (uniform affinity)"
            break
        x, _ = second_smallest_eigenvector(a, solver, device=device)
        mask, oriented, seed = bipartition(x, (gh, gw))
        area = mask.mean()
        if previous is not None and mask_iou(previous, mask) > iou_drop:
            stop = f"next mask overlaps the previous one (IoU > {iou_drop})"
            break
        if masks_tried and area <= min_area:
            stop = f"next mask covers at most {min_area:.0%} of the image"
            break
        score = 1.0 - ncut_value(a, mask) / 2.0
        previous = mask
        painted |= mask.ravel()
        out = mask & ~covered  # disjoint outputs, as MaskCut subtracts earlier masks
        covered |= mask
        if out.any():
            cuts.append((out, score, oriented, seed))
    return _result(cuts, grid, stop)


def _maskcut_reference(
    f: torch.Tensor,
    grid: tuple[int, int],
    tau: float,
    max_masks: int,
    eps: float,
    solver: str,
    iou_drop: float,
    min_area: float,
    rule: str,
    device: str | torch.device | None,
) -> MaskCutResult:
    """CutLER's loop (``rule="cutler"``) or TokenCut's single cut (``rule="tokencut"``, ``max_masks=1``)."""
    gh, gw = grid
    n = gh * gw
    cuts = []
    painting = torch.zeros(n, dtype=torch.float64)  # (N,) tokens of earlier kept masks, as CutLER's painting
    covered = np.zeros((gh, gw), dtype=bool)
    current = np.zeros((gh, gw), dtype=bool)  # CutLER's current_mask: the previous cut's mask, empty if dropped
    a = x = None
    for i in range(max_masks):
        repaint = i > 0 and bool((torch.from_numpy(current.ravel()) & (painting == 0)).any())
        if i > 0:
            painting = torch.clamp(painting + torch.from_numpy(current.ravel().astype(np.float64)), max=1.0)
            # The float64 painting promotes the features to float64 from the second cut on, as in the reference.
            f = (1.0 - painting)[:, None] * f  # (N, d); painted tokens are exact zeros
        if x is None or repaint or i == 1:  # otherwise the graph is unchanged: the same cut again
            a = _reference_affinity(f, tau, eps)  # (N, N)
            x, _ = second_smallest_eigenvector(a, solver, device=device)
        mask, oriented, seed = bipartition(x, grid, rule=rule)
        if i >= 1:
            ratio = float(mask.sum()) / gh / gw  # the reference's order of division
            if mask_iou(current, mask) > iou_drop or ratio <= min_area:
                current = np.zeros((gh, gw), dtype=bool)  # dropped: paints nothing, compared against next
                continue
        current = mask
        out = mask & ~covered  # the reference subtracts its earlier outputs
        covered |= out
        if out.any():
            assert a is not None  # the first cut builds the graph
            cuts.append((out, 1.0 - ncut_value(a, mask) / 2.0, oriented, seed))
    return _result(cuts, grid, "")

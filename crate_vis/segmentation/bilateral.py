"""Edge-aware refinement of coarse masks with the fast bilateral solver (Barron & Poole, ECCV 2016), as TokenCut does.

A mask upsampled from the token grid is blocky: its edges follow patch borders, not the object's. The bilateral
solver finds the smooth map ``x`` closest to the mask ``t`` that varies little between pixels alike in position and
colour, minimising

    lam / 2 * sum_ij W_ij (x_i - x_j)^2 + sum_i c_i (x_i - t_i)^2

with ``W`` the bilateral affinity of the image (in YUV) and the confidence ``c = 1`` everywhere. The problem is solved
in *bilateral space*: every pixel is splatted (hard assignment) onto the vertex of a 5-D grid ``(x, y, Y, U, V)``
with cells of ``sigma_spatial`` pixels, ``sigma_luma`` and ``sigma_chroma`` levels; the affinity becomes a
``[1 2 1]`` blur along each grid axis, normalised to be bistochastic (Sinkhorn-like iterations); the resulting
sparse system is solved by conjugate gradients with a Jacobi preconditioner and sliced back to the pixels.

The refined mask is TokenCut's binarisation of the solution: ``x > 0.5``, holes filled, the largest 4-connected
component kept. The defaults (:class:`BilateralParams`) are TokenCut's grid (``sigma_spatial`` 16, ``sigma_luma`` 16,
``sigma_chroma`` 8) and the solver's reference settings (``lam`` 128, 25 Jacobi-preconditioned CG iterations to a
relative residual of 1e-5); TokenCut's script passes ``lam`` 256 and a confidence of 0.999 instead of 1.

**Safety rule.** On images with little contrast between object and background the solver can erase a mask or
flip it onto the background. A refined mask that is empty, or whose IoU with the coarse mask is below
``min_iou`` (0.5, the quantity TokenCut checks), is not used: the coarse mask is kept.

**Resolution.** The solve runs on the image shrunk (area-averaging) so that its longer side is at most ``max_side``
pixels (512), with the mask taken there by nearest neighbour, and the refined mask is brought back to the full size by
nearest neighbour; ``sigma_spatial`` is in pixels of that working image. A 480 x 320 photo takes about 0.03 s on
one CPU core (a 512-px working image about as much: the grid has some ten thousand vertices).

Example:
    >>> import numpy as np
    >>> image = np.zeros((64, 64, 3), np.uint8)
    >>> image[12:45, 20:51] = 255                      # a bright square on black
    >>> coarse = np.zeros((64, 64), bool)
    >>> coarse[8:48, 16:48] = True                     # a blocky guess, off by a few pixels
    >>> result = refine_masks(image, coarse[None])
    >>> result.refined.tolist()
    [True]
    >>> bool((result.masks[0] == (image[..., 0] > 0)).all())
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage, sparse

from ..data.image_geometry import resize_nearest
from ..errors import UsageError
from .masks import largest_component, mask_iou

__all__ = ["BilateralParams", "BilateralGrid", "BilateralSolver", "RefineResult", "refine_masks", "rgb_to_yuv"]

#: RGB -> YUV (ITU-R BT.601 / JPEG), chroma centred on 128 so every channel lies in [0, 255].
_RGB_TO_YUV = np.array([
    [0.299, 0.587, 0.114],
    [-0.168736, -0.331264, 0.5],
    [0.5, -0.418688, -0.081312],
])  # fmt: skip
_YUV_OFFSET = np.array([0.0, 128.0, 128.0])


@dataclass(frozen=True)
class BilateralParams:
    """Settings of the bilateral refinement (defaults: TokenCut's grid, the solver's reference ``lam``).

    Attributes:
        sigma_spatial: grid cell size in pixels (of the working image).
        sigma_luma: grid cell size in luma levels (0-255).
        sigma_chroma: grid cell size in chroma levels (0-255).
        lam: weight of the smoothness term against the data term.
        a_diag_min: floor of the system's diagonal in the Jacobi preconditioner.
        cg_tol: conjugate gradients stop at a residual of ``cg_tol * |b|``.
        cg_maxiter: most conjugate-gradient iterations.
        max_side: longest side of the working image (larger images are shrunk for the solve).
        min_iou: refined masks with a lower IoU with the coarse mask are discarded (the coarse one is kept).
    """

    sigma_spatial: float = 16.0
    sigma_luma: float = 16.0
    sigma_chroma: float = 8.0
    lam: float = 128.0
    a_diag_min: float = 1e-5
    cg_tol: float = 1e-5
    cg_maxiter: int = 25
    max_side: int = 512
    min_iou: float = 0.5

    def __post_init__(self) -> None:
        for name in ("sigma_spatial", "sigma_luma", "sigma_chroma", "lam", "a_diag_min", "cg_tol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise UsageError(f"bilateral {name} must be a positive number, got {value!r}")
        if self.cg_maxiter < 1 or self.max_side < 1:
            raise UsageError(f"bilateral cg_maxiter and max_side must be positive, got {self.cg_maxiter}, {self.max_side}")
        if not 0.0 <= self.min_iou <= 1.0:
            raise UsageError(f"bilateral min_iou must be in [0, 1], got {self.min_iou}")


def rgb_to_yuv(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` RGB in [0, 255] -> ``(H, W, 3)`` float64 YUV in [0, 255] (chroma offset by 128)."""
    rgb = np.asarray(image, dtype=np.float64)
    return rgb @ _RGB_TO_YUV.T + _YUV_OFFSET  # (H, W, 3)


class BilateralGrid:
    """The bilateral grid of an image: which vertex each pixel splats to, and the grid's neighbour structure.

    Attributes:
        vertex: ``(P,)`` vertex index of each pixel (row-major pixel order).
        n_vertices: number of occupied grid vertices.
        neighbours: ``(V, V)`` sparse symmetric 0/1 matrix of vertices one cell apart along one axis.
        dim: number of grid axes (5).
    """

    def __init__(self, image: np.ndarray, sigma_spatial: float, sigma_luma: float, sigma_chroma: float) -> None:
        h, w = image.shape[:2]
        yuv = rgb_to_yuv(image).reshape(-1, 3)  # (P, 3)
        rows, cols = np.divmod(np.arange(h * w), w)  # (P,), (P,)
        coords = np.stack([
            np.floor(cols / sigma_spatial), np.floor(rows / sigma_spatial), np.floor(yuv[:, 0] / sigma_luma),
            np.floor(yuv[:, 1] / sigma_chroma), np.floor(yuv[:, 2] / sigma_chroma),
        ], axis=1).astype(np.int64)  # (P, 5), every entry >= 0  # fmt: skip
        coords -= coords.min(axis=0)
        # Mixed-radix key with one spare digit value per axis: a step of +-1 off the occupied range never lands on
        # another vertex's key.
        radix = coords.max(axis=0) + 2  # (5,)
        strides = np.concatenate([[1], np.cumprod(radix[:-1])]).astype(np.int64)  # (5,)
        keys = coords @ strides  # (P,)
        unique, self.vertex = np.unique(keys, return_inverse=True)  # (V,), (P,)
        self.vertex = self.vertex.reshape(-1)
        self.n_vertices = int(unique.size)
        self.dim = int(coords.shape[1])
        src, dst = [], []
        for stride in strides:
            pos = np.searchsorted(unique, unique + stride).clip(0, self.n_vertices - 1)  # (V,)
            found = np.flatnonzero(unique[pos] == unique + stride)
            src.append(found)
            dst.append(pos[found])
        a, b = np.concatenate(src), np.concatenate(dst)
        ones = np.ones(2 * a.size)
        self.neighbours = sparse.csr_matrix(
            (ones, (np.concatenate([a, b]), np.concatenate([b, a]))), shape=(self.n_vertices, self.n_vertices)
        )

    def splat(self, values: np.ndarray) -> np.ndarray:
        """Sum ``(P,)`` pixel values into their vertices -> ``(V,)``."""
        return np.bincount(self.vertex, weights=values, minlength=self.n_vertices)

    def slice(self, values: np.ndarray) -> np.ndarray:
        """Read ``(V,)`` vertex values back at the pixels -> ``(P,)``."""
        return values[self.vertex]

    def blur(self, values: np.ndarray) -> np.ndarray:
        """``[1 2 1]`` blur of ``(V,)`` vertex values along every grid axis (absent neighbours count as 0)."""
        return 2 * self.dim * values + self.neighbours @ values


class BilateralSolver:
    """The bilateral solver's system for one image, reusable for several targets (confidence 1 everywhere).

    Args:
        image: ``(H, W, 3)`` uint8 RGB reference.
        params: grid and solver settings.
    """

    def __init__(self, image: np.ndarray, params: BilateralParams = BilateralParams()) -> None:
        self.params = params
        self.shape = tuple(image.shape[:2])
        self.grid = grid = BilateralGrid(image, params.sigma_spatial, params.sigma_luma, params.sigma_chroma)
        counts = grid.splat(np.ones(image.shape[0] * image.shape[1]))  # (V,)
        n = np.ones(grid.n_vertices)  # (V,)
        for _ in range(10):  # bistochastic normalisation: diag(n) B diag(n) 1 ~= counts
            n = np.sqrt(n * counts / grid.blur(n))
        m = n * grid.blur(n)  # (V,)
        smooth = sparse.diags(m) - sparse.diags(n) @ (2 * grid.dim * sparse.identity(grid.n_vertices) +
                                                      grid.neighbours) @ sparse.diags(n)  # fmt: skip
        self.counts = counts
        self.matrix = (params.lam * smooth + sparse.diags(counts)).tocsr()  # (V, V), data term: splat(c), c = 1
        self.inv_diag = 1.0 / np.maximum(self.matrix.diagonal(), params.a_diag_min)  # (V,) Jacobi preconditioner

    def solve(self, target: np.ndarray) -> np.ndarray:
        """The smooth ``(H, W)`` float64 map closest to ``target`` (``(H, W)``, e.g. a 0/1 mask)."""
        t = np.asarray(target, dtype=np.float64).reshape(-1)  # (P,)
        b = self.grid.splat(t)  # (V,)
        y = self._pcg(b, b / self.counts)  # flat initialisation: the mean target of each vertex
        return self.grid.slice(y).reshape(self.shape)

    def _pcg(self, b: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Preconditioned conjugate gradients on ``matrix @ y = b`` from ``y``."""
        p_ = self.params
        stop = p_.cg_tol * float(np.linalg.norm(b))
        r = b - self.matrix @ y
        if float(np.linalg.norm(r)) <= stop:
            return y
        z = self.inv_diag * r
        d = z.copy()
        rz = float(r @ z)
        for _ in range(p_.cg_maxiter):
            ad = self.matrix @ d
            denom = float(d @ ad)
            if denom <= 0.0:
                break
            alpha = rz / denom
            y = y + alpha * d
            r = r - alpha * ad
            if float(np.linalg.norm(r)) <= stop:
                break
            z = self.inv_diag * r
            rz_new = float(r @ z)
            d = z + (rz_new / rz) * d
            rz = rz_new
        return y


@dataclass
class RefineResult:
    """Masks after :func:`refine_masks`.

    Attributes:
        masks: ``(K, H, W)`` boolean, refined where ``refined`` says, else the coarse mask.
        refined: ``(K,)`` boolean: False where the coarse mask was kept (empty coarse mask, or the safety rule).
        iou: ``(K,)`` IoU of each solver mask with its coarse mask (NaN where the solver was not run).
    """

    masks: np.ndarray
    refined: np.ndarray
    iou: np.ndarray


def _binarise(x: np.ndarray) -> np.ndarray:
    """TokenCut's binarisation of a solver output: ``> 0.5``, holes filled, the largest component."""
    return largest_component(ndimage.binary_fill_holes(x > 0.5))


def refine_masks(image: np.ndarray, masks: np.ndarray, params: BilateralParams = BilateralParams()) -> RefineResult:
    """Refine each of an image's masks with the bilateral solver (see the module docstring).

    Args:
        image: ``(H, W, 3)`` uint8 RGB, the image the masks are aligned to.
        masks: ``(K, H, W)`` boolean coarse masks (K may be 0); each is refined on its own.
        params: solver settings (TokenCut's by default).

    Returns:
        A :class:`RefineResult` with masks of the same shape; deterministic.

    Raises:
        UsageError: an image that is not ``(H, W, 3)`` or masks of another size.
    """
    img = np.asarray(image)
    m = np.asarray(masks, dtype=bool)
    if img.ndim != 3 or img.shape[2] != 3:
        raise UsageError(f"refine: the image must be (H, W, 3) RGB, got shape {img.shape}")
    if m.ndim != 3 or m.shape[1:] != img.shape[:2]:
        raise UsageError(f"refine: masks of shape {m.shape} do not fit an image of {img.shape[0]}x{img.shape[1]}")
    k = m.shape[0]
    out, refined, ious = m.copy(), np.zeros(k, bool), np.full(k, np.nan)
    todo = [i for i in range(k) if m[i].any()]
    if not todo:
        return RefineResult(out, refined, ious)
    h, w = img.shape[:2]
    scale = min(1.0, params.max_side / max(h, w))
    work_hw = (max(1, round(h * scale)), max(1, round(w * scale)))
    if work_hw != (h, w):
        work = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((work_hw[1], work_hw[0]), Image.Resampling.BOX))
    else:
        work = img
    solver = BilateralSolver(work, params)
    for i in todo:
        target = resize_nearest(m[i], work_hw) if work_hw != (h, w) else m[i]  # (h', w')
        new = _binarise(solver.solve(target))
        if work_hw != (h, w):
            new = resize_nearest(new, (h, w))  # (H, W)
        ious[i] = mask_iou(new, m[i])
        if new.any() and ious[i] >= params.min_iou:
            out[i], refined[i] = new, True
    return RefineResult(out, refined, ious)

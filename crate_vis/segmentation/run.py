"""Model -> masks: run a model on a batch and segment each image with DINO masks, MaskCut or TokenCut.

The model outputs come from :mod:`crate_vis.hooks` (``cls_attention_maps`` for DINO, ``subspace_features`` for the
cuts: CRATE's per-head subspace projections ``U_k^T z``, a ViT's keys), concatenated over heads for the cuts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from .bilateral import BilateralParams
from .dino import attention_contrast, dino_foreground
from .maskcut import MASKCUT_RULES, SOLVERS, maskcut, tokencut

__all__ = [
    "METHODS", "REFINERS", "SegmentConfig", "GridSegmentation", "segment_batch", "parse_heads", "recommended_config",
]  # fmt: skip

#: Segmentation methods and their default edge threshold ``tau`` (None: not a graph method).
METHODS: dict[str, float | None] = {"dino": None, "maskcut": 0.15, "tokencut": 0.2}

#: Refinements of the image-size masks: none, or the bilateral solver (:mod:`crate_vis.segmentation.bilateral`).
REFINERS = ("none", "bilateral")


@dataclass(frozen=True)
class SegmentConfig:
    """How to segment.

    Attributes:
        method: ``"dino"``, ``"maskcut"`` or ``"tokencut"``.
        layer: transformer layer whose attention / features are used (negative counts from the end).
        mass: DINO: fraction of the CLS attention kept.
        heads: DINO: heads to combine (default all).
        combine: DINO: ``"mean"`` or ``"union"`` of the heads (see :func:`dino_foreground`).
        largest_component: DINO: keep only the largest 4-connected component.
        tau: cuts: edge threshold (default 0.15 for MaskCut, 0.2 for TokenCut).
        max_masks: MaskCut: most masks per image (TokenCut: always 1).
        solver: cuts: eigen-solver (``"auto"``, ``"dense"``, ``"lanczos"``, ``"torch"``).
        cut_rules: MaskCut: ``"default"`` (sign-independent corner rule, stop at the first dropped mask) or
            ``"cutler"`` (CutLER ``maskcut.py`` exactly); TokenCut always follows the official TokenCut rule.
        cut_device: ``solver="torch"``: the device of the eigen-solve (the model's when ``None``).
        refine: any method: ``"none"``, or ``"bilateral"``: each image-size mask refined along the photo's edges by
            the fast bilateral solver, as TokenCut does (:func:`~crate_vis.segmentation.bilateral.refine_masks`;
            MaskCut's masks one by one). A refined mask that is empty or has IoU < 0.5 with the coarse mask is
            dropped and the coarse mask kept: on low-contrast photos the solver can erase a mask or flip it onto
            the background.
        refine_lam: ``refine="bilateral"``: the solver's smoothness weight ``lam`` (default 128, the solver's reference
            setting; TokenCut's script uses 256).
    """

    method: str = "dino"
    layer: int = -1
    mass: float = 0.6
    heads: tuple[int, ...] | None = None
    combine: str = "mean"
    largest_component: bool = False
    tau: float | None = None
    max_masks: int = 3
    solver: str = "auto"
    cut_rules: str = "default"
    cut_device: str | None = None
    refine: str = "none"
    refine_lam: float = 128.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {sorted(METHODS)}, got {self.method!r}")
        if not (isinstance(self.mass, (int, float)) and 0.0 < self.mass <= 1.0):
            raise UsageError(f"--mass must be in (0, 1], got {self.mass}")
        if self.tau is not None and not (isinstance(self.tau, (int, float)) and 0.0 <= self.tau < 1.0):
            raise UsageError(f"--tau must be in [0, 1) (a cosine-similarity threshold), got {self.tau}")
        if self.max_masks < 1:
            raise UsageError(f"--max-masks must be at least 1, got {self.max_masks}")
        if self.combine not in ("mean", "union"):
            raise UsageError(f"--combine must be 'mean' or 'union', got {self.combine!r}")
        if self.solver not in SOLVERS:
            raise UsageError(f"--solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.cut_rules not in MASKCUT_RULES:
            raise UsageError(f"--cut-rules must be one of {MASKCUT_RULES}, got {self.cut_rules!r}")
        if self.refine not in REFINERS:
            raise UsageError(f"--refine must be one of {list(REFINERS)}, got {self.refine!r}")
        lam = self.refine_lam
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0.0 < lam < float("inf")):
            raise UsageError(f"the bilateral refinement's lam must be a positive number, got {lam!r}")
        if self.heads is not None:
            if not self.heads:
                raise UsageError("--heads names no head")
            if len(set(self.heads)) != len(self.heads):
                raise UsageError(f"--heads names a head twice: {','.join(map(str, self.heads))}")

    @property
    def edge_threshold(self) -> float | None:
        """``tau`` with the method's default filled in (None for DINO)."""
        return self.tau if self.tau is not None or self.method == "dino" else METHODS[self.method]

    def describe(self) -> dict[str, Any]:
        """The settings that determine the masks (JSON-ready), only those the method uses.

        A refinement adds ``refine`` (and ``refine_lam``); without one there is no ``refine`` key, so the settings
        (and the settings key of an output folder) of unrefined runs are those of runs made before the option.
        """
        d = asdict(self)
        d["heads"] = list(self.heads) if self.heads is not None else None
        keep: tuple[str, ...]
        if self.method == "dino":
            keep = ("method", "layer", "mass", "heads", "combine", "largest_component")
        else:
            d["tau"] = self.edge_threshold
            d["max_masks"] = 1 if self.method == "tokencut" else self.max_masks
            d["cut_rules"] = "tokencut" if self.method == "tokencut" else self.cut_rules
            keep = ("method", "layer", "tau", "max_masks", "cut_rules")
        if self.refine != "none":
            keep += ("refine", "refine_lam")
        return {k: d[k] for k in keep}

    def bilateral_params(self) -> BilateralParams:
        """The bilateral solver's settings of ``refine="bilateral"`` (TokenCut's, with :attr:`refine_lam`)."""
        return BilateralParams(lam=float(self.refine_lam))


@dataclass
class GridSegmentation:
    """Masks of one image on its token grid.

    Attributes:
        masks: ``(K, gh, gw)`` boolean (K may be 0).
        scores: ``(K,)`` confidence in ``[0, 1]``: DINO, :func:`attention_contrast` of the head-averaged attention;
            cuts, ``1 - Ncut / 2``.
        note: why fewer masks than asked for came back (empty when not applicable).
    """

    masks: np.ndarray
    scores: np.ndarray
    note: str = ""


@torch.no_grad()
def segment_batch(
    model: nn.Module, images: torch.Tensor, config: SegmentConfig, pool: Executor | None = None
) -> list[GridSegmentation]:
    """Segment a batch of model inputs of one size.

    Args:
        model: CRATE-family model or timm ViT, in eval mode.
        images: ``(B, 3, H, W)`` normalised inputs on the model's device, ``H, W`` multiples of the patch size.
        config: the method and its settings.
        pool: cuts: an executor over which the images' eigen-solves are spread (results keep the batch order).

    Returns:
        One :class:`GridSegmentation` per image.
    """
    from ..hooks import cls_attention_maps, subspace_features

    if config.method == "dino":
        attn = cls_attention_maps(model, images, layer=config.layer).float()  # (B, h, gh, gw)
        fg = dino_foreground(
            attn, config.mass, config.heads, config.combine, largest=config.largest_component
        ).cpu().numpy()  # (B, gh, gw)
        sel = attn if config.heads is None else attn[:, list(config.heads)]
        avg = (sel / sel.sum(dim=(-2, -1), keepdim=True)).mean(dim=1).cpu().numpy()  # (B, gh, gw)
        out = []
        for m, a in zip(fg, avg):
            if m.any():
                out.append(GridSegmentation(m[None], np.array([attention_contrast(a, m)])))
            else:
                out.append(GridSegmentation(np.zeros((0, *m.shape), bool), np.zeros(0), "empty mask"))
        return out
    feats = subspace_features(model, images, layer=config.layer)  # (B, h, N, dh)
    b, h, n, dh = feats.shape
    grid = _grid(model, images)
    feats = feats.permute(0, 2, 1, 3).reshape(b, n, h * dh)  # (B, N, h*dh)
    if config.solver == "torch":
        device = config.cut_device or images.device
        per_image = [f.to(device=device, dtype=torch.float64) for f in feats]
    elif config.method == "maskcut" and config.cut_rules == "cutler":
        per_image = list(feats.float().cpu().numpy())  # CutLER compares similarities in the features' float32
    else:
        per_image = list(feats.double().cpu().numpy())

    tau = config.edge_threshold
    assert tau is not None  # the cut methods have a default threshold

    def cut(f: np.ndarray | torch.Tensor) -> GridSegmentation:
        if config.method == "tokencut":
            r = tokencut(f, grid, tau=tau, solver=config.solver)
        else:
            r = maskcut(f, grid, tau=tau, max_masks=config.max_masks, solver=config.solver,
                        rules=config.cut_rules)  # fmt: skip
        return GridSegmentation(r.masks, r.scores, r.stop_reason)

    return list(pool.map(cut, per_image)) if pool is not None else [cut(f) for f in per_image]


def _grid(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    from ..models.geometry import token_geometry

    return token_geometry(model, tuple(images.shape[-2:])).grid


def recommended_config(
    recommended: Mapping[str, Any],
    *,
    method: str | None = None,
    layer: int | None = None,
    mass: float | None = None,
    tau: float | None = None,
    max_masks: int | None = None,
    refine: str | None = None,
    **fixed: Any,
) -> SegmentConfig:
    """The :class:`SegmentConfig` of the choices given, the rest from a weights' recommended settings.

    This is what ``crate-vis segment`` does with its flags: a choice left ``None`` takes the value of
    ``recommended`` (:func:`crate_vis.models.recommended_settings`: ``method``, ``layer``, ``mass``, ``tau``,
    ``max_masks``, ``refine``), else the :class:`SegmentConfig` default. The threshold and mask count recommended for
    a method apply only when that method is used.

    Args:
        recommended: the weights' ``metadata.segment`` (empty for weights without one).
        method, layer, mass, tau, max_masks, refine: explicit choices (``None``: recommended or default).
        **fixed: other :class:`SegmentConfig` fields, as given.

    Example:
        >>> rec = {"method": "maskcut", "layer": 4, "tau": 0.1, "max_masks": 1, "refine": "bilateral"}
        >>> c = recommended_config(rec)
        >>> (c.method, c.layer, c.tau, c.max_masks, c.refine)
        ('maskcut', 4, 0.1, 1, 'bilateral')
        >>> c = recommended_config(rec, method="tokencut", layer=2)
        >>> (c.method, c.layer, c.tau, c.max_masks, c.refine)
        ('tokencut', 2, None, 3, 'bilateral')
    """
    method = method or recommended.get("method", "dino")
    same = method == recommended.get("method")
    return SegmentConfig(
        method=method,
        layer=layer if layer is not None else recommended.get("layer", -1),
        mass=mass if mass is not None else recommended.get("mass", 0.6),
        tau=tau if tau is not None else (recommended.get("tau") if same else None),
        max_masks=max_masks or (recommended.get("max_masks", 3) if same else 3),
        refine=refine or recommended.get("refine", "none"),
        **fixed,
    )


def parse_heads(spec: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"0,2,5"`` (commas or spaces) or ``[0, 2, 5]`` -> ``(0, 2, 5)``; None/empty/``"all"`` -> None (all heads).

    Raises:
        ValueError: text that is not a list of integers.
    """
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "all")):
        return None
    if isinstance(spec, str):
        try:
            return tuple(int(t) for t in re.split(r"[,\s]+", spec.strip()) if t)
        except ValueError:
            raise UsageError(f"--heads must be comma-separated integers like 0,1,3,4, got {spec!r}") from None
    return tuple(int(s) for s in spec)

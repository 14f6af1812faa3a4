"""Named model configurations: each name maps to a model family and a dict of constructor keywords.

Names read as a spec, ``{family}_{size}_patch{P}_{res}``. A registered name only fills in sizes; building is the
factory's job (:func:`crate_vis.models.factory.create_model`). After ``import crate_vis`` every name here also builds
through ``timm.create_model``, so timm's feature-extraction, benchmark and validation tools take CRATE models.

CRATE sizes (``dim / depth / heads``, ``dim_head``):

==================================  =====  =====  =====  ========  =====================================
name                                dim    depth  heads  dim_head  source
==================================  =====  =====  =====  ========  =====================================
crate_tiny_patch{8,16}_224           384     12      6       64    NeurIPS 2023 paper / official repo (T)
crate_small_patch{8,16}_224          576     12     12       48    NeurIPS 2023 paper / official repo (S)
crate_base_patch{8,16}_224           768     12     12       64    NeurIPS 2023 paper / official repo (B)
crate_large_patch{8,16}_224         1024     24     16       64    NeurIPS 2023 paper / official repo (L)
crate_seg_tiny_patch{8,16}_224       192     12      3       64    emergence paper "CRATE-T"
crate_seg_small_patch{8,16}_224      384     12      6       64    emergence paper "CRATE-S"
crate_seg_base_patch{8,16}_224       768     12     12       64    emergence paper "CRATE-B"
crate_mini_patch8_96                 192      6      6       32    the embedded default's size
crate_test_patch8_32                  64      3      4       16    golden-reference test config
==================================  =====  =====  =====  ========  =====================================

CRATE-alpha and CRATE-MAE sizes are registered from :data:`crate_vis.models.crate_alpha.CRATE_ALPHA_VARIANTS`
(``crate_alpha_{tiny,small,base,large}_patch{P}_224``, base and large at every published patch) and
:data:`crate_vis.models.crate_mae.CRATE_MAE_VARIANTS` (``crate_mae_{tiny,small,base,large}_patch16_224``).

Example:
    >>> from crate_vis.models.registry import list_models, model_family
    >>> "crate_tiny_patch16_224" in list_models("crate_tiny_*")
    True
    >>> model_family("crate_mini_patch8_96")
    'crate'
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .crate import CRATE
from .crate_alpha import CRATE_ALPHA_VARIANTS, CRATEAlpha
from .crate_mae import CRATE_MAE_VARIANTS, CRATEMAE

__all__ = [
    "FAMILIES", "ModelSpec", "register_model", "list_models", "model_config", "model_family", "is_registered",
    "family_of", "family_class", "unknown_model_message",
]  # fmt: skip

#: Family name -> model class. Every class takes its reference constructor's keyword names.
FAMILIES: dict[str, type[nn.Module]] = {"crate": CRATE}

#: Family -> one line for ``crate-vis list-models``.
FAMILY_TITLES: dict[str, str] = {
    "crate": "CRATE (Yu et al., NeurIPS 2023; official Ma-Lab-Berkeley/CRATE)",
}


@dataclass(frozen=True)
class ModelSpec:
    """One registered name: its family and the keywords it passes to the family's class."""

    name: str
    family: str
    kwargs: dict[str, Any] = field(default_factory=dict)


_SPECS: dict[str, ModelSpec] = {}

#: Called with each newly registered name (the factory registers every name with timm this way).
ON_REGISTER: list[Callable[[str], None]] = []


def register_model(name: str, config: dict[str, Any], family: str = "crate") -> None:
    """Register ``config`` (constructor keywords of the family's class) under ``name``.

    Raises:
        ValueError: the name is taken or the family unknown.
    """
    if name in _SPECS:
        raise ValueError(f"model {name!r} is already registered")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    _SPECS[name] = ModelSpec(name, family, dict(config))
    for hook in ON_REGISTER:
        hook(name)


def register_family(family: str, cls: type[nn.Module], title: str, variants: dict[str, dict[str, Any]]) -> None:
    """Add a model family and its named variants."""
    FAMILIES[family] = cls
    FAMILY_TITLES[family] = title
    for name, kwargs in variants.items():
        register_model(name, kwargs, family=family)


_PAPER_SIZES = {  # NeurIPS 2023 "White-Box Transformers via Sparse Rate Reduction", official model/crate.py
    "tiny": dict(dim=384, depth=12, heads=6, dim_head=64),
    "small": dict(dim=576, depth=12, heads=12, dim_head=48),
    "base": dict(dim=768, depth=12, heads=12, dim_head=64),
    "large": dict(dim=1024, depth=24, heads=16, dim_head=64),
}
_EMERGENCE_SIZES = {  # "Emergence of Segmentation with Minimalistic White-Box Transformers" (2023)
    "tiny": dict(dim=192, depth=12, heads=3, dim_head=64),
    "small": dict(dim=384, depth=12, heads=6, dim_head=64),
    "base": dict(dim=768, depth=12, heads=12, dim_head=64),
}

for _size, _dims in _PAPER_SIZES.items():
    for _patch in (8, 16):
        register_model(f"crate_{_size}_patch{_patch}_224", dict(image_size=224, patch_size=_patch, num_classes=1000, **_dims))
for _size, _dims in _EMERGENCE_SIZES.items():
    for _patch in (8, 16):
        register_model(
            f"crate_seg_{_size}_patch{_patch}_224", dict(image_size=224, patch_size=_patch, num_classes=1000, **_dims)
        )
register_model("crate_test_patch8_32", dict(image_size=32, patch_size=8, num_classes=10, dim=64, depth=3, heads=4, dim_head=16))
register_model("crate_mini_patch8_96", dict(image_size=96, patch_size=8, num_classes=10, dim=192, depth=6, heads=6, dim_head=32))
register_family(
    "crate_alpha", CRATEAlpha, "CRATE-alpha (Yang et al., NeurIPS 2024; official UCSC-VLAA/CRATE-alpha)", CRATE_ALPHA_VARIANTS
)
register_family(
    "crate_mae", CRATEMAE, "CRATE-MAE (Pai et al., ICLR 2024; official Ma-Lab-Berkeley/CRATE model/crate_ae)", CRATE_MAE_VARIANTS
)


def list_models(pattern: str = "*", include_timm: bool = False, family: str | None = None) -> list[str]:
    """Registered names matching a glob ``pattern``, optionally of one ``family`` (and timm's with ``include_timm``)."""
    names = sorted(n for n, s in _SPECS.items() if fnmatch.fnmatch(n, pattern) and family in (None, s.family))
    if include_timm:
        import timm

        names += [n for n in timm.list_models(pattern) if n not in _SPECS]
    return names


def is_registered(name: str) -> bool:
    """Whether ``name`` is a registered CRATE-family configuration (not a plain timm name)."""
    return name in _SPECS


def model_config(name: str) -> dict[str, Any]:
    """A copy of the constructor keywords registered under ``name``.

    Raises:
        KeyError: unknown name (the message suggests close names).
    """
    if name not in _SPECS:
        raise KeyError(unknown_model_message(name))
    return dict(_SPECS[name].kwargs)


def model_family(name: str) -> str:
    """The family (``"crate"``, ``"crate_alpha"``, ``"crate_mae"``) of a registered name."""
    if name not in _SPECS:
        raise KeyError(unknown_model_message(name))
    return _SPECS[name].family


def family_class(family: str) -> type[nn.Module]:
    """The model class of ``family``."""
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family]


def family_of(model: nn.Module) -> str | None:
    """The family of a model instance (exact class match), ``None`` for anything else (timm models)."""
    for family, cls in FAMILIES.items():
        if type(model) is cls:
            return family
    return None


def unknown_model_message(name: str) -> str:
    """The error text for an unknown model name, with close matches."""
    close = difflib.get_close_matches(name, list(_SPECS), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown model {name!r}{hint} (`crate-vis list-models` lists CRATE names; timm ViT names also work)"

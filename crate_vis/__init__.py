"""crate-vis: train or load CRATE, extract its attention, segment, score and draw per-head figures."""

from __future__ import annotations

import importlib
from typing import Any

from .errors import CheckpointError, CrateVisError
from .models import (
    CRATE,
    CRATEMAE,
    CRATEAlpha,
    TokenGeometry,
    create_model,
    list_models,
    load_checkpoint,
    load_model,
    resolve_model,
    save_model,
    token_geometry,
)

__version__ = "0.2.0"

# Public names provided by sub-modules that import heavier dependencies; resolved on first access.
_LAZY: dict[str, str] = {
    "AttentionRecorder": "crate_vis.hooks",
    "FeatureRecorder": "crate_vis.hooks",
    "attention_rollout": "crate_vis.hooks",
    "load_image": "crate_vis.io.images",
    "ImageLoadError": "crate_vis.errors",
}
_SUBMODULES = {
    "cli", "data", "errors", "experiments", "groundtruth", "hooks", "io", "metrics", "models", "segmentation", "train",
    "viz", "whitebox",
}  # fmt: skip

__all__ = [
    "CRATE", "CRATEAlpha", "CRATEMAE", "CheckpointError", "CrateVisError", "TokenGeometry", "create_model", "list_models", "load_checkpoint",
    "load_model", "resolve_model", "save_model", "token_geometry", *_LAZY,
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"crate_vis.{name}")
    raise AttributeError(f"module 'crate_vis' has no attribute {name!r}")

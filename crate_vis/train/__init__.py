"""Training and evaluation of CRATE and timm ViTs: recipes, resumable checkpoints, DDP, metrics and plots.

    >>> from crate_vis.train import resolve_config, train
    >>> cfg = resolve_config("small_data_cpu", data="hymenoptera_data", out="runs/ants")  # doctest: +SKIP
    >>> result = train(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

from .config import TrainConfig, config_to_dict, list_recipes, load_recipe, resolve_config
from .engine import (
    METRIC_COLUMNS,
    NonFiniteLossError,
    Trainer,
    TrainResult,
    build_model,
    clip_gradients,
    topk_correct,
    train,
)  # fmt: skip
from .evaluation import EvalResult, evaluate_model, write_eval_report

__all__ = [
    "METRIC_COLUMNS", "EvalResult", "NonFiniteLossError", "TrainConfig", "TrainResult", "Trainer", "build_model",
    "clip_gradients", "config_to_dict", "evaluate_model", "list_recipes", "load_recipe",
    "resolve_config", "topk_correct", "train", "write_eval_report",
]  # fmt: skip

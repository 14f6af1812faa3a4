"""Training and evaluation of CRATE and timm ViTs, and masked-autoencoding pre-training of CRATE-MAE: recipes,
resumable checkpoints, DDP, metrics and plots.

    >>> from crate_vis.train import resolve_config, train
    >>> cfg = resolve_config("small_data_cpu", data="hymenoptera_data", out="runs/ants")  # doctest: +SKIP
    >>> result = train(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

from .config import TrainConfig, config_to_dict, list_recipes, load_recipe, resolve_config
from .engine import (
    MAE_METRIC_COLUMNS,
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
from .mae import mask_noise, resolve_objective

__all__ = [
    "MAE_METRIC_COLUMNS", "METRIC_COLUMNS", "EvalResult", "NonFiniteLossError", "TrainConfig", "TrainResult",
    "Trainer", "build_model", "clip_gradients", "config_to_dict", "evaluate_model", "list_recipes", "load_recipe",
    "mask_noise", "resolve_config", "resolve_objective", "topk_correct", "train", "write_eval_report",
]  # fmt: skip

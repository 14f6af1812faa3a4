"""Classification accuracy of a model on a dataset split: the Python side of ``crate-vis eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..io.outputs import writable_folder
from ..models.geometry import model_input_size

__all__ = ["evaluate_split"]


def evaluate_split(
    model: nn.Module,
    info: dict[str, Any],
    data: str,
    out: str | Path,
    split: str = "val",
    img_size: int | None = None,
    batch_size: int = 64,
    workers: int = 2,
    amp: str = "none",
    progress: bool | None = None,
) -> tuple[Any, dict[str, Path], int]:
    """Evaluate ``model`` on one split of ``data`` and write ``metrics.json``, ``per_class.csv``, ``confusion.png``.

    Args:
        model: the classifier (eval mode, on its device).
        info: what :func:`crate_vis.models.resolve_model` knows of the weights (``classes``, ``img_size``,
            training ``config``).
        data: ImageFolder root (or split folder), CIFAR folder or ``"synthetic"``.
        out: report folder.

    Returns:
        ``(EvalResult, written paths, the evaluation resolution)``.
    """
    from ..data.folders import ImageFolderDataset
    from ..train.config import TrainConfig, resolve_config
    from ..train.data import EpochSampler, build_split, build_transform, make_loader
    from ..train.evaluation import evaluate_model, write_eval_report

    if batch_size < 1 or workers < 0:
        raise UsageError(f"--batch-size must be >= 1 and --workers >= 0, got {batch_size}, {workers}")
    if img_size is not None and img_size < 1:
        raise UsageError(f"--img-size must be positive, got {img_size}")
    writable_folder(out, "--out")  # before the work
    cfg = info.get("config")
    cfg = resolve_config(cfg) if isinstance(cfg, dict) else (cfg or TrainConfig(data=data))
    size = img_size or info.get("img_size") or model_input_size(model)
    transform = build_transform(cfg, training=False, img_size=size)
    dataset = build_split(data, split, transform, cfg, classes=info.get("classes"))
    classes = list(dataset.classes)
    if info.get("classes") and not isinstance(dataset, ImageFolderDataset) and classes != list(info["classes"]):
        raise UsageError(f"the checkpoint was trained on classes {info['classes']}, the data has {classes}")
    device = next(model.parameters()).device
    loader = make_loader(dataset, batch_size, EpochSampler(len(dataset), shuffle=False), workers)
    show = progress if progress is not None else __import__("sys").stderr.isatty()
    with torch.no_grad():
        result = evaluate_model(model, loader, classes, device=device, amp=amp, progress=show)
    return result, write_eval_report(result, Path(out)), size

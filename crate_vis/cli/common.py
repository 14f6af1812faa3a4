"""Arguments and helpers shared by the sub-commands: the model options, progress bars, the skip report."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_model_args", "add_device_arg", "add_progress_arg", "resolve_command_model", "print_report"]


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default: cuda when available, else cpu)."""
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    """``--no-progress`` (progress bars are also off when stderr is not a terminal)."""
    parser.add_argument("--no-progress", action="store_false", dest="progress", default=None,
                        help="no progress bar (default: shown when writing to a terminal)")  # fmt: skip


def add_model_args(parser: argparse.ArgumentParser, allow_many: bool = False) -> None:
    """``--checkpoint`` / ``--model`` / ``--num-classes`` / ``--device``.

    Args:
        parser: the sub-command's parser.
        allow_many: ``--model`` may be given several times (comparison figures).
    """
    parser.add_argument("--checkpoint", "-c", default=None,
                        help="weights: a project folder or .safetensors, a run folder or its last.pt/best.pt, or any "
                             "checkpoint with --model (default: the embedded default model)")  # fmt: skip
    if allow_many:
        parser.add_argument("--model", "-m", action="append", default=None,
                            help="model name (CRATE family or timm ViT) or weights as for --checkpoint; repeat to "
                                 "compare models")  # fmt: skip
    else:
        parser.add_argument("--model", "-m", default=None, help="model name (CRATE family or timm ViT)")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier size for --model with a checkpoint")
    add_device_arg(parser)


def resolve_command_model(args: argparse.Namespace, model: str | None = None) -> Any:
    """The model a command's ``--checkpoint`` / ``--model`` name (:func:`crate_vis.models.resolve_model`).

    A ``--model`` value that is a path (a project folder, a run folder, ``last.pt``) is taken as weights.
    """
    from pathlib import Path

    from ..models import resolve_model

    name = model if model is not None else args.model
    if name is not None and Path(name).exists():
        return resolve_model(name, None, num_classes=args.num_classes, device=args.device)
    return resolve_model(args.checkpoint, name, num_classes=args.num_classes, device=args.device)


def print_report(report: Any) -> None:
    """The skip report's summary (counts, then each skipped file)."""
    print(report.summary())


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--model-arg`` / ``--set``: the value read as YAML (numbers, lists, booleans)."""
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"cannot read the value of {text!r}") from None
    return key.strip().replace("-", "_"), parsed

"""``crate-vis info``, ``list-models`` and ``convert``: argument parsing over :mod:`crate_vis.models`."""

from __future__ import annotations

import argparse
import json

from .common import add_model_args, key_value, resolve_command_model

__all__ = ["add_arguments_info", "run_info", "add_arguments_list_models", "run_list_models",
           "add_arguments_convert", "run_convert"]  # fmt: skip


def add_arguments_info(p: argparse.ArgumentParser) -> None:
    """Arguments of ``crate-vis info`` (no model given: the embedded default)."""
    add_model_args(p)
    p.add_argument("--img-size", type=int, nargs="+", default=None, help="input size H [W] for the geometry/FLOPs")
    p.add_argument("--json", action="store_true", help="print the same information as JSON")


def run_info(args: argparse.Namespace) -> int:
    """Print the model summary."""
    from ..errors import UsageError
    from ..models.factory import model_summary

    if args.img_size is not None and (len(args.img_size) > 2 or min(args.img_size) < 1):
        raise UsageError(f"--img-size takes H [W] as positive numbers, got {' '.join(map(str, args.img_size))}")
    model = resolve_command_model(args)
    hw = None if args.img_size is None else (args.img_size[0], args.img_size[-1])
    info = model_summary(model, hw)
    if not args.checkpoint and not args.model:
        info["weights_source"] = "the embedded default (crate_vis.models.pretrained.default_weights())"
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    return 0


def add_arguments_list_models(p: argparse.ArgumentParser) -> None:
    """Arguments of ``crate-vis list-models``."""
    p.add_argument("pattern", nargs="?", default="*", help="glob over model and weight names")
    p.add_argument("--timm", action="store_true", help="also list timm names")


def run_list_models(args: argparse.Namespace) -> int:
    """Names by family, then the known weights, both filtered by PATTERN."""
    import fnmatch

    from ..models.pretrained import list_weights, weights_status
    from ..models.registry import FAMILIES, FAMILY_TITLES, list_models

    shown = 0
    for family in FAMILIES:
        names = list_models(args.pattern, family=family)
        if names:
            print(f"{FAMILY_TITLES[family]}:")
            for name in names:
                print(f"  {name}")
            shown += len(names)
    if args.timm:
        extra = list_models(args.pattern, include_timm=True)
        timm_names = [n for n in extra if n not in set(list_models("*"))]
        if timm_names:
            print("timm:")
            for name in timm_names:
                print(f"  {name}")
            shown += len(timm_names)
    records = [r for r in list_weights() if fnmatch.fnmatch(r.name, args.pattern) or fnmatch.fnmatch(r.model, args.pattern)]
    if records:
        print("\nknown weights (use the name with -c/--checkpoint; below each: where the file is, or how to get it):")
        for record in records:
            acc = record.reported_accuracy or {}
            top1 = acc.get("top1", "-")
            print(f"  {record.name:<38} {record.model:<32} top1={top1}")
            print(f"      {weights_status(record)}")
        shown += len(records)
    if not shown:
        print(f"no model or weights match {args.pattern!r}")
        return 1
    return 0


def add_arguments_convert(p: argparse.ArgumentParser) -> None:
    """Arguments of ``crate-vis convert``."""
    p.add_argument("source", help="official checkpoint (CRATE main.py/finetune.py, CRATE-alpha, CRATE-MAE) or a "
                   "bare state dict")  # fmt: skip
    p.add_argument("out", help="output folder (model.safetensors + config.json)")
    p.add_argument("--model", "-m", default=None,
                   help="registered name; default: from the checkpoint's 'arch' (CRATE_tiny -> crate_tiny_patch16_224)")  # fmt: skip
    p.add_argument("--num-classes", type=int, default=None, help="classes (default: read from the head)")
    p.add_argument("--model-arg", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                   help="constructor keyword for sizes the registry does not name, e.g. depth=8 (repeatable)")


def run_convert(args: argparse.Namespace) -> int:
    """Convert and report."""
    from ..models.factory import convert_checkpoint

    path, model, layout = convert_checkpoint(args.source, args.out, args.model, args.num_classes,
                                             **dict(args.model_arg))  # fmt: skip
    classes = getattr(model, "num_classes", 0)
    print(f"wrote {path} ({model.model_name}, {classes} classes, from the {layout} layout)")
    return 0

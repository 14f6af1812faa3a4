"""``crate-vis eval``: top-1 / top-5, per-class accuracy and a confusion matrix for a checkpoint on a dataset.

Argument parsing only: the work is :func:`crate_vis.experiments.evaluate.evaluate_split`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_progress_arg

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``crate-vis eval``."""
    p.add_argument("--data", required=True, help="ImageFolder root (or a split folder), CIFAR folder, or 'synthetic'")
    p.add_argument("--checkpoint", "-c", required=True,
                   help="RUN_DIR, RUN_DIR/best, a .safetensors file, a training checkpoint (last.pt/best.pt) or any "
                        "checkpoint with --model")  # fmt: skip
    p.add_argument("--model", "-m", default=None, help="model name for checkpoints that carry no config")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size with --model")
    p.add_argument("--split", default="val", help="split folder to evaluate (default: val; CIFAR: test)")
    p.add_argument("--img-size", type=int, default=None, help="evaluation resolution (default: the training one)")
    p.add_argument("--batch-size", "-b", type=int, default=64)
    p.add_argument("--workers", "-j", type=int, default=2)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--out", "-o", default=None, help="report folder (default: eval_SPLIT beside the checkpoint)")
    add_progress_arg(p)


def run(args: argparse.Namespace) -> int:
    """Evaluate and write ``metrics.json``, ``per_class.csv`` and ``confusion.png``."""
    from ..experiments.evaluate import evaluate_split
    from ..models import resolve_model

    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else ckpt.parent / f"eval_{args.split}"  # beside the weights, not inside them
    model, info = resolve_model(args.checkpoint, args.model, num_classes=args.num_classes, device=args.device,
                                with_info=True)  # fmt: skip
    result, paths, size = evaluate_split(model, info, args.data, out, args.split, args.img_size, args.batch_size,
                                         args.workers, args.amp, args.progress)  # fmt: skip
    print(result.table())
    topk = f"  top-{result.k} {result.topk:.2f}%" if len(result.classes) > 5 else ""
    print(f"top-1 {result.top1:.2f}%{topk}  loss {result.loss:.4f}  ({result.num_images} images at {size} px)")
    if result.skipped:
        print(f"{len(result.skipped)} unreadable image(s) skipped (listed above)")
    print(f"report: {paths['metrics']}, {paths['per_class']}, {paths['confusion']}")
    return 0

"""``crate-vis analyze``: layer-wise coding rate and sparsity over an image folder, with a random-init baseline.

Argument parsing only: the work is :func:`crate_vis.experiments.analyze.analyze_layers`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_model_args, print_report, resolve_command_model

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``crate-vis analyze``."""
    add_model_args(parser)
    parser.add_argument("--data", "-d", required=True, help="image folder (searched recursively) or one image")
    parser.add_argument("--out", "-o", required=True, help="output folder for layers.csv and the figures")
    parser.add_argument("--img-size", type=int, default=None,
                        help="square input side in pixels, a multiple of the patch (default: the training size)")  # fmt: skip
    parser.add_argument("--max-images", type=int, default=None,
                        help="measure a seeded random sample of at most this many images (default: all)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init baseline and of the sample")
    parser.add_argument("--eps", type=float, default=0.01, help="distortion eps of the coding rates")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image")


def run(args: argparse.Namespace) -> int:
    """Measure the model and its random-init baseline over ``--data``; returns the exit status."""
    from ..experiments.analyze import AnalyzeConfig, analyze_layers

    config = AnalyzeConfig(size=args.img_size, batch_size=args.batch_size, max_images=args.max_images, eps=args.eps,
                           seed=args.seed, strict=args.strict)  # fmt: skip
    model = resolve_command_model(args)
    source = Path(args.checkpoint).name if args.checkpoint else ("random weights" if args.model else "default weights")
    _, report, written = analyze_layers(args.data, model, args.out, config, source)
    for w in written:
        print(w)
    print_report(report)
    return report.exit_code() or (0 if written else 1)

"""``crate-vis emergence``: train CRATE and a matched ViT on synthetic data and score emergent segmentation.

Argument parsing only: the experiment is :mod:`crate_vis.experiments.emergence`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..experiments.emergence import EmergenceSettings

__all__ = ["add_arguments", "run", "settings_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``crate-vis emergence``."""
    d = EmergenceSettings(out=Path("."))
    parser.add_argument("--out", required=True, help="folder for emergence.md, emergence.json and the figures")
    parser.add_argument("--runs", default=None, help="folder for the training runs (default OUT/emergence_runs)")
    parser.add_argument("--minutes-per-model", type=float, default=d.minutes_per_model,
                        help="training budget per model; sets the shared step count")  # fmt: skip
    parser.add_argument("--image-size", type=int, default=d.image_size, help="image side in pixels")
    parser.add_argument("--max-steps", type=int, default=None, help="fix the step count instead of the budget")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--test-images", type=int, default=d.test_images, help="held-out images scored")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=d.threads,
                        help="PyTorch CPU threads (default 1: fastest on a CPU shared with other jobs)")  # fmt: skip
    parser.add_argument("--parallel", action="store_true",
                        help="train the two models at the same time in two processes")  # fmt: skip
    parser.add_argument("--fast", action="store_true", help="smoke test: a few steps on a few tiny images")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild emergence.md and the layer curves from OUT/emergence.json, training nothing")  # fmt: skip


def settings_from_args(args: argparse.Namespace) -> EmergenceSettings:
    """:class:`EmergenceSettings` from parsed arguments."""
    return EmergenceSettings(
        out=Path(args.out), runs=None if args.runs is None else Path(args.runs),
        minutes_per_model=args.minutes_per_model, image_size=args.image_size, max_steps=args.max_steps,
        batch_size=args.batch_size, lr=args.lr, test_images=args.test_images, seed=args.seed, threads=args.threads,
        parallel=args.parallel, fast=args.fast, command="crate-vis " + shlex.join(sys.argv[1:]),
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run the experiment (or with ``--report-only`` rebuild its report) and print its findings."""
    from ..experiments.emergence import findings, rebuild_report, run_emergence

    results = rebuild_report(args.out) if args.report_only else run_emergence(settings_from_args(args))
    for line in findings(results):
        print(line)
    print(f"report: {Path(args.out) / 'emergence.md'}")
    return 0

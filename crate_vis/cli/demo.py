"""``crate-vis demo``: the main job end to end on built-in data, with the embedded default models.

Argument parsing only: the work is :func:`crate_vis.experiments.demo.run_demo`.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``crate-vis demo``."""
    parser.description = (
        "Run the toolkit end to end on built-in data: (1) per-head attention figures, segmentation overlays and the "
        "head-wise part figure of the sample photos shipped with crate-vis (public domain / CC0), with the embedded "
        "default model for photos; (2) segment held-out synthetic images that come with ground-truth masks, score "
        "them (foreground Jaccard, COCO AP) and draw their head figure. Prints the equivalent commands."
    )
    parser.add_argument("--out", "-o", default="crate-vis-demo", help="output folder (default: ./crate-vis-demo)")
    parser.add_argument("--images", type=int, default=8, help="synthetic images to segment and score (default 8)")
    parser.add_argument("--method", choices=("dino", "maskcut", "tokencut"), default=None,
                        help="segmentation method (default: what each model's weights recommend, else dino)")  # fmt: skip
    parser.add_argument("--checkpoint", "-c", default=None,
                        help="weights for the photos instead of the embedded default for photos")  # fmt: skip
    parser.add_argument("--synthetic-checkpoint", default=None,
                        help="weights for the synthetic part instead of the synthetic-shapes model")  # fmt: skip
    parser.add_argument("--no-photos", action="store_true", help="skip the sample photos")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the scored synthetic images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    from ..experiments.demo import DemoConfig, run_demo

    config = DemoConfig(
        images=args.images, method=args.method, seed=args.seed, device=args.device, photos_checkpoint=args.checkpoint,
        synthetic_checkpoint=args.synthetic_checkpoint, photos=not args.no_photos, synthetic=not args.no_synthetic,
    )  # fmt: skip
    run_demo(args.out, config)
    return 0

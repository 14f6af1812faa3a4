"""``crate-vis demo``: the main job end to end on built-in data and the embedded default model.

It writes a few held-out images of the synthetic shapes dataset (generated here, with ground-truth masks), segments
them from the CLS attention of the embedded default CRATE (``crate-vis segment``), scores the masks against the
ground truth (``crate-vis score``), and draws the head-wise part figure (``crate-vis heads``). Each step is the same
command a user would run, so the printed commands can be re-run or pointed at other images.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``crate-vis demo``."""
    parser.add_argument("--out", "-o", default="crate-vis-demo", help="output folder (default: ./crate-vis-demo)")
    parser.add_argument("--images", type=int, default=8, help="synthetic validation images to segment (default 8)")
    parser.add_argument("--checkpoint", "-c", default=None, help="weights to use instead of the embedded default")
    parser.add_argument("--method", choices=("dino", "maskcut", "tokencut"), default="dino",
                        help="segmentation method (default dino)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _step(title: str, argv: list[str]) -> int:
    from . import main

    print(f"\n== {title}\n$ crate-vis {shlex.join(argv)}", flush=True)
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"step '{title}' failed with exit status {code}")
    return code


def run(args: argparse.Namespace) -> int:
    """Write the demo images, then segment, score and draw them."""
    from ..data.synthetic import write_dataset
    from ..models.pretrained import default_weights

    if args.images < 1:
        raise ValueError(f"--images must be at least 1, got {args.images}")
    out = Path(args.out)
    checkpoint = args.checkpoint or str(default_weights().parent)
    data = write_dataset(out / "images", num_train=0, num_val=args.images, image_size=96, seed=args.seed,
                         overwrite=True)  # fmt: skip
    gt = data / "annotations" / "instances_val.json"
    common = ["--checkpoint", checkpoint] + (["--device", args.device] if args.device else [])
    print(f"demo: {args.images} synthetic images with ground-truth masks in {data / 'val'}; model {checkpoint}")

    _step("segment from attention", ["segment", str(gt), "--out", str(out / "segment"), "--method", args.method,
                                     *common])  # fmt: skip
    _step("score against the ground truth (foreground Jaccard)",
          ["score", "--pred", str(out / "segment"), "--gt", str(gt), "--protocol", "jaccard",
           "--output", str(out / "scores_jaccard.json")])  # fmt: skip
    _step("score against the ground truth (class-agnostic COCO AP)",
          ["score", "--pred", str(out / "segment" / "results.json"), "--gt", str(gt), "--protocol", "coco",
           "--iou-type", "segm", "--output", str(out / "scores_coco.json")])  # fmt: skip
    _step("head-wise part figure", ["heads", str(data / "val"), "--out", str(out / "heads.png"), "--gt", str(gt),
                                    "--max-images", "6", *common])  # fmt: skip
    print(f"\ndone: overlays and masks in {out / 'segment'}, figure {out / 'heads.png'}, scores in {out}")
    return 0

"""``crate-vis score``: score segmentations against ground truth (COCO AP, Jaccard, coarse mIoU, CorLoc, saliency,
per-head part scores).

Argument parsing only: the work is :func:`crate_vis.experiments.score.score_predictions`; predictions are matched to
ground-truth images by file name.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``crate-vis score``."""
    from ..experiments.score import PROTOCOLS

    parser.add_argument("--pred", required=True,
                        help="a crate-vis segment output folder, a COCO results json (coco, corloc), a folder of "
                             "masks named after the images (jaccard, miou, corloc), of .npy maps (saliency, parts)")  # fmt: skip
    parser.add_argument("--gt", required=True, help="COCO json, VOC root or folder of masks")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="coco", help="what to score (default: coco)")
    parser.add_argument("--image-root", default=None, help="image folder of a COCO json GT (default: found beside it)")
    parser.add_argument("--split", default="val", help="VOC ImageSets/Segmentation split (default: val)")
    parser.add_argument("--iou-type", choices=("segm", "bbox", "both"), default="both",
                        help="coco: masks, boxes or both (default both)")  # fmt: skip
    parser.add_argument("--class-aware", action="store_true", help="coco: match categories (default: class-agnostic)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score when some GT images have no prediction; they count as missed (default: an error)")
    parser.add_argument("--resize-pred", action="store_true",
                        help="jaccard, saliency: resize predictions of another size to the GT (nearest)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="miou: bring image-size masks to a token grid of this patch size")  # fmt: skip
    parser.add_argument("--no-background", action="store_true", help="miou: leave the background class out")
    parser.add_argument("--box-from", choices=("union", "first"), default="union",
                        help="corloc from a mask folder: box of the union of an image's masks or of the first")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--output", "-o", default=None, help="also write the JSON to this file")


def run(args: argparse.Namespace) -> int:
    """Score and print; 0 on success (errors raise and the command line reports them)."""
    from ..experiments.score import ScoreConfig, format_table, jsonable, score_predictions
    from ..io.atomic import atomic_write_json
    from ..io.outputs import writable_file

    config = ScoreConfig(
        protocol=args.protocol, image_root=args.image_root, split=args.split, iou_type=args.iou_type,
        class_aware=args.class_aware, allow_missing=args.allow_missing, resize_pred=args.resize_pred,
        patch_size=args.patch_size, background=not args.no_background, box_from=args.box_from,
    )  # fmt: skip
    if args.output:
        writable_file(args.output, "--output", inputs=(args.pred, args.gt))  # before the work
    res = jsonable(score_predictions(args.pred, args.gt, config))
    if args.output:
        atomic_write_json(args.output, res, indent=2)
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 0

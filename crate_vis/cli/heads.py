"""``crate-vis heads``: the head-wise part figure (images x heads, one colour per head, a part-map column) and a
per-head consistency table.

Argument parsing only: the work is :func:`crate_vis.experiments.heads.heads_figure`.
"""

from __future__ import annotations

import argparse

from .common import add_model_args, print_report, resolve_command_model

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``crate-vis heads``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "--model also takes weights (a project folder, a run folder, last.pt), so trained models compare in one "
        "command:\n  crate-vis heads photos/ --by-class --model runs/crate --model runs/vit --out heads.pdf\n"
        "  crate-vis heads coco/train2017 --gt coco/annotations/instances_train2017.json --heads 0,1,3,4 "
        "--out heads.png"
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIR", help="image files or folders")
    parser.add_argument("--out", "-o", required=True, help="figure path (.png, .pdf or .svg)")
    add_model_args(parser, allow_many=True)
    parser.add_argument("--layer", "-l", type=int, default=None,
                        help="layer index, negative counts from the end (default: the layer the weights recommend, "
                             "else the last)")  # fmt: skip
    parser.add_argument("--heads", default=None, help="comma-separated head indices to show, e.g. 0,1,3,4 (default all)")
    parser.add_argument("--by-class", action="store_true",
                        help="group rows by class: the first folder level under each folder given (ImageFolder)")  # fmt: skip
    parser.add_argument("--per-class", type=int, default=3, help="images per class with --by-class")
    parser.add_argument("--max-images", type=int, default=6,
                        help="rows without --by-class (picked evenly through the sorted list)")  # fmt: skip
    parser.add_argument("--gt", default=None, help="ground truth (COCO json, VOC root, mask folder): adds IoU and "
                        "mass-inside scores per head")  # fmt: skip
    parser.add_argument("--img-size", type=int, default=None,
                        help="short side of the model input (default: the model's training size)")  # fmt: skip
    parser.add_argument("--mass", type=float, default=0.6, help="attention fraction kept by each head's mask")
    parser.add_argument("--all-patches", action="store_true",
                        help="part map over every patch (default: only where some head's mask holds; rest dimmed)")  # fmt: skip
    parser.add_argument("--separate", action="store_true", help="one figure per model instead of side by side")
    parser.add_argument("--cell-width", type=float, default=1.3, help="cell width in inches")
    parser.add_argument("--display-size", type=int, default=600, help="longest side in pixels of the photo per cell")
    parser.add_argument("--scores-out", default=None, help="also write the per-head scores as JSON")
    parser.add_argument("--dpi", type=int, default=200, help="figure resolution")
    parser.add_argument("--title", default=None, help="figure title (default: describes the figure)")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image")


def run(args: argparse.Namespace) -> int:
    """Draw the head-wise figure and print the per-head scores; returns the exit status."""
    from ..errors import UsageError
    from ..experiments.heads import HeadsConfig, heads_figure
    from ..segmentation.run import parse_heads

    config = HeadsConfig(
        layer=args.layer, heads=parse_heads(args.heads), by_class=args.by_class, per_class=args.per_class,
        max_images=args.max_images, gt=args.gt, size=args.img_size, mass=args.mass, all_patches=args.all_patches,
        separate=args.separate, cell_width=args.cell_width, display_size=args.display_size,
        scores_out=args.scores_out, dpi=args.dpi, title=args.title, strict=args.strict,
    )  # fmt: skip
    names = args.model or [None]
    if args.checkpoint and len(names) > 1:
        raise UsageError("--checkpoint goes with a single --model; to compare trained models pass each one's weights "
                         "as a --model value")  # fmt: skip
    models = [resolve_command_model(args, n) for n in names]
    written, report = heads_figure(args.inputs, models, args.out, config)
    for w in written:
        print(w)
    print_report(report)
    return report.exit_code() or (0 if written else 1)

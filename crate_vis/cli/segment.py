"""``crate-vis segment``: DINO / MaskCut / TokenCut masks for images, folders or a COCO json.

Argument parsing only: the work is :func:`crate_vis.experiments.segment.segment_images` (the output layout is
:mod:`crate_vis.io.segment_output`). ``--shard i/N`` (or ``torchrun --nproc_per_node N -m crate_vis segment ...``)
splits the inputs; ``--merge OUT`` joins finished shards.
"""

from __future__ import annotations

import argparse

from .common import add_model_args, add_progress_arg, print_report, resolve_command_model

__all__ = ["add_arguments", "run"]

#: Options that only some methods use: an option given for another method is an error, not ignored.
METHOD_OPTIONS = {
    "mass": ("--mass", {"dino"}),
    "heads": ("--heads", {"dino"}),
    "combine": ("--combine", {"dino"}),
    "largest_component": ("--largest-component", {"dino"}),
    "tau": ("--tau", {"maskcut", "tokencut"}),
    "max_masks": ("--max-masks", {"maskcut"}),
    "solver": ("--solver", {"maskcut", "tokencut"}),
    "cut_rules": ("--cut-rules", {"maskcut"}),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``crate-vis segment``."""
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="image files, folders (searched recursively) or a COCO annotation json")  # fmt: skip
    parser.add_argument("--out", "-o", required=True, help="output folder")
    add_model_args(parser)
    parser.add_argument("--method", choices=("dino", "maskcut", "tokencut"), default=None,
                        help="dino: thresholded CLS attention; maskcut: up to --max-masks normalized cuts of the "
                             "layer's features; tokencut: one cut, the official TokenCut rule (default: what the "
                             "weights recommend, else dino)")  # fmt: skip
    parser.add_argument("--layer", type=int, default=None,
                        help="layer whose attention/features are used (default: what the weights recommend, else -1)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="short side of the model input in pixels, aspect ratio kept (default: what the weights "
                             "recommend, else the model's training size)")  # fmt: skip
    parser.add_argument("--square", action="store_true",
                        help="resize to --img-size x --img-size instead (MaskCut's fixed-size input, e.g. "
                             "--img-size 480); masks are still mapped back to each image's own size")  # fmt: skip
    parser.add_argument("--max-side", type=int, default=2048,
                        help="refuse (skip) images whose model input would be longer than this (default 2048)")
    parser.add_argument("--mass", type=float, default=None, help="dino: fraction of the attention kept (default 0.6)")
    parser.add_argument("--heads", default=None, help="dino: comma-separated heads to combine (default all)")
    parser.add_argument("--combine", choices=("mean", "union"), default=None,
                        help="dino: threshold the head-averaged attention (default), or the union of head masks")
    parser.add_argument("--largest-component", action="store_true", help="dino: keep the largest component only")
    parser.add_argument("--tau", type=float, default=None, help="maskcut/tokencut: affinity threshold in [0, 1) "
                        "(default 0.15 / 0.2)")  # fmt: skip
    parser.add_argument("--max-masks", type=int, default=None, help="maskcut: most masks per image (default 3)")
    parser.add_argument("--solver", choices=("auto", "dense", "lanczos", "torch"), default=None,
                        help="maskcut/tokencut eigen-solver: auto (dense for small grids, else Lanczos), or torch "
                             "(torch.linalg.eigh on the model's device, e.g. a GPU)")  # fmt: skip
    parser.add_argument("--cut-rules", choices=("default", "cutler"), default=None,
                        help="maskcut: default (sign-independent corner rule, stop at the first dropped mask) or "
                             "cutler (CutLER maskcut.py exactly; dense solver)")  # fmt: skip
    parser.add_argument("--refine", choices=("none", "bilateral"), default=None,
                        help="any method: bilateral refines each mask along the photo's edges with the fast bilateral "
                             "solver, as TokenCut does (its grid, lam 128; MaskCut's masks one by one; a few "
                             "hundredths of a second per photo, solved at most 512 px on the long side); a refined mask that is empty or "
                             "has IoU < 0.5 with the coarse one is dropped for the coarse mask, since on "
                             "low-contrast photos the solver can erase or flip it (default: what the weights "
                             "recommend, else none)")  # fmt: skip
    parser.add_argument("--batch-size", "-b", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--workers", "-j", type=int, default=0,
                        help="data-loading processes that decode and resize images (default 0: this process)")
    parser.add_argument("--cut-workers", type=int, default=1,
                        help="threads over which a batch's eigen-solves are spread (default 1)")
    parser.add_argument("--image-root", default=None, help="folder a COCO json's file_name entries are under "
                        "(default: found beside the json)")  # fmt: skip
    parser.add_argument("--no-overlay", action="store_true", help="do not write overlay images")
    parser.add_argument("--overlay-format", choices=("png", "jpg"), default="png",
                        help="overlay format (jpg: about 10x smaller, for large runs)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--skip-existing", "--resume", action="store_true", dest="resume",
                       help="resume a run into --out: skip images done with the same settings and weights")
    group.add_argument("--overwrite", action="store_true", help="replace what an earlier run wrote into --out")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="segment only shard I of N (job arrays); merge with --merge afterwards")
    parser.add_argument("--merge", action="store_true",
                        help="merge the finished shards in --out into results.json and images.json, and exit")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad image instead of skipping it")
    add_progress_arg(parser)


def run(args: argparse.Namespace) -> int:
    """Parse the options and segment (or merge shards)."""
    from ..errors import UsageError
    from ..experiments.segment import (
        SegmentRunConfig,
        local_device,
        merge_shards,
        parse_shard,
        segment_images,
    )
    from ..models import recommended_settings
    from ..segmentation.run import parse_heads, recommended_config

    if args.merge:
        info = merge_shards(args.out)
        print(f"merged {info['processed']} images, {info['masks']} masks -> {args.out}/results.json")
        return 0
    if not args.inputs:
        raise UsageError("give images, folders or a COCO json to segment (or --merge OUT)")
    if args.device is None:
        args.device = local_device()  # under torchrun: one device per local rank
    model = resolve_command_model(args)
    recommended = recommended_settings(model)  # the weights' own segment settings, chosen when they were released
    method = args.method or recommended.get("method", "dino")
    for attr, (flag, methods) in METHOD_OPTIONS.items():
        value = getattr(args, attr)
        if value not in (None, False) and method not in methods:
            raise UsageError(f"{flag} applies to --method {' / '.join(sorted(methods))}, not {method}")
    segment = recommended_config(
        recommended, method=method, layer=args.layer, mass=args.mass, tau=args.tau, max_masks=args.max_masks,
        refine=args.refine, heads=parse_heads(args.heads), combine=args.combine or "mean",
        largest_component=args.largest_component, solver=args.solver or "auto", cut_rules=args.cut_rules or "default",
    )  # fmt: skip
    config = SegmentRunConfig(
        segment=segment, size=args.img_size if args.img_size is not None else recommended.get("img_size"),
        square=args.square, max_side=args.max_side,
        batch_size=args.batch_size, workers=args.workers, cut_workers=args.cut_workers,
        overlay=None if args.no_overlay else args.overlay_format,
        mode="resume" if args.resume else "overwrite" if args.overwrite else "new",
        shard=parse_shard(args.shard) if args.shard else None, strict=args.strict, progress=args.progress,
        image_root=args.image_root,
    )  # fmt: skip
    info = segment_images(args.inputs, model, args.out, config)
    report = info["report"]
    print_report(report)
    if "masks" in info:
        print(f"{info['masks']} masks for {info['processed']} images -> {args.out}/results.json")
    else:
        print(f"shard {args.shard or ''} done in {args.out}; merge with: crate-vis segment --merge --out {args.out}")
    return report.exit_code()

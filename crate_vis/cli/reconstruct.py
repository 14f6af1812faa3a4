"""``crate-vis reconstruct``: masked reconstructions of photos by a CRATE-MAE, one figure per image and a PSNR table.

Argument parsing only: the work is :func:`crate_vis.experiments.reconstruct.reconstruct_images`.
"""

from __future__ import annotations

import argparse

from .common import add_model_args, print_report, resolve_command_model

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``crate-vis reconstruct``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "example:\n  crate-vis reconstruct photos/*.jpg --checkpoint runs/mae --mask-ratio 0.75 --seed 0 --out recon/\n"
        "Each figure shows the input, the input with the removed patches grey, the reconstruction and the\n"
        "reconstruction with the visible patches pasted back; the table gives each image's PSNR on the removed\n"
        "patches (also written to OUT/reconstruct.csv). The mask depends only on --seed and the patch grid."
    )
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--out", "-o", required=True, help="output folder (one figure per image, named after it)")
    add_model_args(parser)
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="share of patches removed, in [0, 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masking noise")
    parser.add_argument("--img-size", type=int, default=None,
                        help="short side of the model input in pixels (default: the model's training size)")  # fmt: skip
    parser.add_argument("--square", action="store_true",
                        help="resize to the training grid (img-size x img-size) instead of keeping the aspect ratio")
    parser.add_argument("--max-side", type=int, default=2048,
                        help="skip images whose model input would be longer than this (default 2048)")
    parser.add_argument("--denorm", choices=("visible", "target"), default="visible",
                        help="norm_pix_loss models: take a removed patch's mean and std from the visible patches "
                             "(default) or from its own hidden pixels, as MAE's demo does")  # fmt: skip
    parser.add_argument("--format", choices=("png", "pdf", "svg"), default="png", help="figure format")
    parser.add_argument("--dpi", type=int, default=150, help="figure resolution")
    parser.add_argument("--cell-width", type=float, default=2.0, help="panel width in inches")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image")


def run(args: argparse.Namespace) -> int:
    """Write one reconstruction figure per readable image and print the table; returns the exit status."""
    from ..experiments.reconstruct import ReconstructConfig, reconstruct_images

    config = ReconstructConfig(
        mask_ratio=args.mask_ratio, seed=args.seed, size=args.img_size, square=args.square, max_side=args.max_side,
        denorm=args.denorm, fmt=args.format, dpi=args.dpi, cell_width=args.cell_width, strict=args.strict,
    )  # fmt: skip
    report = reconstruct_images(args.images, resolve_command_model(args), args.out, config)
    print_report(report)
    return report.exit_code()

"""``crate-vis attention``: per-head CLS attention overlays and DINO masks, one figure per image.

Argument parsing only: the work is :func:`crate_vis.experiments.attention.attention_figures`.
"""

from __future__ import annotations

import argparse

from .common import add_model_args, print_report, resolve_command_model

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``crate-vis attention``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "example:\n  crate-vis attention photos/*.jpg --out figs/ --layer -1 --mass 0.6 --per-head --format pdf\n"
        "Figures are named after the images; maps are drawn at each photo's own size and aspect ratio."
    )
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--out", "-o", required=True, help="output folder (one figure per image, named after it)")
    add_model_args(parser)
    parser.add_argument("--layer", "-l", type=int, default=None,
                        help="layer index, negative counts from the end (default: the layer the weights recommend, "
                             "else the last)")  # fmt: skip
    parser.add_argument("--img-size", type=int, default=None,
                        help="short side of the model input in pixels (default: the model's training size)")  # fmt: skip
    parser.add_argument("--max-side", type=int, default=2048,
                        help="skip images whose model input would be longer than this (default 2048)")
    parser.add_argument("--mass", type=float, default=0.6, help="fraction of each head's attention kept by its mask")
    parser.add_argument("--per-head", action="store_true",
                        help="also write each head's overlay and mask as PNGs at the photo's resolution")  # fmt: skip
    parser.add_argument("--rollout", action="store_true", help="also draw attention rollout over all layers")
    parser.add_argument("--pca", action="store_true",
                        help="also draw the first three principal components of the layer's patch features")
    parser.add_argument("--save-maps", action="store_true",
                        help="also save each image's CLS attention (heads, h, w) as maps/<name>.npy "
                             "(score them with crate-vis score --protocol parts)")  # fmt: skip
    parser.add_argument("--format", choices=("png", "pdf", "svg"), default="png", help="figure format")
    parser.add_argument("--dpi", type=int, default=200, help="figure resolution")
    parser.add_argument("--smooth", action="store_true",
                        help="bilinear heat maps (default: one block per patch, the token resolution)")  # fmt: skip
    parser.add_argument("--cmap", default="inferno", help="matplotlib colormap of the heat maps")
    parser.add_argument("--max-cols", type=int, default=8, help="panels per row before wrapping (rows are balanced)")
    parser.add_argument("--cell-width", type=float, default=1.7, help="panel width in inches")
    parser.add_argument("--display-size", type=int, default=800,
                        help="longest side in pixels of the photo in each figure panel (per-head PNGs keep the "
                             "photo's full size)")  # fmt: skip
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image")


def run(args: argparse.Namespace) -> int:
    """Write one attention figure per readable image; returns the exit status."""
    from ..experiments.attention import AttentionConfig, attention_figures

    config = AttentionConfig(
        layer=args.layer, size=args.img_size, max_side=args.max_side, mass=args.mass, per_head=args.per_head,
        fmt=args.format, dpi=args.dpi, smooth=args.smooth, cmap=args.cmap, max_cols=args.max_cols,
        cell_width=args.cell_width, display_size=args.display_size, rollout=args.rollout, pca=args.pca,
        save_maps=args.save_maps, strict=args.strict,
    )  # fmt: skip
    report = attention_figures(args.images, resolve_command_model(args), args.out, config)
    print_report(report)
    return report.exit_code()

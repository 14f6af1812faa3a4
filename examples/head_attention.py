"""Load a checkpoint and draw what each attention head of one layer looks at in an image.

    python examples/head_attention.py --out out/heads                      # embedded default, a synthetic image
    python examples/head_attention.py --image photo.jpg --checkpoint weights/ --layer -2 --out out/heads

Writes ``head_attention.png`` (per head: the CLS attention over the image and its DINO mask, which keeps the
most-attended patches holding 60 % of the attention) and prints how much of each head's attention falls on the
object when the image is a synthetic one with a known mask.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from crate_vis import load_model
from crate_vis.data.synthetic import SyntheticShapes
from crate_vis.experiments.attention import image_attention
from crate_vis.io.images import load_image
from crate_vis.metrics import attention_mass_inside
from crate_vis.models.pretrained import default_weights
from crate_vis.viz.plots import attention_figure, model_label, save_figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="project-format weights (default: the embedded default)")
    parser.add_argument("--image", default=None, help="an image file (default: a synthetic validation image)")
    parser.add_argument("--layer", type=int, default=-1, help="layer to show (negative counts from the end)")
    parser.add_argument("--out", default="out/head_attention", help="output folder")
    parser.add_argument("--fast", action="store_true", help="low-resolution figure (for tests)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = load_model(args.checkpoint or default_weights())  # eval mode, rebuilt from its config
    mask = None
    if args.image:
        image = load_image(args.image)
    else:
        size = int(model.config["image_size"][0]) if hasattr(model, "config") else 96
        image, label, mask = SyntheticShapes("val", 8, image_size=size, seed=0).sample(3)
        print(f"synthetic image of class {SyntheticShapes('val', 1).classes[label]!r}")

    res = image_attention(model, image, layer=args.layer)
    prep = res.prepared  # the photo, the model input and the geometry linking them
    heat = prep.grid_to_image(res.attn, mode="bilinear")  # (heads, H, W) on the image
    masks = prep.grid_to_image(res.masks).astype(bool)  # (heads, H, W)
    fig = attention_figure(
        res.prepared.original, heat, masks,
        mean_heat=prep.grid_to_image(res.mean_attn, mode="bilinear"),
        mean_mask=prep.grid_to_image(res.mean_mask).astype(bool),
        title=f"{model_label(model)}, layer {args.layer}", mass=res.mass, cell_width=1.2 if args.fast else 1.7,
    )  # fmt: skip
    out = save_figure(fig, Path(args.out) / "head_attention.png", dpi=80 if args.fast else 150)
    print(f"wrote {out}")

    if mask is not None:
        # share of each head's attention (over patches) that lands on the object (the toolkit's one definition)
        share = attention_mass_inside(res.attn, prep.geometry.mask_fraction(mask)).numpy()
        iou = (masks & mask).sum(axis=(1, 2)) / np.maximum((masks | mask).sum(axis=(1, 2)), 1)
        print(f"object covers {mask.mean():.0%} of the image")
        for h, (s, j) in enumerate(zip(share, iou)):
            print(f"head {h}: {s:.0%} of the attention on the object, DINO-mask IoU {j:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train a small CRATE and a ViT of about the same size with one recipe, then compare accuracy and attention masks.

    python examples/train_compare.py --out out/compare                        # synthetic shapes, on a CPU
    python examples/train_compare.py --data path/to/imagefolder --steps 2000 --out out/compare

Both models are trained by :func:`crate_vis.train.train` with the same recipe, data and number of steps. Then each
is scored on held-out synthetic images with exact masks: top-1 accuracy and the Jaccard of the DINO mask of its
last layer's head-averaged CLS attention with the object (the emergent-segmentation score). The trained weights
are in ``OUT/crate/best`` and ``OUT/vit/best`` (project format, :func:`crate_vis.load_model`).

With this recipe (AdamW at 1e-3, batch 32, 64 px, 2000 steps) CRATE reached 73.7 % and the ViT 45.0 % held-out
top-1 on the synthetic shapes; ``analysis/results/emergence.md`` has the measured numbers and attention scores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from crate_vis.data.synthetic import SyntheticShapes
from crate_vis.data.transforms import to_tensor
from crate_vis.hooks import cls_attention_maps
from crate_vis.metrics import fg_jaccard
from crate_vis.segmentation import dino_foreground, upsample_masks
from crate_vis.train import resolve_config, train

#: (CRATE name, timm name, ViT overrides): a ViT with CRATE's depth, heads and patch, its width set so the
#: parameter counts agree within a few percent (MLP ratio 4).
PAIRS = {
    "mini": ("crate_mini_patch8_96", "vit_tiny_patch16_224", dict(patch_size=8, embed_dim=96, depth=6, num_heads=6)),
    "test": ("crate_test_patch8_32", "vit_tiny_patch16_224", dict(patch_size=8, embed_dim=36, depth=3, num_heads=4)),
}


def held_out_scores(model: torch.nn.Module, n: int, size: int, classes: int) -> tuple[float, float]:
    """Top-1 accuracy (%) and DINO-mask Jaccard of the last layer on ``n`` synthetic test images."""
    data = SyntheticShapes("test", n, image_size=size, seed=0, num_classes=classes)
    samples = [data.render(i) for i in range(n)]
    x = torch.stack([to_tensor(data.sample(i)[0]) for i in range(n)])  # (n, 3, S, S)
    labels = torch.tensor([s.label for s in samples])
    model.eval()
    with torch.no_grad():
        top1 = float((model(x).argmax(1) == labels).float().mean() * 100)
    attn = cls_attention_maps(model, x, layer=-1).float()  # (n, heads, gh, gw)
    fg = upsample_masks(dino_foreground(attn, mass=0.6, combine="mean"), size // attn.shape[-1]).numpy()
    return top1, fg_jaccard(list(fg), [s.mask for s in samples])["mean"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="ImageFolder root or 'synthetic' (default)")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per model")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="out/train_compare", help="output folder (one run folder per model)")
    parser.add_argument("--fast", action="store_true", help="tiny models, 2 steps (for tests)")
    args = parser.parse_args(argv)

    pair = PAIRS["test" if args.fast else "mini"]
    steps, size, batch = (2, 32, 8) if args.fast else (args.steps, args.img_size, args.batch_size)
    common = dict(
        data=args.data, epochs=1, max_steps=steps, batch_size=batch, img_size=size, optimizer="adamw", lr=1e-3,
        weight_decay=0.05, warmup_epochs=0.05, min_lr=1e-5, label_smoothing=0.1, clip_grad=1.0, crop_scale=[1.0, 1.0],
        crop_ratio=[1.0, 1.0], eval_crop_pct=1.0, workers=0, threads=1, seed=0, device="cpu", progress=False,
        synthetic_train_images=steps * batch, synthetic_val_images=16 if args.fast else 500,
    )  # fmt: skip
    rows = []
    for name, model_name, kwargs in (("crate", pair[0], {}), ("vit", pair[1], pair[2])):
        run_dir = Path(args.out) / name
        if run_dir.exists():
            shutil.rmtree(run_dir)  # this example's own run folder
        result = train(resolve_config(None, model=model_name, model_kwargs=kwargs, out=str(run_dir), **common))
        params = sum(p.numel() for p in result.model.parameters())
        top1, jac = held_out_scores(result.model.cpu(), 8 if args.fast else 200, size, len(result.classes))
        rows.append((name, model_name, params, result.steps, result.best_metric, top1, jac))

    print(f"\n{'model':<6} {'architecture':<22} {'params':>9} {'steps':>6} {'val top-1':>9} {'test top-1':>10} "
          f"{'DINO Jaccard':>12}")  # fmt: skip
    for name, model_name, params, n_steps, val, top1, jac in rows:
        val_s = "-" if val is None else f"{val:.1f}"
        print(f"{name:<6} {model_name:<22} {params:>9,} {n_steps:>6} {val_s:>9} {top1:>10.1f} {jac:>12.3f}")
    print(f"chance: {100 / len(SyntheticShapes('val', 1).classes):.0f} % top-1 (synthetic data)"
          if args.data == "synthetic" else "")  # fmt: skip
    print(f"runs: {', '.join(str(Path(args.out) / n) for n in ('crate', 'vit'))}")
    return 0 if all(np.isfinite(r[6]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Measure the coding rate and the sparsity of CRATE's tokens layer by layer, against a random initialisation.

    python examples/whitebox_layers.py --out out/whitebox                    # embedded default, synthetic images
    python examples/whitebox_layers.py --checkpoint weights/ --images 256 --out out/whitebox

CRATE's layers are derived as alternating steps on a sparse rate reduction objective: MSSA compresses the tokens
against per-head subspaces (the coding rate of their projections should fall with depth) and ISTA sparsifies them
(the fraction of exact zeros of its ReLU output should rise). This prints both per layer for a trained model and
for the same architecture at random initialisation, and draws them (``coding_rate.png``, ``sparsity.png``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from crate_vis import CRATE, load_model
from crate_vis.data.synthetic import SyntheticShapes
from crate_vis.data.transforms import to_tensor
from crate_vis.models.pretrained import default_weights
from crate_vis.viz.plots import LayerSeries, plot_layer_metric, save_figure
from crate_vis.whitebox import LayerStatsAccumulator, measure_layers


def measure(model: torch.nn.Module, images: torch.Tensor, batch: int = 32) -> LayerStatsAccumulator:
    """Per-layer statistics over ``images`` (B, 3, H, W), streamed in batches."""
    acc = LayerStatsAccumulator()
    for i in range(0, len(images), batch):
        acc.update(measure_layers(model, images[i : i + batch]))
    return acc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="project-format CRATE weights (default: embedded default)")
    parser.add_argument("--images", type=int, default=128, help="synthetic validation images to measure")
    parser.add_argument("--out", default="out/whitebox", help="output folder")
    parser.add_argument("--fast", action="store_true", help="a few images only (for tests)")
    args = parser.parse_args(argv)

    model = load_model(args.checkpoint or default_weights())
    if not isinstance(model, CRATE):
        raise SystemExit("this example measures a CRATE model; the checkpoint holds another architecture")
    torch.manual_seed(0)
    baseline = CRATE(**model.config).eval()  # same architecture, random weights

    n = 8 if args.fast else args.images
    data = SyntheticShapes("val", n, image_size=int(model.config["image_size"][0]), seed=0)
    images = torch.stack([to_tensor(data.sample(i)[0]) for i in range(n)])  # (n, 3, S, S)

    stats = {"trained": measure(model, images), "random init": measure(baseline, images)}
    print(f"{n} synthetic images, mean (std) over images")
    print(f"{'layer':>5} | {'coding rate: trained':>21} {'random init':>18} | {'sparsity: trained':>18} {'random init':>15}")
    cr = {k: (v.mean("coding_rate"), v.std("coding_rate")) for k, v in stats.items()}
    sp = {k: (v.mean("sparsity"), v.std("sparsity")) for k, v in stats.items()}
    for layer in range(model.depth):
        print(f"{layer:>5} | {cr['trained'][0][layer]:12.1f} ({cr['trained'][1][layer]:5.1f}) "
              f"{cr['random init'][0][layer]:10.1f} ({cr['random init'][1][layer]:5.1f}) | "
              f"{sp['trained'][0][layer]:11.3f} ({sp['trained'][1][layer]:.3f}) "
              f"{sp['random init'][0][layer]:8.3f} ({sp['random init'][1][layer]:.3f})")  # fmt: skip

    out = Path(args.out)
    for metric, values, ylabel in (("coding_rate", cr, "coding rate"), ("sparsity", sp, "fraction of zeros")):
        fig = plot_layer_metric(
            LayerSeries("trained", values["trained"][0], values["trained"][1]), ylabel,
            baseline=LayerSeries("random init", values["random init"][0], values["random init"][1]),
            title=f"{metric.replace('_', ' ')} by layer",
        )  # fmt: skip
        print(f"wrote {save_figure(fig, out / f'{metric}.png', dpi=80 if args.fast else 150)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

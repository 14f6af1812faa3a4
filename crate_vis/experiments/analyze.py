"""Layer-wise coding rate and sparsity over an image folder, with a random-init baseline.

Every readable image under ``--data`` (recursively; an ImageFolder tree works) is resized so its short side is
``size`` and centre-cropped to a square, then measured with :func:`crate_vis.whitebox.measure_layers` by the
model and by the same architecture at a seeded random initialisation. Writes, atomically:

* ``layers.csv``: one row per (variant, layer), ``variant`` being ``model`` or ``random_init``, with the per-layer
  mean and standard deviation over images of every metric (``coding_rate``, ``sparsity``, ``l1l2`` and, for CRATE,
  ``compression_rate``, ``total_rate``, ``rate_reduction``). Stds follow the reference convention
  (:data:`crate_vis.whitebox.REFERENCE_DDOF`: population std for sparsity, sample std otherwise).
* ``coding_rate.png`` and ``sparsity.png``: mean +- std against the layer index, model and baseline side by side.
"""

from __future__ import annotations

import csv
import io
import logging
import random
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.image_geometry import prepare_image, skip_reason
from ..errors import ImageLoadError, UsageError
from ..io.atomic import atomic_save, atomic_write
from ..io.images import SkipReport, iter_images, list_images
from ..models.geometry import model_input_size, model_patch_size
from ..whitebox import LayerStatsAccumulator

__all__ = ["AnalyzeConfig", "analyze_layers", "analyze_folder", "random_init_like", "write_layers_csv"]

log = logging.getLogger(__name__)

VARIANTS = ("model", "random_init")


@dataclass(frozen=True)
class AnalyzeConfig:
    """Settings of :func:`analyze_layers` (the flags of ``crate-vis analyze``)."""

    size: int | None = None
    batch_size: int = 16
    max_images: int | None = None
    eps: float = 0.01
    seed: int = 0
    strict: bool = False

    def __post_init__(self) -> None:
        import math

        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be positive, got {self.batch_size}")
        if self.max_images is not None and self.max_images < 1:
            raise UsageError(f"--max-images must be positive, got {self.max_images}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise UsageError(f"--eps must be a positive number, got {self.eps}")
        if self.size is not None and self.size < 1:
            raise UsageError(f"--img-size must be positive, got {self.size}")


def random_init_like(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture as ``model`` at a seeded random initialisation, in eval mode on the same device.

    The global RNG state is left untouched.
    """
    from ..models.checkpoint import model_to_config
    from ..models.factory import build_from_config

    config = model_to_config(model)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        baseline = build_from_config(config)
    return baseline.to(device).eval()


def _batches(
    paths: list[Path], report: SkipReport, patch: tuple[int, int], side: int, batch_size: int
) -> Iterator[torch.Tensor]:
    batch: list[torch.Tensor] = []
    for path, image in iter_images(paths, report):
        try:
            batch.append(prepare_image(image, patch, side, fit="center", max_side=None).tensor)
        except ImageLoadError as err:  # e.g. a photo smaller than one patch: skipped, naming its file
            report.add(path, skip_reason(err))
            continue
        report.processed += 1
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def analyze_folder(
    models: dict[str, nn.Module],
    paths: list[Path],
    side: int,
    batch_size: int,
    eps: float,
    report: SkipReport,
) -> dict[str, LayerStatsAccumulator]:
    """Stream the images once and measure every model on each batch.

    Returns:
        ``{variant: LayerStatsAccumulator}``.
    """
    from ..whitebox import measure_layers

    patch = model_patch_size(next(iter(models.values())))
    accs = {name: LayerStatsAccumulator() for name in models}
    for images in _batches(paths, report, patch, side, batch_size):
        for name, model in models.items():
            device = next(model.parameters()).device
            accs[name].update(measure_layers(model, images.to(device), eps=eps))
    return accs


def write_layers_csv(path: Path, accs: dict[str, LayerStatsAccumulator]) -> None:
    """One row per (variant, layer): mean and std of every metric, and the image count."""
    metrics = list(dict.fromkeys(m for acc in accs.values() for m in acc.metrics))
    header = ["variant", "layer", "n_images"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for variant, acc in accs.items():
        summary = acc.summary()
        counts = acc.count(acc.metrics[0])
        for j, layer in enumerate(acc.layers):
            row: list[object] = [variant, layer, int(counts[j])]
            for m in metrics:
                s = summary.get(m)
                row += ["", ""] if s is None else [f"{s['mean'][j]:.6g}", f"{s['std'][j]:.6g}"]
            writer.writerow(row)
    with atomic_write(path, "w", newline="") as fh:
        fh.write(buf.getvalue())


def _plot(
    path: Path,
    accs: dict[str, LayerStatsAccumulator],
    panels: list[tuple[str, str]],
    title: str,
) -> None:
    """Mean +- std against layer index, one panel per ``(metric, y label)``, variants offset side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"model": dict(color="tab:blue", marker="o", label="model"),
              "random_init": dict(color="tab:gray", marker="s", label="random init (baseline)")}  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.9), squeeze=False)
    for ax, (metric, ylabel) in zip(axes[0], panels):
        for k, (variant, acc) in enumerate(accs.items()):
            if metric not in acc.metrics:
                continue
            layers = torch.tensor(acc.layers, dtype=torch.float64).numpy()
            offset = (k - (len(accs) - 1) / 2) * 0.12  # side by side, so error bars do not hide each other
            ax.errorbar(layers + offset, acc.mean(metric), yerr=acc.std(metric), capsize=3, linewidth=1.4,
                        markersize=5, **styles.get(variant, dict(label=variant)))  # fmt: skip
        ax.set_xlabel("layer index (0 = first block)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(acc.layers)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, width=75 * len(panels)), fontsize=9)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=150))
    plt.close(fig)


def analyze_layers(
    data: str | Path, model: nn.Module, out: str | Path, config: AnalyzeConfig = AnalyzeConfig(), source: str = ""
) -> tuple[dict[str, LayerStatsAccumulator], SkipReport, list[Path]]:
    """Measure ``model`` and its random-init baseline over the images under ``data``; write the CSV and figures.

    Returns:
        ``(accumulators by variant, the skip report, the files written)``.
    """
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"--data {data} does not exist")
    paths = list_images(data)
    if not paths:
        raise FileNotFoundError(f"no images found under {data}")
    if config.max_images is not None and len(paths) > config.max_images:
        paths = sorted(random.Random(config.seed).sample(paths, config.max_images))
    side = config.size or model_input_size(model)
    patch = model_patch_size(model)
    if side % patch[0] or side % patch[1]:
        raise UsageError(f"--img-size {side} is not a multiple of the patch size {patch}")
    models = {"model": model, "random_init": random_init_like(model, config.seed)}
    report = SkipReport(strict=config.strict)
    accs = analyze_folder(models, paths, side, config.batch_size, config.eps, report)
    if report.processed == 0:
        return accs, report, []
    out = Path(out)
    write_layers_csv(out / "layers.csv", accs)
    name = getattr(model, "model_name", None) or type(model).__name__
    title = (f"{name} ({source or 'given weights'}), {report.processed} images of {data.name}, "
             f"{side}x{side} px, mean ± std over images")  # fmt: skip
    _plot(out / "coding_rate.png", accs,
          [("coding_rate", f"coding rate of MSSA projections (eps={config.eps:g})")], title)  # fmt: skip
    _plot(out / "sparsity.png", accs,
          [("sparsity", "fraction of zeros of block output"), ("l1l2", "l1 / (sqrt(d) l2) of block output")],
          title)  # fmt: skip
    return accs, report, [out / f for f in ("layers.csv", "coding_rate.png", "sparsity.png")]

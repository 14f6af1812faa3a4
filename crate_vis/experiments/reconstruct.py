"""Masked reconstruction by a CRATE-MAE: one photo masked with seeded noise, decoded, drawn, and scored; the figures
and the table of ``crate-vis reconstruct``.

For each photo:

1. the photo becomes the model input with :func:`~crate_vis.data.image_geometry.prepare_image`: its short side at
   the model's training size (``size``), aspect kept, cropped to whole patches. CRATE-MAE reads any patch grid (at
   grids other than the training one its sin-cos position table is computed for the grid, see
   :mod:`crate_vis.models.crate_mae`); ``square`` resizes to the training grid exactly instead;
2. ``int(L * (1 - mask_ratio))`` of its ``L`` patches are kept: those of smallest noise, the noise drawn from
   ``torch.Generator().manual_seed(seed)``. The mask depends on the seed and the patch grid only, so a figure is
   reproducible, and photos of one input size are masked alike;
3. the decoder's prediction of every patch is brought back to pixels. A model trained with ``norm_pix_loss``
   predicts each patch standardised (zero mean, unit variance over its pixels), so the prediction needs a mean
   and a standard deviation per patch to become pixels again. MAE's visualisation takes them from the target
   patch itself, which hands the model the brightness and contrast of exactly the pixels it was asked to
   reconstruct; here (``denorm="visible"``, the default) each removed patch takes the inverse-squared-distance
   weighted mean of the statistics of the visible patches, information the model was given. ``denorm="target"``
   reproduces MAE's demo (the figure says so);
4. the figure shows the input, the input with the removed patches grey, the reconstruction of every patch, and
   the reconstruction with the visible patches pasted back. PSNR is measured on the removed patches only, between
   the reconstruction (clipped to the displayable [0, 1], as drawn) and the input, both in [0, 1] pixel units.

Example:
    >>> import numpy as np, torch
    >>> from crate_vis import create_model
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = create_model("crate_mae_test_patch8_32").eval()
    >>> rec = reconstruct_image(model, np.full((40, 64, 3), 128, np.uint8), ReconstructConfig(seed=1))
    >>> rec.prepared.grid, rec.removed, rec.recon.shape
    ((4, 6), 18, (32, 48, 3))
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.image_geometry import DEFAULT_MAX_INPUT_SIDE, PreparedImage, prepare_image
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UsageError
from ..io.images import ImageLoadError, SkipReport, iter_images
from ..io.segment_output import output_names
from ..models.crate_mae import CRATEMAE
from ..models.geometry import model_input_size
from .attention import collect_images, model_device

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DENORM_MODES", "ReconstructConfig", "Reconstruction", "ReconstructReport", "reconstruct_image",
    "reconstruct_images", "reconstruction_figure", "psnr",
]  # fmt: skip

log = logging.getLogger(__name__)

#: How the predictions of a ``norm_pix_loss`` model become pixels (see the module docstring).
DENORM_MODES = ("visible", "target")

#: Grey of the removed patches in the masked panel, in [0, 1] pixel units.
MASK_GREY = 0.5


@dataclass(frozen=True)
class ReconstructConfig:
    """Settings of :func:`reconstruct_images` (the flags of ``crate-vis reconstruct``).

    Attributes:
        mask_ratio: share of patches removed, in ``[0, 1)``; 0 decodes the unmasked image.
        seed: seed of the masking noise.
        size: short side of the model input (default: the model's training size).
        square: resize to ``size x size`` (the training grid) instead of keeping the aspect ratio.
        max_side: the longest model input accepted.
        denorm: ``visible`` or ``target``: where a ``norm_pix_loss`` model's patch statistics come from.
        fmt: figure format (``png``, ``pdf``, ``svg``).
        dpi: figure resolution.
        cell_width: panel width in inches.
        strict: stop at the first unreadable image.
    """

    mask_ratio: float = 0.75
    seed: int = 0
    size: int | None = None
    square: bool = False
    max_side: int | None = DEFAULT_MAX_INPUT_SIDE
    denorm: str = "visible"
    fmt: str = "png"
    dpi: int = 150
    cell_width: float = 2.0
    strict: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise UsageError(f"--mask-ratio must be in [0, 1), got {self.mask_ratio}")
        if self.denorm not in DENORM_MODES:
            raise UsageError(f"--denorm must be one of {', '.join(DENORM_MODES)}, got {self.denorm!r}")
        if self.fmt not in ("png", "pdf", "svg"):
            raise UsageError(f"--format must be png, pdf or svg, got {self.fmt!r}")
        if self.dpi < 1:
            raise UsageError(f"--dpi must be at least 1, got {self.dpi}")
        if not self.cell_width > 0:
            raise UsageError(f"--cell-width must be positive, got {self.cell_width}")
        if self.size is not None and self.size < 1:
            raise UsageError(f"--img-size must be positive, got {self.size}")


@dataclass
class Reconstruction:
    """One photo's masked reconstruction.

    Attributes:
        prepared: the photo, the model input made from it and their geometry.
        mask: ``(gh, gw)`` bool, ``True`` where the patch was removed.
        pred: ``(gh * gw, ph * pw * C)`` the decoder's output as the model gives it (standardised patches for a
            ``norm_pix_loss`` model, normalised pixels otherwise).
        target: ``(h, w, 3)`` float32 model input in [0, 1] pixel units.
        recon: ``(h, w, 3)`` float32 prediction of every patch in [0, 1] (clipped).
        pasted: ``(h, w, 3)`` float32: ``recon`` on removed patches, ``target`` on visible ones.
        loss: the model's loss (mean squared error over the removed patches, in its own units); NaN when no patch
            was removed.
        psnr: PSNR in dB of ``pasted`` against ``target`` over the removed patches; NaN when none was removed.
        denorm: ``pixels`` (the model predicts pixels), ``visible`` or ``target`` (see the module docstring).
    """

    prepared: PreparedImage
    mask: torch.Tensor
    pred: torch.Tensor
    target: np.ndarray
    recon: np.ndarray
    pasted: np.ndarray
    loss: float
    psnr: float
    denorm: str

    @property
    def removed(self) -> int:
        """Patches removed."""
        return int(self.mask.sum())

    @property
    def num_patches(self) -> int:
        """Patches of the input."""
        return int(self.mask.numel())

    def masked_image(self) -> np.ndarray:
        """``(h, w, 3)`` float32: the input with the removed patches grey."""
        grey = np.full_like(self.target, MASK_GREY)
        return np.where(self._pixel_mask()[..., None], grey, self.target)

    def _pixel_mask(self) -> np.ndarray:
        ph = self.target.shape[0] // self.mask.shape[0]
        pw = self.target.shape[1] // self.mask.shape[1]
        return self.mask.numpy().repeat(ph, axis=0).repeat(pw, axis=1)  # (h, w)


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio ``10 log10(peak^2 / MSE)`` in dB over the pixels selected by ``where``.

    Args:
        a, b: ``(H, W, C)`` arrays in the same units.
        where: ``(H, W)`` bool selection (default all pixels); every channel of a selected pixel counts.
        peak: the largest value a pixel can take.

    Returns:
        The PSNR; ``inf`` for identical pixels, NaN for an empty selection.

    Example:
        >>> round(psnr(np.zeros((2, 2, 3)), np.full((2, 2, 3), 0.1)), 6)
        20.0
    """
    diff = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2  # (H, W, C)
    if where is not None:
        diff = diff[np.asarray(where, dtype=bool)]  # (n, C)
    if diff.size == 0:
        return float("nan")
    mse = float(diff.mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def _to_pixels(x: torch.Tensor) -> np.ndarray:
    """Normalised ``(3, h, w)`` input -> ``(h, w, 3)`` float32 in [0, 1] (ImageNet statistics, as prepared)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float32)


def _patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and ``sqrt(unbiased variance + 1e-6)`` of ``(L, P)`` patches, as ``norm_pix_loss`` uses them."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5  # (L, 1) each


def _from_visible(values: torch.Tensor, visible: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Each removed patch's value as the inverse-squared-distance weighted mean over the visible patches.

    Args:
        values: ``(L, k)`` per-patch values.
        visible: ``(L,)`` bool.
        grid: ``(gh, gw)``.

    Returns:
        ``(L, k)``: visible patches keep their own values.
    """
    gh, gw = grid
    rows = torch.arange(gh * gw) // gw
    cols = torch.arange(gh * gw) % gw
    hidden = ~visible
    d2 = ((rows[hidden, None] - rows[None, visible]) ** 2 + (cols[hidden, None] - cols[None, visible]) ** 2).double()
    weights = 1.0 / d2  # (M, K): every distance is at least 1 (a hidden patch is never a visible one)
    out = values.clone()
    out[hidden] = ((weights @ values[visible].double()) / weights.sum(dim=1, keepdim=True)).to(values.dtype)
    return out


@torch.no_grad()
def reconstruct_image(
    model: nn.Module, image: Image.Image | np.ndarray, config: ReconstructConfig = ReconstructConfig()
) -> Reconstruction:
    """Mask one photo with seeded noise, reconstruct it with a CRATE-MAE, and measure the removed patches.

    Args:
        model: a :class:`~crate_vis.models.crate_mae.CRATEMAE`, in eval mode.
        image: RGB photo of any size (PIL or ``(H, W, 3)`` uint8).
        config: mask ratio, seed, input size and de-normalisation.

    Returns:
        The :class:`Reconstruction`.

    Raises:
        UsageError: the model is not a CRATE-MAE, or a ``norm_pix_loss`` model with ``denorm="visible"`` has no
            visible patch to take statistics from.
        ImageLoadError: the photo is smaller than one patch.
    """
    if not isinstance(model, CRATEMAE):
        name = getattr(model, "model_name", None) or type(model).__name__
        raise UsageError(f"reconstruct needs a CRATE-MAE model (crate_mae_*, or its weights), got {name}")
    prepared = prepare_image(image, model.patch_size, config.size or model_input_size(model), square=config.square,
                             max_side=config.max_side)  # fmt: skip
    grid = prepared.grid
    length = grid[0] * grid[1]
    x = prepared.tensor.unsqueeze(0)  # (1, 3, h, w)
    noise = torch.rand(1, length, generator=torch.Generator().manual_seed(int(config.seed)))  # (1, L)
    device = model_device(model)
    loss, pred, mask = model(x.to(device), config.mask_ratio, noise.to(device))
    pred = pred[0].float().cpu()  # (L, ph*pw*C)
    removed = mask[0].cpu().bool()  # (L,)
    if model.norm_pix_loss:
        mean, std = _patch_stats(model.patchify(x)[0])  # (L, 1) each, of the normalised input
        if config.denorm == "visible":
            if bool(removed.all()):
                raise UsageError(
                    f"mask_ratio {config.mask_ratio} keeps none of the {length} patches: a norm_pix_loss model's "
                    "removed patches take their mean and std from visible ones (lower --mask-ratio, or --denorm target)"
                )
            stats = _from_visible(torch.cat([mean, std], dim=1), ~removed, grid)  # (L, 2)
            mean, std = stats[:, :1], stats[:, 1:]
        patches = pred * std + mean  # (L, ph*pw*C) in normalised-input units
        denorm = config.denorm
    else:
        patches, denorm = pred, "pixels"
    recon = _to_pixels(model.unpatchify(patches.unsqueeze(0), grid)[0])  # (h, w, 3)
    target = _to_pixels(x[0])  # (h, w, 3)
    ph, pw = model.patch_size
    pixel_mask = removed.reshape(grid).numpy().repeat(ph, axis=0).repeat(pw, axis=1)  # (h, w)
    pasted = np.where(pixel_mask[..., None], recon, target)  # (h, w, 3)
    return Reconstruction(prepared, removed.reshape(grid), pred, target, recon, pasted, float(loss),
                          psnr(pasted, target, pixel_mask), denorm)  # fmt: skip


def _uint8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0, 1) * 255).round().astype(np.uint8)


def _panel(a: np.ndarray, photo_hw: tuple[int, int], square: bool) -> np.ndarray:
    """A figure panel: the input-sized array, stretched back to the photo's aspect ratio for a square input."""
    img = _uint8(a)
    if not square:
        return img  # already the photo's aspect (less than one patch cropped)
    h, w = img.shape[:2]
    ph, pw = photo_hw
    side = max(h, w)
    size = (side, max(1, round(side * pw / ph))) if ph >= pw else (max(1, round(side * ph / pw)), side)  # (H', W')
    return np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.Resampling.LANCZOS), dtype=np.uint8)


def _fmt(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def reconstruction_figure(rec: Reconstruction, title: str, config: ReconstructConfig) -> Figure:
    """The four panels of one photo: input, masked input, reconstruction, reconstruction with visible patches.

    Panels are drawn at the model input's resolution, stretched back to the photo's aspect ratio when the input
    was square.
    """
    from ..viz.grid import image_grid

    hw = rec.prepared.original_hw
    h, w = rec.prepared.input_hw
    cells = [[_panel(a, hw, config.square) for a in (rec.target, rec.masked_image(), rec.recon, rec.pasted)]]
    share = 100.0 * rec.removed / rec.num_patches
    titles = [
        f"input ({w}x{h} px)",
        f"masked: {rec.removed}/{rec.num_patches} patches ({share:.0f}%)",
        "reconstruction",
        f"+ visible patches\nPSNR {_fmt(rec.psnr)} dB (removed)" if rec.removed else "+ visible patches",
    ]
    return image_grid(cells, col_titles=titles, title=title, cell_width=config.cell_width)


_DENORM_NOTE = {
    "pixels": "",
    "visible": "\nnorm_pix_loss: removed patches take mean and std interpolated from the visible patches",
    "target": "\nnorm_pix_loss: removed patches take the mean and std of their own hidden pixels (as MAE's demo)",
}


class ReconstructReport(SkipReport):
    """The :class:`~crate_vis.io.images.SkipReport` of ``crate-vis reconstruct`` with one row per photo.

    Args:
        strict: raise the first error instead of skipping.
        stream: where each skip is reported as it happens (default ``sys.stderr``); ``None`` keeps quiet.

    Attributes:
        rows: ``{"image", "input", "removed", "patches", "loss", "psnr_db"}`` per reconstructed photo.
    """

    def __init__(self, strict: bool = False, stream: IO[str] | None | str = "stderr") -> None:
        super().__init__(strict=strict, stream=stream)
        self.rows: list[dict[str, Any]] = []

    def table(self) -> str:
        """The rows as a plain-text table (loss in the model's units, PSNR over the removed patches)."""
        head = ("image", "input", "removed", "loss", "PSNR (dB)")
        body = [(str(r["image"]), str(r["input"]), f"{r['removed']}/{r['patches']}", _fmt(float(r["loss"]), 4),
                 _fmt(float(r["psnr_db"]))) for r in self.rows]  # fmt: skip
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(wd) if i == 0 else c.rjust(wd) for i, (c, wd) in enumerate(zip(row, widths)))
                 for row in [head, *body]]  # fmt: skip
        return "\n".join(lines)

    def summary(self) -> str:
        """The table (when any photo was reconstructed), then the counts and skipped files."""
        return (self.table() + "\n" if self.rows else "") + super().summary()


def reconstruct_images(
    inputs: Sequence[str | Path], model: nn.Module, out: str | Path, config: ReconstructConfig = ReconstructConfig()
) -> ReconstructReport:
    """Write one reconstruction figure per readable image into ``out``, and ``out/reconstruct.csv``.

    Args:
        inputs: image files or folders (searched recursively).
        model: a CRATE-MAE in eval mode.
        out: output folder; figures are named after the images.
        config: the settings (:class:`ReconstructConfig`).

    Returns:
        The :class:`ReconstructReport`: per-photo numbers, processed and skipped images.

    Raises:
        UsageError: the model is not a CRATE-MAE.
        FileNotFoundError: no image given or found.

    Example:
        >>> from crate_vis import load_model
        >>> report = reconstruct_images(["photos/"], load_model("runs/mae/best"), "recon/")  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
    """
    from ..io.atomic import atomic_write
    from ..viz.plots import model_label, save_figure

    if not isinstance(model, CRATEMAE):
        name = getattr(model, "model_name", None) or type(model).__name__
        raise UsageError(f"reconstruct needs a CRATE-MAE model (crate_mae_*, or its weights), got {name}")
    paths = collect_images(inputs)
    out_dir = Path(out)
    names = dict(zip(paths, output_names(paths)))
    report = ReconstructReport(strict=config.strict)
    label = model_label(model)
    for path, image in iter_images(paths, report):
        try:
            rec = reconstruct_image(model, image, config)
        except (ValueError, RuntimeError) as err:  # e.g. a photo smaller than one patch
            if config.strict:
                raise
            report.add(path, err.reason if isinstance(err, ImageLoadError) else str(err))
            continue
        h, w = rec.prepared.input_hw
        title = (f"{path.name}  ·  {label}  ·  mask ratio {config.mask_ratio:g}, seed {config.seed}  ·  "
                 f"loss {_fmt(rec.loss, 4)}{_DENORM_NOTE[rec.denorm]}")  # fmt: skip
        fig = reconstruction_figure(rec, title, config)
        written = save_figure(fig, out_dir / f"{names[path]}.{config.fmt}", dpi=config.dpi)
        fig.clear()
        report.rows.append({"image": str(path), "input": f"{w}x{h}", "removed": rec.removed,
                            "patches": rec.num_patches, "loss": rec.loss, "psnr_db": rec.psnr})  # fmt: skip
        report.processed += 1
        print(written)
    if report.rows:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(report.rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(report.rows)
        with atomic_write(out_dir / "reconstruct.csv", "w", newline="") as fh:
            fh.write(buf.getvalue())
    return report

"""Per-image attention: one photo's CLS attention, DINO masks and features at a layer, and the figures of
``crate-vis attention`` (per-head heat maps and masks, optionally attention rollout and a PCA map of the features).

Example:
    >>> import numpy as np, torch
    >>> from PIL import Image
    >>> from crate_vis import create_model
    >>> model = create_model("crate_test_patch8_32").eval()
    >>> res = image_attention(model, Image.fromarray(np.zeros((40, 64, 3), np.uint8)), size=32)
    >>> tuple(res.attn.shape)  # (heads, gh, gw)
    (4, 4, 6)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.image_geometry import (
    DEFAULT_MAX_INPUT_SIDE,
    PreparedImage,
    prepare_image,
    shrink_for_display,
    skip_reason,
)
from ..errors import UsageError
from ..hooks import AttentionRecorder, FeatureRecorder, attention_rollout, resolve_layer, run_until
from ..io.images import SkipReport, iter_images
from ..io.segment_output import output_names
from ..models import recommended_settings
from ..models.geometry import ViTLike, model_input_size, model_patch_size, token_geometry
from ..segmentation.dino import dino_foreground, dino_masks

__all__ = [
    "ImageAttention", "image_attention", "AttentionConfig", "attention_figures", "check_figure_options", "collect_images",
    "model_device",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Inputs with more tokens than this get a warning (attention costs grow with the square of the token count).
LARGE_INPUT_TOKENS = 16384


@dataclass
class ImageAttention:
    """One photo's attention at one layer.

    Attributes:
        prepared: the photo, the model input made from it and their geometry.
        attn: ``(K, gh, gw)`` CLS attention to the patch tokens (raw softmax weights, all heads).
        masks: ``(K, gh, gw)`` bool DINO masks (``mass`` of each head's attention).
        mean_attn: ``(gh, gw)`` mean over heads of each head's attention renormalised over the patches.
        mean_mask: ``(gh, gw)`` bool DINO mask of ``mean_attn``.
        features: ``(gh * gw, D)`` patch tokens output by the layer (row-major), or ``None``.
        mass: the kept attention fraction.
        layer: the layer (non-negative index).
    """

    prepared: PreparedImage
    attn: torch.Tensor
    masks: torch.Tensor
    mean_attn: torch.Tensor
    mean_mask: torch.Tensor
    features: torch.Tensor | None
    mass: float
    layer: int

    @property
    def num_heads(self) -> int:
        """Heads of the layer."""
        return int(self.attn.shape[0])


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (cpu for a parameterless model)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def image_attention(
    model: nn.Module,
    image: Image.Image,
    layer: int = -1,
    size: int | None = None,
    mass: float = 0.6,
    features: bool = False,
    *,
    square: bool = False,
    max_side: int | None = DEFAULT_MAX_INPUT_SIDE,
) -> ImageAttention:
    """Run ``model`` on one photo and collect a layer's CLS attention, DINO masks and (optionally) its features.

    Args:
        model: any CRATE-family model or timm ViT, in eval mode.
        image: RGB photo of any size and aspect ratio.
        layer: layer index (negative counts from the end).
        size: the model input's shorter side (default: the model's training size).
        mass: fraction of each head's attention kept by the masks.
        features: also record the layer's output patch tokens (for feature-centroid consistency and PCA maps).
        square: resize to ``size x size`` instead of keeping the aspect ratio.
        max_side: the longest model input accepted (see :func:`crate_vis.data.image_geometry.plan_geometry`).

    Returns:
        :class:`ImageAttention`.
    """
    index = resolve_layer(model, layer)
    # ImageNet statistics, as the project's trainer, eval, segment and analyze use for every model.
    prepared = prepare_image(
        image, model_patch_size(model), size or model_input_size(model), square=square, max_side=max_side
    )
    x = prepared.tensor.unsqueeze(0).to(model_device(model))  # (1, 3, h, w)
    geom = token_geometry(model, prepared.input_hw)
    if geom.num_tokens > LARGE_INPUT_TOKENS:
        log.warning("a %dx%d px model input has %d tokens: attention over them is slow (pass a smaller --img-size)",
                    prepared.input_hw[1], prepared.input_hw[0], geom.num_tokens)  # fmt: skip
    feats = None
    with AttentionRecorder(model, layers=[index], cls_only=True) as rec:
        if features:
            with FeatureRecorder(model, layers=[index], features=("ista_out",)) as frec:
                run_until(model, x, index)
            feats = frec.features[index]["ista_out"][0, geom.num_prefix_tokens :].float().cpu()  # (N, D)
        else:
            run_until(model, x, index)
    row = rec.attentions[index][0, :, geom.num_prefix_tokens :].float().cpu()  # (K, N)
    if row.shape[-1] != geom.num_patches:
        raise RuntimeError(f"recorded {row.shape[-1]} patch tokens, expected {geom.num_patches}")
    attn = row.reshape(row.shape[0], *geom.grid)  # (K, gh, gw)
    masks = dino_masks(attn.unsqueeze(0), mass=mass)[0]  # (K, gh, gw)
    mean_mask = dino_foreground(attn.unsqueeze(0), mass=mass, combine="mean")[0]  # (gh, gw)
    mean_attn = (attn / attn.sum(dim=(-2, -1), keepdim=True)).mean(dim=0)  # (gh, gw), as dino_foreground weighs
    return ImageAttention(prepared, attn, masks, mean_attn, mean_mask, feats, mass, index)


@torch.no_grad()
def image_rollout(model: nn.Module, prepared: PreparedImage, discard_ratio: float = 0.0) -> np.ndarray:
    """Attention rollout over every layer for one prepared photo: the CLS row over the patches, ``(gh, gw)``."""
    x = prepared.tensor.unsqueeze(0).to(model_device(model))
    geom = token_geometry(model, prepared.input_hw)
    with AttentionRecorder(model) as rec:
        cast(ViTLike, model).forward_features(x)
    roll = attention_rollout([a for _, a in rec], discard_ratio=discard_ratio)  # (1, N, N)
    return roll[0, 0, geom.num_prefix_tokens :].reshape(geom.grid).float().cpu().numpy()


def check_figure_options(mass: float, cell_width: float, display_size: int | None, size: int | None,
                         counts: Sequence[tuple[str, int]]) -> None:  # fmt: skip
    """The checks shared by the attention and head figures' options, each refusal one line naming its flag.

    Raises:
        UsageError: ``--mass`` outside (0, 1], a count of ``counts`` (``(flag, value)``) below 1, or a
            non-positive ``--cell-width``, ``--display-size`` or ``--img-size``.
    """
    if not 0.0 < mass <= 1.0:
        raise UsageError(f"--mass must be in (0, 1], got {mass}")
    for name, value in counts:
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    if not cell_width > 0:
        raise UsageError(f"--cell-width must be positive, got {cell_width}")
    if display_size is not None and display_size < 1:
        raise UsageError(f"--display-size must be positive, got {display_size}")
    if size is not None and size < 1:
        raise UsageError(f"--img-size must be positive, got {size}")


@dataclass(frozen=True)
class AttentionConfig:
    """Settings of :func:`attention_figures` (the flags of ``crate-vis attention``).

    ``layer`` and ``size`` left at ``None`` take the weights' recommended settings
    (:func:`crate_vis.models.recommended_settings`), else the last layer and the model's training size.
    """

    layer: int | None = None
    size: int | None = None
    square: bool = False
    max_side: int | None = DEFAULT_MAX_INPUT_SIDE
    mass: float = 0.6
    per_head: bool = False
    fmt: str = "png"
    dpi: int = 200
    smooth: bool = False
    cmap: str = "inferno"
    max_cols: int = 8
    cell_width: float = 1.7
    display_size: int | None = 800
    rollout: bool = False
    pca: bool = False
    save_maps: bool = False
    strict: bool = False

    def __post_init__(self) -> None:
        check_figure_options(self.mass, self.cell_width, self.display_size, self.size,
                             (("--max-cols", self.max_cols), ("--dpi", self.dpi)))  # fmt: skip
        if self.fmt not in ("png", "pdf", "svg"):
            raise UsageError(f"--format must be png, pdf or svg, got {self.fmt!r}")


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files given directly or found (recursively) in folders, in order.

    Raises:
        FileNotFoundError: nothing found (the message names the inputs; an empty folder says so).
    """
    from ..io.images import list_images

    paths: list[Path] = []
    empty: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            if not found:
                empty.append(p)
            paths += found
        else:
            paths.append(p)
    if not paths:  # one line: the error says it all (no warning before it)
        where = ", ".join(str(i) for i in inputs)
        raise FileNotFoundError(f"no images found in the folder {where}" if len(empty) == 1 == len(inputs)
                                else f"no images given or found in {where}")  # fmt: skip
    for p in empty:  # the other inputs have images: a warning, and the run goes on
        log.warning("no images found in the folder %s", p)
    return paths


def attention_figures(
    inputs: Sequence[str | Path], model: nn.Module, out: str | Path, config: AttentionConfig = AttentionConfig()
) -> SkipReport:
    """Write one attention figure per readable image into ``out`` (the Python side of ``crate-vis attention``).

    Each figure shows the photo, the mean over heads and every head of the layer as heat maps, with each map's DINO
    mask below it, at the photo's own aspect ratio. Optionally: per-head PNGs at full resolution, an attention
    rollout figure (``<name>_rollout``) and a PCA-RGB map of the layer's patch features (``<name>_pca``).

    Returns:
        The :class:`~crate_vis.io.images.SkipReport` (processed and skipped images).
    """
    from ..segmentation.pca import pca_map
    from ..viz.overlay import attention_opacity, heatmap_overlay, mask_overlay
    from ..viz.plots import attention_figure, model_label, pca_figure, pca_rgb_image, rollout_figure, save_figure

    paths = collect_images(inputs)
    recommended = recommended_settings(model)
    layer = resolve_layer(model, config.layer if config.layer is not None else recommended.get("layer", -1))
    size = config.size if config.size is not None else recommended.get("img_size")
    out_dir = Path(out)
    names = dict(zip(paths, output_names(paths)))
    mode = "bilinear" if config.smooth else "nearest"
    report = SkipReport(strict=config.strict)
    label = model_label(model)
    for path, image in iter_images(paths, report):
        try:
            res = image_attention(model, image, layer=layer, size=size, mass=config.mass, features=config.pca,
                                  square=config.square, max_side=config.max_side)  # fmt: skip
        except (ValueError, RuntimeError) as err:  # e.g. a photo smaller than one patch
            report.add(path, skip_reason(err))
            continue
        full = res.prepared
        prep = shrink_for_display(full, config.display_size)  # figure panels: aspect kept, pixels bounded
        # Colour runs from the uniform share (dark: no preference) to the head's peak (bright), see
        # attention_opacity: near-uniform heads are not stretched into false contrast.
        strength = attention_opacity(res.attn)  # (K, gh, gw) in [0, 1]
        mean_strength = attention_opacity(res.mean_attn)  # (gh, gw)
        heat = prep.grid_to_image(strength, mode)  # (K, H', W')
        masks = prep.grid_to_image(res.masks.numpy())  # (K, H', W') bool
        mean_heat = prep.grid_to_image(mean_strength, mode)
        mean_mask = prep.grid_to_image(res.mean_mask.numpy())
        head_mass = res.attn.sum(dim=(-2, -1)).tolist()
        gh, gw = full.grid
        title = (f"{path.name}  ·  {label}, layer {layer}  ·  input {full.input_hw[1]}x{full.input_hw[0]} px, "
                 f"{gw}x{gh} patches\ncolour: attention from the uniform share (dark) to the head's peak (bright)  ·  "
                 f"Σ: attention on patches (the rest goes to CLS)")  # fmt: skip
        fig = attention_figure(prep.original, heat, masks, mean_heat, mean_mask, head_mass=head_mass, title=title,
                               max_cols=config.max_cols, cmap=config.cmap, mass=config.mass,
                               cell_width=config.cell_width, normalize="none")  # fmt: skip
        name = names[path]
        written = [save_figure(fig, out_dir / f"{name}.{config.fmt}", dpi=config.dpi)]
        fig.clear()
        if config.rollout:
            roll = image_rollout(model, full)
            depth = len(cast(nn.ModuleList, model.blocks))
            fig = rollout_figure(prep.original, roll, prep, title=f"{path.name} · {label}, all {depth} layers")
            written.append(save_figure(fig, out_dir / f"{name}_rollout.{config.fmt}", dpi=config.dpi))
            fig.clear()
        if config.pca:
            assert res.features is not None
            rgb = pca_map(res.features, full.grid)
            fig = pca_figure([prep.original], [pca_rgb_image(rgb, prepared=prep)],
                             title=f"{path.name} · {label}, layer {layer}: first 3 principal components of the "
                                   "foreground patch features")  # fmt: skip
            written.append(save_figure(fig, out_dir / f"{name}_pca.{config.fmt}", dpi=config.dpi))
            fig.clear()
        if config.save_maps:
            from ..io.atomic import atomic_save

            dest = out_dir / "maps" / f"{name}.npy"
            atomic_save(dest, lambda tmp, a=res.attn.numpy(): np.save(tmp, a))
            written.append(dest)
        if config.per_head:
            # At the photo's full resolution, one map at a time so that large photos stay within memory.
            sub = out_dir / name
            img = full.original
            mean_full = full.grid_to_image(mean_strength, mode)
            save_figure(heatmap_overlay(img, mean_full, cmap=config.cmap, normalize="none"), sub / "mean.png")
            save_figure(mask_overlay(img, full.grid_to_image(res.mean_mask.numpy())), sub / "mean_mask.png")
            for k in range(res.num_heads):
                heat_k = full.grid_to_image(strength[k], mode)
                save_figure(heatmap_overlay(img, heat_k, cmap=config.cmap, normalize="none"), sub / f"head{k:02d}.png")
                save_figure(mask_overlay(img, full.grid_to_image(res.masks[k].numpy())), sub / f"head{k:02d}_mask.png")
        report.processed += 1
        for w in written:
            print(w)
    return report

"""Per-pixel drawing: heat maps, masks, contours and part maps over a photo.

Every function here takes and returns ``(H, W, 3)`` uint8 arrays (or float/bool maps at the image resolution), so
the results can be saved directly or placed in a figure. Grid maps are brought to the photo's resolution first, by
:meth:`crate_vis.data.image_geometry.PreparedImage.grid_to_image`.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

__all__ = [
    "attention_opacity", "normalize_map", "heatmap_overlay", "colored_attention", "mask_overlay", "masks_overlay",
    "draw_mask_contours", "mask_contours", "part_map_overlay", "grey_background", "MASK_PALETTE",
]  # fmt: skip

#: Mask colours of multi-mask overlays (RGB), cycled.
MASK_PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [145, 30, 180], [70, 240, 240], [245, 130, 48],
     [240, 50, 230], [210, 245, 60], [250, 190, 212]],
    dtype=np.float32,
)  # fmt: skip


def normalize_map(heat: np.ndarray, how: str = "max") -> np.ndarray:
    """Scale a non-negative map to ``[0, 1]``.

    Args:
        heat: any float array.
        how: ``"max"`` divides by the maximum (0 stays 0: raw attention values keep their zero),
            ``"minmax"`` stretches min..max, ``"none"`` only clips.
    """
    h = np.asarray(heat, dtype=np.float32)
    if how == "max":
        m = float(h.max()) if h.size else 0.0
        h = h / m if m > 0 else np.zeros_like(h)
    elif how == "minmax":
        lo, hi = (float(h.min()), float(h.max())) if h.size else (0.0, 0.0)
        h = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    elif how != "none":
        raise ValueError(f"how must be 'max', 'minmax' or 'none', got {how!r}")
    return np.clip(h, 0.0, 1.0)


def attention_opacity(attn: torch.Tensor | np.ndarray, peak_floor: float = 4.0) -> np.ndarray:
    """Display strength of attention maps relative to uniform attention, on the patch grid.

    ``r = p * N`` says how many times the uniform share ``1 / N`` a patch receives (``p``: the head's attention
    renormalised over its ``N`` patches). The opacity rises linearly from 0 at ``r <= 1`` (no preference: the
    patch stays grey) to 1 at the head's peak, where the peak counts as at least ``peak_floor`` times uniform. So a
    head attending almost uniformly stays almost grey instead of having its noise stretched to full colour, while
    a focused head is drawn exactly as :func:`normalize_map` would.

    Args:
        attn: ``(..., gh, gw)`` non-negative attention maps.
        peak_floor: the smallest peak ratio drawn at full opacity (> 1).

    Returns:
        ``(..., gh, gw)`` float32 in ``[0, 1]``.
    """
    if peak_floor <= 1.0:
        raise ValueError(f"peak_floor must exceed 1, got {peak_floor}")
    a = torch.as_tensor(np.asarray(attn) if isinstance(attn, np.ndarray) else attn.detach().cpu()).double()
    n = a.shape[-2] * a.shape[-1]
    total = a.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    r = a / total * n  # (..., gh, gw): multiples of the uniform share
    peak = r.amax(dim=(-2, -1), keepdim=True).clamp_min(peak_floor)
    return ((r - 1.0) / (peak - 1.0)).clamp(0.0, 1.0).float().numpy()


def _check_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    return image


def _check_same_hw(image: np.ndarray, arr: np.ndarray, what: str) -> None:
    if arr.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"{what} is {arr.shape[:2]} but the image is {image.shape[:2]}; bring grid maps to the image with "
            "PreparedImage.grid_to_image first"
        )


def heatmap_overlay(
    image: np.ndarray, heat: np.ndarray, alpha: float = 0.55, cmap: str = "inferno", normalize: str = "max"
) -> np.ndarray:
    """Alpha-blend a colour-mapped heat map over an image.

    Args:
        image: ``(H, W, 3)`` uint8.
        heat: ``(H, W)`` map at the image's resolution.
        alpha: weight of the heat map (0: image only, 1: heat map only).
        cmap: a matplotlib colormap name; the perceptually uniform ``inferno``/``viridis``/``cividis`` read well
            for colour-blind readers and in greyscale print.
        normalize: see :func:`normalize_map`.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    import matplotlib

    _check_image(image)
    _check_same_hw(image, heat, "the heat map")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    h = normalize_map(heat, normalize)
    colored = matplotlib.colormaps[cmap](h)[..., :3] * 255.0  # (H, W, 3)
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * colored
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def grey_background(image: np.ndarray, brightness: float = 0.55) -> np.ndarray:
    """The image in greyscale scaled by ``brightness``, as float ``(H, W, 3)`` in 0..255 (a neutral canvas for colour)."""
    _check_image(image)
    grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (H, W)
    return np.repeat(grey[..., None] * brightness, 3, axis=2)


def colored_attention(
    image: np.ndarray,
    heat: np.ndarray,
    color: Sequence[int],
    max_alpha: float = 0.85,
    brightness: float = 0.55,
    normalize: str = "max",
) -> np.ndarray:
    """One head's attention as its own colour over a dimmed greyscale image (the CRATE papers' head-wise style).

    The colour's opacity grows with the attention, so where the head looks the image takes the head's colour and
    elsewhere it stays grey.

    Args:
        image: ``(H, W, 3)`` uint8.
        heat: ``(H, W)`` attention at the image's resolution.
        color: RGB 0..255.
        max_alpha: opacity at the map's maximum.
        brightness: of the greyscale background.
        normalize: see :func:`normalize_map`.
    """
    _check_same_hw(image, heat, "the attention map")
    base = grey_background(image, brightness)
    a = (max_alpha * normalize_map(heat, normalize))[..., None]  # (H, W, 1)
    c = np.asarray(color, dtype=np.float32).reshape(1, 1, 3)
    return np.clip(base * (1.0 - a) + c * a + 0.5, 0, 255).astype(np.uint8)


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Outlines of a bool mask (outer boundaries and holes) as OpenCV contours."""
    m = np.ascontiguousarray(np.asarray(mask, dtype=np.uint8))
    contours, _ = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return list(contours)


def _line_width(hw: tuple[int, int]) -> int:
    return max(1, round(min(hw) / 250))


def draw_mask_contours(
    image: np.ndarray, mask: np.ndarray, color: Sequence[int], thickness: int | None = None
) -> np.ndarray:
    """Draw the outline of ``mask`` on a copy of ``image`` (thickness scales with the image when ``None``)."""
    _check_image(image)
    _check_same_hw(image, mask, "the mask")
    out = np.ascontiguousarray(image.copy())
    t = _line_width(image.shape[:2]) if thickness is None else int(thickness)
    cv2.drawContours(out, mask_contours(mask), -1, tuple(int(v) for v in color), t, lineType=cv2.LINE_8)
    return out


def mask_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    color: Sequence[int] = (86, 180, 233),
    outside: float = 0.3,
    fill_alpha: float = 0.0,
    contour: bool = True,
) -> np.ndarray:
    """Show a bool mask on its image: the outside dimmed, the inside optionally tinted, the outline drawn.

    Args:
        image: ``(H, W, 3)`` uint8.
        mask: ``(H, W)`` bool at the image's resolution.
        color: outline/tint colour, RGB 0..255 (default Okabe-Ito sky blue, visible on dark and bright photos).
        outside: brightness kept outside the mask.
        fill_alpha: tint of the inside with ``color``.
        contour: draw the outline.
    """
    _check_image(image)
    _check_same_hw(image, mask, "the mask")
    m = np.asarray(mask, dtype=bool)[..., None]  # (H, W, 1)
    img = image.astype(np.float32)
    c = np.asarray(color, dtype=np.float32).reshape(1, 1, 3)
    inside = img * (1.0 - fill_alpha) + c * fill_alpha
    out = np.where(m, inside, img * outside)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return draw_mask_contours(out, mask, color) if contour else out


def part_map_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    colors: np.ndarray,
    alpha: float = 0.7,
    brightness: float = 0.55,
    background: float = 0.35,
) -> np.ndarray:
    """Colour every pixel by its part (head) label over a greyscale image; label ``-1`` (no confident head) is dimmed.

    Args:
        image: ``(H, W, 3)`` uint8.
        labels: ``(H, W)`` int, ``0..K-1`` or ``-1``.
        colors: ``(K, 3)`` RGB 0..255.
        alpha: opacity of the part colours.
        brightness: of the greyscale image under the parts.
        background: brightness of unlabelled pixels.
    """
    _check_same_hw(image, labels, "the label map")
    colors = np.asarray(colors, dtype=np.float32).reshape(-1, 3)
    lab = np.asarray(labels)
    if lab.size and (lab.max() >= len(colors) or lab.min() < -1):
        raise ValueError(f"labels must be in -1..{len(colors) - 1}, got {lab.min()}..{lab.max()}")
    grey = grey_background(image, 1.0)
    known = lab >= 0
    col = colors[np.where(known, lab, 0)]  # (H, W, 3)
    out = np.where(known[..., None], grey * brightness * (1.0 - alpha) + col * alpha, grey * background)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def masks_overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Several masks ``(K, H, W)`` tinted over an ``(H, W, 3)`` uint8 image in :data:`MASK_PALETTE` colours, each
    with its outer outline (the overlays ``crate-vis segment`` writes); returns a new uint8 image."""
    _check_image(image)
    out = image.astype(np.float32)
    for k, m in enumerate(masks):
        out[m] = (1 - alpha) * out[m] + alpha * MASK_PALETTE[k % len(MASK_PALETTE)]
    out = out.round().clip(0, 255).astype(np.uint8)
    width = _line_width(image.shape[:2])
    for k, m in enumerate(masks):
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in MASK_PALETTE[k % len(MASK_PALETTE)]), width)
    return out

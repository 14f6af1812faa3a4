"""DINO-style attention masks: golden parity with the reference procedure, an independent brute force, options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crate_vis.segmentation.dino import (
    attention_contrast,
    attention_maps,
    dino_foreground,
    dino_masks,
    dino_threshold,
)
from crate_vis.segmentation.masks import largest_component, upsample_masks


def _golden_cls_attention(golden) -> torch.Tensor:
    attn = torch.from_numpy(golden["attention"][-1])  # (B, h, 17, 17)
    return attn[:, :, 0, 1:].reshape(4, 4, 4, 4)  # CLS row, patch columns, 4x4 grid


def test_golden_dino_masks_exact(golden):
    masks = dino_masks(_golden_cls_attention(golden), mass=0.6, patch_size=8)
    assert masks.shape == (4, 4, 32, 32)
    np.testing.assert_array_equal(masks.numpy().astype(np.uint8), golden["dino_masks_060"])


def test_golden_dino_masks_from_model(golden, golden_model):
    """The same masks from the model's own CLS attention (hooks), on the fused path."""
    from crate_vis.hooks import cls_attention_maps

    attn = cls_attention_maps(golden_model, torch.from_numpy(golden["images"]), layer=-1)
    masks = dino_masks(attn, mass=0.6, patch_size=8).numpy().astype(np.uint8)
    np.testing.assert_array_equal(masks, golden["dino_masks_060"])


def _brute_force(attn: np.ndarray, mass: float) -> np.ndarray:
    """Smallest set of top-attended tokens whose complement holds at most 1 - mass of the (normalised) mass."""
    p = attn / attn.sum()
    order = np.argsort(-p)
    for k in range(1, p.size + 1):
        if p[order[k:]].sum() <= 1 - mass + 1e-12:
            keep = np.zeros(p.size, bool)
            keep[order[:k]] = True
            return keep
    raise AssertionError


@pytest.mark.parametrize("mass", [0.1, 0.35, 0.6, 0.9])
def test_threshold_matches_brute_force(mass):
    rng = np.random.default_rng(1)
    attn = rng.dirichlet(np.full(50, 0.3), size=8) * 0.8  # raw CLS attention: not summing to one over patches
    keep = dino_threshold(torch.from_numpy(attn), mass).numpy()
    for row, k in zip(attn, keep):
        np.testing.assert_array_equal(k, _brute_force(row, mass))
        assert row[k].sum() / row.sum() >= mass - 1e-9


def test_threshold_extremes_and_ties():
    attn = torch.tensor([[0.1, 0.5, 0.2, 0.2]])
    assert dino_threshold(attn, 1e-6).tolist() == [[False, True, False, False]]  # the argmax only
    assert dino_threshold(attn, 1.0).all()
    # Ties resolve by a stable ascending sort: the earlier of equal tokens counts as less attended.
    flat = torch.full((1, 4), 0.25)
    assert dino_threshold(flat, 0.5).tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError):
        dino_threshold(attn, 0.0)
    with pytest.raises(ValueError):
        dino_threshold(attn, 1.5)


def test_upsampling_is_nearest_by_patch():
    m = torch.rand(2, 3, 4, 5) > 0.5
    up = upsample_masks(m, (8, 4))
    ref = F.interpolate(m.float(), scale_factor=(8, 4), mode="nearest") > 0.5
    assert up.shape == (2, 3, 32, 20)
    assert torch.equal(up, ref)


def test_heads_selection_and_combinations():
    attn = torch.zeros(1, 3, 3, 3)
    attn[0, 0, 0, 0] = 1.0  # head 0: top-left
    attn[0, 1, 2, 2] = 1.0  # head 1: bottom-right
    attn[0, 2, 0, 0] = 0.5  # head 2: split between both
    attn[0, 2, 2, 2] = 0.5
    attn = attn + 1e-4
    per_head = dino_masks(attn, mass=0.6, heads=[1])
    assert per_head.shape == (1, 1, 3, 3) and per_head[0, 0].nonzero().tolist() == [[2, 2]]
    union = dino_foreground(attn, mass=0.6, heads=[0, 1], combine="union")
    assert union[0].nonzero().tolist() == [[0, 0], [2, 2]]
    mean = dino_foreground(attn, mass=0.6, heads=[0, 2], combine="mean")  # mean puts 0.75 on (0,0), 0.25 on (2,2)
    assert mean[0].nonzero().tolist() == [[0, 0]]
    with pytest.raises(ValueError):
        dino_foreground(attn, combine="max")
    with pytest.raises(ValueError):
        dino_masks(attn, heads=[3])
    with pytest.raises(ValueError):
        dino_masks(attn[0])


def test_largest_component_option():
    attn = torch.full((1, 1, 6, 6), 1e-3)
    attn[0, 0, :3, :3] = 1.0  # a 9-token blob
    attn[0, 0, 5, 5] = 1.0  # an isolated token
    fg = dino_foreground(attn, mass=0.9, largest=False)[0].numpy()
    assert fg.sum() == 10
    fg_l = dino_foreground(attn, mass=0.9, largest=True)[0].numpy()
    assert fg_l.sum() == 9 and not fg_l[5, 5]
    np.testing.assert_array_equal(largest_component(fg), fg_l)


def test_attention_maps_and_contrast():
    attn = torch.rand(2, 3, 4, 5) * 0.5
    maps = attention_maps(attn)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(2, 3))
    soft = attention_maps(attn, patch_size=8, mode="bilinear")
    assert soft.shape == (2, 3, 32, 40)
    near = attention_maps(attn, patch_size=8, mode="nearest")
    torch.testing.assert_close(near[..., ::8, ::8], maps)
    a = np.array([[1.0, 1.0], [0.0, 0.0]])
    assert attention_contrast(a, a > 0) == 1.0
    assert attention_contrast(np.ones((2, 2)), np.eye(2, dtype=bool)) == 0.0
    assert attention_contrast(a, np.zeros((2, 2), bool)) == 0.0

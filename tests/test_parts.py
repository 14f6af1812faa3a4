"""Per-head consistency scores on constructed attention with known answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from crate_vis.metrics import attention_mass_inside as mass_inside
from crate_vis.metrics import mask_iou_per_head as mask_iou
from crate_vis.metrics.parts import (
    attended_centroids,
    centroid_consistency,
    head_consistency,
    head_distributions,
    part_assignment,
    part_entropy,
)


def _object_scene(seed: int, n_images: int = 8, grid: tuple[int, int] = (6, 8), dim: int = 24):
    """Images with a rectangular object at a random place. Object tokens share a direction ``u`` (plus noise),
    background tokens are random. Head 0 attends to the object, head 1 at random."""
    g = torch.Generator().manual_seed(seed)
    gh, gw = grid
    u = torch.randn(dim, generator=g)
    attn, gts, feats = [], [], []
    for _ in range(n_images):
        y0 = int(torch.randint(0, gh - 2, (1,), generator=g))
        x0 = int(torch.randint(0, gw - 3, (1,), generator=g))
        gt = torch.zeros(gh, gw, dtype=torch.bool)
        gt[y0 : y0 + 2, x0 : x0 + 3] = True
        f = torch.randn(gh * gw, dim, generator=g)
        f[gt.flatten()] = u + 0.2 * torch.randn(int(gt.sum()), dim, generator=g)
        on_object = gt.float() * 0.9 / gt.sum() + 0.1 / (gh * gw)  # 90% of the mass on the object
        rand = torch.rand(gh, gw, generator=g) ** 4  # peaky, but at random places
        head = torch.stack([on_object, rand / rand.sum()]) * 0.95  # 5% of the mass on the CLS token
        attn.append(head)
        gts.append(gt)
        feats.append(f)
    return attn, gts, feats


def test_head_distributions_sum_to_one():
    a = torch.rand(2, 3, 4, 5)
    p = head_distributions(a)
    torch.testing.assert_close(p.sum(dim=(-2, -1)), torch.ones(2, 3))
    with pytest.raises(ValueError, match="sums to zero"):
        head_distributions(torch.zeros(1, 2, 2))


def test_part_assignment_known_regions():
    # Head k puts its mass on column block k of a 2x3 grid.
    attn = torch.full((3, 2, 3), 0.01)
    for k in range(3):
        attn[k, :, k] = 1.0
    labels = part_assignment(attn)
    assert labels.tolist() == [[0, 1, 2], [0, 1, 2]]
    # Heads are compared on their distributions: scaling one head's raw map (mass to CLS) changes nothing.
    scaled = attn.clone()
    scaled[1] *= 0.1
    assert torch.equal(part_assignment(scaled), labels)
    # With confidence masks, patches in no mask become background.
    masks = torch.zeros(3, 2, 3, dtype=torch.bool)
    masks[0, :, 0] = True
    masks[2, 0, 2] = True
    labels = part_assignment(attn, masks)
    assert labels.tolist() == [[0, -1, 2], [0, -1, -1]]


def test_part_assignment_masked_head_never_wins():
    attn = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (2, 1, 2)
    masks = torch.tensor([[[False, True]], [[False, True]]])
    # Head 0 dominates patch 0 but its mask excludes it; no other head covers patch 0 -> background.
    assert part_assignment(attn, masks).tolist() == [[-1, 1]]


def test_mask_iou_against_numpy():
    rng = np.random.default_rng(0)
    masks = rng.random((4, 3, 5, 6)) > 0.5
    gt = rng.random((4, 5, 6)) > 0.6
    got = mask_iou(torch.from_numpy(masks), torch.from_numpy(gt)).numpy()
    for b, k in itertools.product(range(4), range(3)):
        inter = np.logical_and(masks[b, k], gt[b]).sum()
        union = np.logical_or(masks[b, k], gt[b]).sum()
        assert got[b, k] == pytest.approx(inter / union)
    empty = mask_iou(torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool))
    assert torch.isnan(empty).all()


def test_mass_inside_known():
    attn = torch.zeros(2, 2, 2)
    attn[0] = torch.tensor([[0.3, 0.1], [0.0, 0.0]])  # 3/4 inside the top-left patch
    attn[1] = torch.tensor([[0.0, 0.0], [0.5, 0.5]])  # nothing inside
    gt = torch.tensor([[True, False], [False, False]])
    torch.testing.assert_close(mass_inside(attn, gt), torch.tensor([0.75, 0.0], dtype=torch.float64))
    assert torch.isnan(mass_inside(attn, torch.zeros(2, 2, dtype=torch.bool))).all()


def test_centroid_consistency_matches_brute_force():
    c = torch.randn(5, 3, 7, generator=torch.Generator().manual_seed(1))
    got = centroid_consistency(c)
    u = torch.nn.functional.normalize(c.double(), dim=-1)
    for k in range(3):
        sims = [float(u[i, k] @ u[j, k]) for i, j in itertools.combinations(range(5), 2)]
        assert float(got[k]) == pytest.approx(np.mean(sims), abs=1e-9)
    same = torch.ones(4, 1, 3)
    assert float(centroid_consistency(same)[0]) == pytest.approx(1.0)
    opposite = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]])
    assert float(centroid_consistency(opposite)[0]) == pytest.approx(-1.0)
    assert torch.isnan(centroid_consistency(torch.ones(1, 2, 3))).all()


def test_uniform_attention_selects_nothing():
    feats = torch.randn(12, 5)
    cents = attended_centroids(torch.ones(2, 3, 4), feats)  # grid form (K, gh, gw)
    torch.testing.assert_close(cents, torch.zeros(2, 5), atol=1e-6, rtol=0)


def test_attended_centroid_of_one_token():
    feats = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, -1.0]])
    attn = torch.tensor([[1.0, 0.0, 0.0]])  # (K=1, N=3): only token 0
    mean_unit = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]).mean(0)
    torch.testing.assert_close(attended_centroids(attn, feats)[0], torch.tensor([1.0, 0.0]) - mean_unit)


def test_part_entropy():
    one_head = torch.zeros(3, 4, dtype=torch.long)
    assert float(part_entropy(one_head, 4)) == pytest.approx(0.0)
    even = torch.arange(12).reshape(3, 4) % 4
    assert float(part_entropy(even, 4)) == pytest.approx(1.0)
    half = torch.tensor([[0, 1, -1, -1]])
    assert float(part_entropy(half, 4)) == pytest.approx(math.log(2) / math.log(4))
    assert math.isnan(float(part_entropy(torch.full((2, 2), -1), 3)))


def test_object_head_scores_high_random_head_low():
    from crate_vis.segmentation.dino import dino_masks

    attn, gts, feats = _object_scene(seed=0)
    masks = [dino_masks(a.unsqueeze(0), mass=0.6)[0] for a in attn]
    scores = head_consistency(attn, masks, feats, gts, head_ids=[3, 7])
    iou, inside, cons = scores.scores["iou"], scores.scores["mass_in"], scores.scores["consistency"]
    assert scores.head_ids == [3, 7]
    assert iou[0] > 0.6 and iou[1] < 0.3
    assert inside[0] == pytest.approx(0.9 + 0.1 * 6 / 48, abs=1e-6)  # 90% on the object + its uniform share
    assert inside[1] < 0.4
    assert cons[0] > 0.9
    assert abs(cons[1]) < 0.3
    assert scores.per_image["iou"].shape == (8, 2)
    # Head 0's 60% mask is part of the 6-patch object (6/48 = 0.125 of the image); head 1's is small too (peaky).
    assert 0.0 < scores.scores["area"][0] <= 6 / 48
    table = scores.table("demo")
    assert "consistency" in table and table.splitlines()[0] == "demo"
    assert len(scores.rows()) == 2 and scores.rows()[0]["head"] == 3


def test_head_on_same_features_vs_random_features_without_ground_truth():
    # No ground truth: head 0 always attends to tokens along one feature direction, head 1 to random tokens.
    attn, _, feats = _object_scene(seed=3, n_images=10)
    scores = head_consistency(attn, features=feats)
    assert set(scores.scores) == {"consistency", "share"}  # no masks given: no area
    assert scores.scores["consistency"][0] > 0.9 > 0.3 > abs(scores.scores["consistency"][1])


def test_images_without_annotation_are_left_out_of_ground_truth_means():
    attn, gts, feats = _object_scene(seed=1, n_images=4)
    gts_missing = [gts[0], None, gts[2], None]
    masks = [a > a.mean() for a in attn]
    full = head_consistency([attn[0], attn[2]], [masks[0], masks[2]], gt=[gts[0], gts[2]])
    part = head_consistency(attn, masks, gt=gts_missing)
    np.testing.assert_allclose(part.scores["iou"], full.scores["iou"])
    assert np.isnan(part.per_image["iou"][1]).all()


def test_head_consistency_validates_inputs():
    attn = [torch.rand(2, 3, 3), torch.rand(3, 3, 3)]
    with pytest.raises(ValueError, match="same number of heads"):
        head_consistency(attn)
    with pytest.raises(ValueError, match="no images"):
        head_consistency([])
    with pytest.raises(ValueError, match="ground truth"):
        head_consistency([torch.rand(2, 3, 3)], gt=[torch.zeros(4, 4, dtype=torch.bool)])

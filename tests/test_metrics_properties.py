"""Property-based checks (hypothesis): bounded, symmetric, round-trip and order-invariant metrics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from crate_vis import metrics as F
from crate_vis.data.image_geometry import ImageGeometry
from crate_vis.io.coco import mask_to_rle, mask_to_uncompressed_rle, rle_area, rle_to_mask
from crate_vis.metrics import CoarseMIoU, FgJaccard, Saliency

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SETTINGS = settings(max_examples=50, deadline=None)

shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))


def downsample_labels(labels, grid, void=255, extent=None):
    """Majority label per cell of a grid laid over the labels (the scorers' geometry)."""
    lab = np.asarray(labels)
    return ImageGeometry.covering(lab.shape, grid, extent).labels_to_grid(lab, void)


def mask_to_grid(mask, grid, extent=None):
    """Fraction of each cell covered by a mask (the scorers' geometry)."""
    m = np.asarray(mask)
    return ImageGeometry.covering(m.shape, grid, extent).mask_fraction(m)


@st.composite
def mask_pairs(draw):
    shape = draw(shapes)
    a = draw(arrays(bool, shape))
    b = draw(arrays(bool, shape))
    return a, b


@SETTINGS
@given(mask_pairs())
def test_iou_bounded_and_symmetric(pair):
    a, b = pair
    iou = F.binary_iou(a, b)
    assert 0.0 <= iou <= 1.0
    assert iou == F.binary_iou(b, a)


@SETTINGS
@given(arrays(bool, shapes))
def test_iou_of_a_mask_with_itself_is_one(m):
    if m.any():
        assert F.binary_iou(m, m) == 1.0
        assert F.binary_iou(m, ~m) == 0.0


@SETTINGS
@given(arrays(bool, shapes))
def test_rle_round_trips_preserve_mask_and_area(m):
    for rle in (mask_to_rle(m), mask_to_uncompressed_rle(m)):
        back = rle_to_mask(rle)
        np.testing.assert_array_equal(back, m)
        assert rle_area(rle) == int(m.sum())
    assert sum(mask_to_uncompressed_rle(m)["counts"]) == m.size


@SETTINGS
@given(st.data())
def test_fbeta_bounded(data):
    shape = data.draw(shapes)
    pred = data.draw(arrays(np.float64, shape, elements=st.floats(0, 1)))
    gt = data.draw(arrays(bool, shape))
    r = F.saliency_scores([pred], [gt], thresholds=8)
    for key in ("max_fbeta", "iou", "accuracy"):
        assert 0.0 <= r[key] <= 1.0
    tp, fp, fn = data.draw(st.tuples(*[st.integers(0, 1000)] * 3))
    assert 0.0 <= float(F.fbeta_from_counts(tp, fp, fn)) <= 1.0


@SETTINGS
@given(st.data())
def test_box_iou_bounded_and_symmetric(data):
    coords = st.floats(0, 50, allow_nan=False)
    a = data.draw(st.lists(st.tuples(coords, coords, coords, coords), min_size=1, max_size=4))
    b = data.draw(st.lists(st.tuples(coords, coords, coords, coords), min_size=1, max_size=4))
    ab, ba = F.box_iou(a, b), F.box_iou(b, a)
    assert ((ab >= 0) & (ab <= 1 + 1e-12)).all()
    np.testing.assert_allclose(ab, ba.T)


@SETTINGS
@given(st.data())
def test_accumulation_order_invariance(data):
    n = data.draw(st.integers(2, 5))
    h, w = data.draw(shapes)
    heads = data.draw(st.integers(1, 3))
    preds = [data.draw(arrays(bool, (heads, h, w))) for _ in range(n)]
    gts = [data.draw(arrays(bool, (h, w))) for _ in range(n)]
    labels = [data.draw(arrays(np.int64, (h, w), elements=st.sampled_from([0, 1, 2, 255]))) for _ in range(n)]
    order = data.draw(st.permutations(range(n)))
    split = data.draw(st.integers(1, n))

    def run(metric_cls, a, b, idx):
        m = metric_cls()
        m.update([a[i] for i in idx[:split]], [b[i] for i in idx[:split]])
        m.update([a[i] for i in idx[split:]], [b[i] for i in idx[split:]])
        return m.compute()

    base = list(range(n))
    j1, j2 = run(FgJaccard, preds, gts, base), run(FgJaccard, preds, gts, order)
    for key in ("mean", "union", "best", "per_head"):
        assert j1[key] == pytest.approx(j2[key])
    if any(((lab != 255) & (lab != 0)).any() or (lab == 0).any() for lab in labels):
        m1, m2 = run(CoarseMIoU, preds, labels, base), run(CoarseMIoU, preds, labels, order)
        assert m1["miou"] == pytest.approx(m2["miou"])
        assert m1["per_class"] == pytest.approx(m2["per_class"])
    sal = [p[0].astype(np.float64) for p in preds]
    s1 = run(lambda: Saliency(thresholds=4), sal, gts, base)
    s2 = run(lambda: Saliency(thresholds=4), sal, gts, order)
    assert s1 == pytest.approx(s2)


@SETTINGS
@given(st.data())
def test_downsample_labels_keeps_values_and_identity(data):
    h, w = data.draw(shapes)
    lab = data.draw(arrays(np.int64, (h, w), elements=st.integers(0, 5)))
    np.testing.assert_array_equal(downsample_labels(lab, (h, w)), lab)
    gh, gw = data.draw(st.integers(1, h)), data.draw(st.integers(1, w))
    out = downsample_labels(lab, (gh, gw))
    assert out.shape == (gh, gw) and set(np.unique(out)) <= set(np.unique(lab))

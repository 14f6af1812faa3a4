"""Metrics against scikit-learn and hand-computed answers; batch size 1 vs N; docstring examples."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import fbeta_score, jaccard_score

from crate_vis import metrics as F
from crate_vis import metrics as M
from crate_vis.data.image_geometry import ImageGeometry

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")



def downsample_labels(labels, grid, void=255, extent=None):
    """Majority label per cell of a grid laid over the labels (the scorers' geometry)."""
    lab = np.asarray(labels)
    return ImageGeometry.covering(lab.shape, grid, extent).labels_to_grid(lab, void)


def mask_to_grid(mask, grid, extent=None):
    """Fraction of each cell covered by a mask (the scorers' geometry)."""
    m = np.asarray(mask)
    return ImageGeometry.covering(m.shape, grid, extent).mask_fraction(m)

def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------- doctests
@pytest.mark.parametrize(
    "module", ["crate_vis.metrics.iou", "crate_vis.metrics.miou", "crate_vis.metrics.parts", "crate_vis.io.coco",
               "crate_vis.metrics.jaccard", "crate_vis.groundtruth.panoptic"]  # fmt: skip
)
def test_docstring_examples_run(module):
    import importlib

    mod = importlib.import_module(module)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0


# ------------------------------------------------------------------------------------------ IoU / confusion
def test_binary_iou_matches_sklearn_jaccard():
    rng = _rng(1)
    for _ in range(20):
        a = rng.random((9, 11)) < rng.random()
        b = rng.random((9, 11)) < rng.random()
        ref = jaccard_score(b.ravel(), a.ravel(), zero_division=1.0)
        assert F.binary_iou(a, b) == pytest.approx(ref, abs=1e-12)
    z = np.zeros((3, 3), bool)
    assert F.binary_iou(z, z) == 1.0 and F.binary_iou(z, z, empty=0.0) == 0.0


def test_binary_iou_ignore_and_torch_input():
    a = torch.zeros(4, 4, dtype=torch.bool)
    a[:2] = True
    b = a.clone()
    b[3] = True
    ignore = np.zeros((4, 4), bool)
    ignore[3] = True
    assert F.binary_iou(a, b) == pytest.approx(8 / 12)
    assert F.binary_iou(a, b, ignore=ignore) == 1.0


def test_confusion_matrix_and_miou_match_sklearn():
    rng = _rng(2)
    c = 5
    pred = rng.integers(0, c, size=(3, 16, 16))
    target = rng.integers(0, c, size=(3, 16, 16))
    target[:, :2] = 255  # void
    cm = F.confusion_matrix(pred, target, c)
    keep = target.ravel() != 255
    ref = sk_confusion(target.ravel()[keep], pred.ravel()[keep], labels=list(range(c)))
    np.testing.assert_array_equal(cm, ref)
    iou = F.iou_from_confusion(cm)
    ref_iou = jaccard_score(target.ravel()[keep], pred.ravel()[keep], labels=list(range(c)), average=None)
    np.testing.assert_allclose(iou, ref_iou, atol=1e-12)
    assert F.mean_iou(pred, target, c) == pytest.approx(ref_iou.mean())
    # accumulated over images equals one call on everything
    metric = M.ConfusionMatrix(c)
    metric.update(pred[:1], target[:1])
    metric.update(list(pred[1:]), list(target[1:]))
    np.testing.assert_array_equal(metric.compute()["matrix"], ref)


def test_confusion_matrix_errors():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        F.confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="shape"):
        F.confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 3)


def test_box_iou_hand_computed():
    iou = F.box_iou([[0, 0, 10, 10]], [[5, 0, 10, 10], [0, 0, 10, 10], [20, 20, 2, 2], [0, 0, 5, 5]])
    np.testing.assert_allclose(iou, [[50 / 150, 1.0, 0.0, 0.25]])
    with pytest.raises(ValueError, match="w, h >= 0"):
        F.box_iou([[0, 0, -1, 2]], [[0, 0, 1, 1]])


# -------------------------------------------------------------------------------------- resolution helpers
def test_downsample_labels_majority_vote_by_hand():
    lab = np.zeros((4, 6), np.int64)
    lab[:, 3:] = 2
    lab[0, 0] = 255
    lab[1, 0:2] = 1
    out = downsample_labels(lab, (2, 2))
    # top-left cell (rows 0-1, cols 0-2): labels 255, 0, 0, 1, 1, 0 -> 0 wins
    np.testing.assert_array_equal(out, [[0, 2], [0, 2]])
    # uneven split: 5 rows into 2 cells by pixel centre -> rows 0-1 and 2-4
    lab5 = np.zeros((5, 2), np.int64)
    lab5[3:] = 7
    np.testing.assert_array_equal(downsample_labels(lab5, (2, 1)), [[0], [7]])
    lab5[2:] = 7
    lab5[3] = 4
    np.testing.assert_array_equal(downsample_labels(lab5, (2, 1)), [[0], [7]])
    # a grid covering only the top 8 of 10 rows (the model input was cropped): rows 8-9 belong to no cell
    lab10 = np.repeat(np.array([0, 0, 0, 0, 5, 5, 5, 9, 9, 9])[:, None], 3, axis=1)
    np.testing.assert_array_equal(downsample_labels(lab10, (2, 1)), [[0], [9]])
    np.testing.assert_array_equal(downsample_labels(lab10, (2, 1), extent=(8, 3)), [[0], [5]])
    np.testing.assert_allclose(mask_to_grid(lab10 == 9, (2, 1), extent=(8.0, 3.0)), [[0.0], [0.25]])
    with pytest.raises(ValueError, match="grid"):
        downsample_labels(lab, (5, 2))


def test_mask_to_grid_fractions():
    m = np.zeros((4, 4), bool)
    m[0, :3] = True
    np.testing.assert_allclose(mask_to_grid(m, (2, 2)), [[0.5, 0.25], [0, 0]])


# ---------------------------------------------------------------------------------------- foreground Jaccard
def _jaccard_data(seed: int, n: int = 6, heads: int = 3):
    rng = _rng(seed)
    preds = [rng.random((heads, 12, 10)) < 0.4 for _ in range(n)]
    gts = [rng.random((12, 10)) < 0.5 for _ in range(n)]
    return preds, gts


def test_fg_jaccard_against_sklearn_per_image():
    preds, gts = _jaccard_data(3)
    res = F.fg_jaccard(preds, gts)
    per_head = np.array([[jaccard_score(g.ravel(), p[k].ravel(), zero_division=1.0) for k in range(3)]
                         for p, g in zip(preds, gts)])  # fmt: skip
    union = np.array([jaccard_score(g.ravel(), p.any(0).ravel(), zero_division=1.0) for p, g in zip(preds, gts)])
    assert res["mean"] == pytest.approx(per_head.mean(1).mean())
    assert res["best"] == pytest.approx(per_head.max(1).mean())
    assert res["union"] == pytest.approx(union.mean())
    np.testing.assert_allclose(res["per_head"], per_head.mean(0))
    assert res["best_fixed_head"] == int(per_head.mean(0).argmax())
    assert res["n_images"] == 6


def test_fg_jaccard_single_mask_and_ignore():
    gt = np.zeros((4, 4), bool)
    gt[:2] = True
    pred = gt.copy()
    pred[3] = True
    ignore = np.zeros((4, 4), bool)
    ignore[3] = True
    res = F.fg_jaccard([pred], [gt])
    assert res["mean"] == res["union"] == res["best"] == pytest.approx(8 / 12)
    assert F.fg_jaccard([pred], [gt], [ignore])["mean"] == 1.0


def test_fg_jaccard_errors():
    with pytest.raises(ValueError, match=r"prediction of size \(3, 4\) for a ground truth of size \(4, 4\)"):
        F.fg_jaccard([np.zeros((2, 3, 4))], [np.zeros((4, 4))])
    with pytest.raises(ValueError, match="2 predictions for 1"):
        F.fg_jaccard([np.zeros((4, 4))] * 2, [np.zeros((4, 4))])
    with pytest.raises(ValueError, match="no images"):
        M.FgJaccard().compute()


@pytest.mark.parametrize("batch", [1, 4])
def test_fg_jaccard_batch_size_invariance(batch):
    preds, gts = _jaccard_data(4, n=8)
    ref = F.fg_jaccard(preds, gts)
    metric = M.FgJaccard()
    for i in range(0, 8, batch):
        metric.update(np.stack(preds[i : i + batch]), torch.from_numpy(np.stack(gts[i : i + batch])))
    out = metric.compute()
    for key in ("mean", "union", "best", "per_head"):
        assert out[key] == pytest.approx(ref[key])
    metric.reset()
    with pytest.raises(ValueError):
        metric.compute()


# ----------------------------------------------------------------------------------------------- coarse mIoU
def test_coarse_miou_hand_computed():
    lab = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255]])
    heads = np.zeros((2, 3, 4), bool)
    heads[0, :2, 2:] = True  # exactly class 1
    heads[1, 2, :] = True  # class 2 plus two void cells (ignored)
    heads[1, 0, 0] = True  # one cell of class 0
    r = F.coarse_miou([heads], [lab])
    # class 0 (background): head0 0/8, head1 1/6, the non-void cells no head claims {(0,1), (1,0), (1,1)} 3/4;
    # class 1: 1.0 (head 0); class 2: head1 2/(2+1) = 2/3 (void cells ignored)
    assert r["per_class"] == pytest.approx({0: 3 / 4, 1: 1.0, 2: 2 / 3})
    assert r["miou"] == pytest.approx((3 / 4 + 1 + 2 / 3) / 3)
    assert r["head_counts"] == {0: 1, 1: 1}
    r_nobg = F.coarse_miou([heads], [lab], include_background=False)
    assert r_nobg["miou"] == pytest.approx((1 + 2 / 3) / 2)


def test_coarse_miou_mean_over_images_then_classes():
    lab_a = np.array([[0, 1]])
    lab_b = np.array([[3, 3]])
    ha = np.array([[[0, 1]]], bool)  # class 0 (the unclaimed cell) IoU 1, class 1 IoU 1 -> image 1.0
    hb = np.array([[[1, 0]]], bool)  # class 3 IoU 0.5 -> image 0.5
    r = F.coarse_miou([ha, hb], [lab_a, lab_b])
    assert r["miou"] == pytest.approx(0.75)
    all_void = np.full((1, 2), 255)
    r2 = F.coarse_miou([ha, hb, ha], [lab_a, lab_b, all_void])
    assert r2["miou"] == pytest.approx(0.75) and r2["n_skipped"] == 1


def test_coarse_miou_against_sklearn_binary_jaccard():
    rng = _rng(5)
    lab = rng.integers(0, 4, size=(7, 9))
    heads = rng.random((5, 7, 9)) < 0.5
    r = F.coarse_miou([heads], [lab])
    for c, v in r["per_class"].items():
        candidates = [*heads, ~heads.any(0)] if c == 0 else heads  # the background may also be what no mask claims
        ref = max(jaccard_score((lab == c).ravel(), h.ravel()) for h in candidates)
        assert v == pytest.approx(ref)


def test_coarse_miou_size_error_and_batches():
    with pytest.raises(ValueError, match="token grid first"):
        F.coarse_miou([np.zeros((2, 3, 3), bool)], [np.zeros((6, 6), int)])
    rng = _rng(6)
    masks = rng.random((6, 3, 5, 5)) < 0.5
    labs = rng.integers(0, 3, size=(6, 5, 5))
    ref = F.coarse_miou(list(masks), list(labs))
    m = M.CoarseMIoU()
    m.update(masks[:1], labs[:1])
    m.update(masks[1:], labs[1:])
    assert m.compute() == ref


# ---------------------------------------------------------------------------------------------------- CorLoc
def test_corloc_hand_computed():
    gts = [
        [[0, 0, 10, 10]],
        [[0, 0, 10, 10], [50, 50, 10, 10]],
        [[0, 0, 10, 10]],
        [[0, 0, 10, 10]],
        np.zeros((0, 4)),
    ]
    preds = [
        [0, 0, 10, 5],  # IoU 0.5 exactly: correct (>=)
        [52, 50, 10, 10],  # second GT, IoU 80/120
        [0, 0, 10, 4.9],  # IoU 0.49: wrong
        None,  # no prediction: wrong
        [0, 0, 1, 1],  # no GT: skipped
    ]
    r = F.corloc(preds, gts)
    assert r == {"corloc": 0.5, "n_correct": 2, "n_images": 4, "n_skipped": 1}
    m = M.CorLoc()
    for p, g in zip(preds, gts):
        m.update([p], [g])
    assert m.compute() == r
    with pytest.raises(ValueError, match="exactly one"):
        F.corloc([[[0, 0, 1, 1], [0, 0, 2, 2]]], [[[0, 0, 1, 1]]])


# --------------------------------------------------------------------------------------------- part scores
def test_head_part_scores_pooled_ratio():
    rng = _rng(7)
    attn = [rng.random((4, 6, 6)) for _ in range(5)]
    fg = [rng.random((6, 6)) < 0.3 for _ in range(5)]
    r = F.head_part_scores(attn, fg)
    inside = sum((a * f).sum((1, 2)) for a, f in zip(attn, fg))
    total = sum(a.sum((1, 2)) for a in attn)
    np.testing.assert_allclose(r["per_head"], inside / total)
    assert r["chance"] == pytest.approx(np.mean([f.mean() for f in fg]))
    assert r["ranking"] == list(np.argsort(-(inside / total)))
    m = M.HeadPartScore()
    m.update(attn[:2], fg[:2])
    m.update(attn[2:], fg[2:])
    np.testing.assert_allclose(m.compute()["per_head"], r["per_head"])
    uniform = F.head_part_scores([np.ones((1, 6, 6))], [fg[0]])
    assert uniform["per_head"][0] == pytest.approx(uniform["chance"])
    with pytest.raises(ValueError, match="mask_fraction"):
        F.head_part_scores([np.ones((2, 6, 6))], [np.ones((12, 12))])
    with pytest.raises(ValueError, match="non-negative"):
        F.head_part_scores([-np.ones((2, 6, 6))], [np.ones((6, 6))])


# ------------------------------------------------------------------------------------------------- saliency
def test_saliency_against_sklearn():
    rng = _rng(8)
    preds = [rng.random((10, 10)) for _ in range(4)]
    gts = [rng.random((10, 10)) < 0.4 for _ in range(4)]
    thr = [0.1, 0.3, 0.5, 0.7, 0.9]
    r = F.saliency_scores(preds, gts, thresholds=thr)
    b = np.sqrt(0.3)
    fb = np.array([[fbeta_score(g.ravel(), (p >= t).ravel(), beta=b, zero_division=0.0) for t in thr]
                   for p, g in zip(preds, gts)])  # fmt: skip
    assert r["max_fbeta"] == pytest.approx(fb.mean(0).max())
    assert r["best_threshold"] == thr[int(fb.mean(0).argmax())]
    iou = np.mean([jaccard_score(g.ravel(), (p >= 0.5).ravel(), zero_division=1.0) for p, g in zip(preds, gts)])
    acc = np.mean([((p >= 0.5) == g).mean() for p, g in zip(preds, gts)])
    assert r["iou"] == pytest.approx(iou) and r["accuracy"] == pytest.approx(acc)
    m = M.Saliency(thresholds=thr)
    m.update(np.stack(preds[:3]), np.stack(gts[:3]))
    m.update(preds[3:], gts[3:])
    assert m.compute() == pytest.approx(r)


def test_saliency_default_thresholds_and_errors():
    gt = np.zeros((5, 5), bool)
    gt[1:4, 1:4] = True
    r = F.saliency_scores([gt.astype(float)], [gt])
    assert r["max_fbeta"] == pytest.approx(1.0) and r["iou"] == 1.0 and r["accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        F.saliency_scores([gt * 2.0], [gt])
    # F-beta conventions: empty prediction -> 0; empty GT with predictions -> 0
    np.testing.assert_allclose(F.fbeta_from_counts([0, 0], [0, 5], [4, 0]), [0.0, 0.0])

"""COCO AP: parity with pycocotools on perturbed coco128 ground truth, hand-computed cases, bad input."""

from __future__ import annotations

import contextlib
import io
import json

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from crate_vis.groundtruth import COCODataset
from crate_vis.io.coco import mask_to_rle, masks_to_results
from crate_vis.metrics import COCO_STAT_NAMES, CocoAP, coco_ap

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _pycocotools_direct(gt_file, res_file, iou_type):
    """COCOeval exactly as its documentation runs it, class-agnostic."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        dt = gt.loadRes(str(res_file))
        ev = COCOeval(gt, dt, iou_type)
        ev.params.useCats = 0
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _perturbed_results(ds: COCODataset, seed: int = 0) -> list[dict]:
    """Ground truth made imperfect: eroded/dilated/shifted masks, jittered scores, some dropped, some false
    positives. Category ids are kept, so pycocotools needs no class-agnostic help to see them."""
    rng = np.random.default_rng(seed)
    out = []
    for image_id in ds.image_ids:
        h, w = ds.image_size(image_id)
        for inst in ds.instances(image_id):
            if inst.iscrowd or rng.random() < 0.15:
                continue
            m = inst.mask
            op = rng.integers(0, 3)
            if op < 2:  # erode or dilate by 1-3 px
                fn = cv2.erode if op == 0 else cv2.dilate
                m = fn(m.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=int(rng.integers(1, 4))).astype(bool)
            m = np.roll(m, tuple(int(v) for v in rng.integers(-3, 4, size=2)), axis=(0, 1))
            if not m.any():
                continue
            out += masks_to_results(image_id, m, rng.random(), category_id=inst.category_id)
        fp = np.zeros((h, w), bool)  # a false positive per image
        y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
        fp[y : y + 20, x : x + 20] = True
        out += masks_to_results(image_id, fp, rng.random() * 0.5, category_id=1)
    return out


@pytest.fixture(scope="module")
def coco128_files(coco128_root, tmp_path_factory):
    gt_file = coco128_root / "annotations" / "instances_train2017.json"
    ds = COCODataset(gt_file)
    res = _perturbed_results(ds)
    res_file = tmp_path_factory.mktemp("coco") / "results.json"
    res_file.write_text(json.dumps(res))
    return gt_file, res_file, res


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_coco128_parity_with_pycocotools(coco128_files, iou_type):
    gt_file, res_file, res = coco128_files
    ours = coco_ap(gt_file, res_file, iou_type=iou_type)
    ref = _pycocotools_direct(gt_file, res_file, iou_type)
    assert [ours[k] for k in COCO_STAT_NAMES] == [float(v) for v in ref]  # exactly the same numbers
    assert ours["n_images"] == 128 and ours["n_detections"] == len(res)
    assert 0.1 < ours["AP"] < 0.95  # perturbed, not perfect, not useless


def test_coco128_batch_size_invariance(coco128_files):
    gt_file, res_file, res = coco128_files
    ref = coco_ap(gt_file, res, iou_type="segm")
    metric = CocoAP(COCODataset(gt_file), iou_type="segm")
    by_image: dict = {}
    for r in res:
        by_image.setdefault(r["image_id"], []).append(r)
    for dets in by_image.values():
        metric.update(dets)
    out = metric.compute()
    assert [out[k] for k in COCO_STAT_NAMES] == [ref[k] for k in COCO_STAT_NAMES]


# --------------------------------------------------------------------------------------------- hand-computed
def _tiny_gt() -> dict:
    m = np.zeros((20, 20), bool)
    m[0:10, 0:10] = True
    crowd = np.zeros((20, 20), bool)
    crowd[12:20, 12:20] = True
    return {
        "images": [{"id": 1, "width": 20, "height": 20, "file_name": "a.jpg"},
                   {"id": 2, "width": 20, "height": 20, "file_name": "b.jpg"}],
        "categories": [{"id": 3, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "segmentation": mask_to_rle(m)},
            {"id": 2, "image_id": 1, "category_id": 3, "segmentation": mask_to_rle(crowd), "iscrowd": 1},
        ],
    }  # fmt: skip


def _box(y0, y1, x0, x1):
    m = np.zeros((20, 20), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_hand_computed_iou_060():
    # prediction covers 6 of the 10 rows: IoU 0.6 -> matched at thresholds 0.50, 0.55, 0.60 (3 of 10)
    res = masks_to_results(1, _box(0, 6, 0, 10), [0.9])
    r = coco_ap(_tiny_gt(), res, iou_type="segm")
    assert r["AP50"] == pytest.approx(1.0) and r["AP75"] == 0.0
    assert r["AP"] == pytest.approx(0.3)
    assert r["APs"] == pytest.approx(0.3) and r["APm"] == -1.0 and r["APl"] == -1.0  # area 100 < 32^2


def test_hand_computed_false_positive_ranked_first_and_crowd_ignored():
    res = masks_to_results(1, _box(0, 10, 0, 10), [0.5])  # perfect, but scored below ...
    res += masks_to_results(1, _box(0, 4, 14, 18), [0.9])  # ... a false positive: precision 1/2 at recall 1
    res += masks_to_results(1, _box(12, 20, 12, 20), [0.95])  # on the crowd region: ignored, not a false positive
    r = coco_ap(_tiny_gt(), res, iou_type="segm")
    assert r["AP"] == pytest.approx(0.5)
    assert r["AR1"] == 0.0 and r["AR10"] == pytest.approx(1.0)  # maxDets=1 keeps only the false positive


def test_class_agnostic_accepts_any_category():
    res = masks_to_results(1, _box(0, 10, 0, 10), [0.9], category_id=1)  # GT category is 3
    assert coco_ap(_tiny_gt(), res)["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="category_id 1 is not a ground-truth category"):
        coco_ap(_tiny_gt(), res, class_agnostic=False)


def test_bbox_iou_type():
    res = [{"image_id": 1, "score": 0.7, "bbox": [0, 0, 10, 6]}]  # box IoU 0.6 with the GT box [0, 0, 10, 10]
    r = coco_ap(_tiny_gt(), res, iou_type="bbox")
    assert r["AP"] == pytest.approx(0.3) and r["AP50"] == pytest.approx(1.0)


def test_empty_predictions_give_zero_not_an_error():
    r = coco_ap(_tiny_gt(), [], iou_type="segm")
    assert r["AP"] == 0.0 and r["AR100"] == 0.0 and r["n_detections"] == 0
    assert r["APm"] == -1.0  # no ground truth in that area range, as COCOeval reports
    assert CocoAP(_tiny_gt()).compute()["AP"] == 0.0


@pytest.mark.parametrize(
    "results, match",
    [
        ([{"image_id": 9, "score": 0.5, "segmentation": mask_to_rle(np.ones((20, 20)))}], "image ids the ground truth does not have: 9"),
        ([{"image_id": 1, "segmentation": mask_to_rle(np.ones((20, 20)))}], r"results\[0\]: missing field.*'score'"),
        ([{"image_id": 1, "score": 0.5}], r"missing field.*'segmentation'"),
        ([{"image_id": 1, "score": 0.5, "segmentation": mask_to_rle(np.ones((10, 20)))}], "image 1: RLE of size 10x20 for an image of 20x20"),
        ([{"image_id": 1, "score": float("nan"), "segmentation": mask_to_rle(np.ones((20, 20)))}], "finite"),
        ([{"image_id": 1, "score": 0.5, "segmentation": [[0, 0, 1, 1, 2, 2]]}], "RLE"),
    ],
)
def test_bad_results_raise(results, match):
    with pytest.raises(ValueError, match=match):
        coco_ap(_tiny_gt(), results)


@pytest.mark.parametrize("box", [[0, 0, -1, 2], [0, 0, "1", 2], [0, 0, 1], [0, 0, float("inf"), 1]])
def test_bad_boxes_raise(box):
    with pytest.raises(ValueError, match=r"results\[0\]: bbox must be \[x, y, w, h\]"):
        coco_ap(_tiny_gt(), [{"image_id": 1, "score": 0.5, "bbox": box}], iou_type="bbox")


def test_bbox_results_with_polygon_segmentation():
    res = [{"image_id": 1, "score": 0.7, "bbox": [0, 0, 10, 10], "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]}]
    assert coco_ap(_tiny_gt(), res, iou_type="bbox")["AP"] == pytest.approx(1.0)


def test_bad_results_file(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match=f"{p}.*list of detections"):
        coco_ap(_tiny_gt(), p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        coco_ap(_tiny_gt(), p)
    p.write_text(json.dumps([{"image_id": 1, "score": 0.5}]))
    with pytest.raises(ValueError, match=rf"{p}\[0\]: missing field"):
        coco_ap(_tiny_gt(), p, iou_type="bbox")


def test_rle_counts_bytes_are_accepted():
    rle = mask_utils.encode(np.asfortranarray(_box(0, 10, 0, 10).astype(np.uint8)))  # counts as bytes
    assert coco_ap(_tiny_gt(), [{"image_id": 1, "score": 1.0, "segmentation": rle}])["AP"] == pytest.approx(1.0)

"""``crate-vis score`` on tiny constructed datasets: printed and JSON numbers equal the Python API's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crate_vis.cli import main
from crate_vis.data.image_geometry import plan_geometry
from crate_vis.groundtruth import COCODataset, VOCDataset, open_dataset, voc_palette
from crate_vis.io.coco import mask_to_rle, masks_to_results
from crate_vis.io.segment_output import load_prediction_masks
from crate_vis.metrics import coarse_miou, coco_ap, corloc, fg_jaccard

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

H, W = 24, 32



def downsample_labels(labels, grid, void=255, extent=None):
    """Majority label per cell of a grid laid over the labels (the scorers' geometry)."""
    from crate_vis.data.image_geometry import ImageGeometry

    lab = np.asarray(labels)
    return ImageGeometry.covering(lab.shape, grid, extent).labels_to_grid(lab, void)

def coarse_miou_by_hand(masks, labels, include_background=True, void=255) -> float:
    """The emergence paper's coarse mIoU, written out: per image and class present, the best candidate's IoU (the
    heads' masks; for the background also the tokens no mask claims, or a lone mask's complement), mean over the
    image's classes, then over images; void cells count nowhere."""
    per_image = []
    for m, lab in zip(masks, labels):
        m, lab = np.asarray(m, bool), np.asarray(lab)
        valid = lab != void
        ious = []
        for c in np.unique(lab[valid]):
            if c == 0 and not include_background:
                continue
            target = (lab == c) & valid
            candidates = list(m) if c else ([~m[0]] if len(m) == 1 else [*m, ~m.any(0)])
            ious.append(max(((p & target) & valid).sum() / ((p | target) & valid).sum() for p in candidates))
        if ious:
            per_image.append(np.mean(ious))
    return float(np.mean(per_image))


def _score(capsys, *argv: str) -> tuple[int, str]:
    code = main(["score", *argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def _png(arr: np.ndarray, path: Path, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode="P" if palette else None)
    if palette:
        im.putpalette(voc_palette())
    im.save(path)


@pytest.fixture()
def mask_gt(tmp_path) -> tuple[Path, Path, dict]:
    """Three images' binary GT masks and two-head predictions at image size."""
    rng = np.random.default_rng(0)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    truth = {}
    for k in range(3):
        gt = np.zeros((H, W), np.uint8)
        y, x = rng.integers(0, 10), rng.integers(0, 14)
        gt[y : y + 12, x : x + 16] = 255
        _png(gt, gt_dir / f"img{k}.png")
        heads = [np.roll(gt, int(rng.integers(-4, 5)), axis=1), (rng.random((H, W)) < 0.3) * 255]
        for h, m in enumerate(heads):
            _png(m, pred_dir / f"img{k}_mask_head{h}.png")
        truth[f"img{k}"] = (gt > 0, np.stack(heads) > 0)
    return gt_dir, pred_dir, truth


def test_jaccard_json_equals_python_api(capsys, mask_gt):
    gt_dir, pred_dir, truth = mask_gt
    code, out = _score(capsys, "--protocol", "jaccard", "--pred", str(pred_dir), "--gt", str(gt_dir), "--json")
    assert code == 0, out
    res = json.loads(out)
    stems = sorted(truth)
    # IoU of each image (rows) and head (columns), and of the union of the heads, counted here pixel by pixel
    iou = np.array([[(h & truth[s][0]).sum() / (h | truth[s][0]).sum() for h in truth[s][1]] for s in stems])
    union = [(truth[s][1].any(0) & truth[s][0]).sum() / (truth[s][1].any(0) | truth[s][0]).sum() for s in stems]
    ref = {"mean": iou.mean(), "union": np.mean(union), "best": iou.max(1).mean(), "per_head": iou.mean(0).tolist(),
           "best_fixed_head": int(iou.mean(0).argmax()), "n_images": 3}  # fmt: skip
    assert len(set(np.round(iou.ravel(), 6))) == 6 and iou.mean(0)[0] != iou.mean(0)[1]  # no tie hides a mix-up
    for key in ("mean", "union", "best", "per_head", "best_fixed_head", "n_images"):
        assert res[key] == pytest.approx(ref[key], abs=1e-12)
    assert res["protocol"] == "jaccard" and res["n_missing"] == 0 and "best" in res["oracle"]
    # the table prints the same numbers
    code, table = _score(capsys, "--protocol", "jaccard", "--pred", str(pred_dir), "--gt", str(gt_dir))
    assert code == 0
    assert f"{ref['best']:.4f}" in table and "oracle" in table and f"{ref['union']:.4f}" in table


def test_jaccard_errors(capsys, mask_gt, tmp_path):
    gt_dir, pred_dir, _ = mask_gt
    _png(np.zeros((H, W)), pred_dir / "stranger.png")
    code, out = _score(capsys, "--protocol", "jaccard", "--pred", str(pred_dir), "--gt", str(gt_dir))
    assert code == 1 and "images the ground truth does not have: stranger" in out
    (pred_dir / "stranger.png").unlink()
    for h in range(2):
        (pred_dir / f"img2_mask_head{h}.png").unlink()
    code, out = _score(capsys, "--protocol", "jaccard", "--pred", str(pred_dir), "--gt", str(gt_dir))
    assert code == 1 and "1 of 3 ground-truth images have no prediction (img2)" in out
    code, out = _score(capsys, "--protocol", "jaccard", "--pred", str(pred_dir), "--gt", str(gt_dir), "--allow-missing", "--json")
    # the missing image counts as an empty prediction (IoU 0 where it has an object), never silently dropped
    assert code == 0 and json.loads(out)["n_missing"] == 1 and json.loads(out)["n_images"] == 3
    _png(np.zeros((H // 2, W // 2)), pred_dir / "img2.png")
    code, out = _score(capsys, "--protocol", "jaccard", "--pred", str(pred_dir), "--gt", str(gt_dir))
    assert code == 1 and "img2: prediction: is 12x16, the ground truth 24x32" in out
    code, out = _score(capsys, "--protocol", "jaccard", "--pred", str(pred_dir), "--gt", str(gt_dir), "--resize-pred")
    assert code == 0


@pytest.fixture()
def voc_gt(tmp_path) -> Path:
    root = tmp_path / "VOC2012"
    rng = np.random.default_rng(1)
    ids = []
    for k in range(3):
        stem = f"2008_00000{k}"
        cls = np.zeros((H, W), np.uint8)
        obj = np.zeros((H, W), np.uint8)
        cls[4:16, 2 + k : 14 + k], obj[4:16, 2 + k : 14 + k] = 12, 1
        cls[10:22, 18:30], obj[10:22, 18:30] = 3, 2
        cls[3, 2:16] = obj[3, 2:16] = 255
        _png(cls, root / "SegmentationClass" / f"{stem}.png", palette=True)
        _png(obj, root / "SegmentationObject" / f"{stem}.png", palette=True)
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{stem}.jpg")
        ids.append(stem)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return root


def test_miou_on_voc_token_grid_equals_python_api(capsys, voc_gt, tmp_path):
    pred_dir = tmp_path / "heads"
    pred_dir.mkdir()
    rng = np.random.default_rng(2)
    grid = (H // 4, W // 4)  # patch 4
    ds = VOCDataset(voc_gt)
    expected_masks, expected_labels = [], []
    for stem in ds.image_ids:
        heads = rng.random((3, *grid)) < 0.4
        heads[0] = downsample_labels(ds.semantic(stem), grid) == 12  # one head finds class 12 exactly
        np.save(pred_dir / f"{stem}.npy", heads)
        expected_masks.append(heads)
        expected_labels.append(downsample_labels(ds.semantic(stem), grid))
    code, out = _score(capsys, "--protocol", "miou", "--pred", str(pred_dir), "--gt", str(voc_gt), "--json")
    assert code == 0, out
    res = json.loads(out)
    ref = coarse_miou(expected_masks, expected_labels)
    assert res["miou"] == pytest.approx(ref["miou"]) == pytest.approx(coarse_miou_by_hand(expected_masks, expected_labels))
    assert res["per_class"]["12"] == pytest.approx(1.0)
    assert res["class_names"] == {"0": "background", "3": "bird", "12": "dog"}
    assert res["resolution"] == "token" and res["include_background"] is True
    res_nobg = json.loads(_score(capsys, "--protocol", "miou", "--pred", str(pred_dir), "--gt", str(voc_gt), "--json",
                                 "--no-background")[1])  # fmt: skip
    assert res_nobg["miou"] == pytest.approx(coarse_miou_by_hand(expected_masks, expected_labels, include_background=False))
    assert res_nobg["miou"] != pytest.approx(res["miou"])
    code, table = _score(capsys, "--protocol", "miou", "--pred", str(pred_dir), "--gt", str(voc_gt))
    assert f"{ref['miou']:.4f}" in table and "oracle" in table


def test_jaccard_on_voc_ignores_void(capsys, voc_gt, tmp_path):
    pred_dir = tmp_path / "fg"
    ds = VOCDataset(voc_gt)
    preds, gts, ignores = [], [], []
    for stem in ds.image_ids:
        fg = ds.foreground(stem).copy()
        fg[3, 2:16] = True  # the void pixels: must not count
        _png(fg * 255, pred_dir / f"{stem}.png")
        preds.append(fg)
        gts.append(ds.foreground(stem))
        ignores.append(ds.ignore(stem))
    res = json.loads(_score(capsys, "--protocol", "jaccard", "--pred", str(pred_dir), "--gt", str(voc_gt), "--json")[1])
    assert res["mean"] == pytest.approx(1.0) == pytest.approx(fg_jaccard(preds, gts, ignores)["mean"])


def test_corloc_from_masks_and_results(capsys, voc_gt, tmp_path):
    ds = VOCDataset(voc_gt)
    pred_dir = tmp_path / "boxes"
    boxes = {}
    for j, stem in enumerate(ds.image_ids):
        m = np.zeros((H, W), np.uint8)
        if j < 2:
            m[4:16, 2 + j : 14 + j] = 255  # exactly the first object
        else:
            m[0:2, 0:2] = 255  # a miss
        _png(m, pred_dir / f"{stem}.png")
        boxes[stem] = [float(2 + j), 4.0, 12.0, 12.0] if j < 2 else [0.0, 0.0, 2.0, 2.0]
    res = json.loads(_score(capsys, "--protocol", "corloc", "--pred", str(pred_dir), "--gt", str(voc_gt), "--json")[1])
    ref = corloc([boxes[s] for s in ds.image_ids], [ds.boxes(s) for s in ds.image_ids])
    assert res["corloc"] == pytest.approx(ref["corloc"]) == pytest.approx(2 / 3)
    assert res["n_correct"] == 2


@pytest.fixture()
def coco_gt(tmp_path) -> tuple[Path, list]:
    m1 = np.zeros((H, W), bool)
    m1[2:12, 3:15] = True
    m2 = np.zeros((H, W), bool)
    m2[14:22, 16:30] = True
    data = {
        "images": [{"id": 5, "width": W, "height": H, "file_name": "x.jpg"},
                   {"id": 6, "width": W, "height": H, "file_name": "y.jpg"}],
        "categories": [{"id": 18, "name": "dog"}],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 18, "segmentation": mask_to_rle(m1)},
                        {"id": 2, "image_id": 6, "category_id": 18, "segmentation": mask_to_rle(m2)}],
    }  # fmt: skip
    gt = tmp_path / "ann" / "instances_val.json"
    gt.parent.mkdir()
    gt.write_text(json.dumps(data))
    shifted = np.roll(m2, 3, axis=1)
    results = masks_to_results(5, m1, [0.9]) + masks_to_results(6, shifted, [0.8]) + masks_to_results(6, m1, [0.95])
    return gt, results


def test_coco_protocol_json_equals_python_api(capsys, coco_gt, tmp_path):
    gt, results = coco_gt
    out_dir = tmp_path / "segment_out"
    out_dir.mkdir()
    (out_dir / "results.json").write_text(json.dumps(results))
    code, out = _score(capsys, "--pred", str(out_dir), "--gt", str(gt), "--json", "--output", str(tmp_path / "s.json"))
    assert code == 0, out
    res = json.loads(out)
    # By hand. Ranked by score: m1 on y (0.95, misses), m1 on x (0.9, exact), the shifted m2 on y (0.8). The shift
    # wraps one column round: mask IoU 88/136 = 0.647, a hit up to the threshold 0.60; box IoU 112/256 < 0.5.
    # 101-point interpolated precision: with both hits 2/3 at every recall; with x alone 1/2 up to recall 0.5 (51
    # of the 101 points) and 0 beyond. Class-agnostic: the ten thresholds 0.50..0.95, three of which take both.
    one_hit = 51 * 0.5 / 101
    expected = {
        "segm": {"AP": (3 * 2 / 3 + 7 * one_hit) / 10, "AP50": 2 / 3, "AP75": one_hit, "AR100": (3 * 1 + 7 * 0.5) / 10},
        "bbox": {"AP": one_hit, "AP50": one_hit, "AP75": one_hit, "AR100": 0.5},
    }
    for t in ("segm", "bbox"):
        assert {k: res[t][k] for k in expected[t]} == pytest.approx(expected[t], abs=1e-12)
        ref = coco_ap(COCODataset(gt), results, iou_type=t)  # the Python API prints the same numbers
        assert {k: res[t][k] for k in expected[t]} == {k: ref[k] for k in expected[t]}
    assert res["class_agnostic"] is True
    assert json.loads((tmp_path / "s.json").read_text())["segm"]["AP"] == res["segm"]["AP"]
    code, table = _score(capsys, "--pred", str(out_dir / "results.json"), "--gt", str(gt), "--iou-type", "segm")
    assert code == 0 and f"{res['segm']['AP']:.4f}" in table and "class-agnostic" in table


def test_coco_protocol_errors(capsys, coco_gt, tmp_path):
    gt, results = coco_gt
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(results + [{**results[0], "image_id": 404}]))
    code, out = _score(capsys, "--pred", str(bad), "--gt", str(gt))
    assert code == 1 and "image ids the ground truth does not have: 404" in out
    bad.write_text(json.dumps([{k: v for k, v in results[0].items() if k != "segmentation"}]))
    code, out = _score(capsys, "--pred", str(bad), "--gt", str(gt), "--iou-type", "segm")
    assert code == 1 and "the results hold boxes only: score them with --iou-type bbox" in out
    code, out = _score(capsys, "--pred", str(tmp_path / "nope.json"), "--gt", str(gt))
    assert code == 1 and "not found" in out


def test_open_dataset_and_prediction_loader_roundtrip(mask_gt):
    gt_dir, pred_dir, truth = mask_gt
    ds = open_dataset(gt_dir)
    preds = load_prediction_masks(pred_dir)
    for stem, (gt, heads) in truth.items():
        np.testing.assert_array_equal(ds.foreground(stem), gt)
        np.testing.assert_array_equal(preds[stem], heads)


# ------------------------------------------------------------------------------------ segment output folders
def _write_segment_output(out: Path, items: list[dict]) -> None:
    """The layout ``crate-vis segment`` writes: masks/<name>_<k>.png, images/<name>.json records, results.json."""
    (out / "masks").mkdir(parents=True)
    (out / "images").mkdir()
    results = []
    for it in items:
        recs = []
        for k, (m, score) in enumerate(zip(it["masks"], it["scores"])):
            rel = f"masks/{it['name']}_{k}.png"
            _png(m.astype(np.uint8) * 255, out / rel)
            entry = masks_to_results(it["image_id"], m, [score])[0]
            recs.append({"file": rel, "score": score, "bbox": entry["bbox"], "segmentation": entry["segmentation"]})
            results.append(entry)
        h, w = it["masks"][0].shape if it["masks"] else it["size"]
        geometry = plan_geometry((h, w), it["patch"], it["img_size"]).to_dict()
        assert geometry["input_hw"] == it["input_size"]
        rec = {"image_id": it["image_id"], "file_name": it["file_name"], "width": w, "height": h,
               "geometry": geometry, "grid": it["grid"], "settings": {"img_size": it["img_size"]},
               "masks": recs}  # fmt: skip
        (out / "images" / f"{it['name']}.json").write_text(json.dumps(rec))
    (out / "results.json").write_text(json.dumps(results))


def test_segment_output_layout(capsys, coco_gt, tmp_path):
    gt, _ = coco_gt
    ds = COCODataset(gt)
    fg5, fg6 = ds.foreground(5), ds.foreground(6)
    # image 5: the model saw a 16x20 input (img_size 16 -> 16x21.3 resized -> cropped to 16x20): grid 4x5 of
    # patch 4 covering 24 x 30 of the 24 x 32 original pixels
    items = [
        {"name": "x", "image_id": 5, "file_name": "x.jpg", "masks": [fg5, np.roll(fg5, 5, axis=0)],
         "scores": [0.4, 0.9], "grid": [4, 5], "input_size": [16, 20], "img_size": 16, "patch": 4},
        {"name": "y", "image_id": 6, "file_name": "y.jpg", "masks": [], "scores": [], "size": (H, W),
         "grid": [4, 5], "input_size": [16, 20], "img_size": 16, "patch": 4},
    ]  # fmt: skip
    out = tmp_path / "seg"
    _write_segment_output(out, items)

    res = json.loads(_score(capsys, "--protocol", "jaccard", "--pred", str(out), "--gt", str(gt), "--json")[1])
    ref = fg_jaccard([np.stack([fg5, np.roll(fg5, 5, axis=0)]), np.zeros((1, H, W), bool)], [fg5, fg6])
    assert res["best"] == pytest.approx(ref["best"]) and res["n_images"] == 2  # y: no mask = an empty prediction

    res = json.loads(_score(capsys, "--protocol", "miou", "--pred", str(out), "--gt", str(gt), "--json")[1])
    rw = round(W * 16 / H)  # resize_for_model: short side 16
    extent = (16 * H / 16, 20 * W / rw)
    grid_masks = [np.stack([downsample_labels(m.astype(int), (4, 5), extent=extent) for m in items[0]["masks"]]),
                  np.zeros((1, 4, 5), bool)]  # fmt: skip
    labels = [downsample_labels(ds.semantic(i), (4, 5), extent=extent) for i in (5, 6)]
    assert res["miou"] == pytest.approx(coarse_miou(grid_masks, labels)["miou"])
    assert res["resolution"] == "token"

    res = json.loads(_score(capsys, "--protocol", "corloc", "--pred", str(out), "--gt", str(gt), "--json")[1])
    # x: the top-scoring mask is the shifted one (box IoU 5/15 rows = 1/3 < 0.5); y: no mask -> wrong
    assert res["corloc"] == 0.0 and res["n_images"] == 2 and "top-scoring" in res["box_source"]

    res = json.loads(_score(capsys, "--pred", str(out), "--gt", str(gt), "--json", "--iou-type", "segm")[1])
    assert res["segm"]["n_detections"] == 2


def test_segment_cli_then_score_end_to_end(capsys, tmp_path):
    """What ``crate-vis segment`` writes is what ``score`` reads (tiny random model, three images)."""
    rng = np.random.default_rng(0)
    imgs, anns = [], []
    for k in range(3):
        img = rng.integers(0, 60, (40, 48, 3)).astype(np.uint8)
        m = np.zeros((40, 48), bool)
        m[10:30, 10 + 4 * k : 34 + 4 * k] = True  # rows: whole token rows 1-2 (see the mIoU below)
        img[m] = [220, 40, 40]
        Image.fromarray(img).save(tmp_path / f"im{k}.png")
        imgs.append({"id": 10 + k, "width": 48, "height": 40, "file_name": f"im{k}.png"})
        anns.append({"id": k + 1, "image_id": 10 + k, "category_id": 4, "segmentation": mask_to_rle(m)})
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": [{"id": 4, "name": "red"}]}))
    out = tmp_path / "out"
    assert main(["segment", str(gt), "--out", str(out), "--model", "crate_test_patch8_32", "--img-size", "32",
                 "--method", "maskcut", "--no-overlay"]) == 0  # fmt: skip
    capsys.readouterr()
    from crate_vis.io.segment_output import load_segment_output

    seg = load_segment_output(out)
    assert sorted(seg.masks) == ["im0.png", "im1.png", "im2.png"] and seg.image_ids["im0.png"] == 10
    res = json.loads(_score(capsys, "--pred", str(out), "--gt", str(gt), "--json")[1])
    results = json.loads((out / "results.json").read_text())
    assert res["segm"]["AP"] == coco_ap(gt, results)["AP"]
    res = json.loads(_score(capsys, "--protocol", "jaccard", "--pred", str(out), "--gt", str(gt), "--json")[1])
    ds = COCODataset(gt)
    ref = fg_jaccard([seg.masks[f"im{k}.png"] for k in range(3)], [ds.foreground(10 + k) for k in range(3)])
    assert res["union"] == pytest.approx(ref["union"])
    res = json.loads(_score(capsys, "--protocol", "miou", "--pred", str(out), "--gt", str(gt), "--json")[1])
    # By hand at the 4x4 token grid: the model saw the image resized to 32x38 and cropped to 32x32, so a token is a
    # 10 x 10.1 pixel cell of the original. The object's share of each cell is 0, 1 or, in its side columns,
    # 0.22 to 0.76 (far from a tie): a cell is the object where the share is over a half. The predicted token masks
    # are read at the cell centres of the painted masks.
    token_masks, token_labels = [], []
    for k in range(3):
        geo = seg.geometries[f"im{k}.png"]
        assert seg.grids[f"im{k}.png"] == (4, 4) and geo["resized_hw"] == [32, 38] and geo["input_hw"] == [32, 32]
        sy, sx = 40 / 32, 48 / 38
        oy, ox = geo["offset"]
        rows = [((oy + 8 * i) * sy, (oy + 8 * i + 8) * sy) for i in range(4)]  # cell edges in original pixels
        cols = [((ox + 8 * j) * sx, (ox + 8 * j + 8) * sx) for j in range(4)]
        obj_rows, obj_cols = (10, 30), (10 + 4 * k, 34 + 4 * k)

        def overlap(cell, span):
            return max(0.0, min(cell[1], span[1]) - max(cell[0], span[0])) / (cell[1] - cell[0])

        share = np.array([[overlap(r, obj_rows) * overlap(c, obj_cols) for c in cols] for r in rows])
        assert not np.any(np.abs(share - 0.5) < 0.1)
        token_labels.append(np.where(share > 0.5, 4, 0))
        centres = np.ix_([int(sum(r) / 2) for r in rows], [int(sum(c) / 2) for c in cols])
        token_masks.append(np.stack([mk[centres] for mk in seg.masks[f"im{k}.png"]]))
    assert res["resolution"] == "token"
    assert res["miou"] == pytest.approx(coarse_miou_by_hand(token_masks, token_labels), abs=1e-12)


def test_images_sharing_a_stem_are_an_error(tmp_path):
    from crate_vis.metrics.scoring import score_jaccard

    m = np.zeros((4, 4), bool)
    data = {"images": [{"id": 1, "width": 4, "height": 4, "file_name": "a/x.jpg"},
                       {"id": 2, "width": 4, "height": 4, "file_name": "b/x.jpg"}],
            "categories": [{"id": 1, "name": "t"}], "annotations": []}  # fmt: skip
    with pytest.raises(ValueError, match="match several ground-truth images"):
        score_jaccard(COCODataset(data), {"x": m[None]})


def test_dataset_level_part_and_saliency_scores(mask_gt):
    from crate_vis.data.image_geometry import ImageGeometry
    from crate_vis.metrics import head_part_scores, saliency_scores
    from crate_vis.metrics.scoring import score_head_parts, score_saliency

    def mask_to_grid(m, grid):
        return ImageGeometry.covering(m.shape, grid).mask_fraction(m)

    gt_dir, _, truth = mask_gt
    ds = open_dataset(gt_dir)
    rng = np.random.default_rng(3)
    attn = {s: rng.random((4, 6, 8)) for s in truth}
    res = score_head_parts(ds, attn)
    ref = head_part_scores([attn[s] for s in sorted(truth)], [mask_to_grid(truth[s][0], (6, 8)) for s in sorted(truth)])
    assert res["per_head"] == pytest.approx(ref["per_head"]) and res["chance"] == pytest.approx(ref["chance"])
    maps = {s: rng.random((H, W)) for s in truth}
    res = score_saliency(ds, maps, thresholds=16)
    ref = saliency_scores([maps[s] for s in sorted(truth)], [truth[s][0] for s in sorted(truth)], thresholds=16)
    assert res["max_fbeta"] == pytest.approx(ref["max_fbeta"]) and res["iou"] == pytest.approx(ref["iou"])


def test_coco128_ground_truth_as_prediction_scores_one(capsys, coco128_root, tmp_path):
    """Real data end to end: the ground truth itself, written as predictions, scores 1 under every protocol."""
    gt = coco128_root / "annotations" / "instances_train2017.json"
    ds = COCODataset(gt)
    fg_dir, head_dir = tmp_path / "fg", tmp_path / "heads"
    head_dir.mkdir()
    ids = ds.image_ids[:6]
    for i in ids:
        stem = ds.stem(i)
        _png(ds.foreground(i).astype(np.uint8) * 255, fg_dir / f"{stem}.png")
        sem = ds.semantic(i)
        grid = (sem.shape[0] // 16, sem.shape[1] // 16)
        low = downsample_labels(sem, grid)
        np.save(head_dir / f"{stem}.npy", np.stack([low == c for c in np.unique(low) if c != 255]))
    common = ["--gt", str(gt), "--allow-missing", "--json"]
    res = json.loads(_score(capsys, "--protocol", "jaccard", "--pred", str(fg_dir), *common)[1])
    # the 122 images without a prediction count as empty predictions: IoU 1 where the image has no object, else 0
    empty_gt = sum(not ds.foreground(i).any() for i in ds.image_ids if i not in ids)
    assert res["n_images"] == 128 and res["n_missing"] == 122
    assert res["mean"] == pytest.approx((6 + empty_gt) / 128)
    res = json.loads(_score(capsys, "--protocol", "miou", "--pred", str(head_dir), *common)[1])
    assert res["miou"] == pytest.approx(1.0) and res["resolution"] == "token"
    res = json.loads(_score(capsys, "--protocol", "corloc", "--pred", str(fg_dir), *common)[1])
    assert res["n_images"] == 126 and res["n_skipped"] == 2  # two coco128 images have no annotation
    from crate_vis.io.coco import mask_bbox

    boxes = [mask_bbox(ds.foreground(i)) if ds.foreground(i).any() else None for i in ids]
    assert res["n_correct"] == corloc(boxes, [ds.boxes(i) for i in ids])["n_correct"]

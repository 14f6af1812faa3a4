"""Scores that cannot be fooled: invariants of every protocol on small synthetic ground truth (no ../shared needed),
and the tests that catch bugs planted in the scorers, the cut rules, the key tables and the geometry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crate_vis.cli import main
from crate_vis.data.image_geometry import ImageGeometry
from crate_vis.groundtruth import COCODataset
from crate_vis.io.coco import mask_bbox, mask_to_rle
from crate_vis.metrics import coarse_miou, coco_ap, corloc, fg_jaccard
from crate_vis.metrics.scoring import score_coco, score_jaccard, score_miou

H, W = 24, 40


def _objects(k: int) -> list[np.ndarray]:
    """Two objects per image, placed differently in each of ``k`` images (non-square images)."""
    out = []
    for i in range(k):
        a = np.zeros((H, W), bool)
        a[2 + i : 10 + i, 3 : 15 + 2 * i] = True
        b = np.zeros((H, W), bool)
        b[12:22, 20 + i : 36] = True
        out.append((a, b))
    return out


@pytest.fixture()
def gt(tmp_path) -> tuple[Path, list]:
    """A COCO json (two categories, image ids NOT in file order) and a mask folder of the same ground truth."""
    objs = _objects(3)
    images, anns = [], []
    ids = [30, 10, 20]  # the json lists the images in an order unrelated to their ids
    for k, (a, b) in enumerate(objs):
        name = f"im{k}.png"
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / name)
        images.append({"id": ids[k], "file_name": name, "height": H, "width": W})
        anns += [{"id": 2 * k + 1, "image_id": ids[k], "category_id": 1, "segmentation": mask_to_rle(a)},
                 {"id": 2 * k + 2, "image_id": ids[k], "category_id": 2, "segmentation": mask_to_rle(b)}]  # fmt: skip
    path = tmp_path / "gt.json"
    cats = [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path, list(zip(ids, [f"im{k}.png" for k in range(3)], objs))


def _score(capsys, *args: str) -> dict:
    assert main(["score", *args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _write_segment_output(out: Path, gt_items, masks_of, ids_of=None) -> None:
    """A folder in the segmentation output layout, ids of our own choosing (never the ground truth's)."""
    from crate_vis.io.segment_output import ImageRecord, write_image, write_summary

    records = []
    for n, (_, fname, _objs) in enumerate(gt_items):
        masks = masks_of(fname)
        item = ImageRecord(Path(fname), Path(fname).stem, (ids_of or {}).get(fname, n + 1), fname)
        geo = {"original_hw": [H, W], "resized_hw": [H, W], "input_hw": [H, W], "patch_size": [1, 1], "fit": "crop"}
        records.append(write_image(out, item, masks, np.linspace(0.9, 0.5, len(masks)), geometry=geo, grid=(H, W),
                                   settings_id="test"))  # fmt: skip
    write_summary(out, records, {"settings_key": "test"})


# --------------------------------------------------------------------------------------- perfect predictions score 1
def test_the_ground_truth_scores_one_under_every_protocol_and_form(gt, tmp_path, capsys):
    path, items = gt
    fg = {fname: (a | b) for _, fname, (a, b) in items}
    seg = tmp_path / "seg"  # segmentation output: one mask per object
    _write_segment_output(seg, items, lambda f: np.stack([o for _, n, objs in items if n == f for o in objs]))
    assert _score(capsys, "--pred", str(seg), "--gt", str(path))["segm"]["AP"] == pytest.approx(1.0)
    assert _score(capsys, "--pred", str(seg), "--gt", str(path))["bbox"]["AP"] == pytest.approx(1.0)
    assert _score(capsys, "--pred", str(seg), "--gt", str(path), "--protocol", "jaccard")["union"] == 1.0
    assert _score(capsys, "--pred", str(seg), "--gt", str(path), "--protocol", "miou")["miou"] == pytest.approx(1.0)
    folder = tmp_path / "plain"  # a plain mask folder, one foreground mask per image, named by stem
    folder.mkdir()
    for fname, m in fg.items():
        Image.fromarray(m.astype(np.uint8) * 255).save(folder / fname)
    assert _score(capsys, "--pred", str(folder), "--gt", str(path), "--protocol", "jaccard")["mean"] == 1.0
    npy = tmp_path / "npy"  # per-class heads as .npy, at token resolution (patch 8): the paper's form
    npy.mkdir()
    ds = COCODataset(path)
    for image_id, fname, _ in items:
        low = ImageGeometry.covering((H, W), (H // 8, W // 8)).labels_to_grid(ds.semantic(image_id))
        np.save(npy / f"{Path(fname).stem}.npy", np.stack([low == c for c in np.unique(low)]))
    assert _score(capsys, "--pred", str(npy), "--gt", str(path), "--protocol", "miou")["miou"] == pytest.approx(1.0)
    # on figure-ground truth (one object class), the single foreground mask, whose background is its complement,
    # scores 1; its inverse 0; all-foreground the object's share of the image, on the object class only
    from crate_vis.groundtruth import open_dataset

    fgt = tmp_path / "figure_ground"
    fgt.mkdir()
    for fname, m in fg.items():
        Image.fromarray(m.astype(np.uint8) * 255).save(fgt / fname)
    binary = open_dataset(fgt)
    assert _score(capsys, "--pred", str(folder), "--gt", str(fgt), "--protocol", "miou")["miou"] == pytest.approx(1.0)
    inverse = {Path(f).stem: ~m[None] for f, m in fg.items()}
    everything = {Path(f).stem: np.ones((1, H, W), bool) for f in fg}
    assert score_miou(binary, inverse)["miou"] == 0.0
    share = np.mean([m.mean() for m in fg.values()])
    assert score_miou(binary, everything)["miou"] == pytest.approx(share / 2)
    assert score_jaccard(binary, inverse)["mean"] == 0.0
    one = tmp_path / "one_object"  # CorLoc: one object's mask per image gives its exact box
    one.mkdir()
    for _, fname, objs in items:
        Image.fromarray(objs[1].astype(np.uint8) * 255).save(one / fname)
    res = _score(capsys, "--pred", str(one), "--gt", str(path), "--protocol", "corloc")
    assert res["corloc"] == 1.0 and res["n_correct"] == 3
    res = _score(capsys, "--pred", str(seg), "--gt", str(path), "--protocol", "corloc")  # the top-scoring mask
    assert res["corloc"] == 1.0
    sal = tmp_path / "sal"
    sal.mkdir()
    for fname, m in fg.items():
        np.save(sal / f"{Path(fname).stem}.npy", m.astype(np.float64))
    res = _score(capsys, "--pred", str(sal), "--gt", str(path), "--protocol", "saliency")
    assert res["iou"] == 1.0 and res["max_fbeta"] == pytest.approx(1.0)


def test_coco_matches_by_file_name_not_by_id_or_order(gt, tmp_path, capsys):
    path, items = gt
    # segmentation output ids 1..3 in the file order; the ground truth's ids are 30, 10, 20
    seg = tmp_path / "seg"
    first = {fname: objs[0][None] for _, fname, objs in items}  # one of two objects per image
    _write_segment_output(seg, items, lambda f: first[f])
    res = _score(capsys, "--pred", str(seg), "--gt", str(path), "--iou-type", "segm")
    # independent reference: the same detections under the ground truth's own ids, straight into pycocotools
    dets = [{"image_id": i, "category_id": 1, "segmentation": mask_to_rle(objs[0]), "score": 0.9}
            for i, _, objs in items]  # fmt: skip
    assert res["segm"]["AP"] == pytest.approx(coco_ap(path, dets)["AP"]) and 0.3 < res["segm"]["AP"] < 0.7
    # the same predictions listed in another order with other ids score the same
    seg2 = tmp_path / "seg2"
    _write_segment_output(seg2, items[::-1], lambda f: first[f], ids_of={"im0.png": 7, "im1.png": 8, "im2.png": 9})
    res2 = _score(capsys, "--pred", str(seg2), "--gt", str(path), "--iou-type", "segm")
    assert res2["segm"]["AP"] == res["segm"]["AP"]


def test_an_image_with_objects_and_no_detection_lowers_ap(gt):
    path, items = gt
    (i0, _, (a0, b0)), (i1, _, (a1, b1)), (i2, _, (a2, b2)) = items
    full = [{"image_id": i, "category_id": 1, "segmentation": mask_to_rle(m), "score": 0.9}
            for i, _, objs in items for m in objs]  # fmt: skip
    assert coco_ap(path, full)["AP"] == pytest.approx(1.0)
    partial = [d for d in full if d["image_id"] != i2]  # every object of one image missed
    ap = coco_ap(path, partial)["AP"]
    assert ap < 0.8  # recall 4/6: AP counts the image without detections
    assert score_coco(COCODataset(path), partial, ("segm",))["segm"]["AP"] == ap


def test_unlisted_images_are_refused_unless_allowed(gt, tmp_path, capsys):
    path, items = gt
    seg = tmp_path / "seg"
    _write_segment_output(seg, items[:2], lambda f: np.ones((1, H, W), bool))
    assert main(["score", "--pred", str(seg), "--gt", str(path)]) == 1
    assert "1 of 3 ground-truth images were not segmented (im2.png)" in capsys.readouterr().err
    res = _score(capsys, "--pred", str(seg), "--gt", str(path), "--allow-missing", "--iou-type", "segm")
    assert res["n_missing"] == 1


def test_segm_only_results_score_both_types(gt, tmp_path, capsys):
    path, items = gt
    dets = [{"image_id": i, "category_id": 1, "segmentation": mask_to_rle(m), "score": 0.9}
            for i, _, objs in items for m in objs]  # no "bbox": pycocotools' loadRes derives it  # fmt: skip
    res_path = tmp_path / "results.json"
    res_path.write_text(json.dumps(dets))
    res = _score(capsys, "--pred", str(res_path), "--gt", str(path))
    assert res["segm"]["AP"] == pytest.approx(1.0) and res["bbox"]["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"segmentation": {"size": [H, W], "counts": "zzzz"}}, "outside '0'..'o'"),
        ({"segmentation": {"size": [H, W], "counts": "0"}}, "corrupt counts"),
        ({"bbox": [0, 0, float("nan"), 2]}, "bbox must be"),
        ({"score": float("nan")}, "finite"),
    ],
)
def test_one_validation_for_coco_and_corloc(gt, tmp_path, capsys, bad, message):
    path, items = gt
    det = {"image_id": items[0][0], "category_id": 1, "segmentation": mask_to_rle(items[0][2][0]), "score": 0.5}
    res_path = tmp_path / "results.json"
    res_path.write_text(json.dumps([{**det, **bad}]))
    for protocol in ("coco", "corloc"):
        assert main(["score", "--pred", str(res_path), "--gt", str(path), "--protocol", protocol,
                     "--allow-missing"]) == 1  # fmt: skip
        err = capsys.readouterr().err
        assert message in err and "results.json[0]" in err and err.count("\n") == 1


def test_corloc_refuses_masks_of_the_wrong_size(gt, tmp_path, capsys):
    path, items = gt
    folder = tmp_path / "small"
    folder.mkdir()
    for _, fname, (a, b) in items:
        Image.fromarray(((a | b)[::2, ::2]).astype(np.uint8) * 255).save(folder / fname)
    assert main(["score", "--pred", str(folder), "--gt", str(path), "--protocol", "corloc"]) == 1
    assert "is 12x20, the image 24x40" in capsys.readouterr().err


def test_jaccard_prints_only_rows_that_mean_something(gt, tmp_path, capsys):
    path, items = gt
    folder = tmp_path / "one"
    folder.mkdir()
    for _, fname, (a, b) in items:
        Image.fromarray((a | b).astype(np.uint8) * 255).save(folder / fname)
    assert main(["score", "--pred", str(folder), "--gt", str(path), "--protocol", "jaccard"]) == 0
    table = capsys.readouterr().out
    assert "one mask per image" in table and "union" not in table and "heads" not in table


# ------------------------------------------------------------------------------------- second, independent checks
def test_dino_threshold_is_the_smallest_top_set_holding_the_mass():
    from crate_vis.segmentation.dino import dino_threshold

    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.dirichlet(np.ones(30) * 0.3)
        mass = float(rng.uniform(0.1, 0.95))
        keep = dino_threshold(torch.from_numpy(a), mass).numpy()
        order = np.argsort(-a, kind="stable")
        need = int(np.searchsorted(np.cumsum(a[order]), mass * a.sum() - 1e-12)) + 1  # brute force on the top set
        expected = np.zeros(30, bool)
        expected[order[:need]] = True
        assert keep.sum() == need and (keep == expected).all()


def test_mean_combination_thresholds_the_mean_of_renormalised_heads():
    from crate_vis.segmentation.dino import dino_foreground

    rng = np.random.default_rng(1)
    attn = torch.from_numpy(rng.random((1, 3, 4, 5)) ** 3)
    fg = dino_foreground(attn, 0.6, combine="mean")[0].numpy()
    mean = (attn / attn.sum(dim=(-2, -1), keepdim=True)).mean(dim=1)[0].numpy().ravel()
    order = np.argsort(-mean, kind="stable")
    need = int(np.searchsorted(np.cumsum(mean[order]), 0.6 * mean.sum() - 1e-12)) + 1
    assert fg.sum() == need and fg.ravel()[order[:need]].all()


def test_corner_rule_rejects_a_side_with_three_corners():
    from crate_vis.segmentation.maskcut import bipartition

    # 4x4 grid: the seed's side (positive) holds three corners; the corner rule must give the other side
    x = np.array([[3, 1, 1, 1], [1, -1, -1, -1], [1, -1, -1, -1], [1, -1, -1, 1]], float).ravel()
    mask = bipartition(x, (4, 4))[0]
    assert not mask[0, 0] and mask[1, 1] and mask[2, 2]
    assert bipartition(x, (4, 4), rule="tokencut")[0][0, 0]  # without the rule the seed's side stays


def test_miou_leaves_void_cells_out_of_both_masks():
    lab = np.array([[1, 1, 255, 255], [0, 0, 0, 0]])
    pred = np.array([[[1, 1, 1, 1], [0, 0, 0, 0]]], bool)  # class 1 plus the two void cells
    assert coarse_miou([pred], [lab])["per_class"][1] == 1.0


def test_corloc_threshold_is_inclusive_at_one_half():
    gt_box = np.array([[0, 0, 10, 10]], float)
    exactly_half = [0, 0, 10, 5]  # IoU 50 / 100 = 0.5
    just_below = [0, 0, 10, 4.9]
    assert corloc([exactly_half], [gt_box])["n_correct"] == 1
    assert corloc([just_below], [gt_box])["n_correct"] == 0


def test_jaccard_of_a_half_overlap_is_known():
    gt = np.zeros((4, 4), bool)
    gt[:2] = True
    pred = np.zeros((4, 4), bool)
    pred[1:3] = True  # 4 of 12 pixels in common
    assert fg_jaccard([pred], [gt])["mean"] == pytest.approx(4 / 12)
    assert mask_bbox(pred) == [0.0, 1.0, 4.0, 2.0]


# ----------------------------------------------------------------------------------------- planted-bug catchers
def test_official_key_table_reads_two_digit_layers():
    from crate_vis import create_model, load_checkpoint

    model = create_model("crate_test_patch8_32", depth=12)
    official = {}
    for k, v in model.state_dict().items():
        k = (k.replace("patch_embed.norm_in", "to_patch_embedding.1").replace("patch_embed.proj", "to_patch_embedding.2")
             .replace("patch_embed.norm_out", "to_patch_embedding.3").replace("pos_embed", "pos_embedding")
             .replace("fc_norm", "mlp_head.0"))  # fmt: skip
        k = "mlp_head.1." + k[len("head."):] if k.startswith("head.") else k
        for i in range(12):
            k = (k.replace(f"blocks.{i}.norm1.", f"transformer.layers.{i}.0.norm.")
                 .replace(f"blocks.{i}.attn.qkv.", f"transformer.layers.{i}.0.fn.qkv.")
                 .replace(f"blocks.{i}.attn.proj.", f"transformer.layers.{i}.0.fn.to_out.0.")
                 .replace(f"blocks.{i}.norm2.", f"transformer.layers.{i}.1.norm.")
                 .replace(f"blocks.{i}.ista.weight", f"transformer.layers.{i}.1.fn.weight"))  # fmt: skip
        official["module." + k] = v.clone() + 1.0
    fresh = create_model("crate_test_patch8_32", depth=12)
    load_checkpoint(fresh, {"state_dict": official})
    assert torch.equal(fresh.blocks[11].ista.weight, model.blocks[11].ista.weight + 1.0)
    assert torch.equal(fresh.blocks[10].attn.qkv.weight, model.blocks[10].attn.qkv.weight + 1.0)


def test_non_square_position_embedding_keeps_rows_and_columns():
    from crate_vis.models.crate import resample_pos_embed

    gh, gw, dim = 2, 3, 4
    cols = torch.arange(gw, dtype=torch.float32)  # varies across columns only
    patch = cols.view(1, gw, 1).expand(gh, gw, dim).reshape(1, gh * gw, dim)
    pos = torch.cat([torch.zeros(1, 1, dim), patch], dim=1)
    out = resample_pos_embed(pos, (4, 6), (gh, gw))[0, 1:].reshape(4, 6, dim)
    assert torch.allclose(out, out[:1].expand_as(out), atol=1e-6)  # every row identical: nothing moved across rows
    assert (out[0, 1:, 0] - out[0, :-1, 0] > 0).all()  # and it still increases along the columns


def test_miou_patch_size_grid_is_height_first(gt):
    path, items = gt
    ds = COCODataset(path)
    # predictions at image size equal to the ground truth's classes, scored on the patch-8 token grid (3 x 5)
    preds = {fname: np.stack([ds.semantic(i) == c for c in np.unique(ds.semantic(i))]) for i, fname, _ in items}
    res = score_miou(ds, preds, patch_size=8)
    assert res["miou"] == pytest.approx(1.0) and res["resolution"] == "token"

"""Checks of issue 15's items that the other test files leave out or test weakly: each one fails on the bug it
names (a planted copy of it, or the behaviour the issue describes) and passes on the fixed code.

Tiny, seeded and quick: constructed ground truth, no ../shared data, a 3-layer model of 52k parameters.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crate_vis.cli import main
from crate_vis.io.coco import mask_to_rle
from crate_vis.io.segment_output import ImageRecord, write_image, write_summary

H, W = 24, 40


# ------------------------------------------------------------------------------------------------ helpers
def _boxes(k: int) -> np.ndarray:
    """One object in a different, non-overlapping place of each image (a mask of one image misses the others)."""
    m = np.zeros((H, W), bool)
    m[2 + 10 * (k % 2) : 10 + 10 * (k % 2), 2 + 12 * k : 12 + 12 * k] = True
    return m


def _coco_gt(tmp_path: Path, ids: list) -> Path:
    """Three images ``im0..im2.png`` listed in file order with the ids ``ids``, one object each."""
    images, anns = [], []
    for k, i in enumerate(ids):
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / f"im{k}.png")
        images.append({"id": i, "file_name": f"im{k}.png", "height": H, "width": W})
        anns.append({"id": k + 1, "image_id": i, "category_id": 1, "segmentation": mask_to_rle(_boxes(k))})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return path


def _segment_output(out: Path, names: list[str], masks_of, ids: list) -> None:
    """A folder in ``crate-vis segment``'s layout; its ids are its own (1..N as segment numbers a folder)."""
    records = []
    geo = {"original_hw": [H, W], "resized_hw": [H, W], "input_hw": [H, W], "patch_size": [1, 1], "fit": "crop"}
    for name, i in zip(names, ids):
        masks = masks_of(name)
        rec = ImageRecord(Path(name), Path(name).stem, i, name)
        records.append(write_image(out, rec, masks, np.linspace(0.9, 0.5, len(masks)), geometry=geo, grid=(H, W),
                                   settings_id="test"))  # fmt: skip
    write_summary(out, records, {"settings_key": "test"})


def _score(capsys, *args: str) -> dict:
    assert main(["score", *args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------- item 2: pairing by file name, not id
@pytest.mark.parametrize("gt_ids", [[2, 3, 1], ["b", "c", "a"]], ids=["permuted-int-ids", "string-ids"])
def test_ids_that_collide_with_the_segment_ids_are_still_paired_by_file_name(tmp_path, capsys, gt_ids):
    """The silent case of item 2: the ground truth's ids are 1..N too, in another order (or strings, item 14).
    Pairing by id would score each image's mask against another image's object (AP 0, CorLoc 0)."""
    gt = _coco_gt(tmp_path, gt_ids)
    names = [f"im{k}.png" for k in range(3)]
    seg = tmp_path / "seg"
    _segment_output(seg, names, lambda n: _boxes(int(n[2]))[None], ids=[1, 2, 3])
    res = _score(capsys, "--pred", str(seg), "--gt", str(gt))
    assert res["segm"]["AP"] == pytest.approx(1.0) and res["bbox"]["AP"] == pytest.approx(1.0)
    res = _score(capsys, "--pred", str(seg / "results.json"), "--gt", str(gt), "--iou-type", "segm")
    assert res["segm"]["AP"] == pytest.approx(1.0)  # results.json named directly: images.json beside it is used
    res = _score(capsys, "--pred", str(seg), "--gt", str(gt), "--protocol", "corloc")
    assert res["corloc"] == 1.0 and res["n_correct"] == 3
    res = _score(capsys, "--pred", str(seg), "--gt", str(gt), "--protocol", "jaccard")
    assert res["mean"] == 1.0


def test_a_segmented_image_the_ground_truth_lacks_is_refused(tmp_path, capsys):
    gt = _coco_gt(tmp_path, [1, 2, 3])
    seg = tmp_path / "seg"
    _segment_output(seg, ["im0.png", "im1.png", "other.png"], lambda n: _boxes(0)[None], ids=[1, 2, 3])
    for protocol in ("coco", "corloc", "jaccard"):
        assert main(["score", "--pred", str(seg), "--gt", str(gt), "--protocol", protocol, "--allow-missing"]) == 1
        err = capsys.readouterr().err
        assert "other.png" in err and err.count("\n") == 1, (protocol, err)


# ------------------------------------------------------------------- item 4: MaskCut's masks are not "heads"
def test_several_masks_per_image_are_called_masks_in_the_table(tmp_path, capsys):
    gt = _coco_gt(tmp_path, [1, 2, 3])
    seg = tmp_path / "seg"
    _segment_output(seg, [f"im{k}.png" for k in range(3)], lambda n: np.stack([_boxes(int(n[2])), _boxes(0)]),
                    ids=[1, 2, 3])  # fmt: skip
    assert main(["score", "--pred", str(seg), "--gt", str(gt), "--protocol", "jaccard"]) == 0
    table = capsys.readouterr().out
    assert "mean over masks" in table and "union of masks" in table and "head" not in table.lower()
    res = _score(capsys, "--pred", str(seg), "--gt", str(gt), "--protocol", "jaccard")
    # known answers: best mask per image is the object itself (1); the union adds a wrong box to images 1 and 2
    assert res["best"] == 1.0 and res["union"] == pytest.approx((1 + 2 * 80 / 160) / 3)


# ------------------------------------------------------------------ item 14: messages name the CLI's flags
def test_missing_and_size_messages_name_the_flags(tmp_path, capsys):
    gt = _coco_gt(tmp_path, [1, 2, 3])
    seg = tmp_path / "seg"
    _segment_output(seg, ["im0.png", "im1.png"], lambda n: _boxes(int(n[2]))[None], ids=[1, 2])
    for protocol in ("coco", "jaccard", "corloc", "miou"):
        assert main(["score", "--pred", str(seg), "--gt", str(gt), "--protocol", protocol]) == 1
        err = capsys.readouterr().err
        assert "--allow-missing" in err and "allow_missing" not in err, (protocol, err)
    small = tmp_path / "small"
    small.mkdir()
    for k in range(3):
        Image.fromarray(_boxes(k)[::2, ::2].astype(np.uint8) * 255).save(small / f"im{k}.png")
    assert main(["score", "--pred", str(small), "--gt", str(gt), "--protocol", "jaccard"]) == 1
    err = capsys.readouterr().err
    assert "--resize-pred" in err and "resize=" not in err and err.count("\n") == 1
    assert _score(capsys, "--pred", str(small), "--gt", str(gt), "--protocol", "jaccard", "--resize-pred")["mean"] == 1.0


# ------------------------------------------------------------- item 18: the planted bugs, second checks
def test_corner_rule_at_exactly_three_corners():
    """The seed's side holds exactly 3 of the 4 grid corners (an L along the top and left edges): the rule takes
    the other side. (A rule at 4 corners keeps the L; the test in test_protocol_invariants has 4 corners.)"""
    from crate_vis.segmentation.maskcut import bipartition

    x = -np.ones((4, 4))
    x[0, :] = 1.0
    x[:, 0] = 1.0
    x[0, 0] = 3.0  # the seed, in the corner of the L
    inner = np.zeros((4, 4), bool)
    inner[1:, 1:] = True  # the 3x3 block touching one corner only
    for sign in (1, -1):
        np.testing.assert_array_equal(bipartition(sign * x.ravel(), (4, 4))[0], inner)
    np.testing.assert_array_equal(bipartition(x.ravel(), (4, 4), rule="tokencut")[0], ~inner)  # no rule: the L


def test_position_embedding_resampling_commutes_with_transposition():
    """Resampling the transposed grid gives the transposed result: any height/width mix-up breaks this on a
    non-square grid (independent of the row/column test in test_protocol_invariants)."""
    from crate_vis.models.crate import resample_pos_embed

    g = torch.Generator().manual_seed(0)
    (gh, gw), (nh, nw), dim = (2, 3), (5, 4), 3
    patch = torch.randn(gh, gw, dim, generator=g)
    cls = torch.randn(1, 1, dim, generator=g)
    a = resample_pos_embed(torch.cat([cls, patch.reshape(1, -1, dim)], 1), (nh, nw), (gh, gw))
    b = resample_pos_embed(torch.cat([cls, patch.transpose(0, 1).reshape(1, -1, dim)], 1), (nw, nh), (gw, gh))
    assert torch.equal(a[:, :1], cls) and torch.equal(b[:, :1], cls)
    a_grid = a[0, 1:].reshape(nh, nw, dim)
    b_grid = b[0, 1:].reshape(nw, nh, dim)
    torch.testing.assert_close(a_grid, b_grid.transpose(0, 1), rtol=1e-5, atol=1e-6)
    # and a constant embedding stays constant (bicubic weights sum to one)
    const = resample_pos_embed(torch.ones(1, 1 + gh * gw, dim), (nh, nw), (gh, gw))
    torch.testing.assert_close(const, torch.ones_like(const))


def test_miou_patch_size_grid_on_a_known_answer(tmp_path, capsys):
    """``score --patch-size`` brings image-size masks to an (H // p, W // p) grid: a mask that is right on the
    token grid but wrong inside its cells scores 1 there, and less at pixel resolution."""
    gt = tmp_path / "fg"
    pred = tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    obj = np.zeros((H, W), bool)
    obj[:16, :16] = True  # 2x2 cells of 8 px
    blocky = obj.copy()
    blocky[:3, :3] = False  # a minority of one cell: the cell's vote is unchanged
    Image.fromarray(obj.astype(np.uint8) * 255).save(gt / "a.png")
    Image.fromarray(blocky.astype(np.uint8) * 255).save(pred / "a.png")
    token = _score(capsys, "--pred", str(pred), "--gt", str(gt), "--protocol", "miou", "--patch-size", "8")
    assert token["miou"] == pytest.approx(1.0) and token["resolution"] == "token"
    pixel = _score(capsys, "--pred", str(pred), "--gt", str(gt), "--protocol", "miou")
    expected = np.mean([(256 - 9) / 256, (H * W - 256) / (H * W - 256 + 9)])  # object and background IoU
    assert pixel["resolution"] == "pixel" and pixel["miou"] == pytest.approx(expected)


# ------------------------------------------------------------- items 18, 19: known answers on real outputs
@pytest.mark.parametrize("method", ["dino", "maskcut"])
def test_a_real_segment_output_scored_against_its_own_masks_scores_one(tmp_path, ckpt, capsys, method):
    """What ``crate-vis segment`` writes (a cropped model input, its recorded grid and extent) scored against ground
    truth made of its own masks: 1 under every protocol (a known answer where the end-to-end test has a range)."""
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    for k in range(2):
        img = rng.integers(0, 60, (40, 48, 3), dtype=np.uint8)
        img[8 + 4 * k : 30, 10 : 34 + 4 * k] = [220, 40, 40]
        Image.fromarray(img).save(src / f"p{k}.png")
    out = tmp_path / "seg"
    assert main(["segment", str(src), "--out", str(out), "-c", str(ckpt), "--method", method, "--no-progress",
                 "--no-overlay"]) == 0  # fmt: skip
    capsys.readouterr()
    images, anns = [], []
    for k, rec in enumerate(json.loads(p.read_text()) for p in sorted((out / "images").glob("*.json"))):
        images.append({"id": 100 + k, "file_name": rec["file_name"], "height": rec["height"], "width": rec["width"]})
        masks = [np.asarray(Image.open(out / m["file"])) > 0 for m in rec["masks"]]
        assert masks and all(m.any() for m in masks) and rec["grid"] != [rec["height"], rec["width"]]
        for m in masks:
            anns.append({"id": len(anns) + 1, "image_id": 100 + k, "category_id": 1, "segmentation": mask_to_rle(m)})
    gt = src / "gt.json"
    gt.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "self"}]}))
    res = _score(capsys, "--pred", str(out), "--gt", str(gt))
    assert res["segm"]["AP"] == pytest.approx(1.0) and res["bbox"]["AP"] == pytest.approx(1.0)
    res = _score(capsys, "--pred", str(out), "--gt", str(gt), "--protocol", "jaccard")
    assert res.get("union", res["mean"]) == 1.0  # the foreground is the union of the masks
    if method == "dino":  # one mask per image: the class map is the mask (MaskCut's masks may overlap)
        res = _score(capsys, "--pred", str(out), "--gt", str(gt), "--protocol", "miou")
        assert res["miou"] == pytest.approx(1.0) and res["resolution"] == "token"
        assert _score(capsys, "--pred", str(out), "--gt", str(gt), "--protocol", "corloc")["corloc"] == 1.0


# --------------------------------------------------------------------------- item 12: options before work
def test_patch_size_zero_in_a_recipe_is_one_line_before_any_work(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: crate_test_patch8_32\nmodel_kwargs:\n  patch_size: 0\ndata: synthetic\nepochs: 1\n")
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "patch_size" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_eval_checks_its_out_before_evaluating(tmp_path, capsys, monkeypatch):
    from crate_vis import create_model, save_model
    from crate_vis.train import evaluation

    for c in ("a", "b"):
        (tmp_path / "d" / "val" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "d" / "val" / c / "0.png")
    save_model(create_model("crate_test_patch8_32", num_classes=2), tmp_path / "m")
    called = []
    monkeypatch.setattr(evaluation, "evaluate_model", lambda *a, **k: called.append(1))
    (tmp_path / "taken").write_text("a file where the report folder should go")
    assert main(["eval", "--data", str(tmp_path / "d"), "--checkpoint", str(tmp_path / "m"), "--out",
                 str(tmp_path / "taken"), "--workers", "0"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert not called and "--out" in err and str(tmp_path / "taken") in err and err.count("\n") == 1


# ------------------------------------------------------------------------ item 13: one image-size policy
@pytest.mark.parametrize("command", ["segment", "attention", "heads"])
def test_an_image_below_one_patch_is_refused_by_every_command(tmp_path, ckpt, capsys, command):
    Image.fromarray(np.zeros((5, 300, 3), np.uint8)).save(tmp_path / "thin.png")  # 5 px < one 8 px patch
    out = tmp_path / ("o.png" if command == "heads" else "o")
    assert main([command, str(tmp_path / "thin.png"), "--out", str(out), "-c", str(ckpt)]) == 1
    captured = capsys.readouterr()
    assert "smaller than one 8x8 patch" in captured.err and "0 processed, 1 skipped" in captured.out


# ------------------------------------------------------------------------------- item 15: output behaviour
def test_demo_help_says_what_it_does(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "end to end" in out and "sample photos" in out


def test_segment_draws_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, ckpt, capsys):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert main(["segment", str(tmp_path / "a.png"), "--out", str(tmp_path / "s"), "-c", str(ckpt)]) == 0
    err = capsys.readouterr().err
    assert "%|" not in err and "img/s" not in err


_TRAIN = ["train", "--data", "synthetic", "--model", "crate_test_patch8_32", "--img-size", "32", "--epochs", "1",
          "--batch-size", "8", "--workers", "0", "--set", "synthetic_train_images=16", "--set",
          "synthetic_val_images=8", "--set", "synthetic_classes=2"]  # fmt: skip


def test_train_draws_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, capsys):
    assert main([*_TRAIN, "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "%|" not in err and "batch/s" not in err


def test_train_log_leaves_out_top5_below_six_classes(tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="crate_vis"):
        assert main([*_TRAIN, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    lines = [r.getMessage() for r in caplog.records if "val loss" in r.getMessage()]
    assert lines and not any("top5" in line for line in lines), lines


def test_eval_prints_no_top5_below_six_classes(tmp_path, capsys):
    from crate_vis import create_model, save_model

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "d" / split / c).mkdir(parents=True)
            for k in range(2):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "d" / split / c / f"{k}.png")
    torch.manual_seed(0)
    save_model(create_model("crate_test_patch8_32", num_classes=2).eval(), tmp_path / "m")
    assert main(["eval", "--data", str(tmp_path / "d"), "--checkpoint", str(tmp_path / "m"), "--out",
                 str(tmp_path / "ev"), "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "top-1" in out and "top-2" not in out and "top-5" not in out


def test_emergence_layer_table_numbers_layers_like_the_layer_option():
    from crate_vis.experiments.emergence import layer_table

    depth = 3
    att = [{"mean_attention": 0.1, "heads_mean": 0.1, "union": 0.1} for _ in range(depth)]
    wb = {"coding_rate": {"mean": [1.0] * depth}, "sparsity": {"mean": [0.5] * depth}}
    entry = {"attention": att, "maskcut": [{"AP50": 0.1}] * depth, "whitebox": wb}
    table = layer_table({"scores": {k: entry for k in ("crate", "vit", "crate_init", "vit_init")}})
    first_cells = [row.split("|")[1].strip() for row in table.splitlines()[2:]]
    assert first_cells == [str(i) for i in range(depth)]  # --layer takes 0..depth-1 ("layers 0..2")


def test_score_output_that_is_a_folder_is_refused_before_scoring(tmp_path, capsys, monkeypatch):
    from crate_vis.experiments import score as score_module

    gt = _coco_gt(tmp_path, [1, 2, 3])
    called = []
    monkeypatch.setattr(score_module, "score_predictions", lambda *a, **k: called.append(1) or {})
    (tmp_path / "taken").mkdir()
    assert main(["score", "--pred", str(tmp_path), "--gt", str(gt), "--output", str(tmp_path / "taken")]) == 1
    err = capsys.readouterr().err
    assert not called and str(tmp_path / "taken") in err and ".tmp" not in err

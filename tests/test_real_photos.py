"""The real-photo experiment's scoring, baselines, intervals, settings sweep and report, on a small COCO json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from crate_vis.experiments import real_photos as rp
from crate_vis.groundtruth import COCODataset


def _ellipse(h: int, w: int, share: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    r = math.sqrt(share / math.pi)
    return ((yy + 0.5 - h / 2) / (r * h)) ** 2 + ((xx + 0.5 - w / 2) / (r * w)) ** 2 <= 1.0


def _write_coco(root: Path, masks: list[np.ndarray], seed: int = 0) -> Path:
    """Photos (noise with a brighter object where the mask is) and a COCO instances json beside them."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i, m in enumerate(masks, start=1):
        pix = rng.integers(0, 90, (*m.shape, 3), dtype=np.uint8)
        pix[m] = rng.integers(160, 255, (int(m.sum()), 3), dtype=np.uint8)
        Image.fromarray(pix).save(root / "images" / f"p{i:03d}.png")
        images.append({"id": i, "file_name": f"p{i:03d}.png", "height": m.shape[0], "width": m.shape[1]})
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        ys, xs = np.nonzero(m)
        anns.append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 0, "area": float(m.sum()),
                     "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                              float(ys.max() - ys.min() + 1)],
                     "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})  # fmt: skip
    path = root / "annotations" / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return path


def test_ellipse_prior_scores_its_own_shape_perfectly_and_a_corner_object_poorly(tmp_path):
    share = 0.25
    centred = _write_coco(tmp_path / "a", [_ellipse(48, 64, share), _ellipse(64, 48, share)])
    prior = rp.ellipse_prior(COCODataset(centred))
    assert prior["object_share"] == pytest.approx(share, abs=0.01)
    assert prior["jaccard"] > 0.97
    corner = np.zeros((48, 64), bool)
    corner[:12, :16] = True
    off = _write_coco(tmp_path / "b", [corner])
    assert rp.ellipse_prior(COCODataset(off))["jaccard"] < 0.05


def test_interval_t_over_seeds_and_bootstrap_over_images():
    iv = rp.interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, 2) = 4.3027: half width 4.3027 / sqrt(3)
    assert iv["mean"] == pytest.approx(2.0)
    assert iv["high"] - iv["mean"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert iv["n"] == 3 and "t-interval" in iv["kind"]
    images = np.linspace(0.2, 0.8, 50)
    boot = rp.interval([float(images.mean())], [images.tolist()])
    assert boot["low"] < images.mean() < boot["high"] and "bootstrap" in boot["kind"]
    same = rp.interval([0.5], [[0.5] * 20])
    assert same["low"] == same["high"] == pytest.approx(0.5)


@pytest.fixture()
def small_coco(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    masks = []
    for _ in range(4):
        m = np.zeros((40, 56), bool)
        y, x = rng.integers(4, 16), rng.integers(4, 24)
        m[y : y + 20, x : x + 24] = True
        masks.append(m)
    return _write_coco(tmp_path / "coco", masks)


def test_evaluate_model_scores_every_layer_and_head_within_bounds(tiny_crate, small_coco, tmp_path):
    settings = rp.RealPhotoSettings(runs=[], grounds={}, out=tmp_path, size=32)
    res = rp.evaluate_model(tiny_crate, COCODataset(small_coco), settings)
    assert res["images"] == 4
    assert len(res["layers"]) == tiny_crate.depth
    for lay in res["layers"]:
        assert len(lay["per_head_iou"]) == tiny_crate.num_heads
        for key in ("dino_mean_heads", "dino_union", "dino_best_head", "dino_mean_attention", "tokencut",
                    "maskcut_first", "mass_in", "corloc", "maskcut_ap", "maskcut_ap50"):  # fmt: skip
            assert 0.0 <= lay[key] <= 1.0, key
        # the best head per image is at least the mean of the heads, image by image
        assert lay["dino_best_head"] >= lay["dino_mean_heads"] - 1e-12
        assert len(lay["per_image"]["tokencut"]) == 4
        assert lay["tokencut"] == pytest.approx(np.mean(lay["per_image"]["tokencut"]))


def test_sweep_chooses_the_best_row_and_checks_it_on_held_out_halves(tiny_crate, small_coco, tmp_path):
    settings = rp.RealPhotoSettings(runs=[], grounds={}, out=tmp_path)
    sweep = rp.sweep_segment_defaults(tiny_crate, COCODataset(small_coco), [32, 48], settings, taus=(0.1, 0.2),
                                      masses=(0.6,))  # fmt: skip
    assert len(sweep["table"]) == 2 * tiny_crate.depth * (1 + 2 + 2)
    # Chosen on the development half: the best row is the development half's choice, and its three scores agree
    # (the mean over all images is the image-weighted mean of the two halves).
    best, dev = sweep["best"], sweep["split_half"][0]
    assert {k: best[k] for k in ("size", "method", "threshold", "layer", "refine")} == dev["chosen"]
    assert best["jaccard"] == next(r["jaccard"] for r in sweep["table"] if all(r[k] == best[k] for k in dev["chosen"]))
    assert (best["dev"], best["held_out"], best["jaccard"]) == (dev["chosen_on"], dev["held_out"], dev["all"])
    n_dev, n_held = sweep["dev_images"], sweep["held_out_images"]
    assert n_dev + n_held == sweep["images"] and n_dev == (sweep["images"] + 1) // 2
    assert best["jaccard"] == pytest.approx((best["dev"] * n_dev + best["held_out"] * n_held) / sweep["images"])
    assert len(sweep["split_half"]) == 2
    for half in sweep["split_half"]:
        assert half["chosen"]["size"] in (32, 48) and half["chosen"]["method"] in ("dino", "tokencut", "maskcut")
        assert 0.0 <= half["held_out"] <= 1.0
    # The sweep's dino row at mass 0.6 is the experiment's "DINO mask, mean of heads" at the same size and layer.
    res = rp.evaluate_model(tiny_crate, COCODataset(small_coco), rp.RealPhotoSettings([], {}, tmp_path, size=32))
    for r in sweep["table"]:
        if r["size"] == 32 and r["method"] == "dino":
            assert r["jaccard"] == pytest.approx(res["layers"][r["layer"]]["dino_mean_attention"], abs=1e-12)
        if r["size"] == 32 and r["method"] == "tokencut" and r["threshold"] == 0.2:
            assert r["jaccard"] == pytest.approx(res["layers"][r["layer"]]["tokencut"], abs=1e-12)


def test_sweep_scores_the_refinement_on_the_best_settings_of_the_development_half(tiny_crate, small_coco, tmp_path):
    settings = rp.RealPhotoSettings(runs=[], grounds={}, out=tmp_path)
    sweep = rp.sweep_segment_defaults(tiny_crate, COCODataset(small_coco), [32], settings, taus=(0.1, 0.2),
                                      masses=(0.6,), refine_top=3)  # fmt: skip
    plain = [r for r in sweep["table"] if r["refine"] == "none"]
    refined = [r for r in sweep["table"] if r["refine"] == "bilateral"]
    assert len(plain) == tiny_crate.depth * 5 and len(refined) == 3
    keys = ("size", "method", "threshold", "layer")
    assert len({tuple(r[k] for k in keys) for r in refined}) == 3  # three different settings, each one scored plainly
    assert all(any(all(p[k] == r[k] for k in keys) for p in plain) for r in refined)


def test_segment_settings_name_the_threshold_flag():
    assert rp.segment_settings({"method": "dino", "threshold": 0.5, "layer": 2, "size": 96}) == {
        "method": "dino", "layer": 2, "img_size": 96, "mass": 0.5}
    assert rp.segment_settings({"method": "maskcut", "threshold": 0.2, "layer": 4, "size": 128}) == {
        "method": "maskcut", "layer": 4, "img_size": 128, "tau": 0.2, "max_masks": 1}
    assert rp.segment_settings({"method": "tokencut", "threshold": 0.1, "layer": 3, "size": 96,
                                "refine": "bilateral"}) == {
        "method": "tokencut", "layer": 3, "img_size": 96, "tau": 0.1, "refine": "bilateral"}


def test_run_writes_json_report_and_figure_for_random_initialisations(tiny_crate, small_coco, tmp_path):
    from crate_vis import save_model

    weights = save_model(tiny_crate, tmp_path / "w")
    runs = [rp.ModelRun(f"init_s{s}", "random init", None, architecture=str(weights), seed=s) for s in range(2)]
    out = tmp_path / "report"
    settings = rp.RealPhotoSettings(runs=runs, grounds={"toy": str(small_coco)}, out=out, size=32,
                                    notes={"intro": "toy"})  # fmt: skip
    results = rp.run_real_photos(settings)
    stored = json.loads((out / "real_photos.json").read_text())
    assert set(stored["models"]) == {"init_s0", "init_s1"}
    # two seeds give two different random models: their scores are not copies of one another
    a, b = (stored["models"][k]["toy"]["layers"][0]["per_head_iou"] for k in ("init_s0", "init_s1"))
    assert a != b
    scores = rp.group_scores(results, "toy", "random init")
    assert scores["dino_mean_attention"]["kind"].startswith("t-interval over 2")
    fig = rp.layer_curves(results, "toy", ["random init"], out / "layers.png")
    assert fig.stat().st_size > 1000
    sweep = rp.sweep_segment_defaults(tiny_crate, COCODataset(small_coco), [32], settings, taus=(0.2,), masses=(0.6,))
    report = rp.write_report(results, out, ["random init"], "random init", "nothing", figures=[fig.name],
                             sweep={"ground": "toy", **sweep})  # fmt: skip
    text = report.read_text()
    assert "## toy (4 images)" in text and "random init" in text and "![layers.png](layers.png)" in text
    best = sweep["best"]
    assert f"Chosen: `--method {best['method']} --layer {best['layer']} --img-size 32" in text
    assert f"**{best['jaccard']:.3f}**" in text  # the chosen cell is marked in the table


def test_random_initialisation_is_reproducible(tiny_crate, tmp_path):
    from crate_vis import save_model

    weights = save_model(tiny_crate, tmp_path / "w")
    run = rp.ModelRun("r", "g", None, architecture=str(weights), seed=3)
    m1, _ = rp._load(run, {})
    m2, _ = rp._load(run, {})
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)

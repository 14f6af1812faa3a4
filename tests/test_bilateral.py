"""Bilateral-solver refinement (TokenCut + BS): the solver, the safety rule, SegmentConfig, segment and its CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crate_vis import create_model, save_model
from crate_vis.cli import main
from crate_vis.errors import UsageError
from crate_vis.experiments.segment import SegmentRunConfig, segment_images
from crate_vis.models import recommended_settings, resolve_model
from crate_vis.segmentation.bilateral import BilateralParams, BilateralSolver, refine_masks, rgb_to_yuv
from crate_vis.segmentation.masks import mask_iou
from crate_vis.segmentation.run import SegmentConfig

H, W = 96, 128


def _ellipse_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noisy orange ellipse on a noisy dark background, and a 16-px blocky mask of it shifted by (3, 4) px."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:H, :W]
    obj = ((yy - 45) / 28) ** 2 + ((xx - 60) / 38) ** 2 < 1  # (H, W)
    img = np.clip(rng.normal(70, 10, (H, W, 3)), 0, 255).astype(np.uint8)
    img[obj] = np.clip(rng.normal([200, 150, 60], 10, (int(obj.sum()), 3)), 0, 255).astype(np.uint8)
    shifted = np.roll(obj, (3, 4), axis=(0, 1))
    cells = shifted.reshape(H // 16, 16, W // 16, 16).mean(axis=(1, 3)) > 0.5  # (6, 8)
    coarse = np.kron(cells, np.ones((16, 16), dtype=int)).astype(bool)  # (H, W)
    return img, obj, coarse


def test_refinement_snaps_a_blocky_mask_to_the_object_edges():
    img, obj, coarse = _ellipse_scene()
    coarse_iou = mask_iou(coarse, obj)
    assert coarse_iou == pytest.approx(0.73766, abs=1e-4)  # the fixture: patch-aligned blocks, a few pixels off
    result = refine_masks(img, coarse[None])
    assert result.masks.shape == (1, H, W) and result.masks.dtype == bool
    assert result.refined.tolist() == [True]
    assert mask_iou(result.masks[0], obj) >= coarse_iou + 0.2  # measured: 0.999
    again = refine_masks(img, coarse[None])
    assert np.array_equal(again.masks, result.masks)  # deterministic


def test_masks_are_refined_one_by_one():
    img, obj, coarse = _ellipse_scene()
    other = np.zeros_like(coarse)
    other[64:96, 96:128] = True  # a background corner
    both = refine_masks(img, np.stack([coarse, other]))
    for k, m in enumerate((coarse, other)):
        alone = refine_masks(img, m[None])
        assert np.array_equal(both.masks[k], alone.masks[0])
        assert both.refined[k] == alone.refined[0]
    none = refine_masks(img, np.zeros((0, H, W), bool))
    assert none.masks.shape == (0, H, W)
    empty = refine_masks(img, np.zeros((1, H, W), bool))
    assert not empty.masks.any() and empty.refined.tolist() == [False]


def test_a_constant_image_leaves_the_mask_unchanged():
    image = np.full((H, W, 3), 128, np.uint8)
    coarse = np.zeros((H, W), bool)
    coarse[24:72, 32:96] = True
    result = refine_masks(image, coarse[None])
    assert mask_iou(result.masks[0], coarse) >= 0.95  # here exactly: the solver's blur alone loses it, so it is kept
    assert np.array_equal(result.masks[0], coarse)


def test_a_refined_mask_far_from_the_coarse_one_is_dropped():
    # Bright left three quarters, dark right quarter; the coarse mask is a square inside the bright part. The solver
    # spreads it into a smaller blob elsewhere in the bright region (IoU 0.25): the coarse mask is kept.
    image = np.full((H, W, 3), 30, np.uint8)
    image[:, :96] = 220
    coarse = np.zeros((H, W), bool)
    coarse[16:80, 19:83] = True
    solved = BilateralSolver(image).solve(coarse) > 0.5
    assert solved.any()
    result = refine_masks(image, coarse[None])
    assert 0.0 < result.iou[0] < 0.5
    assert result.refined.tolist() == [False]
    assert np.array_equal(result.masks[0], coarse)
    # A mask the solver erases (a speck) is kept too, and so is any refined mask under a stricter rule.
    speck = np.zeros((H, W), bool)
    speck[10:13, 100:103] = True
    erased = refine_masks(image, speck[None])
    assert erased.refined.tolist() == [False] and np.array_equal(erased.masks[0], speck)
    img, _, blocky = _ellipse_scene()
    strict = refine_masks(img, blocky[None], BilateralParams(min_iou=0.99))
    assert strict.refined.tolist() == [False] and np.array_equal(strict.masks[0], blocky)


def test_large_images_are_solved_at_a_bounded_size():
    img, obj, coarse = _ellipse_scene()
    big = np.kron(img, np.ones((2, 2, 1), dtype=np.uint8))  # (192, 256, 3)
    big_coarse = np.kron(coarse, np.ones((2, 2), dtype=int)).astype(bool)
    big_obj = np.kron(obj, np.ones((2, 2), dtype=int)).astype(bool)
    result = refine_masks(big, big_coarse[None], BilateralParams(max_side=128))  # solved at 96 x 128
    assert result.masks.shape == (1, 192, 256)
    assert mask_iou(result.masks[0], big_obj) >= mask_iou(big_coarse, big_obj) + 0.2


def test_yuv_and_bad_inputs():
    yuv = rgb_to_yuv(np.array([[[255, 255, 255], [0, 0, 0]]], np.uint8))
    np.testing.assert_allclose(yuv[0, 0], [255, 128, 128], atol=1e-3)
    np.testing.assert_allclose(yuv[0, 1], [0, 128, 128], atol=1e-3)
    with pytest.raises(UsageError, match="do not fit"):
        refine_masks(np.zeros((8, 8, 3), np.uint8), np.zeros((1, 8, 9), bool))
    with pytest.raises(UsageError, match="lam"):
        BilateralParams(lam=0)


def test_refine_option_is_checked_and_keyed():
    with pytest.raises(UsageError) as err:
        SegmentConfig(refine="bogus")
    assert "--refine" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UsageError, match="lam"):
        SegmentConfig(refine="bilateral", refine_lam=float("nan"))
    plain = SegmentConfig(method="tokencut").describe()
    assert "refine" not in plain  # unrefined settings (and keys) are those of runs made before the option
    refined = SegmentConfig(method="tokencut", refine="bilateral").describe()
    assert refined == {**plain, "refine": "bilateral", "refine_lam": 128.0}
    assert SegmentConfig(refine="bilateral", refine_lam=32).bilateral_params() == BilateralParams(lam=32.0)


# ------------------------------------------------------------------------------------------------ segment and CLI
def _photos(folder: Path) -> list[Path]:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate([(40, 56), (48, 36)]):
        img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
        img[h // 4 : 3 * h // 4, w // 5 : 3 * w // 5] = (220, 180, 40)
        p = folder / f"p{i}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("method", ["dino", "tokencut", "maskcut"])
def test_segment_refines_every_method_at_the_photo_size(tmp_path, ckpt, method):
    photos = _photos(tmp_path / "in")
    model = resolve_model(str(ckpt))
    seg = SegmentConfig(method=method, refine="bilateral", max_masks=2)
    info = segment_images(photos, model, tmp_path / "out", SegmentRunConfig(segment=seg, size=32, progress=False))
    assert info["processed"] == 2 and info["settings"]["refine"] == "bilateral"
    for p in photos:
        rec = json.loads((tmp_path / "out" / "images" / f"{p.stem}.json").read_text())
        for m in rec["masks"]:
            assert np.asarray(Image.open(tmp_path / "out" / m["file"])).shape == (rec["height"], rec["width"])


def test_cli_refine_writes_masks_and_never_mixes_with_unrefined_runs(tmp_path, ckpt, capsys):
    _photos(tmp_path / "in")
    out = tmp_path / "out"
    base = ["segment", str(tmp_path / "in"), "--out", str(out), "-c", str(ckpt), "--img-size", "32",
            "--method", "tokencut", "--no-progress"]  # fmt: skip
    assert main([*base, "--refine", "bilateral"]) == 0
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["refine"] == "bilateral" and settings["refine_lam"] == 128.0
    assert len(list((out / "masks").glob("*.png"))) == 2
    for name in ("p0", "p1"):
        assert json.loads((out / "images" / f"{name}.json").read_text())["settings"]["refine"] == "bilateral"
    assert main([*base, "--refine", "bilateral", "--skip-existing"]) == 0  # the same run resumes
    capsys.readouterr()
    assert main([*base, "--skip-existing"]) == 1  # unrefined into a refined folder: other settings
    err = capsys.readouterr().err.strip()
    assert "other settings" in err and len(err.splitlines()) == 1
    assert main([*base, "--refine", "none", "--overwrite"]) == 0
    assert "refine" not in json.loads((out / "run.json").read_text())["settings"]
    assert main([*base, "--refine", "bilateral", "--skip-existing"]) == 1  # and the other way round


def test_weights_can_recommend_the_refinement(tmp_path):
    torch.manual_seed(0)
    rec = {"method": "tokencut", "img_size": 32, "refine": "bilateral"}
    weights = save_model(create_model("crate_test_patch8_32"), tmp_path / "w", metadata={"segment": rec}).parent
    assert recommended_settings(resolve_model(str(weights))) == rec
    _photos(tmp_path / "in")
    base = ["segment", str(tmp_path / "in"), "-c", str(weights), "--no-progress", "--no-overlay"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "run.json").read_text())["settings"]["refine"] == "bilateral"
    assert main([*base, "--out", str(tmp_path / "b"), "--refine", "none"]) == 0  # a flag wins
    assert "refine" not in json.loads((tmp_path / "b" / "run.json").read_text())["settings"]

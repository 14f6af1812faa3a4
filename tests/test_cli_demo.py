"""``crate-vis demo``: the sample photos (attention, segmentation, heads) and the scored synthetic images."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from crate_vis import create_model, save_model
from crate_vis.cli import main
from crate_vis.experiments.demo import SAMPLE_DIR, sample_images


def test_sample_photos_ship_with_their_licences():
    photos = sample_images()
    assert [p.name for p in photos] == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    readme = (SAMPLE_DIR / "README.md").read_text()
    assert all(p.name in readme for p in photos) and "CC0" in readme and "public domain" in readme


def test_demo_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    save_model(create_model("crate_test_patch8_32"), tmp_path / "model")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--images", "3", "--checkpoint", str(tmp_path / "model"),
                 "--synthetic-checkpoint", str(tmp_path / "model")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    for cmd in ("$ crate-vis attention", "$ crate-vis segment", "$ crate-vis score", "$ crate-vis heads"):
        assert cmd in printed
    # part 1: every sample photo has its attention figure and its overlay at the photo's own size
    for photo in sample_images():
        assert (out / "photos" / "attention" / f"{photo.stem}.png").stat().st_size > 10_000
        with Image.open(out / "photos" / "segment" / "overlays" / f"{photo.stem}.png") as im, Image.open(photo) as src:
            assert im.size == src.size
    assert (out / "photos" / "heads.png").stat().st_size > 10_000
    # part 2: the printed scores are those of the segmentation on disk, scored again from the library
    from crate_vis.experiments.score import ScoreConfig, score_predictions

    gt = out / "synthetic" / "images" / "annotations" / "instances_val.json"
    ref = score_predictions(out / "synthetic" / "segment", gt, ScoreConfig(protocol="jaccard"))
    assert f"{ref['mean']:.4f}" in printed and ref["n_images"] == 3
    results = json.loads((out / "synthetic" / "segment" / "results.json").read_text())
    assert {r["image_id"] for r in results} <= {1, 2, 3}


def test_demo_rejects_no_images(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--images", "0"]) == 1
    assert "--images must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--no-photos", "--no-synthetic"])
def test_demo_parts_can_be_skipped(tmp_path, flag):
    torch.manual_seed(0)
    save_model(create_model("crate_test_patch8_32"), tmp_path / "m")
    assert main(["demo", "--out", str(tmp_path / "d"), "--images", "2", flag, "-c", str(tmp_path / "m"),
                 "--synthetic-checkpoint", str(tmp_path / "m")]) == 0  # fmt: skip
    assert (tmp_path / "d" / "photos").exists() == (flag == "--no-synthetic")


def test_demo_segments_with_the_settings_the_weights_recommend(tmp_path):
    """Without --method, the demo segments as `crate-vis segment` does without flags: the weights' own settings."""
    torch.manual_seed(0)
    rec = {"method": "maskcut", "layer": 1, "img_size": 48, "tau": 0.1, "max_masks": 1, "refine": "bilateral"}
    save_model(create_model("crate_test_patch8_32"), tmp_path / "model", metadata={"segment": rec})
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--checkpoint", str(tmp_path / "model"), "--no-synthetic"]) == 0
    settings = json.loads((out / "photos" / "segment" / "run.json").read_text())["settings"]
    assert {k: settings[k] for k in rec} == rec
    assert main(["demo", "--out", str(tmp_path / "d2"), "--checkpoint", str(tmp_path / "model"), "--no-synthetic",
                 "--method", "dino"]) == 0  # fmt: skip
    settings = json.loads((tmp_path / "d2" / "photos" / "segment" / "run.json").read_text())["settings"]
    assert (settings["method"], settings["layer"], settings.get("refine", "none")) == (
        "dino", 1, "bilateral")  # a flag wins; the rest stays recommended, as in `crate-vis segment`

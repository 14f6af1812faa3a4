"""Weights that recommend settings (``metadata.segment``) get them in ``segment``, ``attention`` and ``heads``
when no flag is given; a flag still wins."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crate_vis import create_model, save_model
from crate_vis.experiments.attention import AttentionConfig, attention_figures, image_attention
from crate_vis.io.images import load_image
from crate_vis.models import recommended_settings, resolve_model

RECOMMENDED = {"method": "tokencut", "layer": 1, "img_size": 48}


@pytest.fixture()
def recommending(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    weights = save_model(create_model("crate_test_patch8_32"), tmp_path / "w", metadata={"segment": RECOMMENDED})
    photo = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(photo)
    return weights.parent, photo


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crate_vis", *args], capture_output=True, text=True, timeout=300)


def test_the_weights_carry_their_settings(recommending):
    weights, _ = recommending
    assert recommended_settings(resolve_model(str(weights))) == RECOMMENDED
    assert recommended_settings(create_model("crate_test_patch8_32")) == {}


def test_segment_without_flags_uses_them_and_a_flag_wins(recommending, tmp_path):
    weights, photo = recommending
    assert _cli("segment", str(photo), "-c", str(weights), "--out", str(tmp_path / "a"), "--no-progress").returncode == 0
    settings = json.loads((tmp_path / "a" / "run.json").read_text())["settings"]
    assert (settings["method"], settings["layer"], settings["img_size"]) == ("tokencut", 1, 48)
    res = _cli("segment", str(photo), "-c", str(weights), "--out", str(tmp_path / "b"), "--no-progress",
               "--method", "dino", "--layer", "0", "--img-size", "32")  # fmt: skip
    assert res.returncode == 0, res.stderr
    settings = json.loads((tmp_path / "b" / "run.json").read_text())["settings"]
    assert (settings["method"], settings["layer"], settings["img_size"]) == ("dino", 0, 32)


def test_attention_uses_the_recommended_layer_and_size(recommending, tmp_path):
    weights, photo = recommending
    model = resolve_model(str(weights))
    attention_figures([photo], model, tmp_path / "fig", AttentionConfig(save_maps=True))
    saved = np.load(tmp_path / "fig" / "maps" / "p.npy")
    # short side 64 -> 48: input 48x60, a 6x7 grid (60 is cropped to 56)
    expected = image_attention(model, load_image(photo), layer=1, size=48).attn.numpy()
    assert saved.shape == expected.shape == (model.num_heads, 6, 7)
    np.testing.assert_array_equal(saved, expected)
    attention_figures([photo], model, tmp_path / "last", AttentionConfig(save_maps=True, layer=-1, size=32))
    last = image_attention(model, load_image(photo), layer=-1, size=32).attn.numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "last" / "maps" / "p.npy"), last)


def test_heads_records_the_recommended_layer(recommending, tmp_path):
    weights, photo = recommending
    scores = tmp_path / "scores.json"
    res = _cli("heads", str(photo), "-c", str(weights), "--out", str(tmp_path / "h.png"), "--scores-out", str(scores))
    assert res.returncode == 0, res.stderr
    assert json.loads(scores.read_text())["layer"] == 1

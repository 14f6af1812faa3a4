"""``crate-vis analyze`` on a few generated images: CSV values against the Python API, figures, bad files."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from crate_vis import create_model, save_model
from crate_vis.cli import main
from crate_vis.data.image_geometry import prepare_image
from crate_vis.whitebox import LayerStatsAccumulator, measure_layers


def prepare_square(image, patch, side):
    """analyze's input: the short side resized to ``side``, a centred square cut out (the one geometry module)."""
    return prepare_image(image, patch, side, fit="center", max_side=None).tensor



@pytest.fixture()
def image_tree(tmp_path):
    """An ImageFolder tree of 5 small photos of odd sizes and one broken file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    sizes = [(40, 30), (33, 47), (32, 32), (64, 36), (50, 50)]
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = root / ("a" if i % 2 else "b") / f"img{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    (root / "a" / "broken.jpg").write_bytes(b"not an image")
    return root, sorted(paths)


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_analyze_cli_matches_api(tmp_path, image_tree, capsys):
    root, paths = image_tree
    torch.manual_seed(0)
    model = create_model("crate_test_patch8_32").eval()
    ckpt = save_model(model, tmp_path / "ckpt")
    out = tmp_path / "out"
    code = main(["analyze", "--checkpoint", str(ckpt), "--data", str(root), "--out", str(out),
                 "--img-size", "32", "--batch-size", "2", "--seed", "3"])  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err
    rows = _rows(out / "layers.csv")
    assert [(r["variant"], r["layer"]) for r in rows] == [(v, str(i)) for v in ("model", "random_init") for i in range(3)]
    assert all(r["n_images"] == "5" for r in rows)

    # Independent: the same preprocessing and measurements through the Python API, in one batch.
    x = torch.stack([prepare_square(Image.open(p).convert("RGB"), (8, 8), 32) for p in paths])
    torch.manual_seed(3)
    baseline = create_model("crate_test_patch8_32").eval()
    for variant, m in (("model", model), ("random_init", baseline)):
        acc = LayerStatsAccumulator()
        acc.update(measure_layers(m, x))
        got = [r for r in rows if r["variant"] == variant]
        for metric in ("coding_rate", "sparsity", "l1l2", "rate_reduction"):
            np.testing.assert_allclose([float(r[f"{metric}_mean"]) for r in got], acc.mean(metric), rtol=1e-5)
            np.testing.assert_allclose([float(r[f"{metric}_std"]) for r in got], acc.std(metric), rtol=1e-4)
    # The baseline differs from the model, and the figures are real PNGs.
    assert [r["coding_rate_mean"] for r in rows[:3]] != [r["coding_rate_mean"] for r in rows[3:]]
    for name in ("coding_rate.png", "sparsity.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 300
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind


def test_analyze_cli_max_images_and_failures(tmp_path, image_tree):
    root, _ = image_tree
    out = tmp_path / "o"
    assert main(["analyze", "--model", "crate_test_patch8_32", "--data", str(root), "--out", str(out),
                 "--max-images", "2", "--seed", "1"]) == 0  # fmt: skip
    assert all(r["n_images"] == "2" for r in _rows(out / "layers.csv"))
    # Nothing readable: non-zero exit and no outputs.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"garbage")
    assert main(["analyze", "--model", "crate_test_patch8_32", "--data", str(bad), "--out", str(tmp_path / "b")]) == 1
    assert not (tmp_path / "b" / "layers.csv").exists()
    # Size not divisible by the patch: a clear error, exit 1.
    assert main(["analyze", "--model", "crate_test_patch8_32", "--data", str(root), "--out", str(out),
                 "--img-size", "30"]) == 1  # fmt: skip
    with pytest.raises(ValueError, match="whole number of 8x8 patches"):
        prepare_square(Image.new("RGB", (20, 20)), (8, 8), 30)

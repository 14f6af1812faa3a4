"""``crate-vis attention`` and ``crate-vis heads`` on small generated images, for CRATE and a timm ViT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crate_vis.cli import main

CRATE = ["--model", "crate_test_patch8_32", "--dpi", "50"]  # low DPI: these tests check content, not looks
VIT = ["--model", "test_vit"]  # timm's small VisionTransformer test config: 2 heads, 6 layers, patch 16


def _write(path: Path, h: int, w: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 40, dtype=np.uint8)
    img[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = rng.integers(150, 256, 3)  # a bright object
    img += rng.integers(0, 30, img.shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


@pytest.fixture()
def photos(tmp_path: Path) -> dict[str, Path]:
    bad = tmp_path / "in" / "broken.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image at all")
    return {
        "wide": _write(tmp_path / "in" / "wide.png", 40, 72, 0),
        "tall": _write(tmp_path / "in" / "tall.png", 64, 36, 1),
        "bad": bad,
    }


@pytest.mark.parametrize("model", [CRATE, VIT], ids=["crate", "vit"])
def test_attention_figures_keep_the_aspect_ratio(photos, tmp_path: Path, model, capsys):
    out = tmp_path / "out"
    args = ["attention", str(photos["wide"]), str(photos["tall"]), str(photos["bad"]), "--out", str(out),
            "--img-size", "32", "--per-head", *model]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "2 processed, 1 skipped" in captured.out
    assert "broken.jpg" in captured.err  # the bad image is named where it is skipped
    assert (out / "wide.png").is_file() and (out / "tall.png").is_file()
    heads = 4 if model is CRATE else 2
    for name, size in (("wide", (72, 40)), ("tall", (36, 64))):
        files = sorted(p.name for p in (out / name).iterdir())
        assert len(files) == 2 * heads + 2
        for f in files:
            with Image.open(out / name / f) as im:
                assert im.size == size  # per-head overlays at the photo's own size and aspect ratio
    with Image.open(out / "wide.png") as im:
        assert im.size[0] > im.size[1]


def test_attention_pdf_and_layer_out_of_range(photos, tmp_path: Path, capsys):
    assert main(["attention", str(photos["wide"]), "--out", str(tmp_path / "o"), "--format", "pdf", "--layer", "0",
                 "--img-size", "32", *CRATE]) == 0  # fmt: skip
    assert (tmp_path / "o" / "wide.pdf").read_bytes().startswith(b"%PDF")
    assert main(["attention", str(photos["wide"]), "--out", str(tmp_path / "o"), "--layer", "7", *CRATE]) == 1
    assert "layers 0..2" in capsys.readouterr().err


def test_attention_exits_non_zero_when_nothing_could_be_read(photos, tmp_path: Path, capsys):
    assert main(["attention", str(photos["bad"]), "--out", str(tmp_path / "o"), *CRATE]) == 1
    assert "0 processed, 1 skipped" in capsys.readouterr().out


def test_attention_same_names_in_different_folders(tmp_path: Path):
    from crate_vis.io.segment_output import output_names

    # one naming rule for every command: parent folders joined by "__" only where stems clash
    a, b = _write(tmp_path / "ants" / "x.png", 32, 32, 0), _write(tmp_path / "bees" / "x.png", 32, 32, 1)
    assert output_names([a, b, tmp_path / "y.png"]) == ["ants__x", "bees__x", "y"]


def test_heads_crate_vs_vit_in_one_figure(photos, tmp_path: Path, capsys):
    fig = tmp_path / "heads.png"
    scores = tmp_path / "scores.json"
    args = ["heads", str(tmp_path / "in"), "--out", str(fig), "--img-size", "32", "--heads", "0,1",
            "--scores-out", str(scores), *CRATE, *VIT]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr()
    assert "crate_test_patch8_32, layer 2" in out.out and "test_vit, layer 5" in out.out
    assert "2 processed, 1 skipped" in out.out and "broken.jpg" in out.err
    with Image.open(fig) as im:
        assert im.size[0] > im.size[1]
    data = json.loads(scores.read_text())
    assert [r["head"] for r in data["crate_test_patch8_32"]["overall"]] == [0, 1]
    assert {"consistency", "share"} <= set(data["test_vit"]["overall"][0])
    # --separate: one figure per model.
    assert main([*args[:3], str(tmp_path / "sep.pdf"), "--separate", "--img-size", "32", *CRATE, *VIT]) == 0
    assert (tmp_path / "sep_crate_test_patch8_32.pdf").is_file()
    assert (tmp_path / "sep_test_vit.pdf").is_file()


def test_heads_out_of_range_names_the_valid_range(photos, tmp_path: Path, capsys):
    assert main(["heads", str(photos["wide"]), "--out", str(tmp_path / "h.png"), "--heads", "0,9", *CRATE]) == 1
    assert "head 9 out of range: this layer has heads 0..3" in capsys.readouterr().err
    assert main(["heads", str(photos["wide"]), "--out", str(tmp_path / "h.png"), "--heads", "a,b", *CRATE]) == 1
    assert "comma-separated" in capsys.readouterr().err


def test_heads_by_class_with_coco_ground_truth(tmp_path: Path, capsys):
    root = tmp_path / "folder"
    files = [_write(root / c / f"{c}{i}.png", 40, 56, 10 * j + i) for j, c in enumerate(["cat", "dog"]) for i in range(3)]
    # A COCO json whose single object is the bright rectangle of each image.
    images, anns = [], []
    for i, f in enumerate(files):
        images.append({"id": i + 1, "file_name": f.name, "height": 40, "width": 56})
        x0, y0, x1, y1 = 56 // 3, 40 // 4, 2 * 56 // 3, 3 * 40 // 4
        poly = [x0, y0, x1, y0, x1, y1, x0, y1]
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "segmentation": [poly], "iscrowd": 0,
                     "area": float((x1 - x0) * (y1 - y0)), "bbox": [x0, y0, x1 - x0, y1 - y0]})  # fmt: skip
    gt = tmp_path / "instances.json"
    gt.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "obj"}]}))
    fig = tmp_path / "by_class.png"
    scores = tmp_path / "s.json"
    import torch

    from crate_vis import create_model, save_model

    torch.manual_seed(0)
    weights = tmp_path / "weights"
    save_model(create_model("crate_test_patch8_32"), weights)
    assert main(["heads", str(root), "--by-class", "--per-class", "2", "--gt", str(gt), "--out", str(fig),
                 "--img-size", "32", "--scores-out", str(scores), "--checkpoint", str(weights)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "class cat" in out and "class dog" in out
    data = json.loads(scores.read_text())
    assert len(data["images"]) == 4
    row = data["crate_test_patch8_32"]["overall"][0]
    # the same number from the library: head 0's attention mass on the object, averaged over the four images
    from crate_vis import load_model
    from crate_vis.experiments.attention import image_attention
    from crate_vis.groundtruth import open_dataset
    from crate_vis.io.images import load_image
    from crate_vis.metrics import attention_mass_inside

    model = load_model(weights)
    ds = open_dataset(gt)
    masses = []
    for name in data["images"]:
        res = image_attention(model, load_image(name), size=32)
        image_id = next(i for i in ds.image_ids if ds.image_path(i).name == Path(name).name)
        on_grid = torch.from_numpy(res.prepared.geometry.mask_fraction(ds.foreground(image_id)) >= 0.5)
        masses.append(float(attention_mass_inside(res.attn[:1], on_grid)[0]))
    assert row["mass_in"] == pytest.approx(np.nanmean(masses), abs=1e-6)
    assert fig.is_file()


def test_select_images_spreads_and_groups(tmp_path: Path):
    from crate_vis.experiments.heads import select_images
    from crate_vis.segmentation.run import parse_heads

    for c in ("a", "b"):
        for i in range(5):
            _write(tmp_path / c / f"{i}.png", 8, 8, i)
    flat = select_images([str(tmp_path)], by_class=False, per_class=2, max_images=3)
    assert [p.relative_to(tmp_path).as_posix() for p, _ in flat] == ["a/0.png", "a/4.png", "b/4.png"]
    grouped = select_images([str(tmp_path)], by_class=True, per_class=2, max_images=3)
    assert [(p.name, c) for p, c in grouped] == [("0.png", "a"), ("4.png", "a"), ("0.png", "b"), ("4.png", "b")]
    assert parse_heads("0, 1,3") == (0, 1, 3) and parse_heads(None) is None


def test_heads_takes_checkpoint_folders_as_models(photos, tmp_path: Path, capsys, tiny_crate):
    from crate_vis import save_model

    folder = tmp_path / "trained_crate"
    save_model(tiny_crate, folder)
    fig = tmp_path / "ckpt.png"
    scores = tmp_path / "s.json"
    assert main(["heads", str(photos["wide"]), "--out", str(fig), "--img-size", "32", "--model", str(folder),
                 "--model", "crate_test_patch8_32", "--dpi", "50", "--scores-out", str(scores)]) == 0  # fmt: skip
    assert fig.is_file()
    # The same architecture twice: the labels are made distinct.
    assert {"crate_test_patch8_32", "crate_test_patch8_32 #2"} <= set(json.loads(scores.read_text()))
    # A single checkpoint cannot go with two models.
    assert main(["heads", str(photos["wide"]), "--out", str(fig), "--checkpoint", str(folder), *CRATE, *VIT]) == 1
    assert "--checkpoint goes with a single --model" in capsys.readouterr().err


def test_heads_on_real_coco_photos_with_their_annotations(coco128_root, tmp_path: Path, capsys):
    gt = coco128_root / "annotations" / "instances_train2017.json"
    scores = tmp_path / "s.json"
    assert main(["heads", str(coco128_root / "train2017"), "--max-images", "2", "--gt", str(gt), "--out",
                 str(tmp_path / "coco.png"), "--img-size", "32", "--scores-out", str(scores), *CRATE]) == 0  # fmt: skip
    rows = json.loads(scores.read_text())["crate_test_patch8_32"]["overall"]
    assert len(rows) == 4 and all(0.0 <= r["iou"] <= 1.0 and 0.0 <= r["mass_in"] <= 1.0 for r in rows)

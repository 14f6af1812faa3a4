"""``crate-vis segment``: outputs, names and ids, COCO results, bad inputs, kill safety and --skip-existing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crate_vis.cli import main
from crate_vis.data.image_geometry import prepare_image
from crate_vis.data.transforms import to_tensor
from crate_vis.hooks import cls_attention_maps
from crate_vis.io.coco import rle_to_mask as decode_mask
from crate_vis.models import load_model
from crate_vis.segmentation.dino import dino_foreground

REPO = Path(__file__).resolve().parents[1]


def _write_images(folder: Path, sizes, seed=0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[:h, :w]
        img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
        blob = (yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 4) ** 2
        img[blob] = rng.integers(150, 255, 3)
        p = folder / f"img{i:02d}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_segment_dino_outputs(tmp_path, ckpt):
    a = _write_images(tmp_path / "in" / "a", [(40, 56), (48, 36)])
    b = _write_images(tmp_path / "in" / "b", [(33, 41)])  # b/img00.png clashes with a/img00.png by stem
    (tmp_path / "in" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(tmp_path / "in" / "b" / "small.png")
    out = tmp_path / "out"
    code = main(["segment", str(tmp_path / "in"), "--out", str(out), "--checkpoint", str(ckpt), "--device", "cpu"])
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["processed"] == 3 and run["skipped"] == 2
    reasons = {Path(f["path"]).name: f["reason"] for f in run["failures"]}
    assert "smaller than one 8x8 patch" in reasons["small.png"]
    names = sorted(p.stem for p in (out / "images").glob("*.json"))
    assert names == ["a__img00", "b__img00", "img01"]  # only clashing stems are lengthened

    model = load_model(ckpt)

    results = json.loads((out / "results.json").read_text())
    images = {im["id"]: im for im in json.loads((out / "images.json").read_text())}
    for path, name in zip((*a, *b), ("a__img00", "img01", "b__img00")):
        rec = json.loads((out / "images" / f"{name}.json").read_text())
        image = Image.open(path).convert("RGB")
        assert (rec["height"], rec["width"]) == (image.height, image.width)
        assert images[rec["image_id"]]["file_name"] == f"{path.parent.name}/{path.name}"
        # Independent recomputation: model input at the model's training size (short side 32), DINO mask, mapped back.
        prep = prepare_image(image, 8, 32)
        x = prep.tensor[None]
        fg = dino_foreground(cls_attention_maps(model, x), 0.6)[0].numpy()
        expected = prep.grid_to_image(fg)
        mask_png = _png(out / rec["masks"][0]["file"])
        assert mask_png.shape == (image.height, image.width) and set(np.unique(mask_png)) <= {0, 255}
        np.testing.assert_array_equal(mask_png > 0, expected)
        mine = [r for r in results if r["image_id"] == rec["image_id"]]
        assert len(mine) == 1 and mine[0]["category_id"] == 1
        assert mine[0]["segmentation"]["size"] == [image.height, image.width]
        assert isinstance(mine[0]["segmentation"]["counts"], str)
        np.testing.assert_array_equal(decode_mask(mine[0]["segmentation"]), expected)
        ys, xs = np.nonzero(expected)
        assert mine[0]["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert 0.0 <= mine[0]["score"] <= 1.0
        overlay = _png(out / "overlays" / f"{name}.png")
        assert overlay.shape == (image.height, image.width, 3)


def test_segment_maskcut_coco_json_ids_and_image_root(tmp_path, ckpt):
    paths = _write_images(tmp_path / "pics", [(48, 64), (64, 48), (40, 40)])
    coco = {"images": [{"id": 7, "file_name": paths[0].name}, {"id": 42, "file_name": paths[1].name},
                       {"id": 9, "file_name": "missing.png"}], "annotations": [], "categories": []}  # fmt: skip
    ann = tmp_path / "ann" / "instances_val.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(coco))
    out = tmp_path / "out"
    args = ["segment", str(ann), "--image-root", str(tmp_path / "pics"), "--out", str(out), "--checkpoint",
            str(ckpt), "--method", "maskcut", "--img-size", "48", "--max-masks", "2", "-b", "2"]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["image_id"] for r in results} <= {7, 42} and results
    per_image = {}
    for r in results:
        per_image.setdefault(r["image_id"], []).append(decode_mask(r["segmentation"]))
    for ms in per_image.values():
        assert len(ms) <= 2
        if len(ms) == 2:
            assert not (ms[0] & ms[1]).any()  # MaskCut masks are disjoint
    rec = json.loads((out / "images" / f"{paths[0].stem}.json").read_text())
    assert rec["settings"]["tau"] == 0.15 and rec["geometry"]["input_hw"] == [48, 64] and rec["grid"] == [6, 8]
    assert json.loads((out / "run.json").read_text())["skipped"] == 1  # missing.png


@pytest.mark.slow  # importing timm alone takes seconds
def test_segment_tokencut_with_a_timm_vit(tmp_path):
    _write_images(tmp_path / "in", [(40, 50), (40, 50), (50, 40)])
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "in"), "--out", str(out), "--model", "vit_tiny_patch16_224",
            "--method", "tokencut", "--img-size", "48", "--no-overlay"]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 3 and not (out / "overlays").exists()
    rec = json.loads((out / "images" / "img00.json").read_text())
    assert rec["grid"] == [3, 3] and rec["settings"]["tau"] == 0.2 and len(rec["masks"]) == 1  # 48x60 -> 48x48


def test_square_input_maps_back_to_the_image(tmp_path, ckpt):
    (path,) = _write_images(tmp_path / "in", [(30, 70)])
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "in"), "--out", str(out), "--checkpoint", str(ckpt), "--square",
            "--img-size", "40", "--mass", "0.8"]  # fmt: skip
    assert main(args) == 0
    rec = json.loads((out / "images" / "img00.json").read_text())
    assert rec["geometry"]["input_hw"] == [40, 40] and rec["grid"] == [5, 5] and rec["settings"]["square"] is True
    image = Image.open(path).convert("RGB")
    x = to_tensor(image.resize((40, 40), Image.BICUBIC))[None]
    fg = dino_foreground(cls_attention_maps(load_model(ckpt), x), 0.8)[0].numpy()
    rows = np.floor((np.arange(30) + 0.5) * 40 / 30 / 8).astype(int)
    cols = np.floor((np.arange(70) + 0.5) * 40 / 70 / 8).astype(int)
    np.testing.assert_array_equal(_png(out / rec["masks"][0]["file"]) > 0, fg[rows[:, None], cols[None, :]])


def test_nothing_processed_is_an_error(tmp_path, ckpt):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"garbage")
    assert main(["segment", str(bad), "--out", str(tmp_path / "o"), "--checkpoint", str(ckpt)]) == 1
    assert main(["segment", str(tmp_path / "nothing"), "--out", str(tmp_path / "o2"), "--checkpoint", str(ckpt)]) == 1
    assert main(["segment", str(bad), "--strict", "--out", str(tmp_path / "o3"), "--checkpoint", str(ckpt)]) == 1


def test_skip_existing_only_with_the_same_settings(tmp_path, ckpt):
    _write_images(tmp_path / "in", [(40, 40), (48, 40)])
    out = tmp_path / "out"
    base = ["segment", str(tmp_path / "in"), "--out", str(out), "--checkpoint", str(ckpt)]
    assert main(base) == 0
    rec_path = out / "images" / "img00.json"
    stamp = rec_path.stat().st_mtime_ns
    time.sleep(0.01)
    assert main([*base, "--skip-existing"]) == 0
    assert rec_path.stat().st_mtime_ns == stamp  # skipped
    # other settings never mix into a folder: resuming with them is refused, overwriting recomputes everything
    assert main([*base, "--skip-existing", "--mass", "0.3"]) == 1
    assert json.loads(rec_path.read_text())["settings"]["mass"] == 0.6
    assert main([*base, "--overwrite", "--mass", "0.3"]) == 0
    assert json.loads(rec_path.read_text())["settings"]["mass"] == 0.3  # recomputed
    assert len(json.loads((out / "results.json").read_text())) == 2


@pytest.mark.slow  # a fresh interpreter importing torch: ~5-15 s on a loaded 2-core machine
def test_kill_and_resume(tmp_path, ckpt):
    paths = _write_images(tmp_path / "in", [(96, 120)] * 12)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "crate_vis", "segment", str(tmp_path / "in"), "--out", str(out), "--checkpoint",
           str(ckpt), "--method", "maskcut", "--img-size", "96", "--solver", "dense", "-b", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "images").is_dir() and any((out / "images").glob("*.json")):
                break
            time.sleep(0.02)
        was_running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert was_running, "the run finished before it could be interrupted"
    done_before = sorted(p.name for p in (out / "images").glob("*.json"))
    assert 1 <= len(done_before) < 12
    for p in out.rglob("*.json"):
        json.loads(p.read_text())  # every json on disk is complete
    # Resume: the finished images are skipped, the rest is done, results cover every image.
    stamps = {n: (out / "images" / n).stat().st_mtime_ns for n in done_before}
    assert main(cmd[3:] + ["--skip-existing"]) == 0
    assert all((out / "images" / n).stat().st_mtime_ns == t for n, t in stamps.items())
    results = json.loads((out / "results.json").read_text())
    ids = {im["id"] for im in json.loads((out / "images.json").read_text())}
    assert len(ids) == 12 and {r["image_id"] for r in results} <= ids
    assert len(list((out / "images").glob("*.json"))) == len(paths)
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporaries left behind


@pytest.mark.slow
def test_coco128_results_load_with_pycocotools(tmp_path, coco128_root, ckpt):
    from pycocotools.coco import COCO

    ann = coco128_root / "annotations" / "instances_train2017.json"
    data = json.loads(ann.read_text())
    data["images"] = data["images"][:4]
    keep = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    small = tmp_path / "annotations" / "instances_train2017.json"
    small.parent.mkdir()
    small.write_text(json.dumps(data))
    out = tmp_path / "out"
    args = ["segment", str(small), "--image-root", str(coco128_root / "train2017"), "--out", str(out),
            "--checkpoint", str(ckpt), "--method", "maskcut", "--img-size", "64"]  # fmt: skip
    assert main(args) == 0
    gt = COCO(str(small))
    dt = gt.loadRes(str(out / "results.json"))
    assert set(dt.getImgIds()) <= keep and len(dt.anns) > 0
    for a in dt.anns.values():
        im = gt.imgs[a["image_id"]]
        assert a["segmentation"]["size"] == [im["height"], im["width"]]
        assert gt.annToMask(a).shape == (im["height"], im["width"]) or dt.annToMask(a).shape == (im["height"], im["width"])


def test_collect_inputs_names_ids_and_dedup(tmp_path):
    from crate_vis.experiments.segment import collect_inputs
    from crate_vis.io.images import SkipReport

    for sub, name in [("a", "img.png"), ("b", "img.png"), ("b", "q.png"), ("b", "q.jpg")]:
        (tmp_path / sub).mkdir(exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / sub / name)
    report = SkipReport(stream=None)
    items = collect_inputs([str(tmp_path), str(tmp_path / "a" / "img.png"), str(tmp_path / "nope")], None, report)
    assert [it.name for it in items] == ["a__img", "b__img", "q_jpg", "q_png"]  # the repeated file once
    assert [it.image_id for it in items] == [1, 2, 3, 4]
    assert [it.file_name for it in items] == ["a/img.png", "b/img.png", "b/q.jpg", "b/q.png"]
    assert len(report.failures) == 1 and report.failures[0][1] == "no such file or folder"


def test_options_of_another_method_are_rejected(tmp_path, ckpt, capsys):
    _write_images(tmp_path / "in", [(32, 32)])
    base = ["segment", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--checkpoint", str(ckpt)]
    assert main([*base, "--method", "maskcut", "--mass", "0.5"]) == 1
    assert "--mass applies to --method dino" in capsys.readouterr().err
    assert main([*base, "--tau", "0.3"]) == 1
    assert main([*base, "--method", "tokencut", "--max-masks", "2"]) == 1
    assert not (tmp_path / "o").exists()


def test_rle_round_trip_and_result_entries(tmp_path):
    from pycocotools import mask as mask_utils

    from crate_vis.io.coco import mask_to_rle as encode_mask
    from crate_vis.io.coco import read_results, result_entry, rle_area, write_results
    from crate_vis.segmentation.masks import mask_bbox

    m = np.zeros((5, 9), bool)
    m[1:4, 2:7] = True
    m[4, 8] = True
    rle = encode_mask(m)
    assert rle["size"] == [5, 9] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(decode_mask(rle), m)
    # Uncompressed RLE (column-major run lengths starting with zeros) decodes to the same mask.
    flat = m.T.ravel()
    runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, flat.astype(int), -1]) != 0))
    counts = ([0] if flat[0] else []) + runs.tolist()
    np.testing.assert_array_equal(decode_mask({"size": [5, 9], "counts": counts}), m)
    entry = result_entry(3, m, 0.25)
    assert entry["bbox"] == mask_bbox(m) == [2.0, 1.0, 7.0, 4.0]
    assert entry["area"] == rle_area(rle) == m.sum() == int(mask_utils.area(mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))))
    assert write_results(tmp_path / "r.json", [entry]) == 1
    assert read_results(tmp_path / "r.json")[0]["segmentation"] == rle
    with pytest.raises(ValueError):
        write_results(tmp_path / "bad.json", [{"image_id": 1}])

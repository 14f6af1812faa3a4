"""`crate-vis score` (and the COCO reading it shares with `segment`) refuses bad input in one line, before any number
is computed: ids of the wrong type, json nested too deeply or not json at all, broken ground-truth boxes and
polygons, a segmentation output that lost its image index, masks of another size, an --output that cannot be
written. A perfect prediction still scores exactly 1.

Tiny and quick: three 24x40 images with one object each, built here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crate_vis.cli import main
from crate_vis.errors import DatasetError
from crate_vis.io.coco import mask_bbox, mask_to_rle
from crate_vis.io.jsonfile import read_json
from crate_vis.io.segment_output import ImageRecord, write_image, write_summary

H, W = 24, 40
NAMES = [f"im{k}.png" for k in range(3)]


def _object(k: int) -> np.ndarray:
    """One object in a different, non-overlapping place of each image."""
    m = np.zeros((H, W), bool)
    m[2 + 10 * (k % 2) : 10 + 10 * (k % 2), 2 + 12 * k : 12 + 12 * k] = True
    return m


def _gt_dict(ids: list) -> dict:
    images = [{"id": i, "file_name": NAMES[k], "height": H, "width": W} for k, i in enumerate(ids)]
    anns = [{"id": k + 1, "image_id": i, "category_id": 1, "segmentation": mask_to_rle(_object(k)),
             "bbox": mask_bbox(_object(k)), "area": float(_object(k).sum()), "iscrowd": 0}
            for k, i in enumerate(ids)]  # fmt: skip
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}


def _write_gt(tmp_path: Path, data: dict | None = None, name: str = "gt.json", ids: list | None = None) -> Path:
    for n in NAMES:
        if not (tmp_path / n).exists():
            Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / n)
    path = tmp_path / name
    path.write_text(json.dumps(data if data is not None else _gt_dict(ids or [2, 3, 1])))
    return path


def _results(ids: list) -> list[dict]:
    """Perfect detections under the ground truth's own ids."""
    return [{"image_id": i, "category_id": 1, "segmentation": mask_to_rle(_object(k)), "score": 0.9}
            for k, i in enumerate(ids)]  # fmt: skip


def _segment_output(out: Path, ids: list | None = None) -> Path:
    """A perfect prediction in `crate-vis segment`'s layout, under its own ids 1..3 (the ground truth's are 2, 3, 1:
    a pairing by id scores each mask against another image's object)."""
    geo = {"original_hw": [H, W], "resized_hw": [H, W], "input_hw": [H, W], "patch_size": [1, 1], "fit": "crop"}
    records = []
    for k, (name, i) in enumerate(zip(NAMES, ids or [1, 2, 3])):
        rec = ImageRecord(Path(name), Path(name).stem, i, name)
        records.append(write_image(out, rec, _object(k)[None], np.array([0.9]), geometry=geo, grid=(H, W),
                                   settings_id="test"))  # fmt: skip
    write_summary(out, records, {"settings_key": "test"})
    return out


def _refused(capsys, *args: str) -> str:
    """The one line `score` prints when it refuses."""
    assert main(["score", *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _score(capsys, *args: str) -> dict:
    assert main(["score", *args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------ 1: image id types
@pytest.mark.parametrize("bad", [[2], {"a": 2}, True, 2.0, None], ids=["list", "dict", "bool", "float", "null"])
def test_an_image_id_of_the_wrong_type_is_refused_by_score_and_segment(tmp_path, capsys, bad):
    from crate_vis.experiments.segment import collect_inputs

    data = _gt_dict([2, 3, 1])
    data["images"][1]["id"] = bad
    gt = _write_gt(tmp_path, data)
    res = tmp_path / "res.json"
    res.write_text(json.dumps(_results([2, 3, 1])))
    for protocol in ("coco", "corloc", "jaccard"):
        err = _refused(capsys, "--pred", str(res if protocol != "jaccard" else tmp_path), "--gt", str(gt),
                       "--protocol", protocol)  # fmt: skip
        assert f"{gt}: images[1]: id must be an integer or a string, got {bad!r}" in err
    with pytest.raises(DatasetError) as segment_err:  # segment's reader: the same rule, the same message
        collect_inputs([gt])
    assert f"{gt}: images[1]: id must be an integer or a string, got {bad!r}" == str(segment_err.value)


@pytest.mark.parametrize("field", ["id", "image_id", "category_id"])
def test_annotation_ids_of_the_wrong_type_are_refused(tmp_path, capsys, field):
    data = _gt_dict([2, 3, 1])
    data["annotations"][0][field] = [data["annotations"][0][field]]
    gt = _write_gt(tmp_path, data)
    res = tmp_path / "res.json"
    res.write_text(json.dumps(_results([2, 3, 1])))
    err = _refused(capsys, "--pred", str(res), "--gt", str(gt))
    assert str(gt) in err and "annotations[0]" in err and "must be an integer or a string" in err


def test_a_detection_id_of_the_wrong_type_is_refused(tmp_path, capsys):
    gt = _write_gt(tmp_path)
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{**_results([2])[0], "image_id": [2]}]))
    for protocol in ("coco", "corloc"):
        err = _refused(capsys, "--pred", str(res), "--gt", str(gt), "--protocol", protocol, "--allow-missing")
        assert f"{res}[0]" in err and "image_id must be an integer or a string, got [2]" in err


# --------------------------------------------------------------------------------------- 2: the one json reader
DEEP = b"[" * 100_000 + b"]" * 100_000


def test_read_json_names_the_file_and_where_it_broke(tmp_path):
    p = tmp_path / "x.json"
    cases = [
        (b'{"a": [1, 2],\n "b": }', "not valid JSON: Expecting value at line 2, column 7"),
        (b'{"a": "\xff"}', "not UTF-8 text: byte 0xff at line 1, column 8"),
        (b'{\n  "na\xc3\xafve": "\xfe"}', "not UTF-8 text: byte 0xfe at line 2, column 13"),
        (DEEP, "JSON nested too deeply to read"),
        (b"[" + b"9" * 5000 + b"]", "not valid JSON"),
        (b"", "not valid JSON: Expecting value at line 1, column 1"),
    ]
    for raw, message in cases:
        p.write_bytes(raw)
        with pytest.raises(DatasetError) as err:
            read_json(p, "ground truth")
        assert str(err.value).startswith(f"{p}: ground truth: ") and message in str(err.value), str(err.value)
        assert "\n" not in str(err.value)
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}')  # a byte-order mark, as some editors write
    assert read_json(p) == {"a": 1}
    with pytest.raises(DatasetError, match="not found"):
        read_json(tmp_path / "missing.json")
    with pytest.raises(DatasetError, match="is a folder"):
        read_json(tmp_path)


def test_every_json_score_reads_goes_through_the_one_reader(tmp_path, capsys):
    gt = _write_gt(tmp_path)
    deep = tmp_path / "deep.json"
    deep.write_bytes(DEEP)
    # the ground truth, as --gt of each protocol
    for protocol in ("coco", "corloc", "jaccard"):
        err = _refused(capsys, "--pred", str(tmp_path), "--gt", str(deep), "--protocol", protocol)
        assert str(deep) in err and "nested too deeply" in err
    # a results json
    for protocol in ("coco", "corloc"):
        err = _refused(capsys, "--pred", str(deep), "--gt", str(gt), "--protocol", protocol)
        assert str(deep) in err and "nested too deeply" in err
    # a segmentation output's index, and its records when the index is missing
    seg = _segment_output(tmp_path / "seg")
    (seg / "images.json").write_bytes(DEEP)
    err = _refused(capsys, "--pred", str(seg), "--gt", str(gt))
    assert str(seg / "images.json") in err and "nested too deeply" in err
    (seg / "images.json").write_bytes(b'[{"id": 1, "file_name": "im0.png"},')
    err = _refused(capsys, "--pred", str(seg), "--gt", str(gt))
    assert str(seg / "images.json") in err and "not valid JSON" in err and "line 1, column" in err
    (seg / "images.json").unlink()
    (seg / "images" / "im1.json").write_bytes(DEEP)
    err = _refused(capsys, "--pred", str(seg), "--gt", str(gt))
    assert str(seg / "images" / "im1.json") in err and "nested too deeply" in err


def test_a_panoptic_json_goes_through_the_one_reader(tmp_path):
    from crate_vis.groundtruth import COCOPanopticDataset

    p = tmp_path / "panoptic.json"
    p.write_bytes(b'{"images": [], "annotations": [{"segments_info": \xff}]}')
    with pytest.raises(DatasetError, match="not UTF-8"):
        COCOPanopticDataset(p)
    p.write_text(json.dumps({"images": [{"id": [1], "width": 4, "height": 4, "file_name": "a.png"}],
                             "annotations": [], "categories": []}))  # fmt: skip
    with pytest.raises(DatasetError, match=r"images\[0\]: id must be an integer or a string"):
        COCOPanopticDataset(p)


# ------------------------------------------------------------------------------------ 3: ground-truth boxes
@pytest.mark.parametrize(
    "box",
    [[float("nan"), 2, 10, 8], [2, 2, float("inf"), 8], [2, 2, -10, 8], [2, 2, 10, -8], [2, 2, 10], [2, 2, 10, 8, 1],
     [2, 2, "10", 8], "2 2 10 8", None],
    ids=["nan", "inf", "negative-w", "negative-h", "three", "five", "string-number", "string", "null"],
)  # fmt: skip
def test_broken_ground_truth_boxes_are_refused_not_scored(tmp_path, capsys, box):
    """Before: COCO bbox AP 0.2525 or CorLoc 0.67 of a perfect prediction, without a word."""
    data = _gt_dict([2, 3, 1])
    data["annotations"][1]["bbox"] = box
    gt = _write_gt(tmp_path, data)
    res = tmp_path / "res.json"
    res.write_text(json.dumps(_results([2, 3, 1])))
    for protocol in ("coco", "corloc"):
        err = _refused(capsys, "--pred", str(res), "--gt", str(gt), "--protocol", protocol)
        assert f"{gt}: annotations[1] (id 2): bbox must be [x, y, w, h] of finite numbers with w, h >= 0" in err
        assert f"got {box!r}" in err


def test_broken_ground_truth_areas_and_crowd_flags_are_refused(tmp_path, capsys):
    res = tmp_path / "res.json"
    res.write_text(json.dumps(_results([2, 3, 1])))
    for field, value, message in [("area", float("nan"), "area must be a finite number >= 0, got nan"),
                                  ("area", -3, "area must be a finite number >= 0, got -3"),
                                  ("iscrowd", 2, "iscrowd must be 0 or 1, got 2")]:  # fmt: skip
        data = _gt_dict([2, 3, 1])
        data["annotations"][2][field] = value
        gt = _write_gt(tmp_path, data)
        assert f"{gt}: annotations[2] (id 3): {message}" in _refused(capsys, "--pred", str(res), "--gt", str(gt))


def test_a_missing_box_is_still_derived_and_a_perfect_prediction_scores_one(tmp_path, capsys):
    data = _gt_dict([2, 3, 1])
    for ann in data["annotations"]:
        del ann["bbox"], ann["area"], ann["iscrowd"]
    gt = _write_gt(tmp_path, data)
    res = tmp_path / "res.json"
    res.write_text(json.dumps(_results([2, 3, 1])))
    out = _score(capsys, "--pred", str(res), "--gt", str(gt))
    assert out["segm"]["AP"] == 1.0 and out["bbox"]["AP"] == 1.0
    assert _score(capsys, "--pred", str(res), "--gt", str(gt), "--protocol", "corloc")["corloc"] == 1.0


@pytest.mark.parametrize("bad", [[-1, 3], [H, W, 1], [H, "40"], 5], ids=["negative", "three", "string", "number"])
def test_an_rle_size_that_is_not_two_integers_is_refused(tmp_path, capsys, bad):
    data = _gt_dict([2, 3, 1])
    data["annotations"][0]["segmentation"] = {**data["annotations"][0]["segmentation"], "size": bad}
    gt = _write_gt(tmp_path, data)
    res = tmp_path / "res.json"
    res.write_text(json.dumps(_results([2, 3, 1])))
    err = _refused(capsys, "--pred", str(res), "--gt", str(gt))
    assert f"{gt}: annotations[0] (id 1): segmentation:" in err


@pytest.mark.parametrize("key, value", [("width", 0), ("height", -24), ("width", "40"), ("height", 24.5),
                                        ("file_name", 7)])  # fmt: skip
def test_image_sizes_and_names_of_the_wrong_kind_are_refused(tmp_path, capsys, key, value):
    data = _gt_dict([2, 3, 1])
    data["images"][0][key] = value
    gt = _write_gt(tmp_path, data)
    res = tmp_path / "res.json"
    res.write_text(json.dumps(_results([2, 3, 1])))
    err = _refused(capsys, "--pred", str(res), "--gt", str(gt))
    assert f"{gt}: images[0]: {key} must be" in err and repr(value) in err


# -------------------------------------------------------------------------------------------- 4: polygons
_CHILD = textwrap.dedent(
    """
    import contextlib, io, json, resource, sys
    from crate_vis.cli import main  # torch and pycocotools load before the limit
    import crate_vis.experiments.score, pycocotools.mask  # noqa: F401
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    limit = vm + (1 << 31)  # 2 GiB more than the interpreter holds now: rasterising a NaN polygon asks for ~22 GB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = []
    for gt in sys.argv[1:]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(["score", "--pred", gt.rsplit("/", 1)[0], "--gt", gt, "--protocol", "jaccard"])
        out.append([rc, err.getvalue()])
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to bound the child's memory")
def test_broken_polygons_are_refused_before_pycocotools_sees_them(tmp_path):
    """A NaN (or infinite, or far away) polygon point made pycocotools allocate ~22 GB or crash; run in a child
    whose address space is bounded, so a regression fails this test instead of taking the machine down."""
    pytest.importorskip("resource")
    square = [2.0, 2.0, 20.0, 2.0, 20.0, 20.0, 2.0, 20.0]
    cases = {
        "nan": ([[2.0, 2.0, float("nan"), 20.0, 30.0, 20.0, 30.0, 2.0]], "non-finite coordinate nan (number 2)"),
        "inf": ([square, [2.0, 2.0, 20.0, float("-inf"), 20.0, 20.0]], "polygon 1 holds the non-finite coordinate -inf"),
        "far": ([[2.0, 2.0, 1e9, 2.0, 20.0, 20.0]], "far outside the 24x40 image"),
        "string": ([[2.0, 2.0, "20", 2.0, 20.0, 20.0]], "polygon 0 is not a list of numbers"),
        "nested": ([[[2.0, 2.0], [20.0, 2.0], [20.0, 20.0]]], "polygon 0 is not a list of numbers"),
        "null": ([[2.0, 2.0, None, 2.0, 20.0, 20.0]], "polygon 0 is not a list of numbers"),
        "short": ([[2.0, 2.0, 20.0, 2.0]], "fewer than three points"),
        "odd": ([[2.0, 2.0, 20.0, 2.0, 20.0, 20.0, 2.0]], "odd number of coordinates"),
    }
    paths = []
    for name, (seg, _) in cases.items():
        data = _gt_dict([2, 3, 1])
        for ann in data["annotations"]:
            del ann["bbox"], ann["area"]  # derived from the segmentation: it is rasterised during validation
        data["annotations"][0]["segmentation"] = seg
        paths.append(_write_gt(tmp_path, data, f"gt_{name}.json"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _CHILD, *map(str, paths)], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (name, (_, message)), path, (rc, err) in zip(cases.items(), paths, json.loads(proc.stdout.splitlines()[-1])):
        assert rc == 1 and err.count("\n") == 1, (name, err)
        assert f"{path}: annotations[0] (id 1): segmentation: " in err and message in err, (name, err)


def test_a_polygon_slightly_outside_the_image_is_accepted(tmp_path, capsys):
    data = _gt_dict([2, 3, 1])
    box = data["annotations"][0]["bbox"]
    x0, y0, x1, y1 = box[0], box[1], box[0] + box[2], box[1] + box[3]
    data["annotations"][0]["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
    data["annotations"][1]["segmentation"] = [[-3.0, -2.0, W + 4.0, -2.0, W + 4.0, 5.0]]  # annotation tools allow it
    gt = _write_gt(tmp_path, data)
    res = tmp_path / "res.json"
    res.write_text(json.dumps([_results([2])[0]]))
    out = _score(capsys, "--pred", str(res), "--gt", str(gt), "--iou-type", "segm")
    assert out["segm"]["n_images"] == 3


# ----------------------------------------------------------------------------- 5: a segment output's image index
def test_a_segment_output_without_its_image_index_is_paired_by_file_name(tmp_path, capsys):
    """Before: AP 0.2 for a perfect prediction, its own ids taken for the ground truth's (which collide with them)."""
    gt = _write_gt(tmp_path, ids=[2, 3, 1])
    seg = _segment_output(tmp_path / "seg")
    with_index = _score(capsys, "--pred", str(seg), "--gt", str(gt))
    assert with_index["segm"]["AP"] == 1.0 and with_index["bbox"]["AP"] == 1.0
    (seg / "images.json").unlink()
    for pred in (seg, seg / "results.json"):
        res = _score(capsys, "--pred", str(pred), "--gt", str(gt))
        assert res["segm"]["AP"] == 1.0 and res["bbox"]["AP"] == 1.0
        assert _score(capsys, "--pred", str(pred), "--gt", str(gt), "--protocol", "corloc")["corloc"] == 1.0
    # detections of an image the records do not list are refused, as with the index
    (seg / "images" / "im2.json").unlink()
    err = _refused(capsys, "--pred", str(seg), "--gt", str(gt))
    assert f"{seg / 'results.json'}[2]: image_id 3 is not among the images the predictions list" in err


def test_a_segment_output_with_neither_index_nor_records_is_refused(tmp_path, capsys):
    gt = _write_gt(tmp_path, ids=[2, 3, 1])
    seg = _segment_output(tmp_path / "seg")
    (seg / "images.json").unlink()
    for rec in (seg / "images").glob("*.json"):
        rec.unlink()
    for pred in (seg, seg / "results.json"):
        for protocol in ("coco", "corloc") if pred.is_file() else ("coco",):
            err = _refused(capsys, "--pred", str(pred), "--gt", str(gt), "--protocol", protocol)
            assert str(seg) in err and "neither images.json nor per-image records" in err


def test_the_results_json_of_a_segment_output_is_paired_by_file_name_for_corloc(tmp_path, capsys):
    """Before: CorLoc took the output's own ids for the ground truth's (0.0 here, the objects swapped)."""
    gt = _write_gt(tmp_path, ids=[2, 3, 1])
    seg = _segment_output(tmp_path / "seg")
    assert _score(capsys, "--pred", str(seg / "results.json"), "--gt", str(gt), "--protocol", "corloc")["corloc"] == 1.0


@pytest.mark.parametrize(
    "edit, message",
    [(lambda e: [*e, {**e[0], "file_name": "im9.png"}], "a second image with id 1"),
     (lambda e: [{**e[0], "id": [1]}, *e[1:]], "[0]: id must be an integer or a string"),
     (lambda e: {"images": e}, "expected a list of images"),
     (lambda e: [{**e[0], "file_name": "im1.png"}, *e[1:]], "matches the same ground-truth image as 'im1.png'")],
    ids=["duplicate-id", "list-id", "not-a-list", "two-ids-one-image"],
)  # fmt: skip
def test_an_inconsistent_image_index_is_refused(tmp_path, capsys, edit, message):
    gt = _write_gt(tmp_path, ids=[2, 3, 1])
    seg = _segment_output(tmp_path / "seg")
    index = seg / "images.json"
    index.write_text(json.dumps(edit(json.loads(index.read_text()))))
    err = _refused(capsys, "--pred", str(seg), "--gt", str(gt))
    assert message in err, err


# ----------------------------------------------------------------------------- 6: one mask-size check for both
def test_corloc_refuses_a_detection_mask_of_another_size_as_coco_does(tmp_path, capsys):
    """Before: CorLoc scored 1.0 from the detection's box while COCO refused its mask."""
    gt = _write_gt(tmp_path, ids=[2, 3, 1])
    dets = _results([2, 3, 1])
    dets[1] = {**dets[1], "segmentation": mask_to_rle(np.ones((10, 10), bool)), "bbox": mask_bbox(_object(1))}
    res = tmp_path / "res.json"
    res.write_text(json.dumps(dets))
    errors = [_refused(capsys, "--pred", str(res), "--gt", str(gt), "--protocol", p).split("error: ", 1)[1]
              for p in ("coco", "corloc")]  # fmt: skip
    assert errors[0] == errors[1] == f"{res}[1]: segmentation of image 3: RLE of size 10x10 for an image of 24x40\n"


# ----------------------------------------------------------------------------- 7: --output checked before the work
@pytest.mark.parametrize("where", ["folder", "under-a-file", "fifo", "the-ground-truth"])
def test_an_output_that_cannot_be_written_is_refused_before_scoring(tmp_path, capsys, monkeypatch, where):
    from crate_vis.experiments import score as score_module

    gt = _write_gt(tmp_path)
    called = []
    monkeypatch.setattr(score_module, "score_predictions", lambda *a, **k: called.append(1) or {})
    (tmp_path / "taken").mkdir()
    (tmp_path / "plain.txt").write_text("x")
    if where == "fifo":  # a non-regular file of this test's own (never a system one such as /dev/null)
        if not hasattr(os, "mkfifo"):
            pytest.skip("no named pipes here")
        os.mkfifo(tmp_path / "pipe")
    output = {"folder": tmp_path / "taken", "under-a-file": tmp_path / "plain.txt" / "sub" / "s.json",
              "fifo": tmp_path / "pipe", "the-ground-truth": gt}[where]  # fmt: skip
    err = _refused(capsys, "--pred", str(tmp_path), "--gt", str(gt), "--output", str(output))
    assert not called and str(output) in err and ".tmp" not in err
    assert (tmp_path / "plain.txt").read_text() == "x" and json.loads(gt.read_text())["images"]


def test_a_good_output_is_written(tmp_path, capsys):
    gt = _write_gt(tmp_path)
    res = tmp_path / "res.json"
    res.write_text(json.dumps(_results([2, 3, 1])))
    out = tmp_path / "new" / "deeper" / "score.json"
    assert main(["score", "--pred", str(res), "--gt", str(gt), "--output", str(out), "--iou-type", "segm"]) == 0
    assert json.loads(out.read_text())["segm"]["AP"] == 1.0

"""Dataset readers against what was written: COCO (real coco128 and hand-made json), panoptic, VOC and mask folders."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from crate_vis.groundtruth import (
    VOID,
    COCODataset,
    COCOPanopticDataset,
    DatasetError,
    MaskFolderDataset,
    SegmentationDataset,
    VOCDataset,
    id_to_rgb,
    open_dataset,
    rgb_to_id,
    voc_palette,
)
from crate_vis.io.coco import mask_to_rle, mask_to_uncompressed_rle
from crate_vis.io.segment_output import load_prediction_masks

# pycocotools' decode trips numpy 2's copy-keyword deprecation on every call
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ------------------------------------------------------------------------------------------------ COCO (real)
@pytest.fixture(scope="module")
def coco128(coco128_root):
    return COCODataset(coco128_root / "annotations" / "instances_train2017.json")


def test_coco128_counts_paths_and_protocol(coco128, coco128_root):
    assert len(coco128) == 128
    assert isinstance(coco128, SegmentationDataset)
    assert coco128.image_root == coco128_root / "train2017"
    anns = [a for i in coco128.image_ids for a in coco128.annotations(i)]
    assert len(anns) == 939
    assert sum(a["iscrowd"] for a in anns) == 10
    for i in coco128.image_ids[:5]:
        assert coco128.image_path(i).is_file()
        with Image.open(coco128.image_path(i)) as im:
            assert im.size[::-1] == coco128.image_size(i)


def test_coco128_masks_match_pycocotools(coco128, coco128_root):
    ref = COCO.__new__(COCO)  # pycocotools' own reader, on the same file
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        ref.__init__(str(coco128_root / "annotations" / "instances_train2017.json"))
    crowd_seen = 0
    for image_id in coco128.image_ids[:12]:
        insts = coco128.instances(image_id)
        ann_ids = ref.getAnnIds(imgIds=[image_id])
        assert [i.id for i in insts] == ann_ids
        for inst, ann in zip(insts, ref.loadAnns(ann_ids)):
            np.testing.assert_array_equal(inst.mask, ref.annToMask(ann).astype(bool))
            assert inst.iscrowd == bool(ann["iscrowd"])
            assert inst.category_id == ann["category_id"]
            crowd_seen += inst.iscrowd
        fg = coco128.foreground(image_id)
        union = np.zeros_like(fg)
        for ann in ref.loadAnns(ann_ids):
            union |= ref.annToMask(ann).astype(bool)
        np.testing.assert_array_equal(fg, union)
    crowd_ids = [a["image_id"] for a in ref.dataset["annotations"] if a["iscrowd"]]
    for image_id in crowd_ids[:3]:  # crowd RLEs decode to the same masks
        for inst, ann in zip(coco128.instances(image_id), ref.loadAnns(ref.getAnnIds(imgIds=[image_id]))):
            np.testing.assert_array_equal(inst.mask, ref.annToMask(ann).astype(bool))


def test_coco128_semantic_paints_small_objects_last(coco128):
    image_id = coco128.image_ids[0]
    sem = coco128.semantic(image_id)
    insts = [i for i in coco128.instances(image_id) if not i.iscrowd]
    smallest = min(insts, key=lambda i: i.area)
    assert (sem[smallest.mask] == smallest.category_id).all()
    assert (sem[~coco128.foreground(image_id)] == 0).all()


# ------------------------------------------------------------------------------------------ COCO (hand-made)
def _coco_dict() -> dict:
    m = np.zeros((10, 12), bool)
    m[1:6, 2:10] = True
    crowd = np.zeros((10, 12), bool)
    crowd[6:9, 0:4] = True
    return {
        "images": [{"id": 7, "width": 12, "height": 10, "file_name": "a.jpg"}],
        "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "segmentation": [[3, 2, 8, 2, 8, 5, 3, 5]]},
            {"id": 2, "image_id": 7, "category_id": 2, "segmentation": mask_to_rle(m)},
            {"id": 3, "image_id": 7, "category_id": 2, "segmentation": mask_to_uncompressed_rle(crowd), "iscrowd": 1},
        ],
    }


def _write(tmp_path: Path, data: dict, name: str = "ann.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_coco_polygon_rle_and_uncompressed_rle(tmp_path):
    ds = COCODataset(_write(tmp_path, _coco_dict()))
    insts = ds.instances(7)
    # the polygon covers the same 5x3 block as the RLE instance (pycocotools rasterises the polygon interior)
    poly_ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[3, 2, 8, 2, 8, 5, 3, 5]], 10, 12)))
    np.testing.assert_array_equal(insts[0].mask, poly_ref.astype(bool))
    assert insts[1].mask[1:6, 2:10].all() and insts[1].area == 40
    assert insts[1].bbox == [2.0, 1.0, 8.0, 5.0]  # filled from the mask
    assert insts[2].iscrowd and insts[2].area == 12
    assert ds.semantic(7)[7, 1] == VOID  # crowd not covered by an object
    assert ds.semantic(7)[3, 4] == 1  # the smaller polygon instance is painted over the larger RLE one
    assert ds.semantic(7)[1, 2] == 2
    np.testing.assert_allclose(ds.boxes(7)[1], [2, 1, 8, 5])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d["annotations"][0].pop("image_id"), r"annotations\[0\].*missing key.*'image_id'"),
        (lambda d: d.pop("categories"), r"top level: missing key.*'categories'"),
        (lambda d: d["images"][0].pop("height"), r"images\[0\]: missing key.*'height'"),
        (lambda d: d["annotations"][0].update(segmentation=[[1, 1, 4, 4]]), r"annotations\[0\] \(id 1\).*fewer than three"),
        (lambda d: d["annotations"][1]["segmentation"].update(size=[9, 12]), r"annotations\[1\] \(id 2\).*9x12.*10x12"),
        (lambda d: d["annotations"][2].update(image_id=99), r"annotations\[2\] \(id 3\).*image_id 99"),
        (lambda d: d["annotations"][0].update(category_id=5), r"annotations\[0\] \(id 1\).*unknown category_id 5"),
        (lambda d: d["annotations"][2]["segmentation"]["counts"].append(3), r"annotations\[2\].*sum to"),
    ],
)
def test_coco_validation_names_file_and_entry(tmp_path, mutate, match):
    data = copy.deepcopy(_coco_dict())
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(DatasetError, match=match) as err:
        COCODataset(path)
    assert str(path) in str(err.value)


def test_coco_image_root_resolution(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    Image.new("RGB", (12, 10)).save(tmp_path / "val2017" / "a.jpg")
    ds = COCODataset(_write(tmp_path / "annotations", _coco_dict(), "instances_val2017.json"))
    assert ds.image_path(7) == tmp_path / "val2017" / "a.jpg"
    assert ds.image(7).size == (12, 10)
    other = tmp_path / "elsewhere"
    assert COCODataset(tmp_path / "annotations" / "instances_val2017.json", image_root=other).image_path(7) == other / "a.jpg"


# --------------------------------------------------------------------------------------------------- panoptic
def test_panoptic_reader(tmp_path):
    ids = np.zeros((6, 8), np.int64)
    ids[1:3, 1:4] = 300  # a thing, id > 255 so G is used
    ids[4:6, :] = 70000  # stuff, id uses B
    (tmp_path / "panoptic_val2017").mkdir()
    Image.fromarray(id_to_rgb(ids)).save(tmp_path / "panoptic_val2017" / "x.png")
    data = {
        "images": [{"id": 1, "width": 8, "height": 6, "file_name": "x.jpg"}],
        "annotations": [{"image_id": 1, "file_name": "x.png", "segments_info": [
            {"id": 300, "category_id": 5, "iscrowd": 0}, {"id": 70000, "category_id": 150, "iscrowd": 0}]}],
        "categories": [{"id": 5, "name": "cat", "isthing": 1}, {"id": 150, "name": "floor", "isthing": 0}],
    }  # fmt: skip
    path = _write(tmp_path, data, "panoptic_val2017.json")
    ds = open_dataset(path)
    assert isinstance(ds, COCOPanopticDataset)
    np.testing.assert_array_equal(rgb_to_id(np.asarray(Image.open(tmp_path / "panoptic_val2017" / "x.png"))), ids)
    insts = ds.instances(1)
    assert len(insts) == 1 and insts[0].category_id == 5 and insts[0].bbox == [1.0, 1.0, 3.0, 2.0]
    sem = ds.semantic(1)
    assert sem[2, 2] == 5 and sem[5, 0] == 150 and sem[0, 0] == VOID
    np.testing.assert_array_equal(ds.foreground(1), ids == 300)
    np.testing.assert_array_equal(ds.ignore(1), ids == 0)


# -------------------------------------------------------------------------------------------------------- VOC
def _save_palette_png(arr: np.ndarray, path: Path) -> None:
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    im.putpalette(voc_palette())
    im.save(path)


@pytest.fixture()
def voc_root(tmp_path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "Annotations", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    cls = np.zeros((20, 30), np.uint8)
    obj = np.zeros((20, 30), np.uint8)
    cls[2:8, 3:10], obj[2:8, 3:10] = 15, 1  # person
    cls[10:18, 12:28], obj[10:18, 12:28] = 7, 2  # car
    cls[1, 2:11] = obj[1, 2:11] = VOID  # void border
    _save_palette_png(cls, root / "SegmentationClass" / "2007_000001.png")
    _save_palette_png(obj, root / "SegmentationObject" / "2007_000001.png")
    Image.new("RGB", (30, 20), (90, 90, 90)).save(root / "JPEGImages" / "2007_000001.jpg")
    xml = """<annotation><size><width>30</width><height>20</height></size>
      <object><name>person</name><difficult>0</difficult><bndbox><xmin>4</xmin><ymin>3</ymin><xmax>10</xmax><ymax>8</ymax></bndbox></object>
      <object><name>car</name><difficult>1</difficult><bndbox><xmin>13</xmin><ymin>11</ymin><xmax>28</xmax><ymax>18</ymax></bndbox></object>
    </annotation>"""
    (root / "Annotations" / "2007_000001.xml").write_text(xml)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n")
    return tmp_path / "VOCdevkit"


def test_voc_reader_matches_what_was_written(voc_root):
    ds = open_dataset(voc_root, split="val")
    assert isinstance(ds, VOCDataset) and ds.image_ids == ["2007_000001"]
    i = "2007_000001"
    assert ds.image_size(i) == (20, 30)
    sem = ds.semantic(i)
    assert sem[5, 5] == 15 and sem[15, 20] == 7 and sem[1, 5] == VOID and sem[0, 0] == 0
    insts = ds.instances(i)
    assert [(x.id, x.category_id) for x in insts] == [(1, 15), (2, 7)]
    assert insts[0].bbox == [3.0, 2.0, 7.0, 6.0]
    fg = ds.foreground(i)
    assert fg.sum() == 6 * 7 + 8 * 16
    assert ds.ignore(i).sum() == 9
    # xml boxes: 1-based inclusive -> pixel edges, i.e. the tight mask boxes
    np.testing.assert_allclose(ds.boxes(i), [[3, 2, 7, 6], [12, 10, 16, 8]])
    assert [o["difficult"] for o in ds.objects(i)] == [False, True]
    np.testing.assert_allclose(VOCDataset(voc_root, remove_difficult=True).boxes(i), [[3, 2, 7, 6]])
    assert ds.image(i).size == (30, 20)


def test_voc_errors(voc_root, tmp_path):
    with pytest.raises(DatasetError, match="train.txt.*not found"):
        VOCDataset(voc_root, split="train")
    with pytest.raises(DatasetError, match="not a VOC root"):
        VOCDataset(tmp_path / "nowhere")
    bad = voc_root / "VOC2012" / "SegmentationClass" / "2007_000001.png"
    _save_palette_png(np.full((20, 30), 40, np.uint8), bad)
    with pytest.raises(DatasetError, match=r"2007_000001.png.*\[40\]"):
        VOCDataset(voc_root).semantic("2007_000001")


# ---------------------------------------------------------------------------------------------- mask folders
def test_mask_folder_binary_and_label(tmp_path):
    (tmp_path / "masks").mkdir()
    (tmp_path / "images").mkdir()
    b = np.zeros((8, 9), np.uint8)
    b[2:5, 1:4] = 255
    Image.fromarray(b).save(tmp_path / "masks" / "one.png")
    lab = np.zeros((8, 9), np.uint8)
    lab[:3] = 4
    lab[5:] = 9
    lab[4] = VOID
    Image.fromarray(lab).save(tmp_path / "masks" / "two.png")
    Image.new("RGB", (9, 8)).save(tmp_path / "images" / "one.jpg")
    ds = open_dataset(tmp_path)
    assert isinstance(ds, MaskFolderDataset) and ds.image_ids == ["one", "two"]
    assert ds.kind("one") == "binary" and ds.kind("two") == "label"
    np.testing.assert_array_equal(ds.foreground("one"), b > 0)
    assert ds.instances("one")[0].bbox == [1.0, 2.0, 3.0, 3.0]
    assert [i.category_id for i in ds.instances("two")] == [4, 9]
    assert ds.ignore("two").sum() == 9 and ds.ignore("one") is None
    assert ds.image_path("one").name == "one.jpg"
    with pytest.raises(FileNotFoundError, match="two"):
        ds.image_path("two")


def test_prediction_folder_layouts(tmp_path):
    m = np.zeros((4, 5), np.uint8)
    m[1:3, 1:4] = 255
    Image.fromarray(m).save(tmp_path / "a.png")
    Image.fromarray(m).save(tmp_path / "b_mask.png")
    for k in range(3):
        Image.fromarray(np.roll(m, k, axis=1)).save(tmp_path / f"c_mask_head{k}.png")
    np.save(tmp_path / "d.npy", np.stack([m > 0, m == 0]))
    preds = load_prediction_masks(tmp_path)
    assert sorted(preds) == ["a", "b", "c", "d"]
    assert preds["a"].shape == (1, 4, 5) and preds["a"].dtype == bool and preds["a"].sum() == 6
    assert preds["c"].shape == (3, 4, 5)
    np.testing.assert_array_equal(preds["c"][2], np.roll(m, 2, axis=1) > 0)
    assert preds["d"].shape == (2, 4, 5)
    Image.fromarray(m).save(tmp_path / "c.png")
    with pytest.raises(DatasetError, match="both a single mask and per-head"):
        load_prediction_masks(tmp_path)


def test_label_png_modes(tmp_path):
    from crate_vis.io.images import read_label_png

    m = np.zeros((3, 4), np.uint8)
    m[1, 1:3] = 255
    Image.fromarray(np.stack([m] * 3, -1)).save(tmp_path / "grey_rgb.png")
    np.testing.assert_array_equal(read_label_png(tmp_path / "grey_rgb.png"), m)
    colour = np.zeros((3, 4, 3), np.uint8)
    colour[0, 0] = (128, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(DatasetError, match="colour.png.*colour image"):
        read_label_png(tmp_path / "colour.png")
    with pytest.raises(DatasetError, match="not found"):
        read_label_png(tmp_path / "missing.png")

"""The COCO format in one place: run-length encoding, instance-json validation, image roots and results files.

* **RLE**: COCO stores a mask as runs of alternating 0s and 1s read in column-major (Fortran) order, starting with a
  run of 0s. The *uncompressed* form keeps ``counts`` as a list of ints; the *compressed* form is pycocotools'
  LEB128-like string. Everything here returns JSON-ready dicts (compressed ``counts`` as ``str``, never ``bytes``),
  ``size`` height first.
* **Instance files**: :func:`load_coco_json` and :func:`validate_coco_instances` (errors name the file and the
  entry; :func:`check_image_id` and :func:`check_bbox` the rules shared with every other reader), :func:`quiet_coco` (a pycocotools index without its prints), :func:`find_image_root` (where the images of
  a json are, in the common layouts).
* **Results files** (``COCO.loadRes`` format): :func:`result_entry`, :func:`masks_to_results`,
  :func:`write_results`, :func:`read_results`.

Example:
    >>> import numpy as np
    >>> m = np.zeros((4, 5), dtype=bool); m[1:3, 2:4] = True
    >>> rle = mask_to_rle(m)
    >>> rle["size"], rle_area(rle), rle_bbox(rle)
    ([4, 5], 4, [2.0, 1.0, 2.0, 2.0])
    >>> bool((rle_to_mask(rle) == m).all())
    True
    >>> mask_to_uncompressed_rle(m)["counts"]
    [9, 2, 2, 2, 5]
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ..errors import DatasetError
from .atomic import atomic_write_json
from .jsonfile import read_json

__all__ = [
    "mask_to_rle", "mask_to_uncompressed_rle", "rle_to_mask", "rle_area", "rle_bbox", "segmentation_to_rle",
    "check_segmentation", "decode_rle_counts", "mask_bbox", "load_coco_json", "validate_coco_instances",
    "quiet_coco", "find_image_root", "coco_image_path", "result_entry", "masks_to_results", "write_results",
    "read_results", "validate_detections", "check_image_id", "check_bbox",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------------- RLE
def _as_mask(mask: Any) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def mask_to_rle(mask: Any) -> dict[str, Any]:
    """Encode a ``(H, W)`` boolean mask as compressed COCO RLE with ``counts`` as ``str``."""
    m = _as_mask(mask)
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def mask_to_uncompressed_rle(mask: Any) -> dict[str, Any]:
    """Encode a ``(H, W)`` mask as uncompressed COCO RLE (``counts`` a list of run lengths, column-major)."""
    m = _as_mask(mask)
    flat = m.flatten(order="F").astype(np.int8)  # (H*W,) column-major, as COCO reads masks
    # run boundaries: positions where the value changes; the first run is always of 0s (possibly empty)
    change = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(c) for c in counts]}


def _to_pycoco(rle: dict[str, Any]) -> dict[str, Any]:
    """A dict pycocotools' C functions accept: compressed counts as bytes."""
    if "size" not in rle or "counts" not in rle:
        raise ValueError(f"an RLE needs 'size' and 'counts', got keys {sorted(rle)}")
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        if sum(int(c) for c in counts) != h * w:
            raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, expected H*W = {h}*{w} = {h * w}")
        return mask_utils.frPyObjects({"size": [h, w], "counts": list(counts)}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [h, w], "counts": counts}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Decode a compressed or uncompressed COCO RLE to a ``(H, W)`` bool mask."""
    return mask_utils.decode(_to_pycoco(rle)).astype(bool)


def rle_area(rle: dict[str, Any]) -> int:
    """Number of foreground pixels of an RLE."""
    return int(mask_utils.area(_to_pycoco(rle)))


def rle_bbox(rle: dict[str, Any]) -> list[float]:
    """Tight ``[x, y, w, h]`` box of an RLE (pixel edges; all zeros for an empty mask, as pycocotools)."""
    return [float(v) for v in mask_utils.toBbox(_to_pycoco(rle))]


def mask_bbox(mask: Any) -> list[float]:
    """Tight ``[x, y, w, h]`` box of a ``(H, W)`` mask in pixel-edge coordinates (zeros when empty).

    Example:
        >>> m = np.zeros((6, 6), bool); m[2, 1:4] = True
        >>> mask_bbox(m)
        [1.0, 2.0, 3.0, 1.0]
    """
    m = _as_mask(mask)
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def decode_rle_counts(counts: str | bytes) -> list[int]:
    """Run lengths of a compressed RLE ``counts`` string, decoded as pycocotools' ``rleFrString`` does.

    Each run is stored in 5-bit groups (character ``48 + group``), the ``0x20`` bit of a group saying that another
    follows and the ``0x10`` bit of the last one the sign; from the third run on, the value is a difference to the
    run two places back.

    Raises:
        ValueError: characters outside ``'0'..'o'`` or a value cut off at the end of the string.

    Example:
        >>> decode_rle_counts(mask_to_rle(np.eye(3, dtype=bool))["counts"])
        [0, 1, 3, 1, 3, 1]
    """
    text = counts.decode("ascii") if isinstance(counts, bytes) else counts
    runs: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                raise ValueError("compressed RLE counts end in the middle of a value")
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"compressed RLE counts hold the character {text[p]!r}, outside '0'..'o'")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x -= 1 << (5 * k)  # sign extension
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _size_pair(value: Any) -> list[int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_whole_number(v) for v in value)):
        raise ValueError(f"an RLE size is [height, width] of two integers, got {value!r}")
    return [int(v) for v in value]


def _check_polygon(i: int, poly: Any, height: int, width: int) -> None:
    """A polygon of finite coordinates near the image: pycocotools rasterises one with a NaN, an infinity or a far
    away point by allocating memory in proportion to its perimeter (gigabytes) or crashes."""
    if not isinstance(poly, (list, tuple)):
        raise ValueError(f"polygon {i} is not a list of numbers")
    try:
        arr = np.asarray(poly)
    except (ValueError, TypeError, OverflowError):
        raise ValueError(f"polygon {i} is not a list of numbers") from None
    if arr.ndim != 1 or arr.dtype.kind not in "iuf":
        raise ValueError(f"polygon {i} is not a list of numbers")
    if len(poly) < 6:
        raise ValueError(f"polygon {i} has {len(poly)} numbers: fewer than three points (6 numbers)")
    if len(poly) % 2:
        raise ValueError(f"polygon {i} has an odd number of coordinates ({len(poly)})")
    xy = arr.astype(np.float64).reshape(-1, 2)  # (points, 2) as x, y
    bad = ~np.isfinite(xy)
    if bad.any():
        k = int(np.flatnonzero(bad.reshape(-1))[0])
        raise ValueError(f"polygon {i} holds the non-finite coordinate {poly[k]!r} (number {k})")
    # a point may lie a little outside the image (annotation tools allow it); one beyond an image's size past its
    # border is a corrupt coordinate
    far = (xy[:, 0] < -width) | (xy[:, 0] > 2 * width) | (xy[:, 1] < -height) | (xy[:, 1] > 2 * height)
    if far.any():
        p = int(np.flatnonzero(far)[0])
        raise ValueError(
            f"polygon {i} has the point ({poly[2 * p]!r}, {poly[2 * p + 1]!r}) far outside the {height}x{width} image"
        )


def check_segmentation(segmentation: Any, height: int, width: int) -> None:
    """Validate a COCO ``segmentation`` field without rasterising it.

    Polygons must be lists of at least six finite numbers, an even count, their points within one image size of the
    image; an RLE must be of the image's size, its counts summing to ``height * width``.

    Raises:
        ValueError: the first thing wrong, in one line.

    Example:
        >>> check_segmentation([[0, 0, 4, 0, 4, float("nan")]], 8, 8)
        Traceback (most recent call last):
        ...
        ValueError: polygon 0 holds the non-finite coordinate nan (number 5)
    """
    if isinstance(segmentation, dict):
        if "size" not in segmentation or "counts" not in segmentation:
            raise ValueError(f"an RLE needs 'size' and 'counts', got keys {sorted(map(str, segmentation))}")
        size = _size_pair(segmentation["size"])
        if size != [height, width]:
            raise ValueError(f"RLE of size {size[0]}x{size[1]} for an image of {height}x{width}")
        counts = segmentation["counts"]
        if not isinstance(counts, (list, str, bytes)):
            raise ValueError(f"RLE counts must be a list, str or bytes, got {type(counts).__name__}")
        if isinstance(counts, list):
            if any(not isinstance(c, (int, np.integer)) or isinstance(c, bool) or c < 0 for c in counts):
                raise ValueError("uncompressed RLE counts must be non-negative integers")
            if sum(counts) != height * width:
                raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, expected H*W = {height * width}")
        else:
            try:
                runs = decode_rle_counts(counts)
            except UnicodeDecodeError:
                raise ValueError("compressed RLE counts hold bytes that are not ASCII") from None
            if any(c < 0 for c in runs) or sum(runs) != height * width:
                raise ValueError(
                    f"compressed RLE counts decode to runs summing to {sum(runs)} (negative runs: "
                    f"{sum(c < 0 for c in runs)}), expected H*W = {height * width}: corrupt counts"
                )
        return
    if not isinstance(segmentation, (list, tuple)):
        raise ValueError(f"segmentation must be polygons or an RLE dict, got {type(segmentation).__name__}")
    if not segmentation:
        raise ValueError("empty polygon list")
    for i, poly in enumerate(segmentation):
        _check_polygon(i, poly, height, width)


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """A COCO ``segmentation`` field (polygons, uncompressed or compressed RLE) as one compressed RLE.

    Args:
        segmentation: list of polygons ``[[x1, y1, x2, y2, ...], ...]`` or an RLE dict.
        height: image height.
        width: image width.

    Raises:
        ValueError: polygons with fewer than three points, odd coordinate counts, RLEs of another size.
    """
    check_segmentation(segmentation, height, width)
    if isinstance(segmentation, dict):
        rle = _to_pycoco(segmentation)
    else:
        rle = mask_utils.merge(mask_utils.frPyObjects([list(map(float, p)) for p in segmentation], height, width))
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


# ---------------------------------------------------------------------------------------------- instance files
def _whole_number(v: Any) -> bool:
    """An int (not a bool), or a float with an integral value."""
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, np.integer)):
        return True
    return isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer()


def check_image_id(value: Any, path: str | os.PathLike[str], entry: str, what: str = "id") -> None:
    """The rule for image ids of every COCO reader (ground truth, ``segment`` inputs, a segmentation's index): an
    integer or a string, never a bool, a float or a container.

    Raises:
        DatasetError: naming ``path``, ``entry`` and the value.

    Example:
        >>> check_image_id(7, "gt.json", "images[0]"); check_image_id("0001", "gt.json", "images[0]")
        >>> check_image_id([7], "gt.json", "images[0]")
        Traceback (most recent call last):
        ...
        crate_vis.errors.DatasetError: gt.json: images[0]: id must be an integer or a string, got [7]
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DatasetError(path, entry, f"{what} must be an integer or a string, got {value!r}")


def check_bbox(box: Any) -> str | None:
    """What is wrong with a ``[x, y, w, h]`` box (four finite numbers, ``w, h >= 0``), or ``None`` when it is good.

    Example:
        >>> check_bbox([0, 0, 4, 2]) is None, check_bbox([0, 0, float("nan"), 2])
        (True, 'bbox must be [x, y, w, h] of finite numbers with w, h >= 0, got [0, 0, nan, 2]')
    """
    if (
        isinstance(box, (list, tuple))
        and len(box) == 4
        and all(_finite_number(v) for v in box)
        and box[2] >= 0
        and box[3] >= 0
    ):
        return None
    return f"bbox must be [x, y, w, h] of finite numbers with w, h >= 0, got {box!r}"


def load_coco_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a COCO json file (:func:`~crate_vis.io.jsonfile.read_json`), naming the file in any error.

    The image ids are checked here (:func:`check_image_id`), so every reader of COCO files applies one rule; the
    rest of the format is checked by :func:`validate_coco_instances` (instances) or the reader.

    Raises:
        DatasetError: not found, not JSON, not an object, or an image id of the wrong type.
    """
    data = read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(path, "top level", f"a COCO file is a JSON object, got {type(data).__name__}")
    images = data.get("images")
    if isinstance(images, list):
        for i, img in enumerate(images):
            if isinstance(img, dict) and "id" in img:
                check_image_id(img["id"], path, f"images[{i}]")
    return data


def _require(path: Any, entry: str, obj: Any, keys: tuple[str, ...]) -> None:
    if not isinstance(obj, dict):
        raise DatasetError(path, entry, f"expected an object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DatasetError(path, entry, f"missing key(s) {', '.join(repr(k) for k in missing)}")


def validate_coco_instances(data: Any, path: str | os.PathLike[str] = "<memory>") -> dict[str, Any]:
    """Check a COCO instance dict and fill in what COCOeval needs but the file may omit.

    Checks: the top-level lists; ``id`` (:func:`check_image_id`, unique), ``width``/``height`` (positive integers)
    and ``file_name`` of every image; ``id``/``name`` of every category (integer or string ids); ``id``/``image_id``/
    ``category_id``/``segmentation`` of every annotation; annotation ``image_id`` and ``category_id`` that exist;
    segmentations (:func:`check_segmentation`: finite polygons of at least three points, RLEs of the image's size);
    a ``bbox`` present: four finite numbers with ``w, h >= 0``; an ``area`` present: finite and ``>= 0``;
    ``iscrowd`` 0 or 1. Fills ``iscrowd`` (0), ``area`` and ``bbox`` from the mask when absent.

    Returns:
        ``data`` (annotations completed in place).

    Raises:
        DatasetError: naming ``path``, the offending entry and the bad value.
    """
    _require(path, "top level", data, ("images", "annotations", "categories"))
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise DatasetError(path, key, f"must be a list, got {type(data[key]).__name__}")
    images: dict[Any, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        entry = f"images[{i}]"
        _require(path, entry, img, ("id", "width", "height", "file_name"))
        check_image_id(img["id"], path, entry)
        if img["id"] in images:
            raise DatasetError(path, entry, f"duplicate image id {img['id']!r}")
        for key in ("height", "width"):
            if not (_whole_number(img[key]) and img[key] >= 1):
                raise DatasetError(path, entry, f"{key} must be a positive integer, got {img[key]!r}")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise DatasetError(path, entry, f"file_name must be a non-empty string, got {img['file_name']!r}")
        images[img["id"]] = img
    cats = set()
    for i, cat in enumerate(data["categories"]):
        _require(path, f"categories[{i}]", cat, ("id", "name"))
        check_image_id(cat["id"], path, f"categories[{i}]")
        cats.add(cat["id"])
    seen_ann: set[Any] = set()
    for i, ann in enumerate(data["annotations"]):
        _require(path, f"annotations[{i}]", ann, ("id", "image_id", "category_id", "segmentation"))
        check_image_id(ann["id"], path, f"annotations[{i}]")
        entry = f"annotations[{i}] (id {ann['id']!r})"
        if ann["id"] in seen_ann:
            raise DatasetError(path, entry, "duplicate annotation id")
        seen_ann.add(ann["id"])
        check_image_id(ann["image_id"], path, entry, "image_id")
        img = images.get(ann["image_id"])
        if img is None:
            raise DatasetError(path, entry, f"image_id {ann['image_id']!r} is not among the images")
        check_image_id(ann["category_id"], path, entry, "category_id")
        if ann["category_id"] not in cats:
            raise DatasetError(path, entry, f"unknown category_id {ann['category_id']!r}")
        h, w = int(img["height"]), int(img["width"])
        try:
            check_segmentation(ann["segmentation"], h, w)
        except ValueError as err:
            raise DatasetError(path, entry, f"segmentation: {err}") from None
        if "bbox" in ann and (problem := check_bbox(ann["bbox"])) is not None:
            raise DatasetError(path, entry, problem)
        if "area" in ann and not (_finite_number(ann["area"]) and ann["area"] >= 0):
            raise DatasetError(path, entry, f"area must be a finite number >= 0, got {ann['area']!r}")
        if ann.setdefault("iscrowd", 0) not in (0, 1) or not isinstance(ann["iscrowd"], (int, bool)):
            raise DatasetError(path, entry, f"iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
        if "area" not in ann or "bbox" not in ann:  # rasterise only when something must be derived
            rle = segmentation_to_rle(ann["segmentation"], h, w)
            ann.setdefault("area", float(rle_area(rle)))
            ann.setdefault("bbox", rle_bbox(rle))
    return data


def quiet_coco(data: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` index over an in-memory dict, without its progress prints."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def find_image_root(json_path: str | os.PathLike[str], data: Mapping[str, Any]) -> Path:
    """Where the images of a COCO json live, found in the common layouts.

    Tried in order, keeping the first folder that holds the first listed image: the json's folder; the sibling
    folder named after the split in the json's name (``annotations/instances_train2017.json`` -> ``../train2017``,
    COCO's own layout); ``images/`` beside the json's folder (``annotations/`` + ``images/``); the json folder's
    parent (``file_name`` holding a sub-folder, ``train2017/0001.jpg``). Falls back to the json's folder.

    Example:
        >>> find_image_root("/nonexistent/annotations/instances_val.json", {"images": []}).name
        'annotations'
    """
    here = Path(json_path).parent
    candidates = [here]
    stem = Path(json_path).stem
    if "_" in stem:
        candidates.append(here.parent / stem.split("_", 1)[1])
    candidates += [here.parent / "images", here.parent]
    images = data.get("images") or []
    first = images[0].get("file_name") if images and isinstance(images[0], dict) else None
    if first is not None:
        for c in candidates:
            if (c / str(first)).is_file():
                return c
    return here


def coco_image_path(entry: Mapping[str, Any], root: str | os.PathLike[str]) -> Path:
    """The file of one ``images`` entry under the image root."""
    return Path(root) / str(entry["file_name"])


# ------------------------------------------------------------------------------------------------- results files
def result_entry(image_id: Any, mask: np.ndarray, score: float, category_id: int = 1) -> dict[str, Any]:
    """One COCO result: ``{image_id, category_id, segmentation (RLE), score, bbox, area}``."""
    rle = mask_to_rle(mask)
    return {
        "image_id": image_id,
        "category_id": int(category_id),
        "segmentation": rle,
        "score": float(score),
        "bbox": rle_bbox(rle),
        "area": rle_area(rle),
    }


def masks_to_results(image_id: Any, masks: Any, scores: Any, category_id: int = 1) -> list[dict[str, Any]]:
    """COCO result dicts for ``(N, H, W)`` masks of one image (see :func:`result_entry`)."""
    m = np.asarray(masks.detach().cpu() if hasattr(masks, "detach") else masks)
    if m.ndim == 2:
        m = m[None]
    s = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=np.float64).reshape(-1)
    if m.ndim != 3 or s.shape[0] != m.shape[0]:
        raise ValueError(f"{s.shape[0]} scores for masks of shape {m.shape}")
    return [result_entry(image_id, mask, float(score), category_id) for mask, score in zip(m, s)]


def write_results(path: str | os.PathLike[str], entries: Iterable[Mapping[str, Any]]) -> int:
    """Write a COCO results list atomically; returns the number of entries."""
    items = [dict(e) for e in entries]
    for e in items:
        missing = {"image_id", "category_id", "segmentation", "score"} - e.keys()
        if missing:
            raise ValueError(f"result entry lacks {sorted(missing)}: {e}")
    atomic_write_json(path, items)
    return len(items)


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a COCO results json (a list of detections), naming the file in errors.

    Raises:
        DatasetError: not found, not JSON (:func:`~crate_vis.io.jsonfile.read_json`), or not a list.
    """
    data = read_json(path)
    if not isinstance(data, list):
        raise DatasetError(path, "file", f"a COCO results file is a list of detections, got {type(data).__name__}")
    return data


def _finite_number(v: Any) -> bool:
    """A finite int or float (not a bool), small enough to be a float."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def validate_detections(
    results: Sequence[Any],
    image_sizes: Mapping[Any, tuple[int, int]] | None,
    source: str = "results",
    need: str = "any",
) -> list[dict[str, Any]]:
    """Check COCO detections once, for every protocol, and return normalised copies.

    Every detection must be an object with an ``image_id`` (one of ``image_sizes`` when given), a finite ``score``,
    and, as ``need`` says, a ``segmentation`` (``"segm"``), a ``bbox`` (``"bbox"``: derived from the segmentation
    when absent, as pycocotools' ``loadRes`` does) or either (``"any"``). A segmentation must be an RLE of the
    image's size whose counts decode to exactly ``H * W`` pixels; a box four finite numbers with ``w, h >= 0``
    (checked wherever present). RLE ``counts`` given as bytes become str.

    Raises:
        DatasetError: naming ``source``, the entry index and what is wrong; detections for image ids the ground
            truth lacks are listed together.
    """
    if need not in ("segm", "bbox", "any"):
        raise ValueError(f"need must be 'segm', 'bbox' or 'any', got {need!r}")
    out: list[dict[str, Any]] = []
    unknown: list[Any] = []
    for i, det in enumerate(results):
        where = f"{source}[{i}]"
        if not isinstance(det, dict):
            raise DatasetError(where, "", f"a detection is an object, got {type(det).__name__}")
        d = dict(det)
        if "image_id" not in d or "score" not in d:
            missing = [k for k in ("image_id", "score") if k not in d]
            raise DatasetError(where, "", f"missing field(s) {', '.join(repr(k) for k in missing)}")
        check_image_id(d["image_id"], where, "", "image_id")
        if image_sizes is not None and d["image_id"] not in image_sizes:
            unknown.append(d["image_id"])
            continue
        if not _finite_number(d["score"]):
            raise DatasetError(where, "", f"score must be a finite number, got {d['score']!r}")
        has_seg, has_box = "segmentation" in d, "bbox" in d
        if need == "segm" and not has_seg:
            raise DatasetError(where, "", "missing field 'segmentation' for segm")
        if need == "bbox" and not (has_box or has_seg):
            raise DatasetError(where, "", "missing field 'bbox' (and no 'segmentation' to derive it from)")
        if need == "any" and not (has_box or has_seg):
            raise DatasetError(where, "", "needs a 'bbox' or a 'segmentation'")
        if has_seg:
            seg = d["segmentation"]
            rle = isinstance(seg, dict) and "size" in seg and "counts" in seg
            if not rle and (need == "segm" or not has_box):
                raise DatasetError(where, "", "segmentation must be an RLE {'size', 'counts'}")
            try:
                if rle:
                    size = [int(v) for v in seg["size"]]
                    h, w = image_sizes[d["image_id"]] if image_sizes is not None else size
                else:
                    h, w = image_sizes[d["image_id"]] if image_sizes is not None else (1 << 30, 1 << 30)
                check_segmentation(seg, int(h), int(w))
            except (ValueError, TypeError) as err:
                raise DatasetError(where, "", f"segmentation of image {d['image_id']!r}: {err}") from None
            if rle and isinstance(seg["counts"], bytes):
                d["segmentation"] = {**seg, "counts": seg["counts"].decode("ascii")}
        if has_box:
            problem = check_bbox(d["bbox"])
            if problem is not None:
                raise DatasetError(where, "", problem)
            d["bbox"] = [float(v) for v in d["bbox"]]
        elif has_seg and need != "segm":
            d["bbox"] = rle_bbox(d["segmentation"])
        out.append(d)
    if unknown:
        shown = ", ".join(repr(u) for u in sorted(set(unknown), key=str)[:10])
        raise DatasetError(source, "", f"{len(unknown)} detection(s) for image ids the ground truth does not have: {shown}")
    return out

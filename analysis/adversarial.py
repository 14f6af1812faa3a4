"""Adversarial pass over the ``crate-vis`` command line: broken and odd images, malformed COCO json, bad
checkpoints and run-folder races, each fed to the installed CLI in a subprocess and its outcome classified.

    python analysis/adversarial.py                  # builds every input in a temporary folder, prints a table
    python analysis/adversarial.py --keep /tmp/adv  # keep the inputs and outputs (to rerun a case by hand)
    python analysis/adversarial.py --only json-     # cases whose name contains the text
    python analysis/adversarial.py --jobs 2         # two subprocesses at a time (default 1)

Outcomes:

* ``clean``: non-zero exit, an error message on stderr, no Python traceback (the right answer to a bad input);
* ``ok``: exit 0 where that is the right answer, and the result checked (e.g. a CMYK image is converted and its
  masks have the image's size, reordered predictions score what the ordered ones score);
* ``TRACEBACK``: a Python traceback on stdout or stderr;
* ``SILENT-WRONG``: exit 0 with a wrong or mixed result, or where the input should have been refused;
* ``HOSTILE-CODE-RAN``: a checkpoint's pickled payload ran (it creates a marker file);
* also ``REFUSED-VALID`` (a valid input refused), ``NO-MESSAGE`` (non-zero exit without a message),
  ``CRASH`` (killed by a signal) and ``HANG`` (ran past its time limit), should they occur.

Every call is ``crate-vis ...`` with a tiny random model (``crate_test_patch8_32``, saved with
``crate_vis.save_model`` and passed with ``-c``) on images of at most 64 px, one torch thread per process.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import io
import json
import os
import pickle
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MODEL = "crate_test_patch8_32"
_script = Path(sys.executable).with_name("crate-vis")
CLI = [str(_script)] if _script.exists() else [shutil.which("crate-vis") or "crate-vis"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
TRACEBACK = "Traceback (most recent call last)"
#: address-space limit of every call (GiB): an input that makes the CLI allocate without bound (a NaN polygon did:
#: 22 GB before the kernel killed it) fails alone instead of starving the machine; see --mem-gib
MEMORY_LIMIT_GIB = [8.0]


def _limit_memory() -> None:
    import resource

    limit = int(MEMORY_LIMIT_GIB[0] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


# ------------------------------------------------------------------------------------------------ the cases
@dataclass
class Result:
    rc: int | None
    out: str
    err: str
    seconds: float
    timed_out: bool = False


@dataclass
class Case:
    """One call of the CLI: what it is fed, what the right answer is, and how a success is checked."""

    group: str  # image | json | checkpoint | run-folder
    name: str
    argv: list[str]
    expect: str = "refuse"  # refuse | ok | either
    check: Callable[[Result], str | None] | None = None  # on exit 0: a problem with the result, or None
    timeout: float = 240.0
    marker: Path | None = None  # a payload in the input creates this file if it runs
    ok_note: str = ""  # said instead of the result's summary when the answer is right but worth a remark
    outcome: str = ""
    note: str = ""
    result: Result | None = None
    reproduce: str = ""


@dataclass
class Multi:
    """Several calls that belong together (concurrent runs, a run then its rerun); ``run`` classifies them."""

    group: str
    name: str
    run: Callable[[], tuple[str, str, str]]  # -> (outcome, note, reproducer)
    outcome: str = ""
    note: str = ""
    reproduce: str = ""
    seconds: float = 0.0
    cases: list[Case] = field(default_factory=list)


def call(argv: list[str], timeout: float = 240.0, cwd: Path | None = None) -> Result:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(CLI + argv, capture_output=True, text=True, errors="replace", env=ENV, timeout=timeout,
                           cwd=cwd, stdin=subprocess.DEVNULL, preexec_fn=_limit_memory)  # fmt: skip
        return Result(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        errs = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
        return Result(None, out, errs, time.perf_counter() - t0, timed_out=True)


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _summary(res: Result) -> str:
    """The numbers of a ``score --json`` answer, else the last line printed."""
    try:
        data = json.loads(res.out)
    except ValueError:
        return _error_line(res.out)
    if not isinstance(data, dict):
        return _error_line(res.out)
    if "segm" in data:
        return f"segm AP {data['segm']['AP']:.4f}, bbox AP {data.get('bbox', {}).get('AP', float('nan')):.4f}"
    for key in ("corloc", "mean", "miou"):
        if key in data:
            return f"{key} {data[key]:.4f}"
    return _error_line(res.out)


def classify(case: Case, res: Result) -> tuple[str, str]:
    lines = [line for line in res.err.splitlines() if line.strip()]
    note = _error_line(res.err) or _error_line(res.out)
    if case.marker is not None and case.marker.exists():
        return "HOSTILE-CODE-RAN", f"the payload ran: {case.marker} exists"
    if res.timed_out:
        return "HANG", f"no answer after {res.seconds:.0f} s"
    if TRACEBACK in res.err or TRACEBACK in res.out:
        return "TRACEBACK", note
    if res.rc is not None and res.rc < 0:
        return "CRASH", f"killed by signal {-res.rc}" + (f"; {note}" if note else "")
    if "MemoryError" in res.err or "std::bad_alloc" in res.err:
        return "CRASH", f"out of memory under the {MEMORY_LIMIT_GIB[0]:g} GiB limit: {note}"
    if res.rc == 0:
        if case.expect == "refuse":
            return "SILENT-WRONG", "exit 0 where a refusal was expected; " + (_error_line(res.out) or "no output")
        problem = case.check(res) if case.check else None
        if problem:
            return "SILENT-WRONG", problem
        return "ok", case.ok_note or _summary(res)
    if case.expect == "ok":
        return "REFUSED-VALID", note
    if not lines:
        return "NO-MESSAGE", f"exit {res.rc}, nothing on stderr"
    extra = f" [{len(lines)} stderr lines]" if len(lines) > 2 or (len(lines) == 2 and "usage:" not in lines[0]) else ""
    return "clean", note + extra


# ---------------------------------------------------------------------------------------------- the inputs
def _photo(h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    """A small picture with an object: a bright disc on a textured background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = (rng.integers(0, 50, (h, w, 3)) + np.stack([yy * 2, xx * 2, (yy + xx)], -1)).astype(np.uint8)
    disc = (yy - h * 0.5) ** 2 + (xx - w * 0.45) ** 2 < (min(h, w) * 0.3) ** 2
    img[disc] = [230, 60, 40]
    return img


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG header announcing ``width x height`` pixels with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        _png_chunk(b"IEND", b"")  # fmt: skip


def _save_bytes(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def build_images(root: Path) -> dict[str, tuple[Path, str, tuple[int, int] | None]]:
    """name -> (path, expectation, upright (h, w) of a readable image)."""
    root.mkdir(parents=True)
    rgb = Image.fromarray(_photo())
    jpg, png = _save_bytes(rgb, "JPEG", quality=90), _save_bytes(rgb, "PNG")
    cases: dict[str, tuple[Path, str, tuple[int, int] | None]] = {}

    def add(name: str, data: bytes | Image.Image | None, expect: str, hw: tuple[int, int] | None = None,
            **save: Any) -> Path:  # fmt: skip
        path = root / name
        if isinstance(data, Image.Image):
            data.save(path, **save)
        elif data is not None:
            path.write_bytes(data)
        cases[name] = (path, expect, hw)
        return path

    add("truncated.jpg", jpg[: len(jpg) // 2], "refuse")
    add("truncated.png", png[: len(png) // 2], "refuse")
    add("zero_bytes.jpg", b"", "refuse")
    add("text_file.jpg", b"this is a text file, not a JPEG\n" * 4, "refuse")
    add("one_pixel.png", Image.fromarray(np.full((1, 1, 3), 128, np.uint8)), "refuse")
    add("strip_5000x3.png", Image.fromarray(np.tile(_photo(3, 50), (1, 100, 1))), "refuse")
    add("grey16.png", Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 30).astype(np.uint16)), "ok", (40, 48))
    add("cmyk.jpg", rgb.convert("CMYK"), "ok", (40, 48), format="JPEG")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    add("palette_transparent.png", pal, "ok", (40, 48), transparency=0)
    frames = [Image.fromarray(_photo(seed=s)).convert("P") for s in range(3)]
    add("animated.gif", None, "ok", (40, 48))
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    add("bomb_100000x100000.png", _bomb_png(100_000, 100_000), "refuse")
    stored = Image.fromarray(_photo(40, 64))  # stored 64 wide, 40 high; orientation 6: shown 40 wide, 64 high
    exif = stored.getexif()
    exif[0x0112] = 6
    add("exif_rotated.jpg", stored, "ok", (64, 40), format="JPEG", exif=exif.tobytes())
    add("grey.png", rgb.convert("L"), "ok", (40, 48))
    rgba = np.dstack([_photo(), np.linspace(0, 255, 40 * 48).reshape(40, 48).astype(np.uint8)])
    add("rgba.png", Image.fromarray(rgba, "RGBA"), "ok", (40, 48))
    add("one_bit.png", rgb.convert("1"), "ok", (40, 48))
    add("eps.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 48 40\nnewpath 0 0 moveto showpage\n", "refuse")
    (root / "folder.jpg").mkdir()  # a folder named like an image (empty)
    cases["folder.jpg"] = (root / "folder.jpg", "refuse", None)
    (root / "dangling.jpg").symlink_to(root / "no_such_file.jpg")  # root reads anything: a dangling link instead
    cases["dangling.jpg"] = (root / "dangling.jpg", "refuse", None)
    return cases


def image_cases(d: Path, ckpt: Path) -> list[Case]:
    out = []
    for name, (path, expect, hw) in build_images(d / "img").items():
        seg_out = d / "out" / f"img_seg_{name}"
        att_out = d / "out" / f"img_att_{name}"

        def seg_check(res: Result, seg_out: Path = seg_out, hw: tuple[int, int] | None = hw) -> str | None:
            recs = list((seg_out / "images").glob("*.json"))
            if len(recs) != 1:
                return f"exit 0 but {len(recs)} image records"
            rec = json.loads(recs[0].read_text())
            if hw is not None and (rec["height"], rec["width"]) != hw:
                return f"masks are {rec['height']}x{rec['width']}, the upright image {hw[0]}x{hw[1]}"
            for m in rec["masks"]:
                with Image.open(seg_out / m["file"]) as im:
                    if (im.height, im.width) != (rec["height"], rec["width"]):
                        return f"mask file {m['file']} is {im.height}x{im.width}"
            return None

        def att_check(res: Result, att_out: Path = att_out) -> str | None:
            figs = [p for p in att_out.rglob("*") if p.suffix in (".png", ".pdf", ".svg")] if att_out.exists() else []
            return None if figs else "exit 0 but no figure written"

        timeout = 120.0
        out.append(Case("image", f"image-{name}", ["segment", str(path), "--out", str(seg_out), "-c", str(ckpt),
                                                    "--no-progress"], expect, seg_check, timeout))  # fmt: skip
        out.append(Case("image", f"image-{name}", ["attention", str(path), "--out", str(att_out), "-c", str(ckpt)],
                        expect, att_check, timeout))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- COCO json
def _rle(mask: np.ndarray) -> dict[str, Any]:
    from crate_vis.io.coco import mask_to_rle

    return mask_to_rle(mask)


def _coco_objects() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[:40, :48]
    a = np.zeros((40, 48), bool)
    a[8:30, 6:30] = True
    b = (yy - 20) ** 2 / 12**2 + (xx - 30) ** 2 / 14**2 < 1
    return {"a.png": a, "b.png": b}


def build_coco_images(root: Path) -> None:
    """Two photos with an object each, ``a.png`` and ``b.png``."""
    root.mkdir(parents=True)
    for k, (name, m) in enumerate(_coco_objects().items()):
        img = _photo(seed=k + 5)
        img[m] = [230, 60, 40]
        Image.fromarray(img).save(root / name)


def gt_from_segment_output(seg: Path) -> dict[str, Any]:
    """A valid instance json whose objects are the segmentation's own masks (every protocol then scores 1) and
    whose ids (a.png: 2, b.png: 1) collide with the segmentation's own (1, 2): a pairing by id would show."""
    images, anns = [], []
    records = sorted((json.loads(p.read_text()) for p in (seg / "images").glob("*.json")), key=lambda r: r["file_name"])
    for k, rec in enumerate(records):
        image_id = len(records) - k
        images.append({"id": image_id, "file_name": rec["file_name"], "width": rec["width"], "height": rec["height"]})
        for m in rec["masks"]:
            with Image.open(seg / m["file"]) as im:
                mask = np.asarray(im) > 0
            ys, xs = np.nonzero(mask)
            box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 7, "segmentation": _rle(mask),
                         "area": float(mask.sum()), "bbox": box, "iscrowd": 0})  # fmt: skip
    return {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "blob"}]}


def _score_argv(pred: Path, gt: Path, protocol: str) -> list[str]:
    return ["score", "--pred", str(pred), "--gt", str(gt), "--protocol", protocol, "--json"]


def _value(res: Result, protocol: str) -> float | None:
    try:
        data = json.loads(res.out)
    except ValueError:
        return None
    return {"coco": lambda: data["segm"]["AP"], "jaccard": lambda: data["mean"], "corloc": lambda: data["corloc"]}[
        protocol
    ]()


def _equals(baseline: dict[str, float | None], protocol: str) -> Callable[[Result], str | None]:
    def check(res: Result) -> str | None:
        got, want = _value(res, protocol), baseline.get(protocol)
        if want is None:
            return None
        if got is None or abs(got - want) > 1e-9:
            return f"{protocol} {got} where the same predictions, well formed, score {want}"
        return None

    return check


def json_setup(d: Path, ckpt: Path) -> tuple[Path, dict[str, Any], Path, dict[str, float | None], list[Case]]:
    """The valid ground truth, a segmentation of its image folder (ids 1..N by file order: they collide with the
    ground truth's 2, 1), and the control scores every well-formed variant must reproduce."""
    build_coco_images(d / "coco")
    seg = d / "out" / "coco_seg"
    controls = []
    c = Case("json", "json-control-segment-folder", ["segment", str(d / "coco"), "--out", str(seg), "-c", str(ckpt),
                                                     "--no-progress"], "ok")  # fmt: skip
    c.result = call(c.argv)
    if c.result.rc != 0:
        raise SystemExit(f"the control segmentation failed: {c.result.err[-2000:]}")
    gt = gt_from_segment_output(seg)
    gt_path = d / "coco" / "gt.json"
    gt_path.write_text(json.dumps(gt))
    controls.append(c)
    baseline: dict[str, float | None] = {}
    for protocol in ("coco", "jaccard", "corloc"):
        c = Case("json", f"json-control-{protocol}", _score_argv(seg, gt_path, protocol), "ok",
                 _equals({protocol: 1.0}, protocol))  # fmt: skip
        c.result = call(c.argv)
        baseline[protocol] = _value(c.result, protocol) if c.result.rc == 0 else None
        controls.append(c)
    return gt_path, gt, seg, baseline, controls


def json_cases(d: Path, ckpt: Path, gt_path: Path, gt: dict[str, Any], seg: Path,
               baseline: dict[str, float | None]) -> list[Case]:  # fmt: skip
    root = gt_path.parent
    out: list[Case] = []

    def variant(name: str, data: Any = None, raw: bytes | None = None) -> Path:
        path = root / f"gt_{name}.json"
        path.write_bytes(raw if raw is not None else json.dumps(data).encode())
        return path

    def copy() -> dict[str, Any]:
        return json.loads(json.dumps(gt))

    # ---- malformed ground truth: fed as --gt to three protocols and as the input of segment
    # (name, path, expectation for score, expectation for segment); a json that fails to parse or has no usable
    # image list fails in the one reader every protocol shares: those go to --protocol coco only
    gts: list[tuple[str, Path, str, str]] = []
    parse_level = {"gt-missing-images", "gt-missing-annotations", "gt-missing-file-name", "gt-id-of-wrong-type",
                   "gt-duplicate-image-id", "gt-garbage-rle-counts", "gt-rle-of-another-size", "gt-non-utf8",
                   "gt-truncated", "gt-nested-200000-deep", "gt-sizes-disagree-with-files"}
    one_protocol = {"gt-nan-polygon": "jaccard"}  # slow: one protocol
    g = copy()
    del g["images"]
    gts.append(("gt-missing-images", variant("missing_images", g), "refuse", "refuse"))
    g = copy()
    del g["annotations"]
    gts.append(("gt-missing-annotations", variant("missing_annotations", g), "refuse", "either"))
    g = copy()
    del g["images"][0]["file_name"]
    gts.append(("gt-missing-file-name", variant("missing_file_name", g), "refuse", "refuse"))
    g = copy()
    g["images"][0]["id"] = [2]
    gts.append(("gt-id-of-wrong-type", variant("id_list", g), "refuse", "refuse"))
    g = copy()
    g["images"][1]["id"] = g["images"][0]["id"]
    gts.append(("gt-duplicate-image-id", variant("duplicate_id", g), "refuse", "refuse"))
    g = copy()
    for img in g["images"]:
        img["id"] = f"img-{img['id']}"
    for ann in g["annotations"]:
        ann["image_id"] = f"img-{ann['image_id']}"
    gts.append(("gt-string-image-ids", variant("string_ids", g), "either", "either"))
    g = copy()
    g["images"], g["annotations"] = [], []
    gts.append(("gt-empty-images-list", variant("empty_images", g), "refuse", "refuse"))
    g = copy()
    g["annotations"][0]["segmentation"] = {"size": [40, 48], "counts": "\x7f\x7fgarbage~~"}
    gts.append(("gt-garbage-rle-counts", variant("garbage_rle", g), "refuse", "either"))
    g = copy()
    g["annotations"][0]["bbox"] = [float("nan"), 0.0, 5.0, 5.0]
    gts.append(("gt-nan-bbox", variant("nan_box", g), "refuse", "either"))
    g = copy()
    g["annotations"][0]["segmentation"] = [[2.0, 2.0, float("nan"), 30.0, 30.0, 30.0, 30.0, 2.0]]
    gts.append(("gt-nan-polygon", variant("nan_polygon", g), "refuse", "either"))
    g = copy()
    g["annotations"][0]["segmentation"] = {"size": [10, 10], "counts": _rle(np.ones((10, 10), bool))["counts"]}
    gts.append(("gt-rle-of-another-size", variant("rle_size", g), "refuse", "either"))
    text = json.dumps(gt).encode().replace(b'"blob"', b'"bl\xff\xfeb"')
    gts.append(("gt-non-utf8", variant("non_utf8", raw=text), "refuse", "refuse"))
    full = json.dumps(gt).encode()
    gts.append(("gt-truncated", variant("truncated", raw=full[: len(full) // 2]), "refuse", "refuse"))
    gts.append(("gt-nested-200000-deep", variant("deep", raw=b'{"images": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
                "refuse", "refuse"))  # fmt: skip
    g = copy()
    for img in g["images"]:
        img["width"], img["height"] = 96, 80  # the files are 48 x 40
    gts.append(("gt-sizes-disagree-with-files", variant("wrong_sizes", g), "refuse", "either"))
    for name, path, exp_score, exp_seg in gts:
        protocols = ("coco",) if name in parse_level else ("coco", "jaccard", "corloc")
        for protocol in (one_protocol[name],) if name in one_protocol else protocols:
            check = _equals(baseline, protocol) if name == "gt-string-image-ids" else None
            c = Case("json", f"json-{name}", _score_argv(seg, path, protocol), exp_score, check)
            if name == "gt-nan-bbox" and protocol == "jaccard":  # Jaccard reads masks only: its number can be right
                c.expect, c.check = "either", _equals(baseline, protocol)
                c.ok_note = "accepted; Jaccard reads no boxes, its number is right"
            out.append(c)
        seg_out = d / "out" / f"json_seg_{name}"
        out.append(Case("json", f"json-{name}", ["segment", str(path), "--out", str(seg_out), "-c", str(ckpt),
                                                  "--no-progress"], exp_seg))  # fmt: skip
    g = copy()
    g["images"][0]["file_name"] = "../../../../../../etc/hostname"
    path = variant("path_traversal", g)
    out.append(Case("json", "json-gt-file-name-outside-the-root", ["segment", str(path), "--out",
                    str(d / "out" / "json_seg_traversal"), "-c", str(ckpt), "--no-progress"], "either",
                    lambda r: None if "hostname" in r.out + r.err else "an image outside the root was read silently"))

    # ---- malformed predictions: a results json as --pred (ids are the ground truth's), coco and corloc
    dets = []
    for ann in gt["annotations"]:
        dets.append({"image_id": ann["image_id"], "category_id": 1, "segmentation": ann["segmentation"],
                     "bbox": ann["bbox"], "score": 0.9})  # fmt: skip
    preds: list[tuple[str, Any, str]] = []
    preds.append(("pred-unknown-image-id", dets + [{**dets[0], "image_id": 404}], "refuse"))
    preds.append(("pred-garbage-rle-counts", [{**dets[0], "segmentation": {"size": [40, 48], "counts": "zz~~"}},
                                               dets[1]], "refuse"))  # fmt: skip
    preds.append(("pred-nan-box", [{**dets[0], "bbox": [0.0, 0.0, float("nan"), 3.0]}, dets[1]], "refuse"))
    preds.append(("pred-nan-score", [{**dets[0], "score": float("nan")}, dets[1]], "refuse"))
    preds.append(("pred-string-score", [{**dets[0], "score": "high"}, dets[1]], "refuse"))
    preds.append(("pred-not-a-list", {"results": dets}, "refuse"))
    preds.append(("pred-missing-image-id", [{k: v for k, v in dets[0].items() if k != "image_id"}, dets[1]], "refuse"))
    preds.append(("pred-rle-of-another-size", [{**dets[0], "segmentation": _rle(np.ones((10, 10), bool))}, dets[1]],
                  "refuse"))  # fmt: skip
    preds.append(("pred-listed-in-another-order", dets[::-1], "ok"))
    preds.append(("pred-empty-list", [], "either"))
    pred_root = root / "pred"
    pred_root.mkdir()
    perfect = {"coco": 1.0, "corloc": 1.0}
    both = {"pred-unknown-image-id", "pred-garbage-rle-counts", "pred-nan-box", "pred-nan-score",
            "pred-rle-of-another-size", "pred-listed-in-another-order"}  # the checks item 5 of issue 15 unified
    corloc_reads_boxes_only = {"pred-rle-of-another-size"}  # a valid box beside a bad mask: CorLoc may use the box
    for name, data, expect in preds:
        path = pred_root / f"{name}.json"
        path.write_text(json.dumps(data))
        for protocol in ("coco", "corloc") if name in both else ("coco",):
            if name == "pred-empty-list":
                check = (lambda p: lambda r: None if (_value(r, p) or 0.0) == 0.0 else "empty predictions scored > 0")(
                    protocol)
            else:
                check = _equals(perfect, protocol) if expect == "ok" else None
            c = Case("json", f"json-{name}", _score_argv(path, gt_path, protocol), expect, check)
            if protocol == "corloc" and name in corloc_reads_boxes_only:
                c.expect, c.check = "either", _equals(perfect, protocol)
                c.ok_note = "accepted (the box is right; the mask of another size that coco refuses is not checked)"
            out.append(c)
    path = pred_root / "pred-truncated.json"
    path.write_bytes(json.dumps(dets).encode()[:100])
    out.append(Case("json", "json-pred-truncated", _score_argv(path, gt_path, "coco"), "refuse"))

    # ---- a segmentation output whose image list was changed: coco (ids) and jaccard (names)
    def seg_variant(name: str, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]] | None]) -> Path:
        folder = root / f"seg_{name}"
        shutil.copytree(seg, folder)
        entries = json.loads((folder / "images.json").read_text())
        new = edit(entries)
        if new is None:
            (folder / "images.json").unlink()
        else:
            (folder / "images.json").write_text(json.dumps(new))
        return folder

    folder = seg_variant("no_images_json", lambda e: None)
    for protocol in ("coco", "jaccard"):
        out.append(Case("json", "json-segment-output-without-images.json", _score_argv(folder, gt_path, protocol),
                        "either", _equals(baseline, protocol)))  # fmt: skip
    folder = seg_variant("images_json_reordered", lambda e: e[::-1])
    for protocol in ("coco", "corloc"):
        out.append(Case("json", "json-segment-output-images.json-reordered", _score_argv(folder, gt_path, protocol),
                        "ok", _equals(baseline, protocol)))  # fmt: skip
    folder = seg_variant("images_json_unknown_file", lambda e: [{**e[0], "file_name": "zzz.png"}, *e[1:]])
    out.append(Case("json", "json-segment-output-names-an-unknown-image", _score_argv(folder, gt_path, "coco"),
                    "refuse"))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- checkpoints
class _Payload:
    """Pickles to a call of ``os.system``: loading it with plain pickle runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def checkpoint_cases(d: Path, ckpt: Path, image: Path) -> list[Case]:
    import torch

    from crate_vis import create_model, save_model

    root = d / "ckpt"
    root.mkdir()
    torch.manual_seed(0)
    model = create_model(MODEL)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    markers = d / "markers"  # stays empty unless a payload runs
    markers.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    items: list[tuple[str, Path, str, str, bool]] = []  # name, path, expect info, expect segment, needs --model

    def pth(name: str, obj: Any = None, raw: bytes | None = None) -> Path:
        path = root / name
        if raw is not None:
            path.write_bytes(raw)
        else:
            torch.save(obj, path)
        return path

    def folder(name: str) -> Path:
        path = root / name
        shutil.copytree(ckpt, path)
        return path

    items.append(("random-bytes", pth("random.pth", raw=rng.bytes(4096)), "refuse", "refuse", True))
    items.append(("empty-file", pth("empty.pth", raw=b""), "refuse", "refuse", True))
    whole = io.BytesIO()
    torch.save({"state_dict": sd}, whole)
    items.append(("truncated-pth", pth("truncated.pth", raw=whole.getvalue()[: len(whole.getvalue()) // 2]), "refuse",
                  "refuse", True))  # fmt: skip

    def touch(name: str) -> str:
        return f"touch {shlex.quote(str(markers / name))}"

    # inputs that carry code: one file per command, each with its own marker
    # (the marker of a file made for command ``tag`` is markers/<tag>-<file name>)
    hostile: list[tuple[str, Callable[[str], Path], bool]] = [
        ("plain-pickle-with-reduce-payload", lambda tag: pth(f"evil_pickle_{tag}.pth", raw=pickle.dumps(
            {"state_dict": sd, "x": _Payload(touch(f"{tag}-evil_pickle_{tag}.pth"))}, protocol=2)), True),
        ("torch-zip-with-reduce-payload", lambda tag: pth(f"evil_zip_{tag}.pth", {"state_dict": sd, "x": _Payload(
            touch(f"{tag}-evil_zip_{tag}.pth"))}), True),
    ]  # fmt: skip
    items.append(("missing-key", pth("missing.pth", {k: v for k, v in sd.items() if k != "blocks.1.ista.weight"}),
                  "refuse", "refuse", True))  # fmt: skip
    items.append(("extra-key", pth("extra.pth", {**sd, "blocks.7.attn.qkv.weight": torch.zeros(3, 3)}), "refuse",
                  "refuse", True))  # fmt: skip
    qkv = sd["blocks.0.attn.qkv.weight"]
    items.append(("mis-shaped-key", pth("misshaped.pth", {**sd, "blocks.0.attn.qkv.weight": torch.zeros(qkv.shape[0],
                  qkv.shape[1] + 1)}), "refuse", "refuse", True))  # fmt: skip
    alpha = create_model("crate_alpha_test_patch8_32").state_dict()
    items.append(("other-family-state-dict", pth("alpha.pth", alpha), "refuse", "refuse", True))
    npz = root / "weights.npz"
    np.savez(npz, **{k: v.numpy() for k, v in sd.items()})
    items.append(("npz-archive", npz, "refuse", "refuse", True))
    p = folder("edited_config")
    cfg = json.loads((p / "config.json").read_text())
    cfg.setdefault("kwargs", {})["depth"] = 5
    (p / "config.json").write_text(json.dumps(cfg))
    items.append(("safetensors-with-edited-config.json", p, "refuse", "refuse", False))

    def hostile_config(tag: str) -> Path:
        p = folder(f"hostile_config_{tag}")
        (p / "config.json").write_text(json.dumps({"model": "os.system", "kwargs": {"command": touch(f"{tag}-{p.name}")}}))
        return p

    hostile.append(("config.json-naming-a-function", hostile_config, False))
    p = folder("garbage_config")
    (p / "config.json").write_text("{not json")
    items.append(("config.json-not-json", p, "refuse", "refuse", False))
    p = folder("truncated_safetensors")
    st = p / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    items.append(("truncated-safetensors", p, "refuse", "refuse", False))
    nan_model = create_model(MODEL)
    with torch.no_grad():
        for prm in nan_model.parameters():
            prm.fill_(float("nan"))
    save_model(nan_model, root / "nan")
    items.append(("nan-weights", root / "nan", "either", "refuse", False))
    (root / "empty_dir").mkdir()
    items.append(("folder-without-weights", root / "empty_dir", "refuse", "refuse", False))
    (root / "dangling.pth").symlink_to(root / "nowhere.pth")
    items.append(("dangling-symlink", root / "dangling.pth", "refuse", "refuse", True))
    items.append(("control-valid-folder", ckpt, "ok", "ok", False))
    items.append(("control-half-precision-state-dict", pth("half.pth", {k: v.half() for k, v in sd.items()}), "ok",
                  "ok", True))  # fmt: skip
    out = []
    for name, make, needs_model in hostile:
        extra = ["-m", MODEL] if needs_model else []
        path = make("info")
        c = Case("checkpoint", f"ckpt-{name}", ["info", "-c", str(path), *extra])
        c.marker = markers / f"info-{path.name}"
        out.append(c)
        path = make("segment")
        c = Case("checkpoint", f"ckpt-{name}", ["segment", str(image), "--out", str(d / "out" / f"ckpt_seg_{name}"),
                                                 "-c", str(path), *extra, "--no-progress"])  # fmt: skip
        c.marker = markers / f"segment-{path.name}"
        out.append(c)
    for name, path, exp_info, exp_seg, needs_model in items:
        extra = ["-m", MODEL] if needs_model else []
        out.append(Case("checkpoint", f"ckpt-{name}", ["info", "-c", str(path), *extra], exp_info))
        if name == "control-valid-folder":
            continue  # every image case segments with it
        seg_out = d / "out" / f"ckpt_seg_{name}"
        out.append(Case("checkpoint", f"ckpt-{name}", ["segment", str(image), "--out", str(seg_out), "-c", str(path),
                                                        *extra, "--no-progress"], exp_seg))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- run folders
def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "images").glob("*.json"))]


def run_folder_cases(d: Path, ckpt: Path) -> list[Multi]:
    from crate_vis import create_model, save_model

    root = d / "runs"
    images = root / "images"
    images.mkdir(parents=True)
    for k in range(3):
        Image.fromarray(_photo(seed=20 + k)).save(images / f"p{k}.png")
    weights = root / "weights"
    shutil.copytree(ckpt, weights)
    multis: list[Multi] = []

    def seg_argv(out: Path, *extra: str) -> list[str]:
        return ["segment", str(images), "--out", str(out), "-c", str(weights), "--no-progress", *extra]

    def concurrent_train() -> tuple[str, str, str]:
        out = root / "train_twice"
        argv = ["train", "--data", "synthetic", "--model", MODEL, "--img-size", "32", "--epochs", "2", "--batch-size",
                "16", "--workers", "0", "--no-progress", "--out", str(out), "--set", "synthetic_train_images=320",
                "--set", "synthetic_val_images=32", "--set", "synthetic_classes=2"]  # fmt: skip
        with futures.ThreadPoolExecutor(2) as pool:
            a, b = pool.map(lambda _: call(argv, 600), range(2))
        repro = f"two at once: {shlex.join(['crate-vis', *argv])}"
        for r in (a, b):
            if TRACEBACK in r.err:
                return "TRACEBACK", _error_line(r.err), repro
        codes = sorted([a.rc, b.rc], key=lambda c: (c != 0, c))
        if codes[0] == 0 and codes[1] == 0:
            return "SILENT-WRONG", "both runs exit 0 into one folder", repro
        if codes[0] != 0:
            return "REFUSED-VALID", f"neither run finished: {_error_line(a.err)} / {_error_line(b.err)}", repro
        loser = a if a.rc != 0 else b
        if not (out / "best" / "model.safetensors").exists():
            return "SILENT-WRONG", "one run refused, but the folder holds no best/ weights", repro
        return "clean", "second run: " + _error_line(loser.err), repro

    multis.append(Multi("run-folder", "run-two-concurrent-train-into-one-out", concurrent_train))

    def used_out() -> tuple[str, str, str]:
        out = root / "seg_used"
        first = call(seg_argv(out))
        if first.rc != 0:
            return "REFUSED-VALID", "first run failed: " + _error_line(first.err), shlex.join(["crate-vis", *seg_argv(out)])
        stale = out / "masks" / "stale_0.png"
        stale.write_bytes((out / "masks" / "p0_0.png").read_bytes())
        again = call(seg_argv(out, "--method", "tokencut"))
        repro = f"{shlex.join(['crate-vis', *seg_argv(out)])}; then again with --method tokencut"
        c = Case("run-folder", "", [], "refuse")
        outcome, note = classify(c, again)
        if outcome != "clean":
            return outcome, note, repro
        over = call(seg_argv(out, "--method", "tokencut", "--overwrite"))
        if over.rc != 0:
            return "REFUSED-VALID", "--overwrite failed: " + _error_line(over.err), repro + " --overwrite"
        recs = _records(out)
        if stale.exists() or len(recs) != 3 or {r["settings"].get("method") for r in recs} != {"tokencut"}:
            return "SILENT-WRONG", "--overwrite left the earlier run's files or mixed records", repro + " --overwrite"
        return "clean", "rerun refused: " + note + "; --overwrite removed the old run", repro

    multis.append(Multi("run-folder", "run-segment-into-a-used-out", used_out))

    def replaced_weights() -> tuple[str, str, str]:
        out = root / "seg_resume"
        first = call(seg_argv(out))
        repro = f"{shlex.join(['crate-vis', *seg_argv(out)])}; save other weights at {weights}; again with --skip-existing"
        if first.rc != 0:
            return "REFUSED-VALID", "first run failed: " + _error_line(first.err), repro
        same = call(seg_argv(out, "--skip-existing"))
        if same.rc != 0:
            return "REFUSED-VALID", "--skip-existing with the same weights failed: " + _error_line(same.err), repro
        before = {p.name: p.read_bytes() for p in (out / "masks").iterdir()}
        import torch

        torch.manual_seed(123)
        shutil.rmtree(weights)
        save_model(create_model(MODEL), weights)  # other weights at the same path
        again = call(seg_argv(out, "--skip-existing"))
        if TRACEBACK in again.err:
            return "TRACEBACK", _error_line(again.err), repro
        if again.rc == 0:
            fresh_out = root / "seg_fresh"
            call(seg_argv(fresh_out))
            fresh = {p.name: p.read_bytes() for p in (fresh_out / "masks").iterdir()}
            now = {p.name: p.read_bytes() for p in (out / "masks").iterdir()}
            if now == before and now != fresh:
                return "SILENT-WRONG", "--skip-existing reused the masks of the replaced weights", repro
            return "ok", "redone with the new weights", repro
        return "clean", _error_line(again.err), repro

    multis.append(Multi("run-folder", "run-skip-existing-after-replacing-the-weights", replaced_weights))

    def concurrent_segment() -> tuple[str, str, str]:
        out = root / "seg_race"
        argvs = [seg_argv(out, "--method", "dino"), seg_argv(out, "--method", "tokencut")]
        with futures.ThreadPoolExecutor(2) as pool:
            a, b = pool.map(lambda argv: call(argv), argvs)
        repro = "at once: " + " & ".join(shlex.join(["crate-vis", *v]) for v in argvs)
        for r in (a, b):
            if TRACEBACK in r.err:
                return "TRACEBACK", _error_line(r.err), repro
        recs = _records(out)
        methods = {r["settings"].get("method") for r in recs}
        keys = {r["settings_key"] for r in recs}
        summary = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        if a.rc == 0 and b.rc == 0:
            if len(methods) > 1 or len(keys) > 1:
                return "SILENT-WRONG", f"both exit 0; records of {sorted(methods)} mixed in one folder", repro
            return "SILENT-WRONG", f"both exit 0 and report their masks; the folder holds only {sorted(methods)} " \
                                   f"records (run.json: {summary.get('settings', {}).get('method', '?')}): the other " \
                                   "run's output was replaced without a word (no lock, unlike train)", repro  # fmt: skip
        if a.rc != 0 and b.rc != 0:
            return "REFUSED-VALID", f"both failed: {_error_line(a.err)} / {_error_line(b.err)}", repro
        if len(methods) > 1 or len(keys) > 1:
            return "SILENT-WRONG", f"one refused, but records of {sorted(methods)} are mixed", repro
        loser = a if a.rc != 0 else b
        return "clean", "second run: " + _error_line(loser.err), repro

    multis.append(Multi("run-folder", "run-two-concurrent-segment-into-one-out", concurrent_segment))

    def stale_mask_scored() -> tuple[str, str, str]:
        out = root / "seg_used"  # written (and overwritten) above
        gt = root / "fg"
        gt.mkdir()
        for k in range(3):
            Image.fromarray(np.zeros((40, 48), np.uint8)).save(gt / f"p{k}.png")
        base = call(["score", "--pred", str(out), "--gt", str(gt), "--protocol", "jaccard", "--json"])
        Image.fromarray(np.full((40, 48), 255, np.uint8)).save(out / "masks" / "p0_7.png")  # a stray mask file
        again = call(["score", "--pred", str(out), "--gt", str(gt), "--protocol", "jaccard", "--json"])
        repro = f"crate-vis segment ... --out {out}; add masks/p0_7.png; crate-vis score --pred {out} --gt {gt} " \
                "--protocol jaccard"  # fmt: skip
        if TRACEBACK in again.err:
            return "TRACEBACK", _error_line(again.err), repro
        if base.rc != 0:
            return "REFUSED-VALID", _error_line(base.err), repro
        if again.rc == 0 and _value(again, "jaccard") != _value(base, "jaccard"):
            return "SILENT-WRONG", "a stray mask file changed the score", repro
        return ("ok", "the stray file is not read (masks come from images/*.json)", repro) if again.rc == 0 else \
            ("clean", _error_line(again.err), repro)  # fmt: skip

    multis.append(Multi("run-folder", "run-score-a-folder-with-a-stray-mask", stale_mask_scored))

    def train_out_is_a_file() -> tuple[str, str, str]:
        f = root / "a_file"
        f.write_text("not a folder")
        argv = ["train", "--data", "synthetic", "--model", MODEL, "--out", str(f), "--epochs", "1", "--no-progress",
                "--set", "synthetic_train_images=8", "--set", "synthetic_val_images=8"]  # fmt: skip
        res = call(argv)
        c = Case("run-folder", "", argv, "refuse")
        return (*classify(c, res), shlex.join(["crate-vis", *argv]))

    multis.append(Multi("run-folder", "run-train-out-is-a-file", train_out_is_a_file))

    def resume_nothing() -> tuple[str, str, str]:
        argv = ["train", "--out", str(root / "never_ran"), "--resume", "--no-progress"]
        res = call(argv)
        return (*classify(Case("run-folder", "", argv, "refuse"), res),
                shlex.join(["crate-vis", *argv]))  # fmt: skip

    multis.append(Multi("run-folder", "run-resume-a-folder-that-never-ran", resume_nothing))
    return multis


# ---------------------------------------------------------------------------------------------- main
def _reproducer(case: Case) -> str:
    return shlex.join(["crate-vis", *case.argv])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", default=None, help="build inputs and outputs in this folder and keep them")
    parser.add_argument("--only", default=None, help="run only cases whose name contains this text")
    parser.add_argument("--jobs", type=int, default=1, help="subprocesses at a time (default 1)")
    parser.add_argument("--mem-gib", type=float, default=8.0, help="address-space limit per call (default 8 GiB)")
    args = parser.parse_args()
    MEMORY_LIMIT_GIB[0] = args.mem_gib
    if args.keep:
        d = Path(args.keep).resolve()
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    else:
        d = Path(tempfile.mkdtemp(prefix="crate-vis-adversarial-"))
    t0 = time.perf_counter()
    try:
        import torch

        from crate_vis import create_model, save_model

        torch.set_num_threads(1)
        torch.manual_seed(0)
        ckpt = d / "model"
        save_model(create_model(MODEL), ckpt)
        (d / "out").mkdir()
        good = d / "good.png"
        Image.fromarray(_photo()).save(good)

        def wanted(name: str) -> bool:
            return args.only is None or args.only in name

        cases: list[Case] = []
        controls: list[Case] = []
        cases += image_cases(d, ckpt)
        gt_path, gt, seg, baseline, controls = json_setup(d, ckpt)  # the controls: always run, shown when wanted
        cases += json_cases(d, ckpt, gt_path, gt, seg, baseline)
        controls = [c for c in controls if wanted(c.name)]
        cases += checkpoint_cases(d, ckpt, good)
        cases = [c for c in cases if wanted(c.name)]
        multis = [m for m in run_folder_cases(d, ckpt) if wanted(m.name)]
        for c in controls:
            assert c.result is not None
            c.outcome, c.note = classify(c, c.result)

        def run_one(c: Case) -> Case:
            c.result = call(c.argv, c.timeout)
            return c

        done = 0
        total = len(cases) + len(multis)
        with futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for c in pool.map(run_one, cases):
                assert c.result is not None
                c.outcome, c.note = classify(c, c.result)
                c.reproduce = _reproducer(c)
                done += 1
                print(f"[{done}/{total}] {c.outcome:<14} {c.name} ({c.argv[0]})", file=sys.stderr, flush=True)
        for m in multis:
            t = time.perf_counter()
            m.outcome, m.note, m.reproduce = m.run()
            m.seconds = time.perf_counter() - t
            done += 1
            print(f"[{done}/{total}] {m.outcome:<14} {m.name}", file=sys.stderr, flush=True)
        for c in controls:
            c.reproduce = _reproducer(c)

        rows: list[tuple[str, str, str, str, str, str, str]] = []
        for c in [*controls, *cases]:
            assert c.result is not None
            rows.append((c.group, c.name, c.argv[0] + (" " + c.argv[c.argv.index("--protocol") + 1] if "--protocol"
                         in c.argv else ""), str(c.result.rc), f"{c.result.seconds:.1f}", c.outcome, c.note))  # fmt: skip
        for m in multis:
            rows.append((m.group, m.name, "(several)", "-", f"{m.seconds:.1f}", m.outcome, m.note))
        if not rows:
            print(f"no case name contains {args.only!r}")
            return 1
        width = max(len(r[1]) for r in rows)
        print(f"{'group':<11} {'case':<{width}} {'command':<15} {'rc':>4} {'secs':>6}  {'outcome':<16} note")
        for r in rows:
            print(f"{r[0]:<11} {r[1]:<{width}} {r[2]:<15} {r[3]:>4} {r[4]:>6}  {r[5]:<16} {r[6][:150]}")
        print()
        groups = ("image", "json", "checkpoint", "run-folder")
        kinds = {g: len({r[1] for r in rows if r[0] == g}) for g in groups}
        outcomes = sorted({r[5] for r in rows}, key=lambda o: (o not in ("clean", "ok"), o))
        print("counts (calls) per group and outcome")
        print(f"{'group':<11} {'kinds':>5} {'calls':>5}  " + "  ".join(f"{o:>16}" for o in outcomes))
        for g in groups:
            cnt = Counter(r[5] for r in rows if r[0] == g)
            print(f"{g:<11} {kinds[g]:>5} {sum(cnt.values()):>5}  " + "  ".join(f"{cnt.get(o, 0):>16}" for o in outcomes))
        cnt = Counter(r[5] for r in rows)
        print(f"{'all':<11} {sum(kinds.values()):>5} {len(rows):>5}  " + "  ".join(f"{cnt.get(o, 0):>16}" for o in outcomes))
        stray = sorted(p.name for p in (d / "markers").iterdir()) if (d / "markers").exists() else []
        if stray:
            print(f"\nHOSTILE-CODE-RAN: marker files {stray}")
        bad = [c for c in [*controls, *cases] if c.outcome not in ("clean", "ok")] + \
              [m for m in multis if m.outcome not in ("clean", "ok")]  # fmt: skip
        if bad:
            print("\nfailures (inputs are rebuilt with --keep DIR; the paths below are from this run):")
            for x in bad:
                print(f"* {x.outcome} {x.name}: {x.note[:300]}\n    {x.reproduce}")
        print(f"\n{len(rows)} calls in {time.perf_counter() - t0:.0f} s; inputs in {d}"
              + ("" if args.keep else " (removed)"))  # fmt: skip
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""The segmentation output folder: its layout, its writer and its reader, and the one rule for output names.

Layout of a folder written by :func:`crate_vis.experiments.segment.segment_images` (``crate-vis segment``)::

    OUT/masks/<name>_<k>.png     mask k at the image's own resolution, 0/255
    OUT/overlays/<name>.png|jpg  the masks drawn over the image (optional)
    OUT/images/<name>.json       per image: file name, id, size, geometry, settings key, every mask's score, box,
                                 area and RLE. Written last: its presence means the image is done.
    OUT/results.json             COCO results (image_id, category_id 1, RLE segmentation, score, bbox)
    OUT/images.json              the COCO "images" list the ids refer to, with each image's file_name
    OUT/run.json                 settings, the settings key, counts, failures
    OUT/shards/<i>-of-<n>.json   one manifest per shard of a sharded run (see below)

Scores are matched to ground truth by **file name**, which every record carries; ids are only a convenience.

A run folder belongs to one run: :func:`claim_folder` refuses a folder holding another run's outputs unless asked
to resume (same settings) or overwrite (the old run's files are removed first).

Example:
    >>> from pathlib import Path
    >>> output_names([Path("a/img.jpg"), Path("b/img.jpg"), Path("c/x.png")])
    ['a__img', 'b__img', 'x']
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DatasetError, RunFolderError
from .atomic import atomic_save, atomic_write_json
from .coco import result_entry, write_results
from .images import IMAGE_EXTENSIONS, read_label_png
from .jsonfile import read_json

__all__ = [
    "SCHEMA", "output_names", "ImageRecord", "record_path", "write_image", "read_done", "clean_temporaries",
    "claim_folder", "write_summary", "SegmentOutput", "is_segment_output", "load_segment_output",
    "load_prediction_masks", "PREDICTION_PATTERN", "settings_key", "read_records",
]  # fmt: skip

#: Version of the per-image record layout.
SCHEMA = 2

#: Decimals of the mask scores written.
SCORE_DECIMALS = 6

#: ``<stem>[_mask|_masks][_head<k>|<k>].(png|npy)`` of a plain prediction folder.
PREDICTION_PATTERN = re.compile(r"^(?P<stem>.+?)(?:_masks?)?(?:_head(?P<head>\d+)|(?<=_mask)(?P<num>\d+))?$")

_OUTPUT_DIRS = ("masks", "overlays", "images", "shards")
_OUTPUT_FILES = ("results.json", "images.json", "run.json")


# --------------------------------------------------------------------------------------------------------- names
def output_names(paths: Sequence[Path]) -> list[str]:
    """One output name per input: the file stem, lengthened only where two inputs would share one.

    ``a/img.jpg`` and ``b/img.jpg`` become ``a__img`` and ``b__img`` (parent folders joined by ``__``);
    ``x/q.jpg`` and ``x/q.png`` become ``q_jpg`` and ``q_png``; stems that clash with nothing stay as they are.
    Stable for a given input list; every command that names files after inputs uses this rule.
    """
    if not paths:
        return []
    stems = [[part for part in Path(p).with_suffix("").parts if part != Path(p).anchor] for p in paths]
    names = [s[-1] for s in stems]
    depth = [1] * len(paths)
    with_ext = [False] * len(paths)
    for _ in range(max(len(s) for s in stems) + 2):
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n, []).append(i)
        clashes = [idx for idx in groups.values() if len(idx) > 1]
        if not clashes:
            break
        for idx in clashes:
            for i in idx:
                twin = any(stems[j] == stems[i] for j in idx if j != i)  # same path apart from the extension
                if twin and not with_ext[i]:
                    with_ext[i] = True
                else:
                    depth[i] = min(depth[i] + 1, len(stems[i]))
                ext = "_" + Path(paths[i]).suffix.lstrip(".").lower() if with_ext[i] else ""
                names[i] = "__".join(stems[i][-depth[i] :]) + ext
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # a stem that itself looks like a lengthened name ("a__img"): number it
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n}_{seen[n]}"
    return names


def settings_key(settings: Mapping[str, Any]) -> str:
    """A short stable hash of the settings that decide the masks (method, layer, sizes, the weights' hash...)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -------------------------------------------------------------------------------------------------------- writer
@dataclass
class ImageRecord:
    """What is known of one input before it is segmented."""

    path: Path
    name: str
    image_id: Any
    file_name: str


def record_path(out: Path, name: str) -> Path:
    """The per-image record of ``name``."""
    return Path(out) / "images" / f"{name}.json"


def _save_png(path: Path, array: np.ndarray) -> None:
    atomic_save(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def _save_overlay(path: Path, array: np.ndarray, fmt: str) -> None:
    if fmt == "jpg":
        atomic_save(path, lambda tmp: Image.fromarray(array).save(tmp, format="JPEG", quality=90))
    else:
        _save_png(path, array)


def write_image(
    out: Path,
    item: ImageRecord,
    masks: np.ndarray,
    scores: np.ndarray,
    *,
    geometry: Mapping[str, Any],
    grid: Sequence[int],
    settings_id: str,
    settings: Mapping[str, Any] | None = None,
    note: str = "",
    overlay: np.ndarray | None = None,
    overlay_format: str = "png",
) -> dict[str, Any]:
    """Write one image's masks (``(K, H, W)`` bool at the image's resolution), its overlay and, last, its record.

    Returns:
        The record (as written to ``images/<name>.json``).
    """
    out = Path(out)
    h, w = int(masks.shape[-2]), int(masks.shape[-1])
    entries = []
    for k, (m, s) in enumerate(zip(masks, scores)):
        rel = f"masks/{item.name}_{k}.png"
        _save_png(out / rel, m.astype(np.uint8) * 255)
        # scores rounded to 6 decimals: float noise of batch composition (which images share a forward pass) must
        # not make a sharded run's files differ from a single process's
        entry = result_entry(item.image_id, m, round(float(s), SCORE_DECIMALS))
        entries.append({"file": rel, **{key: entry[key] for key in ("score", "bbox", "area", "segmentation")}})
    if overlay is not None:
        _save_overlay(out / "overlays" / f"{item.name}.{overlay_format}", overlay, overlay_format)
    rec = {
        "schema": SCHEMA,
        "name": item.name,
        "image_id": item.image_id,
        "file_name": item.file_name,
        "source": str(item.path),
        "width": w,
        "height": h,
        "geometry": dict(geometry),
        "grid": [int(grid[0]), int(grid[1])],
        "settings_key": settings_id,
        "settings": dict(settings or {}),
        "masks": entries,
        "note": note,
    }
    atomic_write_json(record_path(out, item.name), rec, indent=1)  # last: its presence means the image is done
    return rec


def read_done(out: Path, item: ImageRecord, settings_id: str) -> dict[str, Any] | None:
    """The record of an image already done with the same settings (weights hash included), else ``None``."""
    path = record_path(out, item.name)
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return None
    if rec.get("settings_key") != settings_id or rec.get("source") != str(item.path):
        return None
    if not all((Path(out) / m["file"]).is_file() for m in rec.get("masks", [])):
        return None
    return rec


def clean_temporaries(out: Path) -> None:
    """Remove temporary files that an interrupted run's atomic writes left behind (``.<name>.<random>.tmp*``)."""
    pattern = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9]+)?$")
    for sub in (out, *(out / d for d in _OUTPUT_DIRS)):
        if sub.is_dir():
            for p in sub.iterdir():
                if p.is_file() and pattern.match(p.name):
                    p.unlink()


def _previous_key(out: Path) -> str | None:
    """The settings key of the run that used ``out`` before (from ``run.json`` or any record), or ``None``."""
    run = out / "run.json"
    if run.is_file():
        try:
            return json.loads(run.read_text(encoding="utf-8")).get("settings_key")
        except (OSError, ValueError):
            return "unreadable"
    for rec in sorted((out / "images").glob("*.json"))[:1] if (out / "images").is_dir() else []:
        try:
            return json.loads(rec.read_text(encoding="utf-8")).get("settings_key") or "unknown"
        except (OSError, ValueError):
            return "unreadable"
    return None


def claim_folder(out: Path, settings_id: str, mode: str = "new", clean: bool = True) -> None:
    """Make ``out`` this run's folder.

    Args:
        out: the output folder (created).
        settings_id: :func:`settings_key` of this run.
        mode: ``"new"`` refuses a folder with another run's outputs; ``"resume"`` keeps a folder whose outputs have
            the same settings (and refuses one with other settings); ``"overwrite"`` removes what a previous run
            wrote (masks, overlays, records, results, shard manifests) and starts afresh.
        clean: remove temporaries an interrupted run left (not while other shards may be writing into the folder).

    Raises:
        RunFolderError: the folder holds another run's outputs and ``mode`` does not allow using it.
    """
    out = Path(out)
    if mode not in ("new", "resume", "overwrite"):
        raise ValueError(f"mode must be 'new', 'resume' or 'overwrite', got {mode!r}")
    previous = _previous_key(out) if out.is_dir() else None
    if previous is not None:
        if mode == "overwrite":
            for d in _OUTPUT_DIRS:
                shutil.rmtree(out / d, ignore_errors=True)
            for f in _OUTPUT_FILES:
                (out / f).unlink(missing_ok=True)
        elif mode == "resume" and previous != settings_id:
            raise RunFolderError(
                f"{out} holds a segmentation with other settings (or other weights); --skip-existing resumes only "
                "the same run: use --overwrite to replace it, or another --out"
            )
        elif mode == "new":
            raise RunFolderError(
                f"{out} already holds segmentation outputs; pass --skip-existing to resume that run, --overwrite to "
                "replace it, or another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    if clean:
        clean_temporaries(out)


def write_summary(
    out: Path, records: Sequence[dict[str, Any]], run_info: Mapping[str, Any]
) -> int:
    """Write ``results.json``, ``images.json`` and ``run.json`` from the per-image records, in the given order.

    Returns:
        The number of masks written to ``results.json``.
    """
    out = Path(out)
    entries = [
        {"image_id": rec["image_id"], "category_id": 1, **{k: m[k] for k in ("segmentation", "score", "bbox", "area")}}
        for rec in records
        for m in rec["masks"]
    ]
    write_results(out / "results.json", entries)
    atomic_write_json(
        out / "images.json",
        [{"id": r["image_id"], "file_name": r["file_name"], "width": r["width"], "height": r["height"],
          "name": _name_of(r)} for r in records],
    )  # fmt: skip
    atomic_write_json(out / "run.json", {**run_info, "masks": len(entries)}, indent=1)
    return len(entries)


def _name_of(rec: Mapping[str, Any]) -> str:
    return str(rec.get("name") or Path(str(rec.get("file_name", ""))).stem)


def read_records(out: Path) -> list[dict[str, Any]]:
    """Every per-image record under ``out/images``, sorted by name, with ``name`` filled in.

    Raises:
        DatasetError: an unreadable record.
    """
    recs = []
    for rec_path in sorted((Path(out) / "images").glob("*.json")):
        rec = read_json(rec_path, "segment record")  # any defect (nesting too deep included) is one line
        if not isinstance(rec, dict):
            raise DatasetError(rec_path, "segment record", "not a JSON object")
        rec["name"] = rec_path.stem
        recs.append(rec)
    return recs


# -------------------------------------------------------------------------------------------------------- reader
@dataclass
class SegmentOutput:
    """A segmentation output folder, keyed by each image's ``file_name`` (as recorded).

    Attributes:
        masks: file name -> ``(K, H, W)`` bool (``K >= 1``; an image without masks has one empty mask).
        scores: file name -> ``(K,)`` float (empty for an image without masks).
        grids: file name -> token grid ``(gh, gw)`` the masks were computed on.
        geometries: file name -> how the image became the model input (an
            :class:`~crate_vis.data.image_geometry.ImageGeometry` as a dict).
        image_ids: file name -> the ``image_id`` used in ``results.json``.
        names: file name -> output name.
    """

    masks: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    grids: dict[str, tuple[int, int]] = field(default_factory=dict)
    geometries: dict[str, dict[str, Any]] = field(default_factory=dict)
    image_ids: dict[str, Any] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)


def is_segment_output(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a segmentation output (per-image records under ``images/``)."""
    root = Path(folder)
    return root.is_dir() and (root / "images").is_dir() and any((root / "images").glob("*.json"))


def _read_pred_file(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DatasetError(path, "prediction", f"unreadable ({err})") from None
        if arr.ndim not in (2, 3):
            raise DatasetError(path, "prediction", f"expected (H, W) or (heads, H, W), got shape {arr.shape}")
        arr = arr if arr.ndim == 3 else arr[None]
    else:
        arr = read_label_png(path)[None]
    return arr != 0


def load_segment_output(folder: str | os.PathLike[str]) -> SegmentOutput:
    """Read a segmentation output folder through its per-image records.

    Raises:
        DatasetError: unreadable records, missing mask files, masks of another size than the record says, or two
            records of one file name.
    """
    root = Path(folder)
    out = SegmentOutput()
    for rec in read_records(root):
        rec_path = record_path(root, rec["name"])
        try:
            file_name = str(rec["file_name"])
            h, w = int(rec["height"]), int(rec["width"])
            grid = (int(rec["grid"][0]), int(rec["grid"][1]))
            entries = list(rec["masks"])
            image_id = rec["image_id"]
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise DatasetError(rec_path, "segment record", f"unreadable ({err})") from None
        if not isinstance(rec.get("geometry"), Mapping):
            raise DatasetError(rec_path, "segment record", "no 'geometry': written by an older crate-vis; segment again")
        if file_name in out.masks:
            raise DatasetError(rec_path, "segment record", f"a second image with file name {file_name!r}")
        arrs, scores = [], []
        for k, entry in enumerate(entries):
            if "file" not in entry:
                raise DatasetError(rec_path, f"masks[{k}]", "missing key 'file'")
            m = _read_pred_file(root / entry["file"])[0]
            if m.shape != (h, w):
                raise DatasetError(root / entry["file"], "mask", f"is {m.shape[0]}x{m.shape[1]}, the record says {h}x{w}")
            arrs.append(m)
            scores.append(float(entry.get("score", 0.0)))
        out.masks[file_name] = np.stack(arrs) if arrs else np.zeros((1, h, w), dtype=bool)
        out.scores[file_name] = np.asarray(scores, dtype=np.float64)
        out.grids[file_name] = grid
        out.geometries[file_name] = dict(rec["geometry"])
        out.image_ids[file_name] = image_id
        out.names[file_name] = rec["name"]
    if not out.masks:
        raise DatasetError(root, "segment output", "no per-image records under images/")
    return out


def load_prediction_masks(folder: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Predicted masks keyed by image file name (segmentation output) or file stem (a plain folder).

    A plain folder holds, per image stem ``S``, one of: ``S.png`` / ``S_mask.png`` (one mask, non-zero =
    foreground); ``S_mask_head<k>.png`` / ``S_head<k>.png`` / ``S_mask<k>.png`` (one mask per head, stacked in ``k``
    order); ``S.npy`` / ``S_masks.npy`` (``(H, W)`` or ``(heads, H, W)``).

    Returns:
        key -> ``(heads, H, W)`` bool (``heads`` = 1 for a single mask).

    Raises:
        DatasetError: an empty folder, heads of different sizes, a stem with both single and per-head files, or
            per-head files whose numbers are not ``0 .. K-1``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(root, "prediction folder", "not found")
    if is_segment_output(root):
        return load_segment_output(root).masks
    groups: dict[str, dict[int | None, Path]] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in (".png", ".npy") or not p.is_file():
            continue
        m = PREDICTION_PATTERN.match(p.stem)
        if m is None:  # pragma: no cover - the pattern matches every non-empty stem
            continue
        head = m.group("head") or m.group("num")
        key = None if head is None else int(head)
        slot = groups.setdefault(m.group("stem"), {})
        if key in slot:
            raise DatasetError(p, "prediction", f"clashes with {slot[key]} (same image stem and head)")
        slot[key] = p
    if not groups:
        raise DatasetError(root, "prediction folder", "no .png or .npy masks")
    out: dict[str, np.ndarray] = {}
    for stem, files in groups.items():
        if None in files and len(files) > 1:
            raise DatasetError(files[None], "prediction", f"stem {stem!r} has both a single mask and per-head masks")
        if None in files:
            out[stem] = _read_pred_file(files[None])
            continue
        heads = sorted(k for k in files if k is not None)  # None (a single mask) was handled above
        if heads != list(range(len(heads))):
            raise DatasetError(root, f"prediction {stem!r}", f"head numbers {heads} are not 0..{len(heads) - 1}")
        arrs = [_read_pred_file(files[k]) for k in heads]
        shapes = {a.shape[1:] for a in arrs}
        if len(shapes) > 1:
            raise DatasetError(root, f"prediction {stem!r}", f"per-head masks of different sizes {sorted(shapes)}")
        out[stem] = np.concatenate(arrs, axis=0)
    return out


def image_files(folder: str | os.PathLike[str]) -> Iterable[Path]:  # pragma: no cover - convenience
    """Image files directly in ``folder`` (by extension)."""
    return (p for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS)

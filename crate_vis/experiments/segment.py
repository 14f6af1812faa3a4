"""Segment many images: the Python side of ``crate-vis segment``, on one process, many processes or job arrays.

:func:`segment_images` reads images (files, folders, COCO jsons), prepares them for the model in data-loader workers
(:mod:`crate_vis.data.image_geometry`), segments batches (:func:`crate_vis.segmentation.run.segment_batch`, the
cuts' eigen-solves spread over a thread pool), brings the grid masks onto each photo (nearest), refines them there
when ``SegmentConfig.refine`` asks (:func:`crate_vis.segmentation.bilateral.refine_masks`, on the photo itself) and
writes the output folder of :mod:`crate_vis.io.segment_output`. The settings (and their key, which decides what
``--skip-existing`` may reuse) include the refinement, so refined and unrefined runs never share a folder.

**Sharding.** ``shard=(i, n)`` segments the inputs ``i, i + n, i + 2n, ...`` of the input list (a deterministic split)
and writes a shard manifest; :func:`merge_shards` (``crate-vis segment --merge OUT``) checks that all ``n`` shards
are complete and ran with the same settings, then writes ``results.json`` and ``images.json`` exactly as one
process would have. Under ``torchrun`` the rank and world size set the shard, each rank uses its own device, and
rank 0 merges once every rank is done.

**One run per folder.** A run takes the folder's lock, ``OUT/run.lock`` (:mod:`crate_vis.io.runlock`, as
``crate-vis train`` does), so a second run into the same ``--out`` stops with one line naming the first one's pid
instead of replacing its outputs. Shards share their folder by design: each takes only the lock of its own part,
``OUT/shard-<i>-of-<n>.lock``, so a second run of the same shard is refused while the other shards run on; a
whole-folder run (or a merge) and a shard exclude each other. A lock left by a killed run is reclaimed.

Example:
    >>> import tempfile, numpy as np
    >>> from PIL import Image
    >>> from crate_vis import create_model
    >>> tmp = tempfile.mkdtemp()
    >>> Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(f"{tmp}/a.png")
    >>> model = create_model("crate_test_patch8_32").eval()
    >>> summary = segment_images([f"{tmp}/a.png"], model, f"{tmp}/out", SegmentRunConfig(size=32, progress=False))
    >>> summary["processed"]
    1
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.image_geometry import DEFAULT_MAX_INPUT_SIDE, UNNAMED_IMAGE, plan_geometry, prepare_image, skip_reason
from ..errors import DatasetError, ImageLoadError, RunFolderError, UsageError
from ..io.atomic import atomic_write_json
from ..io.coco import coco_image_path, find_image_root, load_coco_json
from ..io.images import SkipReport, image_size, list_images, load_image
from ..io.runlock import LOCK_NAME, RunLock, busy_message, live_holder
from ..io.segment_output import (
    ImageRecord,
    claim_folder,
    clean_temporaries,
    output_names,
    read_done,
    read_records,
    settings_key,
    write_image,
    write_summary,
)
from ..models.geometry import model_input_size, model_patch_size
from ..segmentation.bilateral import BilateralParams, refine_masks
from ..segmentation.run import SegmentConfig, segment_batch

__all__ = [
    "SegmentRunConfig", "collect_inputs", "segment_images", "merge_shards", "weights_digest", "parse_shard", "local_device",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Inputs whose model input would exceed this many pixels get a warning (the forward pass grows with the square).
LARGE_INPUT_PIXELS = 1024 * 1024


@dataclass(frozen=True)
class SegmentRunConfig:
    """How to segment a set of images (the flags of ``crate-vis segment``).

    Attributes:
        segment: the method and its settings (:class:`~crate_vis.segmentation.run.SegmentConfig`).
        size: short side of the model input (default: the model's training size).
        square: resize to ``size x size`` (MaskCut's fixed-size input) instead of keeping the aspect ratio.
        max_side: the longest model input accepted.
        batch_size: images per forward pass.
        workers: data-loading processes that decode and resize (0: in this process).
        cut_workers: threads over which the cuts' eigen-solves of a batch are spread (1: none).
        overlay: write overlays (``"png"``, ``"jpg"`` or ``None``).
        mode: ``"new"`` (refuse a used folder), ``"resume"`` (skip images done with the same settings and weights)
            or ``"overwrite"`` (remove the previous run's outputs first).
        shard: ``(index, count)`` of this process's share of the inputs, or ``None``.
        strict: stop at the first unreadable image instead of skipping it.
        progress: show a progress bar (default: when writing to a terminal).
        image_root: folder a COCO json's ``file_name`` entries are under (default: found beside it).
    """

    segment: SegmentConfig = field(default_factory=SegmentConfig)
    size: int | None = None
    square: bool = False
    max_side: int | None = DEFAULT_MAX_INPUT_SIDE
    batch_size: int = 8
    workers: int = 0
    cut_workers: int = 1
    overlay: str | None = "png"
    mode: str = "new"
    shard: tuple[int, int] | None = None
    strict: bool = False
    progress: bool | None = None
    image_root: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers < 0 or self.cut_workers < 1:
            raise UsageError(f"--workers must be >= 0 and --cut-workers >= 1, got {self.workers}, {self.cut_workers}")
        if self.size is not None and (isinstance(self.size, bool) or self.size < 1):
            raise UsageError(f"--img-size must be a positive number of pixels, got {self.size}")
        if self.max_side is not None and self.max_side < 1:
            raise UsageError(f"--max-side must be positive, got {self.max_side}")
        if self.overlay not in (None, "png", "jpg"):
            raise UsageError(f"--overlay-format must be png or jpg, got {self.overlay!r}")
        if self.mode not in ("new", "resume", "overwrite"):
            raise UsageError(f"mode must be new, resume or overwrite, got {self.mode!r}")
        if self.shard is not None:
            i, n = self.shard
            if not (isinstance(n, int) and n >= 1 and isinstance(i, int) and 0 <= i < n):
                raise UsageError(f"--shard must be i/N with 0 <= i < N, got {i}/{n}")


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``.

    Raises:
        UsageError: not ``i/N`` with ``0 <= i < N``.
    """
    try:
        a, b = text.split("/")
        i, n = int(a), int(b)
    except ValueError:
        raise UsageError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise UsageError(f"--shard {text}: the index must be in 0..{n - 1}")
    return i, n


# ------------------------------------------------------------------------------------------------------- inputs
def collect_inputs(
    inputs: Sequence[str | os.PathLike[str]], image_root: str | None = None, report: SkipReport | None = None
) -> list[ImageRecord]:
    """Expand files, folders and COCO jsons into a de-duplicated, ordered list of images with names and ids.

    COCO jsons give their own image ids and file names (images found with :func:`crate_vis.io.coco.find_image_root`
    unless ``image_root`` says); other images are numbered after the largest of those, in input order, and named by
    their path relative to the folder given.

    Raises:
        DatasetError: a json that is not a COCO file, or one listing an image id twice.
        FileNotFoundError: an input that does not exist or an empty folder, when there is no ``report`` to note it
            in or nothing else to segment.
    """
    found: list[tuple[Path, Any, str]] = []
    problems: list[tuple[Path, str]] = []  # reported once it is known whether anything is left to do
    for spec in inputs:
        p = Path(spec)
        if p.is_file() and p.suffix.lower() == ".json":
            data = load_coco_json(p)
            if not isinstance(data, dict) or not isinstance(data.get("images"), list):
                raise DatasetError(p, "top level", "not a COCO annotation file (no 'images' list)")
            root = Path(image_root) if image_root else find_image_root(p, data)
            seen_ids: dict[Any, int] = {}
            for k, entry in enumerate(data["images"]):
                if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
                    raise DatasetError(p, f"images[{k}]", "needs 'id' and 'file_name'")
                image_id = entry["id"]  # its type is checked by load_coco_json (check_image_id)
                if image_id in seen_ids:
                    raise DatasetError(p, f"images[{k}]", f"duplicate image id {image_id!r} (also images[{seen_ids[image_id]}])")
                seen_ids[image_id] = k
                found.append((coco_image_path(entry, root), image_id, str(entry["file_name"])))
        elif p.is_dir():
            files = list_images(p)
            if not files:
                problems.append((p, "the folder holds no images"))
            for q in files:
                found.append((q, None, q.relative_to(p).as_posix()))
        elif p.exists():
            found.append((p, None, p.name))
        else:
            problems.append((p, "no such file or folder"))
    if problems and (report is None or not found):
        raise FileNotFoundError("; ".join(f"{p}: {reason}" for p, reason in problems))
    for p, reason in problems:
        assert report is not None
        report.add(p, reason)
    seen: set[str] = set()
    unique = []
    for path, image_id, file_name in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append((path, image_id, file_name))
    numeric = [i for _, i, _ in unique if isinstance(i, int)]
    next_id = max(numeric, default=0) + 1
    names = output_names([p for p, _, _ in unique])
    items = []
    for (path, image_id, file_name), name in zip(unique, names):
        if image_id is None:
            image_id, next_id = next_id, next_id + 1
        items.append(ImageRecord(path, name, image_id, file_name))
    return items


class _Prepared(Dataset):
    """Images read and prepared for the model (in data-loader workers when there are any)."""

    def __init__(self, items: list[tuple[int, ImageRecord]], patch: tuple[int, int], config: SegmentRunConfig, size: int):
        self.items = items
        self.patch = patch
        self.config = config
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict[str, Any]:
        index, item = self.items[k]
        try:
            image = load_image(item.path)
            prepared = prepare_image(image, self.patch, self.size, square=self.config.square,
                                     max_side=self.config.max_side)  # fmt: skip
        except ImageLoadError as err:  # the caller reports it under the item's own path
            return {"index": index, "error": err.reason if err.path in (UNNAMED_IMAGE, str(item.path)) else
                    skip_reason(err)}  # fmt: skip
        except UsageError as err:  # e.g. an input longer than max_side
            return {"index": index, "error": str(err)}
        return {"index": index, "tensor": prepared.tensor, "original": prepared.original,
                "geometry": prepared.geometry}  # fmt: skip


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return batch[0]


def _batches(loader: Iterator[dict[str, Any]], batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Group prepared images of one input size into batches; bounded memory (at most ~4 batches held)."""
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    held = 0
    for p in loader:
        if "error" in p:
            yield [p]
            continue
        key = tuple(p["tensor"].shape[-2:])
        groups.setdefault(key, []).append(p)
        held += 1
        if len(groups[key]) >= batch_size:
            held -= len(groups[key])
            yield groups.pop(key)
        elif held >= 4 * batch_size:
            largest = max(groups, key=lambda k: len(groups[k]))
            held -= len(groups[largest])
            yield groups.pop(largest)
    for key in list(groups):
        yield groups.pop(key)


def weights_digest(model: nn.Module) -> str:
    """sha256 of the model's weights (names, dtypes, shapes and values): the identity ``--skip-existing`` keys on."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _distributed() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` under torchrun, else ``None``."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    return None


def local_device() -> str | None:
    """Under torchrun with GPUs, ``cuda:<local rank>``; else ``None`` (the default device)."""
    dist = _distributed()
    if dist is not None and torch.cuda.is_available():
        return f"cuda:{dist[2] % torch.cuda.device_count()}"
    return None


def _shard_path(out: Path, shard: tuple[int, int]) -> Path:
    return out / "shards" / f"{shard[0]:05d}-of-{shard[1]:05d}.json"


# ------------------------------------------------------------------------------------------------------ running
def segment_images(
    inputs: Sequence[str | os.PathLike[str]],
    model: nn.Module,
    out: str | os.PathLike[str],
    config: SegmentRunConfig = SegmentRunConfig(),
) -> dict[str, Any]:
    """Segment images into ``out`` (see the module docstring and :mod:`crate_vis.io.segment_output`).

    Args:
        inputs: image files, folders (searched recursively) and COCO jsons.
        model: a CRATE-family model or timm ViT in eval mode (it is used on its own device).
        out: the output folder.
        config: how to segment.

    Returns:
        The run summary (what ``run.json`` holds): settings, counts, failures.

    Raises:
        RunFolderError: ``out`` holds another run's outputs (see ``config.mode``), or another live run (or the same
            shard of a sharded run) is segmenting into it.
        UsageError / DatasetError: bad settings or inputs, before any image is segmented.
    """
    out = Path(out)
    dist = _distributed()
    shard = config.shard
    if dist is not None and shard is None:
        shard = (dist[0], dist[1])
    report = SkipReport(strict=config.strict)
    items = collect_inputs(inputs, config.image_root, report)
    if not items:
        raise FileNotFoundError("no images found in the inputs")
    patch = model_patch_size(model)
    size = config.size or model_input_size(model)
    _check_layer(model, config.segment.layer)
    digest = weights_digest(model)
    settings = {
        **config.segment.describe(),
        "img_size": size,
        "square": bool(config.square),
        "model": getattr(model, "model_name", None) or type(model).__name__,
        "weights_sha256": digest,
    }
    key = settings_key(settings)
    mode = config.mode
    if shard is not None:
        if mode == "overwrite":
            raise UsageError("--overwrite cannot be combined with shards (they would remove each other's outputs); "
                             "remove the folder first")  # fmt: skip
        mode = "resume"  # the shards of one run share the folder; a rerun shard skips what it finished
    lock = _lock_folder(out, shard)
    try:
        claim_folder(out, key, mode, clean=shard is None)  # other shards may be writing temporaries right now
        return _segment_locked(out, items, model, config, report, settings, key, mode, shard, dist, patch, size, lock)
    finally:
        lock.release()


def _segment_locked(
    out: Path, items: list[ImageRecord], model: nn.Module, config: SegmentRunConfig, report: SkipReport,
    settings: dict[str, Any], key: str, mode: str, shard: tuple[int, int] | None, dist: tuple[int, int, int] | None,
    patch: tuple[int, int], size: int, lock: RunLock,
) -> dict[str, Any]:
    """The part of :func:`segment_images` that runs holding the folder's (or the shard's) lock."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    ordered = list(enumerate(items))
    mine = ordered if shard is None else ordered[shard[0] :: shard[1]]
    _warn_large(items, patch, size, config)

    records: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, ImageRecord]] = []
    for index, item in mine:
        done = read_done(out, item, key) if mode == "resume" else None
        if done is not None:
            records[index] = done
            report.processed += 1
        else:
            todo.append((index, item))
    show = config.progress if config.progress is not None else _is_tty()
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="img", desc=f"segment ({config.segment.method})",
               disable=not show)  # fmt: skip
    loader = DataLoader(_Prepared(todo, patch, config, size), batch_size=1, shuffle=False, num_workers=config.workers,
                        collate_fn=_collate)  # fmt: skip
    pool = ThreadPoolExecutor(config.cut_workers) if config.cut_workers > 1 else None
    refine = config.segment.bilateral_params() if config.segment.refine == "bilateral" else None
    try:
        for batch in _batches(iter(loader), config.batch_size):
            if "error" in batch[0]:
                index = batch[0]["index"]
                report.add(items[index].path, batch[0]["error"])
                bar.update(1)
                continue
            x = torch.stack([p["tensor"] for p in batch]).to(device)  # (B, 3, h, w)
            results = segment_batch(model, x, config.segment, pool)
            for p, res in zip(batch, results):
                item = items[p["index"]]
                geometry = p["geometry"]
                full = geometry.grid_to_image(res.masks).astype(bool)  # (K, H, W)
                if refine is not None:
                    full = _refine(p["original"], full, refine, item)
                overlay = None
                if config.overlay:
                    from ..viz.overlay import masks_overlay

                    overlay = masks_overlay(p["original"], full)
                rec = write_image(out, item, full, res.scores, geometry=geometry.to_dict(), grid=geometry.grid,
                                  settings_id=key, settings=settings, note=res.note, overlay=overlay,
                                  overlay_format=config.overlay or "png")  # fmt: skip
                records[p["index"]] = rec
                report.processed += 1
                bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    info = {
        "settings": settings,
        "settings_key": key,
        "images": len(items),
        "processed": report.processed,
        "skipped": len(report.failures),
        "failures": [{"path": p, "reason": r} for p, r in report.failures],
    }
    if shard is None:
        ordered_records = [records[i] for i in sorted(records)]
        info["masks"] = write_summary(out, ordered_records, info)
        info["report"] = report
        return info
    manifest = {
        "shard": list(shard), "settings_key": key, "settings": settings, "images": len(items),
        "assigned": [items[i].name for i, _ in mine], "done": [items[i].name for i in sorted(records)],
        "failures": info["failures"], "complete": True,
    }  # fmt: skip
    atomic_write_json(_shard_path(out, shard), manifest, indent=1)
    lock.release()  # this shard is done; rank 0's merge below takes the folder's lock
    if dist is not None:
        import torch.distributed as tdist

        if not tdist.is_initialized():
            tdist.init_process_group("gloo")
        tdist.barrier()
        if dist[0] == 0:
            info = merge_shards(out)
        tdist.barrier()
    info["report"] = report
    return info


def _refine(original: np.ndarray, masks: np.ndarray, params: BilateralParams, item: ImageRecord) -> np.ndarray:
    """``masks`` ``(K, H, W)`` refined on the photo they are aligned to (coarse ones kept by the safety rule)."""
    result = refine_masks(original, masks, params)
    kept = int((~result.refined & masks.reshape(len(masks), -1).any(axis=1)).sum())
    if kept:
        log.debug("%s: %d of %d masks kept unrefined (IoU with the refined mask < %.2f, or it was empty)",
                  item.name, kept, len(masks), params.min_iou)  # fmt: skip
    return result.masks


_SEGMENT_RUN = "segment run"
_SAME_PROCESS = "let it finish first, or choose another --out"


def _shard_lock_name(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]:05d}-of-{shard[1]:05d}.lock"


def _live_shard(out: Path) -> str | None:
    """The message about a shard of a run that is segmenting into ``out`` right now, or ``None``."""
    for path in sorted(out.glob("shard-*-of-*.lock")) if out.is_dir() else []:
        holder = live_holder(path)
        if holder is not None:
            i, n = (int(v) for v in path.stem.removeprefix("shard-").split("-of-"))
            return busy_message(out, path, holder, f"{_SEGMENT_RUN} (its shard {i}/{n})", _SAME_PROCESS)
    return None


def _lock_folder(out: Path, shard: tuple[int, int] | None) -> RunLock:
    """Take ``out``'s lock (``run.lock``), or for a shard the lock of that shard alone.

    A whole-folder run refuses a folder that a shard is segmenting into, and a shard refuses a folder that a
    whole-folder run (or a merge) holds: each takes its own lock first and then looks at the others', so of two
    runs starting together at least one sees the other.

    Raises:
        RunFolderError: another live run holds what this one needs (the message names its pid).
    """
    if shard is None:
        lock = RunLock(out, LOCK_NAME, what=_SEGMENT_RUN, same_process_hint=_SAME_PROCESS).acquire()
        busy = _live_shard(out)
    else:
        what = f"{_SEGMENT_RUN} of shard {shard[0]}/{shard[1]}"
        lock = RunLock(out, _shard_lock_name(shard), what=what, same_process_hint=_SAME_PROCESS).acquire()
        holder = live_holder(out / LOCK_NAME)
        busy = None if holder is None else busy_message(out, out / LOCK_NAME, holder, _SEGMENT_RUN, _SAME_PROCESS)
    if busy is not None:
        lock.release()
        raise RunFolderError(busy)
    return lock


def _check_layer(model: nn.Module, layer: int) -> None:
    from ..hooks import resolve_layer

    resolve_layer(model, layer)


def _is_tty() -> bool:
    import sys

    return sys.stderr.isatty()


def _warn_large(items: list[ImageRecord], patch: tuple[int, int], size: int, config: SegmentRunConfig) -> None:
    """One warning when ``size`` makes model inputs large (judged on the first readable image's header).

    Headers are read by :func:`crate_vis.io.images.image_size`, the loader's own size policy: an image it refuses
    (a decompression bomb, a broken file) is passed over here and reported, skipped and counted, when its turn
    comes in the loader.
    """
    for item in items[:_HEADERS_TRIED]:
        try:
            hw = image_size(item.path)
        except ImageLoadError:
            continue
        try:
            g = plan_geometry(hw, patch, size, square=config.square, max_side=None)
        except (ImageLoadError, UsageError):
            continue
        if g.input_hw[0] * g.input_hw[1] > LARGE_INPUT_PIXELS:
            log.warning("--img-size %d makes a %dx%d model input (%d tokens): each forward pass will be slow",
                        size, g.input_hw[1], g.input_hw[0], g.grid[0] * g.grid[1])  # fmt: skip
        return


#: Headers :func:`_warn_large` reads at most looking for a readable image.
_HEADERS_TRIED = 8


def merge_shards(out: str | os.PathLike[str]) -> dict[str, Any]:
    """Merge the shards of a sharded run into ``results.json``, ``images.json`` and ``run.json``.

    The merged files are identical to those of a single-process run of the same inputs and settings.

    Raises:
        RunFolderError: no shard manifests, shards of different counts or settings, a missing or incomplete
            shard, records missing for images a shard says it did, or a shard (or another merge) still running.
            Nothing is written then.
    """
    out = Path(out)
    if not ((out / "shards").is_dir() and any((out / "shards").glob("*-of-*.json"))):
        raise RunFolderError(f"{out}: no shard manifests under shards/; nothing to merge")
    lock = _lock_folder(out, None)  # no shard may be running, nor another merge or whole-folder run
    try:
        return _merge_locked(out)
    finally:
        lock.release()


def _merge_locked(out: Path) -> dict[str, Any]:
    manifests = sorted((out / "shards").glob("*-of-*.json"))
    shards = [json.loads(m.read_text(encoding="utf-8")) for m in manifests]
    counts = {s["shard"][1] for s in shards}
    keys = {s["settings_key"] for s in shards}
    if len(counts) != 1:
        raise RunFolderError(f"{out}: shards of different splits ({sorted(counts)} parts): rerun with one --shard i/N")
    if len(keys) != 1:
        raise RunFolderError(f"{out}: shards ran with different settings or weights; rerun them with the same ones")
    n = counts.pop()
    have = {s["shard"][0] for s in shards}
    missing = sorted(set(range(n)) - have)
    if missing:
        raise RunFolderError(f"{out}: shard(s) {', '.join(map(str, missing))} of {n} have not finished; run them first")
    incomplete = [s["shard"][0] for s in shards if not s.get("complete") or set(s["assigned"]) - set(s["done"]) -
                  {Path(f["path"]).stem for f in s.get("failures", [])}]  # fmt: skip
    key = keys.pop()
    recs = {r["name"]: r for r in read_records(out) if r.get("settings_key") == key}
    order: list[str] = []
    for k in range(max(len(s["assigned"]) for s in shards)):
        for s in sorted(shards, key=lambda s: s["shard"][0]):
            if k < len(s["assigned"]):
                order.append(s["assigned"][k])
    done = {name for s in shards for name in s["done"]}
    lost = [name for name in done if name not in recs]
    if lost or incomplete:
        raise RunFolderError(f"{out}: shard records are incomplete ({len(lost)} image records missing); rerun the "
                             "shards with --skip-existing")  # fmt: skip
    records = [recs[name] for name in order if name in done]
    failures = [f for s in sorted(shards, key=lambda s: s["shard"][0]) for f in s["failures"]]
    info = {
        "settings": shards[0]["settings"], "settings_key": key, "images": shards[0]["images"],
        "processed": len(records), "skipped": len(failures), "failures": failures,
    }  # fmt: skip
    info["masks"] = write_summary(out, records, info)
    clean_temporaries(out)  # every shard has finished: what is left was left by killed runs
    return info


def config_dict(config: SegmentRunConfig) -> dict[str, Any]:  # pragma: no cover - for reports
    """The run config as JSON-ready data."""
    d = asdict(config)
    d["segment"] = config.segment.describe()
    return d

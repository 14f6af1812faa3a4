"""Decoded image cache: what it stores, when it is rebuilt, concurrent builders, and what the datasets serve."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import make_image_folder

from crate_vis.data.cache import (
    CachedImageFolder,
    DecodedImageCache,
    cache_location,
    default_cache_root,
    default_cache_size,
    eval_cache_size,
    open_cache,
)  # fmt: skip
from crate_vis.data.folders import ImageFolderDataset
from crate_vis.io.images import load_image
from crate_vis.train.config import TrainConfig
from crate_vis.train.data import SeededSamples, build_transform


def _photos(root: Path) -> Path:
    """``root/train/{a,b}``: RGB, grey, CMYK, palette and RGBA files of several shapes, and one corrupt file."""
    rng = np.random.default_rng(1)
    (root / "train" / "a").mkdir(parents=True)
    (root / "train" / "b").mkdir(parents=True)
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    Image.fromarray(rgb(60, 90)).save(root / "train" / "a" / "wide.png")
    Image.fromarray(rgb(100, 40)).save(root / "train" / "a" / "tall.png")
    Image.fromarray(rgb(20, 30)).save(root / "train" / "a" / "small.png")  # smaller than the cache size: kept
    Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8), "L").save(root / "train" / "b" / "grey.png")
    Image.fromarray(rgb(48, 64)).convert("CMYK").save(root / "train" / "b" / "cmyk.jpg", quality=95)
    Image.fromarray(rgb(40, 40)).convert("P").save(root / "train" / "b" / "palette.png")
    Image.fromarray(rng.integers(0, 256, (36, 44, 4), dtype=np.uint8), "RGBA").save(root / "train" / "b" / "alpha.png")
    (root / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def _shrunk(path: Path, size: int) -> np.ndarray:
    image = load_image(path)
    w, h = image.size
    if min(w, h) > size:
        long = int(size * max(w, h) / min(w, h))
        image = image.resize((size, long) if w <= h else (long, size), Image.Resampling.BICUBIC)
    return np.asarray(image)


def test_build_stores_every_mode_as_rgb_skips_the_corrupt_file_and_is_reused(tmp_path, caplog):
    root = _photos(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="crate_vis"):
        cache = open_cache(root, "train", 32, cache_dir=tmp_path / "c")
    broken = str(root / "train" / "b" / "broken.jpg")
    assert [p for p, _ in cache.invalid] == [broken]
    assert any(broken in r.message for r in caplog.records if r.levelno == logging.WARNING)
    assert any("1 of 8 image(s) could not be decoded" in r.message for r in caplog.records)
    assert cache.classes == ["a", "b"] and len(cache) == 8 and int(cache.valid.sum()) == 7
    data = CachedImageFolder(cache)
    assert len(data) == 7 and broken not in [p for p, _ in data.samples] and data.skipped == cache.invalid
    for i, (path, label) in enumerate(data.samples):
        image, got = data[i]
        expected = _shrunk(Path(path), 32)
        assert got == label and image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), expected, err_msg=path)
        assert min(image.size) == min(32, *load_image(path).size)  # shorter side 32, never enlarged
    shapes = {Path(p).name: data[i][0].size for i, (p, _) in enumerate(data.samples)}
    assert shapes["wide.png"] == (48, 32) and shapes["tall.png"] == (32, 80) and shapes["small.png"] == (30, 20)
    assert sorted(p.name for p in cache.path.iterdir()) == ["images.u8", "index.npz", "meta.json"]

    caplog.clear()
    stamp = (cache.path / "images.u8").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="crate_vis"):
        again = open_cache(root, "train", 32, cache_dir=tmp_path / "c")
    assert again.path == cache.path and (cache.path / "images.u8").stat().st_mtime_ns == stamp
    assert any("reused" in r.message for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)  # nothing decoded again


@pytest.mark.parametrize("change", ["add", "remove", "rewrite", "touch", "new class"])
def test_a_changed_folder_is_rebuilt_never_reused(tmp_path, caplog, change):
    root = make_image_folder(tmp_path / "data", per_class=3, size=20)
    first = open_cache(root, "train", 16, cache_dir=tmp_path / "c")
    target = root / "train" / "ants" / "ants_1.png"
    if change == "add":
        Image.new("RGB", (20, 20), (9, 9, 9)).save(root / "train" / "bees" / "extra.png")
    elif change == "remove":
        target.unlink()
    elif change == "rewrite":
        Image.new("RGB", (20, 20), (200, 10, 10)).save(target)
    elif change == "touch":  # same bytes, new modification time
        os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    else:
        (root / "train" / "cats").mkdir()
        Image.new("RGB", (20, 20)).save(root / "train" / "cats" / "c.png")
    with caplog.at_level(logging.INFO, logger="crate_vis"):
        second = open_cache(root, "train", 16, cache_dir=tmp_path / "c")
    assert any("no longer matches" in r.message for r in caplog.records)
    assert second.fingerprint != first.fingerprint and second.path == first.path
    fresh = ImageFolderDataset(root / "train")
    assert second.paths == [p for p, _ in fresh.samples] and second.classes == fresh.classes
    served = CachedImageFolder(second)
    for i, (path, _) in enumerate(served.samples):
        np.testing.assert_array_equal(np.asarray(served[i][0]), _shrunk(Path(path), 16))
    assert [p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")] == [second.path.name]


def test_cache_location_is_keyed_by_folder_split_and_size(tmp_path, monkeypatch):
    a = cache_location(tmp_path / "x" / "data", "train", 192, cache_dir=tmp_path)
    assert a.parent == tmp_path and a.name.startswith("data-train-192px-")
    others = [cache_location(tmp_path / "y" / "data", "train", 192, cache_dir=tmp_path),
              cache_location(tmp_path / "x" / "data", "val", 192, cache_dir=tmp_path),
              cache_location(tmp_path / "x" / "data", "train", 144, cache_dir=tmp_path),
              cache_location(tmp_path / "x" / "data", "train", 192, "bilinear", cache_dir=tmp_path)]  # fmt: skip
    assert len({a, *others}) == 5
    monkeypatch.chdir(tmp_path / "..")
    relative = cache_location(Path(tmp_path.name) / "x" / "data", "train", 192, cache_dir=tmp_path)
    assert relative == a  # the absolute path is what counts
    monkeypatch.setenv("CRATE_VIS_CACHE", str(tmp_path / "env"))
    assert default_cache_root() == tmp_path / "env" / "decoded"
    assert cache_location("d", "train", 8).parent == tmp_path / "env" / "decoded"
    monkeypatch.delenv("CRATE_VIS_CACHE")
    assert default_cache_root() == Path.home() / ".cache" / "crate-vis" / "decoded"
    assert default_cache_size(96) == 192 and eval_cache_size(96, 0.875) == 109 and eval_cache_size(224, 0.875) == 256


def test_parallel_build_equals_serial_build(tmp_path):
    root = _photos(tmp_path / "data")
    serial = open_cache(root, "train", 24, cache_dir=tmp_path / "s", workers=0)
    parallel = open_cache(root, "train", 24, cache_dir=tmp_path / "p", workers=2)
    assert (serial.path / "images.u8").read_bytes() == (parallel.path / "images.u8").read_bytes()
    assert serial.invalid == parallel.invalid and serial.fingerprint == parallel.fingerprint


BUILDER = """
import json, sys, time
import crate_vis.data.cache as cache
real = cache._decode
def slow(job):
    time.sleep(0.05)
    return real(job)
cache._decode = slow
root, out, tag = sys.argv[1:4]
print("start", flush=True)
c = cache.open_cache(root, "train", 16, cache_dir=out)
print(json.dumps({"built": c.meta["built"], "n": int(c.valid.sum()), "tag": tag}), flush=True)
"""


def test_concurrent_builders_build_once_and_never_read_a_partial_cache(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=10, size=20)  # 20 images: about 1 s to build here
    out = tmp_path / "c"
    dest = cache_location(root, "train", 16, cache_dir=out)
    out.mkdir()
    (out / f".{dest.name}.1234.building").mkdir()  # left by a builder that was killed
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(BUILDER), str(root), str(out), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-2000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert results[0]["built"] == results[1]["built"]  # one build, the other process waited and reused it
    assert {r["n"] for r in results} == {20}
    assert sorted(p.name for p in out.iterdir()) == sorted([dest.name, f".{dest.name}.lock"])  # leftovers removed
    assert int(DecodedImageCache(dest).valid.sum()) == 20


def test_evaluation_from_the_cache_equals_evaluation_from_the_files(tmp_path):
    root = _photos(tmp_path / "data")
    (root / "train" / "b" / "broken.jpg").unlink()
    cfg = TrainConfig(img_size=24, eval_crop_pct=0.875)
    tf = build_transform(cfg, False)
    cache = open_cache(root, "train", eval_cache_size(24, 0.875), resample="bilinear", cache_dir=tmp_path / "c")
    cached, files = CachedImageFolder(cache, tf), ImageFolderDataset(root / "train", transform=tf)
    assert [p for p, _ in cached.samples] == [p for p, _ in files.samples]
    for i in range(len(files)):
        assert torch.equal(cached[i][0], files[i][0]), files.samples[i][0]


def test_training_augmentation_from_the_cache_matches_the_files_statistically(tmp_path):
    """Crop position, crop size, flips and normalisation: same distributions from a 2x cache as from the file."""
    h, w = 96, 144
    ramp = np.zeros((h, w, 3), dtype=np.uint8)
    ramp[..., 0] = np.linspace(0, 255, w).round().astype(np.uint8)[None, :]  # red encodes x
    ramp[..., 1] = np.linspace(0, 255, h).round().astype(np.uint8)[:, None]  # green encodes y
    ramp[..., 2] = 128
    (tmp_path / "d" / "train" / "c").mkdir(parents=True)
    Image.fromarray(ramp).save(tmp_path / "d" / "train" / "c" / "ramp.png")
    cfg = TrainConfig(img_size=24, crop_scale=[0.08, 1.0], hflip=0.5, color_jitter=None)
    tf = build_transform(cfg, True)
    cache = open_cache(tmp_path / "d", "train", default_cache_size(24), cache_dir=tmp_path / "c")
    cached = CachedImageFolder(cache, tf)
    files = ImageFolderDataset(tmp_path / "d" / "train", transform=tf)
    assert min(cached[0][0].shape[1:]) == 24 and min(cached.cache.image(0).shape[:2]) == 48

    def stats(dataset, seed):
        data = SeededSamples(dataset, seed)
        x = torch.stack([data[(e, 0)][0] for e in range(400)])  # (N, 3, 24, 24)
        red, green = x[:, 0], x[:, 1]
        return {
            "x centre": red.mean(dim=(1, 2)), "y centre": green.mean(dim=(1, 2)),
            "width": red.amax(dim=(1, 2)) - red.amin(dim=(1, 2)),
            "height": green.amax(dim=(1, 2)) - green.amin(dim=(1, 2)),
            "flipped": (red[:, :, -1] < red[:, :, 0]).float().mean(dim=1), "blue": x[:, 2].mean(dim=(1, 2)),
        }  # fmt: skip

    a, b = stats(cached, 0), stats(files, 1)
    for key in a:
        # means within 4 standard errors, spreads within 15 %
        se = float(torch.sqrt(a[key].var() / len(a[key]) + b[key].var() / len(b[key])))
        assert abs(float(a[key].mean() - b[key].mean())) < 4 * se + 1e-3, key
        assert float(a[key].std()) == pytest.approx(float(b[key].std()), rel=0.15, abs=1e-3), key
    # normalisation with the ImageNet statistics: blue 128/255 maps to (0.502 - 0.406) / 0.225
    assert float(a["blue"].mean()) == pytest.approx((128 / 255 - 0.406) / 0.225, abs=0.01)


def test_trainer_trains_from_the_cache(tmp_path, caplog):
    from crate_vis.cli import build_parser
    from crate_vis.cli.train import config_from_args
    from crate_vis.train import resolve_config, train

    root = make_image_folder(tmp_path / "data", per_class=4, size=40)
    bad = root / "train" / "bees" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    cfg = resolve_config(None, data=str(root), model="crate_test_patch8_32", img_size=32, epochs=1, batch_size=4,
                         workers=0, progress=False, out=str(tmp_path / "run"), cache=True,
                         cache_dir=str(tmp_path / "c"))  # fmt: skip
    with caplog.at_level(logging.WARNING):
        result = train(cfg)
    assert [p for p, _ in result.skipped_images] == [str(bad)]
    assert result.steps == 2  # the 8 readable training images; the corrupt one is never served
    names = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "c").iterdir() if not p.name.startswith("."))
    assert names == ["data-train-64px", "data-val-36px"]  # 2 x img_size; floor(32 / 0.875)
    args = build_parser("train").parse_args(["train", "--data", str(root), "--out", str(tmp_path / "o"), "--cache",
                                             "--cache-dir", str(tmp_path / "c"), "--cache-size", "48"])  # fmt: skip
    parsed = config_from_args(args)
    assert parsed.cache is True and parsed.cache_dir == str(tmp_path / "c") and parsed.cache_size == 48
    args = build_parser("train").parse_args(["train", "--data", str(root), "--out", str(tmp_path / "o"), "--no-cache"])
    assert config_from_args(args).cache is False and TrainConfig().cache is False


def test_full_disk_during_a_build_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    import contextlib
    import errno

    import crate_vis.data.cache as cache_module

    real = cache_module.atomic_write

    @contextlib.contextmanager
    def full(path, mode="w", **kw):
        with real(path, mode, **kw) as fh:
            fh.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
            yield fh

    monkeypatch.setattr(cache_module, "atomic_write", full)
    root = make_image_folder(tmp_path / "data", per_class=2, size=16)
    with pytest.raises(OSError, match="disk full: no room for the decoded-image cache") as info:
        open_cache(root, "train", 16, cache_dir=tmp_path / "c")
    dest = cache_location(root, "train", 16, cache_dir=tmp_path / "c")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(dest)
    assert [p.name for p in (tmp_path / "c").iterdir()] == [f".{Path(info.value.filename).name}.lock"]

"""Fuzzing the image loader: mutated real JPEG/PNG/GIF/TIFF/WebP/BMP bytes.

The only allowed outcomes are an RGB uint8 image or :class:`ImageLoadError`: never another exception, a hang or a
crash of the interpreter. Two runs of a fixed number of inputs (a few seconds in all):

* a Hypothesis search in this process (shrinks any failure to a small reproducer), and
* a seeded random run in a child process, so that a segmentation fault or a hang in a C decoder fails the test
  (with the offending bytes saved) instead of taking the test session down.

The pixel limit is kept small while fuzzing so that a mutated header claiming a large size is refused from the
header, which keeps the run's memory bounded; the header check itself is tested in ``test_io_images.py``. Instead of
timing each load (which a busy machine would make flaky), both runs count the decoding work: at most one decode per
file, of the first frame, within the pixel limit, whatever the bytes claim.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from crate_vis.io.images import ImageLoadError, load_image

IMAGES_PY = Path(__file__).resolve().parents[1] / "crate_vis" / "io" / "images.py"
FUZZ_MAX_PIXELS = 1 << 16


def _seed_files() -> list[tuple[bytes, str]]:
    """Small valid files of every format the loader opens, with the features worth breaking."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    out: list[tuple[bytes, str]] = []

    def add(image: Image.Image, fmt: str, suffix: str, **kwargs) -> None:
        buf = io.BytesIO()
        image.save(buf, fmt, **kwargs)
        out.append((buf.getvalue(), suffix))

    add(rgb, "JPEG", ".jpg", quality=85, exif=exif)
    add(rgb, "JPEG", ".jpg", progressive=True)
    add(rgb.convert("CMYK"), "JPEG", ".jpg")
    add(rgb, "PNG", ".png")
    add(rgb.convert("RGBA"), "PNG", ".png")
    add(rgb.convert("P"), "PNG", ".png", transparency=3)
    add(Image.fromarray(rng.integers(0, 65536, (16, 20), dtype=np.uint16)), "PNG", ".png")
    frames = [rgb.convert("P"), rgb.rotate(90).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=40)
    out.append((buf.getvalue(), ".gif"))
    add(rgb, "TIFF", ".tif")
    add(Image.fromarray(rng.random((12, 10), dtype=np.float32), "F"), "TIFF", ".tif")
    add(rgb, "WEBP", ".webp")
    add(rgb, "BMP", ".bmp")
    return out


SEEDS = _seed_files()


def _check_outcome(path: Path) -> str:
    try:
        image = load_image(path, max_pixels=FUZZ_MAX_PIXELS)
    except ImageLoadError as err:
        assert err.path == str(path)
        return "refused"
    arr = np.asarray(image)
    assert image.mode == "RGB" and arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    return "loaded"


@contextlib.contextmanager
def _decodes_recorded() -> Iterator[list[tuple[int, tuple[int, int]]]]:
    """Record ``(frame, size)`` of every image file whose pixels are decoded (``ImageFile.load`` with data left)."""
    from PIL import ImageFile

    Image.init()
    original = ImageFile.ImageFile.load
    decodes: list[tuple[int, tuple[int, int]]] = []

    def load(self, *args, **kwargs):
        if getattr(self, "tile", None):  # pixel data still to decode (a second call returns the loaded image)
            decodes.append((self.tell(), self.size))
        return original(self, *args, **kwargs)

    ImageFile.ImageFile.load = load  # type: ignore[method-assign]
    try:
        yield decodes
    finally:
        ImageFile.ImageFile.load = original  # type: ignore[method-assign]


_mutation = st.one_of(
    st.tuples(st.just("set"), st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True), st.just(0)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.floats(0, 1, exclude_max=True), st.integers(1, 64)),
)


def _mutate(data: bytes, mutations: list[tuple]) -> bytes:
    b = bytearray(data)
    for op, where, arg in mutations:
        if not b:
            break
        at = min(int(where * len(b)), len(b) - 1)
        if op == "set":
            b[at] = arg
        elif op == "flip":
            b[at] ^= 1 << arg
        elif op == "cut":
            del b[at:]
        elif op == "insert":
            b[at:at] = arg
        else:
            del b[at : at + arg]
    return bytes(b)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")  # corrupt EXIF notes
@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(seed=st.sampled_from(range(len(SEEDS))), mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_images_load_or_raise_image_load_error(tmp_path, seed, mutations):
    data, suffix = SEEDS[seed]
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(_mutate(data, mutations))
    with _decodes_recorded() as decodes:
        _check_outcome(path)
    # the work is bounded whatever the bytes claim: at most one frame, the first, of at most the pixel limit
    assert len(decodes) <= 1 and all(frame == 0 and w * h <= FUZZ_MAX_PIXELS for frame, (w, h) in decodes), decodes


def test_unmutated_seeds_load(tmp_path):
    for k, (data, suffix) in enumerate(SEEDS):
        buf = io.BytesIO(data)
        assert Image.open(buf).format  # each seed is a real file of its format
        (tmp_path / f"{k}{suffix}").write_bytes(data)
        with _decodes_recorded() as decodes:
            assert _check_outcome(tmp_path / f"{k}{suffix}") == "loaded"
        assert decodes == [(0, Image.open(buf).size)]  # the recorder sees the one decode of the first frame
    assert len({s for _, s in SEEDS}) == 6


_CHILD = r"""
import json, random, sys, types
from pathlib import Path
import numpy as np
from PIL import Image, ImageFile
# The loader and what it imports (crate_vis.errors, crate_vis.io) without the package's __init__, which would pull
# in torch: a bare package module whose path is the source folder.
package = types.ModuleType("crate_vis")
package.__path__ = [str(Path(sys.argv[1]).parents[1])]
sys.modules["crate_vis"] = package
from crate_vis.io import images
assert "torch" not in sys.modules
seeds = json.loads(Path(sys.argv[2]).read_text())
seeds = [(bytes.fromhex(h), s) for h, s in seeds]
work, inputs, max_pixels = Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(int(sys.argv[6]))
Image.init()
original_load = ImageFile.ImageFile.load
decodes = []
def load(self, *args, **kwargs):  # record (frame, size) of every pixel decode
    if getattr(self, "tile", None):
        decodes.append((self.tell(), self.size))
    return original_load(self, *args, **kwargs)
ImageFile.ImageFile.load = load
counts = {"loaded": 0, "refused": 0}
for _ in range(inputs):
    data, suffix = rng.choice(seeds)
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op, at = rng.randrange(5), rng.randrange(len(b))
        if op == 0:
            b[at] = rng.randrange(256)
        elif op == 1:
            b[at] ^= 1 << rng.randrange(8)
        elif op == 2 and at > 0:
            del b[at:]
        elif op == 3:
            b[at:at] = rng.randbytes(rng.randint(1, 16))
        elif len(b) > 1:
            del b[at : at + rng.randint(1, 64)]
    path = work / ("current" + suffix)
    path.write_bytes(bytes(b))  # left behind for a reproducer if the process dies on it
    decodes.clear()
    try:
        image = images.load_image(path, max_pixels=max_pixels)
    except images.ImageLoadError:
        counts["refused"] += 1
    except BaseException as err:
        print(f"UNEXPECTED {type(err).__name__}: {err} on {path}", flush=True)
        raise
    else:
        arr = np.asarray(image)
        assert image.mode == "RGB" and arr.dtype == np.uint8 and arr.shape[2] == 3, (image.mode, arr.dtype)
        counts["loaded"] += 1
    if len(decodes) > 1 or any(frame or w * h > max_pixels for frame, (w, h) in decodes):
        print(f"UNBOUNDED decodes {decodes} on {path}", flush=True)  # more than the first frame within the limit
        sys.exit(3)
print(json.dumps(counts), flush=True)
"""


def test_child_process_fuzz_no_crash_or_hang(tmp_path, seed: int = 0):
    seeds_file = tmp_path / "seeds.json"
    seeds_file.write_text(json.dumps([(data.hex(), suffix) for data, suffix in SEEDS]))
    work = tmp_path / "work"
    work.mkdir()
    inputs = 600  # a fixed number of seeded inputs (about two seconds on an idle core)
    cmd = [sys.executable, "-c", _CHILD, str(IMAGES_PY), str(seeds_file), str(work), str(inputs),
           str(FUZZ_MAX_PIXELS), str(seed)]  # fmt: skip
    try:
        # a hang guard only, far above any load: the child's work is bounded by the checks inside it
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the loader hung; last input kept in {work}")
    assert done.returncode == 0, (
        f"fuzz child exited with {done.returncode} (negative: killed by signal); last input kept in {work}\n"
        f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    )
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["refused"] + counts["loaded"] == inputs and counts["refused"] > 50 and counts["loaded"] > 10, counts

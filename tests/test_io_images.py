"""The shared image loader: every pixel mode to RGB uint8, EXIF orientation, hostile files, skip reports.

Every file is built here in ``tmp_path`` (Pillow, OpenCV as an independent 16-bit writer, raw bytes); expected
pixels are computed independently with numpy.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from crate_vis.io import (
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV,
    ImageLoadError,
    SkipReport,
    iter_images,
    list_images,
    load_image,
    resolve_max_pixels,
    to_array,
)


def _pattern(h: int = 12, w: int = 20, seed: int = 0) -> np.ndarray:
    """An asymmetric RGB pattern (H, W, 3), so that any flip or rotation shows."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _rgb(path: Path, **kwargs) -> np.ndarray:
    image = load_image(path, **kwargs)
    assert image.mode == "RGB"
    arr = np.asarray(image)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    return arr


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width`` x ``height`` RGB pixels and holds almost no data (a decompression bomb header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))  # fmt: skip
    return path


# ------------------------------------------------------------------------------------------------ pixel modes
def test_rgb_png_round_trip_is_exact(tmp_path):
    a = _pattern()
    Image.fromarray(a).save(tmp_path / "a.png")
    np.testing.assert_array_equal(_rgb(tmp_path / "a.png"), a)
    assert load_image(tmp_path / "a.png").size == (20, 12)


@pytest.mark.parametrize(
    "orientation, reference",
    [
        (1, lambda a: a),
        (2, lambda a: a[:, ::-1]),  # mirrored horizontally
        (3, lambda a: a[::-1, ::-1]),  # rotated 180
        (4, lambda a: a[::-1, :]),  # mirrored vertically
        (5, lambda a: a.transpose(1, 0, 2)),  # mirrored horizontally, then rotated 270 clockwise
        (6, lambda a: np.rot90(a, k=-1)),  # needs a 90-degree clockwise turn to be upright
        (7, lambda a: np.rot90(a, k=2).transpose(1, 0, 2)),  # mirrored horizontally, then rotated 90 clockwise
        (8, lambda a: np.rot90(a, k=1)),  # needs a 90-degree counter-clockwise turn
    ],
)
def test_exif_orientation_png(tmp_path, orientation, reference):
    a = _pattern()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "o.png", exif=exif)
    np.testing.assert_array_equal(_rgb(tmp_path / "o.png"), reference(a))


def test_exif_rotated_jpeg_is_upright(tmp_path):
    # A camera held sideways: stored landscape (16 x 32) with orientation 6, displayed portrait.
    a = np.zeros((16, 32, 3), np.uint8)
    a[:8, :8] = (255, 0, 0)  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "cam.jpg", quality=95, subsampling=0, exif=exif)
    out = _rgb(tmp_path / "cam.jpg")
    assert out.shape == (32, 16, 3)
    # Turning the stored image 90 degrees clockwise moves its top-left corner to the top-right.
    assert out[:8, -8:, 0].mean() > 200 and out[:8, -8:, 1:].mean() < 40
    assert out[:8, :8].mean() < 40
    assert np.abs(out.astype(float) - np.rot90(a, k=-1)).mean() < 3  # JPEG ringing at the block edges only


def test_greyscale_and_one_bit(tmp_path):
    g = _pattern()[..., 0]
    Image.fromarray(g, "L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(_rgb(tmp_path / "l.png"), np.repeat(g[..., None], 3, axis=2))
    bits = g > 127
    Image.fromarray(bits).convert("1").save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    np.testing.assert_array_equal(_rgb(tmp_path / "b.png"), np.repeat(np.where(bits, 255, 0)[..., None], 3, 2))


def _blend(rgb: np.ndarray, alpha: np.ndarray, bg) -> np.ndarray:
    """Reference compositing in floating point, rounded half up."""
    a = alpha.astype(float)[..., None] / 255.0
    return np.floor(rgb.astype(float) * a + np.asarray(bg, float) * (1 - a) + 0.5).astype(np.uint8)


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0), (10, 200, 30)])
def test_rgba_composited_on_background(tmp_path, background):
    rgb = _pattern(4, 6)
    alpha = np.array([0, 255, 128, 1, 254, 77], np.uint8)[None, :].repeat(4, 0)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "a.png")
    out = _rgb(tmp_path / "a.png", background=background)
    np.testing.assert_array_equal(out[:, 0], np.broadcast_to(background, (4, 3)))  # fully transparent
    np.testing.assert_array_equal(out[:, 1], rgb[:, 1])  # opaque
    np.testing.assert_array_equal(out, _blend(rgb, alpha, background))


def test_default_background_is_white_and_names_work(tmp_path):
    Image.new("RGBA", (3, 3), (10, 20, 30, 0)).save(tmp_path / "t.png")
    assert _rgb(tmp_path / "t.png")[0, 0].tolist() == [255, 255, 255]
    assert _rgb(tmp_path / "t.png", background="black")[0, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        load_image(tmp_path / "t.png", background=(0, 0, 300))
    with pytest.raises(ValueError):
        load_image(tmp_path / "t.png", background="not-a-colour")


def test_la_composited(tmp_path):
    la = np.zeros((2, 3, 2), np.uint8)
    la[..., 0] = 100
    la[..., 1] = [[0, 255, 51], [0, 255, 51]]
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = _rgb(tmp_path / "la.png", background=(0, 0, 0))
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 20])  # 100 * 51 / 255 = 20
    assert (out[..., 0] == out[..., 2]).all()


def test_palette_with_and_without_transparency(tmp_path):
    idx = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    pal = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    im = Image.fromarray(idx, "P")
    im.putpalette(pal)
    im.save(tmp_path / "p.png")
    colours = np.array(pal[:9], np.uint8).reshape(3, 3)
    np.testing.assert_array_equal(_rgb(tmp_path / "p.png"), colours[idx])
    im.save(tmp_path / "pt.png", transparency=1)  # index 1 (green) is transparent
    im.save(tmp_path / "pt.gif", transparency=1)
    for name in ("pt.png", "pt.gif"):
        out = _rgb(tmp_path / name, background=(7, 8, 9))
        want = colours[idx].copy()
        want[idx == 1] = (7, 8, 9)
        np.testing.assert_array_equal(out, want, err_msg=name)


def test_cmyk_and_ycbcr(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [0, 255, 255, 0]]], np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    assert Image.open(tmp_path / "c.tif").mode == "CMYK"
    # white, cyan, black, red
    np.testing.assert_array_equal(_rgb(tmp_path / "c.tif")[0], [[255, 255, 255], [0, 255, 255], [0, 0, 0], [255, 0, 0]])
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.jpg", quality=100)
    np.testing.assert_allclose(_rgb(tmp_path / "c.jpg").astype(float).mean(), 127.5, atol=40)  # decodes, roughly

    ycc = np.full((2, 2, 3), 128, np.uint8)
    ycc[0, 0] = (255, 128, 128)  # white
    Image.fromarray(ycc, "YCbCr").save(tmp_path / "y.tif")
    assert Image.open(tmp_path / "y.tif").mode == "YCbCr"
    out = _rgb(tmp_path / "y.tif")
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[1, 1], [128, 128, 128])


SIXTEEN = np.array([[0, 255, 256, 257, 32768, 65535]], np.uint16)
SIXTEEN_AS_8 = [0, 0, 1, 1, 128, 255]  # the high byte


def test_sixteen_bit_grey_png_exact(tmp_path):
    cv2.imwrite(str(tmp_path / "g.png"), SIXTEEN)  # an independent 16-bit writer
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    out = _rgb(tmp_path / "g.png")
    np.testing.assert_array_equal(out[0, :, 0], SIXTEEN_AS_8)
    assert (out == out[..., :1]).all()


def test_sixteen_bit_big_endian_tiff_and_int32(tmp_path):
    Image.frombytes("I;16B", (6, 1), SIXTEEN.astype(">u2").tobytes()).save(tmp_path / "b.tif")
    assert Image.open(tmp_path / "b.tif").mode == "I;16B"
    np.testing.assert_array_equal(_rgb(tmp_path / "b.tif")[0, :, 1], SIXTEEN_AS_8)
    Image.fromarray(SIXTEEN.astype(np.int32), "I").save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    np.testing.assert_array_equal(_rgb(tmp_path / "i.tif")[0, :, 2], SIXTEEN_AS_8)
    # Outside the 16-bit range: min-max.
    Image.fromarray(np.array([[-100, 0, 100, 100_000]], np.int32), "I").save(tmp_path / "w.tif")
    span = 100_100
    want = np.rint((np.array([-100, 0, 100, 100_000]) + 100) * 255 / span)
    np.testing.assert_array_equal(_rgb(tmp_path / "w.tif")[0, :, 0], want)


def test_sixteen_bit_colour_uses_the_same_high_byte_rule(tmp_path):
    c = np.array([[[0x1234, 0xABCD, 0xFFFF], [0x00FF, 0x0100, 0x8000]]], np.uint16)  # BGR for OpenCV
    cv2.imwrite(str(tmp_path / "c.png"), c)
    np.testing.assert_array_equal(_rgb(tmp_path / "c.png"), (c[..., ::-1] >> 8).astype(np.uint8))


def test_sixteen_bit_transparency_value(tmp_path):
    Image.frombytes("I;16", (6, 1), SIXTEEN.astype("<u2").tobytes()).save(tmp_path / "t.png", transparency=257)
    out = _rgb(tmp_path / "t.png", background=(9, 9, 9))
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 9, 128, 255])


def test_float_tiff_scaling(tmp_path):
    def load_f(values):
        Image.fromarray(np.array([values], np.float32), "F").save(tmp_path / "f.tif")
        assert Image.open(tmp_path / "f.tif").mode == "F"
        return _rgb(tmp_path / "f.tif")[0, :, 0].tolist()

    assert load_f([0.0, 0.25, 0.5, 1.0]) == [0, 64, 128, 255]  # within [0, 1]: 255 * v, rounded
    assert load_f([-1.0, 0.0, 3.0]) == [0, 64, 255]  # outside: min-max, 255 * 1/4 = 63.75
    assert load_f([np.nan, 0.5, np.inf, -np.inf]) == [0, 128, 255, 0]
    assert load_f([5.0, 5.0]) == [255, 255]  # constant: clipped to [0, 1]
    assert load_f([np.nan, np.nan]) == [0, 0]


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 4), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(tmp_path / "a.gif").n_frames == 3
    out = _rgb(tmp_path / "a.gif")
    assert (out == [255, 0, 0]).all()


@pytest.mark.parametrize("name, kwargs", [("a.png", {}), ("a.webp", {"lossless": True}), ("a.mpo", {})])
def test_multi_frame_files_give_the_first_frame(tmp_path, name, kwargs):
    frames = [Image.new("RGB", (6, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], **kwargs)
    assert Image.open(tmp_path / name).n_frames == 2
    out = _rgb(tmp_path / name).astype(int)
    assert np.abs(out - [255, 0, 0]).max() <= 2  # MPO is JPEG-coded


def test_other_formats(tmp_path):
    a = _pattern()
    for name in ("x.bmp", "x.ppm", "x.tga", "x.tif"):
        Image.fromarray(a).save(tmp_path / name)
        np.testing.assert_array_equal(_rgb(tmp_path / name), a, err_msg=name)
    Image.fromarray(a).save(tmp_path / "x.webp", lossless=True)
    np.testing.assert_array_equal(_rgb(tmp_path / "x.webp"), a)


# ----------------------------------------------------------------------------------------------- bad files
def _jpeg_bytes(h: int = 64, w: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_pattern(h, w)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _assert_refused(path: Path, fragment: str, **kwargs) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(path, **kwargs)
    err = info.value
    assert err.path == str(path) and str(path) in str(err)
    assert fragment in err.reason, err.reason
    return err


def test_truncated_jpeg_and_png(tmp_path):
    data = _jpeg_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    _assert_refused(tmp_path / "half.jpg", "truncated")
    buf = io.BytesIO()
    Image.fromarray(_pattern(64, 64)).save(buf, "PNG")
    (tmp_path / "half.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _assert_refused(tmp_path / "half.png", "truncated")


def test_non_image_empty_missing_and_folder(tmp_path):
    (tmp_path / "notes.jpg").write_text("these are not pixels\n" * 10)
    _assert_refused(tmp_path / "notes.jpg", "not an image")
    (tmp_path / "zero.png").write_bytes(b"")
    _assert_refused(tmp_path / "zero.png", "empty file")
    _assert_refused(tmp_path / "missing.jpg", "not found")
    (tmp_path / "dir.jpg").mkdir()
    _assert_refused(tmp_path / "dir.jpg", "folder")


def test_eps_is_never_handed_to_ghostscript(tmp_path):
    (tmp_path / "x.eps").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    _assert_refused(tmp_path / "x.eps", "not an image")


def _count_decodes(monkeypatch) -> list[tuple[int, int]]:
    """Record (and refuse) every decode of an image file's pixels: the sizes of the files whose ``load`` ran."""
    from PIL import ImageFile

    Image.init()  # plugins register first (some build images as they load)
    calls: list[tuple[int, int]] = []

    def refuse(self, *args, **kwargs):
        calls.append(self.size)
        raise RuntimeError("pixel data decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    return calls


def test_decompression_bomb_header_refused_before_decoding(tmp_path, monkeypatch):
    bomb = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)  # 10^10 pixels, 30 GB decoded
    assert bomb.stat().st_size < 200
    decodes = _count_decodes(monkeypatch)
    err = _assert_refused(bomb, "too large")
    assert "max_pixels" in err.reason and str(DEFAULT_MAX_PIXELS) in err.reason
    # Under Pillow's own threshold but over ours: still refused, from the header.
    _assert_refused(_png_header_only(tmp_path / "b2.png", 5000, 5000), "more than the limit", max_pixels=10**6)
    assert decodes == []  # neither file reached a decoder
    # the probe sees decodes: a small image within the limit is decoded once
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    _assert_refused(tmp_path / "small.png", "pixel data decoded")
    assert decodes == [(8, 8)]


@pytest.mark.parametrize("kind", [b"zTXt", b"iCCP"])
def test_png_metadata_bomb_refused(tmp_path, kind):
    # 8 KiB of chunk that inflates to 8 MiB of text / colour profile (Pillow stops at 1 MiB).
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    png = buf.getvalue()
    payload = b"Comment\x00\x00" + zlib.compress(b"a" * (8 << 20), 9)
    (tmp_path / "meta.png").write_bytes(png[:33] + _png_chunk(kind, payload) + png[33:])  # right after IHDR
    # refused without inflating the chunk: Python allocates well under the 8 MiB that inflating it would take
    tracemalloc.start()
    try:
        _assert_refused(tmp_path / "meta.png", "too large")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 << 20, f"{peak / 2**20:.1f} MiB"


def test_pixel_limit_argument_and_environment(tmp_path, monkeypatch):
    Image.fromarray(_pattern(64, 64)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png", max_pixels=4096).size == (64, 64)
    _assert_refused(tmp_path / "a.png", "4096 pixels, more than the limit of 4095", max_pixels=4095)
    monkeypatch.setenv(MAX_PIXELS_ENV, "4095")
    assert resolve_max_pixels() == 4095
    _assert_refused(tmp_path / "a.png", "more than the limit of 4095")
    assert load_image(tmp_path / "a.png", max_pixels=5000).size == (64, 64)  # the argument wins
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match=MAX_PIXELS_ENV):
        load_image(tmp_path / "a.png")
    monkeypatch.delenv(MAX_PIXELS_ENV)
    assert resolve_max_pixels() == DEFAULT_MAX_PIXELS
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            load_image(tmp_path / "a.png", max_pixels=bad)


def test_limit_above_pillows_own_guard_is_honoured_and_restored(tmp_path, monkeypatch):
    Image.fromarray(_pattern(20, 20)).save(tmp_path / "a.png")  # 400 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow alone would refuse anything above 200
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png", max_pixels=1000).size == (20, 20)
    assert Image.MAX_IMAGE_PIXELS == 100
    _assert_refused(tmp_path / "a.png", "more than the limit of 399", max_pixels=399)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_concurrent_loads_with_raised_and_default_limits(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    Image.fromarray(_pattern(32, 32)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    saved = Image.MAX_IMAGE_PIXELS
    jobs = [(tmp_path / ("bad.png" if i % 5 == 0 else "a.png"), 10**12 if i % 2 else None) for i in range(200)]

    def one(job):
        try:
            return load_image(job[0], max_pixels=job[1]).size
        except ImageLoadError:
            return "refused"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, jobs))
    assert results == ["refused" if i % 5 == 0 else (32, 32) for i in range(200)]
    assert saved == Image.MAX_IMAGE_PIXELS  # every temporary raise was undone


def test_min_size(tmp_path):
    Image.fromarray(_pattern(7, 12)).save(tmp_path / "small.png")
    err = _assert_refused(tmp_path / "small.png", "smaller than the minimum 8 pixels per side", min_size=8)
    assert "7x12" in err.reason
    assert load_image(tmp_path / "small.png", min_size=7).size == (12, 7)
    assert load_image(tmp_path / "small.png", min_size=(7, 12)).size == (12, 7)
    _assert_refused(tmp_path / "small.png", "smaller", min_size=(7, 13))


def test_corrupt_exif_keeps_the_pixels(tmp_path):
    a = np.full((8, 8, 3), (200, 0, 0), np.uint8)
    Image.fromarray(a).save(tmp_path / "e.jpg", quality=95, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7fgarbage")
    with pytest.warns(UserWarning):
        out = _rgb(tmp_path / "e.jpg")
    np.testing.assert_allclose(out.astype(float), a.astype(float), atol=6)


def test_error_pickles_with_its_fields():
    err = pickle.loads(pickle.dumps(ImageLoadError("/x/y.jpg", "broken")))
    assert isinstance(err, ImageLoadError) and (err.path, err.reason) == ("/x/y.jpg", "broken")


def test_to_array():
    im = Image.new("L", (3, 2), 9)
    arr = to_array(im)
    assert arr.shape == (2, 3, 3) and arr.dtype == np.uint8 and (arr == 9).all()
    rgb = _pattern(2, 3)
    np.testing.assert_array_equal(to_array(Image.fromarray(rgb)), rgb)
    # Same conversions as the loader: alpha composited, 16-bit by the high byte.
    assert to_array(Image.new("RGBA", (2, 2), (5, 5, 5, 0)))[0, 0].tolist() == [255, 255, 255]
    assert to_array(Image.new("RGBA", (2, 2), (5, 5, 5, 0)), background=(1, 2, 3))[0, 0].tolist() == [1, 2, 3]
    sixteen = Image.frombytes("I;16", (6, 1), SIXTEEN.astype("<u2").tobytes())
    np.testing.assert_array_equal(to_array(sixteen)[0, :, 0], SIXTEEN_AS_8)


# --------------------------------------------------------------------------------------------- batches
def test_list_images(tmp_path):
    for rel in ("b/2.png", "a/1.JPG", "a/notes.txt", ".hidden/x.png", "a/._1.JPG", "c.jpeg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "b" / "loop").symlink_to(tmp_path, target_is_directory=True)  # must not recurse forever
    got = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert got == ["a/1.JPG", "b/2.png", "c.jpeg"]
    hidden = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, include_hidden=True)]
    assert hidden == [".hidden/x.png", "a/._1.JPG", "a/1.JPG", "b/2.png", "c.jpeg"]
    assert list_images(tmp_path / "c.jpeg") == [tmp_path / "c.jpeg"]
    with pytest.raises(FileNotFoundError, match="no-such"):
        list_images(tmp_path / "no-such")


def _mixed_folder(tmp_path: Path) -> list[Path]:
    Image.fromarray(_pattern(16, 16)).save(tmp_path / "1_good.png")
    (tmp_path / "2_text.jpg").write_text("nope")
    data = _jpeg_bytes()
    (tmp_path / "3_cut.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(_pattern(16, 16, seed=1)).save(tmp_path / "4_good.jpg")
    (tmp_path / "5_empty.png").write_bytes(b"")
    return list_images(tmp_path)


def test_skip_report_skips_counts_and_lists(tmp_path, capsys):
    paths = _mixed_folder(tmp_path)
    report = SkipReport()
    loaded = []
    for path, image in iter_images(paths, report):
        loaded.append(path.name)
        assert image.mode == "RGB"
        report.processed += 1
    assert loaded == ["1_good.png", "4_good.jpg"]
    assert report.skipped == 3 and [Path(p).name for p, _ in report.failures] == ["2_text.jpg", "3_cut.jpg", "5_empty.png"]
    lines = report.summary().splitlines()
    assert lines[0] == "2 processed, 3 skipped"
    assert [ln.strip().split(":")[0] for ln in lines[1:]] == [str(tmp_path / n) for n in ("2_text.jpg", "3_cut.jpg", "5_empty.png")]
    assert report.exit_code() == 0
    err = capsys.readouterr().err
    assert err.count("skipped ") == 3 and "3_cut.jpg" in err


def test_skip_report_exit_codes(tmp_path):
    (tmp_path / "bad.jpg").write_text("nope")
    report = SkipReport(stream=None)
    assert list(iter_images([tmp_path / "bad.jpg"], report)) == []
    assert report.exit_code() == 1  # nothing could be processed
    assert SkipReport().exit_code() == 0  # nothing to do is not a failure


def test_skip_report_strict_stops_at_first(tmp_path):
    paths = _mixed_folder(tmp_path)
    report = SkipReport(strict=True)
    seen = []
    with pytest.raises(ImageLoadError) as info:
        for path, _ in iter_images(paths, report):
            seen.append(path.name)
    assert seen == ["1_good.png"] and info.value.path.endswith("2_text.jpg")


def test_iter_images_passes_loader_options(tmp_path):
    Image.fromarray(_pattern(4, 4)).save(tmp_path / "tiny.png")
    Image.new("RGBA", (9, 9), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    report = SkipReport(stream=None)
    out = dict(iter_images(list_images(tmp_path), report, min_size=8, background=(1, 2, 3)))
    assert list(out) == [tmp_path / "clear.png"] and out[tmp_path / "clear.png"].getpixel((0, 0)) == (1, 2, 3)
    assert "smaller" in report.failures[0][1]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_unreadable_file(tmp_path):
    import os
    import tempfile

    if os.geteuid() != 0:
        Image.fromarray(_pattern(4, 4)).save(tmp_path / "locked.png")
        (tmp_path / "locked.png").chmod(0)
        _assert_refused(tmp_path / "locked.png", "cannot read")
        return
    # Root reads any file: load it in a forked child that drops to the unprivileged user "nobody" first.
    folder = Path(tempfile.mkdtemp(prefix="crate-vis-perm-"))
    try:
        folder.chmod(0o755)
        locked = folder / "locked.png"
        Image.fromarray(_pattern(4, 4)).save(locked)
        locked.chmod(0)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no exec, the loader is already imported
            try:
                os.close(read_end)
                os.setuid(65534)
                try:
                    load_image(locked)
                    message = "loaded"
                except ImageLoadError as err:
                    message = err.reason
                os.write(write_end, message.encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as fh:
            message = fh.read()
        os.waitpid(pid, 0)
        assert "cannot read" in message, message
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def test_real_photos_load(hymenoptera_root):
    paths = list_images(hymenoptera_root / "val" / "ants")[:5]
    assert paths
    for path in paths:
        arr = _rgb(path, min_size=16)
        assert min(arr.shape[:2]) >= 16

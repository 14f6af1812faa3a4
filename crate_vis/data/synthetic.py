"""A synthetic object-classification dataset with ground-truth instance masks, deterministic by seed.

Each image holds one object of one of ``K`` classes on a cluttered background. A class is a *shape* (circle, square,
triangle, star, ...) with a class-specific *internal pattern* (solid, stripes, dots, rings, ...); its colour, position,
scale and rotation are random. The background mixes colour gradients, noise, stripes at random angles and small
distractor strokes and blobs drawn independently of the label, so the label can be read from the object alone: a
classifier trained on these images has a reason to attend to the object, which is what the emergence experiment
(``crate-vis emergence``) measures against the exact masks.

Every image is drawn on the fly from a seed derived from ``(seed, split, index)``: the same arguments give the same
pixels on any machine, different splits never share an image, and nothing has to be stored. The mask is the set of
pixels the object was painted on (it is composited through the mask, without anti-aliasing), so it is exact.

:func:`write_dataset` writes a split to disk as an ImageFolder (``<split>/<class>/<index>.png``) and a COCO instances
file per split (``annotations/instances_<split>.json``, RLE masks) for the segmentation scorers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..io.atomic import atomic_save, atomic_write_json
from ..io.coco import mask_to_rle

__all__ = [
    "SHAPES", "PATTERNS", "CLASS_SPECS", "SyntheticSample", "SyntheticShapes", "render_sample", "split_seed",
    "write_dataset", "coco_instances", "save_grid",
]  # fmt: skip

#: Shapes the classes are built from; each is a polygon (or polygon set) on the unit square around the origin.
SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "crescent", "arrow", "ell", "hourglass",
)  # fmt: skip
#: Internal patterns painted inside the object, in a second shade of the object colour; all turn with the object.
PATTERNS: tuple[str, ...] = (
    "solid", "stripes", "dots", "rings", "checker", "diagonal", "bars", "grid", "two_tone", "border",
)  # fmt: skip
#: Class ``k`` is ``CLASS_SPECS[k] = (shape, pattern)``: both the shape and the pattern differ between all classes,
#: so the class has a global cue (the outline) and a local one (the texture of every object patch).
CLASS_SPECS: tuple[tuple[str, str], ...] = tuple(zip(SHAPES, PATTERNS))

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_MARKER = ".synthetic_complete.json"


def split_seed(seed: int, split: str) -> int:
    """A stable integer for ``split`` so that splits never share an image (train/val/test have fixed codes)."""
    code = _SPLIT_CODES.get(split)
    if code is None:
        code = 1000 + zlib.crc32(split.encode("utf-8"))  # stable across runs, unlike hash()
    return int(code)


@dataclass(frozen=True)
class SyntheticSample:
    """One rendered image and what was drawn in it.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        label: class index.
        mask: ``(H, W)`` bool, the pixels painted by the object.
        background: ``(H, W, 3)`` uint8 RGB, the image before the object was painted.
        bbox: ``(x, y, w, h)`` of the mask in pixels (COCO convention, inclusive extent).
    """

    image: np.ndarray
    label: int
    mask: np.ndarray
    background: np.ndarray
    bbox: tuple[int, int, int, int]


# ------------------------------------------------------------------------------------------------------ geometry
def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)  # (n, 2)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    t = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _shape_mask(shape: str, size: int, center: tuple[float, float], radius: float, angle: float,
                aspect: float) -> np.ndarray:  # fmt: skip
    """Rasterise ``shape`` (unit radius, rotated by ``angle``, x-stretched by ``aspect``) into a ``(size, size)`` mask."""
    canvas = np.zeros((size, size), np.uint8)
    cx, cy = center
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])

    def to_px(pts: np.ndarray) -> np.ndarray:
        pts = pts * np.array([aspect, 1.0]) * radius
        pts = pts @ rot.T + np.array([cx, cy])
        return np.round(pts * 16).astype(np.int32)  # 4 fractional bits: sub-pixel accurate polygons

    def fill(pts: np.ndarray, value: int = 1) -> None:
        cv2.fillPoly(canvas, [to_px(pts)], value, lineType=cv2.LINE_8, shift=4)

    circle = _regular(48)
    if shape == "circle":
        fill(circle)
    elif shape == "square":
        fill(_regular(4, np.pi / 4) * 1.0)
    elif shape == "triangle":
        fill(_regular(3, -np.pi / 2) * 1.1 + np.array([0.0, 0.15]))
    elif shape == "star":
        fill(_star(5, 0.45) * 1.1)
    elif shape == "cross":
        a, b = 1.0, 0.36
        fill(np.array([[-a, -b], [a, -b], [a, b], [-a, b]]))
        fill(np.array([[-b, -a], [b, -a], [b, a], [-b, a]]))
    elif shape == "ring":
        fill(circle)
        fill(circle * 0.55, 0)
    elif shape == "crescent":
        fill(circle)
        fill(circle * 0.85 + np.array([0.45, -0.1]), 0)
    elif shape == "arrow":
        fill(np.array([[-1.0, -0.28], [0.15, -0.28], [0.15, -0.75], [1.0, 0.0], [0.15, 0.75], [0.15, 0.28],
                       [-1.0, 0.28]]))  # fmt: skip
    elif shape == "ell":
        fill(np.array([[-0.8, -1.0], [-0.2, -1.0], [-0.2, 0.4], [0.8, 0.4], [0.8, 1.0], [-0.8, 1.0]]))
    elif shape == "hourglass":
        fill(np.array([[-0.8, -1.0], [0.8, -1.0], [0.12, 0.0], [0.8, 1.0], [-0.8, 1.0], [-0.12, 0.0]]))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return canvas.astype(bool)


def _pattern(pattern: str, mask: np.ndarray, center: tuple[float, float], radius: float, angle: float,
             rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    """Where the second shade goes: a ``(size, size)`` bool map of the pattern in the object's own frame."""
    size = mask.shape[0]
    if pattern == "solid":
        return np.zeros((size, size), bool)
    if pattern == "border":  # a rim of the second shade along the outline
        dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
        return dist <= max(1.5, 0.22 * radius)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # coordinates in the object's frame, in units of its radius, so the pattern scales and turns with the object
    dx, dy = (xx - center[0]) / radius, (yy - center[1]) / radius
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    period = 0.5 * rng.uniform(0.9, 1.1)
    if pattern == "stripes":
        return np.mod(v, period) < period / 2
    if pattern == "bars":
        return np.mod(u, period) < period / 2
    if pattern == "diagonal":
        return np.mod((u + v) / np.sqrt(2), period) < period / 2
    if pattern == "checker":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    if pattern == "grid":
        return (np.mod(u, period) < period / 4) | (np.mod(v, period) < period / 4)
    if pattern == "rings":
        return np.mod(np.sqrt(u * u + v * v), period) < period / 2
    if pattern == "two_tone":
        return u > 0
    if pattern == "dots":
        cu, cv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
        return cu * cu + cv * cv < (0.3 * period) ** 2
    raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")


# ---------------------------------------------------------------------------------------------------- background
def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Label-independent clutter: gradient or stripes, distractor strokes and blobs, colour noise -> ``(H, W, 3)``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    c0, c1 = _random_colour(rng), _random_colour(rng)
    kind = rng.integers(0, 3)
    if kind == 0:  # linear gradient at a random angle
        theta = rng.uniform(0, 2 * np.pi)
        t = np.cos(theta) * xx + np.sin(theta) * yy
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    elif kind == 1:  # faint stripes of random period and angle (a texture, but fainter than the objects' patterns)
        c1 = c0 + (c1 - c0) * 0.35
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(0.08, 0.3)
        s = (np.cos(theta) * xx + np.sin(theta) * yy) / period
        t = (np.sin(2 * np.pi * s) > 0).astype(np.float32)
        img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    else:  # low-frequency colour blobs
        low = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.float32)
        img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    img = np.ascontiguousarray(img, dtype=np.float32)
    # distractor strokes and small blobs: not the size or form of any class shape
    for _ in range(int(rng.integers(2, 7))):
        p0 = tuple(int(v) for v in rng.integers(0, size, size=2))
        p1 = tuple(int(v) for v in rng.integers(0, size, size=2))
        thick = max(1, int(round(size * rng.uniform(0.01, 0.025))))
        cv2.line(img, p0, p1, _random_colour(rng).tolist(), thick, lineType=cv2.LINE_8)
    for _ in range(int(rng.integers(1, 6))):
        c = tuple(int(v) for v in rng.integers(0, size, size=2))
        axes = tuple(max(1, int(size * v)) for v in rng.uniform(0.015, 0.06, size=2))
        cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, _random_colour(rng).tolist(), -1)
    img += rng.normal(0, rng.uniform(4, 20), size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------ rendering
def render_sample(label: int, image_size: int, rng: np.random.Generator) -> SyntheticSample:
    """Draw one image of class ``label`` with the generator ``rng`` (see the module docstring for the recipe).

    Args:
        label: class index into :data:`CLASS_SPECS`.
        image_size: side of the square image in pixels (at least 16).
        rng: the random source; the result is a pure function of its state.

    Returns:
        A :class:`SyntheticSample`.
    """
    if not 0 <= label < len(CLASS_SPECS):
        raise ValueError(f"label must be in [0, {len(CLASS_SPECS)}), got {label}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 px, got {image_size}")
    size = int(image_size)
    shape, pattern = CLASS_SPECS[label]
    background = _background(size, rng)

    radius = size * rng.uniform(0.2, 0.34)  # the object spans about 40-70% of the side
    # every shape fits in 1.1 * radius before the x-stretch (<= 1.15) and rotation: 1.3 * radius keeps it whole
    margin = radius * 1.3
    center = (float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin)))
    angle = float(rng.uniform(-np.pi / 6, np.pi / 6))
    aspect = float(rng.uniform(0.85, 1.15))
    mask = _shape_mask(shape, size, center, radius, angle, aspect)
    if not mask.any():  # cannot happen for sizes >= 16; a guard so an empty mask is never returned silently
        raise RuntimeError(f"empty mask for {shape} at {center}, radius {radius}")

    # Object colour far from the background under it, so the object is visible (best of a few draws).
    under = background[mask].astype(np.float32).mean(axis=0)
    best, best_dist = None, -1.0
    for _ in range(8):
        colour = _random_colour(rng)
        dist = float(np.linalg.norm(colour - under))
        if dist > best_dist:
            best, best_dist = colour, dist
        if dist > 120:
            break
    assert best is not None  # the first draw always beats best_dist = -1
    base = best
    shade = np.where(base > 127, base * 0.45, base + (255 - base) * 0.55)  # the second shade: darker or lighter
    second = _pattern(pattern, mask, center, radius, angle, rng)
    obj = np.where(second[..., None], shade, base)  # (H, W, 3)
    obj = obj + rng.normal(0, 6, size=obj.shape)  # mild texture noise on the object too
    obj = np.clip(obj, 0, 255).astype(np.uint8)

    image = background.copy()
    image[mask] = obj[mask]
    ys, xs = np.nonzero(mask)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
    return SyntheticSample(image=image, label=int(label), mask=mask, background=background, bbox=bbox)


class SyntheticShapes(Dataset):
    """Synthetic shapes-on-clutter classification dataset, drawn on the fly and deterministic by seed.

    Image ``i`` has label ``i % num_classes`` (classes exactly balanced over every ``num_classes`` consecutive
    indices) and pixels drawn from a generator seeded by ``(seed, split, i)``.

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` or any other name; splits never share images.
        num_images: dataset length.
        image_size: square side in pixels.
        seed: base seed.
        transform: applied to the PIL image in ``__getitem__`` (e.g. a torchvision transform).
        num_classes: number of classes, 2 to ``len(CLASS_SPECS)``.

    Attributes:
        classes: class names (``"circle"``, ``"square"``, ...) in label order.
        class_to_idx: name -> label, as torchvision's ImageFolder has it.
        targets: the label of every image (no rendering needed).
    """

    def __init__(
        self,
        split: str,
        num_images: int,
        image_size: int = 96,
        seed: int = 0,
        transform: Callable[[Image.Image], Any] | None = None,
        num_classes: int = 10,
    ) -> None:
        if not 2 <= num_classes <= len(CLASS_SPECS):
            raise ValueError(f"num_classes must be in [2, {len(CLASS_SPECS)}], got {num_classes}")
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        self.split = split
        self.num_images = int(num_images)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.transform = transform
        self.num_classes = int(num_classes)
        self.classes: list[str] = [CLASS_SPECS[k][0] for k in range(num_classes)]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self._split_code = split_seed(self.seed, split)

    @property
    def targets(self) -> list[int]:
        """Labels of all images, in order."""
        return [i % self.num_classes for i in range(self.num_images)]

    def __len__(self) -> int:
        return self.num_images

    def render(self, i: int) -> SyntheticSample:
        """The full :class:`SyntheticSample` of image ``i`` (image, label, mask, background, bbox)."""
        if not -self.num_images <= i < self.num_images:
            raise IndexError(f"index {i} out of range for {self.num_images} images")
        i = i % self.num_images
        rng = np.random.default_rng([self.seed, self._split_code, i])
        return render_sample(i % self.num_classes, self.image_size, rng)

    def sample(self, i: int) -> tuple[Image.Image, int, np.ndarray]:
        """Image ``i`` as ``(PIL RGB image, label, mask (H, W) bool)``; the transform is not applied."""
        s = self.render(i)
        return Image.fromarray(s.image, mode="RGB"), s.label, s.mask

    def __getitem__(self, i: int) -> tuple[Any, int]:
        s = self.render(i)
        image: Any = Image.fromarray(s.image, mode="RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, s.label

    def __repr__(self) -> str:
        return (f"SyntheticShapes(split={self.split!r}, num_images={self.num_images}, image_size={self.image_size}, "
                f"seed={self.seed}, num_classes={self.num_classes})")  # fmt: skip


# --------------------------------------------------------------------------------------------------------- COCO
def coco_instances(dataset: SyntheticShapes, file_names: Sequence[str] | None = None) -> dict[str, Any]:
    """COCO instances dict (one object per image, RLE masks) for a split.

    Args:
        dataset: the split.
        file_names: per-image ``file_name`` entries; default ``<class>/<index>.png`` (relative to the split folder).

    Returns:
        ``{"info", "images", "annotations", "categories"}``; image ``i`` has id ``i + 1``, class ``k`` category id
        ``k + 1``.
    """
    from pycocotools import mask as mask_utils

    images, annotations = [], []
    for i in range(len(dataset)):
        s = dataset.render(i)
        h, w = s.mask.shape
        name = file_names[i] if file_names is not None else _file_name(dataset, i, s.label)
        images.append({"id": i + 1, "file_name": name, "width": int(w), "height": int(h)})
        rle = mask_to_rle(s.mask)
        area = float(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}))
        annotations.append({
            "id": i + 1, "image_id": i + 1, "category_id": s.label + 1, "segmentation": rle, "area": area,
            "bbox": [float(v) for v in s.bbox], "iscrowd": 0,
        })  # fmt: skip
    return {
        "info": {"description": f"crate-vis synthetic shapes ({dataset!r})", "version": "1"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(dataset.classes)],
    }


def _file_name(dataset: SyntheticShapes, i: int, label: int) -> str:
    return f"{dataset.classes[label]}/{dataset.split}_{i:06d}.png"


def write_dataset(
    root: str | os.PathLike[str],
    num_train: int,
    num_val: int,
    image_size: int = 96,
    seed: int = 0,
    num_classes: int = 10,
    overwrite: bool = False,
) -> Path:
    """Write the train and val splits as an ImageFolder plus COCO instance files, atomically.

    Layout: ``root/train/<class>/train_<index>.png``, ``root/val/<class>/val_<index>.png`` and
    ``root/annotations/instances_{train,val}.json`` (``file_name`` relative to the split folder, as COCO's
    ``train2017/``). The folder is built beside ``root`` and renamed into place at the end, so an interrupted call
    leaves no half-written dataset. When ``root`` already holds a dataset written with the same arguments it is
    reused as it is.

    Args:
        root: output folder.
        num_train: training images.
        num_val: validation images.
        image_size: square side in pixels.
        seed: base seed (as :class:`SyntheticShapes`).
        num_classes: number of classes.
        overwrite: replace an existing ``root`` written with other arguments (otherwise that raises).

    Returns:
        ``root`` as a :class:`Path`.

    Raises:
        FileExistsError: ``root`` exists, is not this dataset, and ``overwrite`` is false.
    """
    root = Path(root)
    params = {"num_train": int(num_train), "num_val": int(num_val), "image_size": int(image_size),
              "seed": int(seed), "num_classes": int(num_classes), "version": 1}  # fmt: skip
    marker = root / _MARKER
    if marker.exists() and json.loads(marker.read_text()) == params:
        return root
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{root} exists and is not a synthetic dataset written with {params}; "
                              "pass overwrite=True or another folder")  # fmt: skip
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        for split, n in (("train", num_train), ("val", num_val)):
            ds = SyntheticShapes(split, n, image_size=image_size, seed=seed, num_classes=num_classes)
            for c in ds.classes:
                (tmp / split / c).mkdir(parents=True, exist_ok=True)  # every class folder, even if empty
            names = []
            for i in range(n):
                s = ds.render(i)
                name = _file_name(ds, i, s.label)
                Image.fromarray(s.image, mode="RGB").save(tmp / split / name, format="PNG")
                names.append(name)
            atomic_write_json(tmp / "annotations" / f"instances_{split}.json", coco_instances(ds, names))
        atomic_write_json(tmp / _MARKER, params, indent=2)
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
            os.replace(root, old / "d")
            os.replace(tmp, root)
            shutil.rmtree(old)
        else:
            os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def save_grid(dataset: SyntheticShapes, path: str | os.PathLike[str], n: int = 20, cols: int = 10) -> Path:
    """Save the first ``n`` images of ``dataset`` as one PNG grid (for looking at the data)."""
    size = dataset.image_size
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (size + 2), cols * (size + 2), 3), 255, np.uint8)
    for i in range(min(n, len(dataset))):
        r, c = divmod(i, cols)
        grid[r * (size + 2) : r * (size + 2) + size, c * (size + 2) : c * (size + 2) + size] = dataset.render(i).image
    atomic_save(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    return Path(path)

"""PASCAL VOC segmentation layout.

``root/JPEGImages/<id>.jpg``, ``root/SegmentationClass/<id>.png`` and ``root/SegmentationObject/<id>.png`` (palette
PNGs whose indices are the labels, 255 = void border), ``root/Annotations/<id>.xml`` (object boxes) and
``root/ImageSets/Segmentation/<split>.txt`` (one id per line). ``root`` may also be a ``VOCdevkit`` folder holding a
single ``VOC20xx`` folder.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .base import VOID, BaseSegmentationDataset, DatasetError, Instance, instance_from_mask, read_label_png

__all__ = ["VOC_CLASSES", "VOCDataset", "voc_palette", "is_voc_root"]

#: index -> name; 0 is background, 255 void
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def voc_palette() -> list[int]:
    """The standard VOC colour map (768 ints) used to write label PNGs in 'P' mode."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _resolve_root(root: Path) -> Path:
    if (root / "JPEGImages").is_dir() or (root / "SegmentationClass").is_dir():
        return root
    subs = sorted(p for p in root.glob("VOC*") if p.is_dir())
    if len(subs) == 1:
        return subs[0]
    raise DatasetError(root, "folder", "not a VOC root (no JPEGImages/ or SegmentationClass/, nor one VOC20xx/)")


def is_voc_root(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a VOC root (or a VOCdevkit holding one)."""
    try:
        _resolve_root(Path(path))
    except DatasetError:
        return False
    return True


class VOCDataset(BaseSegmentationDataset):
    """PASCAL VOC segmentation data.

    Args:
        root: the ``VOC2012`` folder (or a ``VOCdevkit`` with one ``VOC20xx`` inside).
        split: ``ImageSets/Segmentation/<split>.txt``; ``None`` lists every ``SegmentationClass/*.png``.
        remove_difficult: drop xml objects marked ``difficult`` from :meth:`boxes`.

    Instance categories are the majority ``SegmentationClass`` label under each ``SegmentationObject`` index.
    """

    has_semantic = True

    def __init__(self, root: str | os.PathLike[str], split: str | None = "val", remove_difficult: bool = False) -> None:
        self.root = _resolve_root(Path(root))
        self.remove_difficult = remove_difficult
        if split is not None:
            split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
            if not split_file.is_file():
                raise DatasetError(split_file, "split", "not found")
            ids = [ln.strip().split()[0] for ln in split_file.read_text().splitlines() if ln.strip()]
        else:
            ids = sorted(p.stem for p in (self.root / "SegmentationClass").glob("*.png"))
        if not ids:
            raise DatasetError(self.root, "split", f"no images listed for split {split!r}")
        self._ids = ids
        self.split = split
        self.name = f"VOC {self.root.name} {split or 'all'}"
        self.categories = dict(enumerate(VOC_CLASSES))

    @property
    def image_ids(self) -> list[str]:
        return list(self._ids)

    def _check(self, image_id: Any) -> str:
        if image_id not in self._index:
            raise KeyError(f"{self.root}: no image {image_id!r} in split {self.split!r}")
        return image_id

    @property
    def _index(self) -> set[str]:
        if not hasattr(self, "_id_set"):
            self._id_set = set(self._ids)
        return self._id_set

    def image_path(self, image_id: Any) -> Path:
        return self.root / "JPEGImages" / f"{self._check(image_id)}.jpg"

    def image_size(self, image_id: Any) -> tuple[int, int]:
        seg = self.root / "SegmentationClass" / f"{self._check(image_id)}.png"
        path = seg if seg.is_file() else self.image_path(image_id)
        try:
            with Image.open(path) as im:
                w, h = im.size
        except OSError as err:
            raise DatasetError(path, "image size", f"unreadable ({err})") from None
        return h, w

    def semantic(self, image_id: Any) -> np.ndarray:
        """``SegmentationClass`` indices: 0 background, 1-20 classes, 255 void."""
        path = self.root / "SegmentationClass" / f"{self._check(image_id)}.png"
        sem = read_label_png(path)
        bad = np.setdiff1d(np.unique(sem), [*range(len(VOC_CLASSES)), VOID])
        if bad.size:
            raise DatasetError(path, "labels", f"values {bad.tolist()} outside 0-20 and 255")
        return sem

    def ignore(self, image_id: Any) -> np.ndarray:
        """The void border (label 255)."""
        return self.semantic(image_id) == VOID

    def foreground(self, image_id: Any) -> np.ndarray:
        """Pixels of any object class (not background, not void)."""
        sem = self.semantic(image_id)
        return (sem != 0) & (sem != VOID)

    def instances(self, image_id: Any) -> list[Instance]:
        path = self.root / "SegmentationObject" / f"{self._check(image_id)}.png"
        obj = read_label_png(path)
        sem = self.semantic(image_id)
        if obj.shape != sem.shape:
            raise DatasetError(path, "mask size", f"{obj.shape} differs from SegmentationClass {sem.shape}")
        out = []
        for k in np.unique(obj):
            if k in (0, VOID):
                continue
            mask = obj == k
            labels = sem[mask]
            labels = labels[(labels != VOID) & (labels != 0)]
            if labels.size == 0:
                raise DatasetError(path, f"object {k}", "no class label under it in SegmentationClass")
            cat = int(np.bincount(labels).argmax())
            out.append(instance_from_mask(mask, cat, id=int(k)))
        return out

    def objects(self, image_id: Any) -> list[dict[str, Any]]:
        """Objects of ``Annotations/<id>.xml``: ``name``, ``difficult``, ``bbox`` (``[x, y, w, h]``).

        VOC boxes are 1-based inclusive pixel indices; ``[xmin, ymin, xmax, ymax]`` becomes
        ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` in pixel-edge coordinates.
        """
        path = self.root / "Annotations" / f"{self._check(image_id)}.xml"
        try:
            tree = ET.parse(path)
        except FileNotFoundError:
            raise DatasetError(path, "annotation", "not found") from None
        except ET.ParseError as err:
            raise DatasetError(path, "annotation", f"not valid XML ({err})") from None
        out = []
        for i, node in enumerate(tree.getroot().iter("object")):
            box = node.find("bndbox")
            name = node.findtext("name")
            if box is None or name is None:
                raise DatasetError(path, f"object {i}", "missing <name> or <bndbox>")
            try:
                x0, y0, x1, y1 = (float(box.findtext(k) or "") for k in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                raise DatasetError(path, f"object {i}", "bndbox needs numeric xmin, ymin, xmax, ymax") from None
            out.append(
                {
                    "name": name.strip(),
                    "difficult": (node.findtext("difficult") or "0").strip() == "1",
                    "bbox": [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1],
                }
            )
        return out

    def boxes(self, image_id: Any) -> np.ndarray:
        """Boxes from the xml when it exists, else from the instance masks."""
        if (self.root / "Annotations" / f"{self._check(image_id)}.xml").is_file():
            rows = [o["bbox"] for o in self.objects(image_id) if not (self.remove_difficult and o["difficult"])]
            return np.asarray(rows, dtype=np.float64).reshape(-1, 4)
        return super().boxes(image_id)

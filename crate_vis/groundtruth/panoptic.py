"""COCO panoptic annotations: an RGB PNG per image whose pixel colour encodes a segment id, plus a json."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io.coco import check_image_id, find_image_root, load_coco_json
from .base import VOID, BaseSegmentationDataset, DatasetError, Instance, instance_from_mask

__all__ = ["COCOPanopticDataset", "rgb_to_id", "id_to_rgb"]


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 panoptic PNG -> ``(H, W)`` segment ids: ``R + 256 G + 256^2 B``.

    Example:
        >>> rgb_to_id(np.array([[[1, 2, 3]]], dtype=np.uint8)).tolist()
        [[197121]]
    """
    rgb = np.asarray(rgb).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_id`: ``(H, W)`` ids -> ``(H, W, 3)`` uint8."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


class COCOPanopticDataset(BaseSegmentationDataset):
    """COCO panoptic segmentation.

    Args:
        annotation_file: ``panoptic_*.json`` (``images``, ``annotations`` with ``file_name`` and ``segments_info``,
            ``categories`` with ``isthing``).
        png_root: folder of the panoptic PNGs (default: ``<json folder>/<json stem>``, COCO's layout).
        image_root: folder of the images (default: found beside the json as for :class:`COCODataset`).

    Instances are the *thing* segments (``isthing`` 1); :meth:`semantic` paints every segment's category (things and
    stuff) and leaves id-0 pixels :data:`VOID`; :meth:`foreground` is the union of thing segments.
    """

    has_semantic = True

    def __init__(
        self,
        annotation_file: str | os.PathLike[str],
        png_root: str | os.PathLike[str] | None = None,
        image_root: str | os.PathLike[str] | None = None,
    ) -> None:
        self.path = Path(annotation_file)
        data = load_coco_json(self.path)
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise DatasetError(self.path, "top level", f"missing key {key!r}")
            if not isinstance(data[key], list):
                raise DatasetError(self.path, key, f"must be a list, got {type(data[key]).__name__}")
        self.categories: dict[int, dict[str, Any]] = {}
        for i, cat in enumerate(data["categories"]):
            if not isinstance(cat, dict) or "id" not in cat:
                raise DatasetError(self.path, f"categories[{i}]", "missing key 'id'")
            check_image_id(cat["id"], self.path, f"categories[{i}]")
            if cat["id"] == VOID:
                raise DatasetError(self.path, f"categories[{i}]", f"category id {VOID} collides with the void label")
            self.categories[cat["id"]] = cat
        self.images: dict[Any, dict[str, Any]] = {}
        for i, img in enumerate(data["images"]):
            if not isinstance(img, dict):
                raise DatasetError(self.path, f"images[{i}]", f"expected an object, got {type(img).__name__}")
            for key in ("id", "width", "height", "file_name"):
                if key not in img:
                    raise DatasetError(self.path, f"images[{i}]", f"missing key {key!r}")
            check_image_id(img["id"], self.path, f"images[{i}]")
            if img["id"] in self.images:
                raise DatasetError(self.path, f"images[{i}]", f"duplicate image id {img['id']!r}")
            self.images[img["id"]] = img
        self.anns: dict[Any, dict[str, Any]] = {}
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict):
                raise DatasetError(self.path, f"annotations[{i}]", f"expected an object, got {type(ann).__name__}")
            for key in ("image_id", "file_name", "segments_info"):
                if key not in ann:
                    raise DatasetError(self.path, f"annotations[{i}]", f"missing key {key!r}")
            check_image_id(ann["image_id"], self.path, f"annotations[{i}]", "image_id")
            if not isinstance(ann["segments_info"], list):
                raise DatasetError(self.path, f"annotations[{i}]", "segments_info must be a list")
            if ann["image_id"] not in self.images:
                raise DatasetError(
                    self.path, f"annotations[{i}]", f"image_id {ann['image_id']!r} is not among the images"
                )
            for j, seg in enumerate(ann["segments_info"]):
                where = f"annotations[{i}].segments_info[{j}]"
                if not isinstance(seg, dict) or "id" not in seg or "category_id" not in seg:
                    raise DatasetError(self.path, where, "needs 'id' and 'category_id'")
                check_image_id(seg["category_id"], self.path, where, "category_id")
                if seg["category_id"] not in self.categories:
                    raise DatasetError(self.path, where, f"unknown category_id {seg['category_id']!r}")
            self.anns[ann["image_id"]] = ann
        self.png_root = Path(png_root) if png_root is not None else self.path.parent / self.path.stem
        self.image_root = Path(image_root) if image_root is not None else find_image_root(self.path, data)
        self._ids = [img["id"] for img in data["images"] if img["id"] in self.anns]
        self.name = f"COCO panoptic {self.path.name}"

    @property
    def image_ids(self) -> list[Any]:
        return list(self._ids)

    def _img(self, image_id: Any) -> dict[str, Any]:
        if image_id not in self.anns:
            raise KeyError(f"{self.path}: no annotated image with id {image_id!r}")
        return self.images[image_id]

    def image_path(self, image_id: Any) -> Path:
        return self.image_root / self._img(image_id)["file_name"]

    def image_size(self, image_id: Any) -> tuple[int, int]:
        img = self._img(image_id)
        return int(img["height"]), int(img["width"])

    def segment_ids(self, image_id: Any) -> np.ndarray:
        """``(H, W)`` segment ids decoded from the PNG.

        Raises:
            DatasetError: missing PNG, or a PNG whose size differs from the json's.
        """
        ann = self.anns[image_id]
        path = self.png_root / ann["file_name"]
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
        except FileNotFoundError:
            raise DatasetError(path, f"image {image_id}", "panoptic PNG not found") from None
        if rgb.shape[:2] != self.image_size(image_id):
            size = self.image_size(image_id)
            raise DatasetError(path, f"image {image_id}", f"PNG is {rgb.shape[:2]}, json says {size}")
        return rgb_to_id(rgb)

    def _segments(self, image_id: Any) -> tuple[np.ndarray, list[dict[str, Any]]]:
        ids = self.segment_ids(image_id)
        return ids, self.anns[image_id]["segments_info"]

    def instances(self, image_id: Any) -> list[Instance]:
        ids, segs = self._segments(image_id)
        out = []
        for seg in segs:
            if not self.categories[seg["category_id"]].get("isthing", 1):
                continue
            inst = instance_from_mask(ids == seg["id"], seg["category_id"], bool(seg.get("iscrowd", 0)), seg["id"])
            out.append(inst)
        return out

    def semantic(self, image_id: Any) -> np.ndarray:
        ids, segs = self._segments(image_id)
        sem = np.full(ids.shape, VOID, dtype=np.int64)
        for seg in segs:
            sem[ids == seg["id"]] = seg["category_id"]
        return sem

    def ignore(self, image_id: Any) -> np.ndarray:
        """Unlabelled pixels (segment id 0)."""
        return self.segment_ids(image_id) == 0

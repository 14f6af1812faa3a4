"""COCO instance annotations (polygons, uncompressed and compressed RLE, crowd regions) through pycocotools."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..io.coco import (
    find_image_root,
    load_coco_json,
    quiet_coco,
    rle_to_mask,
    segmentation_to_rle,
    validate_coco_instances,
)
from .base import VOID, BaseSegmentationDataset, Instance

__all__ = ["COCODataset"]


class COCODataset(BaseSegmentationDataset):
    """A COCO instance-annotation json as a :class:`~crate_vis.datasets.base.SegmentationDataset`.

    Args:
        annotation_file: ``instances_*.json`` (or a dict already loaded, with ``image_root`` given).
        image_root: folder the ``file_name`` entries are relative to (default: found beside the json, see
            :func:`_default_image_root`).

    Attributes:
        coco: the pycocotools ``COCO`` index (annotations validated and completed).
        data: the json dict.

    Raises:
        DatasetError: malformed json (file and entry named).
    """

    has_semantic = True

    def __init__(
        self, annotation_file: str | os.PathLike[str] | dict[str, Any], image_root: str | os.PathLike[str] | None = None
    ) -> None:
        if isinstance(annotation_file, dict):
            self.path = Path("<memory>")
            data = annotation_file
        else:
            self.path = Path(annotation_file)
            data = load_coco_json(self.path)
        self.data = validate_coco_instances(data, self.path)
        self.coco = quiet_coco(self.data)
        if image_root is not None:
            self.image_root = Path(image_root)
        elif isinstance(annotation_file, dict):
            self.image_root = Path(".")
        else:
            self.image_root = find_image_root(self.path, self.data)
        self._ids = [img["id"] for img in self.data["images"]]
        self.name = f"COCO {self.path.name}"
        self.categories = {c["id"]: c["name"] for c in self.data["categories"]}

    @property
    def image_ids(self) -> list[int]:
        return list(self._ids)

    def _img(self, image_id: Any) -> dict[str, Any]:
        try:
            return self.coco.imgs[image_id]
        except KeyError:
            raise KeyError(f"{self.path}: no image with id {image_id!r}") from None

    def image_path(self, image_id: Any) -> Path:
        return self.image_root / self._img(image_id)["file_name"]

    def file_name(self, image_id: Any) -> str:
        return str(self._img(image_id)["file_name"])

    def image_size(self, image_id: Any) -> tuple[int, int]:
        img = self._img(image_id)
        return int(img["height"]), int(img["width"])

    def annotations(self, image_id: Any) -> list[dict[str, Any]]:
        """The raw (validated) annotation dicts of an image."""
        self._img(image_id)
        return [self.coco.anns[a] for a in self.coco.getAnnIds(imgIds=[image_id])]

    def instances(self, image_id: Any) -> list[Instance]:
        h, w = self.image_size(image_id)
        out = []
        for ann in self.annotations(image_id):
            mask = rle_to_mask(segmentation_to_rle(ann["segmentation"], h, w))
            out.append(
                Instance(
                    mask=mask,
                    bbox=[float(v) for v in ann["bbox"]],
                    category_id=int(ann["category_id"]),
                    iscrowd=bool(ann.get("iscrowd", 0)),
                    id=ann["id"],
                )
            )
        return out

    def semantic(self, image_id: Any) -> np.ndarray:
        """A category map derived from the instances.

        Non-crowd instances are painted largest first, so a small object on a large one stays visible; crowd
        regions not covered by a non-crowd instance are :data:`VOID`; everything else is background ``0``.
        """
        h, w = self.image_size(image_id)
        sem = np.zeros((h, w), dtype=np.int64)
        insts = self.instances(image_id)
        for inst in insts:
            if inst.iscrowd:
                sem[inst.mask] = VOID
        for inst in sorted((i for i in insts if not i.iscrowd), key=lambda i: -i.area):
            sem[inst.mask] = inst.category_id
        return sem

    def to_coco_dict(self) -> dict[str, Any]:
        """The validated json dict (for COCOeval)."""
        return self.data

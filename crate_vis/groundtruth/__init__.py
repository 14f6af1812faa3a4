"""Ground-truth readers sharing one interface (:class:`~crate_vis.groundtruth.base.SegmentationDataset`).

:func:`open_dataset` picks the reader from what a path looks like: a COCO instance or panoptic json, a PASCAL VOC
root, or a folder of masks.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..io.coco import load_coco_json
from .base import VOID, BaseSegmentationDataset, DatasetError, Instance, SegmentationDataset
from .coco import COCODataset
from .mask_folder import MaskFolderDataset
from .panoptic import COCOPanopticDataset, id_to_rgb, rgb_to_id
from .voc import VOC_CLASSES, VOCDataset, is_voc_root, voc_palette

__all__ = [
    "VOID", "BaseSegmentationDataset", "COCODataset", "COCOPanopticDataset", "DatasetError", "Instance",
    "MaskFolderDataset", "SegmentationDataset", "VOCDataset", "VOC_CLASSES", "id_to_rgb", "is_voc_root",
    "open_dataset", "rgb_to_id", "voc_palette",
]  # fmt: skip


def open_dataset(
    path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None, split: str | None = "val"
) -> BaseSegmentationDataset:
    """Open ground truth of any supported layout.

    Args:
        path: a ``.json`` (COCO instances, or panoptic when its annotations carry ``segments_info``), a VOC root
            (``JPEGImages/`` / ``SegmentationClass/``, or a ``VOCdevkit`` with one ``VOC20xx``), or a mask folder
            (a folder of PNGs, or a folder with ``masks/`` and ``images/``).
        image_root: image folder for COCO json / mask folders.
        split: VOC ``ImageSets/Segmentation`` split (``None``: every labelled image).

    Raises:
        DatasetError: unrecognised or malformed input.
    """
    p = Path(path)
    if p.suffix.lower() == ".json":
        data = load_coco_json(p)
        anns = data.get("annotations")
        if isinstance(anns, list) and anns and isinstance(anns[0], dict) and "segments_info" in anns[0]:
            return COCOPanopticDataset(p, image_root=image_root)
        return COCODataset(p, image_root=image_root)
    if not p.exists():
        raise DatasetError(p, "ground truth", "not found")
    if p.is_dir() and is_voc_root(p):
        return VOCDataset(p, split=split)
    if p.is_dir() and (p / "masks").is_dir():
        images = image_root or ((p / "images") if (p / "images").is_dir() else None)
        return MaskFolderDataset(p / "masks", image_dir=images)
    if p.is_dir():
        return MaskFolderDataset(p, image_dir=image_root)
    raise DatasetError(p, "ground truth", "expected a COCO .json, a VOC root or a folder of masks")

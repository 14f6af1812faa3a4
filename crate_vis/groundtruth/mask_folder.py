"""Ground truth as a plain folder of image/mask pairs (:class:`MaskFolderDataset`).

Masks are PNGs matched to images by file stem. A mask whose values are within ``{0, 255}`` or ``{0, 1}`` is a
binary foreground mask; any other mask is a label map (0 background, 255 void, other values classes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..io.images import IMAGE_EXTENSIONS, list_images, read_label_png
from .base import VOID, BaseSegmentationDataset, DatasetError, Instance, instance_from_mask

__all__ = ["MaskFolderDataset"]


def _mask_kind(values: np.ndarray) -> str:
    vals = set(np.unique(values).tolist())
    return "binary" if vals <= {0, 255} or vals <= {0, 1} else "label"


class MaskFolderDataset(BaseSegmentationDataset):
    """Image/mask pairs matched by file stem.

    Args:
        mask_dir: folder of mask PNGs (searched recursively).
        image_dir: folder of images (default: ``mask_dir``'s sibling ``images/`` when it exists, else none; scoring
            needs no images).
        mask_type: ``"auto"`` (per mask, see the module doc), ``"binary"`` or ``"label"``.

    Binary masks give one instance (category 1) and a semantic map of 0/1; label maps give one instance per
    label value (category = the value) and are their own semantic map (255 void).

    Raises:
        DatasetError: no masks, or two masks with the same stem.
    """

    has_semantic = True

    def __init__(
        self,
        mask_dir: str | os.PathLike[str],
        image_dir: str | os.PathLike[str] | None = None,
        mask_type: str = "auto",
    ) -> None:
        if mask_type not in ("auto", "binary", "label"):
            raise ValueError(f"mask_type must be auto, binary or label, got {mask_type!r}")
        self.mask_dir = Path(mask_dir)
        if not self.mask_dir.is_dir():
            raise DatasetError(self.mask_dir, "folder", "not found")
        self.mask_type = mask_type
        self.masks: dict[str, Path] = {}
        for p in sorted(self.mask_dir.rglob("*.png")):
            if p.stem in self.masks:
                raise DatasetError(p, "mask", f"stem {p.stem!r} also used by {self.masks[p.stem]}")
            self.masks[p.stem] = p
        if not self.masks:
            raise DatasetError(self.mask_dir, "folder", "no .png masks")
        if image_dir is None and (self.mask_dir.parent / "images").is_dir():
            image_dir = self.mask_dir.parent / "images"
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.images: dict[str, Path] = {}
        if self.image_dir is not None:
            for p in list_images(self.image_dir):
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem in self.masks:
                    self.images[p.stem] = p
        self._ids = sorted(self.masks)
        self.name = f"mask folder {self.mask_dir}"

    @property
    def image_ids(self) -> list[str]:
        return list(self._ids)

    def _mask_path(self, image_id: Any) -> Path:
        try:
            return self.masks[image_id]
        except KeyError:
            raise KeyError(f"{self.mask_dir}: no mask for {image_id!r}") from None

    def image_path(self, image_id: Any) -> Path:
        self._mask_path(image_id)
        if image_id not in self.images:
            where = self.image_dir if self.image_dir is not None else "(no image folder given)"
            raise FileNotFoundError(f"no image with stem {image_id!r} in {where}")
        return self.images[image_id]

    def file_name(self, image_id: Any) -> str:
        """The image file's name when the image is known, else the mask's stem (predictions then match by stem)."""
        self._mask_path(image_id)
        return self.images[image_id].name if image_id in self.images else str(image_id)

    def stem(self, image_id: Any) -> str:
        self._mask_path(image_id)
        return str(image_id)

    def raw(self, image_id: Any) -> np.ndarray:
        """The mask PNG's values, ``(H, W)`` int64."""
        path = self._mask_path(image_id)
        arr = read_label_png(path)
        return arr

    def kind(self, image_id: Any) -> str:
        """``"binary"`` or ``"label"`` for this mask."""
        return self.mask_type if self.mask_type != "auto" else _mask_kind(self.raw(image_id))

    def image_size(self, image_id: Any) -> tuple[int, int]:
        h, w = self.raw(image_id).shape
        return int(h), int(w)

    def semantic(self, image_id: Any) -> np.ndarray:
        raw = self.raw(image_id)
        if self.kind(image_id) == "binary":
            return (raw > 0).astype(np.int64)
        return raw

    def foreground(self, image_id: Any) -> np.ndarray:
        raw = self.raw(image_id)
        if self.kind(image_id) == "binary":
            return raw > 0
        return (raw != 0) & (raw != VOID)

    def ignore(self, image_id: Any) -> np.ndarray | None:
        if self.kind(image_id) == "binary":
            return None
        return self.raw(image_id) == VOID

    def instances(self, image_id: Any) -> list[Instance]:
        sem = self.semantic(image_id)
        return [instance_from_mask(sem == v, int(v)) for v in np.unique(sem) if v not in (0, VOID)]

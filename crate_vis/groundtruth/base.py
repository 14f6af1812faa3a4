"""The one dataset interface shared by the segmentation CLI and the scorers.

Every reader (COCO instances, COCO panoptic, PASCAL VOC, a folder of image/mask pairs) answers the same questions
about an image id:

* ``image_path(id)`` / ``image(id)`` / ``image_size(id) -> (H, W)``
* ``instances(id) -> list[Instance]`` (a bool ``(H, W)`` mask, an ``[x, y, w, h]`` box, a category, ``iscrowd``)
* ``semantic(id) -> (H, W) int64`` with :data:`VOID` (255) for unlabelled pixels, where the dataset has classes
* ``foreground(id) -> (H, W) bool`` and ``ignore(id) -> (H, W) bool | None`` (pixels no metric should count)
* ``boxes(id) -> (n, 4)`` ``[x, y, w, h]`` float boxes

Boxes are in pixel-edge coordinates: a box ``[x, y, w, h]`` covers columns ``x .. x + w`` (exclusive), so the tight
box of a one-pixel mask at column 3 is ``[3, y, 1, 1]`` (COCO's convention).
"""

from __future__ import annotations

import abc
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from ..errors import DatasetError
from ..io.coco import mask_bbox
from ..io.images import load_image, read_label_png

__all__ = ["VOID", "DatasetError", "Instance", "SegmentationDataset", "BaseSegmentationDataset", "read_label_png"]

#: label of unlabelled ("void") pixels in semantic maps, as in PASCAL VOC
VOID = 255

ImageId = Hashable




@dataclass
class Instance:
    """One annotated object.

    Attributes:
        mask: ``(H, W)`` bool.
        bbox: ``[x, y, w, h]`` (pixel edges).
        category_id: dataset category (``1`` when the dataset has none).
        iscrowd: a crowd region (COCO) rather than one object.
        id: the annotation id where the dataset has one.
        extra: reader-specific fields (empty for the built-in readers).
    """

    mask: np.ndarray
    bbox: list[float]
    category_id: int
    iscrowd: bool = False
    id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def area(self) -> int:
        """Foreground pixels of the mask."""
        return int(self.mask.sum())


@runtime_checkable
class SegmentationDataset(Protocol):
    """What the segmentation CLI and the scorers need from a dataset."""

    name: str

    def __len__(self) -> int: ...

    @property
    def image_ids(self) -> Sequence[ImageId]: ...

    def image_path(self, image_id: ImageId) -> Path: ...

    def image_size(self, image_id: ImageId) -> tuple[int, int]: ...

    def instances(self, image_id: ImageId) -> list[Instance]: ...

    def semantic(self, image_id: ImageId) -> np.ndarray: ...

    def foreground(self, image_id: ImageId) -> np.ndarray: ...

    def ignore(self, image_id: ImageId) -> np.ndarray | None: ...

    def boxes(self, image_id: ImageId) -> np.ndarray: ...


class BaseSegmentationDataset(abc.ABC):
    """Shared behaviour; subclasses implement ids, paths, sizes and instances (and ``semantic`` when they can).

    Attributes:
        name: a short description for printed tables.
        has_semantic: whether :meth:`semantic` is available.
    """

    name: str = "dataset"
    has_semantic: bool = False

    @property
    @abc.abstractmethod
    def image_ids(self) -> Sequence[ImageId]:
        """Image ids in a stable order."""

    @abc.abstractmethod
    def image_path(self, image_id: ImageId) -> Path:
        """Path of the image file."""

    @abc.abstractmethod
    def image_size(self, image_id: ImageId) -> tuple[int, int]:
        """``(H, W)`` of the image (and of every mask of it)."""

    @abc.abstractmethod
    def instances(self, image_id: ImageId) -> list[Instance]:
        """The annotated objects of an image."""

    def __len__(self) -> int:
        return len(self.image_ids)

    def __iter__(self) -> Iterator[ImageId]:
        return iter(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in set(self.image_ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} images)"

    def image(self, image_id: ImageId) -> Image.Image:
        """The image as RGB (raises :class:`~crate_vis.io.images.ImageLoadError` with its path)."""
        return load_image(self.image_path(image_id))

    def file_name(self, image_id: ImageId) -> str:
        """The image's file name as the dataset lists it (COCO ``file_name``; else the image file's name): what
        predictions are matched by (:mod:`crate_vis.metrics.scoring`)."""
        return self.image_path(image_id).name

    def stem(self, image_id: ImageId) -> str:
        """File stem of the image (plain prediction folders name their files by it)."""
        return Path(self.file_name(image_id)).stem

    def semantic(self, image_id: ImageId) -> np.ndarray:
        """``(H, W)`` int64 class map, :data:`VOID` for unlabelled pixels.

        Raises:
            NotImplementedError: the dataset has no class labels.
        """
        raise NotImplementedError(f"{type(self).__name__} has no semantic labels")

    def foreground(self, image_id: ImageId) -> np.ndarray:
        """``(H, W)`` bool: the union of all instance masks (crowd regions included)."""
        h, w = self.image_size(image_id)
        fg = np.zeros((h, w), dtype=bool)
        for inst in self.instances(image_id):
            fg |= inst.mask
        return fg

    def ignore(self, image_id: ImageId) -> np.ndarray | None:
        """``(H, W)`` bool of pixels no metric should count (VOC's void border), or ``None``."""
        return None

    def boxes(self, image_id: ImageId) -> np.ndarray:
        """``(n, 4)`` float ``[x, y, w, h]`` boxes of the objects (from the instances by default)."""
        rows = [inst.bbox for inst in self.instances(image_id)]
        return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def instance_from_mask(mask: np.ndarray, category_id: int, iscrowd: bool = False, id: int | None = None) -> Instance:
    """An :class:`Instance` with its tight box computed from the mask."""
    return Instance(mask=mask, bbox=mask_bbox(mask), category_id=int(category_id), iscrowd=iscrowd, id=id)

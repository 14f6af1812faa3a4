"""Classification datasets read from disk: an ImageFolder that skips bad images, and the CIFAR python pickles.

Unreadable images never stop a run. :class:`ImageFolderDataset` returns a :class:`BadSample` sentinel (path and
reason) in place of the image, and :func:`collate_skip_bad` drops sentinels from the batch and hands them back to
the training loop, in the main process, so the paths can be reported even when the images were read by DataLoader
worker processes.

The CIFAR reader accepts the official ``cifar-10-batches-py`` layout (``data_batch_1..5``, ``test_batch``,
``batches.meta``) and the ``cifar-100-python`` one (``train``, ``test``, ``meta``). The files are pickles, so they
are read with an unpickler that only rebuilds numpy arrays, lists, dicts, strings and numbers: a crafted file cannot
run code.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from ..io.images import ImageLoadError, list_images, load_image

__all__ = [
    "BadSample", "ImageFolderDataset", "CIFARDataset", "collate_skip_bad", "find_cifar_root", "is_cifar_root",
    "read_cifar_pickle",
]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BadSample:
    """Stands in for an image that could not be read; :func:`collate_skip_bad` removes it from the batch."""

    path: str
    reason: str


class ImageFolderDataset(Dataset):
    """Images in ``root/<class>/**/<image>``, labelled by class folder (sorted), unreadable files skipped.

    Args:
        root: folder holding one sub-folder per class.
        transform: applied to the PIL RGB image.
        classes: force this class list (e.g. the training split's, so a validation split missing a class keeps the
            same label indices); a class folder that is absent then simply contributes no images.

    Attributes:
        classes: class names in label order.
        class_to_idx: name -> label.
        samples: ``(path, label)`` pairs.
        targets: the label of every sample.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no class folders, or no images in any of them.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is None:
            if not found:
                raise ValueError(
                    f"{self.root} has no class folders: expected {self.root}/<class name>/<images> "
                    "(one sub-folder per class)"
                )
            classes = found
        else:
            extra = sorted(set(found) - set(classes))
            if extra:
                raise ValueError(f"{self.root} has class folders unknown to the training split: {', '.join(extra)}")
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        empty = []
        for name in self.classes:
            folder = self.root / name
            paths = list_images(folder) if folder.is_dir() else []
            if not paths:
                empty.append(name)
            self.samples += [(str(p), self.class_to_idx[name]) for p in paths]
        if not self.samples:
            raise ValueError(f"{self.root}: no images found in the class folders ({', '.join(self.classes)})")
        if empty:
            log.warning("%s: class folders without images: %s", self.root, ", ".join(empty))
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        try:
            image: Any = load_image(path)
        except ImageLoadError as err:
            return BadSample(err.path, err.reason), label
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, {len(self)} images, {len(self.classes)} classes)"


def collate_skip_bad(batch: list[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Collate ``(image, label)`` pairs, dropping :class:`BadSample` entries.

    Returns:
        ``(images (B', 3, H, W), labels (B',), skipped)`` with ``skipped`` the ``(path, reason)`` of each dropped
        sample; ``B'`` may be 0 when every sample of the batch was bad (images is then an empty tensor).
    """
    good = [item for item in batch if not isinstance(item[0], BadSample)]
    skipped = [(item[0].path, item[0].reason) for item in batch if isinstance(item[0], BadSample)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, labels = default_collate(good)
    return images, labels, skipped


# ---------------------------------------------------------------------------------------------------------- CIFAR
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 protocol-2 pickles spell bytes; it only turns a str into bytes
}  # fmt: skip


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and builtin containers only."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: ANN401
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: CIFAR files hold only arrays and lists")


def read_cifar_pickle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read one CIFAR python pickle into a dict with ``str`` keys (the files use Python 2 byte-string keys).

    Raises:
        ValueError: the file is not a CIFAR pickle (or needs anything beyond arrays, lists and numbers).
    """
    try:
        raw = _ArrayUnpickler(io.BytesIO(Path(path).read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, LookupError) as err:
        raise ValueError(f"{path}: not a CIFAR python pickle ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a CIFAR python pickle (a {type(raw).__name__}, expected a dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in raw.items()}


def is_cifar_root(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` holds CIFAR-10 (``data_batch_1``) or CIFAR-100 (``train`` + ``meta`` files) pickles."""
    p = Path(root)
    return (p / "data_batch_1").is_file() or ((p / "train").is_file() and (p / "meta").is_file())


def find_cifar_root(root: str | os.PathLike[str]) -> Path | None:
    """``root`` itself or its ``cifar-10-batches-py`` / ``cifar-100-python`` sub-folder, when it holds CIFAR."""
    p = Path(root)
    for candidate in (p, p / "cifar-10-batches-py", p / "cifar-100-python"):
        if candidate.is_dir() and is_cifar_root(candidate):
            return candidate
    return None


def _names(values: Sequence[Any]) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


class CIFARDataset(Dataset):
    """CIFAR-10 or CIFAR-100 from the official python pickles.

    Args:
        root: the folder holding the pickles (or its parent, see :func:`find_cifar_root`).
        split: ``"train"``, or ``"test"`` (``"val"`` is accepted as a synonym: CIFAR has no other held-out split).
        transform: applied to each 32x32 PIL RGB image.

    Attributes:
        classes: class names from the ``meta`` file (fine labels for CIFAR-100).
        data: ``(N, 32, 32, 3)`` uint8 array.
        targets: labels.
    """

    def __init__(
        self, root: str | os.PathLike[str], split: str = "train", transform: Callable[[Image.Image], Any] | None = None
    ) -> None:
        found = find_cifar_root(root)
        if found is None:
            raise FileNotFoundError(f"{root}: no CIFAR python pickles (data_batch_1..5/test_batch or train/test/meta)")
        if split not in {"train", "test", "val"}:
            raise ValueError(f"CIFAR split must be 'train' or 'test' ('val' means 'test'), got {split!r}")
        self.root = found
        self.split = "test" if split == "val" else split
        cifar10 = (found / "data_batch_1").is_file()
        if cifar10:
            files = list(_CIFAR10_TRAIN) if self.split == "train" else ["test_batch"]
            meta_file, names_key, labels_key = "batches.meta", "label_names", "labels"
        else:
            files = [self.split]
            meta_file, names_key, labels_key = "meta", "fine_label_names", "fine_labels"
        arrays, labels = [], []
        for name in files:
            path = found / name
            if not path.is_file():
                raise FileNotFoundError(f"CIFAR file missing: {path}")
            entry = read_cifar_pickle(path)
            if "data" not in entry or labels_key not in entry:
                raise ValueError(f"{path}: no 'data'/'{labels_key}' entries; not a CIFAR batch file")
            data = np.asarray(entry["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{path}: data of shape {data.shape}, expected (N, 3072)")
            arrays.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, 3): rows are R, G, B planes
            labels += [int(v) for v in entry[labels_key]]
        meta_path = found / meta_file
        if meta_path.is_file():
            self.classes = _names(read_cifar_pickle(meta_path)[names_key])
        else:
            self.classes = [str(i) for i in range(max(labels) + 1)]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.data = np.ascontiguousarray(np.concatenate(arrays))
        self.targets = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image: Any = Image.fromarray(self.data[index])  # (32, 32, 3) uint8 -> RGB
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def __repr__(self) -> str:
        return f"CIFARDataset({str(self.root)!r}, split={self.split!r}, {len(self)} images, {len(self.classes)} classes)"

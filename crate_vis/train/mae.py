"""The masked-autoencoding objective of the trainer: which runs use it, what data it reads, how masks are drawn.

A run trains by masked autoencoding (``objective: mae``) when its model is a CRATE-MAE (``crate_mae_*``): the
loss is the model's own, ``model(images, mask_ratio, noise)[0]``, the mean squared error over the removed patches
(:class:`~crate_vis.models.crate_mae.CRATEMAE`). A recipe may say ``objective: mae`` explicitly; with
``objective: null`` (the default) a CRATE-MAE model switches a run to it, with a log line, so
``--model crate_mae_* --config <classification recipe>`` trains the autoencoder. Options that only mean something
for a classifier (label smoothing, mixup, cutmix) are refused rather than ignored (:func:`resolve_objective`).

Data (:func:`build_unlabelled_datasets`): labels are never read.

* ``DATA/train/`` exists: every image under it is a training image (class sub-folders or a flat folder alike), and
  every image under ``DATA/<val_split>/`` (``val/``), when it exists, a validation image;
* otherwise every image under ``DATA`` is a training image and there is no validation: ``best/`` then holds the
  weights of the last epoch (the training loss of random masks on random crops is too noisy to pick a "best" by);
* ``synthetic`` and CIFAR folders work as for classification, labels dropped.

Masks are as reproducible as the augmentation: the noise that chooses a training image's kept patches is a pure
function of ``(seed, epoch, index)`` (:func:`mask_noise`), drawn in the data pipeline next to the image, so a
resumed run, or one with another number of DataLoader workers, trains on exactly the same masked images. A
validation image's mask depends on ``(seed, index)`` only: the validation loss of every epoch is measured on the
same masks, so epochs compare.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.folders import BadSample, find_cifar_root
from ..errors import UsageError
from ..io.images import ImageLoadError, list_images, load_image
from .config import TrainConfig

__all__ = [
    "CLASSIFICATION_ONLY", "MaskedSamples", "UnlabelledImages", "build_unlabelled_datasets", "mask_noise",
    "resolve_objective",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Config keys that only a classifier uses, with the value that leaves them off.
CLASSIFICATION_ONLY: dict[str, float] = {"label_smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0}

# Last word of the seed entropy, so that mask noise never shares a stream with the augmentation's sample_seed.
_TRAIN_STREAM = 0x4D41534B  # "MASK"
_VAL_STREAM = 0x4D41534B56  # "MASKV"


def resolve_objective(cfg: TrainConfig) -> str:
    """``"mae"`` or ``"classification"`` for a config: its ``objective``, or the model's family when that is unset.

    Raises:
        UsageError: ``objective: mae`` with a model that is not a CRATE-MAE, ``objective: classification`` with
            one that is, or classification-only options (``label_smoothing``, ``mixup``, ``cutmix``) on an MAE run.

    Example:
        >>> resolve_objective(TrainConfig(model="crate_mae_test_patch8_32"))
        'mae'
        >>> resolve_objective(TrainConfig(model="crate_test_patch8_32"))
        'classification'
    """
    from ..models.registry import is_registered, model_family

    is_mae = is_registered(cfg.model) and model_family(cfg.model) == "crate_mae"
    if cfg.objective == "mae" and not is_mae:
        raise UsageError(
            f"objective mae trains a CRATE-MAE model (crate_mae_*, see crate-vis list-models), got model {cfg.model!r}"
        )
    if cfg.objective == "classification" and is_mae:
        raise UsageError(
            f"{cfg.model} is a masked autoencoder without a classifier: train it with objective mae (or leave "
            "objective unset), or choose a classification model"
        )
    objective = cfg.objective or ("mae" if is_mae else "classification")
    if objective == "mae":
        on = [f"{k}={getattr(cfg, k)}" for k, off in CLASSIFICATION_ONLY.items() if getattr(cfg, k) != off]
        if on:
            source = f" (set by {cfg.recipe})" if cfg.recipe else ""
            raise UsageError(
                f"{', '.join(on)}{source}: classification options, but {cfg.model} trains by masked autoencoding "
                f"(objective mae); set {' and '.join(k.split('=')[0] + '=0' for k in on)}, or start from the "
                "crate_mae_pretrain recipe"
            )
    return objective


def mask_noise(seed: int, index: int, length: int, epoch: int | None = None) -> torch.Tensor:
    """The masking noise of one image: ``(length,)`` uniform scores, a pure function of its arguments.

    The patches of smallest noise are kept (:func:`crate_vis.models.crate_mae.masking_from_noise`).

    Args:
        seed: the run's seed.
        index: the image's index in its dataset.
        length: patches per image ``L``.
        epoch: the training epoch; ``None`` for validation, whose masks stay the same in every epoch.

    Example:
        >>> a = mask_noise(0, 5, 16, epoch=1)
        >>> bool(torch.equal(a, mask_noise(0, 5, 16, epoch=1))), bool(torch.equal(a, mask_noise(0, 5, 16, epoch=2)))
        (True, False)
    """
    words = [int(seed) % 2**64, int(index) % 2**64]
    words += [_VAL_STREAM] if epoch is None else [int(epoch) % 2**64, _TRAIN_STREAM]
    state = int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))
    return torch.rand(int(length), generator=torch.Generator().manual_seed(state))  # (L,)


class MaskedSamples(Dataset):
    """``(image, noise)`` pairs: a dataset's image (its label dropped) with the masking noise of :func:`mask_noise`.

    Args:
        dataset: returns ``(image, label)`` pairs (or bare images); indexed by ``(epoch, index)`` keys when
            ``keyed`` (a :class:`~crate_vis.train.data.SeededSamples`), by plain indices otherwise.
        seed: the run's seed.
        length: patches per image ``L``.
        keyed: training data (noise per epoch) or validation data (the same noise every epoch).

    Example:
        >>> data = MaskedSamples([(torch.zeros(3, 8, 8), 1)], seed=0, length=4)
        >>> image, noise = data[0]
        >>> tuple(image.shape), tuple(noise.shape)
        ((3, 8, 8), (4,))
    """

    def __init__(self, dataset: Any, seed: int, length: int, keyed: bool = False) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.length = int(length)
        self.keyed = keyed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> tuple[Any, torch.Tensor]:
        item = self.dataset[key]
        image = item[0] if isinstance(item, (tuple, list)) else item
        epoch, index = key if self.keyed else (None, key)
        return image, mask_noise(self.seed, index, self.length, epoch)


class UnlabelledImages(Dataset):
    """Every image under a folder (recursively, sorted), as ``(transform(image), 0)``; unreadable files skipped.

    The label slot is kept (always 0) so that the batches go through
    :func:`~crate_vis.data.folders.collate_skip_bad` like a classifier's; an unreadable image comes back as a
    :class:`~crate_vis.data.folders.BadSample`, reported and dropped there.

    Args:
        root: the folder.
        transform: applied to the PIL RGB image.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: it holds no image.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> folder = Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (40, 30)).save(folder / "a.png")
        >>> data = UnlabelledImages(folder)
        >>> len(data), data[0][0].size, data[0][1]
        (1, (40, 30), 0)
    """

    classes: list[str] = []

    def __init__(self, root: str | os.PathLike[str], transform: Callable[[Any], Any] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.samples = [str(p) for p in list_images(self.root)]
        if not self.samples:
            raise ValueError(f"{self.root}: no images found (searched recursively for image files)")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path = self.samples[index]
        try:
            image: Any = load_image(path)
        except ImageLoadError as err:
            return BadSample(err.path, err.reason), 0
        if self.transform is not None:
            image = self.transform(image)
        return image, 0

    def __repr__(self) -> str:
        return f"UnlabelledImages({str(self.root)!r}, {len(self)} images)"


def build_unlabelled_datasets(cfg: TrainConfig) -> Any:
    """Training and validation images for masked autoencoding (layouts in the module docstring), labels unread.

    Returns:
        A :class:`~crate_vis.train.data.DataBundle` with no classes.

    Example:
        >>> bundle = build_unlabelled_datasets(TrainConfig(data="photos/", model="crate_mae_test_patch8_32"))  # doctest: +SKIP
        >>> bundle.val is None  # photos/ has no train/ and val/ folders  # doctest: +SKIP
        True

    Raises:
        FileNotFoundError / ValueError: no such folder, no images, or a ``val/`` folder without a ``train/`` one.
        UsageError: ``cache`` on a folder that is not an ImageFolder root (the decoded cache needs class folders).
    """
    from .data import DataBundle, build_datasets, build_transform

    if not cfg.data:
        raise ValueError("no training data given (--data DIR of images, an ImageFolder root, or 'synthetic')")
    in_memory = cfg.data == "synthetic" or find_cifar_root(cfg.data) is not None
    root = Path(cfg.data)
    if not in_memory and not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    train_dir = root / "train"
    if in_memory or (cfg.cache and train_dir.is_dir() and _has_class_folders(train_dir)):
        bundle = build_datasets(cfg)  # labelled sources: the labels are dropped by MaskedSamples
        return DataBundle(train=bundle.train, val=bundle.val, classes=[], source=bundle.source, skipped=bundle.skipped)
    if cfg.cache:
        raise UsageError(
            f"cache: the decoded-image cache serves ImageFolder roots ({root}/train/<class>/...); {root} has "
            f"{'no class folders under train/' if train_dir.is_dir() else 'no train/ folder'}: train without --cache"
        )
    train_tf, eval_tf = build_transform(cfg, True), build_transform(cfg, False)
    val_dir = root / cfg.val_split
    if train_dir.is_dir():
        train = UnlabelledImages(train_dir, train_tf)
        val = UnlabelledImages(val_dir, eval_tf) if val_dir.is_dir() else None
        if val is None:
            log.info("%s has no %s/ folder: training without validation; best/ holds the last epoch", root,
                     cfg.val_split)  # fmt: skip
    elif val_dir.is_dir():
        raise ValueError(
            f"{root} has a {cfg.val_split}/ folder but no train/ folder: put the training images in {root}/train/, "
            f"or pass a folder without {cfg.val_split}/ to train on all its images"
        )
    else:
        train, val = UnlabelledImages(root, train_tf), None
        log.info("training on every image under %s, without validation; best/ holds the last epoch", root)
    return DataBundle(train=train, val=val, classes=[], source="images")


def _has_class_folders(folder: Path) -> bool:
    return any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())

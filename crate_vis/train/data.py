"""Datasets, transforms and loaders for training and evaluation.

``data`` may be an ImageFolder root (``train/`` and ``val/`` class folders), a CIFAR-10/100 python folder, or the
word ``synthetic`` (the procedurally drawn shapes of :mod:`crate_vis.data.synthetic`). With ``cache: true`` an
ImageFolder's splits are decoded once into memory-mapped files (:mod:`crate_vis.data.cache`) and augmented from there.

What a training batch holds depends only on the seed, the epoch and the step, never on the number of DataLoader
workers or on where a run was stopped and resumed:

* shuffling is a pure function of ``(seed, epoch)`` (:class:`EpochSampler`), sharded over processes the way
  :class:`~torch.utils.data.DistributedSampler` does;
* every sample's augmentation is a pure function of ``(seed, epoch, index)``: :class:`SeededSamples` draws it with
  python's, numpy's and torch's global generators seeded from :func:`sample_seed` and restores them afterwards, so
  the random crops, flips, jitter, RandAugment and random erasing of timm and torchvision transforms need no change,
  and the training process's own random state (mixup, dropout) is untouched by data loading.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.folders import CIFARDataset, ImageFolderDataset, collate_skip_bad, find_cifar_root
from .config import TrainConfig

if TYPE_CHECKING:
    from ..data.cache import CachedImageFolder
    from ..data.synthetic import SyntheticShapes

__all__ = [
    "DataBundle", "EpochSampler", "SeededSamples", "ShardSampler", "build_transform", "build_datasets", "build_split",
    "make_loader", "sample_seed", "seeded_rng",
]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """Training and validation datasets with their class names.

    Attributes:
        train: training dataset (returns ``(tensor image, label)``).
        val: validation dataset, or ``None``.
        classes: class names in label order.
        source: ``imagefolder``, ``cifar``, ``synthetic`` or ``custom``.
        skipped: ``(path, reason)`` of files left out before training (unreadable images of a decoded cache).
    """

    train: Dataset
    val: Dataset | None
    classes: list[str]
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)


# ------------------------------------------------------------------------------------ per-sample randomness
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation in ``epoch``: a 63-bit hash of ``(seed, epoch, index)``.

    Example:
        >>> sample_seed(0, 1, 5) == sample_seed(0, 1, 5) != sample_seed(0, 2, 5)
        True
    """
    entropy = [int(seed) % 2**64, int(epoch) % 2**64, int(index) % 2**64]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed python's, numpy's and torch's (CPU) global generators for the block, and restore their states after it.

    Example:
        >>> with seeded_rng(3):
        ...     a = torch.rand(2)
        >>> with seeded_rng(3):
        ...     b = torch.rand(2)
        >>> bool(torch.equal(a, b))
        True
    """
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # the CPU generator only: a CUDA one is left alone
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class SeededSamples(Dataset):
    """A dataset indexed by ``(epoch, index)`` whose sample is drawn under :func:`seeded_rng` of :func:`sample_seed`.

    Whatever random transform ``dataset`` applies with the global generators (timm's random-resized crop uses
    python's, torchvision's flip and colour jitter torch's) then gives the same result for the same
    ``(seed, epoch, index)`` in any process: with any number of DataLoader workers, and after a resume.

    Args:
        dataset: a map-style dataset.
        seed: the run's seed.

    Example:
        >>> data = SeededSamples([0.0, 1.0], seed=0)
        >>> data[(0, 1)], len(data)
        (1.0, 2)
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with seeded_rng(sample_seed(self.seed, epoch, index)):
            return self.dataset[index]


def build_transform(
    cfg: TrainConfig, training: bool, img_size: int | None = None
) -> Callable[[Any], torch.Tensor]:
    """The PIL -> normalised tensor pipeline (timm's ``create_transform``), with optional torchvision RandAugment.

    Args:
        cfg: the run config (augmentation keys).
        training: random-resized crop, flip and augmentation; otherwise resize and centre crop (or squash).
        img_size: override of ``cfg.img_size``.
    """
    from timm.data import create_transform

    size = int(img_size or cfg.img_size)
    if not training:
        return create_transform(
            input_size=size, is_training=False, interpolation=cfg.interpolation, crop_pct=cfg.eval_crop_pct,
            crop_mode=cfg.eval_crop_mode,
        )  # fmt: skip
    primary, secondary, final = create_transform(
        input_size=size, is_training=True, scale=(cfg.crop_scale[0], cfg.crop_scale[1]),
        ratio=(cfg.crop_ratio[0], cfg.crop_ratio[1]), hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,  # type: ignore[arg-type]  # timm handles None (no jitter); its hint omits it
        auto_augment=cfg.auto_augment, interpolation=cfg.interpolation, re_prob=cfg.re_prob, separate=True,
    )  # fmt: skip
    stages: list[Any] = [primary]
    if cfg.rand_augment is not None:
        from torchvision import transforms as T

        # torchvision's RandAugment(num_ops, magnitude) on the cropped PIL image, where the official fine-tuning
        # applies it (after RandomResizedCrop and the flip, before ToTensor).
        stages.append(T.RandAugment(num_ops=int(cfg.rand_augment[0]), magnitude=int(cfg.rand_augment[1])))
    stages += [secondary, final]
    from torchvision.transforms import Compose

    return Compose(stages)


def _synthetic(split: str, num_images: int, cfg: TrainConfig, transform: Callable[[Any], Any]) -> SyntheticShapes:
    try:
        from ..data.synthetic import SyntheticShapes
    except ImportError as err:
        raise ValueError(f"data 'synthetic' needs crate_vis.data.synthetic, which could not be imported: {err}") from None
    return SyntheticShapes(
        split, num_images, image_size=max(cfg.img_size, 32), seed=cfg.seed, transform=transform,
        num_classes=cfg.synthetic_classes,
    )  # fmt: skip


def build_split(
    data: str, split: str, transform: Callable[[Any], Any] | None, cfg: TrainConfig | None = None,
    classes: Sequence[str] | None = None,
) -> ImageFolderDataset | CIFARDataset | SyntheticShapes:
    """One split of a data source (used by evaluation too).

    Args:
        data: ImageFolder root, CIFAR folder or ``"synthetic"``.
        split: ``train``, ``val``/``test`` or any folder name of an ImageFolder root; an ImageFolder root without
            such a sub-folder but with class folders is taken as the split itself.
        transform: image transform.
        cfg: config (synthetic sizes and seed); defaults when ``None``.
        classes: class list to keep label indices consistent with training.

    Raises:
        FileNotFoundError / ValueError: missing folders, no classes, no images, unknown layout.
    """
    cfg = cfg or TrainConfig(data=data)
    if data == "synthetic":
        n = cfg.synthetic_train_images if split == "train" else cfg.synthetic_val_images
        return _synthetic("train" if split == "train" else "val", n, cfg, transform)  # type: ignore[arg-type]
    root = Path(data)
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    cifar = find_cifar_root(root)
    if cifar is not None:
        return CIFARDataset(cifar, "train" if split == "train" else "test", transform=transform)
    if (root / split).is_dir():
        return ImageFolderDataset(root / split, transform=transform, classes=classes)
    if split != "train" and any(p.is_dir() for p in root.iterdir()) and not (root / "train").is_dir():
        return ImageFolderDataset(root, transform=transform, classes=classes)
    raise FileNotFoundError(
        f"{root} has no {split}/ folder: expected an ImageFolder root ({root}/train/<class>/..., {root}/val/<class>/...),"
        " a CIFAR python folder (data_batch_1..5, test_batch) or 'synthetic'"
    )


def _cached_split(
    cfg: TrainConfig, split: str, transform: Callable[[Any], Any], size: int, resample: str,
    classes: Sequence[str] | None = None,
) -> CachedImageFolder:
    from ..data.cache import CachedImageFolder, open_cache

    cache = open_cache(cfg.data, split, size, classes=classes, resample=resample, cache_dir=cfg.cache_dir,
                       workers=cfg.workers, progress=cfg.show_progress)  # fmt: skip
    return CachedImageFolder(cache, transform)


def build_datasets(cfg: TrainConfig) -> DataBundle:
    """Training and validation datasets for ``cfg.data`` with the config's transforms.

    With ``cfg.cache`` an ImageFolder's training split is served from a decoded cache whose images have a shorter
    side of ``cfg.cache_size`` pixels (default :func:`~crate_vis.data.cache.default_cache_size`, twice
    ``img_size``), and its validation split from one at the evaluation resize with the evaluation filter
    (:func:`~crate_vis.data.cache.eval_cache_size`); CIFAR and synthetic data are already in memory and ignore it.
    """
    train_tf, eval_tf = build_transform(cfg, True), build_transform(cfg, False)
    if not cfg.data:
        raise ValueError("no training data given (--data DIR, a CIFAR folder, or 'synthetic')")
    in_memory = cfg.data == "synthetic" or find_cifar_root(cfg.data) is not None
    if cfg.cache and not in_memory:
        return _cached_datasets(cfg, train_tf, eval_tf)
    if cfg.cache:
        log.info("cache: %s is held in memory already; no decoded cache is built", cfg.data)
    train = build_split(cfg.data, "train", train_tf, cfg)
    classes = list(train.classes)
    val: Dataset | None
    if in_memory:
        val = build_split(cfg.data, cfg.val_split, eval_tf, cfg)
        source = "synthetic" if cfg.data == "synthetic" else "cifar"
    else:
        source = "imagefolder"
        if (Path(cfg.data) / cfg.val_split).is_dir():
            val = ImageFolderDataset(Path(cfg.data) / cfg.val_split, transform=eval_tf, classes=classes)
        else:
            log.warning("%s has no %s/ folder: training without validation", cfg.data, cfg.val_split)
            val = None
    return DataBundle(train=train, val=val, classes=classes, source=source)


def _cached_datasets(cfg: TrainConfig, train_tf: Callable[[Any], Any], eval_tf: Callable[[Any], Any]) -> DataBundle:
    from ..data.cache import default_cache_size, eval_cache_size

    root = Path(cfg.data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"{root} has no train/ folder: expected an ImageFolder root ({root}/train/<class>/...)")
    size = cfg.cache_size or default_cache_size(cfg.img_size)
    if size < cfg.img_size:
        log.warning("cache_size %d is below img_size %d: every training crop is enlarged", size, cfg.img_size)
    train = _cached_split(cfg, "train", train_tf, size, "bicubic")
    classes = list(train.classes)
    skipped = list(train.skipped)
    val: Dataset | None = None
    if (root / cfg.val_split).is_dir():
        resample = cfg.interpolation if cfg.interpolation != "random" else "bilinear"
        val = _cached_split(cfg, cfg.val_split, eval_tf, eval_cache_size(cfg.img_size, cfg.eval_crop_pct), resample,
                            classes)  # fmt: skip
        skipped += val.skipped
    else:
        log.warning("%s has no %s/ folder: training without validation", cfg.data, cfg.val_split)
    return DataBundle(train=train, val=val, classes=classes, source="imagefolder", skipped=skipped)


class EpochSampler(Sampler[Any]):
    """Shuffled, sharded indices that depend only on ``(seed, epoch)``, with an optional skip for mid-epoch resume.

    Like :class:`~torch.utils.data.DistributedSampler`: the permutation is drawn from a generator seeded with
    ``seed + epoch``, padded by wrapping to a multiple of ``world_size`` and split ``indices[rank::world_size]``.

    Args:
        length: dataset size.
        seed: base seed.
        rank: this process's rank.
        world_size: number of processes.
        shuffle: permute (training) or keep order.
        keyed: yield ``(epoch, index)`` pairs, the keys of :class:`SeededSamples`, instead of indices.
    """

    def __init__(
        self, length: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True, keyed: bool = False
    ) -> None:
        self.length = length
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.keyed = keyed
        self.epoch = 0
        self.skip = 0
        self.per_rank = math.ceil(length / world_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the permutation of ``epoch`` and leave out its first ``skip`` indices (already trained on)."""
        self.epoch = epoch
        self.skip = skip

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch, before skipping."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.world_size
        order += order[: total - len(order)]  # wrap-pad so every rank gets the same count
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[Any]:
        ids = self.indices()[self.skip :]
        return iter([(self.epoch, i) for i in ids] if self.keyed else ids)

    def __len__(self) -> int:
        return self.per_rank - self.skip


class ShardSampler(Sampler[int]):
    """``range(length)[rank::world_size]`` without padding: every sample is evaluated exactly once over all ranks."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.ids = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def make_loader(
    dataset: Dataset, batch_size: int, sampler: Sampler[Any], workers: int, drop_last: bool = False,
    pin_memory: bool = False, seed: int = 0,
) -> DataLoader:
    """A DataLoader that drops unreadable images (:func:`~crate_vis.data.folders.collate_skip_bad`).

    It draws its workers' base seed from its own generator (seeded with ``seed``), not from torch's global one:
    otherwise starting an epoch would consume the training process's random state, once per epoch without
    persistent workers and once per run with them, and runs with different ``workers`` would diverge.
    """
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        collate_fn=collate_skip_bad, pin_memory=pin_memory, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip

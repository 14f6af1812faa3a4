"""The training loop: one :class:`Trainer` for CRATE and timm ViTs, alone or under ``torchrun``.

Two objectives: classification (cross-entropy on labelled images) and masked autoencoding for CRATE-MAE models
(the model's masked-pixel loss on unlabelled images; :mod:`crate_vis.train.mae` says when it applies, what data it
reads and how its masks are drawn). Both share everything below.

What it guarantees:

* the learning-rate schedule (linear warm-up, then cosine) is stepped every iteration;
* gradient clipping, when configured, is applied to the gradients the optimizer uses;
* ``--resume`` restores model, optimizer, scheduler, gradient scaler, EMA, epoch, step and RNG states; the
  shuffling order depends only on ``(seed, epoch)`` and each sample's augmentation only on ``(seed, epoch, index)``
  (:mod:`crate_vis.train.data`), and so does each image's masking noise for masked autoencoding, so on CPU a run
  stopped between epochs and resumed ends with bit-identical weights to an uninterrupted one, and runs with
  different numbers of DataLoader workers end with identical weights;
* one run at a time per run folder: ``RUN_DIR/run.lock`` (:mod:`crate_vis.io.runlock`) makes a second run stop
  with the pid of the first; a lock left by a killed run is reclaimed;
* a non-finite loss stops the run with :class:`NonFiniteLossError` before any bad weights are saved, so the last
  checkpoint stays the last good one; a full disk stops it with
  :class:`~crate_vis.train.checkpointing.DiskFullError`, the previous checkpoint intact;
* an unreadable image is reported once with its path, skipped, and counted at the end.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import logging
import math
import time
from collections.abc import Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import Dataset

from ..errors import CrateVisError, RunFolderError, UsageError
from ..io.atomic import atomic_write
from ..io.runlock import RunLock
from .checkpointing import (
    capture_rng_state,
    load_training_state,
    reporting_disk_full,
    restore_rng_state,
    save_training_state,
    seed_everything,
)  # fmt: skip
from .config import TrainConfig, config_to_dict
from .data import DataBundle, EpochSampler, SeededSamples, ShardSampler, build_datasets, make_loader
from .distributed import (
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    cleanup_distributed,
    setup_distributed,
)  # fmt: skip
from .mae import MaskedSamples, build_unlabelled_datasets, resolve_objective

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "MAE_METRIC_COLUMNS", "METRIC_COLUMNS", "NonFiniteLossError", "TrainResult", "Trainer", "build_model",
    "clip_gradients", "topk_correct", "train",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Columns of ``metrics.csv``, one row per epoch.
METRIC_COLUMNS = (
    "epoch", "train_loss", "train_acc", "val_loss", "val_top1", "val_top5", "lr", "images_per_s", "seconds",
)  # fmt: skip

#: Columns of ``metrics.csv`` for masked autoencoding: the losses are mean squared errors over the removed patches
#: (of the normalised pixels, or of each patch standardised with ``norm_pix_loss``).
MAE_METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "images_per_s", "seconds")


#: Config values that define the learning-rate schedule.
_SCHEDULE_KEYS = ("epochs", "max_steps", "batch_size", "lr", "min_lr", "warmup_epochs", "warmup_lr", "scheduler")


class NonFiniteLossError(CrateVisError, RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; the run stopped without saving the bad weights."""


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        run_dir: the run folder.
        epochs_completed: epochs trained in total (including those before a resume).
        steps: optimizer steps in total.
        best_metric: best validation top-1 (%), or ``None`` without validation or for masked autoencoding.
        best_epoch: epoch of the weights in ``best/``.
        history: the per-epoch metric rows (as in ``metrics.csv``).
        model: the trained model (final weights, unwrapped, on the training device).
        skipped_images: ``(path, reason)`` of unreadable images that were skipped.
        classes: class names in label order (empty for masked autoencoding).
        objective: ``classification`` or ``mae``.
        best_val_loss: lowest validation loss of masked autoencoding (the loss of ``best/``), or ``None``.
    """

    run_dir: Path
    epochs_completed: int
    steps: int
    best_metric: float | None
    best_epoch: int | None
    history: list[dict[str, Any]]
    model: nn.Module
    skipped_images: list[tuple[str, str]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    objective: str = "classification"
    best_val_loss: float | None = None

    @property
    def final(self) -> dict[str, Any]:
        """The last metric row (empty before any epoch)."""
        return self.history[-1] if self.history else {}


# ------------------------------------------------------------------------------------------------ pure helpers
def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...]) -> list[int]:
    """Number of samples whose label is among the ``k`` highest logits, for each ``k`` (capped at the class count).

    Args:
        logits: ``(B, C)`` scores.
        target: ``(B,)`` labels.
        ks: the ``k`` values.
    """
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (B, kmax)
    hits = top.eq(target[:, None])  # (B, kmax)
    return [int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


def clip_gradients(parameters: Any, max_norm: float) -> torch.Tensor:
    """Scale gradients in place so their global L2 norm is at most ``max_norm``; returns the norm *before* clipping."""
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def build_model(cfg: TrainConfig, num_classes: int | None) -> nn.Module:
    """The model of ``cfg`` with ``num_classes`` outputs at ``cfg.img_size`` (random weights).

    :func:`crate_vis.create_model` records a timm model's extra keywords, so exported weights rebuild the same
    architecture with :func:`crate_vis.load_model`.

    Args:
        cfg: the run's config.
        num_classes: classifier outputs; ``None`` for a model without a classifier (CRATE-MAE).
    """
    from ..models import create_model

    kwargs = dict(cfg.model_kwargs)
    for key in ("num_classes", "img_size", "image_size"):
        if key in kwargs:
            raise ValueError(f"model_kwargs must not set {key!r}: it comes from the data and img_size")
    sizes: dict[str, Any] = {"img_size": cfg.img_size}
    if num_classes is not None:
        sizes["num_classes"] = num_classes
    try:
        model = create_model(cfg.model, **sizes, **kwargs)
    except KeyError as err:
        raise ValueError(err.args[0] if err.args else str(err)) from None
    except TypeError as err:
        raise ValueError(f"model {cfg.model!r} does not accept model_kwargs {kwargs}: {err}") from None
    return model


def _size(dataset: Dataset) -> int:
    """``len(dataset)``: every dataset here has one, but ``torch.utils.data.Dataset`` does not declare it."""
    return len(cast(Sized, dataset))


def _unreadable_summary(skipped: dict[str, str]) -> str:
    lines = [f"{len(skipped)} unreadable image(s) skipped:"]
    lines += [f"  {p}: {r}" for p, r in sorted(skipped.items())]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig` and runs it (:meth:`fit`).

    Args:
        cfg: the resolved config.
        train_dataset: use this dataset instead of reading ``cfg.data`` (it must have a ``classes`` attribute and
            return ``(tensor image, label)``).
        val_dataset: validation dataset to go with ``train_dataset``.

    Raises:
        RunFolderError: another live run holds ``cfg.out`` (its lock is released by :meth:`fit` or :meth:`close`).
    """

    def __init__(self, cfg: TrainConfig, train_dataset: Dataset | None = None, val_dataset: Dataset | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        requested = torch.device(cfg.device) if cfg.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dist, self.device = setup_distributed(requested)
        self.is_main = self.dist.is_main
        self._lock = RunLock(self.run_dir)
        self._new_run_dir = not self.run_dir.exists()
        self._take_lock()
        try:
            self._setup(train_dataset, val_dataset)
        except BaseException:
            self.close()
            raise

    def _setup(self, train_dataset: Dataset | None, val_dataset: Dataset | None) -> None:
        cfg = self.cfg
        if cfg.batch_size % self.dist.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {self.dist.world_size} processes")
        self.local_batch = cfg.batch_size // self.dist.world_size
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("amp 'fp16' needs a GPU; use 'bf16' on CPU")
        self._check_run_dir()
        self.objective = resolve_objective(cfg)
        self.mae = self.objective == "mae"
        if self.mae and cfg.objective is None and self.is_main:
            log.info("%s is a CRATE-MAE model: training by masked autoencoding (objective mae, mask ratio %g); "
                     "the data's labels, if any, are not used", cfg.model, cfg.mask_ratio)  # fmt: skip

        self.data = self._datasets(train_dataset, val_dataset)
        self.classes = self.data.classes
        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.model = build_model(cfg, None if self.mae else len(self.classes)).to(self.device)
        if cfg.pretrained and not cfg.resume:
            self._load_pretrained(cfg.pretrained)
        elif cfg.pretrained:
            log.info("--resume: weights come from %s; --pretrained %s is not loaded again", self.last_path, cfg.pretrained)

        self.train_model: nn.Module = self.model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # no buffers need syncing in the forward pass (LayerNorm only): skip that collective (newer PyTorch
            # spells the option forward_sync_buffers)
            ddp = nn.parallel.DistributedDataParallel
            no_sync: dict[str, Any]
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                       else {"broadcast_buffers": False})  # fmt: skip
            # CRATE-MAE's decoder_embed is never applied (see crate_vis.models.crate_mae), so its parameters get no
            # gradient; DDP must be told, as the MAE codebase's main_pretrain.py does.
            self.train_model = ddp(self.model, device_ids=ids, find_unused_parameters=self.mae, **no_sync)
        if cfg.compile:
            self.train_model = cast(nn.Module, torch.compile(self.train_model))  # an OptimizedModule

        self.train_sampler = EpochSampler(_size(self.data.train), cfg.seed, self.dist.rank, self.dist.world_size,
                                          keyed=True)  # fmt: skip
        drop_last = cfg.drop_last or cfg.mixup_active
        if cfg.mixup_active and self.local_batch % 2:
            raise ValueError(f"mixup/cutmix need an even batch per process, got {self.local_batch}")
        pin = self.device.type == "cuda"
        # each sample's augmentation is seeded by (seed, epoch, index): the same in any worker and after a resume
        train_data: Dataset = SeededSamples(self.data.train, cfg.seed)
        val_data: Any = self.data.val
        if self.mae:  # batches of (images, masking noise (B, L)) instead of (images, labels)
            patches = self._mae_patches()
            train_data = MaskedSamples(train_data, cfg.seed, patches, keyed=True)
            val_data = MaskedSamples(val_data, cfg.seed, patches) if val_data is not None else None
        self.train_loader = make_loader(train_data, self.local_batch, self.train_sampler, cfg.workers, drop_last, pin,
                                        seed=cfg.seed)  # fmt: skip
        self.val_loader = None
        if val_data is not None:
            vs = ShardSampler(len(val_data), self.dist.rank, self.dist.world_size)
            self.val_loader = make_loader(val_data, self.local_batch, vs, cfg.workers, False, pin, seed=cfg.seed)
        n = self.train_sampler.per_rank
        self.steps_per_epoch = n // self.local_batch if drop_last else math.ceil(n / self.local_batch)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{n} training images per process are fewer than one batch of {self.local_batch}")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        self.optimizer = self._optimizer()
        self.scheduler = self._scheduler()
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        self.ema = None
        if cfg.ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay)
        self.mixup = None
        if cfg.mixup_active:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                label_smoothing=cfg.label_smoothing, num_classes=len(self.classes),
            )  # fmt: skip
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)

        self.epoch = 0  # completed epochs
        self.batch_in_epoch = 0  # batches of the current epoch already trained (mid-epoch checkpoints)
        self.step = 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.history: list[dict[str, Any]] = []
        self.skipped: dict[str, str] = {}
        self._record_skipped(self.data.skipped)  # files a decoded cache left out
        self.writer: SummaryWriter | None = None
        self.saved_at: str | None = None  # what last.pt holds, for messages
        if cfg.resume:
            self._resume()
        else:
            seed_everything(cfg.seed + self.dist.rank)  # different augmentations per rank

    # ------------------------------------------------------------------------------------------------ setup
    @property
    def last_path(self) -> Path:
        """``RUN_DIR/last.pt``."""
        return self.run_dir / "last.pt"

    def _take_lock(self) -> None:
        """Lock the run folder (rank 0); every rank raises if another run holds it."""
        if not self.dist.distributed:
            self._lock.acquire()
            return
        error = None
        if self.is_main:
            try:
                self._lock.acquire()
            except RunFolderError as err:
                error = str(err)
        errors = all_gather_objects(error, self.dist)
        if errors[0] is not None:
            raise RunFolderError(errors[0])

    def close(self) -> None:
        """Release the run folder's lock (and remove the folder if this run created it and left it empty)."""
        self._lock.release()
        if self._new_run_dir and self.is_main:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only succeeds when empty

    def _check_run_dir(self) -> None:
        if not self.cfg.resume and self.last_path.exists():
            raise FileExistsError(
                f"{self.last_path} exists: pass --resume to continue that run, or choose another --out"
            )

    def _datasets(self, train_dataset: Dataset | None, val_dataset: Dataset | None) -> DataBundle:
        if train_dataset is None:
            return build_unlabelled_datasets(self.cfg) if self.mae else build_datasets(self.cfg)
        if self.mae:  # images (or (image, anything) pairs); no classes
            return DataBundle(train=train_dataset, val=val_dataset, classes=[], source="custom")
        classes = getattr(train_dataset, "classes", None)
        if not classes:
            raise ValueError("a train_dataset passed to train() needs a 'classes' attribute (class names)")
        return DataBundle(train=train_dataset, val=val_dataset, classes=list(classes), source="custom")

    def _mae_patches(self) -> int:
        """Patches per training image ``L``; refuses a mask ratio that removes no patch or keeps none."""
        from ..models.crate_mae import CRATEMAE

        assert isinstance(self.model, CRATEMAE)  # resolve_objective admits CRATE-MAE models only
        gh, gw = self.model.grid_size
        length = gh * gw
        keep = int(length * (1 - self.cfg.mask_ratio))  # as CRATEMAE.masking counts them
        if not 0 < keep < length:
            raise UsageError(
                f"mask_ratio {self.cfg.mask_ratio} keeps {keep} of the {length} patches of a {self.cfg.img_size} px "
                "image: at least one patch must be kept and one removed"
            )
        return length

    def _load_pretrained(self, path: str) -> None:
        from ..models.checkpoint import load_checkpoint

        report = load_checkpoint(self.model, path, strict=True, allow_head_mismatch=True, resize_pos_embed=True)
        if self.is_main:
            log.info("fine-tuning from %s (%s layout)", path, report.layout)
            if report.dropped_head:
                log.info("classifier head replaced for %d classes; left out of the checkpoint: %s",
                         len(self.classes), ", ".join(report.dropped_head))  # fmt: skip
            if report.resampled:
                log.info("position embeddings resampled to the %d px grid: %s", self.cfg.img_size,
                         ", ".join(report.resampled))  # fmt: skip

    def _optimizer(self) -> torch.optim.Optimizer:
        from timm.optim import create_optimizer_v2

        kwargs: dict[str, Any] = {}
        if self.cfg.betas is not None:
            kwargs["betas"] = tuple(self.cfg.betas)
        try:
            return create_optimizer_v2(
                self.model, opt=self.cfg.optimizer, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                momentum=self.cfg.momentum, filter_bias_and_bn=self.cfg.weight_decay_filter, **kwargs,
            )  # fmt: skip
        except (AssertionError, KeyError) as err:
            raise ValueError(f"optimizer {self.cfg.optimizer!r}: {err}") from None

    def _scheduler(self) -> Any:
        from timm.scheduler import CosineLRScheduler, StepLRScheduler

        warmup = min(round(self.cfg.warmup_epochs * self.steps_per_epoch), max(self.total_steps - 1, 0))
        self.warmup_steps = warmup
        common: dict[str, Any] = dict(warmup_t=warmup, warmup_lr_init=self.cfg.warmup_lr, t_in_epochs=False)
        if self.cfg.scheduler == "cosine":
            # warm-up first, then a full cosine over the remaining steps
            return CosineLRScheduler(
                self.optimizer, t_initial=max(self.total_steps - warmup, 1), lr_min=self.cfg.min_lr,
                warmup_prefix=True, **common,
            )  # fmt: skip
        return StepLRScheduler(self.optimizer, decay_t=self.total_steps + 1, decay_rate=1.0, **common)

    def _resume(self) -> None:
        state = load_training_state(self.last_path)
        saved = state.get("config", {})
        for key in ("model", "model_kwargs", "img_size"):
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise ValueError(
                    f"{self.last_path} was trained with {key}={saved[key]!r}, but this run asks for "
                    f"{getattr(self.cfg, key)!r}; resume with the same {key} or start a new --out"
                )
        if self.mae and saved.get("mask_ratio", self.cfg.mask_ratio) != self.cfg.mask_ratio:
            log.warning("mask_ratio changed since the checkpoint (%s -> %s): the epochs from here on mask differently",
                        saved["mask_ratio"], self.cfg.mask_ratio)  # fmt: skip
        if list(state.get("classes", self.classes)) != self.classes:
            raise ValueError(f"{self.last_path} was trained on classes {state['classes']}, the data has {self.classes}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        changed = [k for k in _SCHEDULE_KEYS if k in saved and saved[k] != getattr(self.cfg, k)]
        if changed:
            # the schedule is a pure function of these values and the step: rebuild it for the new ones
            log.warning("schedule settings changed since the checkpoint (%s): the learning-rate schedule is rebuilt "
                        "for %d steps and continues at step %d", ", ".join(changed), self.total_steps,
                        state["step"])  # fmt: skip
        else:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is None:
                log.warning("%s has no EMA weights; the EMA restarts from the current weights", self.last_path)
                self.ema.module.load_state_dict(self.model.state_dict())
            else:
                self.ema.module.load_state_dict(state["ema"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.scheduler.step_update(num_updates=self.step)  # the lr of the next step, as the uninterrupted run has it
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.saved_at = f"epoch {self.epoch}" + (f", step {self.step}" if self.batch_in_epoch else "")
        self.best_metric, self.best_epoch = state.get("best_metric"), state.get("best_epoch")
        self.history = [dict(r) for r in state.get("history", [])]
        rngs = state.get("rng", [])
        if len(rngs) == self.dist.world_size:
            restore_rng_state(rngs[self.dist.rank])
        else:
            log.warning("checkpoint RNG states are for %d processes, this run has %d: reseeding", len(rngs),
                        self.dist.world_size)  # fmt: skip
            seed_everything(self.cfg.seed + 1000 * self.epoch + self.dist.rank)
        if self.is_main:
            where = f"epoch {self.epoch}" + (f" + {self.batch_in_epoch} batches" if self.batch_in_epoch else "")
            log.info("resumed %s at %s (step %d)", self.last_path, where, self.step)

    # --------------------------------------------------------------------------------------------- training
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches of the current epoch, unreadable images dropped (and recorded)."""
        for images, labels, skipped in self.train_loader:
            self._record_skipped(skipped)
            yield images, labels

    def _record_skipped(self, skipped: list[tuple[str, str]]) -> None:
        for path, reason in skipped:
            if path not in self.skipped:
                self.skipped[path] = reason
                if self.is_main:
                    log.warning("skipped unreadable image %s: %s", path, reason)

    def train_one_epoch(self) -> dict[str, Any]:
        """Train the epoch ``self.epoch`` (from ``self.batch_in_epoch`` on); returns the epoch's training stats.

        Raises:
            NonFiniteLossError: the loss or gradient norm became non-finite.
        """
        self.train_model.train()
        self.train_sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * self.local_batch)
        sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
        steps_left = self.total_steps - self.step
        n_batches = min(self.steps_per_epoch - self.batch_in_epoch, steps_left)
        bar = self._progress_bar(n_batches)
        t0 = time.perf_counter()
        criterion = self._criterion()
        try:
            for images, labels in self._batches():
                if self.step >= self.total_steps or self.batch_in_epoch >= self.steps_per_epoch:
                    break
                self.batch_in_epoch += 1
                empty = torch.tensor([float(images.numel() == 0)], device=self.device)
                if all_reduce_max(empty, self.dist).item() > 0:
                    continue  # a batch of only unreadable images somewhere: every rank skips it together
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                loss, logits, labels = self._train_step(images, labels, criterion)
                with torch.no_grad():
                    b = labels.shape[0]  # labels: (B,), or the masking noise (B, L) of masked autoencoding
                    correct = 0.0 if logits is None else float((logits.argmax(1) == labels).sum())
                    sums += torch.tensor([loss * b, correct, b], dtype=torch.float64)
                bar.update(1)
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{sums[0] / sums[2]:.4f}", lr=f"{self.current_lr():.2e}",
                                img_s=f"{sums[2] * self.dist.world_size / max(elapsed, 1e-9):.1f}")  # fmt: skip
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        sums = all_reduce_sum(sums.to(self.device), self.dist).cpu()
        n = max(float(sums[2]), 1.0)
        return {"train_loss": float(sums[0]) / n, "train_acc": None if self.mae else 100.0 * float(sums[1]) / n,
                "images_per_s": float(sums[2]) / max(seconds, 1e-9), "train_seconds": seconds}  # fmt: skip

    def _criterion(self) -> nn.Module | None:
        if self.mae:
            return None  # the model computes its own loss
        if self.mixup is not None:
            from timm.loss import SoftTargetCrossEntropy

            return SoftTargetCrossEntropy()  # label smoothing is folded into the mixed targets
        return nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)

    def _train_step(
        self, images: torch.Tensor, labels: torch.Tensor, criterion: nn.Module | None
    ) -> tuple[float, torch.Tensor | None, torch.Tensor]:
        """Forward, non-finite check, backward, clipping, optimizer / scheduler / EMA step.

        Args:
            images: ``(B, C, H, W)``.
            labels: ``(B,)`` labels, or for masked autoencoding the masking noise ``(B, L)``.
            criterion: the classification loss (``None`` for masked autoencoding).

        Returns:
            ``(loss, logits (B, C), labels (B,))``, logits ``None`` for masked autoencoding; ``B`` is one less than
            the input when mixup had to drop an odd sample.
        """
        targets: torch.Tensor = labels
        if self.mixup is not None:
            if images.shape[0] % 2:  # an unreadable image made the batch odd; mixup pairs samples up
                images, labels = images[:-1], labels[:-1]
            images, targets = self.mixup(images, labels)  # targets: (B, C) soft labels
        logits: torch.Tensor | None = None
        with self._autocast():
            if self.mae:  # the model's loss over the removed patches; targets: the masking noise (B, L)
                loss = self.train_model(images, self.cfg.mask_ratio, targets)[0].float()
            else:
                assert criterion is not None
                logits = self.train_model(images)  # (B, C)
                loss = criterion(logits.float(), targets)
        bad = torch.tensor([float(not torch.isfinite(loss))], device=self.device)
        if all_reduce_max(bad, self.dist).item() > 0:
            local = bool(torch.isfinite(loss))
            self._non_finite("the loss on another process is not finite" if local else f"the loss is {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.cfg.clip_grad is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            norm = clip_gradients(self.model.parameters(), self.cfg.clip_grad)
            if self.scaler is None and not torch.isfinite(norm):
                self._non_finite(f"the gradient norm is {float(norm)}")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself when fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        self.scheduler.step_update(num_updates=self.step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        return float(loss.detach()), None if logits is None else logits.detach(), labels

    def _non_finite(self, what: str, where: str | None = None) -> None:
        keep = (f"the last good checkpoint is kept: {self.last_path} ({self.saved_at})" if self.saved_at
                else "no checkpoint was written")  # fmt: skip
        where = where or f"epoch {self.epoch + 1}, step {self.step + 1}"
        raise NonFiniteLossError(
            f"training stopped at {where}: {what} (lr {self.current_lr():.3g}); {keep}. Lower the learning rate or "
            + ("set clip_grad, then --resume" if self.saved_at else "set clip_grad and start again")
        )

    def _check_finite(self, val: dict[str, float], where: str) -> None:
        """Refuse to checkpoint weights that are no longer finite, or that give a non-finite validation loss."""
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            self._non_finite("the weights are no longer finite", where)
        if val and not math.isfinite(val["val_loss"]):
            self._non_finite(f"the validation loss is {val['val_loss']}", where)

    def current_lr(self) -> float:
        """Learning rate of the first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"])

    def _progress_bar(self, total: int) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", unit="batch", leave=False,
                    dynamic_ncols=True, disable=not (self.is_main and self.cfg.show_progress))  # fmt: skip

    # ------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def validate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Validation loss, top-1 and top-5 (%) over the whole validation set (exact across processes).

        For masked autoencoding: the masked-pixel loss only, each image masked as in every epoch.
        """
        if self.val_loader is None:
            return {}
        model = model if model is not None else self.model
        was_training = model.training
        model.eval()
        k5 = min(5, len(self.classes))
        sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1, top-k, n
        for images, labels, skipped in self.val_loader:
            self._record_skipped(skipped)
            if images.numel() == 0:
                continue
            images, labels = images.to(self.device), labels.to(self.device)
            b = labels.shape[0]
            if self.mae:  # labels: the masking noise (B, L); every image has the same number of removed patches
                with self._autocast():
                    loss = model(images, self.cfg.mask_ratio, labels)[0].float()
                sums += torch.tensor([float(loss) * b, 0, 0, b], dtype=torch.float64)
                continue
            with self._autocast():
                logits = model(images).float()  # (B, C)
            loss = F.cross_entropy(logits, labels, reduction="sum")
            c1, c5 = topk_correct(logits, labels, (1, k5))
            sums += torch.tensor([float(loss), c1, c5, b], dtype=torch.float64)
        model.train(was_training)
        sums = all_reduce_sum(sums.to(self.device), self.dist).cpu()
        n = max(float(sums[3]), 1.0)
        if self.mae:
            return {"val_loss": float(sums[0]) / n}
        return {"val_loss": float(sums[0]) / n, "val_top1": 100 * float(sums[1]) / n, "val_top5": 100 * float(sums[2]) / n}

    # ----------------------------------------------------------------------------------------------- saving
    def _state(self) -> dict[str, Any]:
        rngs = all_gather_objects(capture_rng_state(), self.dist)  # collective: every rank calls it
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
            "best_metric": self.best_metric, "best_epoch": self.best_epoch,
            "history": self.history, "rng": rngs, "world_size": self.dist.world_size,
            "config": config_to_dict(self.cfg), "classes": self.classes,
        }  # fmt: skip

    def _export_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _save_best(self, row: dict[str, Any]) -> None:
        from ..models.checkpoint import save_model

        model = self._export_model()
        meta: dict[str, Any] = {"classes": self.classes, "epoch": self.epoch, "img_size": self.cfg.img_size,
                                "val_top1": row.get("val_top1"), "data": self.cfg.data, "ema": self.ema is not None}
        if self.mae:
            meta = {"objective": "mae", "mask_ratio": self.cfg.mask_ratio, "epoch": self.epoch,
                    "img_size": self.cfg.img_size, "val_loss": row.get("val_loss"), "train_loss": row.get("train_loss"),
                    "data": self.cfg.data, "ema": self.ema is not None}  # fmt: skip
        save_training_state(self.run_dir / "best.pt", {
            "model": model.state_dict(), "epoch": self.epoch, "step": self.step, "metrics": row,
            "config": config_to_dict(self.cfg), "classes": self.classes,
        }, then=self._next_step())  # fmt: skip
        with reporting_disk_full(self.run_dir / "best", f"{self.last_path} is saved", self._next_step()):
            save_model(model, self.run_dir / "best", metadata=meta)

    def _next_step(self) -> str:
        """What to do after a full disk: resume when a checkpoint exists, else start again."""
        return "continue with --resume" if self.saved_at or self.last_path.exists() else "start the run again"

    def _reporting_disk_full(self, path: Path) -> contextlib.AbstractContextManager[None]:
        return reporting_disk_full(path, then=self._next_step())

    @property
    def metric_columns(self) -> tuple[str, ...]:
        """The columns of ``metrics.csv`` for this run's objective."""
        return MAE_METRIC_COLUMNS if self.mae else METRIC_COLUMNS

    def _write_metrics(self) -> None:
        buf = io.StringIO()
        columns = self.metric_columns
        writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.history:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
        with self._reporting_disk_full(self.run_dir / "metrics.csv"):
            with atomic_write(self.run_dir / "metrics.csv", "w", newline="") as fh:
                fh.write(buf.getvalue())

    def _write_config(self) -> None:
        with self._reporting_disk_full(self.run_dir / "config.yaml"):
            with atomic_write(self.run_dir / "config.yaml", "w") as fh:
                yaml.safe_dump(config_to_dict(self.cfg), fh, sort_keys=False)

    def _log_epoch(self, row: dict[str, Any]) -> None:
        val = ""
        if self.mae:
            if row.get("val_loss") is not None:
                val = f" | val masked-pixel loss {row['val_loss']:.4f}"
            log.info("epoch %d/%d: train masked-pixel loss %.4f%s | lr %.3g | %.1f img/s | %.1f s", row["epoch"],
                     self.cfg.epochs, row["train_loss"], val, row["lr"], row["images_per_s"], row["seconds"])  # fmt: skip
        else:
            if row.get("val_top1") is not None:
                val = f" | val loss {row['val_loss']:.4f} top1 {row['val_top1']:.2f}%"
                if len(self.classes) > 5:  # with 5 classes or fewer top-5 is always 100% (as eval leaves it out)
                    val += f" top5 {row['val_top5']:.2f}%"
            log.info("epoch %d/%d: train loss %.4f acc %.2f%%%s | lr %.3g | %.1f img/s | %.1f s", row["epoch"],
                     self.cfg.epochs, row["train_loss"], row["train_acc"], val, row["lr"], row["images_per_s"],
                     row["seconds"])  # fmt: skip
        if self.writer is not None:
            for key in self.metric_columns[1:]:
                if row.get(key) is not None:
                    self.writer.add_scalar(key, row[key], row["epoch"])
            self.writer.flush()

    # -------------------------------------------------------------------------------------------------- fit
    def fit(self) -> TrainResult:
        """Train until ``epochs`` (or ``max_steps`` / ``stop_after_epoch``), validating and checkpointing each epoch.

        The run folder's lock is released when it returns or raises.
        """
        self._take_lock()  # held since __init__, unless an earlier fit() released it
        try:
            return self._fit()
        finally:
            self._lock.release()

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_config()
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))
            n_params = sum(p.numel() for p in self.model.parameters())
            task = (f"masked autoencoding, mask ratio {cfg.mask_ratio:g}" if self.mae
                    else f"{len(self.classes)} classes")  # fmt: skip
            log.info("training %s (%.2fM parameters) on %s: %d train / %s val images, %s, %d steps of %d "
                     "images on %d process(es), device %s", cfg.model, n_params / 1e6, cfg.data or self.data.source,
                     _size(self.data.train), _size(self.data.val) if self.data.val is not None else 0, task,
                     self.total_steps, cfg.batch_size, self.dist.world_size, self.device)  # fmt: skip
        try:
            while self.epoch < cfg.epochs and self.step < self.total_steps:
                t0 = time.perf_counter()
                stats = self.train_one_epoch()
                finished = self.batch_in_epoch >= self.steps_per_epoch
                if finished:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                last = self.epoch >= cfg.epochs or self.step >= self.total_steps
                stopping = last or (cfg.stop_after_epoch is not None and self.epoch >= cfg.stop_after_epoch)
                val = self.validate(self._export_model()) if (self.epoch % cfg.eval_every == 0 or stopping) else {}
                row: dict[str, Any] = {"epoch": self.epoch + (0 if finished else 1), "lr": self.current_lr(),
                                       **stats, **val, "seconds": time.perf_counter() - t0}  # fmt: skip
                self.history = [r for r in self.history if r["epoch"] < row["epoch"]] + [row]
                improved = False
                if self.mae:
                    # the lowest validation loss (stored negated: higher is better); without validation, the last epoch
                    if val and (self.best_metric is None or -val["val_loss"] > self.best_metric):
                        self.best_metric, self.best_epoch, improved = -val["val_loss"], row["epoch"], True
                    elif self.val_loader is None:
                        self.best_epoch, improved = row["epoch"], True
                elif val:
                    if self.best_metric is None or val["val_top1"] > self.best_metric:
                        self.best_metric, self.best_epoch, improved = val["val_top1"], row["epoch"], True
                elif self.val_loader is None and (self.best_metric is None or -stats["train_loss"] > self.best_metric):
                    # without validation data, "best" means the lowest training loss (stored negated)
                    self.best_metric, self.best_epoch, improved = -stats["train_loss"], row["epoch"], True
                self._check_finite(val, f"the end of epoch {row['epoch']}")
                state = self._state()
                if self.is_main:
                    kept = (f"the previous checkpoint ({self.saved_at}) is intact" if self.saved_at
                            else "no checkpoint had been written yet")  # fmt: skip
                    save_training_state(self.last_path, state, kept=kept, then=self._next_step())
                    if improved:
                        self._save_best(row)
                    self._write_metrics()
                    self._log_epoch(row)
                    from .plots import plot_curves

                    curves = self.run_dir / "curves.png"
                    with self._reporting_disk_full(curves):
                        if self.mae:
                            plot_curves(self.history, curves, title=f"{cfg.model}, mask ratio {cfg.mask_ratio:g}",
                                        loss_label="masked-pixel MSE", accuracy=False)  # fmt: skip
                        else:
                            plot_curves(self.history, curves, title=cfg.model, num_classes=len(self.classes))
                self.saved_at = f"epoch {row['epoch']}" + ("" if finished else f", step {self.step}")
                if stopping:
                    if not last and self.is_main:
                        log.info("stopped after epoch %d as asked; continue with --resume", self.epoch)
                    break
        finally:
            if self.writer is not None:
                self.writer.close()
        if self.skipped and self.is_main:
            log.warning(_unreadable_summary(self.skipped))
        if self.dist.distributed:
            self._check_replicas()
        best = self.best_metric if self.val_loader is not None and not self.mae else None
        best_loss = -self.best_metric if self.mae and self.best_metric is not None else None
        return TrainResult(
            run_dir=self.run_dir, epochs_completed=self.epoch, steps=self.step, best_metric=best,
            best_epoch=self.best_epoch, history=self.history, model=self.model,
            skipped_images=sorted(self.skipped.items()), classes=self.classes, objective=self.objective,
            best_val_loss=best_loss,
        )  # fmt: skip

    def _check_replicas(self) -> None:
        """All ranks must hold identical weights at the end (DDP keeps them in sync); raise if not."""
        vec = torch.stack([p.detach().double().sum() for p in self.model.parameters()]).cpu()  # (P,)
        sums = all_gather_objects(vec, self.dist)
        if any(not torch.equal(sums[0], s) for s in sums[1:]):
            raise RuntimeError("processes ended with different weights; the distributed run is inconsistent")
        if self.is_main:
            log.info("all %d processes hold identical weights", self.dist.world_size)


def train(
    cfg: TrainConfig, train_dataset: Dataset | None = None, val_dataset: Dataset | None = None
) -> TrainResult:
    """Train (or fine-tune, or resume) as ``cfg`` says; see :class:`Trainer`.

    Args:
        cfg: the resolved config (:func:`crate_vis.train.resolve_config`).
        train_dataset: optional dataset instead of ``cfg.data`` (needs a ``classes`` attribute).
        val_dataset: optional validation dataset to go with it.

    Returns:
        A :class:`TrainResult`. The run folder holds ``config.yaml``, ``last.pt``, ``best.pt``, ``best/``
        (project-format weights for :func:`crate_vis.load_model`), ``metrics.csv`` and ``curves.png``. ``best``
        is the highest validation top-1 of a classifier, the lowest validation loss of masked autoencoding
        (:mod:`crate_vis.train.mae`), or without validation data the lowest training loss of a classifier and the
        last epoch of masked autoencoding.

    Example:
        >>> from crate_vis.train import resolve_config, train
        >>> cfg = resolve_config("crate_mae_pretrain", data="photos/", out="runs/mae", model="crate_mae_test_patch8_32",
        ...                      img_size=32, batch_size=8, epochs=2)  # doctest: +SKIP
        >>> train(cfg).best_val_loss  # doctest: +SKIP

    Raises:
        NonFiniteLossError: the loss diverged (the last good checkpoint is kept).
        DiskFullError: a checkpoint or metrics file could not be written (the previous one is kept).
        RunFolderError: another run is using ``cfg.out``.
        ValueError / FileNotFoundError / FileExistsError: bad config, data or run folder.
    """
    trainer = None
    try:
        trainer = Trainer(cfg, train_dataset, val_dataset)
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        cleanup_distributed()

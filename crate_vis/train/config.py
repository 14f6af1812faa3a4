"""Training configuration: one dataclass, YAML recipes, and strict merging (an unknown key is an error).

Precedence: :class:`TrainConfig` defaults < recipe file < explicit overrides (CLI flags). The resolved config is
written to ``RUN_DIR/config.yaml`` so a run folder always says how it was made.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TrainConfig", "RECIPES_DIR", "list_recipes", "load_recipe", "resolve_config", "config_to_dict"]

#: Preset recipes shipped with the package (``crate_vis/recipes/*.yaml``).
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class TrainConfig:
    """Everything a training run depends on. Field names are the recipe keys.

    Attributes:
        data: ImageFolder root (``train/``, ``val/`` class folders), CIFAR python folder, or ``"synthetic"``.
        model: registered CRATE name or timm model name.
        model_kwargs: extra constructor keywords (e.g. ``{"embed_dim": 192, "depth": 6}`` for a timm ViT,
            ``{"norm_pix_loss": true}`` for CRATE-MAE).
        objective: ``classification`` (cross-entropy on the labels) or ``mae`` (masked autoencoding of unlabelled
            images, :mod:`crate_vis.train.mae`); ``None`` chooses from the model: ``mae`` for a CRATE-MAE model
            (``crate_mae_*``), ``classification`` for every other.
        mask_ratio: share of patches removed per image when ``objective`` is ``mae``.
        out: run folder (checkpoints, metrics, plots, config).
        epochs: epochs in the schedule.
        batch_size: global batch size, split evenly over the processes of a distributed run.
        img_size: square training resolution in pixels.
        optimizer: timm optimizer name (``lion``, ``adamw``, ``sgd``, ...).
        lr: peak learning rate (after warm-up).
        blr: base learning rate per 256 images: when set, ``lr = blr * batch_size / 256`` (the linear scaling
            rule of the MAE codebase), so the recipe's rate follows ``batch_size``. An ``lr`` given as an override
            (``--lr``) wins over a recipe's ``blr``.
        weight_decay: decoupled weight decay.
        weight_decay_filter: exempt biases, norm weights and 1-d parameters (and a timm model's
            ``no_weight_decay()`` names) from weight decay, as timm does; ``False`` decays every parameter, as the
            official CRATE scripts do.
        betas: optimizer betas; ``None`` keeps the optimizer's default.
        momentum: SGD momentum.
        scheduler: ``cosine`` (after warm-up) or ``constant``.
        warmup_epochs: linear warm-up length in epochs (fractions allowed); the schedule is stepped per iteration.
        warmup_lr: learning rate at the first step of the warm-up.
        min_lr: floor of the cosine decay.
        label_smoothing: cross-entropy label smoothing.
        mixup: mixup alpha (0 disables).
        cutmix: cutmix alpha (0 disables).
        mixup_prob: probability of applying mixup or cutmix to a batch.
        mixup_switch_prob: probability of cutmix instead of mixup when both are enabled.
        ema_decay: decay of an exponential moving average of the weights (``None`` disables).
        clip_grad: maximum global gradient norm (``None`` disables).
        amp: ``none``, ``bf16`` (autocast, CPU or GPU) or ``fp16`` (autocast and gradient scaler, GPU only).
        compile: wrap the model with ``torch.compile``.
        crop_scale: random-resized-crop area range.
        crop_ratio: random-resized-crop aspect-ratio range.
        hflip: horizontal flip probability.
        color_jitter: colour-jitter strength (``None`` disables).
        auto_augment: timm auto-augment spec (``rand-m9-mstd0.5``, ...), ``None`` disables.
        rand_augment: ``[num_ops, magnitude]`` of torchvision's RandAugment (what the official fine-tuning uses).
        re_prob: random-erasing probability.
        interpolation: resize interpolation.
        eval_crop_pct: centre-crop fraction at evaluation (0.875: resize 256, crop 224).
        eval_crop_mode: ``center`` (resize shorter side, centre crop) or ``squash`` (resize to a square).
        drop_last: drop the last incomplete training batch (forced on with mixup/cutmix, which need even batches).
        cache: serve an ImageFolder's images from a decoded cache (:mod:`crate_vis.data.cache`): each image is
            decoded once and stored shrunk, so epochs skip the JPEG decoding. Off by default because the cache takes
            disk space the user should choose to spend (about ``N * (2 * img_size)**2 * 3`` bytes for ``N``
            training images: 1 GB for imagenette at 96 px, hundreds of GB for ImageNet at 224 px). Ignored for
            CIFAR and synthetic data, which are in memory already.
        cache_dir: where decoded caches live (default ``$CRATE_VIS_CACHE/decoded`` or ``~/.cache/crate-vis/decoded``).
        cache_size: shorter side of cached training images in pixels (default ``2 * img_size``; images already
            smaller are kept as they are). Validation images are cached at the evaluation resize.
        workers: DataLoader worker processes per training process (and decoding processes for a cache build).
        threads: CPU threads for PyTorch's intra-op parallelism (``None`` keeps PyTorch's default).
        seed: seed of initialisation, shuffling and augmentation.
        deterministic: ask PyTorch for deterministic algorithms.
        device: torch device (default: cuda if available, else cpu).
        max_steps: stop after this many optimizer steps; the schedule is shortened to end there.
        stop_after_epoch: stop (with a checkpoint) after this epoch, keeping the full schedule; ``--resume``
            continues. Used to split long runs into jobs.
        resume: continue from ``out/last.pt``.
        pretrained: checkpoint to fine-tune from (any layout :func:`crate_vis.load_checkpoint` reads).
        tensorboard: also log to TensorBoard (``out/tb``).
        progress: show a progress bar: ``True`` always, ``False`` never, ``None`` (the default) when stderr is a
            terminal, as the other batch commands do (a log file or a CI job gets no bar).
        eval_every: validate every N epochs (and after the last one).
        val_split: name of the validation folder of an ImageFolder root.
        synthetic_train_images: training images for ``data: synthetic``.
        synthetic_val_images: validation images for ``data: synthetic``.
        synthetic_classes: classes for ``data: synthetic``.
        recipe: name or path of the recipe the run started from (informational).
    """

    data: str = ""
    model: str = "crate_mini_patch8_96"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    objective: str | None = None
    mask_ratio: float = 0.75
    out: str = "runs/train"
    epochs: int = 10
    batch_size: int = 64
    img_size: int = 96
    optimizer: str = "adamw"
    lr: float = 1e-3
    blr: float | None = None
    weight_decay: float = 0.05
    weight_decay_filter: bool = True
    betas: list[float] | None = None
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    ema_decay: float | None = None
    clip_grad: float | None = None
    amp: str = "none"
    compile: bool = False
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    color_jitter: float | None = None
    auto_augment: str | None = None
    rand_augment: list[int] | None = None
    re_prob: float = 0.0
    interpolation: str = "bilinear"
    eval_crop_pct: float = 0.875
    eval_crop_mode: str = "center"
    drop_last: bool = False
    cache: bool = False
    cache_dir: str | None = None
    cache_size: int | None = None
    workers: int = 2
    threads: int | None = None
    seed: int = 0
    deterministic: bool = False
    device: str | None = None
    max_steps: int | None = None
    stop_after_epoch: int | None = None
    resume: bool = False
    pretrained: str | None = None
    tensorboard: bool = False
    progress: bool | None = None
    eval_every: int = 1
    val_split: str = "val"
    synthetic_train_images: int = 2000
    synthetic_val_images: int = 500
    synthetic_classes: int = 10
    recipe: str | None = None

    def __post_init__(self) -> None:
        if self.blr is not None and isinstance(self.blr, (int, float)) and self.blr > 0:
            self.lr = self.blr * self.batch_size / 256  # the MAE codebase's linear scaling rule
        self.validate()

    def validate(self) -> None:
        """Check value ranges; raise :class:`ValueError` naming the offending key."""
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.img_size >= 1, "img_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.blr is None or self.blr > 0, f"blr must be > 0, got {self.blr}"),
            (self.objective in (None, "classification", "mae"),
             f"objective must be 'classification' or 'mae' (or null: chosen from the model), got {self.objective!r}"),
            (0 < self.mask_ratio < 1, f"mask_ratio must be in (0, 1), got {self.mask_ratio}"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.scheduler in {"cosine", "constant"}, "scheduler must be 'cosine' or 'constant'"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix must be >= 0"),
            (self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay must be in (0, 1)"),
            (self.clip_grad is None or self.clip_grad > 0, "clip_grad must be > 0"),
            (self.amp in {"none", "bf16", "fp16"}, "amp must be 'none', 'bf16' or 'fp16'"),
            (len(self.crop_scale) == 2 and len(self.crop_ratio) == 2, "crop_scale and crop_ratio take two numbers"),
            (self.rand_augment is None or len(self.rand_augment) == 2, "rand_augment takes [num_ops, magnitude]"),
            (0 < self.eval_crop_pct <= 1, "eval_crop_pct must be in (0, 1]"),
            (self.eval_crop_mode in {"center", "squash"}, "eval_crop_mode must be 'center' or 'squash'"),
            (self.workers >= 0, "workers must be >= 0"),
            (self.cache_size is None or self.cache_size >= 1, "cache_size must be >= 1"),
            (self.threads is None or self.threads >= 1, "threads must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.stop_after_epoch is None or self.stop_after_epoch >= 1, "stop_after_epoch must be >= 1"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (isinstance(self.model_kwargs, dict), "model_kwargs must be a mapping"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid training config: {message}")

    @property
    def show_progress(self) -> bool:
        """Whether progress bars are drawn: :attr:`progress`, or when it is ``None`` whether stderr is a terminal."""
        if self.progress is not None:
            return bool(self.progress)
        import sys

        return bool(getattr(sys.stderr, "isatty", lambda: False)())

    @property
    def mixup_active(self) -> bool:
        """Whether mixup or cutmix is applied."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain YAML/JSON-serialisable values."""
    return dataclasses.asdict(cfg)


def list_recipes() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _recipe_path(name_or_path: str | os.PathLike[str]) -> Path:
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"} or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"recipe file not found: {p}")
        return p
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    close = difflib.get_close_matches(str(name_or_path), list_recipes(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise FileNotFoundError(f"unknown recipe {str(name_or_path)!r}{hint} (shipped: {', '.join(list_recipes())})")


def check_keys(values: Mapping[str, Any], source: str) -> None:
    """Raise :class:`ValueError` naming the first key of ``values`` that is not a :class:`TrainConfig` field."""
    for key in values:
        if key not in _FIELDS:
            close = difflib.get_close_matches(str(key), list(_FIELDS), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{source}: unknown key {key!r}{hint}")


def load_recipe(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a recipe (a shipped name such as ``crate_paper_imagenet`` or a YAML path) into a dict of config values.

    Raises:
        FileNotFoundError: no such recipe.
        ValueError: malformed YAML or an unknown key (named in the message).
    """
    path = _recipe_path(name_or_path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {path}: not valid YAML ({err})") from None
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path}: expected a mapping of keys to values, got {type(values).__name__}")
    check_keys(values, f"recipe {path}")
    return values


def _coerce(key: str, value: Any) -> Any:
    """Turn strings YAML leaves unparsed (``5e-5`` has no dot, so YAML 1.1 reads a string) into numbers."""
    kind = str(_FIELDS[key].type)
    if value is None or not isinstance(value, str):
        if "float" in kind and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    base = kind.split("|")[0].strip()
    try:
        if base == "float":
            return float(value)
        if base == "int":
            return int(value)
    except ValueError:
        raise ValueError(f"invalid training config: {key} expects a number, got {value!r}") from None
    return value


def resolve_config(
    recipe: str | os.PathLike[str] | Mapping[str, Any] | None = None, **overrides: Any
) -> TrainConfig:
    """Defaults < recipe < overrides; ``None`` overrides are ignored (flags that were not given).

    A recipe's ``blr`` sets ``lr`` from ``batch_size`` (:class:`TrainConfig`); an ``lr`` among the overrides
    replaces that rule.

    Args:
        recipe: shipped recipe name, YAML path, an already-loaded mapping, or ``None``.
        **overrides: config values that win over the recipe.

    Raises:
        ValueError: unknown keys or invalid values.
    """
    values: dict[str, Any] = {}
    if isinstance(recipe, Mapping):
        check_keys(recipe, "config")
        values.update(recipe)
    elif recipe is not None:
        values.update(load_recipe(recipe))
        values.setdefault("recipe", str(recipe))
    given = {k: v for k, v in overrides.items() if v is not None}
    check_keys(given, "config override")
    if "lr" in given and "blr" not in given:
        values.pop("blr", None)  # an explicit learning rate wins over a recipe's base rate
    values.update(given)
    values = {k: _coerce(k, v) for k, v in values.items()}
    try:
        return TrainConfig(**values)
    except TypeError as err:  # wrong value types that dataclass construction trips on
        raise ValueError(f"invalid training config: {err}") from None

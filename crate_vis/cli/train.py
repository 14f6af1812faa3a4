"""``crate-vis train``: train or fine-tune CRATE or a timm ViT; the same command runs under ``torchrun``.

Values come from the config defaults, then the recipe (``--config NAME|FILE``), then the flags given here. With
``--resume`` the run folder's ``config.yaml`` is the starting point instead of the recipe.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from .common import key_value

__all__ = ["add_arguments", "run"]

log = logging.getLogger(__name__)


_key_value = key_value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``crate-vis train``; every one left out keeps the recipe's value."""
    p.add_argument("--data", default=None, help="ImageFolder root (train/, val/), CIFAR python folder, or 'synthetic'")
    p.add_argument("--model", "-m", default=None, help="CRATE name (crate-vis list-models) or timm name")
    p.add_argument("--out", "-o", required=True, help="run folder (checkpoints, metrics.csv, curves.png)")
    p.add_argument("--config", default=None, help="recipe: a shipped name (crate_paper_imagenet, ...) or a YAML file")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--pretrained", default=None, help="checkpoint to fine-tune from (the head is replaced if needed)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", "-b", type=int, default=None, help="global batch size (split over processes)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--optimizer", default=None, help="timm optimizer name: lion, adamw, sgd, ...")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", "--wd", type=float, default=None)
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--label-smoothing", type=float, default=None)
    p.add_argument("--clip-grad", type=float, default=None, help="max gradient norm")
    p.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the weights with this decay")
    p.add_argument("--mixup", type=float, default=None, help="mixup alpha")
    p.add_argument("--cutmix", type=float, default=None, help="cutmix alpha")
    p.add_argument("--mask-ratio", type=float, default=None,
                   help="masked autoencoding (CRATE-MAE): fraction of the patches removed (recipe default 0.75)")
    p.add_argument("--workers", "-j", type=int, default=None, help="data-loading processes")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="decode an ImageFolder's images once into a memory-mapped cache and train from it")  # fmt: skip
    p.add_argument("--cache-dir", default=None,
                   help="folder of decoded caches (default $CRATE_VIS_CACHE/decoded or ~/.cache/crate-vis/decoded)")
    p.add_argument("--cache-size", type=int, default=None, help="shorter side of cached training images (default 2x)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default=None, help="autocast precision")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (schedule shortened)")
    p.add_argument("--stop-after-epoch", type=int, default=None, help="stop after this epoch; --resume continues")
    p.add_argument("--tensorboard", action="store_true", default=None, help="also log to OUT/tb")
    p.add_argument("--deterministic", action="store_true", default=None, help="deterministic algorithms")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.add_argument("--model-arg", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="extra model constructor keyword, e.g. embed_dim=192 (repeatable)")  # fmt: skip
    p.add_argument("--set", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="any recipe key, e.g. --set crop_scale=[0.35,1] (repeatable)")  # fmt: skip


_FLAG_KEYS = (
    "data", "model", "out", "resume", "pretrained", "epochs", "batch_size", "img_size", "optimizer", "lr",
    "weight_decay", "warmup_epochs", "label_smoothing", "clip_grad", "ema_decay", "mixup", "cutmix", "workers",
    "cache", "cache_dir", "cache_size", "threads", "seed", "device", "amp", "compile", "max_steps", "stop_after_epoch",
    "tensorboard", "deterministic", "progress", "mask_ratio",
)  # fmt: skip


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~crate_vis.train.TrainConfig` the flags describe."""
    from ..errors import RunFolderError
    from ..train.config import load_recipe, resolve_config

    base: dict[str, Any] = {}
    out = Path(args.out)
    saved = out / "config.yaml"
    if args.resume and not (out / "last.pt").is_file():
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"{out} is a file, not a run folder: give --resume the folder of the run")
        what = "no checkpoint to resume (no last.pt: the run stopped before its first one)" if saved.is_file() else \
            "no run to resume"  # fmt: skip
        raise RunFolderError(f"{out} holds {what}; start a run there without --resume, e.g. crate-vis train --data "
                             f"DATA --model NAME --out {out}")  # fmt: skip
    if args.resume and saved.is_file():
        base = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        base.pop("stop_after_epoch", None)  # a pause point of the earlier job, not of this one (give it again if wanted)
        base.pop("progress", None)  # a display choice of the earlier job (bars follow this terminal)
        if args.config:
            log.info("--resume: starting from %s; --config %s values are applied on top", saved, args.config)
            base.update(load_recipe(args.config))
    elif args.config:
        base = load_recipe(args.config)
        base.setdefault("recipe", args.config)
    overrides: dict[str, Any] = {k: getattr(args, k) for k in _FLAG_KEYS}
    for key, value in args.set:
        overrides[key] = value
    if args.model_arg:
        overrides["model_kwargs"] = {**base.get("model_kwargs", {}), **dict(args.model_arg)}
    cfg = resolve_config(base, **overrides)
    if not cfg.data:
        raise ValueError("--data is required (an ImageFolder root, a CIFAR python folder, or 'synthetic')")
    return cfg


def run(args: argparse.Namespace) -> int:
    """Train; prints where the results are. Errors surface as one line through the CLI."""
    if int(os.environ.get("RANK", "0")) > 0:
        logging.getLogger("crate_vis").setLevel(logging.WARNING)  # only rank 0 reports
    from ..train import train

    cfg = config_from_args(args)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        final = result.final
        line = f"done: {result.epochs_completed} epoch(s), {result.steps} steps in {result.run_dir}"
        if result.best_metric is not None:
            line += f"; best val top-1 {result.best_metric:.2f}% (epoch {result.best_epoch})"
        if final.get("val_top1") is not None:
            line += f"; last val top-1 {final['val_top1']:.2f}%"
        print(line)
        if (result.run_dir / "best").is_dir():
            print(f"best weights: {result.run_dir / 'best'} (crate_vis.load_model / crate-vis eval --checkpoint)")
        if result.skipped_images:
            print(f"{len(result.skipped_images)} unreadable image(s) were skipped (listed above)")
    return 0

"""Reading, converting, loading and saving checkpoints.

Layouts read by :func:`read_state_dict`:

* the official ``main.py`` dict (``{"state_dict": ..., "optimizer": ...}``, keys prefixed ``module.``),
* the official ``finetune.py`` dict (``{"model": ...}``),
* a bare state dict (``.pth``/``.pt``/``.pth.tar``), and
* the project format: a ``.safetensors`` file whose metadata (and a ``config.json`` beside it) holds the config.

Official key names are renamed through one explicit table, :data:`OFFICIAL_TO_CRATE_VIS`; loading is strict by
default and a mismatch raises :class:`CheckpointError` naming the missing, unexpected and wrongly-shaped keys, before
any tensor is copied. ``torch.load`` only runs with ``weights_only=True``: a file that needs arbitrary unpickling is
refused, never executed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn

from ..errors import CheckpointError
from ..io.atomic import atomic_save, atomic_write_json
from .conversion import FAMILY_NAMES, convert_official_state_dict, detect_layout
from .crate import resample_pos_embed
from .registry import family_of

__all__ = [
    "CheckpointError", "LoadReport", "RUN_CHECKPOINT_FORMAT", "CONFIG_FILE", "WEIGHTS_FILE", "checkpoint_arch",
    "load_checkpoint", "read_checkpoint", "read_state_dict", "save_model", "model_to_config", "unwrap_state_dict",
    "safe_torch_load", "nonfinite_keys", "nonfinite_message",
]  # fmt: skip

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: ``format`` entry of the training checkpoints ``last.pt`` / ``best.pt`` (written by :mod:`crate_vis.train`).
RUN_CHECKPOINT_FORMAT = "crate-vis-train"




@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did.

    Attributes:
        source: where the weights came from.
        layout: ``"official"``, ``"crate-vis"`` or ``"other"``.
        dropped_head: head keys left out because their shape did not fit (only with ``allow_head_mismatch``).
        resampled: keys resampled to the model's grid (position embeddings).
    """

    source: str
    layout: str
    dropped_head: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------- reading
def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with one class allowed beyond tensors and containers: ``argparse.Namespace``,
    the ``args`` entry of MAE-codebase checkpoints (CRATE-MAE). Anything else that needs unpickling is refused."""
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes); an interrupted download or copy?")
    if path.suffix == ".npz":
        raise CheckpointError(
            f"{path}: a NumPy/JAX archive (.npz). JAX checkpoints (CRATE-alpha's Flax weights) are not read; use the "
            "published PyTorch weights (crate_alpha_B16.pth, crate_alpha_L14.pth) or a .pth/.safetensors file"
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: the file needs arbitrary unpickling, which could run code. Only tensors, "
            f"dicts, lists, numbers and argparse.Namespace are read (torch.load(weights_only=True)). Details: "
            f"{_unpickler_reason(err)}"
        ) from None
    except Exception as err:  # noqa: BLE001 - corrupt bytes make the zip/pickle readers fail in many ways
        # (struct.error, IndexError, KeyError, AssertionError, ...): all of them mean "not a readable checkpoint".
        detail = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated, corrupt or another format): "
            f"{type(err).__name__}: {detail}"
        ) from err


def _unpickler_reason(err: Exception) -> str:
    """The line of torch's weights-only error that names what was refused (the rest explains how to bypass the
    check, which is not advice to pass on for a file of unknown origin)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(err).splitlines()]
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error:" in ln:
            rest = [ln.split("WeightsUnpickler error:", 1)[1].strip(), *lines[i + 1 :]]
            reason = next((r for r in rest if r), "")
            return reason.split(" Please use", 1)[0].strip() or type(err).__name__
    return next((ln for ln in lines if ln), type(err).__name__)


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read a checkpoint file or project folder into ``(state_dict, config)``.

    ``config`` is the project config (``{"family": ..., ...}``) when the file carries one, else ``None``.

    Raises:
        CheckpointError: missing, truncated, unpicklable or unrecognised files.
    """
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_FILE
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        return _read_safetensors(p)
    obj = safe_torch_load(p)
    return unwrap_state_dict(obj, source=str(p)), None


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
            sd = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{p}: not a readable safetensors file (truncated or another format): {err}") from None
    config = beside = None
    try:
        if "crate_vis_config" in meta:
            config = json.loads(meta["crate_vis_config"])
        if (p.parent / CONFIG_FILE).exists():
            beside = json.loads((p.parent / CONFIG_FILE).read_text())
    except (ValueError, OSError) as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{p}: the model config it carries is unreadable: {err}") from None
    if config is None:
        config = beside
    elif beside is not None and _architecture(beside) != _architecture(config):
        # The weights file is the authority; an edited config.json beside it must not be silently ignored.
        raise CheckpointError(
            f"{p.parent / CONFIG_FILE} disagrees with the config stored inside {p.name} "
            f"({_config_difference(beside, config)}); the safetensors file is authoritative: restore or delete "
            f"{CONFIG_FILE}"
        )
    if config is not None and not isinstance(config, dict):
        raise CheckpointError(f"{p}: the model config must be a JSON object, got {type(config).__name__}")
    return sd, config


def _architecture(config: Any) -> Any:
    """The part of a project config that decides the architecture (``metadata`` is free-form information)."""
    return {k: v for k, v in config.items() if k != "metadata"} if isinstance(config, dict) else config


def _config_difference(a: Any, b: Any) -> str:
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return "different types"
    ka, kb = a.get("kwargs", {}), b.get("kwargs", {})
    if isinstance(ka, dict) and isinstance(kb, dict):
        diff = sorted(k for k in set(ka) | set(kb) if ka.get(k) != kb.get(k))
        if diff:
            return "; ".join(f"{k}: {ka.get(k)!r} vs {kb.get(k)!r}" for k in diff[:5])
    diff = sorted(k for k in set(a) | set(b) if k != "metadata" and a.get(k) != b.get(k))
    return "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in diff[:5])


def checkpoint_arch(path: str | os.PathLike[str]) -> str | None:
    """The ``arch`` entry an official ``main.py`` checkpoint carries (``"CRATE_tiny"``), else ``None``."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".safetensors":
        return None
    obj = safe_torch_load(p)
    arch = obj.get("arch") if isinstance(obj, Mapping) else None
    return arch if isinstance(arch, str) else None


def unwrap_state_dict(obj: Any, source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Return the tensors of a checkpoint object: unwrap ``state_dict``/``model`` and strip ``module.`` prefixes."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    for key in _WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    sd: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{source}: key {k!r} (of type {type(k).__name__}) is not a parameter name")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(
                f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor; this does not look like model weights"
            )
        for prefix in ("module.", "_orig_mod."):
            k = k[len(prefix) :] if k.startswith(prefix) else k
        sd[k] = v
    if not sd:
        raise CheckpointError(f"{source}: no tensors found")
    return sd


def read_state_dict(src: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint path or an in-memory checkpoint dict, in crate-vis key names when official (any family)."""
    if isinstance(src, Mapping):
        sd = unwrap_state_dict(src)
    else:
        sd, _ = read_checkpoint(src)
    family, layout = detect_layout(sd)
    return convert_official_state_dict(sd, family) if layout == "official" and family else sd


# --------------------------------------------------------------------------------------------------------- loading
def load_checkpoint(
    model: nn.Module,
    src: str | os.PathLike[str] | Mapping[str, Any],
    strict: bool = True,
    *,
    allow_head_mismatch: bool = False,
    resize_pos_embed: bool = True,
) -> LoadReport:
    """Load weights into ``model`` from any supported layout.

    Args:
        model: a CRATE (or any ``nn.Module`` whose keys the checkpoint uses).
        src: path to a checkpoint file or project folder, or an in-memory checkpoint dict.
        strict: every key of model and checkpoint must match in name and shape.
        allow_head_mismatch: leave out classifier keys (``head.*``) whose shape differs (fine-tuning to another
            number of classes); the model keeps its fresh head and the report lists them.
        resize_pos_embed: resample a position embedding trained for another grid (bicubic).

    Returns:
        A :class:`LoadReport`.

    Raises:
        CheckpointError: on any mismatch, listing missing, unexpected and wrongly-shaped keys; the model is not
            modified in that case.
    """
    source = str(src) if not isinstance(src, Mapping) else "<state dict>"
    if isinstance(src, Mapping):
        raw = unwrap_state_dict(src)
    else:
        raw, _ = read_checkpoint(src)
    family = family_of(model) or "timm"
    found, layout = detect_layout(raw)
    if found is not None and found != family and {found, family} <= set(FAMILY_NAMES):
        raise CheckpointError(
            f"{source} holds a {FAMILY_NAMES[found]} checkpoint ({layout} layout), but the model is a "
            f"{FAMILY_NAMES[family]} ({type(model).__name__}); build the matching model (crate-vis list-models "
            f"shows the {FAMILY_NAMES[found]} names). Nothing was loaded."
        )
    sd = convert_official_state_dict(raw, family) if layout == "official" else dict(raw)
    report = LoadReport(source=source, layout=layout)
    own = model.state_dict()

    if (
        resize_pos_embed
        and "pos_embed" in sd
        and "pos_embed" in own
        and sd["pos_embed"].shape != own["pos_embed"].shape
        and sd["pos_embed"].shape[-1] == own["pos_embed"].shape[-1]  # a width mismatch is reported below instead
    ):
        sd["pos_embed"] = _resize_pos_embed(model, sd["pos_embed"], own["pos_embed"])
        report.resampled.append("pos_embed")
    if allow_head_mismatch:
        for key in [k for k in sd if k.startswith("head.")]:
            if key not in own or own[key].shape != sd[key].shape:
                report.dropped_head.append(key)
                del sd[key]
        if report.dropped_head:
            log.warning("%s: classifier head does not fit (%s); keeping a freshly initialised head",
                        source, ", ".join(report.dropped_head))  # fmt: skip

    missing = [k for k in own if k not in sd and k not in report.dropped_head]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sd if k in own and sd[k].shape != own[k].shape]  # fmt: skip
    # Checked here, before anything is copied: load_state_dict copies key by key and would fail half-way on a
    # sparse tensor, and would silently turn bool/int/complex values into weights.
    types = [f"{k}: checkpoint {sd[k].dtype} ({str(sd[k].layout).removeprefix('torch.')}) vs model {own[k].dtype}"
             for k in sd if k in own and not _compatible(sd[k], own[k])]  # fmt: skip
    # A diverged run saves NaN weights; refusing them here beats NaN attention maps far downstream.
    nonfinite = nonfinite_keys(sd, own)
    if nonfinite and not (shapes or types or (strict and (missing or unexpected))):
        raise CheckpointError(nonfinite_message(source, sd, nonfinite))
    if shapes or types or nonfinite or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:12])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}")
        if shapes:
            parts.append(f"wrongly-shaped keys ({len(shapes)}): {'; '.join(shapes[:12])}")
        if types:
            parts.append(f"wrongly-typed keys ({len(types)}): {'; '.join(types[:12])}")
        if nonfinite:
            parts.append(f"keys holding NaN or inf ({len(nonfinite)}): {', '.join(nonfinite[:12])}")
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__} ({layout} layout): " + " | ".join(parts)
            + (" (is it a checkpoint of another architecture or size?)" if shapes or missing else "")
        )
    if report.dropped_head:
        for key in report.dropped_head:
            sd[key] = own[key]
    model.load_state_dict(sd, strict=strict)
    return report


def nonfinite_keys(sd: Mapping[str, Any], keys: Any = None) -> list[str]:
    """Names of the dense floating-point tensors of ``sd`` holding NaN or inf (only those in ``keys`` if given)."""
    return [k for k, v in sd.items() if (keys is None or k in keys) and isinstance(v, torch.Tensor)
            and v.layout == torch.strided and v.is_floating_point() and not bool(torch.isfinite(v).all())]  # fmt: skip


def nonfinite_message(source: str, sd: Mapping[str, Any], names: list[str]) -> str:
    """One line saying that the weights of ``source`` hold NaN or inf, naming the tensors (the first 12)."""
    first = sd[names[0]]
    kinds = [what for what, bad in (("NaN", bool(torch.isnan(first).any())), ("inf", bool(torch.isinf(first).any())))
             if bad]  # fmt: skip
    listed = ", ".join(names[:12]) + (f", ... ({len(names) - 12} more)" if len(names) > 12 else "")
    return (f"{source}: the weights hold NaN or inf ({' and '.join(kinds)} in {names[0]}; {len(names)} tensor(s) in "
            f"all: {listed}): unusable weights, as a diverged training run saves them; use an earlier "
            "checkpoint")  # fmt: skip


def _compatible(value: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``value`` can be copied into ``target`` without losing meaning: a dense tensor of the same kind
    (floating into floating, any precision; integer or bool into integer or bool)."""
    if value.layout != torch.strided or value.is_complex() != target.is_complex():
        return False
    return value.is_floating_point() == target.is_floating_point()


class _TimmPatchEmbed(Protocol):
    grid_size: tuple[int, int]  # a plain attribute, not a sub-module


def _resize_pos_embed(model: nn.Module, pos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    new_grid = getattr(model, "grid_size", None)
    if new_grid is None:
        new_grid = tuple(cast(_TimmPatchEmbed, model.patch_embed).grid_size)  # timm
    old_n = pos.shape[1] - prefix
    old_side = int(round(old_n**0.5))
    if old_side * old_side != old_n or pos.shape[-1] != target.shape[-1]:
        raise CheckpointError(
            f"position embedding of shape {tuple(pos.shape)} cannot be resampled to {tuple(target.shape)}"
        )
    return resample_pos_embed(pos, tuple(new_grid), (old_side, old_side), prefix)


# ------------------------------------------------------------------------------------------ project format
def model_to_config(model: nn.Module) -> dict[str, Any]:
    """The project config that rebuilds ``model`` with :func:`load_model`."""
    name = getattr(model, "model_name", None)
    family = family_of(model)
    if family is not None:
        return {"family": family, "name": name, "kwargs": dict(cast("dict[str, Any]", model.config))}
    if name is None:
        raise CheckpointError(f"cannot describe a {type(model).__name__} without a registered model_name")
    # Only the architecture: how the weights were first obtained is not part of a config (see _WEIGHT_SOURCE_KEYS).
    kwargs = {k: v for k, v in getattr(model, "creation_kwargs", {}).items() if not _is_weight_source_key(k)}
    kwargs["num_classes"] = int(getattr(model, "num_classes", 0))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        kwargs["img_size"] = list(img_size)
    return {"family": "timm", "name": name, "kwargs": kwargs}


def save_model(model: nn.Module, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> Path:
    """Save ``model`` in the project format: ``model.safetensors`` + ``config.json`` in the folder ``path``.

    The config also travels inside the safetensors metadata, so the weights file alone is enough to rebuild the
    model. Both files are written atomically.

    Args:
        model: a CRATE or a timm model built by :func:`crate_vis.create_model`.
        path: the output folder (created).
        metadata: extra JSON-serialisable information (training data, accuracy, ...), stored in the config.

    Returns:
        The path of the weights file.
    """
    from safetensors.torch import save_file

    folder = Path(path)
    config = model_to_config(model)
    if metadata:
        config["metadata"] = dict(metadata)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = folder / WEIGHTS_FILE
    atomic_save(weights, lambda tmp: save_file(sd, tmp, metadata={"crate_vis_config": json.dumps(config)}))
    atomic_write_json(folder / CONFIG_FILE, config, indent=2)
    return weights


#: Constructor keywords that make crate-vis or timm load or download weights while building a model.
_WEIGHT_SOURCE_KEYS = ("pretrained", "checkpoint_path", "cache_dir")


def _is_weight_source_key(key: object) -> bool:
    return isinstance(key, str) and (key in _WEIGHT_SOURCE_KEYS or key.startswith("pretrained_"))

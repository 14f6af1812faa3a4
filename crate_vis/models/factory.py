"""Building models: from a registered name, from a saved config, from any checkpoint a user may hold.

Three layers, each using the one below: the registry (names -> family and sizes), the checkpoint readers
(:mod:`crate_vis.models.checkpoint`), and this factory. :func:`resolve_model` is the one place every command turns
what the user typed into a model, so every command accepts the same things:

* nothing: the embedded default weights;
* a registered name (random weights, with a warning) or a timm name;
* a project folder or ``.safetensors`` file (the architecture travels with the weights);
* a training run's ``last.pt`` / ``best.pt`` (the architecture comes from the run's config);
* a run folder (its ``best/`` export);
* an official checkpoint (CRATE ``main.py``/``finetune.py``, CRATE-alpha, CRATE-MAE) together with a model name.

Example:
    >>> from crate_vis.models.factory import create_model
    >>> model = create_model("crate_test_patch8_32", num_classes=3)
    >>> model.head.out_features
    3
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..errors import CheckpointError, UsageError
from .checkpoint import (
    RUN_CHECKPOINT_FORMAT,
    WEIGHTS_FILE,
    _is_weight_source_key,
    load_checkpoint,
    nonfinite_keys,
    nonfinite_message,
    read_checkpoint,
    safe_torch_load,
)
from .registry import (
    ON_REGISTER,
    family_class,
    is_registered,
    list_models,
    model_config,
    model_family,
    unknown_model_message,
)

__all__ = ["create_model", "build_from_config", "load_model", "resolve_model", "resolve_device", "recommended_settings"]

log = logging.getLogger(__name__)


def _json_safe(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool, type(None))) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str, bool)) for v in value)
    )


#: Constructor keywords that are sizes: each must be a positive integer (or a pair of them).
_SIZE_KEYS = ("patch_size", "image_size", "img_size", "dim", "embed_dim", "depth", "heads", "num_heads", "dim_head",
              "decoder_embed_dim", "decoder_depth", "decoder_num_heads")  # fmt: skip


def _check_sizes(kwargs: Mapping[str, Any]) -> None:
    """Refuse sizes that are not positive integers before any constructor divides by them."""
    for key in _SIZE_KEYS:
        if key not in kwargs or kwargs[key] is None:
            continue
        value = kwargs[key]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise UsageError(f"model size {key}={value!r}: must be a positive integer (or a pair of them)")


def create_model(name: str, pretrained: bool | str | None = None, **overrides: Any) -> nn.Module:
    """Build a registered CRATE-family model, or a timm model for comparisons.

    Args:
        name: a registered name (``crate_tiny_patch16_224``, ``crate_alpha_base_patch16_224``, ...) or a timm model
            name (``vit_tiny_patch16_224``).
        pretrained: ``None``/``False`` for random weights; ``True`` for the manifest's default weights of ``name``;
            a path, URL or manifest key to load weights from (checked against the manifest's sha256 when known).
        **overrides: constructor keywords (``num_classes``, ``image_size``/``img_size``, ``fused``, ...).

    Returns:
        The model, in training mode as PyTorch builds it.

    Raises:
        KeyError: an unknown name (the message suggests close names).
    """
    _check_sizes(overrides)
    if pretrained:
        overrides = {**_record_config(name if pretrained is True else str(pretrained)), **overrides}
    if is_registered(name):
        family = model_family(name)
        size_key = "img_size" if family == "crate_mae" else "image_size"
        for alias in ("img_size", "image_size"):
            if alias in overrides and alias != size_key:
                overrides[size_key] = overrides.pop(alias)
        model: nn.Module = family_class(family)(**{**model_config(name), **overrides})
        model.model_name = name  # type: ignore[assignment]
    else:
        import timm

        if not timm.is_model(name):
            raise KeyError(unknown_model_message(name))
        if "image_size" in overrides:
            overrides["img_size"] = overrides.pop("image_size")
        overrides.setdefault("dynamic_img_size", True)
        try:
            model = timm.create_model(name, pretrained=False, **overrides)
        except TypeError as err:
            if "dynamic_img_size" in str(err):
                raise UsageError(
                    f"{name} is not a Vision Transformer (timm builds it without patch tokens); crate-vis works "
                    "with CRATE-family models and timm ViTs (vit_*, deit_*, ...)"
                ) from None
            raise UsageError(f"{name} does not accept {sorted(overrides)}: {err}") from None
        model.model_name = name  # type: ignore[assignment]
        # Recorded so that save_model can write a config that rebuilds exactly this variant.
        model.creation_kwargs = {k: v for k, v in overrides.items() if _json_safe(v)}  # type: ignore[assignment]
    if pretrained:
        from .pretrained import resolve_weights

        path = resolve_weights(name if pretrained is True else str(pretrained), model_name=name)
        load_checkpoint(model, path, strict=True)
    return model


def build_from_config(config: Mapping[str, Any]) -> nn.Module:
    """Build a model (random weights) from a project config ``{"family", "name", "kwargs"}``.

    Raises:
        CheckpointError: the config asks to fetch weights, names an unknown family, or cannot be built.
    """
    family = config.get("family")
    kwargs = config.get("kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise CheckpointError(f"config 'kwargs' must be a JSON object, got {type(kwargs).__name__}")
    kwargs = dict(kwargs)
    sources = sorted(str(k) for k in kwargs if _is_weight_source_key(k))
    if sources:
        # A config travels with downloaded weights: it must not make loading fetch a URL or read another file.
        raise CheckpointError(
            f"config asks to load or fetch weights ({', '.join(sources)}); a saved config describes only the "
            "architecture, the weights come from the file itself"
        )
    if family != "timm":
        try:
            cls = family_class(str(family))
        except KeyError:
            raise CheckpointError(f"unknown model family {family!r} in config") from None
    try:
        if family == "timm":
            return create_model(config["name"], **kwargs)
        model: nn.Module = cls(**kwargs)
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"config does not describe a buildable {family} model ({type(err).__name__}: {err})") from err
    model.model_name = config.get("name")  # type: ignore[assignment]
    return model


def _check_config_fits(config: Mapping[str, Any], sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a config whose model would not match the tensors, without allocating it.

    The config is untrusted text: sizes in it (``depth``, ``dim``, ``img_size``, ``num_classes``) could ask for a
    model far larger than the file. The depth is compared with the blocks present first (so that no huge module
    tree is even built), then the model is built on the ``meta`` device (no memory) and every shape compared.
    """
    nonfinite = nonfinite_keys(sd)
    if nonfinite:  # not a mismatch of config and weights: say what is wrong with the weights themselves
        raise CheckpointError(nonfinite_message(source, sd, nonfinite))
    kwargs = config.get("kwargs", {})
    depth = kwargs.get("depth") if isinstance(kwargs, Mapping) else None
    if depth is not None:
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))}
        if not isinstance(depth, int) or depth != len(blocks):
            raise CheckpointError(f"{source}: config says depth={depth!r} but the weights hold {len(blocks)} blocks")
    with torch.device("meta"):
        probe = build_from_config(config)
    with warnings.catch_warnings():
        # Copying into meta parameters is the intended no-op here: only the shape checks matter.
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter", category=UserWarning)
        try:
            load_checkpoint(probe, sd, strict=True, resize_pos_embed=False)
        except CheckpointError as err:
            raise CheckpointError(f"{source}: its config does not match its weights: {err}") from None


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved with :func:`~crate_vis.models.checkpoint.save_model` (folder or ``.safetensors``), in
    eval mode.

    Raises:
        CheckpointError: the file carries no config, or its config does not match its weights.
    """
    sd, config = read_checkpoint(path)
    if config is None:
        raise CheckpointError(
            f"{path} carries no crate-vis config, so its sizes are unknown; pass the model name too "
            "(--model NAME on the command line, crate_vis.create_model(name) + crate_vis.load_checkpoint(model, path) "
            "in Python), or convert it with `crate-vis convert`"
        )
    _check_config_fits(config, sd, str(path))
    model = build_from_config(config)
    load_checkpoint(model, sd, strict=True)
    model.pretrained_config = config  # type: ignore[assignment]
    return model.to(device).eval()


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device named, or cuda when available, else cpu.

    Raises:
        UsageError: a name torch does not know (``--device foo``).
    """
    from ..errors import UsageError

    if isinstance(name, torch.device):
        return name
    if name:
        try:
            dev = torch.device(name)
        except RuntimeError as err:
            raise UsageError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps): {err}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {name} asked for CUDA, which this machine does not have")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _run_checkpoint_model(obj: Mapping[str, Any], source: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a training checkpoint (``last.pt``/``best.pt``) from its stored config."""
    cfg = obj.get("config")
    classes = obj.get("classes")
    if not isinstance(cfg, Mapping) or not isinstance(classes, list) or "model" not in obj:
        raise CheckpointError(f"{source}: a training checkpoint without its config, classes or weights")
    kwargs = dict(cfg.get("model_kwargs") or {})
    name = str(cfg.get("model"))
    stored_size: Any = cfg.get("img_size")  # None when missing: int() then raises the TypeError reported below
    try:
        if not (is_registered(name) and model_family(name) == "crate_mae"):  # a masked autoencoder has no classes
            kwargs["num_classes"] = len(classes)
        img_size = int(stored_size)
        model = create_model(name, img_size=img_size, **kwargs)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: its config does not describe a buildable model ({err})") from None
    load_checkpoint(model, obj["model"], strict=True)
    return model, {"classes": list(classes), "img_size": img_size, "config": dict(cfg)}


def resolve_model(
    spec: str | os.PathLike[str] | None = None,
    model_name: str | None = None,
    *,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    with_info: bool = False,
) -> Any:
    """The model a command should use, in eval mode on ``device``: one resolver for every command.

    Args:
        spec: what the user pointed at (``--checkpoint``): ``None`` for the embedded default; a project folder or
            ``.safetensors``; a run folder (its ``best/``); a run's ``last.pt``/``best.pt``; any other checkpoint
            (then ``model_name`` says what it holds). A registered name also works here.
        model_name: registered or timm name (``--model``); alone it gives random weights (a warning says so).
        num_classes: classifier size when building ``model_name``.
        device: torch device (default: cuda when available, else cpu).
        with_info: also return what is known about the weights (``classes``, ``img_size``, training ``config``).

    Returns:
        The model, or ``(model, info)`` with ``with_info``.

    Raises:
        CheckpointError / WeightsNotFoundError / KeyError: unreadable, mismatched or under-specified inputs, with a
            message that says what to pass.
    """
    dev = resolve_device(device)
    info: dict[str, Any] = {}
    kwargs: dict[str, Any] = {"num_classes": num_classes} if num_classes is not None else {}
    if spec is not None and model_name is None and not Path(spec).exists() and is_registered(str(spec)):
        spec, model_name = None, str(spec)
    if model_name is not None and not is_registered(model_name) and spec is None and _is_manifest_name(model_name):
        spec, model_name = model_name, None  # `-m crate_alpha_base_patch16_224.in1k`: weights named in the manifest
    if spec is None:
        if model_name is None:
            from .pretrained import default_weights

            model = load_model(default_weights(), device=dev)
        else:
            model = create_model(model_name, **kwargs)
            log.warning("%s has random weights (no checkpoint given)", model_name)
        return _finish(model, info, dev, with_info)
    p = Path(spec)
    if not p.exists():
        from .pretrained import get_record, resolve_weights

        p = resolve_weights(str(spec), model_name=model_name)  # a manifest name or URL, or a clear error
        official = not (p.is_dir() or p.suffix == ".safetensors")  # project-format weights carry their config
        if model_name is None and official and _is_manifest_name(str(spec)):
            record = get_record(str(spec))  # the manifest says what the official weights are
            model_name = record.model
            kwargs = {**{k: v for k, v in (record.config or {}).items() if k == "num_classes"}, **kwargs}
    if p.is_dir() and not (p / WEIGHTS_FILE).exists() and (p / "best" / WEIGHTS_FILE).exists():
        p = p / "best"  # a run folder
    if p.is_dir() or p.suffix == ".safetensors":
        if model_name:
            model = create_model(model_name, **kwargs)
            load_checkpoint(model, p, strict=True)
        else:
            model = load_model(p)
            meta = getattr(model, "pretrained_config", {}).get("metadata", {}) or {}
            info.update({k: meta[k] for k in ("classes", "img_size") if k in meta})
        return _finish(model, info, dev, with_info)
    obj = safe_torch_load(p)
    if isinstance(obj, Mapping) and obj.get("format") == RUN_CHECKPOINT_FORMAT:
        model, info = _run_checkpoint_model(obj, str(p))
        if model_name and model_name != getattr(model, "model_name", None):
            raise CheckpointError(f"{p} holds a {model.model_name}, not a {model_name}")
        return _finish(model, info, dev, with_info)
    if not model_name:
        raise CheckpointError(
            f"{p} carries no model config: pass --model NAME (and --num-classes) to say what it holds"
        )
    model = create_model(model_name, **kwargs)
    load_checkpoint(model, obj, strict=True)
    return _finish(model, info, dev, with_info)


def _record_config(spec: str) -> dict[str, Any]:
    """The constructor overrides a manifest record states for its weights (``num_classes`` of a 21K head, ...)."""
    from .pretrained import get_record

    try:
        return {k: v for k, v in (get_record(spec).config or {}).items() if k == "num_classes"}
    except KeyError:
        return {}


def _is_manifest_name(name: str) -> bool:
    from .pretrained import list_weights

    return any(r.name == name for r in list_weights())


def _finish(model: nn.Module, info: dict[str, Any], device: torch.device, with_info: bool) -> Any:
    model = model.to(device).eval()
    return (model, info) if with_info else model


#: Official ``arch`` names (CRATE ``main.py`` / ``finetune.py``) -> registered names.
OFFICIAL_ARCH = {
    "CRATE_tiny": "crate_tiny_patch16_224",
    "CRATE_small": "crate_small_patch16_224",
    "CRATE_base": "crate_base_patch16_224",
    "CRATE_large": "crate_large_patch16_224",
}


def convert_checkpoint(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    model_name: str | None = None,
    num_classes: int | None = None,
    **model_kwargs: Any,
) -> tuple[Path, nn.Module, str]:
    """Convert an official (or any readable) checkpoint into the project format (``model.safetensors`` + config).

    Args:
        source: the checkpoint.
        out: output folder.
        model_name: registered name; default: from an official CRATE checkpoint's ``arch``.
        num_classes: classes (default: read from the head's weights).
        **model_kwargs: constructor keywords for sizes the registry does not name (``depth=8``, ...).

    Returns:
        ``(weights path, model, layout)``.
    """
    from .checkpoint import checkpoint_arch, save_model
    from .conversion import is_official_layout

    if model_name is None:
        arch = checkpoint_arch(source)
        if arch not in OFFICIAL_ARCH:
            raise CheckpointError(f"cannot tell the architecture of {source} (arch={arch!r}); pass --model NAME")
        model_name = OFFICIAL_ARCH[arch]
    sd, _ = read_checkpoint(source)
    if is_registered(model_name) and model_family(model_name) == "crate_mae":
        if num_classes:
            raise UsageError(f"{model_name} is a masked autoencoder without a classifier: leave out --num-classes")
    else:
        if num_classes is None:
            head = next((sd[k] for k in ("mlp_head.1.weight", "head.weight", "head.fc.weight") if k in sd), None)
            num_classes = int(head.shape[0]) if head is not None else 0
        model_kwargs["num_classes"] = num_classes
    model = create_model(model_name, **model_kwargs)
    report = load_checkpoint(model, source, strict=True)
    layout = "official" if is_official_layout(sd) else report.layout
    path = save_model(model, out, metadata={"converted_from": str(source), "layout": report.layout})
    return path, model, layout


def recommended_settings(model: nn.Module) -> dict[str, Any]:
    """The settings the weights recommend for segmenting and viewing their attention: ``metadata.segment`` of their
    config (``method``, ``layer``, ``img_size``, ``mass``, ``tau``, ``max_masks``, ``refine``), chosen when they were
    released and used by ``segment``, ``attention`` and ``heads`` where no flag is given; empty when the weights say
    nothing.

    Example:
        >>> from crate_vis.models import create_model, recommended_settings
        >>> recommended_settings(create_model("crate_test_patch8_32"))
        {}
    """
    meta = (getattr(model, "pretrained_config", None) or {}).get("metadata") or {}
    rec = meta.get("segment") or {}
    return {k: rec[k] for k in ("method", "layer", "img_size", "mass", "tau", "max_masks", "refine") if k in rec}


def model_summary(model: nn.Module, image_hw: tuple[int, int] | None = None) -> dict[str, Any]:
    """Parameters, token geometry, FLOPs and output shape of ``model`` for an input of ``image_hw`` (default: its
    training size): what ``crate-vis info`` prints."""
    from .geometry import ViTLike, model_input_size, token_geometry

    hw = tuple(image_hw) if image_hw is not None else tuple(getattr(model, "image_size", None) or (model_input_size(model),) * 2)
    geo = token_geometry(model, hw)
    info: dict[str, Any] = {
        "model": getattr(model, "model_name", None) or type(model).__name__,
        "family": _family_name(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "input": list(hw),
        "patch_size": list(geo.patch_size),
        "grid": list(geo.grid),
        "prefix_tokens": geo.num_prefix_tokens,
        "tokens": geo.num_tokens,
    }
    config = getattr(model, "config", None)
    if isinstance(config, dict):
        info["config"] = config
    flops = getattr(model, "flops_per_image", None)
    if callable(flops):
        info["gflops"] = round(flops(*hw) / 1e9, 3)
    meta = (getattr(model, "pretrained_config", None) or {}).get("metadata")
    if meta:
        info["weights"] = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, list))}
    device = next(model.parameters()).device
    channels = int(getattr(model, "config", {}).get("channels", 3)) if isinstance(config, dict) else 3
    with torch.no_grad():
        trunk = cast(ViTLike, model)
        y = trunk.forward_head(trunk.forward_features(torch.zeros(1, channels, *hw, device=device)))
    info["output"] = list(y.shape)
    return info


def _family_name(model: nn.Module) -> str:
    from .registry import family_of

    return family_of(model) or "timm"


# ----------------------------------------------------------------------------------------------- timm
def _register_with_timm(name: str) -> None:
    """Make ``timm.create_model(name)`` build the registered model (through the factory)."""
    try:
        from timm.models import register_model as timm_register
        from timm.models._registry import is_model as timm_is_model
    except ImportError:  # pragma: no cover - timm is a dependency
        return
    if timm_is_model(name):
        return

    def build(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ValueError(
                f"{name}: timm's pretrained=True downloads from a hub; load weights with "
                "crate_vis.create_model(name, pretrained=PATH_OR_NAME) instead"
            )
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return create_model(name, **kwargs)

    build.__name__ = name
    build.__qualname__ = name
    build.__module__ = "crate_vis.models.factory"
    timm_register(build)


ON_REGISTER.append(_register_with_timm)
for _name in list_models():
    _register_with_timm(_name)

"""Models: the CRATE family, its named configurations, checkpoints and the factory, and token geometry.

Inside the package the order is ``crate`` (and the other family classes) <- ``registry`` (names -> configs) <-
``checkpoint`` / ``conversion`` (reading and writing weights) <- ``pretrained`` (the manifest) <- ``factory``
(create, build from a config, load, resolve what a user typed).
"""

from .checkpoint import CheckpointError, LoadReport, load_checkpoint, read_checkpoint, save_model
from .crate import CRATE, ISTA, MSSA, CRATEBlock, PatchEmbed, fit_to_patches, resample_pos_embed
from .crate_alpha import CRATEAlpha
from .crate_mae import CRATEMAE
from .factory import build_from_config, create_model, load_model, recommended_settings, resolve_device, resolve_model
from .geometry import TokenGeometry, model_input_size, model_patch_size, num_prefix_tokens, token_geometry
from .registry import is_registered, list_models, model_config, model_family, register_model

__all__ = [
    "CRATE", "CRATEAlpha", "CRATEBlock", "CRATEMAE", "CheckpointError", "ISTA", "LoadReport", "MSSA", "PatchEmbed", "TokenGeometry",
    "build_from_config", "create_model", "fit_to_patches", "is_registered", "list_models", "load_checkpoint",
    "load_model", "model_config", "model_family", "model_input_size", "model_patch_size", "num_prefix_tokens",
    "read_checkpoint", "recommended_settings", "register_model", "resample_pos_embed", "resolve_device", "resolve_model", "save_model",
    "token_geometry",
]  # fmt: skip

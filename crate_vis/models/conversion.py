"""Official checkpoint key names -> crate-vis key names, one explicit table per model family (CRATE, CRATE-alpha,
CRATE-MAE), and the recognition of which family and layout a state dict holds.

Each table is a tuple of ``(regex over the official key, replacement)`` rows, anchored at both ends; ``(\\d+)``
captures layer indices of any length. A key that no row matches is an error, never dropped: loading then stays
``strict=True`` all the way (see :func:`crate_vis.models.checkpoint.load_checkpoint`).

Example:
    >>> import torch
    >>> sd = {"transformer.layers.11.1.fn.weight": torch.zeros(2, 2)}
    >>> list(convert_official_state_dict(sd))
    ['blocks.11.ista.weight']
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import CheckpointError

__all__ = [
    "OFFICIAL_TO_CRATE_VIS", "OFFICIAL_TO_CRATE_VIS_ALPHA", "OFFICIAL_TO_CRATE_VIS_MAE", "OFFICIAL_TABLES",
    "FAMILY_NAMES", "is_official_layout", "detect_layout", "convert_official_state_dict", "rename_keys",
]  # fmt: skip

#: Official CRATE (``model/crate.py`` of Ma-Lab-Berkeley/CRATE) key -> crate-vis key, after ``module.`` is stripped.
OFFICIAL_TO_CRATE_VIS: tuple[tuple[str, str], ...] = (
    (r"^to_patch_embedding\.1\.(weight|bias)$", r"patch_embed.norm_in.\1"),
    (r"^to_patch_embedding\.2\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^to_patch_embedding\.3\.(weight|bias)$", r"patch_embed.norm_out.\1"),
    (r"^pos_embedding$", r"pos_embed"),
    (r"^cls_token$", r"cls_token"),
    (r"^transformer\.layers\.(\d+)\.0\.norm\.(weight|bias)$", r"blocks.\1.norm1.\2"),
    (r"^transformer\.layers\.(\d+)\.0\.fn\.qkv\.weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^transformer\.layers\.(\d+)\.0\.fn\.to_out\.0\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^transformer\.layers\.(\d+)\.1\.norm\.(weight|bias)$", r"blocks.\1.norm2.\2"),
    (r"^transformer\.layers\.(\d+)\.1\.fn\.weight$", r"blocks.\1.ista.weight"),
    (r"^mlp_head\.0\.(weight|bias)$", r"fc_norm.\1"),
    (r"^mlp_head\.1\.(weight|bias)$", r"head.\1"),
)

#: Official CRATE-alpha (``torch_inference/model/crate_alpha.py`` of UCSC-VLAA/CRATE-alpha; the published
#: ``crate_alpha_B16.pth`` / ``crate_alpha_L14.pth`` are bare state dicts) key -> crate-vis key.
OFFICIAL_TO_CRATE_VIS_ALPHA: tuple[tuple[str, str], ...] = (
    (r"^conv1\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^pos_embedding$", r"pos_embed"),
    (r"^cls_token$", r"cls_token"),
    (r"^transformer\.layers\.(\d+)\.0\.norm\.(weight|bias)$", r"blocks.\1.norm1.\2"),
    (r"^transformer\.layers\.(\d+)\.0\.fn\.qkv\.weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^transformer\.layers\.(\d+)\.0\.fn\.to_out\.0\.weight$", r"blocks.\1.attn.proj.weight"),
    (r"^transformer\.layers\.(\d+)\.1\.norm\.(weight|bias)$", r"blocks.\1.norm2.\2"),
    (r"^transformer\.layers\.(\d+)\.1\.fn\.(D|D1)$", r"blocks.\1.ista.\2"),
    (r"^mlp_head\.0\.(weight|bias)$", r"fc_norm.\1"),
    (r"^mlp_head\.1\.(weight|bias)$", r"head.\1"),
)

#: Official CRATE-MAE (``model/crate_ae/`` of Ma-Lab-Berkeley/CRATE; the ``model`` entry of an MAE-codebase
#: checkpoint) key -> crate-vis key. The fixed sin-cos tables, frozen parameters there, are buffers of the same names.
OFFICIAL_TO_CRATE_VIS_MAE: tuple[tuple[str, str], ...] = (
    (r"^cls_token$", r"cls_token"),
    (r"^mask_token$", r"mask_token"),
    (r"^pos_embed$", r"pos_embed"),
    (r"^decoder_pos_embed$", r"decoder_pos_embed"),
    (r"^patch_embed\.proj\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^blocks\.(\d+)\.layers\.0\.0\.norm\.(weight|bias)$", r"blocks.\1.norm1.\2"),
    (r"^blocks\.(\d+)\.layers\.0\.0\.fn\.qkv\.weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^blocks\.(\d+)\.layers\.0\.0\.fn\.to_out\.0\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^blocks\.(\d+)\.layers\.0\.1\.norm\.(weight|bias)$", r"blocks.\1.norm2.\2"),
    (r"^blocks\.(\d+)\.layers\.0\.1\.fn\.weight$", r"blocks.\1.ista.weight"),
    (r"^norm\.(weight|bias)$", r"norm.\1"),
    (r"^decoder_embed\.(weight|bias)$", r"decoder_embed.\1"),
    (r"^decoder_blocks\.(\d+)\.layers\.0\.0\.norm\.(weight|bias)$", r"decoder_blocks.\1.norm1.\2"),
    (r"^decoder_blocks\.(\d+)\.layers\.0\.0\.fn\.weight$", r"decoder_blocks.\1.dictionary.weight"),
    (r"^decoder_blocks\.(\d+)\.layers\.0\.1\.norm\.(weight|bias)$", r"decoder_blocks.\1.norm2.\2"),
    (r"^decoder_blocks\.(\d+)\.layers\.0\.1\.fn\.qkv\.weight$", r"decoder_blocks.\1.attn.qkv.weight"),
    (r"^decoder_blocks\.(\d+)\.layers\.0\.1\.fn\.to_out\.0\.(weight|bias)$", r"decoder_blocks.\1.attn.proj.\2"),
    (r"^decoder_norm\.(weight|bias)$", r"decoder_norm.\1"),
    (r"^decoder_pred\.(weight|bias)$", r"decoder_pred.\1"),
)

#: Family -> (its official table, key patterns only that family's official checkpoints carry).
OFFICIAL_TABLES: dict[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...]]] = {
    "crate": (OFFICIAL_TO_CRATE_VIS, (r"^to_patch_embedding\.", r"^transformer\.layers\.\d+\.1\.fn\.weight$")),
    "crate_alpha": (OFFICIAL_TO_CRATE_VIS_ALPHA, (r"^conv1\.", r"^transformer\.layers\.\d+\.1\.fn\.D1?$")),
    "crate_mae": (OFFICIAL_TO_CRATE_VIS_MAE, (r"^blocks\.\d+\.layers\.0\.", r"^decoder_blocks\.\d+\.layers\.0\.")),
}

#: Family -> key patterns of the family's crate-vis layout.
PROJECT_KEYS: dict[str, tuple[str, ...]] = {  # most specific first: the MAE encoder has CRATE blocks too
    "crate_mae": (r"^decoder_blocks\.\d+\.", r"^mask_token$"),
    "crate_alpha": (r"^blocks\.\d+\.ista\.D1$",),
    "crate": (r"^blocks\.\d+\.ista\.weight$", r"^patch_embed\.norm_in\."),
    "timm": (r"^blocks\.\d+\.mlp\.fc1\.",),
}

#: How each family is called in messages.
FAMILY_NAMES = {"crate": "CRATE", "crate_alpha": "CRATE-alpha", "crate_mae": "CRATE-MAE", "timm": "timm ViT"}

_COMPILED: dict[int, tuple[tuple[re.Pattern[str], str], ...]] = {}


def _compiled(table: tuple[tuple[str, str], ...]) -> tuple[tuple[re.Pattern[str], str], ...]:
    key = id(table)
    if key not in _COMPILED:
        _COMPILED[key] = tuple((re.compile(a), b) for a, b in table)
    return _COMPILED[key]


def rename_keys(
    sd: Mapping[str, torch.Tensor], table: tuple[tuple[str, str], ...], what: str
) -> dict[str, torch.Tensor]:
    """Rename every key through ``table``; keys no row matches raise :class:`CheckpointError` naming them."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        for pattern, repl in _compiled(table):
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} key(s) not in the {what} layout: {', '.join(sorted(unknown)[:10])}")
    return out


def _matches(sd: Mapping[str, object], patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, k) for p in patterns for k in sd)


def is_official_layout(sd: Mapping[str, object], family: str = "crate") -> bool:
    """Whether the keys follow the official implementation's names of ``family``."""
    return _matches(sd, OFFICIAL_TABLES[family][1])


def detect_layout(sd: Mapping[str, object]) -> tuple[str | None, str]:
    """The family and layout a state dict's keys show: ``(family or None, "official" | "crate-vis" | "other")``.

    Example:
        >>> detect_layout({"conv1.weight": 0, "transformer.layers.0.1.fn.D1": 0})
        ('crate_alpha', 'official')
    """
    for family in OFFICIAL_TABLES:
        if is_official_layout(sd, family):
            return family, "official"
    for family, patterns in PROJECT_KEYS.items():
        if _matches(sd, patterns):
            return family, "crate-vis"
    return None, "other"


def convert_official_state_dict(sd: Mapping[str, torch.Tensor], family: str = "crate") -> dict[str, torch.Tensor]:
    """Rename official keys of ``family`` through its table; unknown keys raise."""
    table = OFFICIAL_TABLES[family][0]
    return rename_keys(sd, table, f"official {FAMILY_NAMES.get(family, family)}")

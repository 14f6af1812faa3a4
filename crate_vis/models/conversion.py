"""Official checkpoint key names -> crate-vis key names, one explicit table per model family.

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
    "OFFICIAL_TO_CRATE_VIS", "OFFICIAL_TABLES", "is_official_layout", "convert_official_state_dict", "rename_keys",
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

#: Family -> (its official table, a key prefix only that family's official checkpoints carry).
OFFICIAL_TABLES: dict[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...]]] = {
    "crate": (OFFICIAL_TO_CRATE_VIS, ("transformer.layers.", "to_patch_embedding.", "mlp_head.")),
}

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
        raise CheckpointError(f"keys not in the {what} layout: {', '.join(sorted(unknown)[:10])}")
    return out


def is_official_layout(sd: Mapping[str, object], family: str = "crate") -> bool:
    """Whether the keys follow the official implementation's names of ``family``."""
    prefixes = OFFICIAL_TABLES[family][1]
    return any(k.startswith(prefixes) for k in sd)


def convert_official_state_dict(sd: Mapping[str, torch.Tensor], family: str = "crate") -> dict[str, torch.Tensor]:
    """Rename official keys of ``family`` through its table; unknown keys raise."""
    table = OFFICIAL_TABLES[family][0]
    return rename_keys(sd, table, f"official {family}")

"""CRATE-alpha: golden parity with the official implementation on both paths, geometry, conversion, variants."""

from __future__ import annotations

import doctest
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from crate_vis.errors import CheckpointError
from crate_vis.hooks import AttentionRecorder, cls_attention_maps
from crate_vis.models import crate_alpha
from crate_vis.models.conversion import OFFICIAL_TO_CRATE_VIS_ALPHA, convert_official_state_dict
from crate_vis.models.crate import MSSA, resample_pos_embed
from crate_vis.models.crate_alpha import (
    CRATE_ALPHA_VARIANTS,
    CRATEAlpha,
)
from crate_vis.models.geometry import token_geometry
from crate_vis.segmentation.dino import dino_masks

DATA = Path(__file__).parent / "data"
ATOL = 1e-5
PATHS = pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])

#: Parameters of the official constructor (torch_inference/model/crate_alpha.py @ edbd624) at 224 px, 1000 classes.
REFERENCE_PARAMS = {
    "crate_alpha_base_patch8_224": 72_338_152,
    "crate_alpha_base_patch16_224": 72_328_936,
    "crate_alpha_base_patch32_224": 73_985_512,
    "crate_alpha_large_patch8_224": 253_786_088,
    "crate_alpha_large_patch14_224": 253_650_920,
    "crate_alpha_large_patch32_224": 255_982_568,
    "crate_alpha_tiny_patch16_224": 4_811_944,
    "crate_alpha_small_patch16_224": 40_975_912,
}


def convert_crate_alpha_state_dict(sd):
    """The official CRATE-alpha key table of the loader (crate_vis.models.conversion)."""
    return convert_official_state_dict(sd, "crate_alpha")


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    """Inputs and outputs of the official CRATE-alpha implementation (see tests/data/README.md)."""
    with np.load(DATA / "crate_alpha_ref_a_io.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def official_sd() -> dict[str, torch.Tensor]:
    return torch.load(DATA / "crate_alpha_ref_a.pth", map_location="cpu", weights_only=True)


@pytest.fixture()
def model(golden, official_sd) -> CRATEAlpha:
    """The golden CRATE-alpha, official weights loaded strictly, eval mode."""
    config = json.loads(str(golden["config"]))
    assert CRATE_ALPHA_VARIANTS["crate_alpha_test_patch8_32"] == config
    net = CRATEAlpha(**config)
    net.load_state_dict(convert_crate_alpha_state_dict(official_sd), strict=True)
    return net.eval()


def _images(golden) -> torch.Tensor:
    return torch.from_numpy(golden["images"])


def _close(actual: torch.Tensor, expected: np.ndarray | torch.Tensor) -> None:
    expected = torch.as_tensor(expected)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ golden parity
@PATHS
def test_logits_and_tokens_match_golden(golden, model, fused):
    model.set_fused(fused)
    assert model.fused is fused
    with torch.no_grad():
        final, layers = model.forward_intermediates(_images(golden))
        logits = model.forward_head(final)
        direct = model(_images(golden))
    _close(logits, golden["logits"])
    _close(direct, golden["logits"])
    _close(final, golden["final_tokens"])
    assert len(layers) == 3
    for i, tokens in enumerate(layers):
        _close(tokens, golden["layer_tokens"][i])


@PATHS
def test_attention_and_sparse_codes_match_golden(golden, model, fused):
    model.set_fused(fused)
    codes: list[torch.Tensor] = []
    handles = [b.ista.sparse_code.register_forward_hook(lambda m, i, o: codes.append(o)) for b in model.blocks]
    try:
        with AttentionRecorder(model) as rec, torch.no_grad():
            model(_images(golden))
    finally:
        for h in handles:
            h.remove()
    assert len(codes) == 3
    for i in range(3):
        _close(rec.attentions[i], golden["attention"][i])
        assert codes[i].shape == (4, 17, 4 * 64)
        _close(codes[i], golden["sparse_codes"][i])
    assert all((c == 0).any() for c in codes)  # ReLU codes: sparse


def test_explicit_path_materialises_the_golden_attention(golden, model):
    """On the explicit path the ``attend`` softmax itself is the reference attention."""
    model.set_fused(False)
    seen: list[torch.Tensor] = []
    handles = [b.attn.attend.register_forward_hook(lambda m, i, o: seen.append(o)) for b in model.blocks]
    try:
        with torch.no_grad():
            model(_images(golden))
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 3
    for i, attn in enumerate(seen):
        _close(attn, golden["attention"][i])


@PATHS
def test_cls_attention_maps_and_dino_masks_match_golden(golden, model, fused):
    model.set_fused(fused)
    maps = cls_attention_maps(model, _images(golden), layer=-1)  # (B, h, gh, gw)
    expected = torch.from_numpy(golden["attention"][-1][:, :, 0, 1:]).reshape(4, 4, 4, 4)
    _close(maps, expected)
    masks = dino_masks(maps, mass=0.6, patch_size=8)  # (B, h, 32, 32)
    assert masks.shape == golden["dino_masks_060"].shape
    assert np.array_equal(masks.numpy().astype(np.uint8), golden["dino_masks_060"])


# ------------------------------------------------------------------------------------------- paths and gradients
def test_fused_and_explicit_paths_agree_in_value_and_gradient():
    torch.manual_seed(1)
    model = CRATEAlpha(**{**CRATE_ALPHA_VARIANTS["crate_alpha_test_patch8_32"], "dim_head": 24, "overcomplete_ratio": 2})
    x = torch.randn(2, 3, 32, 48)
    results = []
    for fused in (True, False):
        model.set_fused(fused)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        results.append((out.detach(), grads))
    (fast, fast_grads), (slow, slow_grads) = results
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for key in ("blocks.0.ista.D", "blocks.2.ista.D1", "blocks.1.attn.qkv.weight", "patch_embed.proj.weight"):
        torch.testing.assert_close(fast_grads[key], slow_grads[key], atol=1e-4, rtol=1e-4)


def test_sparse_code_definition():
    """Two ISTA steps from zero under D, synthesis with D1, columns as vectors."""
    torch.manual_seed(0)
    ista = crate_alpha.OvercompleteISTA(6, overcomplete_ratio=3, eta=0.3, lambd=0.05)
    x = torch.randn(2, 5, 6)
    d, d1 = ista.D, ista.D1  # (6, 18)
    z1 = torch.relu(0.3 * torch.einsum("dp,bnd->bnp", d, x) - 0.3 * 0.05)
    grad = torch.einsum("dp,bnd->bnp", d, torch.einsum("dp,bnp->bnd", d, z1) - x)
    z2 = torch.relu(z1 - 0.3 * grad - 0.3 * 0.05)
    expected = torch.einsum("dp,bnp->bnd", d1, z2)
    for fused in (True, False):
        ista.fused = fused
        with torch.no_grad():
            torch.testing.assert_close(ista(x), expected, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ geometry
def test_other_input_size_resamples_the_position_embedding(golden, model):
    x = torch.randn(2, 3, 40, 24)  # non-square, another grid (5 x 3) than the 4 x 4 training grid
    with torch.no_grad():
        tokens = model.embed(x)
        out = model(x)
        maps = cls_attention_maps(model, x)
        patches = model.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, 15, dim)
        pos = resample_pos_embed(model.pos_embed, (5, 3), (4, 4))
    assert token_geometry(model, (40, 24)).grid == (5, 3) == model.feature_grid(40, 24)
    assert tokens.shape == (2, 16, 64) and out.shape == (2, 10) and maps.shape == (2, 4, 5, 3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(tokens[:, 1:], patches + pos[:, 1:])
    torch.testing.assert_close(tokens[:, :1], (model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1))
    assert not torch.allclose(pos[:, 1:16], model.pos_embed[:, 1:16])  # not the reference's first-rows slice
    with torch.no_grad():  # at the training size the parameter is used as it is
        same = model.embed(_images(golden))
    torch.testing.assert_close(same[:, 1:], model.patch_embed(_images(golden)) + model.pos_embed[:, 1:])


@pytest.mark.parametrize(
    "shape, message",
    [((2, 3, 30, 32), "not divisible"), ((2, 1, 32, 32), "channels"), ((2, 3, 4, 32), "smaller than one"),
     ((3, 32, 32), "(B, C, H, W)")],
)  # fmt: skip
def test_bad_input_shapes_are_clear_errors(model, shape, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        model(torch.zeros(shape))


def test_trunk_api_matches_crate(model):
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[0, -1])
        maps = model.forward_intermediates(x, indices=1, output_fmt="NCHW", intermediates_only=True,
                                           return_prefix_tokens=False)  # fmt: skip
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(final, feats)
    torch.testing.assert_close(inter[1], feats)
    torch.testing.assert_close(maps[0].flatten(2).transpose(1, 2), feats[:, 1:])
    assert maps[0].shape == (2, 64, 4, 5) and pooled.shape == (2, 64)
    with pytest.raises(IndexError, match="0..2"):
        model.forward_intermediates(x, indices=[3])

    assert model.num_prefix_tokens == 1 and model.grid_size == (4, 4) and model.patch_embed.patch_size == (8, 8)
    assert (model.embed_dim, model.num_features, model.num_heads, model.dim_head, model.depth) == (64, 64, 4, 16, 3)
    for block in model.blocks:
        assert isinstance(block.attn, MSSA) and block.attn.proj.bias is None
        assert block.norm1.eps == block.norm2.eps == 1e-6
    assert model.fc_norm.eps == 1e-5
    assert "overcomplete_ratio=4" in repr(model) and "code_dim=256" in repr(model.blocks[0].ista)
    assert model.flops_per_image() > model.flops_per_image(16, 16) > 0

    rebuilt = CRATEAlpha(**json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x))
    model.reset_classifier(0)
    assert model.get_classifier().__class__.__name__ == "Identity" and model.config["num_classes"] == 0
    with torch.no_grad():
        assert model(x).shape == (2, 64)


def test_mssa_projection_bias_keyword():
    assert MSSA(16, heads=2, dim_head=8).proj.bias is not None  # CRATE's default is unchanged
    assert MSSA(16, heads=2, dim_head=8, proj_bias=False).proj.bias is None


# ----------------------------------------------------------------------------------------- weights and conversion
def test_state_dict_round_trip(golden, model, official_sd):
    assert set(model.state_dict()) == set(convert_crate_alpha_state_dict(official_sd))
    clone = CRATEAlpha(**CRATE_ALPHA_VARIANTS["crate_alpha_test_patch8_32"], fused=False)
    result = clone.load_state_dict(model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(_images(golden)), model(_images(golden)), atol=ATOL, rtol=0)


def test_initialisation_follows_the_reference_order(official_sd):
    """Under one seed the initial weights are the reference's (its LayerNorms were redrawn, its dictionaries x 0.5)."""
    torch.manual_seed(0)
    fresh = CRATEAlpha(**CRATE_ALPHA_VARIANTS["crate_alpha_test_patch8_32"]).state_dict()
    official = convert_crate_alpha_state_dict(official_sd)
    compared = 0
    for key, value in fresh.items():
        if "norm" in key:
            continue
        expected = official[key] / 0.5 if ".ista." in key else official[key]
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-6, msg=key)
        compared += 1
    assert compared == 4 + 4 * 3 + 2  # stem, cls, pos; qkv, proj, D, D1 per layer; head


def _official_keys(depth: int) -> list[str]:
    keys = ["pos_embedding", "cls_token", "conv1.weight", "conv1.bias"]
    for i in range(depth):
        keys += [f"transformer.layers.{i}.0.norm.weight", f"transformer.layers.{i}.0.norm.bias",
                 f"transformer.layers.{i}.0.fn.qkv.weight", f"transformer.layers.{i}.0.fn.to_out.0.weight",
                 f"transformer.layers.{i}.1.norm.weight", f"transformer.layers.{i}.1.norm.bias",
                 f"transformer.layers.{i}.1.fn.D", f"transformer.layers.{i}.1.fn.D1"]  # fmt: skip
    return keys + ["mlp_head.0.weight", "mlp_head.0.bias", "mlp_head.1.weight", "mlp_head.1.bias"]


def test_conversion_table_covers_twelve_layers(official_sd):
    assert _official_keys(3) == list(official_sd)  # the key set above is the published layout
    with torch.device("meta"):
        target = CRATEAlpha(**{**CRATE_ALPHA_VARIANTS["crate_alpha_test_patch8_32"], "depth": 12})
    converted = convert_crate_alpha_state_dict({k: torch.zeros(1) for k in _official_keys(12)})
    assert sorted(converted) == sorted(target.state_dict()) and len(converted) == 4 + 8 * 12 + 4
    assert converted.keys() >= {"blocks.10.attn.qkv.weight", "blocks.11.ista.D1", "blocks.11.norm2.bias"}
    assert all(pattern.startswith("^") and pattern.endswith("$") for pattern, _ in OFFICIAL_TO_CRATE_VIS_ALPHA)


def test_conversion_names_every_unknown_key():
    keys = _official_keys(2) + ["transformer.layers.1.1.fn.weight", "module.cls_token", "mlp_head.2.weight"]
    with pytest.raises(CheckpointError, match=r"3 key\(s\)") as err:
        convert_crate_alpha_state_dict({k: torch.zeros(1) for k in keys})
    for key in ("transformer.layers.1.1.fn.weight", "module.cls_token", "mlp_head.2.weight"):
        assert key in str(err.value)


# ------------------------------------------------------------------------------------------------------ variants
def test_published_variants_have_the_reference_parameter_counts():
    published = {k: v for k, v in CRATE_ALPHA_VARIANTS.items() if k != "crate_alpha_test_patch8_32"}
    assert set(published) == set(REFERENCE_PARAMS)
    for name, config in published.items():
        assert name == f"crate_alpha_{name.split('_')[2]}_patch{config['patch_size']}_{config['image_size']}"
        assert config["dim"] == config["heads"] * config["dim_head"]
        with torch.device("meta"):
            net = CRATEAlpha(**config)
        assert sum(p.numel() for p in net.parameters()) == REFERENCE_PARAMS[name], name


def test_docstring_examples_run():
    result = doctest.testmod(crate_alpha, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0

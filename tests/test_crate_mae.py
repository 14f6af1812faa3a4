"""CRATE-MAE against the official implementation's stored outputs (tests/data/README.md, crate_mae_ref_a)."""

from __future__ import annotations

import argparse
import fractions
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crate_vis.errors import CheckpointError
from crate_vis.hooks import AttentionRecorder
from crate_vis.models.checkpoint import load_checkpoint, safe_torch_load, unwrap_state_dict
from crate_vis.models.conversion import convert_official_state_dict
from crate_vis.models.crate_mae import (
    CRATE_MAE_VARIANTS,
    CRATEMAE,
    noise_from_kept,
    sincos_pos_embed_2d,
)

DATA = Path(__file__).parent / "data"


def convert_crate_mae_state_dict(sd):
    """The official CRATE-MAE key table of the loader, after the loader's own unwrapping (``module.`` prefixes)."""
    return convert_official_state_dict(unwrap_state_dict(dict(sd)), "crate_mae")


def read_mae_checkpoint(path):
    """The loader's safe read of an MAE-codebase checkpoint (argparse.Namespace is the one class allowed)."""
    return safe_torch_load(Path(path))
TOL = 1e-5
CONFIG = "crate_mae_test_patch8_32"


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    with np.load(DATA / "crate_mae_ref_a_io.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def checkpoint() -> dict:
    return read_mae_checkpoint(DATA / "crate_mae_ref_a.pth")


@pytest.fixture()
def model(checkpoint) -> CRATEMAE:
    m = CRATEMAE(**CRATE_MAE_VARIANTS[CONFIG])
    m.load_state_dict(convert_crate_mae_state_dict(checkpoint["model"]), strict=True)
    return m.eval()


def _inputs(io) -> tuple[torch.Tensor, torch.Tensor, float]:
    return torch.from_numpy(io["images"]), torch.from_numpy(io["noise"]), float(io["mask_ratio"])


def _softmax_hooks(blocks, store: dict[int, torch.Tensor]) -> list:
    """Record what each block's ``attn.attend`` softmax materialises (explicit path only)."""
    return [
        b.attn.attend.register_forward_hook(lambda _m, _i, out, i=i: store.__setitem__(i, out.detach()))
        for i, b in enumerate(blocks)
    ]


def test_golden_config_and_checkpoint_layout(io, checkpoint):
    cfg = json.loads(str(io["config"]))
    assert {k: CRATE_MAE_VARIANTS[CONFIG][k] for k in cfg} == cfg
    assert isinstance(checkpoint["args"], argparse.Namespace) and checkpoint["epoch"] == 3
    # The stored fixed tables are the sin-cos table, bit for bit.
    table = sincos_pos_embed_2d(64, (4, 4))
    assert torch.equal(checkpoint["model"]["decoder_pos_embed"], table)
    assert torch.equal(checkpoint["model"]["pos_embed"], table)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_golden_parity(model, io, fused):
    model.set_fused(fused)
    assert model.fused is fused
    images, noise, ratio = _inputs(io)
    enc_soft: dict[int, torch.Tensor] = {}
    dec_soft: dict[int, torch.Tensor] = {}
    handles = _softmax_hooks(model.blocks, enc_soft) + _softmax_hooks(model.decoder_blocks, dec_soft)
    try:
        with torch.no_grad(), AttentionRecorder(model) as enc, AttentionRecorder(model.decoder_view()) as dec:
            loss, pred, mask = model(images, ratio, noise)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        latent, mask_enc, _ = model.forward_encoder(images, ratio, noise)
        vis_attention = model.get_selfattention_enc(images)
        vis_keys = model.get_last_key_enc(images)
    got = {
        "loss": loss,
        "pred": pred,
        "mask": mask,
        "latent": latent,
        "enc_attention": torch.stack([enc.attentions[i] for i in range(3)]),
        "dec_attention": torch.stack([dec.attentions[i] for i in range(2)]),
        "vis_attention": vis_attention,
        "vis_keys": vis_keys,
    }
    if not fused:  # the explicit path materialises the softmax itself: check that too
        assert sorted(enc_soft) == [0, 1, 2] and sorted(dec_soft) == [0, 1]
        got["enc_softmax"] = torch.stack([enc_soft[i] for i in range(3)])
        got["dec_softmax"] = torch.stack([dec_soft[i] for i in range(2)])
    else:
        assert not enc_soft and not dec_soft  # the fused path never forms the matrix
    golden_key = {"enc_softmax": "enc_attention", "dec_softmax": "dec_attention"}
    errors = {}
    for name, value in got.items():
        ref = torch.from_numpy(np.asarray(io[golden_key.get(name, name)])).to(torch.float64)
        assert tuple(value.shape) == tuple(ref.shape), name
        errors[name] = float((value.double() - ref).abs().max())
    assert torch.equal(mask_enc, mask)
    assert int(mask.sum()) == 4 * 12  # 16 patches, 4 kept per image
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"max abs error above {TOL}: {bad} (all: {errors})"


def test_attention_recorder_on_trunk_matches_visualisation_path(model, io):
    images, _, _ = _inputs(io)
    with torch.no_grad(), AttentionRecorder(model, layers=[-1]) as rec:
        tokens = model.forward_features(images)
    ref = torch.from_numpy(io["vis_attention"])
    assert (rec.attentions[-1] - ref).abs().max() <= TOL
    assert tokens.shape == (4, 17, 64)
    feats = model.forward_head(tokens)
    assert torch.allclose(feats, model.norm(tokens[:, 0]))
    assert torch.equal(feats, model.forward_head(tokens, pre_logits=True))


def test_masking_from_noise_equals_masking_from_kept_indices(model, io):
    images, noise, ratio = _inputs(io)
    ids_keep = torch.argsort(noise, dim=1)[:, :4]
    with torch.no_grad():
        by_noise = model(images, ratio, noise)
        by_ids = model(images, ratio, ids_keep=ids_keep)
        by_ids_reordered = model(images, ratio, ids_keep=ids_keep.flip(1))
    for a, b, c in zip(by_noise, by_ids, by_ids_reordered):
        assert torch.equal(a, b) and torch.equal(a, c)
    # The mask is 0 exactly at the kept patches.
    kept = torch.zeros_like(by_noise[2]).scatter_(1, ids_keep, 1.0)
    assert torch.equal(by_noise[2], 1.0 - kept)
    # noise_from_kept keeps exactly the given indices, in the given order.
    assert torch.equal(torch.argsort(noise_from_kept(ids_keep, 16), dim=1)[:, :4], ids_keep)


def test_masking_rejects_inconsistent_inputs(model, io):
    images, noise, ratio = _inputs(io)
    with pytest.raises(ValueError, match="not both"):
        model(images, ratio, noise, ids_keep=torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected \(4, 4\)"):
        model(images, ratio, ids_keep=torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="repeats"):
        model(images, ratio, ids_keep=torch.tensor([[0, 0, 1, 2]] * 4))
    with pytest.raises(ValueError, match="0..15"):
        model(images, ratio, ids_keep=torch.tensor([[0, 1, 2, 16]] * 4))
    with pytest.raises(ValueError, match=r"expected \(batch, patches\)"):
        model(images, ratio, noise[:, :8])
    with pytest.raises(ValueError, match="mask_ratio"):
        model(images, 1.5, noise)


def test_forward_is_deterministic_given_noise(model, io):
    images, noise, ratio = _inputs(io)
    with torch.no_grad():
        first, second = model(images, ratio, noise), model(images, ratio, noise)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_norm_pix_loss_by_hand(checkpoint, io):
    cfg = dict(CRATE_MAE_VARIANTS[CONFIG], norm_pix_loss=True)
    m = CRATEMAE(**cfg).eval()
    m.load_state_dict(convert_crate_mae_state_dict(checkpoint["model"]), strict=True)
    images, noise, ratio = _inputs(io)
    with torch.no_grad():
        loss, pred, mask = m(images, ratio, noise)
    # By hand, in float64: cut 8x8 patches row-major, pixels in (row, col, channel) order; standardise each patch
    # with its mean and unbiased variance (+1e-6); mean squared error per patch; average over the removed patches.
    x = io["images"].astype(np.float64)
    patches = [x[:, :, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] for r in range(4) for c in range(4)]  # (4, 3, 8, 8) each
    target = np.stack([p.transpose(0, 2, 3, 1).reshape(4, -1) for p in patches], axis=1)  # (4, 16, 192)
    target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((pred.double().numpy() - target) ** 2).mean(-1)
    removed = mask.double().numpy()
    expected = (per_patch * removed).sum() / removed.sum()
    assert abs(loss.item() - expected) <= TOL * max(1.0, abs(expected))
    assert abs(expected - float(io["loss"])) > 1e-3  # the normalisation changes the loss
    assert torch.allclose(pred, torch.from_numpy(io["pred"]), atol=TOL)  # only the target changes


def test_checkpoint_with_another_pickled_class_is_refused(tmp_path, checkpoint):
    path = tmp_path / "bad.pth"
    extra = fractions.Fraction(1, 3)  # any class other than argparse.Namespace
    torch.save({"model": checkpoint["model"], "args": argparse.Namespace(model="x"), "x": extra}, path)
    with pytest.raises(CheckpointError, match=r"fractions\.Fraction") as err:
        read_mae_checkpoint(path)
    assert "\n" not in str(err.value)
    fine = tmp_path / "fine.pth"
    torch.save({"model": checkpoint["model"], "args": argparse.Namespace(model="x"), "epoch": 1}, fine)
    assert read_mae_checkpoint(fine)["args"].model == "x"
    no_model = tmp_path / "no_model.pth"
    torch.save({"state": {}}, no_model)
    with pytest.raises(CheckpointError, match="not a tensor"):
        load_checkpoint(CRATEMAE(**CRATE_MAE_VARIANTS[CONFIG]), no_model)


def test_conversion_table(checkpoint):
    sd = dict(checkpoint["model"])
    assert convert_crate_mae_state_dict({f"module.{k}": v for k, v in sd.items()}).keys() == (
        convert_crate_mae_state_dict(sd).keys()
    )
    two_digit = convert_crate_mae_state_dict({"decoder_blocks.23.layers.0.1.fn.to_out.0.bias": torch.zeros(1)})
    assert list(two_digit) == ["decoder_blocks.23.attn.proj.bias"]
    sd["head.weight"] = torch.zeros(1)
    sd["blocks.0.layers.0.2.fn.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"2 key\(s\) .*blocks\.0\.layers\.0\.2\.fn\.weight, head\.weight"):
        convert_crate_mae_state_dict(sd)


def test_state_dict_round_trip(model, io, tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"config": model.config, "state_dict": model.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    json.dumps(saved["config"])
    clone = CRATEMAE(**saved["config"]).eval()
    result = clone.load_state_dict(saved["state_dict"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert model.state_dict().keys() == clone.state_dict().keys()
    images, noise, ratio = _inputs(io)
    with torch.no_grad():
        for a, b in zip(model(images, ratio, noise), clone(images, ratio, noise)):
            assert torch.equal(a, b)


def test_non_square_input(model, io):
    images = torch.from_numpy(io["images"])
    wide = torch.cat([images, images.flip(-1)[..., :16]], dim=-1)  # (4, 3, 32, 48): grid 4 x 6
    with torch.no_grad():
        tokens = model.forward_features(wide)
        final, inter = model.forward_intermediates(wide, output_fmt="NCHW", return_prefix_tokens=False)
        loss, pred, mask = model(wide, 0.75, torch.rand(4, 24, generator=torch.Generator().manual_seed(0)))
    assert tokens.shape == (4, 1 + 24, 64) and torch.isfinite(tokens).all()
    assert torch.equal(final, tokens) and inter[-1].shape == (4, 64, 4, 6)
    assert torch.equal(inter[-1], tokens[:, 1:].transpose(1, 2).reshape(4, 64, 4, 6))
    assert pred.shape == (4, 24, 192) and int(mask.sum()) == 4 * 18 and torch.isfinite(loss)
    assert torch.equal(model.unpatchify(model.patchify(wide), grid=(4, 6)), wide)
    # The table of the 4 x 6 grid, by hand: first half of the channels encodes the column, second half the row.
    table = model.position_table((4, 6))[0, 1:].double()
    omega = 1.0 / 10000 ** (np.arange(16) / 16.0)
    rows, cols = np.divmod(np.arange(24), 6)
    def enc(p):
        return np.concatenate([np.sin(np.outer(p, omega)), np.cos(np.outer(p, omega))], axis=1)

    expected = torch.from_numpy(np.concatenate([enc(cols), enc(rows)], axis=1))
    assert (table - expected).abs().max() <= 1e-5
    assert torch.equal(model.position_table((4, 4)), model.decoder_pos_embed)


def test_constructor_checks_and_variants():
    with pytest.raises(ValueError, match="decoder_embed_dim=32 differs from embed_dim=64"):
        CRATEMAE(**dict(CRATE_MAE_VARIANTS[CONFIG], decoder_embed_dim=32))
    with pytest.raises(ValueError, match="mlp_ratio=2"):
        CRATEMAE(**dict(CRATE_MAE_VARIANTS[CONFIG], mlp_ratio=2))
    assert all(name.startswith("crate_mae_") for name in CRATE_MAE_VARIANTS)
    m = CRATEMAE(**CRATE_MAE_VARIANTS[CONFIG])
    assert m.num_classes == 0 and m.num_prefix_tokens == 1 and m.dim_head == 16
    # LayerNorm eps: 1e-5 inside the blocks, 1e-6 for the final norms (too small a difference for the goldens to show).
    assert {b.norm1.eps for b in [*m.blocks, *m.decoder_blocks]} == {1e-5} and m.norm.eps == m.decoder_norm.eps == 1e-6
    assert (m.image_size, m.patch_size, m.grid_size, m.patch_embed.grid(40, 24)) == ((32, 32), (8, 8), (4, 4), (5, 3))
    assert sum(p.numel() for p in m.parameters()) == 92416  # the reference constructor's trainable count

"""Attention / feature recorders: golden parity, fused vs explicit paths, timm ViTs, geometry and hook hygiene."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import timm
import torch
from torch import nn

from crate_vis.hooks import (
    AttentionRecorder,
    FeatureRecorder,
    RecorderError,
    attention_rollout,
    cls_attention_maps,
    subspace_features,
)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _explicit_crate_attention(model, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Attention the explicit CRATE path materialises, captured at its ``attend`` softmax."""
    out: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.attn.attend.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(i, o.detach())))
    model.set_fused(False)
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.set_fused(True)
        for h in handles:
            h.remove()
    return out


# ------------------------------------------------------------------------------------------------------- CRATE
def test_crate_golden_attention_parity(golden, golden_model):
    x = torch.from_numpy(golden["images"])
    ref = torch.from_numpy(golden["attention"])  # (L, B, h, N, N)
    assert golden_model.fused
    with torch.no_grad(), AttentionRecorder(golden_model) as rec:
        golden_model(x)
    assert sorted(rec.attentions) == [0, 1, 2]
    for layer in range(3):
        assert rec.attentions[layer].shape == ref[layer].shape
        assert (rec.attentions[layer] - ref[layer]).abs().max().item() < 1e-5
    with torch.no_grad(), AttentionRecorder(golden_model, cls_only=True) as rec_cls:
        golden_model(x)
    for layer in range(3):
        assert (rec_cls.attentions[layer] - ref[layer][:, :, 0]).abs().max().item() < 1e-5


def test_crate_fused_recorder_matches_explicit_path(tiny_crate):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    explicit = _explicit_crate_attention(tiny_crate, x)
    with torch.no_grad(), AttentionRecorder(tiny_crate) as rec:
        tiny_crate(x)
    for i in range(tiny_crate.depth):
        torch.testing.assert_close(rec.attentions[i], explicit[i], atol=1e-6, rtol=0)
    # The recorder also works on the explicit path and sees the same maps.
    tiny_crate.set_fused(False)
    with torch.no_grad(), AttentionRecorder(tiny_crate, layers=[1]) as rec2:
        tiny_crate(x)
    torch.testing.assert_close(rec2.attentions[1], explicit[1], atol=1e-6, rtol=0)


def test_non_square_input_and_batch_sizes(tiny_crate):
    torch.manual_seed(2)
    for b, (h, w) in [(1, (24, 48)), (5, (40, 16))]:
        x = torch.randn(b, 3, h, w)
        n = 1 + (h // 8) * (w // 8)
        explicit = _explicit_crate_attention(tiny_crate, x)
        with torch.no_grad(), AttentionRecorder(tiny_crate, layers=[-1]) as rec:
            tiny_crate(x)
        assert rec.attentions[-1].shape == (b, 4, n, n)
        torch.testing.assert_close(rec.attentions[2], explicit[2], atol=1e-6, rtol=0)
        maps = cls_attention_maps(tiny_crate, x, layer=-1)
        assert maps.shape == (b, 4, h // 8, w // 8)
        torch.testing.assert_close(maps.flatten(2), explicit[2][:, :, 0, 1:], atol=1e-6, rtol=0)


def test_layer_subsets_and_index_errors(tiny_crate):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), AttentionRecorder(tiny_crate, layers=[-1, 0]) as rec:
        tiny_crate(x)
    assert sorted(rec.attentions) == [0, 2]
    assert rec.attentions[-1] is rec.attentions[2]
    assert -3 in rec.attentions and 1 not in rec.attentions
    with pytest.raises(KeyError, match="not recorded"):
        rec.attentions[1]
    with pytest.raises(IndexError, match=r"0\.\.2"):
        AttentionRecorder(tiny_crate, layers=[3])
    with pytest.raises(IndexError, match=r"0\.\.2"):
        AttentionRecorder(tiny_crate, layers=-4)


def test_unknown_model_error_names_modules():
    class NotAViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4))])

    with pytest.raises(RecorderError, match=r"\.attn.*subspace.*q_norm"):
        AttentionRecorder(NotAViT())
    with pytest.raises(RecorderError, match=r"\.blocks"):
        AttentionRecorder(nn.Linear(3, 3))


def test_hooks_removed_and_no_growth(tiny_crate):
    x = torch.randn(1, 3, 32, 32)
    assert _hook_count(tiny_crate) == 0

    def use(i: int) -> None:
        rec = AttentionRecorder(tiny_crate, cls_only=bool(i % 2))
        with torch.no_grad(), rec:
            assert _hook_count(tiny_crate) == 3
            tiny_crate(x)
        if i % 3 == 0:  # an exception inside the block still removes the hooks
            with pytest.raises(RuntimeError, match="boom"), rec:
                raise RuntimeError("boom")
        with FeatureRecorder(tiny_crate, layers=[0]) as frec:
            tiny_crate(x)
        assert frec.final is not None
        assert _hook_count(tiny_crate) == 0

    for i in range(10):
        use(i)
    gc.collect()
    before = sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
    for i in range(100):
        use(i)
    gc.collect()
    after = sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
    assert _hook_count(tiny_crate) == 0
    assert after <= before


def test_cannot_enter_twice(tiny_crate):
    rec = AttentionRecorder(tiny_crate)
    with rec, pytest.raises(RuntimeError, match="already active"):
        with rec:
            pass
    assert _hook_count(tiny_crate) == 0


def test_detach_false_keeps_graph(tiny_crate):
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    with AttentionRecorder(tiny_crate, layers=[0], cls_only=True, detach=False) as rec:
        tiny_crate(x)
    rec.attentions[0][0, 0, 1].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_cls_maps_and_subspace_features_golden(golden, golden_model):
    x = torch.from_numpy(golden["images"])
    ref = torch.from_numpy(golden["attention"])
    for layer in (0, -1):
        maps = cls_attention_maps(golden_model, x, layer=layer)  # (B, h, 4, 4)
        assert maps.shape == (4, 4, 4, 4)
        # Raw softmax values: the CLS row without its first column, not renormalised.
        torch.testing.assert_close(maps.flatten(2), ref[layer][:, :, 0, 1:], atol=1e-5, rtol=0)
    # Subspace features: the projections of the layer's normalised input, by an independent route.
    tokens = torch.from_numpy(golden["layer_tokens"])  # (L, B, N, dim)
    feats = subspace_features(golden_model, x, layer=2)
    attn = golden_model.blocks[2].attn
    with torch.no_grad():
        z = golden_model.blocks[2].norm1(tokens[1])  # input of layer 2 = output of layer 1
        w = (z @ attn.qkv.weight.T).reshape(4, 17, 4, 16).permute(0, 2, 1, 3)  # (B, h, N, dh)
    assert feats.shape == (4, 4, 16, 16)
    torch.testing.assert_close(feats, w[:, :, 1:], atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------------------- timm
def _timm_vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0, depth=3,
        embed_dim=48, num_heads=3, dynamic_img_size=True, **kw,
    ).eval()  # fmt: skip


def _timm_explicit(model, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """timm's own explicit attention (fused_attn off), captured at the attention dropout it passes through."""
    out: dict[int, torch.Tensor] = {}
    handles = []
    for i, blk in enumerate(model.blocks):
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(i, o)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for blk in model.blocks:
            blk.attn.fused_attn = True
        for h in handles:
            h.remove()
    return out


def _independent_timm_attention(model, x: torch.Tensor, layer: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(dh)) written out from the weights, from the block input captured by a pre-hook."""
    cap = {}
    blk = model.blocks[layer]
    h = blk.register_forward_pre_hook(lambda m, a: cap.setdefault("x", a[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    a = blk.attn
    with torch.no_grad():
        z = blk.norm1(cap["x"])
        b, n, d = z.shape
        hd = a.head_dim
        qkv = z @ a.qkv.weight.T + a.qkv.bias
        q = qkv[..., :d].reshape(b, n, a.num_heads, hd).transpose(1, 2)
        k = qkv[..., d : 2 * d].reshape(b, n, a.num_heads, hd).transpose(1, 2)
        q, k = a.q_norm(q), a.k_norm(k)
        return torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1)


@pytest.mark.parametrize(
    "kw, prefix",
    [({}, 1), ({"qk_norm": True}, 1), ({"reg_tokens": 2, "no_embed_class": True}, 3)],
)
def test_timm_fused_recorder_matches_explicit(kw, prefix):
    model = _timm_vit(**kw)
    assert all(b.attn.fused_attn for b in model.blocks)
    if kw.get("qk_norm"):  # make the norms matter
        with torch.no_grad():
            for b in model.blocks:
                b.attn.k_norm.weight.uniform_(0.5, 1.5)
                b.attn.q_norm.bias.uniform_(-0.3, 0.3)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 24, 40)  # non-square
    n = prefix + 3 * 5
    with torch.no_grad(), AttentionRecorder(model) as rec:
        model(x)
    explicit = _timm_explicit(model, x)
    for i in range(3):
        assert rec.attentions[i].shape == (2, 3, n, n)
        torch.testing.assert_close(rec.attentions[i], explicit[i], atol=1e-6, rtol=0)
    torch.testing.assert_close(rec.attentions[1], _independent_timm_attention(model, x, 1), atol=1e-5, rtol=0)
    with torch.no_grad(), AttentionRecorder(model, layers=[-1], cls_only=True) as rec_cls:
        model(x)
    torch.testing.assert_close(rec_cls.attentions[2], explicit[2][:, :, 0], atol=1e-6, rtol=0)
    maps = cls_attention_maps(model, x)
    assert maps.shape == (2, 3, 3, 5)
    torch.testing.assert_close(maps.flatten(2), explicit[2][:, :, 0, prefix:], atol=1e-6, rtol=0)
    feats = subspace_features(model, x, layer=0)
    assert feats.shape == (2, 3, 15, 16)


def test_timm_without_class_token_rejects_cls_only():
    model = _timm_vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="no class token"):
        AttentionRecorder(model, cls_only=True)


# -------------------------------------------------------------------------------------------- feature recorder
def test_feature_recorder_against_golden_and_intermediates(golden, golden_model):
    x = torch.from_numpy(golden["images"])
    tokens = torch.from_numpy(golden["layer_tokens"])
    with torch.no_grad(), FeatureRecorder(golden_model) as rec:
        golden_model(x)
    with torch.no_grad():
        final, inter = golden_model.forward_intermediates(x)
    torch.testing.assert_close(rec.final, torch.from_numpy(golden["final_tokens"]), atol=1e-5, rtol=0)
    for i in range(3):
        f = rec.features[i]
        assert set(f) == {"mssa_in", "subspace", "mssa_out", "ista_in", "sparse_code", "ista_out"}
        assert torch.equal(f["sparse_code"], f["ista_out"])  # CRATE's sparse code is its ISTA output
        torch.testing.assert_close(f["ista_out"], tokens[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(f["ista_out"], inter[i], atol=0, rtol=0)
        blk = golden_model.blocks[i]
        z_in = tokens[i - 1] if i else golden_model.embed(x).detach()
        with torch.no_grad():
            torch.testing.assert_close(f["mssa_in"], blk.norm1(z_in), atol=1e-5, rtol=0)
            torch.testing.assert_close(f["subspace"], blk.attn.project(f["mssa_in"]), atol=0, rtol=0)
            half = z_in + f["mssa_out"]  # residual after MSSA
            torch.testing.assert_close(f["ista_in"], blk.norm2(half), atol=1e-5, rtol=0)
            torch.testing.assert_close(blk.ista(f["ista_in"]), f["ista_out"], atol=1e-6, rtol=0)


def test_feature_recorder_subset_and_errors(tiny_crate):
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad(), FeatureRecorder(tiny_crate, layers=[-2], features=["subspace", "ista_out"]) as rec:
        tiny_crate(x)
    assert sorted(rec.features) == [1]
    assert set(rec.features[-2]) == {"subspace", "ista_out"}
    assert rec.features[1]["subspace"].shape == (2, 4, 1 + 6, 16)
    with pytest.raises(ValueError, match="unknown feature"):
        FeatureRecorder(tiny_crate, features=["attention"])


# ----------------------------------------------------------------------------------------------------- rollout
def test_attention_rollout_hand_computed():
    a1 = torch.tensor([[[0.5, 0.5], [0.25, 0.75]], [[0.5, 0.5], [0.75, 0.25]]])  # 2 heads
    a2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    # Head means: M1 = [[.5,.5],[.5,.5]], M2 = [[.5,.5],[.5,.5]]; (M + I) row-normalised: [[.75,.25],[.25,.75]].
    r = attention_rollout([a1[None], a2[None]])
    step = np.array([[0.75, 0.25], [0.25, 0.75]])
    np.testing.assert_allclose(r[0].numpy(), step @ step, atol=1e-7)
    # Order matters: with max fusion the layers differ; later layer on the left.
    r_max = attention_rollout([a1[None], a2[None]], head_fusion="max")
    m1 = np.array([[0.5, 0.5], [0.75, 0.75]]) + np.eye(2)
    m2 = np.array([[1.0, 1.0], [1.0, 1.0]]) + np.eye(2)
    m1 /= m1.sum(1, keepdims=True)
    m2 /= m2.sum(1, keepdims=True)
    np.testing.assert_allclose(r_max[0].numpy(), m2 @ m1, atol=1e-7)
    assert not np.allclose(m2 @ m1, m1 @ m2)


def test_attention_rollout_discard_and_rows_sum_to_one():
    torch.manual_seed(0)
    attn = [torch.softmax(torch.randn(2, 3, 5, 5), -1) for _ in range(4)]
    r = attention_rollout(attn, discard_ratio=0.4)
    torch.testing.assert_close(r.sum(-1), torch.ones(2, 5))
    # Discarding 2 of 5 per row: the two smallest off-diagonal entries of the fused map vanish before + I.
    fused = attn[0].mean(1)[0, 0]  # row 0 of layer 0
    off = fused.clone()
    off[0] = float("inf")
    drop = off.topk(2, largest=False).indices
    single = attention_rollout(attn[:1], discard_ratio=0.4)[0, 0]
    assert torch.all(single[drop] == 0)
    with pytest.raises(ValueError):
        attention_rollout(attn, head_fusion="median")


def test_feature_recorder_timm_matches_forward_intermediates():
    model = _timm_vit(reg_tokens=1)
    x = torch.randn(2, 3, 16, 32)
    with torch.no_grad(), FeatureRecorder(model) as rec:
        model.forward_features(x)
        inter = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True, norm=False)
    # forward_intermediates ran second and overwrote the recordings with identical values.
    for i in range(3):
        f = rec.features[i]
        torch.testing.assert_close(f["ista_out"][:, 2:], inter[i])  # timm drops the 2 prefix tokens here
        blk = model.blocks[i]
        with torch.no_grad():
            k = blk.attn.qkv(f["mssa_in"])[..., 48:96].reshape(2, 10, 3, 16).transpose(1, 2)
        torch.testing.assert_close(f["subspace"], k)
    torch.testing.assert_close(rec.final, rec.features[2]["ista_out"])

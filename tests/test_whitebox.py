"""White-box diagnostics: golden coding rate / sparsity, closed forms, independent numpy references, degenerate input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from crate_vis.whitebox import (
    LayerStatsAccumulator,
    coding_rate,
    compression_rate,
    l1_l2_ratio,
    logdet_identity_plus_gram,
    measure_layers,
    rate_reduction,
    sparsity,
    subspace_bases,
    total_rate,
    unit_normalize,
)


def _np_logdet(m: np.ndarray) -> float:
    sign, val = np.linalg.slogdet(m)
    assert sign > 0
    return float(val)


def _np_coding_rate(x: np.ndarray, eps: float) -> float:
    """Reference formula on one sample (heads, N, p), written with the p x p Gram (no size switch)."""
    h, n, p = x.shape
    total = 0.0
    for k in range(h):
        xk = x[k] / np.linalg.norm(x[k], axis=1, keepdims=True)
        total += _np_logdet(np.eye(p) + p / (n * eps) * xk.T @ xk)
    return 0.5 * total


def test_golden_coding_rate_and_sparsity(golden, golden_model):
    x = torch.from_numpy(golden["images"])
    acc = LayerStatsAccumulator()
    # Two uneven batches: the streaming statistics must not depend on the split.
    acc.update(measure_layers(golden_model, x[:1]))
    acc.update(measure_layers(golden_model, x[1:]))
    assert acc.layers == [0, 1, 2]
    cr = np.stack([acc.mean("coding_rate"), acc.std("coding_rate")], 1)
    sp = np.stack([acc.mean("sparsity"), acc.std("sparsity")], 1)
    np.testing.assert_allclose(cr, golden["coding_rate"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(sp, golden["sparsity"], atol=1e-4, rtol=0)
    s = acc.summary()
    np.testing.assert_array_equal(s["coding_rate"]["count"], [4, 4, 4])
    np.testing.assert_allclose(s["sparsity"]["std"], golden["sparsity"][:, 1], atol=1e-10)


def test_accumulator_matches_numpy_and_is_split_invariant():
    rng = np.random.default_rng(0)
    vals = rng.normal(5.0, 2.0, size=(2, 23))
    whole, parts = LayerStatsAccumulator(), LayerStatsAccumulator()
    whole.update({0: {"l1l2": vals[0]}, 3: {"l1l2": vals[1]}})
    for chunk in np.split(np.arange(23), [1, 2, 10, 17]):
        parts.update({0: {"l1l2": torch.from_numpy(vals[0, chunk])}, 3: {"l1l2": vals[1, chunk]}})
    for acc in (whole, parts):
        assert acc.layers == [0, 3]
        np.testing.assert_allclose(acc.mean("l1l2"), vals.mean(1), rtol=1e-12)
        np.testing.assert_allclose(acc.std("l1l2"), vals.std(1, ddof=1), rtol=1e-12)
        np.testing.assert_allclose(acc.std("l1l2", ddof=0), vals.std(1), rtol=1e-12)
    one = LayerStatsAccumulator()
    one.update({0: {"coding_rate": [1.0]}})
    assert np.isnan(one.std("coding_rate"))[0] and one.std("coding_rate", ddof=0)[0] == 0
    with pytest.raises(KeyError):
        one.mean("sparsity")
    with pytest.raises(ValueError, match="non-finite"):
        one.update({0: {"coding_rate": [float("nan")]}})


@pytest.mark.parametrize("n, p", [(7, 4), (3, 10)])  # more tokens than features, and fewer
def test_coding_rate_matches_numpy(n, p):
    torch.manual_seed(0)
    x = torch.randn(2, 3, n, p)
    got = coding_rate(x, eps=0.05)
    for b in range(2):
        assert got[b].item() == pytest.approx(_np_coding_rate(x[b].double().numpy(), 0.05), rel=1e-10)
    assert coding_rate(x[0], eps=0.05).item() == pytest.approx(got[0].item(), rel=1e-12)
    # Scale-invariant per token (unit-normalised), float32 and float64 inputs agree.
    scaled = x * torch.rand(2, 3, n, 1).add(0.5)
    torch.testing.assert_close(coding_rate(scaled.double(), eps=0.05), got, rtol=1e-6, atol=0)


def test_coding_rate_closed_forms_and_degenerate_inputs():
    h, p, eps = 2, 8, 0.01
    # Orthonormal tokens (N <= p): every eigenvalue of X^T X is 1 -> N log(1 + p / (N eps)) per head.
    n = 5
    x = torch.eye(p)[:n].expand(h, n, p)
    assert coding_rate(x, eps).item() == pytest.approx(0.5 * h * n * math.log1p(p / (n * eps)), rel=1e-12)
    # All-equal tokens: rank one, eigenvalue N -> log(1 + p / eps) per head.
    same = torch.full((h, 6, p), 3.0)
    assert coding_rate(same, eps).item() == pytest.approx(0.5 * h * math.log1p(p / eps), rel=1e-12)
    # A single token: the same closed form.
    assert coding_rate(torch.randn(h, 1, p), eps).item() == pytest.approx(0.5 * h * math.log1p(p / eps), rel=1e-12)
    # Zero vectors normalise to zero and add nothing.
    zeros = torch.zeros(h, 4, p)
    assert coding_rate(zeros, eps).item() == 0.0
    mixed = torch.cat([torch.eye(p)[:2].expand(h, 2, p), torch.zeros(h, 2, p)], 1)  # N = 4, two of them zero
    assert coding_rate(mixed, eps).item() == pytest.approx(0.5 * h * 2 * math.log1p(p / (4 * eps)), rel=1e-12)
    assert torch.equal(unit_normalize(torch.zeros(3, 2)), torch.zeros(3, 2))
    # Huge values stay finite (per-token normalisation), errors are clear.
    assert torch.isfinite(coding_rate(torch.randn(h, 5, p) * 1e30, eps))
    with pytest.raises(ValueError, match="NaN"):
        coding_rate(torch.full((h, 3, p), float("nan")))
    with pytest.raises(ValueError, match="at least one token"):
        coding_rate(torch.zeros(h, 0, p))
    with pytest.raises(ValueError, match="heads"):
        coding_rate(torch.zeros(4, p))
    with pytest.raises(ValueError, match="eps"):
        coding_rate(zeros, eps=0)


def test_total_and_compression_rate_match_numpy(golden_model):
    torch.manual_seed(1)
    z = torch.randn(2, 9, 64)
    eps = 0.5
    got_r = total_rate(z, eps)
    for b in range(2):
        zb = z[b].double().numpy()
        ref = 0.5 * _np_logdet(np.eye(64) + 64 / (9 * eps**2) * zb.T @ zb)
        assert got_r[b].item() == pytest.approx(ref, rel=1e-10)
    block = golden_model.blocks[0]
    u = subspace_bases(block)  # (h, d, p)
    assert u.shape == (4, 64, 16)
    # U_k^T z equals the block's own per-head projection.
    torch.testing.assert_close(
        torch.einsum("bnd,hdp->bhnp", z, u), block.attn.project(z).detach(), atol=1e-5, rtol=0
    )  # fmt: skip
    got_rc = compression_rate(z, block, eps)
    u_np = u.detach().double().numpy()
    for b in range(2):
        zb = z[b].double().numpy()
        ref = sum(
            0.5 * _np_logdet(np.eye(16) + 16 / (9 * eps**2) * (zb @ u_np[k]).T @ (zb @ u_np[k])) for k in range(4)
        )
        assert got_rc[b].item() == pytest.approx(ref, rel=1e-10)
    torch.testing.assert_close(compression_rate(z, u, eps), got_rc, rtol=1e-12, atol=0)
    torch.testing.assert_close(rate_reduction(z, block.attn, eps), got_r - got_rc, rtol=1e-12, atol=0)
    # Closed form: Z with orthonormal columns scaled by s -> R = k/2 log(1 + d s^2 / (N eps^2)).
    q = torch.linalg.qr(torch.randn(9, 4, dtype=torch.float64)).Q * 2.0  # (9, 4)
    z4 = torch.cat([q, torch.zeros(9, 60, dtype=torch.float64)], 1)
    assert total_rate(z4, eps).item() == pytest.approx(2 * math.log1p(64 * 4 / (9 * eps**2)), rel=1e-10)
    # Degenerate: zero tokens have zero rate; one token is fine.
    assert total_rate(torch.zeros(5, 64)).item() == 0.0
    assert torch.isfinite(compression_rate(torch.randn(1, 64), block))
    with pytest.raises(TypeError):
        compression_rate(z, torch.nn.Linear(3, 3))


def test_logdet_helper_switches_gram_side():
    torch.manual_seed(2)
    x = torch.randn(3, 5, 11, dtype=torch.float64)
    a = 0.7
    big = torch.linalg.slogdet(torch.eye(11, dtype=torch.float64) + a * x.transpose(-1, -2) @ x)[1]
    torch.testing.assert_close(logdet_identity_plus_gram(x, a), big, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet_identity_plus_gram(x.transpose(-1, -2), a), big, rtol=1e-12, atol=1e-12)


def test_sparsity_and_l1l2_known_answers():
    d = 16
    one_hot = torch.zeros(1, 2, d)
    one_hot[0, :, 3] = -2.0
    assert sparsity(one_hot).item() == pytest.approx((d - 1) / d)
    assert l1_l2_ratio(one_hot).item() == pytest.approx(1 / math.sqrt(d))
    dense = torch.full((2, d), -0.3)
    assert sparsity(dense).item() == 0.0
    assert l1_l2_ratio(dense).item() == pytest.approx(1.0)
    half = torch.cat([torch.zeros(1, d), torch.ones(1, d)])  # a zero token counts as 0
    assert l1_l2_ratio(half).item() == pytest.approx(0.5)
    assert sparsity(torch.zeros(3, 4, d)).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        sparsity(torch.zeros(0, d))
    with pytest.raises(ValueError):
        l1_l2_ratio(torch.zeros(d))


def test_measure_layers_subset_and_timm(tiny_crate):
    x = torch.randn(3, 3, 16, 24)
    out = measure_layers(tiny_crate, x, layers=[-1])
    assert list(out) == [2]
    assert set(out[2]) == {"coding_rate", "sparsity", "l1l2", "compression_rate", "total_rate", "rate_reduction"}
    assert all(v.shape == (3,) and v.dtype == torch.float64 for v in out[2].values())
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, num_heads=3, depth=2,
        num_classes=0, dynamic_img_size=True,
    ).eval()  # fmt: skip
    res = measure_layers(vit, torch.randn(2, 3, 32, 32))
    assert list(res) == [0, 1] and set(res[0]) == {"coding_rate", "sparsity", "l1l2"}
    assert torch.isfinite(res[1]["coding_rate"]).all()

"""Degenerate inputs and properties of the numeric cores: coding rates, MaskCut, DINO thresholding.

Degenerate inputs (all-equal tokens, zero vectors, a single token, non-finite values) must give a finite answer that
matches a closed form, or a clear error; never NaN, a hang or a silent garbage result. Properties are checked with
Hypothesis on small random inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def wb():
    import importlib

    return importlib.import_module("crate_vis.whitebox")  # the project's own module: an ImportError must fail, not skip


@pytest.fixture(scope="module")
def mc():
    import importlib

    return importlib.import_module("crate_vis.segmentation.maskcut")  # the project's own module: an ImportError must fail, not skip


@pytest.fixture(scope="module")
def dino():
    import importlib

    return importlib.import_module("crate_vis.segmentation.dino")  # the project's own module: an ImportError must fail, not skip


FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


# ------------------------------------------------------------------------------------------- coding rate
class TestCodingRate:
    @staticmethod
    def _closed_form_rank_one(heads: int, p: int, eps: float) -> float:
        # Every normalised row is the same unit vector u: X^T X = N u u^T, so
        # logdet(I + p / (N eps) N u u^T) = log(1 + p / eps) per head, whatever N is.
        return 0.5 * heads * math.log1p(p / eps)

    @pytest.mark.parametrize("n", [1, 2, 17, 300])
    def test_all_equal_tokens(self, wb, n):
        heads, p = 4, 16
        x = torch.randn(p, generator=torch.Generator().manual_seed(0)).repeat(heads, n, 1)  # (h, N, p)
        r = wb.coding_rate(x)
        assert torch.isfinite(r)
        assert r.item() == pytest.approx(self._closed_form_rank_one(heads, p, wb.DEFAULT_EPS), rel=1e-12)

    def test_single_token_and_zero_vectors(self, wb):
        heads, p = 3, 8
        one = torch.randn(2, heads, 1, p)
        np.testing.assert_allclose(wb.coding_rate(one).numpy(), self._closed_form_rank_one(heads, p, 0.01), rtol=1e-12)
        assert wb.coding_rate(torch.zeros(heads, 5, p)).item() == 0.0  # zero rows carry no direction
        # Zero rows add nothing: the rate of [u; 0; 0] equals that of [u] with N adjusted in the scale only.
        x = torch.zeros(heads, 3, p)
        x[:, 0, 0] = 1.0
        assert wb.coding_rate(x).item() == pytest.approx(0.5 * heads * math.log1p(p / (3 * 0.01)), rel=1e-12)

    def test_orthonormal_tokens(self, wb):
        heads, n, p, eps = 2, 5, 8, 0.01
        x = torch.eye(p)[:n].repeat(heads, 1, 1)  # (h, N, p), orthonormal rows: X X^T = I_N
        want = 0.5 * heads * n * math.log1p(p / (n * eps))
        assert wb.coding_rate(x, eps).item() == pytest.approx(want, rel=1e-12)

    def test_extreme_magnitudes_are_normalised_away(self, wb):
        base = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1))
        r = wb.coding_rate(base)
        for scale in (1e-30, 1e30):
            assert wb.coding_rate(base.double() * scale).item() == pytest.approx(r.item(), rel=1e-9)
        assert torch.isfinite(wb.coding_rate(torch.full((2, 6, 4), 1e38)))

    def test_clear_errors(self, wb):
        with pytest.raises(ValueError, match="NaN or inf"):
            wb.coding_rate(torch.full((2, 3, 4), float("nan")))
        with pytest.raises(ValueError, match="inf"):
            wb.coding_rate(torch.tensor([[[1.0, float("inf")]]]))
        with pytest.raises(ValueError, match="at least one token"):
            wb.coding_rate(torch.zeros(2, 0, 4))
        with pytest.raises(ValueError, match="eps"):
            wb.coding_rate(torch.ones(2, 3, 4), eps=0.0)
        with pytest.raises(ValueError):
            wb.coding_rate(torch.ones(3, 4))  # no head axis

    @FAST
    @given(
        n=st.integers(1, 12), p=st.integers(1, 6), heads=st.integers(1, 3), seed=st.integers(0, 2**16),
        scale=st.floats(1e-3, 1e3), zero_rows=st.integers(0, 3),
    )  # fmt: skip
    def test_properties(self, wb, n, p, heads, seed, scale, zero_rows):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(heads, n, p, generator=g, dtype=torch.float64)
        x[:, : min(zero_rows, n)] = 0.0
        r = wb.coding_rate(x).item()
        assert math.isfinite(r) and r >= 0.0
        # Scale invariance (rows are normalised) and token-permutation invariance.
        assert wb.coding_rate(x * scale).item() == pytest.approx(r, rel=1e-9, abs=1e-12)
        perm = torch.randperm(n, generator=g)
        assert wb.coding_rate(x[:, perm]).item() == pytest.approx(r, rel=1e-9, abs=1e-12)
        # Upper bound from AM-GM on the k = min(N, p) Gram eigenvalues, whose sum is the number of non-zero rows.
        k, a = min(n, p), p / (n * wb.DEFAULT_EPS)
        nonzero = n - min(zero_rows, n)
        assert r <= 0.5 * heads * k * math.log1p(a * nonzero / k) * (1 + 1e-12) + 1e-12

    def test_total_and_compression_rates_degenerate(self, wb):
        eps, d = 0.01, 8
        assert wb.total_rate(torch.zeros(5, d)).item() == 0.0
        z = torch.ones(1, d)  # a single token: rank one, ||z||^2 = d
        assert wb.total_rate(z, eps).item() == pytest.approx(0.5 * math.log1p(d / eps**2 * d), rel=1e-12)
        assert wb.compression_rate(torch.randn(4, d), torch.zeros(2, d, 3)).item() == 0.0
        equal = torch.ones(6, d)
        assert torch.isfinite(wb.rate_reduction(equal, torch.randn(2, d, 4)))
        with pytest.raises((ValueError, FloatingPointError)):
            wb.total_rate(torch.full((5, d), 1e200, dtype=torch.float64))  # the Gram overflows to inf
        with pytest.raises(ValueError, match="NaN or inf"):
            wb.total_rate(torch.tensor([[1.0, float("nan")]]))

    def test_measure_layers_on_degenerate_images(self, wb, tiny_crate):
        images = {"blank": torch.zeros(1, 3, 32, 32), "one patch": torch.randn(1, 3, 8, 8)}
        for name, x in images.items():
            out = wb.measure_layers(tiny_crate, x)
            assert sorted(out) == [0, 1, 2]
            for layer in out.values():
                assert set(layer) == set(wb.METRICS)
                assert all(bool(torch.isfinite(v).all()) for v in layer.values()), name
        with pytest.raises(ValueError, match="NaN or inf"):
            wb.measure_layers(tiny_crate, torch.full((1, 3, 32, 32), float("nan")))

    def test_sparsity_measures_degenerate(self, wb):
        d = 16
        assert wb.sparsity(torch.zeros(3, d)).item() == 1.0
        assert wb.l1_l2_ratio(torch.zeros(3, d)).item() == 0.0
        assert wb.l1_l2_ratio(torch.eye(d)[:3]).item() == pytest.approx(1 / math.sqrt(d))
        assert wb.l1_l2_ratio(torch.full((3, d), -2.0)).item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ MaskCut
class TestMaskCut:
    @pytest.mark.parametrize("features", ["equal", "zeros", "near_equal"])
    @pytest.mark.parametrize("grid", [(6, 6), (20, 20)])  # dense solver, then Lanczos
    def test_no_structure_gives_no_mask(self, mc, features, grid):
        n = grid[0] * grid[1]
        f = {
            "equal": np.ones((n, 8)),
            "zeros": np.zeros((n, 8)),
            "near_equal": np.ones((n, 8)) + 1e-12 * np.random.default_rng(0).standard_normal((n, 8)),
        }[features]
        result = mc.maskcut(f, grid)
        assert len(result) == 0 and result.masks.shape == (0, *grid)
        assert "uniform" in result.stop_reason

    def test_single_token_is_a_clear_error(self, mc):
        with pytest.raises(ValueError, match="at least 2 patch tokens"):
            mc.maskcut(np.ones((1, 8)), (1, 1))
        with pytest.raises(ValueError, match="at least 2 patch tokens"):
            mc.tokencut(torch.ones(1, 1, 8), (1, 1))

    def test_non_finite_and_mismatched_inputs(self, mc):
        with pytest.raises(ValueError, match="NaN or infinite"):
            mc.maskcut(np.full((36, 8), np.nan), (6, 6))
        with pytest.raises(ValueError, match="do not fit the grid"):
            mc.maskcut(np.ones((35, 8)), (6, 6))

    def test_known_object(self, mc):
        # Background tokens share one direction, a 2x2 object another: the cut is the object, exactly.
        f = np.tile(np.eye(8)[1], (36, 1))
        f.reshape(6, 6, 8)[2:4, 3:5] = np.eye(8)[0]
        result = mc.maskcut(f, (6, 6))
        want = np.zeros((6, 6), bool)
        want[2:4, 3:5] = True
        assert len(result) >= 1
        np.testing.assert_array_equal(result.masks[0], want)
        assert 0.99 < result.scores[0] <= 1.0

    def test_one_odd_token(self, mc):
        f = np.tile(np.eye(4)[1], (25, 1))
        f[7] = np.eye(4)[0]
        result = mc.maskcut(f, (5, 5))
        assert np.argwhere(result.masks[0]).tolist() == [[1, 2]]

    def test_tokencut_is_one_maskcut_cut(self, mc):
        f = np.random.default_rng(3).standard_normal((48, 6))
        a, b = mc.tokencut(f, (6, 8)), mc.maskcut(f, (6, 8), tau=0.2, max_masks=1)
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_array_equal(a.scores, b.scores)

    @FAST
    @given(gh=st.integers(1, 7), gw=st.integers(2, 7), d=st.integers(1, 6), seed=st.integers(0, 2**16))
    def test_random_features_give_valid_results(self, mc, gh, gw, d, seed):
        f = np.random.default_rng(seed).standard_normal((gh * gw, d))
        result = mc.maskcut(f, (gh, gw))
        assert result.masks.dtype == bool and result.masks.shape[1:] == (gh, gw)
        assert np.all(np.isfinite(result.scores)) and np.all((result.scores >= 0) & (result.scores <= 1))
        assert np.all(np.isfinite(result.eigenvectors))
        if len(result) > 1:
            assert result.masks.sum(axis=0).max() <= 1  # disjoint
        assert all(m.any() for m in result.masks)


# -------------------------------------------------------------------------------------- DINO thresholding
class TestDinoThreshold:
    attention = st.lists(st.floats(0.0, 1.0, allow_subnormal=False), min_size=1, max_size=64).filter(
        lambda v: sum(v) > 1e-6
    )
    masses = st.floats(0.01, 1.0)

    @staticmethod
    def _kept_mass(attn: np.ndarray, keep: np.ndarray) -> float:
        return float(attn[keep].sum() / attn.sum())

    @FAST
    @given(values=attention, mass=masses)
    def test_kept_mass_top_k_and_minimal(self, dino, values, mass):
        attn = np.asarray(values, dtype=np.float64)
        keep = dino.dino_threshold(torch.from_numpy(attn), mass).numpy()
        assert keep.dtype == bool and keep.any()  # never empty
        assert self._kept_mass(attn, keep) >= mass - 1e-9
        if (~keep).any():
            assert attn[keep].min() >= attn[~keep].max()  # the most-attended tokens
        # Minimal: dropping the least-attended kept token loses the guarantee (up to rounding and zero weights).
        smallest = attn[keep].min()
        if smallest > 0:
            assert self._kept_mass(attn, keep) - smallest / attn.sum() < mass + 1e-9

    @FAST
    @given(values=attention, mass=masses, exponent=st.integers(-20, 20))
    def test_invariant_to_power_of_two_scaling(self, dino, values, mass, exponent):
        attn = torch.tensor(values, dtype=torch.float32)
        scaled = attn * 2.0**exponent  # exact in floating point: the masks must agree bit for bit
        assume(torch.isfinite(scaled).all() and scaled.sum() > 0 and (scaled[attn > 0] > 0).all())
        assert torch.equal(dino.dino_threshold(attn, mass), dino.dino_threshold(scaled, mass))

    @FAST
    @given(values=attention, mass=masses, scale=st.floats(1e-3, 1e3))
    def test_invariant_to_scaling_up_to_rounding(self, dino, values, mass, scale):
        attn = np.asarray(values, dtype=np.float64)
        a = dino.dino_threshold(torch.from_numpy(attn), mass).numpy()
        b = dino.dino_threshold(torch.from_numpy(attn * scale), mass).numpy()
        if not np.array_equal(a, b):
            # Only a token whose cumulative mass sits on the threshold may flip.
            order = np.argsort(attn, kind="stable")
            cum = np.empty_like(attn)
            cum[order] = np.cumsum(attn[order]) / attn.sum()
            assert np.all(np.abs(cum[a != b] - (1.0 - mass)) < 1e-9)

    def test_uniform_and_single_token(self, dino):
        for n in (1, 2, 7, 100):
            for mass in (0.1, 0.5, 0.6, 1.0):
                keep = dino.dino_threshold(torch.full((n,), 1.0 / n, dtype=torch.float64), mass)
                assert math.ceil(mass * n - 1e-9) <= int(keep.sum()) <= math.ceil(mass * n - 1e-9) + 1
        assert dino.dino_threshold(torch.tensor([0.3]), 0.6).tolist() == [True]

    def test_per_head_masks_on_a_grid(self, dino):
        g = torch.Generator().manual_seed(0)
        cls_attn = torch.softmax(torch.randn(2, 3, 4, 5, generator=g).flatten(2), -1).reshape(2, 3, 4, 5)
        masks = dino.dino_masks(cls_attn, 0.6)
        assert masks.shape == (2, 3, 4, 5) and masks.flatten(2).any(-1).all()
        kept = (cls_attn * masks).flatten(2).sum(-1) / cls_attn.flatten(2).sum(-1)
        assert (kept >= 0.6 - 1e-6).all()
        with pytest.raises(ValueError, match="NaN or infinite"):
            dino.dino_masks(torch.full((1, 1, 2, 2), float("nan")))
        with pytest.raises(ValueError, match="mass"):
            dino.dino_threshold(torch.ones(4), 0.0)

    @FAST
    @given(seed=st.integers(0, 2**16), heads=st.integers(1, 4), gh=st.integers(1, 6), gw=st.integers(1, 6),
           mass=masses, exponents=st.lists(st.integers(-10, 10), min_size=4, max_size=4))  # fmt: skip
    def test_foreground_properties(self, dino, seed, heads, gh, gw, mass, exponents):
        from scipy import ndimage

        g = torch.Generator().manual_seed(seed)
        cls_attn = torch.softmax(3 * torch.randn(2, heads, gh * gw, generator=g, dtype=torch.float64), -1)
        cls_attn = cls_attn.reshape(2, heads, gh, gw)
        union = dino.dino_foreground(cls_attn, mass, combine="union")
        np.testing.assert_array_equal(union.numpy(), dino.dino_masks(cls_attn, mass).any(dim=1).numpy())
        mean = dino.dino_foreground(cls_attn, mass, combine="mean")  # (B, gh, gw)
        assert mean.flatten(1).any(-1).all()
        avg = (cls_attn / cls_attn.sum(dim=(-2, -1), keepdim=True)).mean(1)  # every head weighs the same
        assert ((avg * mean).flatten(1).sum(-1) >= mass - 1e-9).all()
        # Each head is renormalised first, so scaling heads by different powers of two changes nothing.
        scales = torch.tensor([2.0**e for e in exponents[:heads]], dtype=torch.float64).view(1, heads, 1, 1)
        assert torch.equal(dino.dino_foreground(cls_attn * scales, mass, combine="mean"), mean)
        largest = dino.dino_foreground(cls_attn, mass, combine="mean", largest=True)
        for full, part in zip(mean.numpy(), largest.numpy()):
            assert part.any() and not (part & ~full).any()  # a non-empty subset
            assert ndimage.label(part)[1] == 1  # one 4-connected piece
            assert part.sum() == max(np.bincount(ndimage.label(full)[0].ravel())[1:])

    def test_all_zero_negative_or_nan_attention_is_an_error(self, dino):
        with pytest.raises(ValueError, match="sums to zero"):
            dino.dino_masks(torch.zeros(1, 1, 3, 3))
        with pytest.raises(ValueError, match="non-negative"):
            dino.dino_threshold(torch.tensor([0.5, -0.1, 0.6]))
        with pytest.raises(ValueError, match="NaN"):
            dino.dino_threshold(torch.tensor([0.5, float("nan"), 0.6]))

    def test_huge_float32_attention(self, dino):
        assert dino.dino_threshold(torch.tensor([3e38, 3e38, 1e38]), 0.6).any()

    def test_tiny_mass_keeps_the_top_token(self, dino):
        attn = torch.rand(1000, generator=torch.Generator().manual_seed(0))
        assert int(dino.dino_threshold(attn, 1e-9).sum()) == 1

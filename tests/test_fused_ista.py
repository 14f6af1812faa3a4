"""The fused ISTA step and the half-precision subspace attention: hand-written backwards against autograd."""

from __future__ import annotations

import pytest
import torch

from crate_vis import create_model
from crate_vis.models.crate import ISTA, MSSA, ISTAStep, SubspaceAttention

# (tokens M, dim d): M >= d takes the collapsed one-product path, M < d the two-product path.
BRANCHES = pytest.mark.parametrize("rows,dim", [(9, 6), (4, 7)], ids=["collapsed", "two-products"])


def _explicit_step(z: torch.Tensor, d: torch.Tensor, eta: float, lambd: float) -> torch.Tensor:
    """The definition, term by term, tokens as rows: ``ReLU(z + eta D^T (z - D z) - eta lambda)``."""
    return torch.relu(z + eta * (z - z @ d.T) @ d - eta * lambd)


@BRANCHES
def test_ista_step_gradcheck_float64(rows, dim):
    torch.manual_seed(0)
    z = torch.randn(rows, dim, dtype=torch.float64, requires_grad=True)
    d = (0.4 * torch.randn(dim, dim, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda z, d: ISTAStep.apply(z, d, 0.3, 0.05), (z, d))


@BRANCHES
def test_ista_step_matches_autograd_of_the_definition_float32(rows, dim):
    torch.manual_seed(1)
    z = torch.randn(rows, dim, requires_grad=True)
    d = (0.3 * torch.randn(dim, dim)).requires_grad_()
    g = torch.randn(rows, dim)
    fast = ISTAStep.apply(z, d, 0.1, 0.1)
    dz, dd = torch.autograd.grad(fast, (z, d), g)
    slow = _explicit_step(z, d, 0.1, 0.1)
    ez, ed = torch.autograd.grad(slow, (z, d), g)
    assert (slow == 0).any() and (slow > 0).any()  # the ReLU mask matters
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dz, ez, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dd, ed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 8), (1, 3, 8)], ids=["collapsed", "two-products"])
def test_ista_module_fused_and_explicit_agree_in_value_and_gradient(shape):
    torch.manual_seed(2)
    ista = ISTA(shape[-1], eta=0.2, lambd=0.05)
    x = torch.randn(shape)
    g = torch.randn(shape)
    results = []
    for fused in (True, False):
        ista.fused = fused
        xi = x.clone().requires_grad_()
        out = ista(xi)
        dx, dw = torch.autograd.grad(out, (xi, ista.weight), g)
        results.append((out, dx, dw))
    for fast, slow in zip(*results):
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_ista_step_skips_gradients_nobody_asked_for():
    torch.manual_seed(3)
    ista = ISTA(6)
    x = torch.randn(2, 4, 6, requires_grad=True)
    ista.weight.requires_grad_(False)
    (dx,) = torch.autograd.grad(ista(x).sum(), (x,))
    assert dx.shape == x.shape
    ista.weight.requires_grad_(True)
    ista(x.detach()).sum().backward()
    assert ista.weight.grad is not None and ista.weight.grad.shape == (6, 6)


def test_ista_under_inference_mode_equals_grad_mode():
    torch.manual_seed(4)
    ista = ISTA(8)
    x = torch.randn(3, 5, 8)
    with torch.inference_mode():
        a = ista(x)
    torch.testing.assert_close(a, ista(x), atol=0, rtol=0)


def test_ista_bf16_autocast_casts_like_a_product_and_returns_a_float32_weight_grad():
    torch.manual_seed(5)
    ista = ISTA(16)
    x = torch.randn(2, 12, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ista(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert ista.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ista.fused = False
    ref = ista(x.detach())
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)


# ------------------------------------------------------------------------------------------ subspace attention
def test_subspace_attention_gradcheck_float64():
    torch.manual_seed(6)
    w = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: SubspaceAttention.apply(w, 0.5), (w,))


def test_subspace_attention_matches_autograd_of_the_softmax_float32():
    torch.manual_seed(7)
    x = torch.randn(2, 6, 12, requires_grad=True)
    w = x.view(2, 6, 3, 4).transpose(1, 2)  # (B, h, N, dh), not contiguous, as MSSA passes it
    g = torch.randn(2, 3, 6, 4)
    fast = SubspaceAttention.apply(w, 0.5)
    (dfast,) = torch.autograd.grad(fast, (x,), g)
    slow = torch.softmax(w @ w.transpose(-1, -2) * 0.5, dim=-1) @ w
    (dslow,) = torch.autograd.grad(slow, (x,), g)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dfast, dslow, atol=1e-5, rtol=1e-5)


def test_mssa_bf16_fused_path_agrees_with_explicit():
    torch.manual_seed(8)
    attn = MSSA(dim=16, heads=2, dim_head=8).to(torch.bfloat16)
    x = torch.randn(2, 7, 16, dtype=torch.bfloat16)
    g = torch.randn(2, 7, 16, dtype=torch.bfloat16)
    results = []
    for fused in (True, False):
        attn.fused = fused
        xi = x.clone().requires_grad_()
        out = attn(xi)
        dx, dq = torch.autograd.grad(out, (xi, attn.qkv.weight), g)
        results.append((out, dx, dq))
    for fast, slow in zip(*results):
        torch.testing.assert_close(fast.float(), slow.float(), atol=0.05, rtol=0.02)


# ---------------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("batch", [4, 1], ids=["collapsed", "two-products"])  # 4 x 17 tokens >= dim 64 > 1 x 17
def test_model_fused_and_explicit_gradients_agree(batch):
    torch.manual_seed(9)
    model = create_model("crate_test_patch8_32").train()
    x = torch.randn(batch, 3, 32, 32)
    grads = []
    for fused in (True, False):
        model.set_fused(fused)
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for key, fast in grads[0].items():
        torch.testing.assert_close(fast, grads[1][key], atol=1e-4, rtol=1e-4, msg=key)


def test_model_trains_under_bf16_autocast_on_both_paths():
    torch.manual_seed(10)
    model = create_model("crate_test_patch8_32").train()
    x = torch.randn(4, 3, 32, 32)
    losses = []
    for fused in (True, False):
        model.set_fused(fused)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=0.05, rtol=0.02)

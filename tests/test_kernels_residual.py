"""routed_linear / routed_ffn with residual= (residual + routed sum, added in the combine): values and every
gradient against the reference plus an explicit add, for a separate residual and for residual = x itself;
and a token whose picks are all SKIP gets exactly zero routed input gradient whatever its x."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mom_kernels as mk  # noqa: E402
from mom_kernels import reference  # noqa: E402
from mom_kernels.testing import ffn_inputs, linear_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _grads(out, leaves, dy):
    return torch.autograd.grad(out, leaves, dy, allow_unused=True)


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("same", [False, True])
def test_routed_linear_residual(K, same):
    x, w, b, ids, g, lw, lb = linear_inputs(23, K, 3, 12, 12, device=DEVICE, seed=K)
    res = x if same else torch.randn(23, 12, dtype=x.dtype, device=DEVICE)
    leaves = [t.requires_grad_() for t in (x, w, b, g, lw, lb)] + ([] if same else [res.requires_grad_()])
    dy = torch.randn(23, 12, dtype=x.dtype, device=DEVICE)
    y = mk.routed_linear(x, w, b, ids, g, lw, lb, residual=res)
    want = res + reference.routed_linear(x, w, b, ids, g, lw, lb)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    for a, c in zip(_grads(y, leaves, dy), _grads(want, leaves, dy)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("same", [False, True])
def test_routed_ffn_residual(K, same):
    x, lw, lb, w1, b1, w2, b2, ids, g = ffn_inputs(21, K, 3, 10, 18, device=DEVICE, seed=K)
    res = x if same else torch.randn(21, 10, dtype=x.dtype, device=DEVICE)
    leaves = [t.requires_grad_() for t in (x, lw, lb, w1, b1, w2, b2, g)] + ([] if same else [res.requires_grad_()])
    dy = torch.randn(21, 10, dtype=x.dtype, device=DEVICE)
    y = mk.routed_ffn(x, lw, lb, w1, b1, w2, b2, ids, g, residual=res)
    want = res + reference.routed_ffn(x, lw, lb, w1, b1, w2, b2, ids, g)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    for a, c in zip(_grads(y, leaves, dy), _grads(want, leaves, dy)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_all_skip_token_gets_zero_input_gradient_whatever_its_x():
    x, lw, lb, w1, b1, w2, b2, ids, g = ffn_inputs(20, 2, 3, 10, 18, device=DEVICE, seed=3)
    ids[4] = 3  # token 4: both picks SKIP
    x[4] = float("inf")
    x.requires_grad_()
    y = mk.routed_ffn(x, lw, lb, w1, b1, w2, b2, ids, g)
    dx, = torch.autograd.grad(y, x, torch.randn_like(y))
    assert torch.equal(dx[4], torch.zeros_like(dx[4]))
    assert torch.isfinite(dx).all()
    xl, w, b, ids_l, gl, lwl, lbl = linear_inputs(20, 2, 3, 10, 12, device=DEVICE, seed=4)
    ids_l[7] = 3
    xl[7] = float("nan")
    xl.requires_grad_()
    yl = mk.routed_linear(xl, w, b, ids_l, None, lwl, lbl)
    dxl, = torch.autograd.grad(yl, xl, torch.randn_like(yl))
    assert torch.equal(dxl[7], torch.zeros_like(dxl[7])) and torch.isfinite(dxl).all()

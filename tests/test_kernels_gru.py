"""GRU router cell (mom_kernels/gru.py) against torch's GRU cell: the new state and every gradient, with and
without a state, fp64 / fp32 and bf16 by the 2x rule; odd sizes, N = 1, non-contiguous x; reruns."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mom_kernels.gru import gru_cell, gru_cell_reference  # noqa: E402
from mom_kernels.testing import assert_2x_rule  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(N, D, R, has_h, dtype):
    g = torch.Generator().manual_seed(N * 1000 + D * 10 + R)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    ts = [r(N, D), r(N, R) if has_h else None, r(3 * R, D, scale=D ** -0.5), r(3 * R, R, scale=R ** -0.5),
          r(3 * R, scale=0.3), r(3 * R, scale=0.3)]
    return [t.to(device=DEVICE, dtype=dtype) if t is not None else None for t in ts]


def _run(fn, ts, dout):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in ts]
    out = fn(*leaves)
    out.backward(dout)
    grads = [(l.grad if l.grad is not None else torch.zeros_like(l)) if l is not None else None for l in leaves]
    return out, grads


@pytest.mark.parametrize("has_h", [False, True])
@pytest.mark.parametrize("N,D,R", [(37, 24, 16), (1, 8, 5), (50, 33, 12)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gru_cell_matches_torch(N, D, R, has_h, dtype):
    ts = _inputs(N, D, R, has_h, dtype)
    dout = torch.randn(N, R, dtype=dtype, device=DEVICE)
    out, grads = _run(gru_cell, ts, dout)
    ref, ref_grads = _run(gru_cell_reference, ts, dout)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    for name, a, b in zip(("x", "h", "w_ih", "w_hh", "b_ih", "b_hh"), grads, ref_grads):
        if b is None:
            continue
        if name == "w_hh" and not has_h:  # a zero state: W_hh gets no gradient (torch's is exactly 0)
            assert b.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, **tol, msg=name)


@pytest.mark.parametrize("has_h", [False, True])
def test_gru_cell_bf16_2x_rule(has_h):
    ts64 = _inputs(40, 32, 16, has_h, torch.float64)
    ts16 = [t.to(torch.bfloat16) if t is not None else None for t in ts64]
    dout = torch.randn(40, 16, dtype=torch.float64, device=DEVICE)
    out, grads = _run(gru_cell, ts16, dout.to(torch.bfloat16))
    low, low_grads = _run(gru_cell_reference, ts16, dout.to(torch.bfloat16))
    hi, hi_grads = _run(gru_cell_reference, [t.double() if t is not None else None for t in ts16], dout)
    assert_2x_rule("h'", out, low, hi, 1e-2)
    for name, a, b, c in zip(("x", "h", "w_ih", "w_hh", "b_ih", "b_hh"), grads, low_grads, hi_grads):
        if c is not None and not (name == "w_hh" and not has_h):
            assert_2x_rule(name, a, b, c, 2e-2)


def test_gru_cell_noncontiguous_and_deterministic():
    x, h, w_ih, w_hh, b_ih, b_hh = _inputs(30, 20, 8, True, torch.float32)
    xt = torch.randn(20, 30, device=DEVICE).t()  # non-contiguous x
    a = gru_cell(xt, h, w_ih, w_hh, b_ih, b_hh)
    torch.testing.assert_close(a, gru_cell_reference(xt, h, w_ih, w_hh, b_ih, b_hh), rtol=1e-5, atol=1e-5)
    assert torch.equal(a, gru_cell(xt, h, w_ih, w_hh, b_ih, b_hh))
    with pytest.raises(ValueError, match="h must be"):
        gru_cell(x, h[:5], w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(ValueError, match="x must be"):
        gru_cell(x[:, :7], h, w_ih, w_hh, b_ih, b_hh)

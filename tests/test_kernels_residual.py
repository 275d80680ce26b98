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


def test_int32_safe_copies_layouts_whose_column_offsets_overflow():
    """The kernels index within a row in int32 (rows in int64): a layout whose stride x extent along a non-row
    dim reaches 2^31 is copied to row-major first (meta tensors: no memory needed to build such a layout)."""
    from mom_kernels.checks import int32_safe

    col_major = torch.empty_strided((3 * 2**20, 1024), (1, 3 * 2**20), device="meta")  # x.t() of a tall x
    safe = int32_safe(col_major)
    assert safe.stride() == (1024, 1)
    kept = torch.empty(5120, 16, 1280, device="meta").permute(1, 0, 2)  # [E, N_in, N_out] from [N_in, E, N_out]
    assert int32_safe(kept) is kept  # 16 * 1280 * 5119 < 2^31: no copy
    huge = torch.empty(4097, 64, 8192, device="meta").permute(1, 0, 2)  # 64 * 8192 * 4096 = 2^31
    assert int32_safe(huge).is_contiguous() and not huge.is_contiguous()
    x = torch.randn(4, 6)
    assert int32_safe(x) is x and int32_safe(None) is None

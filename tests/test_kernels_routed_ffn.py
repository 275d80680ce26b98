"""routed_ffn (mom_kernels/routed_ffn.py) against the per-module reference: output and every
gradient, fp64 / fp32 tight, fp16 / bf16 by the 2x rule; edge cases; determinism; errors."""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mom_kernels  # noqa: E402
from mom_kernels import reference  # noqa: E402
from mom_kernels.testing import assert_2x_rule, assert_close_verbose, assert_run_close, ffn_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
NAMES = ["x", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2", "weights"]

# (T, K, E, D, F, skip fraction, modules that get no rows)
CASES = {
    "T1_E1_K1": (1, 1, 1, 20, 36, 0.0, ()),
    "E3_K2": (17, 2, 3, 20, 36, 0.25, ()),
    "E8_K3_empty": (29, 3, 8, 33, 47, 0.25, (2, 5)),
    "E8_K1": (40, 1, 8, 48, 40, 0.2, ()),
    "all_skip": (9, 2, 3, 16, 32, 1.0, ()),
}


def _run(fn, inputs, dy, grad=True):
    x, lw, lb, w1, b1, w2, b2, ids, g = [t.detach().clone() for t in inputs]
    leaves = [x, lw, lb, w1, b1, w2, b2, g]
    for t in leaves:
        t.requires_grad_(grad)
    y = fn(x, lw, lb, w1, b1, w2, b2, ids, g)
    if not grad:
        return y.detach(), None
    if not y.requires_grad:  # the reference's all-SKIP output is a constant zero
        return y.detach(), [torch.zeros_like(t) for t in leaves]
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype), allow_unused=True, materialize_grads=True)
    return y.detach(), grads


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_routed_ffn_matches_reference(case, dtype):
    T, K, E, D, F, skip, empty = CASES[case]
    hi = ffn_inputs(T, K, E, D, F, torch.float64, DEVICE, skip, seed=zlib.crc32(case.encode()) % 1000, empty=empty)
    dy = torch.randn(T, D, dtype=torch.float64, device=DEVICE)
    y_ref, g_ref = _run(reference.routed_ffn, hi, dy)
    lo = [t.to(dtype) if t.is_floating_point() else t for t in hi]
    y, grads = _run(mom_kernels.routed_ffn, lo, dy)
    assert_run_close(y, grads, y_ref, g_ref, NAMES, dtype)
    if skip == 1.0:
        assert (y == 0).all() and all((gr == 0).all() for gr in grads)


@pytest.mark.parametrize("case", ["E3_K2", "E8_K3_empty"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_routed_ffn_low_precision_2x_rule(case, dtype):
    T, K, E, D, F, skip, empty = CASES[case]
    hi = ffn_inputs(T, K, E, D, F, torch.float64, DEVICE, skip, seed=7, empty=empty)
    lo = [t.to(dtype) if t.is_floating_point() else t for t in hi]
    dy = torch.randn(T, D, dtype=torch.float64, device=DEVICE)
    y_hi, g_hi = _run(reference.routed_ffn, hi, dy)
    y_rl, g_rl = _run(reference.routed_ffn, lo, dy)
    y, grads = _run(mom_kernels.routed_ffn, lo, dy)
    floor = 1e-3 if dtype == torch.float16 else 4e-3  # relative to the largest |value|
    assert_2x_rule("y", y, y_rl, y_hi, floor * max(1.0, y_hi.abs().max().item()))
    for name, a, b_lo, b_hi in zip(NAMES, grads, g_rl, g_hi):
        assert a.dtype == dtype, name
        assert_2x_rule(f"d{name}", a, b_lo, b_hi, floor * max(1.0, b_hi.abs().max().item()))


def test_routed_ffn_noncontiguous_x_int32_ids_and_plan():
    T, K, E, D, F = 19, 2, 3, 24, 40
    x, lw, lb, w1, b1, w2, b2, ids, g = ffn_inputs(T, K, E, D, F, torch.float64, DEVICE, 0.2, seed=3,
                                                   ids_dtype=torch.int32)
    xt = torch.randn(D, T, dtype=torch.float64, device=DEVICE).t()  # non-contiguous [T, D]
    assert not xt.is_contiguous()
    y = mom_kernels.routed_ffn(xt, lw, lb, w1, b1, w2, b2, ids, g)
    y_ref = reference.routed_ffn(xt, lw, lb, w1, b1, w2, b2, ids.long(), g)
    assert_close_verbose("y", y, y_ref, 1e-10, 1e-10)
    plan = mom_kernels.make_plan(ids, E)
    y2 = mom_kernels.routed_ffn(xt, lw, lb, w1, b1, w2, b2, ids, g, plan=plan)
    assert torch.equal(y, y2)
    # non-contiguous weights too
    w1t = w1.transpose(1, 2).contiguous().transpose(1, 2)
    y3 = mom_kernels.routed_ffn(xt, lw, lb, w1t, b1, w2, b2, ids, g)
    assert_close_verbose("y (strided w1)", y3, y_ref, 1e-10, 1e-10)


def test_routed_ffn_expanded_grad_and_noncontiguous_ids():
    """y.sum().backward() hands the kernels a stride-0 dy; ids may be a non-contiguous view."""
    inputs = ffn_inputs(11, 2, 3, 20, 36, torch.float64, DEVICE, 0.2, seed=2)

    def grads(fn, ids):
        leaves = [t.clone().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
        leaves[7] = ids
        fn(*leaves).sum().backward()
        return [t.grad for t in leaves if t.is_floating_point()]

    ids_nc = inputs[7].t().contiguous().t()
    assert not ids_nc.is_contiguous()
    for name, a, b in zip(NAMES, grads(mom_kernels.routed_ffn, ids_nc), grads(reference.routed_ffn, inputs[7])):
        assert_close_verbose(f"d{name}", a, b, 1e-10, 1e-10)


def test_routed_ffn_bit_identical_runs():
    T, K, E, D, F = 33, 3, 4, 20, 36
    inputs = ffn_inputs(T, K, E, D, F, torch.float32, DEVICE, 0.2, seed=11)
    dy = torch.randn(T, D, device=DEVICE)
    y1, g1 = _run(mom_kernels.routed_ffn, inputs, dy)
    y2, g2 = _run(mom_kernels.routed_ffn, inputs, dy)
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_routed_ffn_no_grad_path():
    inputs = ffn_inputs(10, 2, 3, 20, 36, torch.float64, DEVICE, 0.2, seed=5)
    with torch.no_grad():
        y = mom_kernels.routed_ffn(*inputs)
    assert_close_verbose("y", y, reference.routed_ffn(*inputs), 1e-10, 1e-10)


def test_routed_ffn_under_autocast():
    """torch.autocast: fp32 x and parameters are cast to the autocast dtype (bf16), y comes back in it,
    the fp32 leaves get fp32 gradients close to the fp64 reference's."""
    T, K, E, D, F = 15, 2, 3, 24, 40
    hi = ffn_inputs(T, K, E, D, F, torch.float64, DEVICE, 0.2, seed=21)
    f32 = [t.float() if t.is_floating_point() else t for t in hi]
    dy = torch.randn(T, D, dtype=torch.float64, device=DEVICE)
    y_hi, g_hi = _run(reference.routed_ffn, hi, dy)
    leaves = [t.clone().requires_grad_(True) if t.is_floating_point() else t for t in f32]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = mom_kernels.routed_ffn(*leaves)
    assert y.dtype == torch.bfloat16
    y.backward(dy.to(y.dtype))
    assert_close_verbose("y", y.float(), y_hi, 0.05, 0.05)
    for name, t, b in zip(NAMES, [t for t in leaves if t.is_floating_point()], g_hi):
        assert t.grad.dtype == torch.float32, name
        assert_close_verbose(f"d{name}", t.grad, b, 0.1 * max(1.0, b.abs().max().item()), 0.05)


def test_routed_ffn_errors(monkeypatch):
    monkeypatch.setattr(mom_kernels.checks, "_CHECK_IDS", True)  # on CUDA the id range check is opt-in (a sync)
    x, lw, lb, w1, b1, w2, b2, ids, g = ffn_inputs(6, 2, 3, 16, 32, torch.float32, DEVICE, 0.2, seed=1)
    f = mom_kernels.routed_ffn
    with pytest.raises(ValueError, match="w2 must have shape"):
        f(x, lw, lb, w1, b1, w2[:, :-1], b2, ids, g)
    with pytest.raises(ValueError, match="x must have shape"):
        f(x[None], lw, lb, w1, b1, w2, b2, ids, g)
    with pytest.raises(TypeError, match="b1 must have dtype"):
        f(x, lw, lb, w1, b1.double(), w2, b2, ids, g)
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        f(x, lw, lb, w1, b1, w2, b2, ids.float(), g)
    with pytest.raises(ValueError, match="ids must lie in 0..3"):
        f(x, lw, lb, w1, b1, w2, b2, torch.full_like(ids, 4), g)
    with pytest.raises(ValueError, match="ids must lie in 0..3"):
        f(x, lw, lb, w1, b1, w2, b2, ids - 1, g)
    with pytest.raises(ValueError, match="weights must have shape"):
        f(x, lw, lb, w1, b1, w2, b2, ids, g[:, :1])
    with pytest.raises(ValueError, match="ids must have shape"):
        f(x, lw, lb, w1, b1, w2, b2, ids[:-1], g)
    with pytest.raises(ValueError, match="plan was built for"):
        f(x, lw, lb, w1, b1, w2, b2, ids, g, plan=mom_kernels.make_plan(ids, 4))
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="is on"):
            f(x, lw, lb, w1, b1, w2.cpu(), b2, ids, g)
    else:
        with pytest.raises(ValueError, match="is on"):
            f(x, lw, lb, w1, b1, w2.to("meta"), b2, ids, g)

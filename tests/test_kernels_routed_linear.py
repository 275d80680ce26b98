"""routed_linear (mom_kernels/routed_linear.py) against the per-module reference: output and every
gradient for the QKV form (LayerNorm, unweighted), the output-projection form (weighted, no LN),
both and neither; fp64 / fp32 tight, fp16 / bf16 by the 2x rule; edge cases; determinism; errors."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mom_kernels  # noqa: E402
from mom_kernels import reference  # noqa: E402
from mom_kernels.testing import assert_2x_rule, assert_close_verbose, assert_run_close, linear_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# (T, K, E, N_in, N_out, skip fraction, modules that get no rows)
CASES = {
    "T1_E1_K1": (1, 1, 1, 20, 36, 0.0, ()),
    "E3_K2": (17, 2, 3, 20, 36, 0.25, ()),
    "E8_K3_empty": (29, 3, 8, 33, 47, 0.25, (2, 5)),
    "E8_K1": (40, 1, 8, 48, 40, 0.2, ()),
    "all_skip": (9, 2, 3, 16, 32, 1.0, ()),
}
# which optional arguments are given: (weights, LayerNorm, bias)
VARIANTS = {
    "qkv": (False, True, True),  # LN_m(x) W + b, summed over picks
    "proj": (True, False, True),  # g * (x W + b)
    "both": (True, True, True),
    "bare": (False, False, False),
}


def _run(fn, x, w, b, ids, g, lw, lb, dy, variant, grad=True, **kw):
    use_g, use_ln, use_b = VARIANTS[variant]
    x, w = x.detach().clone(), w.detach().clone()
    b = b.detach().clone() if use_b else None
    g = g.detach().clone() if use_g else None
    lw = lw.detach().clone() if use_ln else None
    lb = lb.detach().clone() if use_ln else None
    leaves = [t for t in (x, w, b, g, lw, lb) if t is not None]
    for t in leaves:
        t.requires_grad_(grad)
    y = fn(x, w, b, ids, g, lw, lb, **kw)
    if not grad:
        return y.detach(), None
    if not y.requires_grad:
        return y.detach(), [torch.zeros_like(t) for t in leaves]
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype), allow_unused=True, materialize_grads=True)
    return y.detach(), grads


def _names(variant):
    use_g, use_ln, use_b = VARIANTS[variant]
    return ["x", "weight"] + (["bias"] if use_b else []) + (["weights"] if use_g else []) + (
        ["ln_weight", "ln_bias"] if use_ln else [])


# every case with the three model forms, the bare form (no LN, weights or bias) on two cases
CASE_VARIANTS = [(c, v) for c in CASES for v in ("qkv", "proj", "both")] + [("E3_K2", "bare"),
                                                                              ("E8_K3_empty", "bare")]


@pytest.mark.parametrize("case,variant", CASE_VARIANTS, ids=[f"{c}-{v}" for c, v in CASE_VARIANTS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_routed_linear_matches_reference(case, variant, dtype):
    T, K, E, N_in, N_out, skip, empty = CASES[case]
    hi = linear_inputs(T, K, E, N_in, N_out, torch.float64, DEVICE, skip, seed=len(case) * 7 + 1, empty=empty)
    dy = torch.randn(T, N_out, dtype=torch.float64, device=DEVICE)
    y_ref, g_ref = _run(reference.routed_linear, *hi, dy, variant)
    lo = [t.to(dtype) if t.is_floating_point() else t for t in hi]
    y, grads = _run(mom_kernels.routed_linear, *lo, dy, variant)
    assert_run_close(y, grads, y_ref, g_ref, _names(variant), dtype)


@pytest.mark.parametrize("variant", ["qkv", "proj"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_routed_linear_low_precision_2x_rule(variant, dtype):
    T, K, E, N_in, N_out, skip, empty = CASES["E8_K3_empty"]
    hi = linear_inputs(T, K, E, N_in, N_out, torch.float64, DEVICE, skip, seed=3, empty=empty)
    lo = [t.to(dtype) if t.is_floating_point() else t for t in hi]
    dy = torch.randn(T, N_out, dtype=torch.float64, device=DEVICE)
    y_hi, g_hi = _run(reference.routed_linear, *hi, dy, variant)
    y_rl, g_rl = _run(reference.routed_linear, *lo, dy, variant)
    y, grads = _run(mom_kernels.routed_linear, *lo, dy, variant)
    floor = 1e-3 if dtype == torch.float16 else 4e-3  # relative to the largest |value|
    assert_2x_rule("y", y, y_rl, y_hi, floor * max(1.0, y_hi.abs().max().item()))
    for name, a, b_lo, b_hi in zip(_names(variant), grads, g_rl, g_hi):
        assert a.dtype == dtype, name
        assert_2x_rule(f"d{name}", a, b_lo, b_hi, floor * max(1.0, b_hi.abs().max().item()))


def test_shared_plan_qkv_and_proj():
    """One plan for the QKV and the output projection of a step (how the model uses it)."""
    T, K, E, D = 21, 2, 4, 24
    x, w, b, ids, g, lw, lb = linear_inputs(T, K, E, D, 3 * D, torch.float64, DEVICE, 0.2, seed=9,
                                            ids_dtype=torch.int32)
    _, wo, bo, _, _, _, _ = linear_inputs(T, K, E, D, D, torch.float64, DEVICE, 0.2, seed=10)
    plan = mom_kernels.make_plan(ids, E)
    qkv = mom_kernels.routed_linear(x, w, b, ids, None, lw, lb, plan=plan)
    o = qkv[:, :D]  # stand-in for attention
    y = mom_kernels.routed_linear(o, wo, bo, ids, g, plan=plan)
    qkv_r = reference.routed_linear(x, w, b, ids.long(), None, lw, lb)
    y_r = reference.routed_linear(qkv_r[:, :D], wo, bo, ids.long(), g)
    assert_close_verbose("qkv", qkv, qkv_r, 1e-10, 1e-10)
    assert_close_verbose("y", y, y_r, 1e-10, 1e-10)  # o is a non-contiguous slice


def test_routed_linear_bit_identical_runs():
    T, K, E, N_in, N_out = 33, 3, 4, 20, 36
    inputs = linear_inputs(T, K, E, N_in, N_out, torch.bfloat16, DEVICE, 0.2, seed=11)
    dy = torch.randn(T, N_out, device=DEVICE)
    y1, g1 = _run(mom_kernels.routed_linear, *inputs, dy, "both")
    y2, g2 = _run(mom_kernels.routed_linear, *inputs, dy, "both")
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_routed_linear_ln_weight_only_and_fp32_weights():
    T, K, E, N_in, N_out = 12, 2, 3, 20, 28
    x, w, b, ids, g, lw, lb = linear_inputs(T, K, E, N_in, N_out, torch.float64, DEVICE, 0.2, seed=4)
    y = mom_kernels.routed_linear(x, w, b, ids, g, lw)
    assert_close_verbose("y", y, reference.routed_linear(x, w, b, ids, g, lw), 1e-10, 1e-10)
    # routing weights may have their own floating dtype (fp32 router, fp16 activations)
    xh, wh, bh = x.half(), w.half(), b.half()
    gf = g.float().requires_grad_(True)
    yh = mom_kernels.routed_linear(xh, wh, bh, ids, gf)
    yh.float().sum().backward()
    assert gf.grad.dtype == torch.float32 and yh.dtype == torch.float16


def test_routed_linear_errors(monkeypatch):
    monkeypatch.setattr(mom_kernels.checks, "_CHECK_IDS", True)  # on CUDA the id range check is opt-in (a sync)
    x, w, b, ids, g, lw, lb = linear_inputs(6, 2, 3, 16, 24, torch.float32, DEVICE, 0.2, seed=1)
    f = mom_kernels.routed_linear
    with pytest.raises(ValueError, match="weight must have shape"):
        f(x, w[:, :-1], b, ids)
    with pytest.raises(ValueError, match="bias must have shape"):
        f(x, w, b[:, :-1], ids)
    with pytest.raises(TypeError, match="weight must have dtype"):
        f(x, w.half(), b, ids)
    with pytest.raises(TypeError, match="weights must be a floating"):
        f(x, w, b, ids, ids)
    with pytest.raises(ValueError, match="ids must lie in 0..3"):
        f(x, w, b, ids + 4)
    with pytest.raises(ValueError, match="ln_bias is given without ln_weight"):
        f(x, w, b, ids, None, None, lb)
    with pytest.raises(ValueError, match="ln_weight must have shape"):
        f(x, w, b, ids, None, lw[:, :-1], lb)
    with pytest.raises(TypeError, match="x must be"):
        f(x.long(), w, b, ids)
    with pytest.raises(TypeError, match="plan must be"):
        f(x, w, b, ids, plan="nope")


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU-without-interpreter message")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    x, w, b, ids, g, lw, lb = linear_inputs(4, 1, 2, 16, 16, torch.float32, DEVICE, 0.0, seed=1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        mom_kernels.routed_linear(x, w, b, ids)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU: x has more than 2^31 elements")
def test_int64_addressing_past_2_31_elements():
    """Row * stride past 2^31 elements (the overflow two MoE libraries hit past ~65K tokens): the last
    rows of a [2^21 + 64, 1024] x go to module 1; forward, dx and dW on those rows are checked."""
    free, _ = torch.cuda.mem_get_info()
    if free < 30e9:
        pytest.skip("needs ~30 GB of free GPU memory")
    T, D, N, E, tail = 2 ** 21 + 64, 1024, 16, 2, 64
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    w = (torch.randn(E, D, N, device=DEVICE, generator=gen) * D ** -0.5).to(torch.bfloat16).requires_grad_(True)
    b = torch.randn(E, N, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    ids = torch.zeros(T, 1, device=DEVICE, dtype=torch.long)
    ids[-tail:] = 1
    g = torch.rand(T, 1, device=DEVICE, generator=gen).to(torch.bfloat16)
    y = mom_kernels.routed_linear(x, w, b, ids, g)
    dy = torch.randn(T, N, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    y.backward(dy)
    xt, gt, dyt = x.detach()[-tail:].float(), g[-tail:].float(), dy[-tail:].float()
    want_y = gt * (xt @ w.detach()[1].float() + b[1].float())
    assert_close_verbose("y tail", y.detach()[-tail:].float(), want_y, 3e-2, 3e-2)
    want_dx = (gt * dyt) @ w.detach()[1].float().t()
    assert_close_verbose("dx tail", x.grad[-tail:].float(), want_dx, 3e-2, 3e-2)
    want_dw1 = xt.t() @ (gt * dyt)
    assert_close_verbose("dW[1]", w.grad[1].float(), want_dw1, 5e-2, 3e-2)

"""The Llama family's routed ops in mom_kernels against mom_kernels.reference: the SwiGLU FFN with RMSNorm and no
biases (gate and up in one grouped GEMM, two accumulators), the RMSNorm / bias-free routed linear, their few-token
decode path, the rotary QKV split (mom_kernels/rotary.py) against mom.blocks.qkv_heads. Outputs and every gradient,
fp64 / fp32 tight, fp16 / bf16 by the 2x rule; T = 1, K = 1, all SKIP, empty modules, odd sizes, non-contiguous
inputs; the GEMM modes; bit-identical reruns; bad arguments."""

import pytest
import torch

import mom_kernels
from mom_kernels import decode, reference, rotary
from mom_kernels.testing import (FAMILY_OPS, assert_2x_rule, assert_close_verbose, assert_run_close, ffn_inputs,
                                 linear_inputs, make_plan)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LLAMA = FAMILY_OPS["llama"]
FFN_NAMES = ["x", "ln_weight", "w1", "w2", "weights"]  # (no ln_bias, b1, b2 in the Llama family)

# (T, K, E, D, F, skip fraction, modules that get no rows)
CASES = {
    "T1_E1_K1": (1, 1, 1, 16, 24, 0.0, ()),
    "E3_K2": (17, 2, 3, 20, 36, 0.25, ()),
    "E5_K3_empty_odd": (23, 3, 5, 33, 47, 0.25, (1, 3)),
    "all_skip": (9, 2, 3, 16, 32, 1.0, ()),
}


def _ffn(fn, inputs, dy):
    """(y, grads of x, ln_weight, w1, w2, weights) of fn on fresh leaves."""
    x, lw, lb, w1, b1, w2, b2, ids, g = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (x, lw, w1, w2, g)]
    y = fn(leaves[0], leaves[1], None, leaves[2], None, leaves[3], None, ids, leaves[4], **LLAMA)
    if not y.requires_grad:  # the reference's all-SKIP output is a constant zero
        return y.detach(), [torch.zeros_like(t) for t in leaves]
    return y.detach(), list(torch.autograd.grad(y, leaves, dy.to(y.dtype), materialize_grads=True))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_swiglu_ffn_matches_reference(case, dtype):
    T, K, E, D, F, skip, empty = CASES[case]
    hi = ffn_inputs(T, K, E, D, F, torch.float64, DEVICE, skip, seed=len(case) + T, empty=empty, family="llama")
    assert hi[3].shape == (E, D, 2 * F) and hi[2] is None and hi[4] is None and hi[6] is None
    dy = torch.randn(T, D, dtype=torch.float64, device=DEVICE)
    y_ref, g_ref = _ffn(reference.routed_ffn, hi, dy)
    lo = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in hi]
    y, grads = _ffn(mom_kernels.routed_ffn, lo, dy)
    assert_run_close(y, grads, y_ref, g_ref, FFN_NAMES, dtype)
    if skip == 1.0:
        assert (y == 0).all() and all((gr == 0).all() for gr in grads)


def test_swiglu_ffn_is_not_gelu_and_gate_up_are_not_swapped():
    """The reference's own spec, pinned by a loop written here: silu(u W_gate) * (u W_up) @ W2 of the RMSNorm."""
    x, lw, _, w1, _, w2, _, ids, g = ffn_inputs(5, 2, 3, 8, 6, seed=3, skip_frac=0.0, family="llama")
    want = torch.zeros_like(x)
    for t in range(5):
        for k in range(2):
            m = int(ids[t, k])
            u = x[t] / torch.sqrt(x[t].pow(2).mean() + 1e-5) * lw[m]
            gate, up = u @ w1[m][:, :6], u @ w1[m][:, 6:]
            want[t] += g[t, k] * ((gate * torch.sigmoid(gate) * up) @ w2[m])
    for fn in (reference.routed_ffn, mom_kernels.routed_ffn):
        assert_close_verbose(fn.__module__, fn(x, lw, None, w1, None, w2, None, ids, g, **LLAMA), want, 1e-12, 1e-12)


@pytest.mark.parametrize("case", ["E3_K2", "E5_K3_empty_odd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_swiglu_ffn_low_precision_2x_rule(case, dtype):
    T, K, E, D, F, skip, empty = CASES[case]
    hi = ffn_inputs(T, K, E, D, F, torch.float64, DEVICE, skip, seed=11, empty=empty, family="llama")
    lo = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in hi]
    dy = torch.randn(T, D, dtype=torch.float64, device=DEVICE)
    y_hi, g_hi = _ffn(reference.routed_ffn, hi, dy)
    y_rl, g_rl = _ffn(reference.routed_ffn, lo, dy)
    y, grads = _ffn(mom_kernels.routed_ffn, lo, dy)
    floor = 1e-3 if dtype == torch.float16 else 4e-3  # relative to the largest |value|
    assert_2x_rule("y", y, y_rl, y_hi, floor * max(1.0, y_hi.abs().max().item()))
    for name, a, b_lo, b_hi in zip(FFN_NAMES, grads, g_rl, g_hi):
        assert a.dtype == dtype, name
        assert_2x_rule(f"d{name}", a, b_lo, b_hi, floor * max(1.0, b_hi.abs().max().item()))


@pytest.mark.parametrize("env", [{"MOM_KERNELS_GEMM": "split"}, {"MOM_KERNELS_GEMM": "grouped_mm"},
                                 {"MOM_KERNELS_LN": "fused"}, {"MOM_KERNELS_TMA": "1"},
                                 {"MOM_KERNELS_DW": "grouped_mm"}, {"MOM_KERNELS_PERSISTENT": "1"}],
                         ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_swiglu_ffn_every_gemm_path(env, monkeypatch):
    """The SwiGLU forward's split / grouped_mm paths (gate | up products, then the epilogue pass), the fused norm
    prologue without beta, TMA loads of both weight halves, the SwiGLU weight-gradient operand gather, a persistent
    grid: each equals the reference in fp32 (16-byte rows for grouped_mm and TMA)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    T, K, E, D, F = 19, 2, 3, 32, 32
    hi = ffn_inputs(T, K, E, D, F, torch.float64, DEVICE, 0.2, seed=5, family="llama")
    dy = torch.randn(T, D, dtype=torch.float64, device=DEVICE)
    y_ref, g_ref = _ffn(reference.routed_ffn, hi, dy)
    lo = [t.float() if t is not None and t.is_floating_point() else t for t in hi]
    y, grads = _ffn(mom_kernels.routed_ffn, lo, dy)
    assert_close_verbose("y", y, y_ref, 2e-5, 2e-5)
    for name, a, b in zip(FFN_NAMES, grads, g_ref):
        assert_close_verbose(f"d{name}", a, b, 1e-4, 1e-4)


def test_swiglu_ffn_reruns_are_bit_identical_and_x_may_be_non_contiguous():
    T, K, E, D, F = 21, 2, 4, 24, 40
    x, lw, _, w1, _, w2, _, ids, g = ffn_inputs(T, K, E, D, F, torch.float32, DEVICE, 0.2, seed=9, family="llama")
    xt = torch.randn(D, T, device=DEVICE).t()  # column-major x
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (xt, lw, w1, w2, g)]
        y = mom_kernels.routed_ffn(leaves[0], leaves[1], None, leaves[2], None, leaves[3], None, ids, leaves[4],
                                   residual=leaves[0], **LLAMA)
        runs.append([y.detach()] + list(torch.autograd.grad(y.square().sum(), leaves)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    want = reference.routed_ffn(xt.double(), lw.double(), None, w1.double(), None, w2.double(), None, ids,
                                g.double(), **LLAMA) + xt.double()
    assert_close_verbose("y", runs[0][0], want, 2e-5, 2e-5)


@pytest.mark.parametrize("T,K,E,n_in,n_out,skip", [(1, 1, 1, 16, 24, 0.0), (13, 2, 3, 20, 40, 0.25),
                                                   (22, 3, 5, 33, 18, 0.3), (6, 2, 3, 16, 16, 1.0)])
@pytest.mark.parametrize("bias,weighted", [(True, False), (False, False), (False, True)],
                         ids=["qkv_bias", "qkv", "o_proj"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_rms_linear_matches_reference(T, K, E, n_in, n_out, skip, bias, weighted, dtype):
    """The routed QKV (RMSNorm of x, q/k/v bias or none, unweighted) and output projection (no norm, no bias,
    weighted) of the Llama family: output and every gradient (no beta and no bias gradient exists)."""
    x, w, b, ids, g, lw, _ = linear_inputs(T, K, E, n_in, n_out, torch.float64, DEVICE, skip, seed=T + K)
    norm = not weighted
    args = dict(bias=b if bias else None, weights=g if weighted else None, ln_weight=lw if norm else None)
    dy = torch.randn(T, n_out, dtype=torch.float64, device=DEVICE)

    def run(fn, dt):
        leaves = {k: v.to(dt).requires_grad_() for k, v in dict(x=x, weight=w, **args).items() if v is not None}
        y = fn(leaves["x"], leaves["weight"], leaves.get("bias"), ids, leaves.get("weights"), leaves.get("ln_weight"),
               None, 1e-5, norm="rms")
        if not y.requires_grad:
            return y.detach(), {k: torch.zeros_like(v) for k, v in leaves.items()}
        return y.detach(), dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy.to(dt),
                                                                 materialize_grads=True)))

    y_ref, g_ref = run(reference.routed_linear, torch.float64)
    y, grads = run(mom_kernels.routed_linear, dtype)
    assert_run_close(y, [grads[k] for k in g_ref], y_ref, list(g_ref.values()), list(g_ref), dtype)


def test_rms_linear_bf16_2x_rule():
    x, w, b, ids, g, lw, _ = linear_inputs(24, 2, 4, 32, 48, torch.float64, DEVICE, 0.2, seed=2)
    want = reference.routed_linear(x, w, b, ids, None, lw, None, norm="rms")
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    got = mom_kernels.routed_linear(bf(x), bf(w), bf(b), ids, None, bf(lw), None, norm="rms")
    assert_2x_rule("y", got, reference.routed_linear(bf(x), bf(w), bf(b), ids, None, bf(lw), None, norm="rms"),
                   want, 1e-2)


def test_rms_ln_gather_against_its_reference():
    from mom_kernels.gathers import ln_gather, ln_gather_reference

    x, _, _, ids, _, lw, _ = linear_inputs(11, 2, 3, 24, 8, torch.float64, DEVICE, 0.2, seed=4)
    plan = make_plan(ids, 3)
    out, mean, rstd = ln_gather(x, plan, lw, None, 1e-5, rms=True)
    want, wmean, wrstd = ln_gather_reference(x, plan, lw, None, 1e-5, rms=True)
    S = int(plan.offsets[-1])
    assert_close_verbose("rows", out[:S], want, 1e-12, 1e-12)
    routed = (ids < 3).any(1)
    assert torch.equal(mean[routed], torch.zeros_like(mean[routed]))
    assert_close_verbose("rstd", rstd[routed], wrstd[routed], 1e-12, 1e-12)


@pytest.mark.parametrize("T,K", [(1, 1), (1, 3), (5, 2), (16, 2), (40, 3)])
@pytest.mark.parametrize("split", ["1", "3"])
def test_decode_llama_matches_reference(T, K, split, monkeypatch):
    """The few-token path: RMSNorm in the GEMV, SwiGLU's two accumulators (and their split-K partial sums), the
    bias-free FFN down with residual; the RMSNorm QKV with and without its q/k/v bias."""
    monkeypatch.setenv("MOM_KERNELS_DECODE_SPLIT_K", split)
    E, D, Fw = 3, 24, 40
    inputs = ffn_inputs(T, K, E, D, Fw, seed=T * 10 + K, family="llama", empty=(1,))
    want = reference.routed_ffn(*inputs, **LLAMA)
    res = torch.randn(T, D, dtype=torch.float64)
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-5)]:
        c = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in inputs]
        got = decode.decode_routed_ffn(*c, residual=res.to(dtype), **LLAMA)
        assert_close_verbose(f"ffn {dtype}", got, want + res, tol, tol)
    c = [t.to(torch.bfloat16) if t is not None and t.is_floating_point() else t for t in inputs]
    assert_2x_rule("ffn bf16", decode.decode_routed_ffn(*c, **LLAMA), reference.routed_ffn(*c, **LLAMA), want, 1e-2)
    x, w, b, ids, _, lw, _ = linear_inputs(T, K, E, D, 56, seed=T + K)
    for bias in (b, None):
        want = reference.routed_linear(x, w, bias, ids, None, lw, None, norm="rms")
        assert_close_verbose("qkv", decode.decode_routed_linear(x, w, bias, ids, None, lw, None, norm="rms"), want,
                             1e-10, 1e-10)


def _rope(B, T, hd, batched, dtype=torch.float64):
    from mom.blocks import Rotary
    from mom.config import MoMConfig

    rot = Rotary(MoMConfig(family="llama", n_embd=4 * hd, n_head=4, n_positions=64, rope_theta=50.0))
    pos = torch.randint(0, 64, (B, T)) if batched else torch.arange(3, 3 + T)
    return rot(pos, dtype)


@pytest.mark.parametrize("B,T,H,Hkv,hd", [(1, 1, 4, 2, 8), (2, 7, 4, 4, 6), (3, 5, 6, 2, 16), (2, 9, 3, 1, 10)])
@pytest.mark.parametrize("batched", [True, False], ids=["rope_BT", "rope_T"])
def test_rotary_kernel_matches_qkv_heads(B, T, H, Hkv, hd, batched):
    """q, k rotated and v split out by one launch equal mom.blocks.qkv_heads (transformers' rotation), and the
    backward (the inverse rotation) equals autograd through it; head sizes whose half is not a power of 2."""
    from mom.blocks import qkv_heads

    rope = _rope(B, T, hd, batched)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * hd, dtype=torch.float64)
    outs = [torch.randn(B, h, T, hd, dtype=torch.float64) for h in (H, Hkv, Hkv)]

    def run(fn):
        leaf = qkv.clone().requires_grad_()
        got = fn(leaf, H, Hkv, rope)
        loss = sum((a * b).sum() for a, b in zip(got, outs))
        return [t.detach() for t in got] + [torch.autograd.grad(loss, leaf)[0]]

    want = run(qkv_heads)
    got = run(rotary.qkv_heads)
    for name, a, b in zip(("q", "k", "v", "dqkv"), got, want):
        assert_close_verbose(name, a, b, 1e-13, 1e-13)
    assert all(t.transpose(1, 2).is_contiguous() for t in got[:3])  # token-major, as the head views of qkv


def test_rotary_kernel_low_precision_and_non_contiguous_input():
    from mom.blocks import qkv_heads

    B, T, H, Hkv, hd = 2, 6, 4, 2, 8
    rope = _rope(B, T, hd, True)
    base = torch.randn(B, (H + 2 * Hkv) * hd, T, dtype=torch.float64).transpose(1, 2)  # [B, T, W], strided
    want = qkv_heads(base, H, Hkv, rope)
    for name, a, b in zip("qkv", rotary.qkv_heads(base.float(), H, Hkv, rope), want):
        assert_close_verbose(name, a, b, 1e-6, 1e-6)
    lo = base.to(torch.bfloat16)
    rope_lo = tuple(t.to(torch.bfloat16) for t in rope)
    for name, a, b_lo, b in zip("qkv", rotary.qkv_heads(lo, H, Hkv, rope), qkv_heads(lo, H, Hkv, rope_lo), want):
        assert_2x_rule(name, a, b_lo, b, 1e-2)


def test_bad_arguments_name_the_problem():
    x, lw, _, w1, _, w2, _, ids, g = ffn_inputs(4, 2, 3, 8, 6, seed=1, family="llama")
    with pytest.raises(ValueError, match="norm='rms' .* takes no ln_bias"):
        mom_kernels.routed_ffn(x, lw, lw, w1, None, w2, None, ids, g, **LLAMA)
    with pytest.raises(ValueError, match="act must be 'gelu' or 'swiglu'"):
        mom_kernels.routed_ffn(x, lw, None, w1, None, w2, None, ids, g, norm="rms", act="relu")
    with pytest.raises(ValueError, match="w2 must have shape"):
        mom_kernels.routed_ffn(x, lw, None, w1, None, w2, None, ids, g, norm="rms", act="gelu")  # w1 is 2F wide
    with pytest.raises(ValueError, match="norm must be 'layer'"):
        mom_kernels.routed_linear(x, w1, None, ids, None, lw, None, norm="RMS")
    with pytest.raises(ValueError, match="head size"):
        rotary.qkv_heads(torch.randn(1, 2, 30), 4, 1, _rope(1, 2, 6, False))
    with pytest.raises(ValueError, match="rope tables"):
        rotary.qkv_heads(torch.randn(1, 3, 48), 4, 2, _rope(1, 2, 6, False))

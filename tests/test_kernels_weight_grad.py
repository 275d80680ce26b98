"""The weight-gradient path (mom_kernels/weight_grads.py, gathers.py): `segment_sum` (db), `gather_rows` (operands in
module-sorted order) and `grouped_dw` on both of its paths ("triton": the segmented Triton kernel,
"grouped_mm": gathered operands + torch._grouped_mm), against a plain fp64 formula; the routed ops' gradients
with the grouped_mm path forced. Awkward cases: empty modules, all SKIP, K = 1, odd row counts."""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mom_kernels  # noqa: E402
from mom_kernels import reference  # noqa: E402
from mom_kernels.gathers import gather_rows  # noqa: E402
from mom_kernels.weight_grads import dw_backend, grouped_dw, segment_sum  # noqa: E402
from mom_kernels.routing import make_plan  # noqa: E402
from mom_kernels.testing import assert_close_verbose, ffn_inputs, linear_inputs, make_ids  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# torch._grouped_mm: bf16 on CUDA; fp32 and bf16 on the CPU. (path, dtype) pairs the dW tests run:
GMM_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
PATHS = [("triton", torch.float32), ("grouped_mm", torch.bfloat16)] + (
    [("grouped_mm", torch.float32)] if DEVICE == "cpu" else [])
torch.backends.cuda.matmul.allow_tf32 = False

# (T, K, E, n_in, n_out, skip fraction, modules that get no rows); n_in, n_out multiples of 8 (16-byte rows)
CASES = {
    "E3_K2": (13, 2, 3, 16, 24, 0.25, ()),
    "E5_K3_empty": (21, 3, 5, 32, 16, 0.3, (1, 3)),
    "E4_K1": (9, 1, 4, 24, 40, 0.2, ()),
    "all_skip": (7, 2, 3, 16, 16, 1.0, ()),
}


def _operands(T, K, E, n_in, n_out, skip, empty, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = make_ids(T, K, E, skip, generator=gen, empty=empty).to(DEVICE)
    plan = make_plan(ids, E)
    P = T * K
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(DEVICE)  # noqa: E731
    rstd = (torch.rand(T, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE)
    ln = (r(T), rstd, 1.0 + 0.2 * r(E, n_in), 0.2 * r(E, n_in))  # mean, rstd, gamma, beta
    return dict(ids=ids, plan=plan, a_tok=r(T, n_in), a_sorted=r(P, n_in), dy_tok=r(T, n_out),
                dy_sorted=r(P, n_out), g=(torch.rand(P, generator=gen, dtype=torch.float64) + 0.1).to(DEVICE), ln=ln)


def _reference(o, a_gather, a_mode, dy_gather, weighted):
    """fp64 dW, db by the definition: every non-SKIP pick's row, in sorted order."""
    plan, ids = o["plan"], o["ids"]
    E, K = plan.n_modules, plan.top_k
    S = int(plan.offsets[-1])
    s = torch.arange(S, device=DEVICE)
    p = plan.sorted_pick[:S].long()
    t = p // K
    m = ids.reshape(-1)[p].long()
    u = (o["a_tok"][t] if a_gather else o["a_sorted"][s])
    if a_mode == 1:
        mean, rstd, gamma, beta = o["ln"]
        u = (u - mean[t, None]) * rstd[t, None] * gamma[m] + beta[m]
    elif a_mode == 2:
        u = reference.gelu_tanh(u)
    d = (o["dy_tok"][t] if dy_gather else o["dy_sorted"][s])
    if weighted:
        d = d * o["g"][p, None]
    n_in, n_out = u.shape[1], d.shape[1]
    dw = torch.zeros(E, n_in, n_out, dtype=torch.float64, device=DEVICE)
    dw.index_add_(0, m, u[:, :, None] * d[:, None, :])
    db = torch.zeros(E, n_out, dtype=torch.float64, device=DEVICE).index_add_(0, m, d)
    return dw, db


def _cast(o, dtype):
    out = dict(o)
    for k in ("a_tok", "a_sorted", "dy_tok", "dy_sorted", "g"):
        out[k] = o[k].to(dtype)
    mean, rstd, gamma, beta = o["ln"]  # statistics in the accumulation dtype (fp32; fp64 for fp64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out["ln"] = (mean.to(acc), rstd.to(acc), gamma.to(dtype), beta.to(dtype))
    return out


FLAVOURS = {  # (a_gather, a_mode, dy_gather, weighted): the four uses in routed_ffn / routed_linear
    "ffn_w2": (False, 2, True, True),
    "ffn_w1": (True, 1, False, False),
    "qkv": (True, 1, True, False),
    "proj": (True, 0, True, True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("path,dtype", PATHS, ids=[f"{p}-{str(d)[6:]}" for p, d in PATHS])
def test_grouped_dw_matches_definition(case, flavour, path, dtype, monkeypatch):
    T, K, E, n_in, n_out, skip, empty = CASES[case]
    a_gather, a_mode, dy_gather, weighted = FLAVOURS[flavour]
    o = _operands(T, K, E, n_in, n_out, skip, empty, seed=zlib.crc32(f"{case}-{flavour}".encode()) % 1000)
    monkeypatch.setenv("MOM_KERNELS_DW", path)
    lo = _cast(o, dtype)
    # the definition in fp64 on the operands as rounded to dtype: what is left is the kernels' own error
    # (fp32 accumulation, U's transform and the result rounded to dtype)
    want_dw, want_db = _reference(_cast(lo, torch.float64), a_gather, a_mode, dy_gather, weighted)
    a = lo["a_tok"] if a_gather else lo["a_sorted"]
    dy = lo["dy_tok"] if dy_gather else lo["dy_sorted"]
    db = torch.empty(E, n_out, device=DEVICE, dtype=dtype)
    dw, db = grouped_dw(a, dy, o["plan"], db=db, a_gather=a_gather, a_mode=a_mode, ln=lo["ln"] if a_mode == 1 else None,
                        dy_gather=dy_gather, weights=lo["g"] if weighted else None)
    assert dw.shape == (E, n_in, n_out) and dw.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    assert_close_verbose(f"dw ({path})", dw, want_dw, tol * max(1.0, float(want_dw.abs().max())), tol)
    assert_close_verbose(f"db ({path})", db, want_db, tol * max(1.0, float(want_db.abs().max())), tol)
    for e in empty:
        assert (dw[e] == 0).all() and (db[e] == 0).all(), f"module {e} got no rows but a gradient"


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_gather_rows_sorted_order(mode):
    T, K, E, n_in, _, skip, empty = CASES["E5_K3_empty"]
    o = _operands(T, K, E, n_in, 8, skip, empty, seed=5 + mode)
    plan = o["plan"]
    S = int(plan.offsets[-1])
    out = gather_rows(o["a_tok"], plan, gather=True, mode=mode, ln=o["ln"] if mode == 1 else None, weights=o["g"])
    p = plan.sorted_pick[:S].long()
    t = p // K
    m = o["ids"].reshape(-1)[p].long()
    u = o["a_tok"][t]
    if mode == 1:
        mean, rstd, gamma, beta = o["ln"]
        u = (u - mean[t, None]) * rstd[t, None] * gamma[m] + beta[m]
    elif mode == 2:
        u = reference.gelu_tanh(u)
    assert out.shape == (T * K, n_in)
    assert_close_verbose("gathered rows", out[:S], u * o["g"][p, None], 1e-12, 1e-12)


def test_segment_sum_sorted_rows_unweighted():
    T, K, E, _, n_out, skip, empty = CASES["E5_K3_empty"]
    o = _operands(T, K, E, 8, n_out, skip, empty, seed=9)
    _, want = _reference(o, False, 0, False, False)
    out = segment_sum(o["dy_sorted"], o["plan"], torch.empty(E, n_out, dtype=torch.float64, device=DEVICE),
                      gather=False)
    assert_close_verbose("db", out, want, 1e-12, 1e-12)


def test_dw_backend_choice(monkeypatch):
    monkeypatch.delenv("MOM_KERNELS_DW", raising=False)
    cpu = torch.device("cpu")
    assert dw_backend(torch.bfloat16, cpu, 64, 64) == "triton"  # auto: grouped_mm only on CUDA sm_90+
    monkeypatch.setenv("MOM_KERNELS_DW", "grouped_mm")
    assert dw_backend(torch.float32, cpu, 64, 64) == "grouped_mm"
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        dw_backend(torch.float32, cpu, 18, 64)
    with pytest.raises(ValueError, match="MOM_KERNELS_DW=grouped_mm"):
        dw_backend(torch.float64, cpu, 64, 64)
    monkeypatch.setenv("MOM_KERNELS_DW", "cublas")
    with pytest.raises(ValueError, match="MOM_KERNELS_DW must be"):
        dw_backend(torch.float32, cpu, 64, 64)


def test_routed_ops_gradients_with_grouped_mm_path(monkeypatch):
    """routed_ffn and routed_linear (LayerNorm'd QKV, weighted projection) end to end with dW from
    torch._grouped_mm: every gradient against the fp64 reference."""
    monkeypatch.setenv("MOM_KERNELS_DW", "grouped_mm")
    dt = GMM_DTYPE
    tol = 2e-5 if dt == torch.float32 else 5e-2
    T, K, E, D, F = 17, 2, 3, 16, 32
    hi = ffn_inputs(T, K, E, D, F, torch.float64, DEVICE, 0.25, seed=31, empty=(1,))
    dy = torch.randn(T, D, dtype=torch.float64, device=DEVICE)

    def grads(fn, inputs, dtype):
        leaves = [t.to(dtype).requires_grad_() if t.is_floating_point() else t for t in inputs]
        y = fn(*leaves)
        return torch.autograd.grad(y, [t for t in leaves if t.is_floating_point()], dy.to(dtype),
                                   allow_unused=True, materialize_grads=True)

    for a, b in zip(grads(mom_kernels.routed_ffn, hi, dt), grads(reference.routed_ffn, hi, torch.float64)):
        assert_close_verbose("routed_ffn grad", a, b, tol * max(1.0, float(b.abs().max())), tol)
    x, w, bias, ids, g, lw, lb = linear_inputs(T, K, E, D, 3 * D, torch.float64, DEVICE, 0.25, seed=32)
    dq = torch.randn(T, 3 * D, dtype=torch.float64, device=DEVICE)
    for weights, ln in ((None, (lw, lb)), (g, (None, None))):
        ins = [x, w, bias, weights, ln[0], ln[1]]

        def run(fn, dtype):
            leaves = [t.to(dtype).requires_grad_() if t is not None else None for t in ins]
            y = fn(leaves[0], leaves[1], leaves[2], ids, leaves[3], leaves[4], leaves[5])
            used = [t for t in leaves if t is not None]
            return torch.autograd.grad(y, used, dq.to(dtype), allow_unused=True, materialize_grads=True)

        for a, b in zip(run(mom_kernels.routed_linear, dt), run(reference.routed_linear, torch.float64)):
            assert_close_verbose("routed_linear grad", a, b, tol * max(1.0, float(b.abs().max())), tol)


@pytest.mark.parametrize("prologue", ["gather", "fused"])
def test_routed_ops_with_each_layernorm_prologue(prologue, monkeypatch):
    """MOM_KERNELS_LN: LN_m(x) gathered into a sorted buffer (default) or fused into the GEMM's prologue;
    the same forward and gradients either way (fp64, against the reference)."""
    monkeypatch.setenv("MOM_KERNELS_LN", prologue)
    T, K, E, D, F = 11, 2, 3, 20, 36
    hi = ffn_inputs(T, K, E, D, F, torch.float64, DEVICE, 0.25, seed=41, empty=(2,))
    dy = torch.randn(T, D, dtype=torch.float64, device=DEVICE)

    def run(fn):
        leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in hi]
        y = fn(*leaves)
        return (y, *torch.autograd.grad(y, [t for t in leaves if t.is_floating_point()], dy,
                                        allow_unused=True, materialize_grads=True))

    for a, b in zip(run(mom_kernels.routed_ffn), run(reference.routed_ffn)):
        assert_close_verbose(f"routed_ffn ({prologue})", a, b, 1e-10, 1e-10)
    x, w, bias, ids, _, lw, lb = linear_inputs(T, 1, E, D, 3 * D, torch.float64, DEVICE, 0.25, seed=42)
    y = mom_kernels.routed_linear(x, w, bias, ids, None, lw, lb)
    assert_close_verbose(f"routed_linear K=1 ({prologue})", y, reference.routed_linear(x, w, bias, ids, None, lw, lb),
                         1e-10, 1e-10)
    with pytest.raises(ValueError, match="MOM_KERNELS_LN must be"):
        monkeypatch.setenv("MOM_KERNELS_LN", "fast")
        mom_kernels.routed_linear(x, w, bias, ids, None, lw, lb)

"""GPU: where the grouped kernels lose against cuBLAS, one feature at a time.

    python -m benchmarks.probe_grouped       # bf16, T 8192, K 2, E 16, a 1280 -> 5120 projection

Weight gradients (`_grouped_dw_kernel`):
dW[m] = U_m^T dY_m over module m's rows (P = T*K picks, uniform routing). Variants of the Triton kernel switch
its features on one by one (rows gathered by token, the LayerNorm / GELU prologue on U, routing weights on dY)
and try tile configurations (MOM_KERNELS_DW_CONFIG) on the plain one; `torch._grouped_mm` on module-sorted,
already-transformed operands and one dense [n_in, P] x [P, n_out] product give the bars to compare with.
Forward / dX (`_grouped_gemm_kernel`, with --gemm): the same, for gather on load, the LayerNorm prologue, the
GELU epilogue, per-pick stores, a transposed W, and tile configurations (MOM_KERNELS_GEMM_CONFIG / _BLOCK_M).
Prints TFLOP/s (2 P n_in n_out FLOPs over the CUDA-event median of triton.testing.do_bench).
"""
from __future__ import annotations

import os

import torch

from mom.cli import ArgumentParser
from mom_kernels.gemm import grouped_gemm
from mom_kernels.weight_grads import grouped_dw
from mom_kernels.routing import make_plan
from mom_kernels.testing import make_ids

CONFIGS = ["BLOCK_R=128", "BLOCK_R=32", "num_warps=4", "num_stages=4", "num_stages=2",
           "BLOCK_K=64", "BLOCK_N=256", "BLOCK_R=128,num_stages=2"]


def main(argv=None):
    from triton.testing import do_bench

    p = ArgumentParser(prog="python -m benchmarks.probe_grouped", description=__doc__)
    p.add_argument("--tokens", type=int, default=8192, help="T, routed tokens (default 8192)")
    p.add_argument("--top-k", type=int, default=2, help="K, picks per token (default 2)")
    p.add_argument("--modules", type=int, default=16, help="E, modules (default 16)")
    p.add_argument("--n-in", type=int, default=1280, help="input features (default 1280)")
    p.add_argument("--n-out", type=int, default=5120, help="output features (default 5120)")
    p.add_argument("--gemm", action="store_true", help="also probe the forward / dX kernel")
    a = p.parse_args(argv)
    T, K, E, n_in, n_out = a.tokens, a.top_k, a.modules, a.n_in, a.n_out
    dev, dt = torch.device("cuda"), torch.bfloat16
    ids = make_ids(T, K, E, 0.0, device=dev)
    plan = make_plan(ids, E)
    P = T * K
    flops = 2 * P * n_in * n_out
    x_tok = torch.randn(T, n_in, device=dev, dtype=dt)
    x_sorted = torch.randn(P, n_in, device=dev, dtype=dt)
    dy_tok = torch.randn(T, n_out, device=dev, dtype=dt)
    dy_sorted = torch.randn(P, n_out, device=dev, dtype=dt)
    g = torch.rand(P, device=dev, dtype=dt)
    mean = torch.randn(T, device=dev)
    rstd = torch.rand(T, device=dev) + 0.5
    gamma = torch.randn(E, n_in, device=dev, dtype=dt)
    beta = torch.randn(E, n_in, device=dev, dtype=dt)
    dw = torch.empty(E, n_in, n_out, device=dev, dtype=dt)
    db = torch.empty(E, n_out, device=dev, dtype=dt)

    def report(label, fn):
        try:
            ms = do_bench(fn, warmup=10, rep=40)
            print(f"{label:<44} {ms * 1e3:8.1f} us {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)
        except Exception as e:  # a variant that does not run is a result too
            print(f"{label:<44} failed: {type(e).__name__}: {str(e)[:150]}", flush=True)

    print(f"dW probe: T {T}, K {K}, E {E}, {n_in} -> {n_out}, bf16, {torch.cuda.get_device_name()}")
    report("dense mm [n_in, P] x [P, n_out]", lambda: torch.mm(x_sorted.t(), dy_sorted))
    offs = plan.offsets[1:].to(torch.int32)
    if hasattr(torch, "_grouped_mm"):
        report("torch._grouped_mm (a.t() view)", lambda: torch._grouped_mm(x_sorted.t(), dy_sorted, offs=offs))
        try:
            ref = torch.stack([x_sorted[s:e].float().t() @ dy_sorted[s:e].float() for s, e in
                               zip(plan.offsets[:-1].tolist(), plan.offsets[1:].tolist())])
            got = torch._grouped_mm(x_sorted.t(), dy_sorted, offs=offs).float()
            print(f"  grouped_mm max rel err {float((got - ref).abs().max() / ref.abs().max()):.2e}")
        except Exception as e:
            print(f"  grouped_mm check failed: {type(e).__name__}: {str(e)[:150]}")
        w = torch.randn(E, n_in, n_out, device=dev, dtype=dt)
        report("forward bar: torch._grouped_mm [P, n_in] x [E, n_in, n_out]",
               lambda: torch._grouped_mm(x_sorted, w, offs=offs))
    else:
        print("torch._grouped_mm: not in this torch")
    variants = [
        ("triton plain (sorted U, sorted dY)", dict(a=x_sorted, dy=dy_sorted, a_gather=False, dy_gather=False)),
        ("triton + U gathered by token", dict(a=x_tok, dy=dy_sorted, a_gather=True, dy_gather=False)),
        ("triton + U gathered + LayerNorm (dW1, QKV)", dict(a=x_tok, dy=dy_sorted, a_gather=True, dy_gather=False,
                                                          a_mode=1)),
        ("triton + GELU on U (dW2)", dict(a=x_sorted, dy=dy_sorted, a_gather=False, dy_gather=False, a_mode=2)),
        ("triton + dY gathered by token", dict(a=x_sorted, dy=dy_tok, a_gather=False, dy_gather=True)),
        ("triton + routing weights on dY", dict(a=x_sorted, dy=dy_sorted, a_gather=False, dy_gather=False,
                                                weights=g)),
        ("triton, no db", dict(a=x_sorted, dy=dy_sorted, a_gather=False, dy_gather=False, db=None)),
    ]
    for label, kw in variants:
        kw = dict(kw)
        a_mode = kw.pop("a_mode", 0)
        dbb = kw.pop("db", db)
        report(label, lambda kw=kw, a_mode=a_mode, dbb=dbb: grouped_dw(
            kw["a"], kw["dy"], plan, dw=dw, db=dbb, a_gather=kw["a_gather"], a_mode=a_mode,
            ln=(mean, rstd, gamma, beta) if a_mode == 1 else None, dy_gather=kw["dy_gather"],
            weights=kw.get("weights")))
    for spec in CONFIGS:
        os.environ["MOM_KERNELS_DW_CONFIG"] = spec
        report(f"triton plain, {spec}", lambda: grouped_dw(x_sorted, dy_sorted, plan, dw=dw, db=db,
                                                           a_gather=False, a_mode=0, dy_gather=False))
    os.environ.pop("MOM_KERNELS_DW_CONFIG", None)
    if a.gemm:
        probe_gemm(report, plan, ids, x_tok, x_sorted, mean, rstd, gamma, beta, g, E, n_in, n_out)


GEMM_CONFIGS = [("num_stages=4", ""), ("BLOCK_N=256", ""), ("num_warps=4", ""), ("BLOCK_K=32,num_stages=4", ""),
                ("num_warps=4,num_stages=4", "64"), ("", "64")]


def probe_gemm(report, plan, ids, x_tok, x_sorted, mean, rstd, gamma, beta, g, E, n_in, n_out):
    dev, dt = x_tok.device, x_tok.dtype
    P = x_sorted.shape[0]
    w = torch.randn(E, n_in, n_out, device=dev, dtype=dt) * n_in ** -0.5
    wt = torch.randn(E, n_out, n_in, device=dev, dtype=dt) * n_in ** -0.5
    b = torch.randn(E, n_out, device=dev, dtype=dt)
    out = torch.empty(P, n_out, device=dev, dtype=dt)
    pre = torch.empty(P, n_out, device=dev, dtype=dt)
    buf = torch.empty(P, n_out, device=dev, dtype=torch.float32)
    ln = (mean, rstd, gamma, beta)
    print(f"\ngrouped GEMM probe: {n_in} -> {n_out}")
    report("dense mm [P, n_in] x [n_in, n_out]", lambda: torch.mm(x_sorted, w[0]))
    variants = [
        ("gemm plain (sorted A, sorted store)", dict(a=x_sorted, a_gather=False)),
        ("gemm + A gathered", dict(a=x_tok, a_gather=True)),
        ("gemm + A gathered + LayerNorm", dict(a=x_tok, a_gather=True, ln=ln)),
        ("gemm + LN + bias + GELU + save pre (FFN up)", dict(a=x_tok, a_gather=True, ln=ln, bias=b, gelu=True,
                                                             pre=pre, save_pre=True)),
        ("gemm + bias + weights, fp32 pick store (FFN down)", dict(a=x_sorted, a_gather=False, bias=b, weights=g,
                                                                   store="pick", out=buf)),
        ("gemm W transposed (dX)", dict(a=x_sorted, a_gather=False, w=wt, w_transposed=True)),
    ]
    for label, kw in variants:
        kw = dict(kw)
        a_, ww, o = kw.pop("a"), kw.pop("w", w), kw.pop("out", out)
        report(label, lambda a_=a_, ww=ww, o=o, kw=kw: grouped_gemm(a_, ww, plan, out=o, **kw))
    for spec, block_m in GEMM_CONFIGS:
        os.environ["MOM_KERNELS_GEMM_CONFIG"] = spec
        pl = make_plan(ids, E, block_m=int(block_m)) if block_m else plan
        report(f"gemm plain, {spec} BM {block_m or pl.block_m}",
               lambda pl=pl: grouped_gemm(x_sorted, w, pl, out=out, a_gather=False))
    os.environ.pop("MOM_KERNELS_GEMM_CONFIG", None)


if __name__ == "__main__":
    main()

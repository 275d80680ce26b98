"""routed_ffn throughput: the Triton kernels against a dense FFN of the same FLOPs, the per-module loop
and the "torch" path, forward and forward + backward, in TFLOP/s.

    python -m benchmarks.bench_routed_ffn --quick                 # CPU: loop vs torch path, small shapes
    python -m benchmarks.bench_routed_ffn --sweep check           # GPU: the subset benchmarks/gpu_check.sh runs
    python -m benchmarks.bench_routed_ffn --sweep full            # GPU: D 768/1024/1280 x E 4/8/16 x K 1/2/3 x
                                                                  #      T 4k..32k x uniform/skewed x SKIP 0/25%
    python -m benchmarks.bench_routed_ffn --family llama --quick  # the Llama family's FFN: RMSNorm, SwiGLU
    python -m benchmarks.bench_routed_ffn --family llama --sweep check   # GPU, at Qwen2.5-0.5B's D 896, F 4864

Implementations (same inputs, bf16 on a GPU):
  triton  mom_kernels.routed_ffn (gathered grouped GEMMs, no host sync)
  dense   one FFN (LayerNorm, W1, GELU, W2; Llama family: RMSNorm, W_gate | W_up, SwiGLU, W_down) over S rows,
          S = the number of non-SKIP picks: the same matrix FLOPs as the routed step, on cuBLAS
  loop    mom_kernels.reference.routed_ffn, the per-module loop of the authors' code
  torch   mom.routed.torch_routed_ffn (the lead's vectorised PyTorch path), when `mom` imports
FLOPs counted: forward 4*S*D*F (the two GEMMs; SwiGLU's three: 6*S*D*F), forward + backward 3x that. Times are medians of
triton.testing.do_bench (p20 / p80 kept) on CUDA, of a perf_counter loop on a CPU. Rows are appended
to benchmarks/out/routed_ffn.csv (--csv) with the device name, commit and date.
GPU targets: triton forward >= 85% of dense, forward + backward >= 75%, >= 3x the loop.
"""
import csv
import datetime
import itertools
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F_

from mom.cli import ArgumentParser

from .common import OUT, append_csv, commit, env_override, hardware

CSV_PATH = os.path.join(OUT, "routed_ffn.csv")


# --------------------------------------------------------------------------------------------- inputs
def make_routing(T, K, E, routing, skip, device, generator):
    """ids [T, K] (distinct modules per token, E = SKIP) and weights [T, K] (softmax over the picks).
    uniform: every module equally likely; skewed: module e has prior weight 1 / (e + 1)^1.2 (Zipf-like,
    module 0 gets ~3-5x its uniform share), so tiles are unbalanced across modules."""
    logits = torch.randn(T, E, generator=generator, device="cpu")
    if routing == "skewed":
        logits = logits + 3.0 * (-1.2 * torch.log(torch.arange(1, E + 1, dtype=torch.float32)))
    top = logits.topk(K, dim=1)
    ids = top.indices
    weights = torch.softmax(top.values, dim=1)
    if skip > 0:
        drop = torch.rand(T, K, generator=generator) < skip
        ids = torch.where(drop, torch.full_like(ids, E), ids)
    return ids.to(device), weights.to(device)


# the routed ops' norm and activation per block family (mom.config.MoMConfig.norm / .act)
FAMILY_OPS = {"gpt2": dict(norm="layer", act="gelu"), "llama": dict(norm="rms", act="swiglu")}


def make_params(E, D, F, dtype, device, generator, family="gpt2"):
    """(ln_weight, ln_bias, w1, b1, w2, b2) of E modules; the Llama family's: w1 [E, D, 2F] (gate | up), no
    ln_bias or biases (None)."""
    r = lambda *s, scale: (torch.randn(*s, generator=generator) * scale).to(device=device, dtype=dtype)
    lw = 1.0 + r(E, D, scale=0.1)
    if family == "llama":
        return lw, None, r(E, D, 2 * F, scale=D ** -0.5), None, r(E, F, D, scale=F ** -0.5), None
    lb = r(E, D, scale=0.1)
    w1, b1 = r(E, D, F, scale=D ** -0.5), r(E, F, scale=0.02)
    w2, b2 = r(E, F, D, scale=F ** -0.5), r(E, D, scale=0.02)
    return lw, lb, w1, b1, w2, b2


def dense_ffn(x, lw, lb, w1, b1, w2, b2):
    """One module's FFN over every row of x: GPT-2's (LayerNorm, GELU, biases), or without lb / biases the Llama
    family's (RMSNorm, SwiGLU of w1 = gate | up)."""
    if lb is None:
        u = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * lw
        gate, up = torch.mm(u, w1).chunk(2, dim=-1)
        return torch.mm(F_.silu(gate) * up, w2)
    u = F_.layer_norm(x, (x.shape[1],), lw, lb, 1e-5)
    return torch.addmm(b2, F_.gelu(torch.addmm(b1, u, w1), approximate="tanh"), w2)


# --------------------------------------------------------------------------------------------- timing
def bench(fn, device, quick=False):
    """(median, p20, p80) milliseconds."""
    if torch.device(device).type == "cuda":
        import triton.testing

        out = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                      quantiles=[0.5, 0.2, 0.8])
        return tuple(float(v) for v in out)
    fn()
    ts = []
    for _ in range(3 if quick else 7):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))]  # noqa: E731
    return statistics.median(ts), q(0.2), q(0.8)


def implementations(device, include_loop=True):
    impls = {}
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu or os.environ.get("TRITON_INTERPRET") == "1":
        import mom_kernels

        impls["triton"] = mom_kernels.routed_ffn
    impls["dense"] = None  # special-cased: one module over S rows
    if include_loop:
        from mom_kernels import reference

        impls["loop"] = reference.routed_ffn
    try:
        from mom.routed import torch_routed_ffn

        impls["torch"] = torch_routed_ffn
    except Exception as e:  # the lead's package may not be importable here
        print(f"(torch path unavailable: {type(e).__name__}: {e})", file=sys.stderr)
    return impls


def run_config(cfg, device, dtype, impls, quick=False, modes=("fwd", "fwd+bwd")):
    """Time every implementation on one configuration; returns CSV rows."""
    T, D, E, K, routing, skip = cfg["T"], cfg["D"], cfg["E"], cfg["K"], cfg["routing"], cfg["skip"]
    family = cfg.get("family", "gpt2")
    F = cfg.get("F") or 4 * D
    gen = torch.Generator().manual_seed(0)
    ids, g = make_routing(T, K, E, routing, skip, device, gen)
    g = g.to(dtype)
    params = make_params(E, D, F, dtype, device, gen, family)
    ops = FAMILY_OPS[family]
    x = torch.randn(T, D, generator=gen).to(device=device, dtype=dtype)
    S = int((ids < E).sum())  # host sync here is fine: setup, not the timed region
    flops_fwd = (6.0 if family == "llama" else 4.0) * S * D * F
    rows = []
    for name, fn in impls.items():
        for mode in modes:
            if name == "dense":
                xd = torch.randn(max(S, 1), D, generator=gen).to(device=device, dtype=dtype)
                one = [p[0].detach().clone() if p is not None else None for p in params]
                leaves = [xd] + [p for p in one if p is not None]
                call = lambda: dense_ffn(xd, *one)  # noqa: E731
            else:
                leaves = [x] + [p for p in params if p is not None] + [g]
                call = lambda: fn(x, *params, ids, g, **ops)  # noqa: E731
            if mode == "fwd":
                for t in leaves:
                    t.requires_grad_(False)
                step = lambda: call()  # noqa: E731
                with torch.no_grad():
                    ms = bench(step, device, quick)
            else:
                for t in leaves:
                    t.requires_grad_(True)
                dy = torch.randn(max(S, 1) if name == "dense" else T, D, device=device, dtype=dtype)

                def step():
                    for t in leaves:
                        t.grad = None
                    call().backward(dy)
                ms = bench(step, device, quick)
            flops = flops_fwd * (3 if mode == "fwd+bwd" else 1)
            rows.append(dict(impl=name, mode=mode, family=family, dtype=str(dtype).replace("torch.", ""), T=T, D=D, F=F, E=E,
                             K=K, routing=routing, skip=skip, rows=S, ms=round(ms[0], 4), ms_p20=round(ms[1], 4),
                             ms_p80=round(ms[2], 4), tflops=float(f"{flops / (ms[0] * 1e-3) / 1e12:.5g}")))
    by = {(r["impl"], r["mode"]): r for r in rows}
    for r in rows:
        d, lp = by.get(("dense", r["mode"])), by.get(("loop", r["mode"]))
        r["vs_dense"] = round(r["tflops"] / d["tflops"], 3) if d else ""
        r["speedup_vs_loop"] = round(lp["ms"] / r["ms"], 3) if lp else ""
    return rows


# --------------------------------------------------------------------------------------------- sweeps
def sweep(name, family="gpt2"):
    if family == "llama":  # Qwen2.5-0.5B's FFN (D 896, F 4864), and the CPU-sized point with its F / D
        base = dict(T=16384, D=896, F=4864, E=8, K=2, routing="uniform", skip=0.0, family="llama")
        if name == "quick":
            return [dict(base, T=1024, D=224, F=1216, E=4), dict(base, T=1024, D=224, F=1216, E=4, routing="skewed",
                                                                  skip=0.25)]
        if name == "check":
            return [base, dict(base, E=16), dict(base, K=1), dict(base, routing="skewed", skip=0.25)]
        return [dict(base, T=t, E=e, K=k) for t, e, k in itertools.product((4096, 16384), (4, 8, 16), (1, 2, 3))]
    base = dict(T=16384, D=1024, E=8, K=2, routing="uniform", skip=0.0)
    if name == "quick":  # CPU-sized
        return [dict(base, T=1024, D=256, E=4, K=2), dict(base, T=1024, D=256, E=4, K=2, routing="skewed", skip=0.25)]
    if name == "check":  # one axis at a time around the base point (what gpu_check.sh runs)
        cfgs = [base]
        cfgs += [dict(base, D=d) for d in (768, 1280)]
        cfgs += [dict(base, E=e) for e in (4, 16)]
        cfgs += [dict(base, K=k) for k in (1, 3)]
        cfgs += [dict(base, T=t) for t in (4096, 32768)]
        cfgs += [dict(base, routing="skewed"), dict(base, skip=0.25), dict(base, routing="skewed", skip=0.25)]
        return cfgs
    if name == "full":
        return [dict(T=t, D=d, E=e, K=k, routing=r, skip=s) for d, e, k, t, r, s in itertools.product(
            (768, 1024, 1280), (4, 8, 16), (1, 2, 3), (4096, 8192, 16384, 32768), ("uniform", "skewed"), (0.0, 0.25))]
    raise ValueError(name)


# tile configurations tried by --tiles (bf16 GEMM kernel; env overrides read by mom_kernels at launch)
TILE_CONFIGS = [
    ("128x128x64 w8 s3, 4 slices (default)", {}),
    ("  epilogue on the whole tile", {"MOM_KERNELS_GEMM_CONFIG": "EPI_SUBTILE=1"}),
    ("  epilogue on 2 slices", {"MOM_KERNELS_GEMM_CONFIG": "EPI_SUBTILE=2"}),
    ("  persistent, 2 programs/SM", {"MOM_KERNELS_PERSISTENT": "2"}),
    ("128x128x64 w8 s4", {"MOM_KERNELS_GEMM_CONFIG": "num_stages=4"}),
    ("128x256x64 w8 s3", {"MOM_KERNELS_GEMM_CONFIG": "BLOCK_N=256"}),
    ("64x128x64 w4 s4", {"MOM_KERNELS_BLOCK_M": "64", "MOM_KERNELS_GEMM_CONFIG": "num_warps=4,num_stages=4"}),
]


def tile_sweep(device, dtype, cfg=None):
    """Forward TFLOP/s (forward only, to keep compile time short) of the Triton routed FFN under each of
    TILE_CONFIGS at one configuration, against the dense FFN: the GEMM tiles compared in one run on a CUDA machine."""
    import mom_kernels

    cfg = cfg or sweep("check")[0]
    lines = []
    dense = run_config(cfg, device, dtype, {"dense": None}, quick=True, modes=("fwd",))
    d_fwd = next(r for r in dense if r["mode"] == "fwd")
    lines.append(f"tile sweep at {cfg}: dense fwd {d_fwd['tflops']:.1f} TFLOP/s")
    for label, env in TILE_CONFIGS:
        try:
            with env_override(env):
                r = run_config(cfg, device, dtype, {"triton": mom_kernels.routed_ffn}, quick=True, modes=("fwd",))[0]
            lines.append(f"  {label:<28} fwd {r['tflops']:7.1f} TFLOP/s ({100 * r['tflops'] / d_fwd['tflops']:.0f}% "
                         f"of dense)")
        except Exception as e:  # a config that does not fit is a result too
            lines.append(f"  {label:<28} failed: {type(e).__name__}: {str(e)[:100]}")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def summary(rows):
    """Short table: per configuration, triton TFLOP/s, % of dense and x the loop, fwd and fwd+bwd."""
    lines = [f"{'T':>6} {'D':>5} {'E':>3} {'K':>2} {'routing':<8} {'skip':>4} {'family':<6} | "
             f"{'fwd TF/s':>8} {'%dense':>6} {'xloop':>6} {'xtorch':>6} | "
             f"{'f+b TF/s':>8} {'%dense':>6} {'xloop':>6} {'xtorch':>6}"]
    key = lambda r: (r["T"], r["D"], r["E"], r["K"], r["routing"], r["skip"], r.get("family", "gpt2"))  # noqa: E731
    groups = {}
    for r in rows:
        groups.setdefault(key(r), {})[(r["impl"], r["mode"])] = r
    main = "triton" if any(r["impl"] == "triton" for r in rows) else "torch"
    for k, g in groups.items():
        cells = []
        for mode in ("fwd", "fwd+bwd"):
            r = g.get((main, mode))
            t = g.get(("torch", mode))
            if r is None:
                cells.append(f"{'-':>8} {'-':>6} {'-':>6} {'-':>6}")
                continue
            pct = f"{100 * r['vs_dense']:.0f}%" if r["vs_dense"] != "" else "-"
            xl = f"{r['speedup_vs_loop']:.2f}" if r["speedup_vs_loop"] != "" else "-"
            xt = f"{t['ms'] / r['ms']:.2f}" if t and main != "torch" else "-"
            tf = f"{r['tflops']:.1f}" if r["tflops"] >= 1 else f"{r['tflops']:.4f}"
            cells.append(f"{tf:>8} {pct:>6} {xl:>6} {xt:>6}")
        lines.append(f"{k[0]:>6} {k[1]:>5} {k[2]:>3} {k[3]:>2} {k[4]:<8} {k[5]:>4} {k[6]:<6} | {cells[0]} | {cells[1]}")
    return f"impl shown: {main}\n" + "\n".join(lines)


def summary_csv(path, commit=None):
    """The short table from a CSV of this benchmark (the rows of one commit; all rows if None)."""
    num = ("T", "D", "E", "K", "rows", "F")
    flt = ("skip", "ms", "ms_p20", "ms_p80", "tflops")
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            if commit and r.get("commit") != commit:
                continue
            for k in num:
                r[k] = int(r[k])
            for k in flt:
                r[k] = float(r[k])
            for k in ("vs_dense", "speedup_vs_loop"):
                r[k] = float(r[k]) if r[k] != "" else ""
            rows.append(r)
    return summary(rows) if rows else "(no rows)"


def main(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.bench_routed_ffn", description=__doc__)
    p.add_argument("--sweep", default=None, choices=["quick", "check", "full"],
                   help="quick: a few small shapes (the CPU default); check: one axis at a time around the base "
                        "point (GPU); full: the whole grid (GPU)")
    p.add_argument("--quick", action="store_true", help="= --sweep quick (the CPU default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    p.add_argument("--no-loop", action="store_true", help="skip the per-module loop (slow on big sweeps)")
    p.add_argument("--csv", default=CSV_PATH, help=f"append the rows to this CSV (default {CSV_PATH}; \"\" for none)")
    p.add_argument("--tiles", action="store_true", help="GPU: try the GEMM tile configurations (TILE_CONFIGS) "
                   "at the base point instead of a sweep")
    p.add_argument("--family", default="gpt2", choices=sorted(FAMILY_OPS),
                   help="the modules' block family: gpt2 (LayerNorm, GELU, biases) or llama (RMSNorm, SwiGLU, no biases)")
    a = p.parse_args(argv)
    name = "quick" if a.quick else (a.sweep or ("check" if a.device == "cuda" else "quick"))
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if a.device == "cuda" else torch.float32)
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    impls = implementations(a.device, include_loop=not a.no_loop)
    stamp = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 commit=commit(), device=hardware(), torch=torch.__version__)
    try:
        import triton

        stamp["triton"] = triton.__version__
    except ImportError:
        stamp["triton"] = ""
    print(f"{stamp['device']} | torch {stamp['torch']} triton {stamp['triton']} | commit {stamp['commit']} | "
          f"sweep {name} | {dtype} | impls {list(impls)}", flush=True)
    if a.tiles:
        print(tile_sweep(a.device, dtype))
        return 0
    all_rows = []
    for cfg in sweep(name, a.family):
        t0 = time.time()
        rows = [dict(stamp, **r) for r in run_config(cfg, a.device, dtype, impls, quick=name != "full")]
        append_csv(a.csv, rows)
        all_rows += rows
        brief = ", ".join(f"{r['impl']}/{r['mode']} {r['tflops']:.2f}" for r in rows)
        print(f"{cfg} ({time.time() - t0:.1f}s): TFLOP/s {brief}", flush=True)
    print()
    print(summary(all_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

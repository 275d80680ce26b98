"""GPU: where the time of one routed step goes, and which tile configurations make it faster.

    python -m benchmarks.profile_step --device cuda --dtype bfloat16 --n-embd 1280 --n-head 20 --modules 16 \
        --batch 8 --tokens 1024 [--tiles] [--out DIR]

1. Kernel timeline: one forward+backward of the dense equivalent, the "triton" step and the GRU routing alone
   (bench_step's candidates) under torch.profiler; every GPU kernel in launch order with its grid and time,
   then the sum of kernel time against the wall time (the gap is launch / host overhead).
2. --tiles: forward and forward+backward time of the "triton" step under each of TILE_CONFIGS (environment
   overrides that mom_kernels reads at launch: MOM_KERNELS_BLOCK_M, MOM_KERNELS_GEMM_CONFIG,
   MOM_KERNELS_DW_CONFIG), to pick the defaults of `gemm_config` / `dw_config` from one run on a CUDA machine.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import torch

from .bench_step import build, fwd, fwd_bwd, parser
from .common import env_override

# (label, environment); one knob changed at a time from the defaults
TILE_CONFIGS = [
    ("defaults", {}),
    ("gemm s4", {"MOM_KERNELS_GEMM_CONFIG": "num_stages=4"}),
    ("gemm BN256", {"MOM_KERNELS_GEMM_CONFIG": "BLOCK_N=256"}),
    ("gemm BM64 w4 s4", {"MOM_KERNELS_BLOCK_M": "64", "MOM_KERNELS_GEMM_CONFIG": "num_warps=4,num_stages=4"}),
    ("gemm BK32 s4", {"MOM_KERNELS_GEMM_CONFIG": "BLOCK_K=32,num_stages=4"}),
    ("dw BR32 s4", {"MOM_KERNELS_DW_CONFIG": "BLOCK_R=32,num_stages=4"}),
    ("dw BR128 s3", {"MOM_KERNELS_DW_CONFIG": "BLOCK_R=128,num_stages=3"}),
    ("dw BN256", {"MOM_KERNELS_DW_CONFIG": "BLOCK_N=256"}),
    ("dw BK64 w4", {"MOM_KERNELS_DW_CONFIG": "BLOCK_K=64,num_warps=4"}),
    ("dw s4", {"MOM_KERNELS_DW_CONFIG": "num_stages=4"}),
]


def kernel_timeline(fn, label, out_dir):
    """Profile one call of fn (already warm); print each GPU kernel in order and the totals."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    path = os.path.join(out_dir or tempfile.gettempdir(), f"trace_{label}.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    total = sum(e["dur"] for e in kernels)
    print(f"\n-- {label}: {len(kernels)} kernels, {total / 1e3:.2f} ms of kernel time in {wall * 1e3:.2f} ms wall")
    print(f"{'#':>3} {'us':>8} {'grid':>16} {'regs':>4} {'smem':>6}  kernel")
    for i, e in enumerate(kernels):
        a = e.get("args", {})
        grid = "x".join(str(v) for v in a.get("grid", []))
        print(f"{i:>3} {e['dur']:>8.1f} {grid:>16} {a.get('registers per thread', ''):>4} "
              f"{a.get('shared memory', ''):>6}  {e['name'][:90]}")
    if out_dir is None:
        os.remove(path)
    return total, wall


def median_ms(fn, repeats=7):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def tile_sweep(s):
    print("\n-- tile configurations, triton step (median ms)")
    print(f"{'config':<20} {'fwd':>8} {'fwd+bwd':>8}")
    step = s.cands["triton"]
    for label, env in TILE_CONFIGS:
        try:
            with env_override(env):
                f, b = median_ms(fwd(s, step)), median_ms(fwd_bwd(s, step))
            print(f"{label:<20} {f:>8.2f} {b:>8.2f}", flush=True)
        except Exception as e:  # a config that does not fit is a result too
            print(f"{label:<20} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)


def main(argv=None):
    p = parser("python -m benchmarks.profile_step", __doc__)
    p.add_argument("--tiles", action="store_true", help="also time TILE_CONFIGS")
    p.add_argument("--out", default=None, help="folder for the chrome traces (default: not kept)")
    a = p.parse_args(argv)
    a.no_loop = True
    if torch.device(a.device).type != "cuda":
        raise SystemExit("profile_step needs --device cuda")
    s = build(a)
    print(f"routed step D {s.D}, E {s.E}, K {s.K}, B {s.B} x T {s.T}, {a.dtype}, {torch.cuda.get_device_name()}")
    for name in ("dense", "triton", "routers"):
        run = fwd_bwd(s, s.cands[name])
        run()
        run()
        kernel_timeline(run, f"{name}_fwd_bwd", a.out)
    if a.tiles:
        tile_sweep(s)


if __name__ == "__main__":
    main()

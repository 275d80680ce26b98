"""The routed step and the routed FFN kernel, timed by pytest-benchmark (see benchmarks/conftest.py).

One test per (case, implementation); `benchmark.group` is the implementation's kind (routed / dense / loop)
and the case a parameter, so `--benchmark-group-by param:case` puts the three side by side. Sizes: the
benchmark scripts' CPU defaults (bench_step: D 768, E 8, K 2, T 2048; bench_routed_ffn quick: T 1024, D 256,
E 4, K 2), the GPU points on CUDA; small ones when run as smoke tests.
"""
from __future__ import annotations

import pytest
import torch

from . import bench_routed_ffn, bench_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KIND = {"torch": "routed", "triton": "routed", "dense": "dense", "reference": "loop", "loop": "loop"}
STEP_IMPLS = ["dense", "torch", "reference"] + (["triton"] if DEVICE == "cuda" else [])
FFN_IMPLS = ["dense", "torch", "loop"] + (["triton"] if DEVICE == "cuda" else [])


def _step_args(quick: bool, family: str = "gpt2"):
    if quick:
        argv = ["--n-embd", "64", "--n-head", "4", "--modules", "4", "--tokens", "64"]
        argv += ["--family", "llama", "--kv-heads", "2", "--n-inner", "96"] if family == "llama" else []
    elif DEVICE == "cuda":
        argv = ["--n-embd", "1280", "--n-head", "20", "--modules", "16", "--batch", "8", "--tokens", "1024",
                "--dtype", "bfloat16"]
    else:
        argv = []
    return bench_step.parser().parse_args(argv + ["--device", DEVICE])


_STEPS = {}


def _step(quick: bool, family: str = "gpt2"):
    if (quick, family) not in _STEPS:  # one build per size for every test of the module
        _STEPS[quick, family] = bench_step.build(_step_args(quick, family))
    return _STEPS[quick, family]


@pytest.mark.parametrize("impl", STEP_IMPLS)
@pytest.mark.parametrize("case", ["step forward", "step forward+backward"])
def test_step(benchmark, quick, case, impl):
    s = _step(quick)
    run = (bench_step.fwd if case == "step forward" else bench_step.fwd_bwd)(s, s.cands[impl])
    benchmark.group = KIND[impl]
    benchmark.extra_info.update(impl=impl, D=s.D, E=s.E, K=s.K, B=s.B, T=s.T, dtype=str(s.dtype))
    benchmark(run)


@pytest.mark.parametrize("impl", FFN_IMPLS)
@pytest.mark.parametrize("case", ["routed_ffn forward", "routed_ffn forward+backward"])
def test_routed_ffn(benchmark, quick, case, impl):
    T, D, E, K = (64, 32, 4, 2) if quick else ((16384, 1024, 8, 2) if DEVICE == "cuda" else (1024, 256, 4, 2))
    dtype = torch.bfloat16 if DEVICE == "cuda" and not quick else torch.float32
    gen = torch.Generator().manual_seed(0)
    ids, g = bench_routed_ffn.make_routing(T, K, E, "uniform", 0.0, DEVICE, gen)
    params = bench_routed_ffn.make_params(E, D, 4 * D, dtype, DEVICE, gen)
    x = torch.randn(T, D, generator=gen).to(DEVICE, dtype)
    g = g.to(dtype)
    if impl == "dense":  # one module over the S = T * K picked rows: the same matrix FLOPs
        leaves = [torch.randn(T * K, D, generator=gen).to(DEVICE, dtype)] + [p[0].clone() for p in params]
        call = lambda: bench_routed_ffn.dense_ffn(*leaves)  # noqa: E731
    else:
        fn = bench_routed_ffn.implementations(DEVICE)[impl]
        leaves = [x, *params, g]
        call = lambda: fn(x, *params, ids, g)  # noqa: E731
    backward = case.endswith("backward")
    for t in leaves:
        t.requires_grad_(backward)
    dy = torch.randn(leaves[0].shape[0], D, device=DEVICE, dtype=dtype)

    def run():
        if backward:
            for t in leaves:
                t.grad = None
            call().backward(dy)
        else:
            with torch.no_grad():
                call()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = KIND[impl]
    benchmark.extra_info.update(impl=impl, T=T, D=D, E=E, K=K, dtype=str(dtype))
    benchmark(run)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dense_equivalent_does_the_routed_steps_matrix_flops(family):
    """bench_step's dense block (K-times-wider projections, of the step's family) counts the FLOPs of a routed
    step whose K picks are all modules (the attention core once, the routers aside): mom.flops' model of both."""
    from mom import flops

    s = _step(True, family)
    with torch.no_grad(), flops.flop_counter() as fc:  # (FlopCounterMode, counting the CPU SDPA kernel too)
        s.cands["dense"](s.x)
    cfg = s.cfg
    N = s.B * s.T
    want = N * s.K * (flops._attn_proj(cfg) + flops._ffn(cfg)) + flops._core_full(s.B, s.T, s.T, cfg.n_embd)
    assert fc.get_total_flops() == pytest.approx(want, rel=0.01)


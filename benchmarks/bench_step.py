"""One routed step against a dense GPT-2 block doing the same FLOPs, and against the per-module loop.

    python -m benchmarks.bench_step                 # CPU: D 768, E 8, K 2, T 2048 (GPT-2-small width)
    python -m benchmarks.bench_step --quick         # T 512, fewer repeats
    python -m benchmarks.bench_step --device cuda --dtype bfloat16 --n-embd 1280 --n-head 20 --modules 16 \
        --batch 8 --tokens 1024 --graph            # the GPU point, also replayed from CUDA graphs
    python -m benchmarks.bench_step --family llama --n-embd 896 --n-head 14 --kv-heads 2 --n-inner 4864
                                                   # a Llama-family step at Qwen2.5-0.5B's shape

The routed step is an `MoMLayer` with one step (depth 1, no anchor, no SKIP; by default uniform routing from
fixed random logits) run by the "torch" backend (and "triton" on CUDA) and by the "reference" loop (the
authors' style: one gather / matmul / index_add per module). The dense equivalent does the same matrix FLOPs
as a step whose K picks are all real modules: a block of the step's family (GPT-2's, or the Llama family's:
RMSNorm, rotary positions, grouped-query attention, SwiGLU) whose c_attn, c_proj and FFN are K times wider (the K
partial QKVs summed, so attention runs once on [T, D] like the routed step). Ratios are of medians
measured round-robin in one run. On CUDA it also records the activations each candidate's forward leaves
for the backward, and the peak of forward+backward. Targets: on a CPU, the "torch" step costs <= 1.1x the
dense equivalent and no more than the loop; on a GPU, the "triton" step forward+backward >= 5x faster than
the loop, saved activations <= the dense block's, GRU routing <= 5% of a step.
"""
from __future__ import annotations

import argparse
import os
from types import SimpleNamespace

import torch
import torch.nn as nn

from mom import MoMConfig, MoMLayer
from mom.blocks import Rotary, causal_attention, ffn_act, make_norm, merge_heads, qkv_heads
from mom.cli import ArgumentParser
from mom.routers import make_router
from mom_kernels.launches import count_launches

from .common import OUT, append_csv, stamp, time_interleaved


class UniformRouter(nn.Module):
    """Fixed random logits per token: picks spread uniformly over the slots, whatever x is."""

    def __init__(self, n_tokens, n_slots, device, dtype):
        super().__init__()
        self.register_buffer("logits", 4.0 * torch.randn(n_tokens, n_slots, device=device, dtype=dtype))

    def forward(self, x, state=None, gru_router=None):
        return self.logits, None


class DenseEquivalent(nn.Module):
    """A block of cfg's family with K-times-wider projections: the matrix FLOPs of a routed step with K real
    picks (and its norms, rotary positions, grouped-query attention and activation)."""

    def __init__(self, cfg: MoMConfig, K: int):
        super().__init__()
        D, W, F1, F_, bias = cfg.n_embd, cfg.qkv_dim, cfg.ffn_in_dim, cfg.ffn_dim, cfg.family == "gpt2"
        self.cfg, self.K = cfg, K
        self.ln_1, self.ln_2 = make_norm(cfg), make_norm(cfg)
        self.c_attn = nn.Linear(D, W * K, bias=cfg.qkv_bias)  # K QKV projections in one GEMM
        self.c_proj = nn.Linear(D * K, D, bias=bias)          # K output projections in one GEMM
        self.c_fc = nn.Linear(D, F1 * K, bias=bias)           # K FFN up (or gate | up) projections
        self.c_fc_proj = nn.Linear(F_ * K, D, bias=bias)
        self.rotary = Rotary(cfg) if cfg.family == "llama" else None

    def forward(self, x):  # [B, T, D]
        B, T, D = x.shape
        cfg = self.cfg
        qkv = self.c_attn(self.ln_1(x)).view(B, T, self.K, cfg.qkv_dim).sum(2)      # [B, T, W]
        rope = self.rotary(torch.arange(T, device=x.device), x.dtype) if self.rotary is not None else None
        o, _ = causal_attention(*qkv_heads(qkv, cfg.n_head, cfg.kv_heads, rope))
        o = merge_heads(o)                                                          # [B, T, D]
        x = x + self.c_proj(o.repeat(1, 1, self.K))
        h = ffn_act(self.c_fc(self.ln_2(x)).view(B, T, self.K, cfg.ffn_in_dim), cfg.act)  # [B, T, K, F]
        return x + self.c_fc_proj(h.reshape(B, T, self.K * cfg.ffn_dim))


def build(a) -> SimpleNamespace:
    """The step's candidates from parsed arguments: {"dense", "torch", ["triton"], ["reference"], "routers"}
    callables [B, T, D] -> [B, T, D], with the input, the cotangent and every parameter."""
    torch.manual_seed(0)
    dtype, dev = getattr(torch, a.dtype), torch.device(a.device)
    D, K, E, T, B = a.n_embd, a.top_k, a.modules, a.tokens, a.batch
    N = B * T
    cfg = MoMConfig(vocab_size=256, n_positions=max(1024, T), n_embd=D, n_head=a.n_head, n_bottom=0, chunks=1,
                    n_attn=E, n_ffn=E, depth=1, top_k=K, anchor=False, skip=False,
                    router="mlp" if a.router == "uniform" else a.router, backend="torch", family=a.family,
                    num_key_value_heads=a.kv_heads, n_inner=a.n_inner, routing=a.routing, capacity=a.capacity)
    with dev:  # built on the device: no CPU init of GPT-2-large-sized pools
        layer = MoMLayer(cfg).to(dtype)
        dense = DenseEquivalent(cfg, K).to(dtype)
    if a.router == "uniform":
        layer.attn_router = UniformRouter(N, cfg.attn_slots, dev, dtype)
        layer.ffn_router = UniformRouter(N, cfg.ffn_slots, dev, dtype)
    x = torch.randn(B, T, D, device=dev, dtype=dtype)
    g = torch.randn(B, T, D, device=dev, dtype=dtype)
    loads = torch.bincount(layer(x).routing[0].ffn_ids.flatten(), minlength=E + 1)[:E]

    backends = ["torch", "reference"] + (["triton"] if dev.type == "cuda" else [])
    step = {b: (lambda xx, b=b: layer.forward(xx, ops=_ops(b, dev)).hidden_states) for b in backends}
    cands = {"dense": dense, "torch": step["torch"]}
    if "triton" in step:
        cands["triton"] = step["triton"]
    if not a.no_loop:
        cands["reference"] = step["reference"]
    extra = []
    if a.routing == "expert_choice":  # token choice beside it, in the same run: the same pools, K and routers
        tc_cfg = cfg.replace(routing="token_choice", capacity=None)
        with dev:
            tc = MoMLayer(tc_cfg).to(dtype)
        if a.router == "uniform":
            tc.attn_router = UniformRouter(N, tc_cfg.attn_slots, dev, dtype)
            tc.ffn_router = UniformRouter(N, tc_cfg.ffn_slots, dev, dtype)
        for b in [b for b in ("torch", "triton") if b in step]:
            cands[f"{b} token choice"] = lambda xx, b=b: tc.forward(xx, ops=_ops(b, dev)).hidden_states
        extra = list(tc.parameters())
    # The routing of a step alone: the paper's GRU routers (attention + FFN) and top-K (target: <= 5% of a
    # step). Its output is x plus the picks' weights, so forward+backward runs through the routers.
    gru_cfg = cfg.replace(router="gru")
    routers = nn.ModuleList([make_router(gru_cfg, gru_cfg.attn_slots), make_router(gru_cfg, gru_cfg.ffn_slots)])
    routers.to(dev, dtype)

    fast = _ops("triton" if dev.type == "cuda" else "torch", dev)  # the fastest backend's router path

    def routing_only(xx):
        xf = xx.reshape(N, D)
        wsum = sum(fast.route(r(xf, None, fast.gru_router)[0], E, gru_cfg, seq_len=T)[0].weights.sum(-1)
                   for r in routers)
        return xx + wsum.view(B, T, 1)                                                   # [B, T, D]

    cands["routers"] = routing_only
    params = list(layer.parameters()) + list(dense.parameters()) + list(routers.parameters()) + extra
    return SimpleNamespace(cfg=cfg, dev=dev, dtype=dtype, D=D, K=K, E=E, T=T, B=B, N=N, x=x, g=g, loads=loads,
                           cands=cands, params=params)


def fwd(s, fn):
    """A no_grad forward of candidate fn on the step's input."""
    def run():
        with torch.no_grad():
            fn(s.x)
    return run


def host_and_launches(s, run, repeats: int) -> dict:
    """Launches of one call of `run` (Triton kernels + aten ops that are GPU kernels; mom_kernels.launches) and,
    on CUDA, the median host time to enqueue it (no sync inside: the time Python and the launches take before
    the GPU has the work)."""
    with count_launches() as c:
        run()
    out = {"launches": c.total, "syncs": len(c.syncs)}
    if s.dev.type == "cuda":
        import statistics
        import time

        ts = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            ts.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        out["host_s"] = statistics.median(ts)
    return out


def fwd_bwd(s, fn):
    """Forward + backward of candidate fn (a random cotangent), parameter gradients dropped after."""
    def run():
        xx = s.x.detach().requires_grad_()
        (fn(xx) * s.g).sum().backward()
        for q in s.params:
            q.grad = None
    return run


def graphed_time(s, fn, backward: bool, repeats: int) -> dict:
    """Median / p20 / p80 seconds of fn's forward (and backward) replayed from a CUDA graph captured once on
    the step's static input: the GPU time without Python and launch overhead. Parameter gradients accumulate
    into the .grad tensors the capture allocated (do not reset them to None afterwards)."""
    xx = s.x.detach().clone().requires_grad_(backward)

    def body():
        if backward:
            (fn(xx) * s.g).sum().backward()
        else:
            with torch.no_grad():
                fn(xx)

    for q in s.params:
        q.grad = None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (compiles, allocates)
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return time_interleaved({"g": graph.replay}, repeats, s.dev)["g"]


def parser(prog: str = "python -m benchmarks.bench_step", description: str = __doc__) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("--family", default="gpt2", choices=["gpt2", "llama"],
                   help="the block family: gpt2 (LayerNorm, GELU, biases) or llama (RMSNorm, SwiGLU, rotary)")
    p.add_argument("--n-embd", type=int, default=768, help="D, the model width (default 768)")
    p.add_argument("--n-head", type=int, default=12, help="attention heads (default 12)")
    p.add_argument("--kv-heads", type=int, default=None, help="K/V heads (grouped-query attention; default n_head)")
    p.add_argument("--n-inner", type=int, default=None, help="FFN width F (default 4 x n_embd)")
    p.add_argument("--routing", default="token_choice", choices=["token_choice", "expert_choice"],
                   help="token choice (each token picks top-K) or capacity routing (each module takes a share of the "
                        "tokens: K / E by default, the same FLOPs; the run then times token choice beside it)")
    p.add_argument("--capacity", type=float, default=None, help="expert choice: the share of tokens a module takes")
    p.add_argument("--modules", type=int, default=8, help="E, modules per pool")
    p.add_argument("--top-k", type=int, default=2, help="K, picks per token (token choice; default 2)")
    p.add_argument("--tokens", type=int, default=2048, help="T, tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="B, sequences (N = B * T tokens are routed)")
    p.add_argument("--router", default="uniform", choices=["uniform", "mlp", "gru"],
                   help="uniform: fixed random logits (uniform load); mlp / gru: the real routers at init")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case; the median is reported (default 5)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", help="torch dtype name: float32, bfloat16, float16, float64 (default float32)")
    p.add_argument("--quick", action="store_true", help="T 512, 3 repeats")
    p.add_argument("--no-loop", action="store_true", help="leave out the reference loop")
    p.add_argument("--graph", action="store_true",
                   help="CUDA: also time dense, triton and the routers replayed from a CUDA graph (no host overhead)")
    p.add_argument("--csv", default=os.path.join(OUT, "bench_step.csv"),
                   help="append the rows to this CSV (default benchmarks/out/bench_step.csv; \"\" for none)")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    if a.quick:
        a.tokens, a.repeats = 512, 3
    s = build(a)
    dev, x, g, cands, params = s.dev, s.x, s.g, s.cands, s.params
    D, K, E, T, B, loads = s.D, s.K, s.E, s.T, s.B, s.loads
    res_f = time_interleaved({k: fwd(s, f) for k, f in cands.items()}, a.repeats, dev, desc="forward")
    res_b = time_interleaved({k: fwd_bwd(s, f) for k, f in cands.items()}, a.repeats, dev, desc="forward+backward")
    host = {("forward", k): host_and_launches(s, fwd(s, f), a.repeats) for k, f in cands.items()}
    host.update({("forward+backward", k): host_and_launches(s, fwd_bwd(s, f), a.repeats) for k, f in cands.items()})

    # CUDA memory beyond what is already allocated (parameters, x, g):
    #   act:  what the forward leaves allocated for the backward (saved activations + the output): the
    #         activation memory per step
    #   peak: the peak of forward+backward (activations, temporaries, parameter gradients)
    peak, act = {}, {}
    if dev.type == "cuda":
        for name, f in cands.items():
            for q in params:
                q.grad = None
            xx = x.detach().requires_grad_()
            torch.cuda.synchronize()
            base_mem = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            y = f(xx)
            torch.cuda.synchronize()
            act[name] = torch.cuda.memory_allocated() - base_mem
            (y * g).sum().backward()
            del y
            torch.cuda.synchronize()
            peak[name] = torch.cuda.max_memory_allocated() - base_mem
            for q in params:
                q.grad = None

    if a.graph and dev.type == "cuda":  # last: the captured backward owns the parameters' .grad tensors
        for name in ("dense", "triton", "routers"):
            try:
                res_f[f"{name}+graph"] = graphed_time(s, cands[name], False, a.repeats)
                res_b[f"{name}+graph"] = graphed_time(s, cands[name], True, a.repeats)
            except Exception as e:  # a step that cannot be captured is a result too
                print(f"{name}: CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]}")
    st = stamp()
    rows, lines = [], []
    for mode, res in (("forward", res_f), ("forward+backward", res_b)):
        base = res["dense"]["median"]
        for name, r in res.items():
            hl = host.get((mode, name), {})
            rows.append({**st, "bench": "routed_step", "family": a.family, "routing": a.routing, "mode": mode,
                         "impl": name, "D": D,
                         "F": s.cfg.ffn_dim, "kv_heads": s.cfg.kv_heads, "E": E, "K": K, "B": B, "T": T,
                         "router": a.router, "dtype": a.dtype, "median_s": f"{r['median']:.5f}",
                         "p20_s": f"{r['p20']:.5f}", "p80_s": f"{r['p80']:.5f}",
                         "ratio_to_dense": f"{r['median'] / base:.3f}",
                         "vs_reference": (f"{res['reference']['median'] / r['median']:.2f}" if "reference" in res
                                          else ""),
                         "act_mb": f"{act[name] / 2**20:.0f}" if name in act and mode != "forward" else "",
                         "peak_mb": f"{peak[name] / 2**20:.0f}" if name in peak and mode != "forward" else "",
                         "launches": hl.get("launches", ""), "host_syncs": hl.get("syncs", ""),
                         "host_enqueue_s": f"{hl['host_s']:.5f}" if "host_s" in hl else ""})
            lines.append(f"| {mode} | {name} | {r['median'] * 1e3:.2f} | {r['p20'] * 1e3:.2f}-{r['p80'] * 1e3:.2f} "
                         f"| {r['median'] / base:.2f}x | {rows[-1]['vs_reference'] or '-'} | {rows[-1]['act_mb'] or '-'} "
                         f"| {rows[-1]['peak_mb'] or '-'} | {hl.get('launches', '-')} "
                         f"| {hl['host_s'] * 1e3:.2f} |" if "host_s" in hl else
                         f"| {mode} | {name} | {r['median'] * 1e3:.2f} | {r['p20'] * 1e3:.2f}-{r['p80'] * 1e3:.2f} "
                         f"| {r['median'] / base:.2f}x | {rows[-1]['vs_reference'] or '-'} | {rows[-1]['act_mb'] or '-'} "
                         f"| {rows[-1]['peak_mb'] or '-'} | {hl.get('launches', '-')} | - |")
    append_csv(a.csv, rows)
    print(f"routed step ({a.family}, {a.routing}), D {D}, F {s.cfg.ffn_dim}, heads {s.cfg.n_head} / K/V "
          f"{s.cfg.kv_heads}, E {E}, "
          f"K {K}, B {B} x T {T}, router {a.router}, {a.dtype}, {st['hardware']}, commit {st['commit']}, {st['date']}")
    print(f"FFN rows per module (routing load): {loads.tolist()}")
    print("| mode | impl | median ms | p20-p80 ms | vs dense | loop / impl | saved act. MiB | peak MiB | launches "
          "| host enqueue ms |\n|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    for mode, res in (("forward", res_f), ("forward+backward", res_b)):
        fast = "triton" if "triton" in res else "torch"
        print(f"GRU routing share of a {fast} step, {mode}: "
              f"{res['routers']['median'] / res[fast]['median']:.1%}"
              + (f" (replayed from CUDA graphs: {res['routers+graph']['median'] / res['triton+graph']['median']:.1%})"
                 if "routers+graph" in res and "triton+graph" in res else ""))
    from mom_kernels import autotune
    for r in autotune.table():  # MOM_KERNELS_AUTOTUNE=1: what the warm-up timed and kept, per GEMM
        print(f"autotune {r['key'][0]} {r['key'][4:]}: {r['choice']} ({r['ms']})")
    return rows


def _ops(backend, device):
    from mom.routed import get_ops
    return get_ops(backend, device)


if __name__ == "__main__":
    main()

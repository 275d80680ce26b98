"""Whole-model throughput: MoM presets against GPT-2 per FLOP, and against the per-module loop.

    python -m benchmarks.bench_model                       # CPU: mom-small vs gpt2, batch 1 x 256, fp32
    python -m benchmarks.bench_model --quick               # CPU: tiny presets (seconds)
    python -m benchmarks.bench_model --device cuda --dtype bfloat16 --batch 8 --seq-len 1024 \
        --pairs mom-large-efficient:gpt2-large mom-large-deep:gpt2-large

For each (MoM preset, GPT-2) pair, forward and forward+backward of a [batch, seq_len] batch: tokens/s,
achieved TFLOP/s (FLOPs from `mom.flops.count`, i.e. with the picks the routers made; SKIP is free), and the
MoM's throughput per FLOP relative to GPT-2 (1.0 = a MoM FLOP costs what a dense FLOP costs). The MoM runs
with `--backend` (default "auto": Triton on CUDA, "torch" on the CPU) and with the "reference" per-module
loop (the authors' style). On CUDA the peak allocated memory of forward+backward is recorded too, and with
--graph both models also run replayed from CUDA graphs (`mom.cuda_graphs.GraphedTrainStep` for training, a
captured no-grad forward for inference): the GPU time without Python and launch overhead.
Medians of round-robin repeats; rows appended to benchmarks/out/bench_model.csv (--csv) with hardware, commit,
date. GPU targets: per-FLOP throughput within 15% of GPT-2, forward+backward >= 5x the loop.
"""
from __future__ import annotations

import os

import torch

from mom import MoMConfig, MoMForCausalLM
from mom.cli import ArgumentParser
from mom.flops import count
from mom.routed import get_ops

from .common import OUT, append_csv, stamp, time_interleaved


def _runner(model, ids, backward: bool, device):
    def run():
        if backward:
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()
        else:
            with torch.no_grad():
                model(ids)
    return run


def _graphed_runner(model, ids, backward: bool):
    """The same step captured once in a CUDA graph and replayed (see mom/cuda_graphs.py)."""
    if backward:
        from mom.cuda_graphs import GraphedTrainStep

        step = GraphedTrainStep(model, ids)
        return lambda: step(ids)
    static = ids.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            model(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        model(static)
    return graph.replay


def _peak_bytes(fn, device) -> int:
    if torch.device(device).type != "cuda":
        return -1
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def bench_pair(mom_name, base_name, a, overrides):
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    torch.manual_seed(0)
    mom_cfg = MoMConfig.from_name(mom_name, backend=a.backend, **overrides)
    base_cfg = MoMConfig.from_name(base_name, **overrides)
    with dev:  # built on the device: no CPU init of GPT-2-large-sized models
        mom = MoMForCausalLM(mom_cfg).to(dtype)
        base = MoMForCausalLM(base_cfg).to(dtype)
    ids = torch.randint(0, mom_cfg.vocab_size, (a.batch, a.seq_len), device=dev)
    flops = {"mom": int(count(mom, ids)), "gpt2": int(count(base, ids))}
    flops["loop"] = flops["mom"]
    loop = None
    if not a.no_loop:
        with dev:
            loop = MoMForCausalLM(mom_cfg.replace(backend="reference")).to(dtype)
        loop.load_state_dict(mom.state_dict())
    rows = []
    for backward in (False, True):
        fns = {"gpt2": _runner(base, ids, backward, dev), "mom": _runner(mom, ids, backward, dev)}
        if loop is not None:
            fns["loop"] = _runner(loop, ids, backward, dev)
        if a.graph and dev.type == "cuda":
            for k, model in (("gpt2+graph", base), ("mom+graph", mom)):
                try:
                    fns[k] = _graphed_runner(model, ids, backward)
                except Exception as e:  # a model that cannot be captured is a result too
                    print(f"{k}: CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]}")
        res = time_interleaved(fns, a.repeats, dev)
        mode = "forward+backward" if backward else "forward"
        mult = 3 if backward else 1  # backward ~ 2x forward FLOPs
        tflops = {k: mult * flops[k.split("+")[0]] / r["median"] / 1e12 for k, r in res.items()}
        impl = {"mom": get_ops(mom_cfg.backend, dev).name, "loop": "reference", "gpt2": "dense"}
        for k, r in res.items():
            kind = k.split("+")[0]
            ref = "gpt2+graph" if k.endswith("+graph") else "gpt2"  # per FLOP against GPT-2 in the same mode
            rows.append({"bench": "model", "mode": mode, "model": mom_name if kind != "gpt2" else base_name,
                         "impl": impl[kind] + (" graphed" if k.endswith("+graph") else ""),
                         "batch": a.batch, "seq_len": a.seq_len, "dtype": a.dtype,
                         "fwd_gflop": f"{flops[kind] / 1e9:.2f}", "median_s": f"{r['median']:.4f}",
                         "tokens_per_s": f"{a.batch * a.seq_len / r['median']:.1f}",
                         "tflops": f"{tflops[k]:.3f}", "per_flop_vs_gpt2": f"{tflops[k] / tflops[ref]:.3f}",
                         "speedup_vs_loop": (f"{res['loop']['median'] / r['median']:.2f}" if "loop" in res else ""),
                         "peak_mem_mb": (f"{_peak_bytes(fns[k], dev) / 2**20:.0f}" if backward and dev.type == "cuda"
                                         and "+" not in k else "")})
    return rows


def main(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.bench_model", description=__doc__)
    p.add_argument("--pairs", nargs="+", default=["mom-small:gpt2"], help="MOM_PRESET:GPT2_PRESET ...")
    p.add_argument("--batch", type=int, default=1, help="sequences per forward (default 1)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", help="torch dtype name: float32, bfloat16, float16 (default float32)")
    p.add_argument("--backend", default="auto", help="the MoM's routed-op backend: auto, torch, triton, reference (default auto)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    p.add_argument("--no-loop", action="store_true", help="leave out the authors' per-module loop")
    p.add_argument("--graph", action="store_true", help="CUDA: also replay both models from CUDA graphs")
    p.add_argument("--quick", action="store_true", help="tiny presets, batch 2 x 64")
    p.add_argument("--csv", default=os.path.join(OUT, "bench_model.csv"),
                   help="append the rows to this CSV (default benchmarks/out/bench_model.csv; \"\" for none)")
    a = p.parse_args(argv)
    overrides = {}
    if a.quick:
        a.pairs, a.batch, a.seq_len = ["tiny:tiny-gpt2"], 2, 64
    st = stamp()
    rows = []
    for pair in a.pairs:
        mom_name, base_name = pair.split(":")
        rows += [{**st, **r} for r in bench_pair(mom_name, base_name, a, overrides)]
    append_csv(a.csv, rows)
    print(f"batch {a.batch} x {a.seq_len}, {a.dtype}, {st['hardware']}, commit {st['commit']}, {st['date']}")
    print("| mode | model | impl | tokens/s | TFLOP/s | per FLOP vs GPT-2 | vs loop | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['model']} | {r['impl']} | {r['tokens_per_s']} | {r['tflops']} | "
              f"{r['per_flop_vs_gpt2']}x | {r['speedup_vs_loop'] or '-'} | {r['peak_mem_mb'] or '-'} |")
    return rows


if __name__ == "__main__":
    main()

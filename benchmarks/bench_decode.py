"""Generation speed and memory: tokens/s and peak memory of MoM presets against the GPT-2 of the same width.

    python -m benchmarks.bench_decode --quick                     # CPU smoke run (tiny sizes, ~1 min)
    python -m benchmarks.bench_decode                             # CPU: mom-large-efficient vs gpt2-large at
                                                                  # scale 1/4, batch 1 and 16, prompt 128 / 1024
    python -m benchmarks.bench_decode --all --device cuda --scale 1 --dtype bfloat16 --cuda-graph

What one row is: a model (untrained, GPT-2 init; routers forced to pick modules, never SKIP: the costliest
case, as benchmarks/efficiency.py), a batch B, a prompt of T tokens and N new tokens, generated greedily with
mom.generate's static KV cache (prefill, then N one-token decode steps; `--cuda-graph` replays each step from a
CUDA graph). Reported: the prefill time, the decode time per token (median over the steps) measured twice: alone
in its own process (ms_per_token_alone, best of --repeats runs) and interleaved step by step with the paired
model in one process (ms_per_token, the one the ratios use: a shared machine's drift hits both alike; one thread
on a CPU), tokens/s
of the decode (B / time per token), the bytes of weights one decode step reads (read_MB: everything outside
the pools plus each module some token picked, once per routed step; mom.memory.decode_weight_bytes), the peak
memory of the whole generation and of the decode
phase alone (weights, static cache, activations, logits; mom.memory's methods: CUDA's allocator peak, or the
process's VmHWM on a CPU in a fresh interpreter with MALLOC_MMAP_THRESHOLD_ so that frees go back to the
kernel), each as a ratio to the GPT-2 of the same width.

Sizes: --scale s multiplies n_embd, vocab and router width and the prompt length by s (benchmarks/efficiency.py's
rule: FLOP and memory ratios at scale 1/4 track those at full size), so the CPU default "prompt 128 and 1024" runs
prompts of 32 and 256 tokens at scale 1/4. Results: CSV, Markdown and a PNG chart under --out (benchmarks/out/,
ignored by git); --update-results also writes them under benchmarks/results/ with date, hardware and commit.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from mom.cli import ArgumentParser

from .common import OUT, RESULTS, append_csv, hardware, stamp

PAIRS = {"mom-small": "gpt2", "mom-medium": "gpt2-medium", "mom-large-deep": "gpt2-large",
         "mom-large-efficient": "gpt2-large"}
CLAIM = ("mom-large-efficient", "gpt2-large")
TARGETS = dict(time_ratio=0.75, mem_ratio=0.55)  # targets for the claim pair (generation)


# --- one measurement, in a fresh interpreter --------------------------------------------------------------------
def _rss(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


class _Peak:
    """Peak bytes of the block: CUDA allocator peak, or VmHWM growth on a CPU (mom.memory's method)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.growth = torch.cuda.max_memory_allocated() - self.base
        else:
            self.growth = _rss("VmHWM") - self.base


def worker(spec: dict) -> dict:
    from mom import MoMConfig, MoMForCausalLM
    from mom.cache import StaticCache
    from mom.generate import DecodeStep, sample_next
    from mom.memory import decode_weight_bytes, force_no_skip_, weights_bytes

    torch.manual_seed(0)
    dev = torch.device(spec["device"])
    cfg = MoMConfig.from_dict(spec["config"])
    model = MoMForCausalLM(cfg).to(device=dev, dtype=getattr(torch, spec["dtype"])).eval()
    if cfg.chunks:
        force_no_skip_(model)
    B, T, N = spec["batch"], spec["prompt"], spec["new_tokens"]
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1)).to(dev)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)

    def run():
        cache = StaticCache(cfg, B, T + N, model.wte.weight.dtype, dev)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1]
            step = DecodeStep(model, cache, cuda_graph=spec["cuda_graph"])
            sync()
            t1 = time.perf_counter()
            with _Peak(dev) as dpeak:
                times = []
                for _ in range(N):
                    nxt = sample_next(logits, False)
                    sync()
                    s = time.perf_counter()
                    logits = step(nxt)
                    sync()
                    times.append(time.perf_counter() - s)
        return t1 - t0, statistics.median(times), dpeak.growth

    w = weights_bytes(model)
    with torch.no_grad():                                   # the weights one decode step reads: B tokens' picks
        read = decode_weight_bytes(model, model(ids[:, -1:]).routing)
    run()                                                   # warm-up: thread pools, kernels, scratch
    with _Peak(dev) as peak:
        prefill_s, per_tok, decode_growth = run()
    best = per_tok
    for _ in range(spec["repeats"] - 1):
        best = min(best, run()[1])
    return dict(weights_MB=w / 1e6, read_MB=read / 1e6, peak_MB=(w + peak.growth) / 1e6,
                decode_peak_MB=(w + decode_growth + 2 * cfg.n_cache_layers * B * (T + N) * cfg.n_embd
                                * model.wte.weight.element_size()) / 1e6,
                cache_MB=2 * cfg.n_cache_layers * B * (T + N) * cfg.n_embd * model.wte.weight.element_size() / 1e6,
                prefill_ms=prefill_s * 1e3, ms_per_token=best * 1e3, tokens_per_s=B / best)


def pair_worker(spec: dict) -> dict:
    """Decode time per token of a MoM and its GPT-2, interleaved step by step in one process (A B A B ...), so
    a shared machine's drift hits both alike: {name: median ms per token}."""
    from mom import MoMConfig, MoMForCausalLM
    from mom.cache import StaticCache
    from mom.generate import DecodeStep, sample_next
    from mom.memory import force_no_skip_

    dev = torch.device(spec["device"])
    if dev.type == "cpu":
        torch.set_num_threads(1)  # two models stepping in turn on a shared machine: no thread oversubscription
    B, T, N, W = spec["batch"], spec["prompt"], spec["new_tokens"], 2
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    runs = {}
    for name, cfg_dict in spec["configs"].items():
        torch.manual_seed(0)
        cfg = MoMConfig.from_dict(cfg_dict)
        model = MoMForCausalLM(cfg).to(device=dev, dtype=getattr(torch, spec["dtype"])).eval()
        if cfg.chunks:
            force_no_skip_(model)
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1)).to(dev)
        cache = StaticCache(cfg, B, T + N + W, model.wte.weight.dtype, dev)
        with torch.no_grad():
            logits = model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1]
            step = DecodeStep(model, cache, cuda_graph=spec["cuda_graph"])
            for _ in range(W):                                   # warm-up steps
                logits = step(sample_next(logits, False))
        runs[name] = [step, logits, []]
    with torch.no_grad():
        for _ in range(N):
            for name, r in runs.items():
                nxt = sample_next(r[1], False)
                sync()
                t0 = time.perf_counter()
                r[1] = r[0](nxt)
                sync()
                r[2].append(time.perf_counter() - t0)
    return {name: statistics.median(r[2]) * 1e3 for name, r in runs.items()}


def measure_isolated(spec: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_decode", "--_worker", json.dumps(spec)], cwd=root,
                       env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"worker failed for {spec['name']} B={spec['batch']} T={spec['prompt']}:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# --- the table ----------------------------------------------------------------------------------------------------
COLS = ["model", "batch", "prompt", "new", "depth", "prefill_ms", "ms_per_token_alone", "ms_per_token", "tokens_per_s",
        "time_ratio",
        "weights_MB", "read_MB", "read_ratio", "cache_MB", "peak_MB", "mem_ratio", "decode_peak_MB", "decode_mem_ratio"]


def fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown(rows):
    lines = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in COLS) + " |" for r in rows]
    return "\n".join(lines)


def chart(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moms = [r for r in rows if r["model"] in PAIRS]
    labels = [f"{r['model']}\nB{r['batch']} T{r['prompt']}" for r in moms]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(moms)), 4))
    x = range(len(moms))
    ax.bar([i - 0.2 for i in x], [r["time_ratio"] for r in moms], 0.4, label="decode time / token")
    ax.bar([i + 0.2 for i in x], [r["mem_ratio"] for r in moms], 0.4, label="peak memory")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("MoM / GPT-2 of the same width")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = ArgumentParser(prog="python -m benchmarks.bench_decode", description=__doc__)
    ap.add_argument("--models", nargs="+", default=[CLAIM[0]], help=f"MoM presets (baselines added); {list(PAIRS)}")
    ap.add_argument("--all", action="store_true", help="every MoM preset")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes (default 1 16)")
    ap.add_argument("--prompt", type=int, nargs="+", default=[128, 1024], help="full-size prompt lengths (x scale)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per run (default 32)")
    ap.add_argument("--scale", type=float, default=None, help="width / vocab / prompt factor (default 0.25 on a "
                                                              "CPU, 1 on CUDA)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="default float32 on a CPU, bfloat16 on CUDA")
    ap.add_argument("--backend", default="auto", help="the MoM's routed-op backend (default auto)")
    ap.add_argument("--cuda-graph", action="store_true", help="replay each decode step from a CUDA graph")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per case, the best kept (default 2)")
    ap.add_argument("--quick", action="store_true", help="smoke run: scale 1/16, batch 1 and 2, prompts 64 / 128, "
                                                          "4 new tokens")
    ap.add_argument("--out", default=OUT, help="folder for the CSV / Markdown / PNG (default benchmarks/out/)")
    ap.add_argument("--update-results", action="store_true", help="also write under benchmarks/results/")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        spec = json.loads(args._worker)
        print(json.dumps(pair_worker(spec) if "configs" in spec else worker(spec)))
        return 0
    from tqdm import tqdm

    from mom import MoMConfig

    from .efficiency import scaled

    cuda = torch.device(args.device).type == "cuda"
    if args.quick:
        args.scale, args.batch, args.prompt, args.new_tokens, args.repeats = 1 / 16, [1, 2], [64, 128], 4, 1
    scale = args.scale if args.scale is not None else (1.0 if cuda else 0.25)
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    moms = list(PAIRS) if args.all else args.models
    names = list(dict.fromkeys([n for m in moms for n in (PAIRS[m], m)]))
    tasks = [(n, b, p) for b in args.batch for p in args.prompt for n in names]
    tasks += [(("pair", m), b, p) for b in args.batch for p in args.prompt for m in moms]
    rows, paired = [], {}
    bar = tqdm(tasks, desc="bench_decode", unit="run", file=sys.stderr)
    for name, B, P in bar:
        T = max(4, round(P * scale))
        bar.set_postfix_str(f"{name if isinstance(name, str) else name[1] + ' vs ' + PAIRS[name[1]]} B={B} T={T}")
        common = dict(batch=B, prompt=T, new_tokens=args.new_tokens, device=args.device, dtype=dtype,
                      cuda_graph=args.cuda_graph)
        cfg_of = lambda n: scaled(MoMConfig.from_name(n, backend=args.backend), scale, T + args.new_tokens + 2)
        if not isinstance(name, str):                           # interleaved timing of a MoM and its GPT-2
            m = name[1]
            spec = dict(name=f"{m} pair", configs={m: cfg_of(m).to_dict(), PAIRS[m]: cfg_of(PAIRS[m]).to_dict()},
                        **common)
            for n, ms in measure_isolated(spec).items():
                paired.setdefault((n, B, T), []).append(ms)
            continue
        cfg = cfg_of(name)
        spec = dict(name=name, config=cfg.to_dict(), repeats=args.repeats, **common)
        r = measure_isolated(spec)
        r["ms_per_token_alone"] = r.pop("ms_per_token")
        rows.append(dict(model=name, batch=B, prompt=T, new=args.new_tokens, depth=cfg.graph_depth, **r))
    by = {(r["model"], r["batch"], r["prompt"]): r for r in rows}
    for r in rows:  # time per token: from the interleaved runs (a GPT-2 paired with several MoMs: the median)
        r["ms_per_token"] = statistics.median(paired[(r["model"], r["batch"], r["prompt"])])
        r["tokens_per_s"] = r["batch"] / r["ms_per_token"] * 1e3
    for r in rows:
        base = by[(PAIRS.get(r["model"], r["model"]), r["batch"], r["prompt"])]
        r["time_ratio"] = r["ms_per_token"] / base["ms_per_token"]
        r["mem_ratio"] = r["peak_MB"] / base["peak_MB"]
        r["decode_mem_ratio"] = r["decode_peak_MB"] / base["decode_peak_MB"]
        r["read_ratio"] = r["read_MB"] / base["read_MB"]
        # the peak memory's floor: weights and the static cache alone (what any implementation must hold)
        r["mem_floor"] = (r["weights_MB"] + r["cache_MB"]) / (base["weights_MB"] + base["cache_MB"])
    st = stamp()
    tag = f"{args.device.split(':')[0]}_scale{scale:g}" + ("_graph" if args.cuda_graph else "") + \
        ("_quick" if args.quick else "")
    head = (f"Decode: {hardware(args.device)}, {dtype}, scale {scale:g} (prompt = full-size prompt x scale), "
            f"{args.new_tokens} new tokens, greedy, static cache" + (", CUDA graph" if args.cuda_graph else "") +
            f"; routers forced to pick modules (no SKIP); commit {st['commit']}, {st['date']}, torch {st['torch']}")
    verdict = []
    for B in args.batch:
        for P in args.prompt:
            T = max(4, round(P * scale))
            if (CLAIM[0], B, T) in by and (CLAIM[1], B, T) in by:
                r = by[(CLAIM[0], B, T)]
                verdict.append(f"- {CLAIM[0]} vs {CLAIM[1]}, batch {B}, prompt {T}: time/token "
                               f"{r['time_ratio']:.2f}x (target <= {TARGETS['time_ratio']}: "
                               f"{'met' if r['time_ratio'] <= TARGETS['time_ratio'] else 'NOT met'}), peak memory "
                               f"{r['mem_ratio']:.2f}x (target <= {TARGETS['mem_ratio']}: "
                               f"{'met' if r['mem_ratio'] <= TARGETS['mem_ratio'] else 'NOT met'}), decode-phase "
                               f"peak {r['decode_mem_ratio']:.2f}x; weights read per step {r['read_ratio']:.2f}x "
                               f"(a bandwidth-bound step's time floor), weights + cache {r['mem_floor']:.2f}x (the "
                               f"memory floor)")
    text = head + "\n\n" + markdown(rows) + ("\n\n" + "\n".join(verdict) if verdict else "") + "\n"
    print(text)
    dirs = [args.out] + ([RESULTS] if args.update_results else [])
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        base = os.path.join(d, f"bench_decode_{tag}" + (f"_{st['date'][:10]}" if d == RESULTS else ""))
        append_csv(base + ".csv", [{**{c: r.get(c, "") for c in COLS}, "dtype": dtype, "scale": scale,
                                    "cuda_graph": args.cuda_graph, "hardware": st["hardware"],
                                    "commit": st["commit"], "date": st["date"]} for r in rows])
        with open(base + ".md", "w") as f:
            f.write(text)
        chart(rows, base + ".png", head[:120])
        print(f"wrote {base}.csv/.md/.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

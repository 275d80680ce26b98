"""The paper's efficiency claim, measured: forward TFLOPs, time and memory of MoM presets against GPT-2.

    python -m benchmarks.efficiency                      # CPU, width / vocab / length x 1/4, batch 4 (minutes)
    python -m benchmarks.efficiency --device cuda --full # GPU, full sizes (batch 16 x 1024 tokens, bf16)

For GPT-2 small / medium / large and the MoM presets (plus one labelled extra row: mom-large-efficient
with the paper's module removal, -50% attention and -25% FFN modules) it prints, writes as CSV + Markdown
and draws as a PNG: parameters, graph depth, K, forward FLOPs (analytic from the config and counted from
the routers' picks, mom.flops), the best-of-N forward time and the peak memory of a training forward, an
inference prefill (KV cache on) and a one-token decode step (mom.memory), each as a ratio to the GPT-2 of
the same width. It always writes the analytic full-size table too (batch 1 x 1024 tokens, no SKIP).

Reduced sizes (--scale s < 1) multiply n_embd, vocab_size, router_dim and the sequence length by s and keep
the heads, layers, pools, K and batch. Every FLOP and memory term of a forward then scales as s^2 (D^2, D V,
T D, T V, T^2 H), except the few GRU-router terms in r D and the attention core per head, so the ratios to
GPT-2 at scale 1/4, batch B, length T/4 track those at full size, batch B, length T.

Each (model, forward) is measured in a fresh interpreter (mom.memory.measure_isolated): a warm-up forward,
the measured forward, then --repeats timed forwards (the best reported: the machine may be shared).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import sys

import torch

from mom import flops
from mom.config import MoMConfig
from mom.memory import MODES, ROUTINGS, Spec, measure_isolated

from .common import commit, hardware

# (row name, MoMConfig.from_name preset, overrides, note)
ROWS = [
    ("gpt2", "gpt2", {}, ""),
    ("mom-small", "mom-small", {}, ""),
    ("gpt2-medium", "gpt2-medium", {}, ""),
    ("mom-medium", "mom-medium", {}, ""),
    ("gpt2-large", "gpt2-large", {}, ""),
    ("mom-large-deep", "mom-large-deep", {}, ""),
    ("mom-large-efficient", "mom-large-efficient", {}, ""),
    # paper.md: "Removing 50% of the attention modules and 25% of the FFN modules keeps comparable quality".
    ("mom-large-efficient-pruned", "mom-large-efficient", dict(n_attn=8, n_ffn=12),
     "not a preset: mom-large-efficient with 8/16 attention and 12/16 FFN modules per pool"),
]
BASELINE = {768: "gpt2", 1024: "gpt2-medium", 1280: "gpt2-large"}  # same width -> same-size GPT-2
PAPER = dict(flops_ratio=0.84, memory_ratio=0.58, deep_depth=50)  # abstract: 16% fewer TFLOPs, 42% less memory


def row_config(name: str) -> MoMConfig:
    for row, preset, over, _ in ROWS:
        if row == name:
            return MoMConfig.from_name(preset, **over)
    return MoMConfig.from_name(name)


def scaled(cfg: MoMConfig, s: float, seq_len: int) -> MoMConfig:
    """Width, vocabulary and router width x s (heads, layers, pools, K kept); room for seq_len positions."""
    if s == 1.0:
        return cfg.replace(n_positions=max(cfg.n_positions, seq_len))
    head = max(1, round(cfg.n_embd * s / cfg.n_head))
    return cfg.replace(n_embd=head * cfg.n_head, vocab_size=max(16, round(cfg.vocab_size * s)),
                       router_dim=max(4, round(cfg.router_dim * s)), n_positions=max(seq_len, 16),
                       n_inner=None if cfg.n_inner is None else round(cfg.n_inner * s))


# --- tables ------------------------------------------------------------------------------------------------------
def analytic_rows(batch: int = 1, seq_len: int = 1024):
    """Full-size figures from the configs alone (no model built)."""
    out = []
    for name, _, _, note in ROWS:
        cfg = row_config(name)
        base = BASELINE[cfg.n_embd]
        f, fb = flops.expected(cfg, batch, seq_len), flops.expected(row_config(base), batch, seq_len)
        p, pb = flops.num_parameters(cfg), flops.num_parameters(row_config(base))
        kv = cfg.n_cache_layers * 2 * batch * seq_len * cfg.n_embd  # KV cache elements of the sequence
        kvb = row_config(base).n_cache_layers * 2 * batch * seq_len * cfg.n_embd
        out.append(dict(model=name, baseline=base, params_M=p / 1e6,
                        router_params_M=(p - flops.num_parameters(cfg, routers=False)) / 1e6,
                        depth=cfg.graph_depth, K=cfg.top_k if cfg.chunks else 1,
                        TFLOPs=f / 1e12, TFLOPs_causal=f.causal_total / 1e12,
                        flops_ratio=f / fb, flops_ratio_causal=f.causal_total / fb.causal_total,
                        params_ratio=p / pb, depth_ratio=cfg.graph_depth / row_config(base).graph_depth,
                        kv_cache_ratio=kv / kvb, note=note))
    return out


def fmt(v, nd=3):
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 10 ** nd else f"{v:.0f}"
    return str(v)


def markdown(rows, cols) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def text_table(rows, cols) -> str:
    cells = [[c for c in cols]] + [[fmt(r.get(c, "")) for c in cols] for r in rows]
    w = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(x.rjust(w[i]) if i else x.ljust(w[i]) for i, x in enumerate(row)) for row in cells)


ANALYTIC_COLS = ["model", "params_M", "router_params_M", "depth", "K", "TFLOPs", "flops_ratio",
                 "flops_ratio_causal", "params_ratio", "depth_ratio", "kv_cache_ratio"]


def measured_cols(modes):
    cols = ["model", "params_M", "depth", "K", "GFLOPs_analytic", "GFLOPs_counted", "skip_share", "flops_ratio"]
    for m in modes:
        cols += [f"{m}_ms", f"{m}_time_ratio"]
    for m in modes:
        cols += [f"{m}_peak_MB", f"{m}_mem_ratio"]
    return cols


# --- measuring ---------------------------------------------------------------------------------------------------
def measure(args):
    from tqdm import tqdm

    names = args.models
    for n in names:  # a MoM's ratios need its baseline
        b = BASELINE[row_config(n).n_embd]
        if b not in names:
            names = [b] + names
    order = [r[0] for r in ROWS]
    names = sorted(dict.fromkeys(names), key=lambda n: order.index(n) if n in order else len(order))
    results = {}
    tasks = [(n, m) for n in names for m in args.modes]
    bar = tqdm(tasks, desc="efficiency", unit="forward", file=sys.stderr)
    for name, mode in bar:
        bar.set_postfix_str(f"{name} {mode}")
        cfg = scaled(row_config(name), args.scale, args.seq_len)
        spec = Spec(cfg.to_dict(), args.batch, args.seq_len, mode, dtype=args.dtype, device=args.device,
                    routing=args.routing, repeats=args.repeats, seed=args.seed)
        results[(name, mode)] = (cfg, measure_isolated(spec))
    rows = []
    for name in names:
        cfg = scaled(row_config(name), args.scale, args.seq_len)
        row = dict(model=name, params_M=flops.num_parameters(cfg) / 1e6, depth=cfg.graph_depth,
                   K=cfg.top_k if cfg.chunks else 1,
                   GFLOPs_analytic=flops.expected(cfg, args.batch, args.seq_len) / 1e9)
        for mode in args.modes:
            r = results[(name, mode)][1]
            if mode != "decode":  # the whole-sequence forward's count (train and prefill see the same picks)
                row["GFLOPs_counted"] = r["flops"]["total"] / 1e9
                row["skip_share"] = r["skip_share"]
            row[f"{mode}_ms"] = r["time_s"] * 1e3
            row[f"{mode}_peak_MB"] = r["memory"]["peak_bytes"] / 1e6
            row[f"{mode}_weights_MB"] = r["memory"]["weights_bytes"] / 1e6
            row[f"{mode}_cache_MB"] = r["memory"]["cache_bytes"] / 1e6
            row[f"{mode}_baseline_MB"] = r["memory"]["baseline_bytes"] / 1e6
            row["memory_method"] = r["memory"]["method"]
        rows.append(row)
    by = {r["model"]: r for r in rows}
    for r in rows:
        b = by[BASELINE[row_config(r["model"]).n_embd]]
        key = "GFLOPs_counted" if "GFLOPs_counted" in r else "GFLOPs_analytic"
        r["flops_ratio"] = r[key] / b[key]
        for mode in args.modes:
            r[f"{mode}_time_ratio"] = r[f"{mode}_ms"] / b[f"{mode}_ms"]
            r[f"{mode}_mem_ratio"] = r[f"{mode}_peak_MB"] / b[f"{mode}_peak_MB"]
    return rows


def chart(rows, modes, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moms = [r for r in rows if not r["model"].startswith("gpt2")]
    metrics = [("flops_ratio", "forward FLOPs")] + [(f"{m}_time_ratio", f"{m} time") for m in modes] + \
        [(f"{m}_mem_ratio", f"{m} peak memory") for m in modes]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(moms) + 3), 4.8))
    w = 0.8 / len(metrics)
    for i, (key, label) in enumerate(metrics):
        xs = [j + (i - (len(metrics) - 1) / 2) * w for j in range(len(moms))]
        ax.bar(xs, [r[key] for r in moms], w, label=label)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(PAPER["flops_ratio"], color="tab:blue", ls="--", lw=0.8, label="paper: 0.84x TFLOPs")
    ax.axhline(PAPER["memory_ratio"], color="tab:red", ls="--", lw=0.8, label="paper: 0.58x memory")
    ax.set_xticks(range(len(moms)))
    ax.set_xticklabels([r["model"] for r in moms], rotation=15, fontsize=8)
    ax.set_ylabel("ratio to the GPT-2 of the same width")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def append_csv(path, rows):
    """Append rows to a CSV kept across runs; a new column rewrites the file with the union of columns."""
    old, fields = [], []
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old, fields = list(reader), list(reader.fieldnames or [])
    new_fields = list(dict.fromkeys(fields + [k for r in rows for k in r]))
    if new_fields == fields:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writerows(rows)
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=new_fields)
        w.writeheader()
        w.writerows(old + rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--full", action="store_true", help="full sizes (scale 1, 1024 tokens)")
    ap.add_argument("--scale", type=float, default=None, help="width/vocab/length factor (default 0.25; 1 with --full)")
    ap.add_argument("--batch", type=int, default=None, help="default 4 on cpu, 16 on cuda")
    ap.add_argument("--seq-len", type=int, default=None, help="default 1024 x scale")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on cpu, bfloat16 on cuda)")
    ap.add_argument("--routing", default="no-skip", choices=ROUTINGS,
                    help="no-skip: SKIP slots masked, every pick runs a module (worst case);\n"
                         "init: routers as initialised (seeded), SKIP picked when they pick it")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--models", nargs="+", default=[r[0] for r in ROWS], help="rows (presets or extra rows)")
    ap.add_argument("--repeats", type=int, default=None, help="timed forwards per measurement (default 2 cpu, 10 cuda)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--analytic-only", action="store_true", help="only the full-size analytic table")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.scale = args.scale if args.scale is not None else (1.0 if args.full else 0.25)
    args.seq_len = args.seq_len or max(8, round(1024 * args.scale))
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.batch = args.batch or (16 if cuda else 4)
    args.repeats = args.repeats if args.repeats is not None else (10 if cuda else 2)
    os.makedirs(args.out, exist_ok=True)
    stamp = dict(date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=commit(),
                 hardware=f"{hardware(args.device)} (torch {torch.__version__}"
                          f"{', CUDA ' + torch.version.cuda if args.device.startswith('cuda') else ''})")

    # 1. the analytic full-size table (always)
    arows = analytic_rows()
    head = (f"Analytic forward cost at full size: batch 1 x 1024 tokens, no SKIP (worst case), full-square "
            f"attention core (flops_ratio_causal: causal core); kv_cache_ratio = graph depth ratio.\n"
            f"{stamp['date']}, commit {stamp['commit']}")
    print(head + "\n" + text_table(arows, ANALYTIC_COLS) + "\n")
    with open(os.path.join(args.out, "efficiency_analytic.md"), "w") as f:
        f.write(f"# Analytic forward cost, full size\n\n{head}\n\n{markdown(arows, ANALYTIC_COLS)}\n")
    with open(os.path.join(args.out, "efficiency_analytic.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(arows[0]) + list(stamp))
        w.writeheader()
        w.writerows({**r, **stamp} for r in arows)
    if args.analytic_only:
        return arows, None

    # 2. measured
    settings = (f"device {args.device} ({stamp['hardware']}), dtype {args.dtype}, batch {args.batch}, "
                f"seq_len {args.seq_len}, scale {args.scale} (n_embd, vocab, router_dim x scale), routing "
                f"{args.routing}, time = best of {args.repeats} timed forwards; memory = peak of all tensors of the "
                f"forward incl. weights ({'torch.cuda.max_memory_allocated' if cuda else 'peak RSS of a fresh process, VmHWM'}); "
                f"decode = 1 token after {args.seq_len - 1} cached; {stamp['date']}, commit {stamp['commit']}")
    rows = measure(args)
    cols = measured_cols(args.modes)
    print("Measured forwards: " + settings + "\n" + text_table(rows, cols))
    tag = f"{args.device.split(':')[0]}_" + ("full" if args.scale == 1.0 else f"scale{args.scale:g}") + \
        f"_b{args.batch}x{args.seq_len}" + ("" if args.routing == "no-skip" else f"_{args.routing}")
    with open(os.path.join(args.out, f"efficiency_{tag}.md"), "w") as f:
        f.write(f"# Measured forwards ({tag})\n\n{settings}\n\n{markdown(rows, cols)}\n")
    append_csv(os.path.join(args.out, f"efficiency_{tag}.csv"),
               [{**r, "batch": args.batch, "seq_len": args.seq_len, "scale": args.scale, "dtype": args.dtype,
                 "routing": args.routing, "device": args.device, **stamp} for r in rows])
    chart(rows, args.modes, os.path.join(args.out, f"efficiency_{tag}.png"),
          f"MoM / GPT-2: {args.device} {args.dtype}, batch {args.batch} x {args.seq_len}, scale {args.scale:g}, "
          f"routing {args.routing}\n{stamp['hardware']}, {stamp['date']}, {stamp['commit']}")
    print(f"\nwrote {args.out}/efficiency_{tag}.{{csv,md,png}} and efficiency_analytic.{{csv,md}}")
    return arows, rows


if __name__ == "__main__":
    main()

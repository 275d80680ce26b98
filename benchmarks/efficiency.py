"""The paper's efficiency claim, measured: forward TFLOPs, time and memory of MoM presets against GPT-2.

    python -m benchmarks.efficiency                      # CPU, the claim's pair at width / vocab / length x 1/8
    python -m benchmarks.efficiency --all                # every preset at x 1/4 (about 20 min on 2 CPU cores)
    python -m benchmarks.efficiency --device cuda --full # GPU, full sizes (batch 16 x 1024 tokens, bf16)
    python -m benchmarks.efficiency --pair smollm-135m,mom-smollm-135m-efficient   # any vanilla / MoM pair

By default it measures what the claim needs: mom-large-efficient and gpt2-large (the deep MoM's claim,
parameters and depth, comes from the configs) and ends with a verdict table: each claim, the paper's figure,
ours, whether it holds, and why. --pair VANILLA,MOM gives any pair of presets (a Llama-family pair too) the same
tables, claim chart and verdict columns, the paper's figures held against that pair. The quality part of the claim (equal quality at those FLOPs) is not shown
by this job: the models are untrained. Results go to --out (benchmarks/out/, ignored by git);
--update-results also writes them into benchmarks/results/, the committed reference.

With --all, for GPT-2 small / medium / large and the MoM presets (plus one labelled extra row: mom-large-efficient
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
import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from mom import flops
from mom.cli import ArgumentParser
from mom.config import PRESETS, MoMConfig
from mom.io import atomic_file
from mom.memory import MODES, ROUTINGS, Spec, measure_isolated

from .common import OUT, RESULTS, append_csv, commit, hardware

# (row name, MoMConfig.from_name preset, overrides, note)
ROWS = [
    ("gpt2", "gpt2", {}, ""),
    ("mom-small", "mom-small", {}, ""),
    ("gpt2-medium", "gpt2-medium", {}, ""),
    ("mom-medium", "mom-medium", {}, ""),
    ("gpt2-large", "gpt2-large", {}, ""),
    ("mom-large-deep", "mom-large-deep", {}, ""),
    ("mom-large-efficient", "mom-large-efficient", {}, ""),
    # docs/method.md: "Removing 50% of the attention modules and 25% of the FFN modules keeps comparable quality".
    ("mom-large-efficient-pruned", "mom-large-efficient", dict(n_attn=8, n_ffn=12),
     "not a preset: mom-large-efficient with 8/16 attention and 12/16 FFN modules per pool"),
]
BASELINE = {768: "gpt2", 1024: "gpt2-medium", 1280: "gpt2-large"}  # same width -> same-size GPT-2
PAPER = dict(flops_ratio=0.84, memory_ratio=0.58, deep_depth=50)  # abstract: 16% fewer TFLOPs, 42% less memory
CLAIM_BASE, CLAIM_MOM, DEEP = "gpt2-large", "mom-large-efficient", "mom-large-deep"
CLAIM_PAIR = (CLAIM_BASE, CLAIM_MOM)  # the paper's pair: (vanilla, MoM)


def row_config(name: str) -> MoMConfig:
    for row, preset, over, _ in ROWS:
        if row == name:
            return MoMConfig.from_name(preset, **over)
    return MoMConfig.from_name(name)


def baseline_of(name: str, pair=CLAIM_PAIR) -> str:
    """The vanilla model a row is measured against: the pair's vanilla for the pair's rows, else the GPT-2 of the
    row's width (GPT-2 rows: themselves)."""
    if name in pair:
        return pair[0]
    return BASELINE[row_config(name).n_embd]


def scaled(cfg: MoMConfig, s: float, seq_len: int) -> MoMConfig:
    """Width, vocabulary and router width x s (heads, K/V heads, layers, pools, K kept; an even head size in the
    Llama family, which rotates half-heads); room for seq_len positions."""
    if s == 1.0:
        return cfg.replace(n_positions=max(cfg.n_positions, seq_len))
    step = 2 if cfg.family == "llama" else 1
    head = max(step, step * round(cfg.n_embd * s / cfg.n_head / step))
    return cfg.replace(n_embd=head * cfg.n_head, vocab_size=max(16, round(cfg.vocab_size * s)),
                       router_dim=max(4, round(cfg.router_dim * s)), n_positions=max(seq_len, 16),
                       n_inner=None if cfg.n_inner is None else round(cfg.n_inner * s))


def kv_elements(cfg: MoMConfig, batch: int, seq_len: int) -> int:
    """KV cache elements of a sequence: one K and one V per attention call, kv_heads x head_dim wide."""
    return cfg.n_cache_layers * 2 * batch * seq_len * cfg.kv_heads * cfg.head_dim


# --- tables ------------------------------------------------------------------------------------------------------
def analytic_rows(batch: int = 1, seq_len: int = 1024, pair=None):
    """Full-size figures from the configs alone (no model built): every row of ROWS, or the pair (vanilla, MoM)."""
    out = []
    rows = ROWS if pair is None else [(name, name, {}, "") for name in pair]
    for name, _, _, note in rows:
        cfg = row_config(name)
        base = baseline_of(name, pair or CLAIM_PAIR)
        f, fb = flops.expected(cfg, batch, seq_len), flops.expected(row_config(base), batch, seq_len)
        p, pb = flops.num_parameters(cfg), flops.num_parameters(row_config(base))
        kv, kvb = kv_elements(cfg, batch, seq_len), kv_elements(row_config(base), batch, seq_len)
        out.append(dict(model=name, baseline=base, params_M=p / 1e6,
                        router_params_M=(p - flops.num_parameters(cfg, routers=False)) / 1e6,
                        depth=cfg.graph_depth, K=cfg.top_k if cfg.chunks else 1,
                        TFLOPs=f / 1e12, TFLOPs_causal=f.causal_total / 1e12,
                        flops_ratio=f / fb, flops_ratio_causal=f.causal_total / fb.causal_total,
                        params_ratio=p / pb, depth_ratio=cfg.graph_depth / row_config(base).graph_depth,
                        kv_cache_ratio=kv / kvb, preset="yes" if name in PRESETS else "no", note=note))
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


ANALYTIC_COLS = ["model", "preset", "params_M", "router_params_M", "depth", "K", "TFLOPs", "flops_ratio",
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
    pair = getattr(args, "pair", CLAIM_PAIR)  # (callers building args by hand may leave it out)
    for n in names:  # a MoM's ratios need its baseline
        b = baseline_of(n, pair)
        if b not in names:
            names = [b] + names
    order = [r[0] for r in ROWS]
    names = sorted(dict.fromkeys(names), key=lambda n: order.index(n) if n in order else len(order))
    results = {}
    # mode-major order: with --jobs 2 the two forwards that run side by side are the same mode of a MoM and
    # its GPT-2 (or of two models), so both see the same machine.
    tasks = [(n, m) for m in args.modes for n in names]

    def run(task):
        name, mode = task
        cfg = scaled(row_config(name), args.scale, args.seq_len)
        spec = Spec(cfg.to_dict(), args.batch, args.seq_len, mode, dtype=args.dtype, device=args.device,
                    routing=args.routing, repeats=args.repeats, seed=args.seed)
        return task, measure_isolated(spec)

    bar = tqdm(total=len(tasks), desc=f"measuring ({args.jobs} at a time)", unit="forward", file=sys.stderr)
    with ThreadPoolExecutor(args.jobs) as pool:  # each worker is its own process (fresh interpreter)
        for task, r in pool.map(run, tasks):
            results[task] = r
            bar.set_postfix_str(f"{task[0]} {task[1]} done")
            bar.update(1)
    bar.close()
    rows = []
    for name in names:
        cfg = scaled(row_config(name), args.scale, args.seq_len)
        row = dict(model=name, params_M=flops.num_parameters(cfg) / 1e6, depth=cfg.graph_depth,
                   K=cfg.top_k if cfg.chunks else 1,
                   GFLOPs_analytic=flops.expected(cfg, args.batch, args.seq_len) / 1e9)
        for mode in args.modes:
            r = results[(name, mode)]
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
        b = by[baseline_of(r["model"], pair)]
        key = "GFLOPs_counted" if "GFLOPs_counted" in r else "GFLOPs_analytic"
        r["flops_ratio"] = r[key] / b[key]
        for mode in args.modes:
            r[f"{mode}_time_ratio"] = r[f"{mode}_ms"] / b[f"{mode}_ms"]
            r[f"{mode}_mem_ratio"] = r[f"{mode}_peak_MB"] / b[f"{mode}_peak_MB"]
    return rows


# --- the verdict -------------------------------------------------------------------------------------------------
def layout(name: str) -> str:
    c = row_config(name)
    return (f"{c.n_bottom} + {c.chunks} chunks x ({c.depth} routed steps, top-{c.top_k} of {c.n_attn}/{c.n_ffn} "
            f"modules, + anchor) + {c.n_top} blocks")


def verdict(arows, rows, modes, settings="", pair=CLAIM_PAIR) -> list:
    """The paper's claims (docs/method.md), each with its figure, ours, whether it holds and why, from this run's
    tables. Lower is better for every ratio; a claim holds when ours is at or below the paper's figure (at or
    above for depth). `rows` may be None (analytic only). pair (vanilla, MoM): the efficient-MoM claims held
    against another pair (the deep MoM's claims belong to the paper's pair only)."""
    base_name, mom_name = pair
    a = {r["model"]: r for r in arows}
    m = {r["model"]: r for r in rows or []}
    eff = a[mom_name]
    vdepth = row_config(base_name).graph_depth
    label = "GPT-2-large" if base_name == CLAIM_BASE else base_name
    out = []
    ours = f"{eff['flops_ratio']:.3f}x (full size, 1 x 1024, analytic)"
    if mom_name in m and base_name in m:
        ours += f"; {m[mom_name]['flops_ratio']:.3f}x counted from the routers' picks here"
    out.append(dict(claim=f"efficient MoM: forward TFLOPs / {label}'s", paper=f"{PAPER['flops_ratio']}x",
                    ours=ours, holds="yes" if eff["flops_ratio"] <= PAPER["flops_ratio"] else "no",
                    why=f"graph depth {eff['depth']} vs {vdepth}, {layout(mom_name)}; every pick runs a module "
                        f"(no SKIP), the costliest case"))
    for mode in modes:
        if mom_name not in m or base_name not in m:
            break
        r, b = m[mom_name], m[base_name]
        ratio = r[f"{mode}_mem_ratio"]
        pm, wm, pb, wb = (r[f"{mode}_peak_MB"], r[f"{mode}_weights_MB"], b[f"{mode}_peak_MB"],
                          b[f"{mode}_weights_MB"])
        ok = ratio <= PAPER["memory_ratio"]
        what = {"train": "training forward (activations kept for backward)",
                "prefill": "inference prefill (KV cache built)",
                "decode": "one-token decode (KV cache read)"}[mode]
        why = (f"= weights {wm / pb:.2f} (all of {label}'s are kept) + the rest {(pm - wm) / pb:.2f} of "
               f"{label}'s peak; the rest (activations, KV caches: {eff['depth']} steps vs {vdepth} layers) is "
               f"{(pm - wm) / max(pb - wb, 1e-9):.2f}x {label}'s")
        out.append(dict(claim=f"efficient MoM: peak memory / {label}'s, {what}",
                        paper=f"{PAPER['memory_ratio']}x", ours=f"{ratio:.3f}x", holds="yes" if ok else "no",
                        why=why + (f"; {settings}" if settings else "")))
    if DEEP in a:
        deep = a[DEEP]
        out.append(dict(claim="deep MoM: same parameters as GPT-2-large", paper="774M (1.0x)",
                        ours=f"{deep['params_M']:.1f}M ({deep['params_ratio']:.3f}x)",
                        holds="yes" if deep["params_ratio"] <= 1.02 else "no",
                        why=f"all of GPT-2-large's weights plus {deep['router_params_M']:.1f}M router parameters"))
        out.append(dict(claim="deep MoM: graph over 38% deeper", paper=f">= {PAPER['deep_depth']} vs 36",
                        ours=f"{deep['depth']} vs 36 ({deep['depth_ratio']:.2f}x)",
                        holds="yes" if deep["depth"] >= PAPER["deep_depth"] else "no",
                        why=layout(DEEP)))
    if pair == CLAIM_PAIR:
        out.append(dict(claim="efficient MoM: at most 14 steps deep", paper="<= 14 vs 36",
                        ours=f"{eff['depth']} vs 36", holds="yes" if eff["depth"] <= 14 else "no", why=layout(mom_name)))
    else:  # the paper's "over 60% less depth" (14 vs 36), for the pair's vanilla
        out.append(dict(claim="efficient MoM: over 60% less depth", paper=f"<= 0.4 x {vdepth}",
                        ours=f"{eff['depth']} vs {vdepth} ({eff['depth'] / vdepth:.2f}x)",
                        holds="yes" if eff["depth"] <= 0.4 * vdepth else "no", why=layout(mom_name)))
    out.append(dict(claim=f"... and it matches {label}'s quality at those FLOPs and memory",
                    paper="matches (GLUE, XSUM)", ours="not measured", holds="not shown",
                    why=f"the models here are untrained (routers as initialised); showing it needs pre-training "
                        f"at {a[base_name]['params_M']:.0f}M parameters (docs/training.md: at width 128 with 3 seeds "
                        f"the MoM was 0.026 nats worse at equal tokens and 0.10 behind at equal FLOPs)"))
    return out


VERDICT_COLS = ["claim", "paper", "ours", "holds", "why"]


def verdict_text(vrows, width: int = 120) -> str:
    """The verdict for a terminal of `width` columns: per claim, a line with whether it holds and the claim, then
    the paper's figure and ours, then why, each wrapped and indented under it."""
    import textwrap

    lines = []
    for v in vrows:
        lines.append(f"[{v['holds']}] {v['claim']}")
        for label, text in (("paper", v["paper"]), ("ours", v["ours"]), ("why", v["why"])):
            lines += textwrap.wrap(text, width, initial_indent=f"    {label}: ", subsequent_indent=" " * (6 + len(label)))
    return "\n".join(lines)


# --- charts ------------------------------------------------------------------------------------------------------
PAPER_LINE = dict(color="black", ls="--", lw=1.2)   # the paper's figures: black dashed, no bar is black
EVEN_LINE = dict(color="0.5", lw=0.8)               # 1.0 = the GPT-2 of the same width


def _labels(ax, bars, fmt="{:.2f}"):
    for b in bars:
        ax.annotate(fmt.format(b.get_height()), (b.get_x() + b.get_width() / 2, b.get_height()),
                    xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)


def claim_chart(arows, rows, modes, path, title, pair=CLAIM_PAIR):
    """MoM / vanilla of the pair (mom-large-efficient / gpt2-large): the forward FLOPs and each peak-memory
    ratio, with the paper's 0.84 over the FLOPs bars and 0.58 over the memory bars only."""
    base, mom = pair
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = {r["model"]: r for r in arows}
    m = {r["model"]: r for r in rows or []}
    bars = [("FLOPs\n(full size)", a[mom]["flops_ratio"], "flops")]
    if mom in m:
        bars.append(("FLOPs\n(counted here)", m[mom]["flops_ratio"], "flops"))
        bars += [(f"memory\n{mode}", m[mom][f"{mode}_mem_ratio"], "mem") for mode in modes]
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(bars) + 3), 4.4))
    colors = {"flops": "tab:blue", "mem": "tab:orange"}
    xs = range(len(bars))
    b = ax.bar(xs, [v for _, v, _ in bars], 0.6, color=[colors[k] for _, _, k in bars])
    _labels(ax, b, "{:.3f}x")
    ax.axhline(1.0, **EVEN_LINE)
    nf = sum(k == "flops" for _, _, k in bars)
    ax.hlines(PAPER["flops_ratio"], -0.4, nf - 0.6, **PAPER_LINE)
    ax.text(-0.4, PAPER["flops_ratio"], f"paper {PAPER['flops_ratio']}x", va="bottom", ha="left", fontsize=8)
    if len(bars) > nf:
        ax.hlines(PAPER["memory_ratio"], nf - 0.4, len(bars) - 0.6, **PAPER_LINE)
        ax.text(nf - 0.4, PAPER["memory_ratio"], f"paper {PAPER['memory_ratio']}x", va="bottom",
                ha="left", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([n for n, _, _ in bars], fontsize=8)
    ax.set_ylim(0, max(1.15, max(v for _, v, _ in bars) * 1.15))
    ax.set_ylabel(f"{mom} / {base} (lower is better)")
    ax.text(0.99, 0.98, "equal quality at these ratios: not measured (untrained models)", transform=ax.transAxes,
            ha="right", va="top", fontsize=7, style="italic")
    ax.set_title(f"The paper's claim: {mom} against {base} (1.0 = {base}; dashed: the paper)\n"
                 + title, fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:  # an interrupted save keeps the previous chart
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def chart(rows, modes, path, title, pair=CLAIM_PAIR):
    """Every MoM against its vanilla (the GPT-2 of its width, or the pair's): one panel each for time, FLOPs and
    peak memory; the paper's figures drawn over the pair's MoM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moms = [r for r in rows if row_config(r["model"]).chunks > 0]
    panels = [("forward time (rough: shared cores)", [(f"{m}_time_ratio", m) for m in modes], None),
              ("forward FLOPs", [("flops_ratio", "FLOPs")], PAPER["flops_ratio"]),
              ("peak memory", [(f"{m}_mem_ratio", m) for m in modes], PAPER["memory_ratio"])]
    width = max(3.2, 0.9 * len(moms) + 1.5)
    fig, axes = plt.subplots(1, 3, figsize=(3 * width, 4.6), sharey=False)
    for ax, (name, metrics, paper) in zip(axes, panels):
        w = 0.8 / len(metrics)
        top = 1.0
        for i, (key, label) in enumerate(metrics):
            xs = [j + (i - (len(metrics) - 1) / 2) * w for j in range(len(moms))]
            vals = [r[key] for r in moms]
            top = max(top, *vals)
            _labels(ax, ax.bar(xs, vals, w, label=label), "{:.2f}")
        ax.axhline(1.0, **EVEN_LINE)
        if paper is not None and any(r["model"] == pair[1] for r in moms):  # the paper's figure: one pair only
            j = [r["model"] for r in moms].index(pair[1])
            ax.hlines(paper, j - 0.45, j + 0.45, label=f"paper, {pair[1]}: {paper}x", **PAPER_LINE)
        ax.set_xticks(range(len(moms)))
        ax.set_xticklabels([r["model"] for r in moms], rotation=20, ha="right", fontsize=7)
        ax.set_ylim(0, top * 1.18)
        ax.set_title(f"{name} (lower is better)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("ratio to the GPT-2 of the same width (1.0)")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:  # an interrupted save keeps the previous chart
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write(folder, name, text):
    from mom.io import atomic_write_text

    os.makedirs(folder, exist_ok=True)
    atomic_write_text(os.path.join(folder, name), text)


def main(argv=None):
    ap = ArgumentParser(prog="python -m benchmarks.efficiency", description="\n\n".join(__doc__.split("\n\n")[:2]),
                        formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--all", action="store_true",
                    help=f"every preset and the pruned row against its GPT-2, 2 timed forwards each (about\n"
                         f"20 min on 2 CPU cores); default: only what the claim needs, {CLAIM_MOM} and {CLAIM_BASE}")
    ap.add_argument("--full", action="store_true", help="full sizes (scale 1, 1024 tokens; for a GPU)")
    ap.add_argument("--scale", type=float, default=None,
                    help="width/vocab/length factor (default 0.125; 0.25 with --all; 1 with --full)")
    ap.add_argument("--batch", type=int, default=None, help="default 4 on cpu, 16 on cuda")
    ap.add_argument("--seq-len", type=int, default=None, help="default 1024 x scale")
    ap.add_argument("--dtype", default=None,
                    help="float32 | bfloat16 | float16 (default: float32 on cpu, bfloat16 on cuda)")
    ap.add_argument("--routing", default="no-skip", choices=ROUTINGS,
                    help="no-skip: SKIP slots masked, every pick runs a module (worst case);\n"
                         "init: routers as initialised (seeded), SKIP picked when they pick it")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                    help="what to measure: the training forward, the prefill, the decode step (default: all)")
    ap.add_argument("--models", nargs="+", default=None,
                    help=f"rows to measure (presets or extra rows: {', '.join(r[0] for r in ROWS)});\n"
                         f"each MoM brings its GPT-2")
    ap.add_argument("--pair", default=None, metavar="VANILLA,MOM",
                    help=f"any vanilla / MoM pair of presets instead of the paper's ({CLAIM_BASE},{CLAIM_MOM}):\n"
                         f"the same table, claim chart and verdict columns for it, e.g.\n"
                         f"smollm-135m,mom-smollm-135m-efficient")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed forwards per measurement (default: 1 on cpu, 2 with --all, 10 on cuda)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="forwards measured at the same time, each in its own process with cores / jobs threads\n"
                         "(default: 2 on a CPU with 2+ cores, 1 with --all or on CUDA; memory is per process,\n"
                         "times are of forwards that shared the machine: --jobs 1 for timings)")
    ap.add_argument("--seed", type=int, default=0, help="the models' initialisation (default: 0)")
    ap.add_argument("--out", default=OUT, help=f"output folder (default {os.path.relpath(OUT)}, ignored by git)")
    ap.add_argument("--update-results", action="store_true",
                    help=f"also write the tables and charts into {os.path.relpath(RESULTS)} (the committed\n"
                         f"reference results; CSV rows appended)")
    ap.add_argument("--analytic-only", action="store_true", help="only the full-size analytic table and verdict")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.pair = _pair(ap, args.pair)
    # scale 1/8 by default: ratios within 0.01 of scale 1/4's (2026-11-29, b4: FLOPs 0.690 vs 0.689, peak memory
    # train 0.663 vs 0.670, prefill 0.788 vs 0.785, decode 0.692 vs 0.701) at half the CPU time
    args.scale = args.scale if args.scale is not None else (1.0 if args.full else (0.25 if args.all else 0.125))
    args.seq_len = args.seq_len or max(8, round(1024 * args.scale))
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.batch = args.batch or (16 if cuda else 4)
    args.repeats = args.repeats if args.repeats is not None else (10 if cuda else (2 if args.all else 1))
    ncpu = os.cpu_count() or 1
    args.jobs = max(1, args.jobs if args.jobs is not None else (2 if not cuda and not args.all and ncpu >= 2 else 1))
    if args.jobs > 1 and not cuda and "OMP_NUM_THREADS" not in os.environ:  # the workers inherit it
        os.environ["OMP_NUM_THREADS"] = str(max(1, ncpu // args.jobs))
    if args.pair != CLAIM_PAIR and (args.all or args.models):
        ap.error("--pair measures its two presets: it takes neither --all nor --models")
    args.models = args.models or ([r[0] for r in ROWS] if args.all else list(args.pair))
    folders = [args.out] + ([RESULTS] if args.update_results and os.path.abspath(args.out) != RESULTS else [])
    stamp = dict(date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=commit(),
                 hardware=f"{hardware(args.device)} (torch {torch.__version__}"
                          f"{', CUDA ' + torch.version.cuda if args.device.startswith('cuda') else ''})")

    # 1. the analytic full-size table (always)
    arows = analytic_rows(pair=None if args.pair == CLAIM_PAIR else args.pair)
    head = (f"Analytic forward cost at full size: batch 1 x 1024 tokens, no SKIP (worst case), full-square "
            f"attention core (flops_ratio_causal: causal core); kv_cache_ratio = graph depth ratio.\n"
            f"{stamp['date']}, commit {stamp['commit']}")
    print(head + "\n" + text_table(arows, ANALYTIC_COLS) + "\n", flush=True)
    analytic = "efficiency_analytic" + ("" if args.pair == CLAIM_PAIR else f"_{args.pair[1]}")
    for folder in folders:
        write(folder, f"{analytic}.md", f"# Analytic forward cost, full size\n\n{head}\n\n"
                                                f"{markdown(arows, ANALYTIC_COLS)}\n")
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(arows[0]) + list(stamp))
        w.writeheader()
        w.writerows({**r, **stamp} for r in arows)
        write(folder, f"{analytic}.csv", buf.getvalue())
    if args.analytic_only:
        vrows = verdict(arows, None, args.modes, pair=args.pair)
        print("Verdict (lower is better for every ratio):\n" + verdict_text(vrows))
        return arows, None

    # 2. measured
    settings = (f"device {args.device} ({stamp['hardware']}), dtype {args.dtype}, batch {args.batch}, "
                f"seq_len {args.seq_len}, scale {args.scale} (n_embd, vocab, router_dim x scale), routing "
                f"{args.routing}, time = best of {args.repeats} timed forwards ({args.jobs} measured at a time, "
                f"{os.environ.get('OMP_NUM_THREADS', 'all')} threads each); memory = peak of all tensors of the "
                f"forward incl. weights "
                f"({'torch.cuda.max_memory_allocated' if cuda else 'peak RSS of a fresh process, VmHWM'}); "
                f"decode = 1 token after {args.seq_len - 1} cached; {stamp['date']}, commit {stamp['commit']}")
    rows = measure(args)
    cols = measured_cols(args.modes)
    short = ["model", "params_M", "depth", "K", "flops_ratio"] + [f"{m}_mem_ratio" for m in args.modes] + \
        [f"{m}_time_ratio" for m in args.modes]
    print("\nMeasured forwards (ratios to each MoM's vanilla: " + ("the GPT-2 of its width" if args.pair == CLAIM_PAIR
          else args.pair[0]) + "; full columns in the .md/.csv): "
          + settings + "\n" + text_table(rows, short))
    tag = f"{args.device.split(':')[0]}_" + ("full" if args.scale == 1.0 else f"scale{args.scale:g}") + \
        f"_b{args.batch}x{args.seq_len}" + ("" if args.routing == "no-skip" else f"_{args.routing}") + \
        ("" if args.pair == CLAIM_PAIR else f"_{args.pair[1]}")
    where = f"measured at {args.device}, scale {args.scale:g}, batch {args.batch} x {args.seq_len}"
    vrows = verdict(arows, rows, args.modes, where, pair=args.pair)
    title = (f"{args.device} {args.dtype}, batch {args.batch} x {args.seq_len}, scale {args.scale:g}, routing "
             f"{args.routing}; {stamp['hardware']}, {stamp['date']}, {stamp['commit']}")
    for folder in folders:
        write(folder, f"efficiency_{tag}.md",
              f"# Measured forwards ({tag})\n\n{settings}\n\n{markdown(rows, cols)}\n\n"
              f"## Verdict (lower is better for every ratio)\n\n{markdown(vrows, VERDICT_COLS)}\n")
        append_csv(os.path.join(folder, f"efficiency_{tag}.csv"),
                   [{**r, "batch": args.batch, "seq_len": args.seq_len, "scale": args.scale, "dtype": args.dtype,
                     "routing": args.routing, "device": args.device, **stamp} for r in rows])
        if any(row_config(r["model"]).chunks > 0 for r in rows):
            chart(rows, args.modes, os.path.join(folder, f"efficiency_{tag}.png"), "MoM / vanilla: " + title,
                  args.pair)
        if any(r["model"] == args.pair[1] for r in rows):
            claim_chart(arows, rows, args.modes, os.path.join(folder, f"efficiency_claim_{tag}.png"), title,
                        args.pair)
        names = [f"efficiency_{tag}.{ext}" for ext in ("csv", "md", "png")] + \
            [f"efficiency_claim_{tag}.png", f"{analytic}.csv", f"{analytic}.md"]
        print(f"wrote into {os.path.relpath(folder)}/: "
              + ", ".join(n for n in names if os.path.exists(os.path.join(folder, n))))
    print("\nVerdict: the paper's claims against this run (lower is better for every ratio)\n" + verdict_text(vrows))
    return arows, rows


def _pair(ap, text):
    """--pair "VANILLA,MOM": two presets, a vanilla (chunks=0) and a routed one of the same family, vocabulary and
    width (the MoM is cut from the vanilla's layers); the paper's pair when not given."""
    if text is None:
        return CLAIM_PAIR
    from mom.config import PRESETS

    names = [n.strip() for n in text.split(",")]
    if len(names) != 2 or any(n not in PRESETS for n in names):
        ap.error(f"--pair {text!r}: give two presets, VANILLA,MOM (presets: {', '.join(sorted(PRESETS))})")
    van, mom = (MoMConfig.from_name(n) for n in names)
    if van.chunks or not mom.chunks:
        ap.error(f"--pair {text!r}: the first must be a vanilla preset (chunks=0), the second a MoM")
    diff = [k for k in ("family", "n_embd", "n_head", "vocab_size") if getattr(van, k) != getattr(mom, k)]
    if diff or mom.vanilla().source_layers != van.n_bottom:
        ap.error(f"--pair {text!r}: {names[1]} is not cut from {names[0]} (differs in "
                 f"{', '.join(diff) or 'layer count'})")
    return tuple(names)


if __name__ == "__main__":
    main()

"""What the routers learned, and what happens without the modules they use least.

    python -m mom.analysis --ckpt runs/x/ckpt --data data/x --out analysis/x                   (routing)
    python -m mom.analysis --ckpt ... --data ... --out ... --remove-attn 0.5 --remove-ffn 0.25 \\
                           [--retrain-steps 100]                                               (+ removal)
    python -m mom.analysis --curves runs/a runs/b --out curves.png [--table table.md]          (loss curves)

Routing: over validation windows, for every chunk c and step h, the share of the B*T*K picks of each router
that went to each module and to SKIP (`pick_frequencies`): JSON + one heatmap PNG per chunk (rows = steps,
columns = modules then SKIP).

Removal (the paper's "removing 50% of the attention modules and 25% of the FFN modules"): per chunk, drop the
least-picked fraction * pool modules, rounded to the nearest with halves up (`removal_count`: 50% of 3 is 2;
`least_used`), i.e. a config with smaller n_attn / n_ffn whose pools keep the other modules' weights and whose
routers keep the logits rows of the kept modules and of SKIP (`remove_modules`): the router's softmax then runs
over the slots that are left. Validation loss before and after, and optionally after a short re-training of the
smaller model, against the full model re-trained alike (mom.train, same data).
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Dict, List, Optional

import numpy as np
import torch

from .cli import ArgumentParser
from .data import TokenData
from .io import atomic_write_json, atomic_write_text, read_json_file, read_jsonl, write_with


def _model(ckpt: str):
    from .model import MoMForCausalLM
    if os.path.isdir(os.path.join(ckpt, "ckpt")):
        ckpt = os.path.join(ckpt, "ckpt")  # a run folder
    return MoMForCausalLM.from_pretrained(ckpt)


def _windows(data: TokenData, n: Optional[int], batch_size: int, desc: str = "windows"):
    """Batches of the first n windows, with a tqdm bar (stderr) named desc."""
    from tqdm import tqdm

    n = data.n_windows if n is None else min(n, data.n_windows)
    for i in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False, file=sys.stderr):
        yield torch.stack([torch.from_numpy(data.window(j)) for j in range(i, min(i + batch_size, n))])


@torch.no_grad()
def evaluate(model, data: TokenData, n_windows: Optional[int] = None, batch_size: int = 16) -> float:
    """Mean LM loss over the first n_windows windows (the same windows mom.train validates on)."""
    model.eval()
    total, count = 0.0, 0
    for x in _windows(data, n_windows, batch_size, "validation loss"):
        total += float(model(x.to(model.device), labels=x.to(model.device)).lm_loss) * len(x)
        count += len(x)
    return total / count


@torch.no_grad()
def pick_frequencies(model, data: TokenData, n_windows: Optional[int] = None, batch_size: int = 16) -> dict:
    """{"attn": [C][H][n_attn + 1], "ffn": [C][H][n_ffn + 1]}: shares of each router's picks per module and SKIP
    (last column), over the first n_windows windows; each row sums to 1."""
    cfg = model.config
    if cfg.chunks == 0:
        raise ValueError("pick_frequencies: a vanilla model (chunks=0) has no routers")
    model.eval()
    counts = {"attn": np.zeros((cfg.chunks, cfg.depth, cfg.n_attn + 1)),
              "ffn": np.zeros((cfg.chunks, cfg.depth, cfg.n_ffn + 1))}
    for x in _windows(data, n_windows, batch_size, "routing statistics"):
        out = model(x.to(model.device))
        for c, steps in enumerate(out.routing):
            for h, r in enumerate(steps):  # ids [B, T, K], pool size = SKIP
                counts["attn"][c, h] += np.bincount(r.attn_ids.flatten().cpu().numpy(), minlength=cfg.n_attn + 1)
                counts["ffn"][c, h] += np.bincount(r.ffn_ids.flatten().cpu().numpy(), minlength=cfg.n_ffn + 1)
    return {k: (v / v.sum(-1, keepdims=True)).tolist() for k, v in counts.items()}


def plot_heatmaps(freqs: dict, out_dir: str, title: str = "") -> List[str]:
    """One PNG per chunk: attention and FFN pick shares, rows = steps, columns = modules + SKIP."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for c in range(len(freqs["attn"])):
        fig, axes = plt.subplots(1, 2, figsize=(10, 1.2 + 0.5 * len(freqs["attn"][c])), constrained_layout=True)
        for ax, kind in zip(axes, ("attn", "ffn")):
            m = np.asarray(freqs[kind][c])                               # [H, E + 1]
            im = ax.imshow(m, vmin=0, vmax=max(0.5, float(m.max())), cmap="viridis", aspect="auto")
            for (h, e), v in np.ndenumerate(m):
                ax.text(e, h, f"{100 * v:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 0.6 * max(0.5, float(m.max())) else "black")
            ax.set_xticks(range(m.shape[1]), [str(e) for e in range(m.shape[1] - 1)] + ["SKIP"])
            ax.set_yticks(range(m.shape[0]), [f"step {h}" for h in range(m.shape[0])])
            ax.set_xlabel(f"{'attention' if kind == 'attn' else 'FFN'} module")
            ax.set_title(f"{title} chunk {c}: {'attention' if kind == 'attn' else 'FFN'} picks (%)")
            fig.colorbar(im, ax=ax, shrink=0.8)
        path = os.path.join(out_dir, f"routing_chunk{c}.png")
        write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        plt.close(fig)
        paths.append(path)
    return paths


def removal_count(frac: float, pool: int) -> int:
    """How many of a pool's modules a removal share names: frac * pool rounded to the nearest integer, halves
    rounded up (floor(frac * pool + 1/2)): 50% of 3 modules is 2 (flooring would give 1), 50% of 5 is 3
    (Python's round, halves to even, would give 2), 25% of 4 is 1, 30% of 3 is 1. One rule for every pool
    size, so a share that falls midway removes the larger count whatever its parity."""
    return int(math.floor(frac * pool + 0.5))


def least_used(freqs: dict, frac_attn: float, frac_ffn: float) -> Dict[str, List[List[int]]]:
    """Per chunk, the removal_count(frac, pool) modules with the fewest picks summed over the chunk's steps
    (ties: the higher id goes first)."""
    out = {}
    for kind, frac in (("attn", frac_attn), ("ffn", frac_ffn)):
        if not 0 <= frac < 1:
            raise ValueError(f"removal fraction for {kind} must be in [0, 1), got {frac}")
        drops = []
        for chunk in freqs[kind]:
            use = np.asarray(chunk)[:, :-1].sum(0)                       # [E], SKIP column left out
            n = removal_count(frac, len(use))
            order = sorted(range(len(use)), key=lambda e: (use[e], -e))
            drops.append(sorted(order[:n]))
        out[kind] = drops
    return out


@torch.no_grad()
def remove_modules(model, drop_attn: List[List[int]], drop_ffn: List[List[int]]):
    """A copy of model without the listed modules (per chunk; every chunk drops as many): pools keep the other
    modules' slices, routers keep the logits rows of the kept modules and of SKIP (and the learned routing
    prior's columns alike), everything else is copied."""
    from .model import MoMForCausalLM

    cfg = model.config
    if cfg.shared_slots:
        raise NotImplementedError("remove_modules: shared_slots=True (several SKIP slots whose number depends on "
                                  "max(n_attn, n_ffn)) is not supported; the default layout is")
    if cfg.dense_routing:
        raise NotImplementedError("remove_modules: dense_routing models have no top-K to re-route")
    if len(drop_attn) != cfg.chunks or len(drop_ffn) != cfg.chunks:
        raise ValueError(f"need one drop list per chunk ({cfg.chunks})")
    na, nf = {len(d) for d in drop_attn}, {len(d) for d in drop_ffn}
    if len(na) != 1 or len(nf) != 1:
        raise ValueError("every chunk must drop as many attention (and as many FFN) modules: the config is shared")
    new_cfg = cfg.replace(n_attn=cfg.n_attn - na.pop(), n_ffn=cfg.n_ffn - nf.pop())  # validates top_k <= slots
    keep = {}
    for c in range(cfg.chunks):
        for kind, drops, E in (("attn", drop_attn[c], cfg.n_attn), ("ffn", drop_ffn[c], cfg.n_ffn)):
            if any(not 0 <= e < E for e in drops) or len(set(drops)) != len(drops):
                raise ValueError(f"chunk {c}: bad {kind} module ids {drops} for a pool of {E}")
            kept = [e for e in range(E) if e not in drops]
            slots = cfg.attn_slots if kind == "attn" else cfg.ffn_slots
            keep[(c, kind)] = (torch.tensor(kept), torch.tensor(kept + list(range(E, slots))))
    sd = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if parts[0] == "chunks" and parts[2] in ("attn_pool", "ffn_pool"):
            v = v.index_select(0, keep[(int(parts[1]), parts[2][:-5])][0])          # [E, ...] -> [E', ...]
        elif parts[0] == "chunks" and parts[2] in ("attn_router", "ffn_router") and parts[3] == "head":
            v = v.index_select(0, keep[(int(parts[1]), parts[2][:-7])][1])          # [S, ...] -> [S', ...]
        elif parts[0] == "chunks" and parts[2] in ("attn_router", "ffn_router") and parts[3] == "prior_bias":
            v = v.index_select(1, keep[(int(parts[1]), parts[2][:-7])][1])          # [depth, S] -> [depth, S']
        sd[k] = v
    p = next(model.parameters())
    new = MoMForCausalLM(new_cfg).to(device=p.device, dtype=p.dtype)
    new.load_state_dict(sd)
    return new


def removal_experiment(ckpt: str, data_dir: str, out: str, frac_attn: float, frac_ffn: float,
                       n_windows: Optional[int] = None, retrain_steps: int = 0, retrain_lr: float = 3e-4,
                       freqs: Optional[dict] = None) -> dict:
    """Val loss of the model, of the model without its least-used modules, and (retrain_steps > 0) of the
    smaller model and of the full model (the control) re-trained briefly on the training split with the same
batches and schedule (warmup 10% of the steps, cosine to 0.1 x retrain_lr)."""
    from .convert import save_pretrained

    model = _model(ckpt)
    T = model.config.n_positions
    val = TokenData(data_dir, "val", T)
    if freqs is None:
        freqs = pick_frequencies(model, val, n_windows)
    drops = least_used(freqs, frac_attn, frac_ffn)
    small = remove_modules(model, drops["attn"], drops["ffn"])
    res = {"ckpt": ckpt, "removed": drops, "n_attn": [model.config.n_attn, small.config.n_attn],
           "n_ffn": [model.config.n_ffn, small.config.n_ffn],
           "params": [model.num_parameters(), small.num_parameters()],
           "val_windows": n_windows or val.n_windows,
           "val_loss_before": evaluate(model, val, n_windows), "val_loss_after": evaluate(small, val, n_windows)}
    pruned = os.path.join(out, "pruned")
    save_pretrained(small, pruned)
    if retrain_steps > 0:  # the smaller model and, as the control, the full one: same steps, data and schedule
        from .train import TrainConfig, train
        full = os.path.join(out, "full")
        save_pretrained(model, full)
        for name, src in (("retrain", pruned), ("retrain_full", full)):
            tc = TrainConfig(model=os.path.join(src, "config.json"), init_from=src, data=data_dir,
                             out_dir=os.path.join(out, name), max_steps=retrain_steps, lr=retrain_lr,
                             warmup_steps=max(1, retrain_steps // 10), eval_interval=retrain_steps,
                             eval_windows=n_windows, ckpt_interval=0, log_interval=10, batch_size=16, seed=3,
                             threads=torch.get_num_threads(), progress=True)
            res[f"val_loss_{'after' if name == 'retrain' else 'full'}_retrain"] = train(tc)["val_loss"]
        res["retrain_steps"] = retrain_steps
    atomic_write_json(os.path.join(out, "removal.json"), res)
    return res


# --- loss curves of runs (the reproduction's plot) -------------------------------------------------------------
def _metrics(run: str):
    return read_jsonl(os.path.join(run, "metrics.jsonl"), "metrics file")  # a torn last line: dropped, warned


def _offset(run: str) -> int:
    """Tokens the run's init_from checkpoint was trained on (phase 2 continues phase 1's token axis)."""
    try:
        src = read_json_file(os.path.join(run, "run.json"), "run.json")["train"]["init_from"]
        src = src if os.path.exists(os.path.join(src, "metrics.jsonl")) else os.path.dirname(src.rstrip("/"))
        return max(r["tokens"] for r in _metrics(src)) + _offset(src)
    except (OSError, KeyError, TypeError, ValueError):
        return 0


def plot_curves(runs: List[str], out_png: str, table: Optional[str] = None) -> List[dict]:
    """Train (smoothed) and validation loss against tokens seen (counting the init_from run's tokens)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    summary = []
    for run in runs:
        m, off, name = _metrics(run), _offset(run), os.path.basename(run.rstrip("/"))
        tr = [(r["tokens"] + off, r["lm_loss"]) for r in m if "lm_loss" in r]
        va = [(r["tokens"] + off, r["val_loss"]) for r in m if "val_loss" in r]
        x, y = np.array(tr).T
        k = max(1, len(y) // 30)
        ys = np.convolve(y, np.ones(k) / k, mode="valid")
        axes[0].plot(x[k - 1:], ys, label=name)
        axes[1].plot(*np.array(va).T, marker="o", ms=3, label=name)
        last = [r for r in m if "lm_loss" in r][-1]
        summary.append({"run": name, "steps": last["step"], "tokens": last["tokens"], "start_tokens": off,
                        "val_loss": va[-1][1], "val_ppl": math.exp(va[-1][1]),
                        "tok_per_s": float(np.median([r["tok_per_s"] for r in m if "tok_per_s" in r]))})
    for ax, what in zip(axes, ("train LM loss (moving average)", "validation loss")):
        ax.set_xlabel("tokens seen (including the phase-1 checkpoint's)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    write_with(out_png, lambda tmp: fig.savefig(tmp, dpi=120, format=os.path.splitext(out_png)[1][1:] or "png"))
    plt.close(fig)
    if table:
        lines = ["| run | steps | tokens (this run) | val loss | val ppl | median tok/s |", "|---|---|---|---|---|---|"]
        lines += [f"| {s['run']} | {s['steps']} | {s['tokens']:,} | {s['val_loss']:.4f} | {s['val_ppl']:.2f} | "
                  f"{s['tok_per_s']:,.0f} |" for s in summary]
        atomic_write_text(table, "\n".join(lines) + "\n")
    return summary


def main(argv=None):
    p = ArgumentParser(prog="python -m mom.analysis", description=__doc__)
    p.add_argument("--ckpt", help="a checkpoint folder (or a run folder holding ckpt/)")
    p.add_argument("--data", help="a prepared data folder (its val split is used)")
    p.add_argument("--out", required=True, help="output folder (or PNG path with --curves)")
    p.add_argument("--windows", type=int, default=None, help="validation windows to use (default: all)")
    p.add_argument("--remove-attn", type=float, default=None,
                   help="share of attention modules to remove, least used first (in [0, 1))")
    p.add_argument("--remove-ffn", type=float, default=None,
                   help="share of FFN modules to remove, least used first (in [0, 1))")
    p.add_argument("--retrain-steps", type=int, default=0,
                   help="steps of re-training after the removal, beside the full model re-trained alike (default: 0)")
    p.add_argument("--retrain-lr", type=float, default=3e-4, help="learning rate of the re-training (default: 3e-4)")
    p.add_argument("--curves", nargs="+", help="run folders to plot (then --out is the PNG)")
    p.add_argument("--table", help="with --curves: also write a Markdown table here")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args(argv)
    for name, ok, rule in (("windows", a.windows is None or a.windows >= 1, ">= 1"),
                           ("retrain_steps", a.retrain_steps >= 0, ">= 0"),
                           ("retrain_lr", math.isfinite(a.retrain_lr) and a.retrain_lr > 0, "a finite number > 0"),
                           ("threads", a.threads is None or a.threads >= 1, ">= 1"),
                           ("remove_attn", a.remove_attn is None or 0 <= a.remove_attn < 1, "in [0, 1)"),
                           ("remove_ffn", a.remove_ffn is None or 0 <= a.remove_ffn < 1, "in [0, 1)")):
        if not ok:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be {rule}")
    try:
        _run(p, a)
    except (ValueError, OSError) as e:  # bad settings or files: one line naming the problem, exit code 2
        print(f"python -m mom.analysis: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


def _run(p, a):
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.curves:
        print(json.dumps(plot_curves(a.curves, a.out, a.table), indent=2))
        return
    if not (a.ckpt and a.data):
        p.error("--ckpt and --data are needed (or --curves)")
    model = _model(a.ckpt)
    val = TokenData(a.data, "val", model.config.n_positions)
    freqs = pick_frequencies(model, val, a.windows)
    os.makedirs(a.out, exist_ok=True)
    atomic_write_json(os.path.join(a.out, "routing.json"),
                      {"ckpt": a.ckpt, "columns": "modules 0..E-1, then SKIP", **freqs}, indent=1)
    for path in plot_heatmaps(freqs, a.out, os.path.basename(os.path.dirname(a.ckpt.rstrip("/"))) or ""):
        print(path)
    if a.remove_attn is not None or a.remove_ffn is not None:
        res = removal_experiment(a.ckpt, a.data, a.out, a.remove_attn or 0.0, a.remove_ffn or 0.0, a.windows,
                                 a.retrain_steps, a.retrain_lr, freqs=freqs)
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

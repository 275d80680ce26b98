"""The paper's quality claim at small scale: does the MoM beat the vanilla it was cut from?

    python -m benchmarks.quality --data data/X --out runs/quality --results benchmarks/results/quality_X [size]

One phase 1 (a vanilla GPT-2), then, for every seed, seven phase-2 arms on the same training data:
    plain        the paper's cut (routers new, mom.convert.from_gpt2)
    capacity     the same cut with capacity (expert-choice) routing (mom/capacity.py): each module takes
                 top_k / pool = half of each sequence's tokens in training, the same FLOPs as the plain arm without
                 SKIP; its validation (eval mode) routes by the causal threshold rule. (The function-preserving
                 cuts do not apply: they need module h to take every token at step h, a capacity of 1.)
    capacity_bce the capacity arm with the BCE aux loss (what teaches the routers the threshold rule) at
                 aux_loss_coef = CAPACITY_BCE_COEF instead of the shared default 0.01
    preserving   the function-preserving cut (mom/cut.py: routing prior, decays over --prior-frac of phase 2)
    learned      the function-preserving cut with a trained prior (routing_prior_learned: no forced decay;
                 routing can leave the layer order only where the loss's gradient moves it)
    vanilla      the vanilla trained on for the same steps (equal tokens)
    vanilla_flops  the vanilla trained on for flops_ratio x the steps (equal training FLOPs; the ratio is the
                 MoM's forward FLOPs per token over the vanilla's, mom.flops.expected, every pick a module)
Validation loss at phase 2's start (the cut itself) and at the end, mean and spread over seeds, curves (PNG),
a table (Markdown) and everything as JSON; then the removal experiment (50% attention, 25% FFN modules removed,
mom.analysis.removal_experiment) on the best MoM arm's first seed, without and with --retrain-steps of
re-training (against the full model re-trained alike).

Every arm is one plain command, printed before it runs and written to <out>/commands.sh:
    python -m mom.train --config <out>/configs/<arm>.json --progress false
A finished arm (its checkpoint at max_steps) is not run again: the script is rerunnable and resumes.
--arms runs a subset (the vanilla always: every arm is compared with it, seed by seed).
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time

from mom.cli import ArgumentParser
from mom.io import atomic_file, atomic_write_json, atomic_write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPACITY_BCE_COEF = 1.0  # the capacity_bce arm's aux_loss_coef (at 0.01 the threshold rule took 13-21% of the tokens)
ARMS = ("plain", "capacity", "capacity_bce", "preserving", "learned", "vanilla", "vanilla_flops")
MOM_ARMS = ("plain", "capacity", "capacity_bce", "preserving", "learned")

# full: the documented run (about 90 minutes on 2 cores); reduced: what fits in ~30 busy-CPU minutes; toy: CI
SIZES = {
    "full": dict(n_embd=128, block_size=128, batch_size=16, phase1_steps=1200, phase2_steps=600, eval_interval=100,
                 eval_windows=160, retrain_steps=100),
    "reduced": dict(n_embd=64, block_size=64, batch_size=16, phase1_steps=500, phase2_steps=200, eval_interval=50,
                    eval_windows=120, retrain_steps=50),
    "toy": dict(n_embd=32, block_size=32, batch_size=4, phase1_steps=6, phase2_steps=4, eval_interval=2,
                eval_windows=4, retrain_steps=2),
}


def model_overrides(a, vocab_size: int) -> dict:
    """The reproduction's layout (docs/training.md): 1 bottom block, one chunk of 4 modules x depth 4, K = 2,
    anchor, 1 top block; cut from a 7-layer vanilla."""
    return {"vocab_size": vocab_size, "n_positions": a.block_size, "n_embd": a.n_embd, "n_head": 4,
            "router_dim": max(16, a.n_embd // 2), "n_bottom": 1, "chunks": 1, "n_attn": 4, "n_ffn": 4, "depth": 4,
            "top_k": 2, "anchor": True, "n_top": 1, "backend": "torch"}


def mom_arms(a) -> tuple:
    """The MoM arms among the ones this run trains."""
    return tuple(x for x in MOM_ARMS if x in a.arms)


def flops_ratio(ov: dict) -> float:
    from mom.config import MoMConfig
    from mom.flops import expected
    cfg = MoMConfig.from_name("tiny", **ov)
    T = cfg.n_positions
    return expected(cfg, 1, T).causal_total / expected(cfg.vanilla(), 1, T).causal_total


def arm_configs(a, vocab_size: int) -> dict:
    """{name: mom.train config dict}: phase1 and every (arm, seed)."""
    ov = model_overrides(a, vocab_size)
    common = {"model": "tiny", "data": a.data, "batch_size": a.batch_size, "eval_windows": a.eval_windows,
              "log_interval": 10, "threads": a.threads}
    p1 = os.path.join(a.out, "phase1")
    out = {"phase1": {**common, "model_overrides": ov, "vanilla": True, "max_steps": a.phase1_steps,
                      "warmup_steps": max(1, a.phase1_steps // 12), "lr": 2e-3, "eval_interval": a.eval_interval,
                      "ckpt_interval": 0, "seed": 1, "out_dir": p1}}
    ratio = flops_ratio(ov)
    prior_steps = max(1, round(a.prior_frac * a.phase2_steps))
    for seed in a.seeds:
        for arm in a.arms:
            steps = round(ratio * a.phase2_steps) if arm == "vanilla_flops" else a.phase2_steps
            o = dict(ov)
            if arm == "preserving":
                o.update(routing_prior=50.0, routing_prior_steps=prior_steps)
            elif arm == "learned":
                o.update(routing_prior=50.0, routing_prior_learned=True)
            elif arm == "capacity":
                o.update(routing="expert_choice")
            elif arm == "capacity_bce":
                o.update(routing="expert_choice", aux_loss_coef=CAPACITY_BCE_COEF)
            out[f"{arm}_s{seed}"] = {**common, "model_overrides": o, "vanilla": arm.startswith("vanilla"),
                                     "init_from": p1, "max_steps": steps, "warmup_steps": max(1, steps // 12),
                                     "lr": 1e-3, "eval_interval": a.eval_interval, "ckpt_interval": 0,
                                     "seed": seed + 1, "out_dir": os.path.join(a.out, f"{arm}_s{seed}")}
    return out


def finished(cfg: dict) -> bool:
    try:
        with open(os.path.join(cfg["out_dir"], "ckpt", "train_state.json")) as f:
            return json.load(f)["step"] >= cfg["max_steps"]
    except (OSError, ValueError, KeyError):
        return False


def run_arm(name: str, cfg: dict, cfg_dir: str, log_dir: str, in_process: bool):
    path = os.path.join(cfg_dir, f"{name}.json")
    atomic_write_json(path, cfg, indent=1)
    cmd = [sys.executable, "-m", "mom.train", "--config", path, "--progress", "false"]
    if finished(cfg):
        print(f"[quality] {name}: done already", flush=True)
        return
    if os.path.isdir(cfg["out_dir"]):  # an interrupted run: resume it
        cmd.append("--resume")
    print(f"[quality] {name}: {shlex.join(cmd[1:])}", flush=True)
    t0 = time.time()
    if in_process:  # tests: no subprocess start-up
        from mom.train import TrainConfig, train
        train(TrainConfig(**{**cfg, "progress": False}, resume="--resume" in cmd))
    else:
        with open(os.path.join(log_dir, f"{name}.log"), "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    print(f"[quality] {name}: {time.time() - t0:.0f} s", flush=True)


def val_rows(run: str):
    rows = []
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "val_loss" in r:
                rows.append((r["step"], r["tokens"], r["val_loss"]))
    return rows


def start_losses(a, cfgs: dict) -> dict:
    """Validation loss of the phase-1 vanilla and of each cut before any phase-2 step (the cut's cost)."""
    import torch
    from mom.analysis import evaluate
    from mom.config import MoMConfig
    from mom.convert import from_gpt2, load_state_dict
    from mom.data import TokenData
    from mom.model import MoMForCausalLM

    val = TokenData(a.data, "val", a.block_size)
    sd = load_state_dict(os.path.join(a.out, "phase1", "ckpt"))
    out = {}
    for arm in ("vanilla",) + mom_arms(a):
        c = cfgs[f"{arm}_s{a.seeds[0]}"]
        cfg = MoMConfig.from_name("tiny", **c["model_overrides"])
        torch.manual_seed(c["seed"])
        model = MoMForCausalLM.from_pretrained(os.path.join(a.out, "phase1", "ckpt")) if arm == "vanilla" \
            else from_gpt2(sd, cfg)
        out[arm] = evaluate(model, val, a.eval_windows)
    return out


def capacity_agreement(a, cfgs: dict) -> dict:
    """{seed: mom.capacity.agreement of the capacity arm's final checkpoint on the validation windows}."""
    from mom.capacity import agreement
    from mom.data import TokenData
    from mom.model import MoMForCausalLM

    val = TokenData(a.data, "val", a.block_size)
    return {f"{arm}, seed {s}": agreement(MoMForCausalLM.from_pretrained(os.path.join(cfgs[f"{arm}_s{s}"]["out_dir"],
                                                                                   "ckpt")), val, n_windows=a.eval_windows)
            for arm in ("capacity", "capacity_bce") if arm in a.arms for s in a.seeds}


def summarise(a, cfgs: dict, start: dict) -> dict:
    res = {"arms": {}, "start": start, "phase1": val_rows(cfgs["phase1"]["out_dir"])[-1][2]}
    for arm in a.arms:
        finals = [val_rows(cfgs[f"{arm}_s{s}"]["out_dir"])[-1][2] for s in a.seeds]
        res["arms"][arm] = {"final": finals, "mean": statistics.mean(finals),
                            "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                            "min": min(finals), "max": max(finals),
                            "steps": cfgs[f"{arm}_s{a.seeds[0]}"]["max_steps"]}
    van = res["arms"]["vanilla"]["final"]
    for arm in mom_arms(a) + tuple(x for x in a.arms if x == "vanilla_flops"):  # paired by seed (same data order per seed... per arm)
        d = [x - y for x, y in zip(res["arms"][arm]["final"], van)]
        res["arms"][arm]["minus_vanilla"] = {"mean": statistics.mean(d),
                                             "std": statistics.stdev(d) if len(d) > 1 else 0.0}
    return res


def plot(a, cfgs: dict, png: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    p1 = val_rows(cfgs["phase1"]["out_dir"])
    off = p1[-1][1]
    ax.plot([t for _, t, _ in p1], [v for _, _, v in p1], "k-", label="phase 1 (vanilla)")
    colors = {"plain": "tab:red", "capacity": "tab:brown", "capacity_bce": "tab:olive", "preserving": "tab:green", "learned": "tab:orange",
              "vanilla": "tab:blue", "vanilla_flops": "tab:purple"}
    for arm in a.arms:
        for i, s in enumerate(a.seeds):
            r = val_rows(cfgs[f"{arm}_s{s}"]["out_dir"])
            ax.plot([off + t for _, t, _ in r], [v for _, _, v in r], "-", color=colors[arm], alpha=0.7,
                    label=arm if i == 0 else None)
    lo = min(v for _, _, v in p1)
    ax.set_ylim(lo - 0.4, p1[min(2, len(p1) - 1)][2])
    ax.set_xlabel("training tokens (phase 2 continues phase 1's axis)")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title("MoM phase 2 arms, one line per seed")
    ax.legend()
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def table(res: dict, a) -> str:
    n = len(a.seeds)
    lines = [f"| arm | phase-2 steps | val loss mean ± std over {n} seeds | min / max | vs vanilla (paired) |",
             "|---|---|---|---|---|"]
    for arm in a.arms:
        r = res["arms"][arm]
        d = r.get("minus_vanilla")
        dv = f"{d['mean']:+.4f} ± {d['std']:.4f}" if d else "-"
        lines.append(f"| {arm} | {r['steps']} | {r['mean']:.4f} ± {r['std']:.4f} | {r['min']:.4f} / {r['max']:.4f}"
                     f" | {dv} |")
    s = res["start"]
    lines += ["", f"phase 1 final val loss {res['phase1']:.4f}; at phase 2's start (before any step): vanilla "
              f"{s['vanilla']:.4f}, " + ", ".join(f"{arm} cut {s[arm]:.4f} ({s[arm] - s['vanilla']:+.4f})"
                                                  for arm in mom_arms(a))]
    if res.get("agreement"):
        ag = res["agreement"]
        lines += ["", "capacity arms, training's choice (top capacity per sequence) against inference's (the causal "
                  "threshold rule) on the validation windows, per seed: " + "; ".join(
                      f"{s}: {100 * g['agreement']:.1f}% of decisions alike, taken {100 * g['taken_train']:.0f}% "
                      f"vs {100 * g['taken_threshold']:.0f}%, val loss {g['val_loss_train']:.4f} (training's choice) "
                      f"vs {g['val_loss_threshold']:.4f} (inference's)" for s, g in ag.items())]
    if "removal" in res:
        r = res["removal"]
        lines += ["", f"removal on {res['removal_arm']} (seed {a.seeds[0]}): n_attn {r['n_attn']}, n_ffn {r['n_ffn']}:"
                  f" val {r['val_loss_before']:.4f} -> {r['val_loss_after']:.4f} without re-training"
                  + (f"; after {r['retrain_steps']} re-training steps {r['val_loss_after_retrain']:.4f} vs the full "
                     f"model re-trained alike {r['val_loss_full_retrain']:.4f}" if "retrain_steps" in r else "")]
    return "\n".join(lines) + "\n"


def header(res: dict, a) -> str:
    st = res["settings"]
    return (f"# benchmarks/quality.py, size {res['size']}{' (a REDUCED run, not the full size)' if res['size'] != 'full' else ''}\n\n"
            f"date {res['date']}; {res['cpus']} CPUs ({res['host']}), torch {res['torch']}, fp32, "
            f"{st['threads']} thread(s) per process, {st.get('jobs', 1)} process(es) at a time; "
            f"commit {res.get('commit', '?')}; wall {res['wall_s']} s\n\n"
            f"    python {' '.join(res['argv'])}\n\n"
            f"data {a.data}; width {st['n_embd']}, T {st['block_size']}, batch {st['batch_size']}, phase 1 "
            f"{st['phase1_steps']} steps, phase 2 {st['phase2_steps']} steps, seeds {st['seeds']}, prior decays over "
            f"{st['prior_frac']} of phase 2, flops ratio {res['flops_ratio']:.3f}, {st['eval_windows']} validation "
            f"windows\n\n")


def parse(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.quality", description=__doc__)
    p.add_argument("--data", required=True, help="a prepared data folder (python -m mom.data)")
    p.add_argument("--out", default="runs/quality", help="folder for the runs, their configs and commands.sh")
    p.add_argument("--results", default=None, help="prefix of the result files (default: <out>/quality)")
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="full (the committed run), reduced or toy")
    for k, v in SIZES["full"].items():
        p.add_argument(f"--{k.replace('_', '-')}", dest=k, type=int, default=None,
                       help=f"overrides the size's {k} (full: {v})")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="phase-2 seeds (default 1 2 3)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                   help="the phase-2 arms to run (default: all; vanilla is always run: every arm is compared with it)")
    p.add_argument("--prior-frac", type=float, default=0.5, help="the prior decays over this share of phase 2")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--jobs", type=int, default=1, help="phase-2 arms run at a time (each its own process with "
                                                       "--threads threads; on 2 cores: --jobs 2 --threads 1)")
    p.add_argument("--no-removal", action="store_true", help="skip the removal experiment")
    p.add_argument("--in-process", action="store_true", help="run mom.train in this process (tests)")
    a = p.parse_args(argv)
    for k, v in SIZES[a.size].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.results = a.results or os.path.join(a.out, "quality")
    a.arms = tuple(x for x in ARMS if x in set(a.arms) | {"vanilla"})  # in the table's order
    return a


def main(argv=None) -> dict:
    a = parse(argv)
    import torch
    torch.set_num_threads(a.threads)
    with open(os.path.join(a.data, "meta.json")) as f:
        vocab = json.load(f)["vocab_size"]
    cfg_dir, log_dir = os.path.join(a.out, "configs"), os.path.join(a.out, "logs")
    for d in (cfg_dir, log_dir, os.path.dirname(a.results) or "."):
        os.makedirs(d, exist_ok=True)
    cfgs = arm_configs(a, vocab)
    atomic_write_text(os.path.join(a.out, "commands.sh"), "# one command per arm (phase1 first)\n" + "".join(
        f"python -m mom.train --config {cfg_dir}/{n}.json --progress false\n" for n in cfgs))
    t0 = time.time()
    order = ["phase1"] + [f"{arm}_s{s}" for s in a.seeds for arm in a.arms]  # seed-major: partial runs are usable
    run_arm(order[0], cfgs[order[0]], cfg_dir, log_dir, a.in_process)  # phase 1: every arm starts from it
    if a.jobs > 1 and not a.in_process:  # the phase-2 arms are independent: a.jobs processes at a time
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(a.jobs) as pool:
            for f in [pool.submit(run_arm, n, cfgs[n], cfg_dir, log_dir, False) for n in order[1:]]:
                f.result()  # (re-raises a failed arm's error)
    else:
        for name in order[1:]:
            run_arm(name, cfgs[name], cfg_dir, log_dir, a.in_process)
    start = start_losses(a, cfgs)
    res = summarise(a, cfgs, start)
    if {"capacity", "capacity_bce"} & set(a.arms):
        res["agreement"] = capacity_agreement(a, cfgs)
    if not a.no_removal and mom_arms(a):
        from mom.analysis import removal_experiment
        best = min(mom_arms(a), key=lambda arm: res["arms"][arm]["mean"])
        res["removal_arm"] = best
        removal = os.path.join(a.out, "removal")
        shutil.rmtree(removal, ignore_errors=True)  # recomputed on every run (minutes): the best arm may have changed
        res["removal"] = removal_experiment(os.path.join(cfgs[f"{best}_s{a.seeds[0]}"]["out_dir"], "ckpt"), a.data,
                                            removal, 0.5, 0.25, a.eval_windows, a.retrain_steps, 3e-4)
    res.update(size=a.size, argv=sys.argv if argv is None else ["benchmarks/quality.py"] + list(argv),
               settings={k: getattr(a, k) for k in list(SIZES["full"]) + ["seeds", "arms", "prior_frac", "threads", "jobs"]},
               flops_ratio=flops_ratio(model_overrides(a, vocab)), wall_s=round(time.time() - t0),
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), host=platform.platform(),
               cpus=os.cpu_count(), torch=torch.__version__)
    try:
        res["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                       cwd=ROOT).stdout.strip() or "unknown"
    except OSError:  # no git on this machine
        res["commit"] = "unknown"
    atomic_write_json(a.results + ".json", res, indent=1)  # an interrupted run keeps the previous results
    atomic_write_text(a.results + ".md", header(res, a) + table(res, a))
    plot(a, cfgs, a.results + ".png")
    print(table(res, a))
    return res


if __name__ == "__main__":
    main()

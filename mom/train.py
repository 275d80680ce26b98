"""Two-phase pre-training (docs/method.md): phase 1 a vanilla GPT-2, phase 2 the MoM cut from it by `from_gpt2`.

    python -m mom.train --config configs/tiny.json [--max-steps 50] [--set lr=3e-4 --set model_overrides.n_embd=64]
    torchrun --standalone --nproc_per_node=8 -m mom.train --config ...      (DDP; --distributed fsdp: FSDP2)

One script for one CPU, one GPU or many (torchrun sets RANK/WORLD_SIZE; gloo on CPU, NCCL on CUDA):

    data (memory-mapped uint16 windows, order = f(seed, step)) -> model (preset or config.json, `vanilla`
    = phase 1, `init_from` = a phase-1 checkpoint cut into this model) -> AdamW, warmup + cosine
    -> per step: grad_accum micro-batches (bf16 autocast on CUDA), all-reduce, clip, step
    -> every eval_interval: validation loss / perplexity; every ckpt_interval: checkpoint (atomic folder swap)

Defaults are the authors' recipe (docs/method.md): AdamW (0.9, 0.95, eps 1e-5), lr 1e-3 with linear warmup (500)
then cosine to min_lr_ratio * lr (0.1, our choice: the paper says "cosine" only), weight decay 0.1 on
matrices only (no decay on biases, LayerNorms, embeddings), clip 1.0, no dropout (the model has none).

Output folder (out_dir):
    run.json        the run's identity (model config, data, hyper-parameters); another run is refused here
    metrics.jsonl   one row per logged step ({"step", "loss", ...}) and per evaluation ({"val_loss", ...})
    ckpt/           model.safetensors + config.json (MoMForCausalLM.from_pretrained; after `import mom.hf`,
                    AutoModelForCausalLM and pipeline too),
                    optimizer.pt, train_state.json (step, tokens, RNG states)

Crash safety (mom.io): every setting is checked (TrainConfig.__post_init__, prepare_run) and every checkpoint
file read before anything is written. run.json and ckpt/ are replaced atomically (ckpt/ as a whole: temp
folder, fsync, swap, the old one kept until the new one is complete); metrics.jsonl grows by whole-line
appends. A kill at any moment leaves the old checkpoint or the new one: the next run finishes or undoes the
swap, deletes temp leftovers, and drops a torn last metrics line with a warning naming the file.

Resume (`--resume`): model, optimiser, step and RNG come back from ckpt/; the data order is a function of
(seed, step), so a resumed run reads the same batches and logs the same losses as an uninterrupted one
(tests/test_train.py and tests/test_hardening_checkpoints.py check it, the latter after kills at every step
of a checkpoint save). A run killed before its first checkpoint resumes from step 0. `stop_after` ends a run
early without changing its schedule.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist

from .cli import ArgumentParser
from .config import BACKENDS, PRESETS, Checker, ConfigError, MoMConfig, dataclass_from_dict
from .data import TokenData, data_folder, read_meta
from .io import (FileFormatError, append_line, atomic_dir, atomic_write_json, atomic_write_text,
                 clean_stale_temps, read_json_file, read_jsonl, recover_dir, require_keys, torch_load)

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bf16", "fp32")


def setting(default, help: str, **kw):
    """A TrainConfig field with its description (the `--help` of `python -m mom.train`; transformers'
    HfArgumentParser keeps descriptions the same way, in the field's metadata)."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    # --- model ---------------------------------------------------------------------------------------------
    model: str = setting("tiny", "a preset name (MoMConfig.from_name) or a path to a config.json")
    model_overrides: dict = setting({}, "MoMConfig fields that win over the preset's (a JSON object; "
                                        "--set model_overrides.n_embd=64 sets one)")
    vanilla: bool = setting(False, "phase 1: train the model's .vanilla() GPT-2 / Llama (the layers phase 2 cuts)")
    init_from: Optional[str] = setting(None, "a checkpoint folder or file: a vanilla one is cut into this model "
                                             "(phase 2); a routed one must have this exact config")
    # --- data ----------------------------------------------------------------------------------------------
    data: str = setting("data/sample", "a folder written by python -m mom.data")
    block_size: Optional[int] = setting(None, "T, tokens per sequence (null: the model's n_positions)")
    batch_size: int = setting(8, "sequences per micro-batch and rank")
    global_batch_size: Optional[int] = setting(None, "sequences per optimiser step over all ranks (null: batch_size "
                                                     "x world size; else grad_accum = global_batch_size / "
                                                     "(batch_size x world size))")
    seed: int = setting(1234, "model init and data order")
    # --- optimisation (docs/method.md) ------------------------------------------------------------------------
    max_steps: int = setting(1000, "the schedule's length in optimiser steps")
    stop_after: Optional[int] = setting(None, "stop after this step (an interruption: the schedule is unchanged)")
    lr: float = setting(1e-3, "peak learning rate")
    min_lr_ratio: float = setting(0.1, "the cosine decays to min_lr_ratio x lr at max_steps")
    warmup_steps: int = setting(500, "linear warmup steps")
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    eps: float = setting(1e-5, "AdamW epsilon")
    grad_clip: float = setting(1.0, "max global gradient norm (0: off)")
    # --- evaluation, logging, checkpoints ------------------------------------------------------------------
    eval_interval: int = setting(100, "steps between validation losses (and one at the end)")
    eval_windows: Optional[int] = setting(None, "validation sequences (the first ones of val.bin; null: all)")
    log_interval: int = setting(10, "steps between logged training losses")
    ckpt_interval: int = setting(500, "steps between checkpoints (and one at the end; 0: at the end only)")
    out_dir: str = setting("runs/tiny", "the run's folder: run.json, metrics.jsonl, ckpt/")
    resume: bool = setting(False, "continue from out_dir/ckpt (must be the same run)")
    # --- execution -----------------------------------------------------------------------------------------
    device: str = setting("auto", "auto (cuda:LOCAL_RANK if available, else cpu) | cpu | cuda")
    dtype: str = setting("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32")
    backend: Optional[str] = setting(None, "the model's routed-op backend: reference | torch | triton | auto "
                                           "(null: keep the config's)")
    distributed: str = setting("ddp", "under torchrun: ddp | fsdp (FSDP2 fully_shard per block)")
    compile: bool = setting(False, "torch.compile the model")
    threads: Optional[int] = setting(None, "torch.set_num_threads (CPU); 1 is fastest for tiny models on a busy CPU")
    peak_flops: Optional[float] = setting(None, "accelerator peak FLOP/s for MFU (e.g. 989e12, H100 bf16 dense)")
    progress: bool = setting(True, "a tqdm progress bar on rank 0")

    def __post_init__(self):
        """Every field's type and range, before anything is read, trained or written (ConfigError names the
        field and the value). Checks that need the data or the model (block_size <= n_positions, the batch
        split over ranks) are in prepare_run."""
        need = Checker(self, "TrainConfig")

        def opt(name, check):
            if getattr(self, name) is not None:
                check(name)

        need.str("model", "must be a preset name or a path to a config.json")
        need(isinstance(self.model_overrides, dict) and all(isinstance(k, str) for k in self.model_overrides),
             "model_overrides", "must be a dict of MoMConfig fields")
        known = {f.name for f in dataclasses.fields(MoMConfig)}
        for key in self.model_overrides:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                raise ConfigError(f"TrainConfig.model_overrides: {key!r} is not a MoMConfig field"
                                  + (f" (did you mean {close[0]!r}?)" if close else ""), field=f"model_overrides.{key}")
        opt("init_from", lambda n: need.str(n, "must be None or a checkpoint path"))
        need.str("data", "must be a prepared data folder")
        need.str("out_dir", "must be a folder path")
        for name in ("vanilla", "resume", "compile", "progress"):
            need.bool(name)
        for name, lo in (("batch_size", 1), ("seed", 0), ("max_steps", 1), ("warmup_steps", 0),
                         ("eval_interval", 1), ("log_interval", 1), ("ckpt_interval", 0)):
            need.int(name)
            need(getattr(self, name) >= lo, name, f"must be >= {lo}" + (" (0 = only at the end)" if
                                                                           name == "ckpt_interval" else ""))
        need(self.seed < 2 ** 63, "seed", "must be < 2**63")
        for name, lo in (("block_size", 2), ("global_batch_size", 1), ("stop_after", 1), ("eval_windows", 1),
                         ("threads", 1)):
            if getattr(self, name) is not None:
                need.int(name, "must be None or an int")
                need(getattr(self, name) >= lo, name, f"must be None or >= {lo}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "grad_clip"):
            need.number(name)
        need(self.lr > 0, "lr", "must be > 0")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        need(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        need(self.eps > 0, "eps", "must be > 0")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)")
        if self.peak_flops is not None:
            need.number("peak_flops", "must be None or a finite number")
            need(self.peak_flops > 0, "peak_flops", "must be None or > 0")
        need.choice("device", DEVICES)
        need.choice("dtype", DTYPES)
        need.choice("distributed", ("ddp", "fsdp"))
        if self.backend is not None:
            need.choice("backend", BACKENDS)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return dataclass_from_dict(cls, d)


# Keys that define a run's results; resuming (or reusing out_dir) with other values is refused.
_IDENTITY = ("vanilla", "init_from", "block_size", "global_batch_size", "seed", "max_steps", "lr", "min_lr_ratio",
             "warmup_steps", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "eval_windows")


class RunError(RuntimeError):
    """A problem with the inputs or the output folder, found before any training step."""


# --- configuration -------------------------------------------------------------------------------------------
def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class CommandLineError(ConfigError):
    """A bad setting that came from the command line (an option or --set), not from the config file."""


def _from_command_line(field: Optional[str], overrides: dict) -> Optional[str]:
    """The override key that set `field` (a TrainConfig field, "model_overrides.<name>", or a MoMConfig field
    through model_overrides), or None when the value came from the file or the defaults."""
    if field is None:
        return None
    for key in (field, f"model_overrides.{field}", field.split(".")[0]):
        if key in overrides:
            return key
    return None


def load_config(path: Optional[str], overrides: dict, origins: Optional[dict] = None) -> TrainConfig:
    """A TrainConfig from a JSON (.json) or TOML (.toml) file, then `overrides` ("a.b" keys reach into dicts),
    with the model it describes checked too (MoMConfig's own validation). A bad value is a ConfigError naming the
    file, or a CommandLineError naming the option when an override set it (`origins`: key -> how it was
    written on the command line)."""
    origins = origins or {}
    d = {}
    if path:
        if not os.path.exists(path):
            raise RunError(f"config file {path} not found")
        if path.endswith(".toml"):
            import tomllib
            try:
                with open(path, "rb") as f:
                    d = tomllib.load(f)
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise FileFormatError(f"{path}: training config is not valid TOML ({e})") from e
        else:
            d = read_json_file(path, "training config")
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = d
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CommandLineError(f"{origins.get(key, '--set ' + key)}: {'.'.join(parents[:i + 1])} is "
                                       f"{node!r}, not a dict of fields", field=key)
        node[last] = value
    try:
        tc = TrainConfig.from_dict(d)
        model_config(tc)
    except ConfigError as e:
        key = _from_command_line(e.field, overrides)
        if key is not None:
            raise CommandLineError(f"{origins.get(key, '--set ' + key)}: {e}", field=e.field) from e
        raise ConfigError(f"{path}: {e}" if path else str(e), field=e.field) from e
    return tc


def model_config(tc: TrainConfig) -> MoMConfig:
    """The MoMConfig this run trains (backend overrides are execution-only)."""
    if tc.model in PRESETS:
        try:
            cfg = MoMConfig.from_name(tc.model, **tc.model_overrides)
        except ConfigError as e:
            raise ConfigError(f"model {tc.model!r} with model_overrides {tc.model_overrides}: {e}", field=e.field) from e
    elif os.path.isfile(tc.model):
        from .convert import read_config
        cfg = read_config(tc.model, **tc.model_overrides)
    else:
        raise RunError(f"model {tc.model!r} is neither a preset ({sorted(PRESETS)}) nor a config.json file")
    if tc.vanilla:
        cfg = cfg.vanilla()
    if tc.backend is not None:
        cfg = cfg.replace(backend=tc.backend)
    return cfg


def _identity(tc: TrainConfig, cfg: MoMConfig, meta: dict) -> dict:
    arch = {k: v for k, v in cfg.to_dict().items() if k not in ("backend", "checkpoint_chunks")}
    return {"model": arch, "train": {k: getattr(tc, k) for k in _IDENTITY},
            "data": {"tokenizer": meta["tokenizer"], "vocab_size": meta["vocab_size"],
                     "train_tokens": meta["train_tokens"], "val_tokens": meta["val_tokens"]}}


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


# --- schedule, optimiser, FLOPs ----------------------------------------------------------------------------
def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup from 0 over warmup_steps, then cosine from lr to min_lr_ratio * lr at max_steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = max(1, tc.max_steps - tc.warmup_steps)
    t = min(1.0, (step - tc.warmup_steps) / span)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def no_decay(name: str) -> bool:
    """Biases, LayerNorm gains/biases (ln_1, ln_2, ln_f, pools' ln_weight) and embeddings are not decayed."""
    parts = name.split(".")
    return "bias" in parts[-1] or any(p.startswith("ln") for p in parts) or parts[0] in ("wte", "wpe")


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if no_decay(name) else decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, foreach=False)


def train_flops_per_token(cfg: MoMConfig, T: int) -> float:
    """fwd + bwd FLOPs per token = 3 x forward (docs/method.md's cost model, every pick a module: an upper bound)."""
    try:
        from . import flops
        return 3.0 * flops.expected(cfg, 1, T).total / T
    except Exception:  # mom.flops missing or changed: the same cost model, inline
        D, F, r = cfg.n_embd, cfg.ffn_dim, cfg.router_dim
        fixed = 8 * D * D + 4 * D * F + 4 * T * D
        router = 2 * (3 * r * D + 3 * r * r) + 2 * r * max(cfg.attn_slots, cfg.ffn_slots)
        step = cfg.top_k * (8 * D * D + 4 * D * F) + 4 * T * D + 2 * router
        n_fixed = cfg.n_bottom + cfg.n_top + cfg.chunks * int(cfg.anchor)
        return 3.0 * (n_fixed * fixed + cfg.chunks * cfg.depth * step + 2 * D * cfg.vocab_size)


# --- one optimiser step -------------------------------------------------------------------------------------
def backward_micro_batches(fwd, batch_of, accum: int, sync=None, autocast=contextlib.nullcontext) -> torch.Tensor:
    """Forward + backward of one optimiser step's `accum` micro-batches, batch_of(micro) -> ids [B, T].

    Each micro-batch's loss is divided by accum, so the gradients add up to those of the mean loss over the
    step's accum x B sequences: one micro-batch of all of them gives the same gradients, to rounding (the LM
    loss is a mean over a micro-batch's tokens, and every micro-batch holds as many). The balance loss is the
    exception: each micro-batch's f and P are taken over its own tokens (the loss is not linear in them), so
    with aux_loss_coef > 0 accumulation is close to, not equal to, one large batch.
    sync(last) -> a context for the micro-batch's forward + backward (the gradient all-reduce of DDP / FSDP runs
    on the last micro-batch only); autocast() -> the forward's autocast context.
    Returns the micro-batches' (loss, lm_loss, aux_loss), summed: float64 [3] on the CPU."""
    sums = torch.zeros(3, dtype=torch.float64)
    for micro in range(accum):
        x = batch_of(micro)
        with sync(micro == accum - 1) if sync is not None else contextlib.nullcontext():
            with autocast():
                out = fwd(x, labels=x)
            (out.loss / accum).backward()
        sums += torch.tensor([float(out.loss.detach()), float(out.lm_loss.detach()), float(out.aux_loss.detach())],
                             dtype=torch.float64)
    return sums


def optimizer_step(model, optimizer, grad_clip: float) -> float:
    """One optimiser step on the accumulated gradients: their global norm is clipped to grad_clip first (0: no
    clipping), so AdamW steps with the clipped gradient; then the gradients are cleared (set to None).
    Returns the norm before clipping (nan without clipping)."""
    if grad_clip > 0:
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    else:
        gnorm = float("nan")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return gnorm


def _grad_sync(model, raw, d: "Dist", tc: TrainConfig, last: bool):
    """The context of one micro-batch's backward: gradients are reduced over ranks with the last one only
    (DDP: no_sync() before it; FSDP: set_requires_gradient_sync)."""
    if d.on and tc.distributed == "fsdp":
        raw.set_requires_gradient_sync(last)
    if d.on and tc.distributed == "ddp" and not last:
        return model.no_sync()
    return contextlib.nullcontext()


# --- distributed -------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    on: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(tc: TrainConfig) -> tuple:
    d = Dist()
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)), True)
    want = tc.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if d.on and not dist.is_initialized():
        # imported before the group exists: its collectives take `group=group.WORLD` as a default argument, so
        # imported later (DDP and fully_shard import it) it would hold the group forever (see teardown_distributed)
        from torch.distributed import nn as _dist_nn  # noqa: F401
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def teardown_distributed(ok: bool):
    """Destroy the process group. ok: the run ended normally on this rank, so every rank first meets the others
    at a barrier (no rank tears down while another still runs collectives or writes the checkpoint); after an
    error no rank waits.

    destroy_process_group() frees the group only when nothing else holds it, and its backend owns threads
    (gloo: two workers and a TCP loop). torch.distributed.nn.functional holds the default group in default
    arguments when imported after it exists (DDP and fully_shard import it): setup_distributed imports it
    first, and the gc pass frees the wrappers' reference cycles, so a DDP run's group and threads are gone
    here. After FSDP2 they are not: DTensor's module-level caches keep its device mesh, and the mesh the group.
    A backend left alive is destroyed during interpreter shutdown, where a worker thread releasing a tensor
    owned by Python must take the GIL of a finalizing interpreter: Python ends the thread and std::terminate
    aborts the process ("terminate called without an active exception", SIGABRT), now and then, after a run
    that finished. `main` therefore ends a torchrun worker with os._exit (_exit_command)."""
    if not dist.is_initialized():
        return
    import gc

    if ok:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def _all_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.on:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world
    return x


# --- checkpoints -------------------------------------------------------------------------------------------
def _full_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(out_dir: str, model, optimizer, tc: TrainConfig, cfg: MoMConfig, state: dict, d: Dist):
    """out_dir/ckpt, replaced as a whole (mom.io.atomic_dir): written to a temp folder, fsynced, swapped in;
    the old checkpoint stays until the new one is complete, and a kill at any point leaves one that loads."""
    msd, osd = _full_state(model, optimizer)  # collective under FSDP: every rank calls it
    if not d.main:
        return
    from safetensors.torch import save_file

    from .convert import write_config
    with atomic_dir(os.path.join(out_dir, "ckpt")) as tmp:
        write_config(cfg, os.path.join(tmp, "config.json"))  # the one checkpoint format (AutoModelForCausalLM too)
        save_file({k: v.detach().contiguous() for k, v in msd.items()}, os.path.join(tmp, "model.safetensors"))
        torch.save({"optimizer": osd, "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()
                                              if torch.cuda.is_available() else []}},
                   os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump(state, f, indent=2)


def _recover(out_dir: str) -> List[str]:
    """Undo or finish what a killed run left in out_dir: a checkpoint swap cut between its renames, temp
    folders and files (run.json, metrics.jsonl), and the older writer's .ckpt-tmp / .ckpt-old."""
    final = os.path.join(out_dir, "ckpt")
    done = recover_dir(final)
    legacy_tmp, legacy_old = os.path.join(out_dir, ".ckpt-tmp"), os.path.join(out_dir, ".ckpt-old")
    if os.path.isdir(legacy_tmp):
        shutil.rmtree(legacy_tmp)
        done.append(f"deleted {legacy_tmp}")
    if os.path.isdir(legacy_old):
        if os.path.isdir(final):
            shutil.rmtree(legacy_old)
            done.append(f"deleted {legacy_old}")
        else:
            os.replace(legacy_old, final)
            done.append(f"restored {legacy_old}")
    done += [f"deleted {p}" for p in clean_stale_temps(out_dir)]
    return done


def _load_weights(path: str):
    from .convert import load_state_dict
    return load_state_dict(path)


def init_model(tc: TrainConfig, cfg: MoMConfig):
    """A fresh model (seeded), or the init_from checkpoint cut into (vanilla source) / loaded into cfg."""
    from .model import MoMForCausalLM
    torch.manual_seed(tc.seed)
    if tc.init_from is None:
        return MoMForCausalLM(cfg)
    src = tc.init_from
    if os.path.isdir(src) and os.path.isdir(os.path.join(src, "ckpt")):
        src = os.path.join(src, "ckpt")  # a run folder: its checkpoint
    if not os.path.exists(src):
        raise RunError(f"init_from={tc.init_from}: not found")
    try:
        sd = _load_weights(src)
    except Exception as e:
        raise RunError(f"init_from={tc.init_from}: cannot read a checkpoint there ({e})") from e
    routed = any(k.startswith(("chunks.", "top.")) for k in sd)
    if not routed:
        try:
            return MoMForCausalLM.from_gpt2(sd, cfg)
        except ValueError as e:
            raise RunError(f"init_from={tc.init_from}: this vanilla checkpoint cannot be cut into the model "
                           f"config ({e})") from e
    cfg_path = os.path.join(src if os.path.isdir(src) else os.path.dirname(src), "config.json")
    if os.path.exists(cfg_path):
        from .convert import read_config
        try:
            theirs = read_config(cfg_path)
        except (ConfigError, FileFormatError) as e:
            raise RunError(f"init_from={tc.init_from}: {e}") from e
        diff = _diff({k: v for k, v in theirs.to_dict().items() if k != "backend"},
                     {k: v for k, v in cfg.to_dict().items() if k != "backend"})
        if diff:
            raise RunError(f"init_from={tc.init_from}: a routed checkpoint of another config ({'; '.join(diff)})")
    model = MoMForCausalLM(cfg)
    own = model.state_dict()
    bad = sorted(set(own) ^ set(sd)) + [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if bad:
        raise RunError(f"init_from={tc.init_from}: checkpoint does not fit the model config (e.g. {bad[:3]})")
    model.load_state_dict(sd)
    return model


# --- evaluation --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, val: TokenData, tc: TrainConfig, d: Dist, device, autocast) -> float:
    """Mean LM loss over the first eval_windows validation windows (batches spread round-robin over ranks);
    a tqdm bar on rank 0 when tc.progress."""
    model.eval()
    n = val.n_windows if tc.eval_windows is None else min(tc.eval_windows, val.n_windows)
    total = torch.zeros(2, dtype=torch.float64, device=device)   # [sum of window losses, windows]
    batches = [list(range(i, min(i + tc.batch_size, n))) for i in range(0, n, tc.batch_size)]
    rounds = -(-len(batches) // d.world)  # every rank runs as many forwards (FSDP's all-gathers need lockstep)
    steps = range(d.rank, rounds * d.world, d.world)
    if tc.progress and d.main and rounds > 1:
        from tqdm import tqdm
        steps = tqdm(steps, desc="validation", unit="batch", leave=False, dynamic_ncols=True)
    for b in steps:
        idx = batches[b] if b < len(batches) else batches[0]           # a padding forward, not counted
        x = torch.stack([torch.from_numpy(val.window(i)) for i in idx]).to(device)
        with autocast():
            out = model(x, labels=x)
        if b < len(batches):
            total[0] += float(out.lm_loss) * len(idx)
            total[1] += len(idx)
    if d.on:
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1])


# --- main loop -----------------------------------------------------------------------------------------------
def prepare_run(tc: TrainConfig, d: Dist):
    """Every check that can fail, before anything is written or trained: settings, data, vocab, out_dir,
    checkpoint. Leftovers of a killed run in out_dir are recovered here (rank 0)."""
    meta = read_meta(tc.data)                       # missing folder / meta.json -> FileNotFoundError
    for split in ("train", "val"):
        path = os.path.join(data_folder(tc.data), f"{split}.bin")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found")
    cfg = model_config(tc)
    if meta["vocab_size"] != cfg.vocab_size:
        raise RunError(f"tokenizer/vocab mismatch: the data in {tc.data} was tokenised with "
                       f"{meta['tokenizer']['name']} ({meta['vocab_size']} ids) but the model has "
                       f"vocab_size={cfg.vocab_size}; prepare the data with --tokenizer bpe:{cfg.vocab_size} "
                       f"or set model_overrides.vocab_size={meta['vocab_size']}")
    T = tc.block_size or cfg.n_positions
    if T > cfg.n_positions or T < 2:
        raise RunError(f"block_size={T} must be in [2, n_positions={cfg.n_positions}]")
    gbs = tc.global_batch_size or tc.batch_size * d.world  # unset: one micro-batch of batch_size per rank
    if gbs % (tc.batch_size * d.world):
        raise RunError(f"global_batch_size={gbs} is not a multiple of batch_size={tc.batch_size} x "
                       f"world size {d.world}; set --global-batch-size to a multiple of "
                       f"{tc.batch_size * d.world} or --batch-size to a divisor of {gbs // d.world or 1}")
    if os.path.lexists(tc.out_dir) and not os.path.isdir(tc.out_dir):
        raise RunError(f"out_dir={tc.out_dir} exists and is not a folder")
    ident = _identity(dataclasses.replace(tc, global_batch_size=gbs, block_size=T), cfg, meta)
    if d.main and os.path.isdir(tc.out_dir):
        for what in _recover(tc.out_dir):
            print(f"[mom.train] recovered from an interrupted run: {what}", file=sys.stderr, flush=True)
    if d.on:
        dist.barrier()                              # the other ranks read out_dir after rank 0 tidied it
    run_json, ckpt = os.path.join(tc.out_dir, "run.json"), os.path.join(tc.out_dir, "ckpt")
    if os.path.exists(run_json):
        diff = _diff(read_json_file(run_json, "run.json"), ident)
        if diff:
            raise RunError(f"{tc.out_dir} holds another run (differences: {'; '.join(diff[:6])}); use a new "
                           f"out_dir - nothing was overwritten")
    has_ckpt = os.path.exists(os.path.join(ckpt, "train_state.json"))
    if has_ckpt and not tc.resume:
        raise RunError(f"{ckpt} exists; pass --resume to continue it or choose another out_dir - nothing was "
                       f"overwritten")
    if tc.resume and not has_ckpt and os.path.exists(run_json) and d.main:  # killed before its first checkpoint
        print(f"[mom.train] --resume: {tc.out_dir} has no checkpoint yet (the run stopped before its first); "
              f"starting from step 0", file=sys.stderr, flush=True)
    return cfg, meta, ident, T, gbs // (tc.batch_size * d.world), has_ckpt and tc.resume


def read_train_state(ckpt: str) -> dict:
    """ckpt/train_state.json, checked (the step and token count a resume continues from)."""
    path = os.path.join(ckpt, "train_state.json")
    state = read_json_file(path, "checkpoint train_state.json")
    require_keys(state, path, {"step": int, "tokens": int}, "train_state.json")
    if state["step"] < 0 or state["tokens"] < 0:
        raise FileFormatError(f"{path}: step {state['step']} and tokens {state['tokens']} must be >= 0")
    return state


def read_metrics(out_dir: str, upto: Optional[int] = None) -> List[dict]:
    """Rows of out_dir/metrics.jsonl (a torn last line, left by a kill mid-write, is dropped with a warning
    naming the file); with `upto`, only the rows of steps <= upto (what a resume from step `upto` keeps)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = read_jsonl(path, "metrics file")
    for i, r in enumerate(rows):
        if not isinstance(r.get("step"), int) or isinstance(r.get("step"), bool):
            raise FileFormatError(f"{path}: row {i + 1} has no integer 'step': {json.dumps(r)[:120]}")
    return rows if upto is None else [r for r in rows if r["step"] <= upto]


def train(tc: TrainConfig) -> dict:
    """Run (or resume) one training run; returns {"step", "val_loss", "out_dir"}. Rank 0 writes files."""
    d, device = setup_distributed(tc)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    ok = False
    try:
        result = _train(tc, d, device)
        ok = True
        return result
    finally:
        if d.on:
            teardown_distributed(ok)


def _train(tc: TrainConfig, d: Dist, device) -> dict:
    cfg, meta, ident, T, accum, resuming = prepare_run(tc, d)
    train_data, val_data = TokenData(tc.data, "train", T), TokenData(tc.data, "val", T)
    model = init_model(tc, cfg).to(device)     # a bad init_from fails here, before out_dir is touched
    start, tokens = 0, 0
    ckpt = os.path.join(tc.out_dir, "ckpt")
    metrics_path = os.path.join(tc.out_dir, "metrics.jsonl")
    if resuming:                                # every checkpoint file is read (and checked) before any write
        state = read_train_state(ckpt)
        from .convert import load_state_dict
        sd = load_state_dict(ckpt)
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise FileFormatError(f"{os.path.join(ckpt, 'model.safetensors')}: does not fit the model config "
                                  f"({str(e).splitlines()[0]})") from e
        start, tokens = state["step"], state["tokens"]
        opt_path = os.path.join(ckpt, "optimizer.pt")
        blob = torch_load(opt_path, "optimizer state")
        if not (isinstance(blob, dict) and isinstance(blob.get("optimizer"), dict) and isinstance(blob.get("rng"), dict)
                and isinstance(blob["rng"].get("torch"), torch.Tensor)):
            raise FileFormatError(f"{opt_path}: not a mom optimizer state (needs 'optimizer' and 'rng.torch')")
    rows = read_metrics(tc.out_dir, start) if d.main else []   # drop rows logged after the checkpoint
    use_bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    raw = model
    if d.on and tc.distributed == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_bf16 else \
            MixedPrecisionPolicy()
        for blocks in (raw.bottom, raw.chunks, raw.top):
            for b in blocks:
                fully_shard(b, mp_policy=mp)
        fully_shard(raw, mp_policy=mp)
    elif d.on:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=cfg.chunks > 0)  # a module no token picked gets no gradient
    optimizer = make_optimizer(model, tc)
    if resuming:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        try:
            set_optimizer_state_dict(model, optimizer, blob["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        except (KeyError, ValueError, RuntimeError) as e:
            raise FileFormatError(f"{opt_path}: does not fit this model's optimizer ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from e
        torch.set_rng_state(blob["rng"]["torch"])
    fwd = torch.compile(model) if tc.compile else model

    # --- from here on out_dir is written (each file atomically; metrics.jsonl by whole-line appends) ---------
    if d.main:
        os.makedirs(tc.out_dir, exist_ok=True)
        atomic_write_json(os.path.join(tc.out_dir, "run.json"), ident)
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
    if d.on:
        dist.barrier()

    def log(row: dict):
        if d.main:
            append_line(metrics_path, json.dumps(row))

    flops_tok = train_flops_per_token(cfg, T)
    seq_per_step = tc.batch_size * accum * d.world
    end = tc.max_steps if tc.stop_after is None else min(tc.max_steps, tc.stop_after)
    bar = None
    if d.main and tc.progress:
        from tqdm import tqdm
        bar = tqdm(total=end, initial=start, desc=os.path.basename(tc.out_dir.rstrip("/")), dynamic_ncols=True,
                   file=sys.stderr)
    if d.main:
        print(f"[mom.train] {raw.num_parameters() / 1e6:.2f}M params, graph depth {cfg.graph_depth}, "
              f"{d.world} rank(s) x {accum} micro-batch(es) x {tc.batch_size} x {T} tokens per step, "
              f"steps {start}..{end} of {tc.max_steps}, {'bf16' if use_bf16 else 'fp32'} on {device}", flush=True)
    val_loss = None
    model.train()
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = lr_at(step, tc)
        for g in optimizer.param_groups:
            g["lr"] = lr
        sums = backward_micro_batches(
            fwd, lambda micro: train_data.train_batch(step, micro, d.rank, d.world, accum, tc.batch_size,
                                                      tc.seed).to(device),
            accum, sync=lambda last: _grad_sync(model, raw, d, tc, last), autocast=autocast)
        sums = _all_mean(sums.to(device), d).cpu() / accum
        gnorm = optimizer_step(model, optimizer, tc.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens += seq_per_step * T
        tps = seq_per_step * T / dt
        mfu = tps * flops_tok / tc.peak_flops if tc.peak_flops else None
        done = step + 1
        if done % tc.log_interval == 0 or done == end or done == start + 1:
            log({"step": done, "tokens": tokens, "lr": lr, "loss": float(sums[0]), "lm_loss": float(sums[1]),
                 "aux_loss": float(sums[2]), "grad_norm": gnorm, "tok_per_s": tps, "mfu": mfu})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(sums[1]):.4f}", tok_s=f"{tps:,.0f}",
                            mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%")
        if done % tc.eval_interval == 0 or done == end:
            val_loss = evaluate(fwd, val_data, tc, d, device, autocast)
            log({"step": done, "tokens": tokens, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
            if d.main:
                msg = f"[mom.train] step {done}: val loss {val_loss:.4f}, ppl {math.exp(min(val_loss, 50)):.2f}"
                bar.write(msg) if bar is not None else print(msg, flush=True)
        if (tc.ckpt_interval and done % tc.ckpt_interval == 0) or done == end:
            save_checkpoint(tc.out_dir, model, optimizer, tc, cfg,
                            {"step": done, "tokens": tokens, "val_loss": val_loss, "data_meta": meta["tokenizer"]}, d)
    if bar is not None:
        bar.close()
    return {"step": end, "val_loss": val_loss, "out_dir": tc.out_dir}


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m mom.train", description=__doc__,
                       usage="python -m mom.train [-h] [--config FILE] [--set KEY=VALUE ...] [--SETTING VALUE ...]",
                       epilog="A setting's value is read as JSON when it parses (3e-4, true, null, {...}), else as "
                              "a string. Options win over --config; docs/training.md has the recipe.")
    p.add_argument("--config", metavar="FILE", help="a .json or .toml training config (configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set a key (a JSON value; a.b reaches into a dict: model_overrides.n_embd=64); repeatable")
    g = p.add_argument_group("settings (each is also a key of the config file)")
    for f in dataclasses.fields(TrainConfig):
        default = "{}" if f.name == "model_overrides" else json.dumps(f.default)
        if f.name == "resume":
            g.add_argument("--resume", action="store_true", default=None, help=f.metadata["help"])
        else:
            g.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar="VALUE",
                           help=f"{f.metadata['help']} (default: {default})")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    overrides, origins = {}, {}
    for kv in a.set:
        if "=" not in kv:
            p.error(f"--set {kv}: expected KEY=VALUE")
        k, v = kv.split("=", 1)
        top = k.split(".")[0]
        if top not in fields:
            close = difflib.get_close_matches(top, fields, n=1)
            p.error(f"--set {kv}: {top!r} is not a setting" + (f" (did you mean {close[0]!r}?)" if close else
                                                               f"; settings: {', '.join(fields)}"))
        overrides[k], origins[k] = _parse_value(v), f"--set {kv}"
    for name in fields:
        v = getattr(a, name)
        if v is not None:
            overrides[name] = v if isinstance(v, bool) else _parse_value(v)
            origins[name] = f"--{name.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}")
    worker = int(os.environ.get("WORLD_SIZE", "1")) > 1        # one of torchrun's processes
    try:
        tc = load_config(a.config, overrides, origins)
    except CommandLineError as e:
        p.error(" ".join(str(e).split()))
    except (RunError, ValueError, OSError) as e:  # the config file, or a file it names: one line naming it
        print(f"python -m mom.train: error: {' '.join(str(e).split())}", file=sys.stderr)
        _exit_command(2, worker)
    try:
        result = train(tc)
    except (RunError, ValueError, OSError) as e:  # settings, files, folders: one line naming the problem
        msg = " ".join(str(e).split())
        print(f"python -m mom.train: error: {msg}", file=sys.stderr)
        _exit_command(2, worker)
    except BaseException:
        if not worker:
            raise
        import traceback

        traceback.print_exc()
        _exit_command(1, worker)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    if worker:
        _exit_command(0, worker)


def _exit_command(code: int, worker: bool):
    """sys.exit(code); a torchrun worker ends with os._exit(code) once stdout and stderr are flushed, so that no
    interpreter shutdown runs beside the threads of a process group torch kept alive (teardown_distributed:
    after FSDP2 they can abort the process with SIGABRT). Every file the run wrote is closed and fsynced
    before (mom.io), so the shutdown skipped has nothing left to do."""
    if not worker:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()

"""Memory of a forward, measured (not estimated): CUDA's allocator peak, or the process's peak RSS on a CPU.

Three forwards are measured separately (MODES):
    "train"    grad enabled, model.train(), with labels: the loss and every activation autograd keeps for
               the backward stay alive until the forward returns (the backward itself is not run)
    "prefill"  no_grad, model.eval(), use_cache=True: inference over the whole sequence, returning the KV
               caches (one per attention call, i.e. graph depth) and the logits
    "decode"   no_grad, use_cache=True: one new token after a KV cache of seq_len - 1 tokens (built first,
               outside the measurement; it is part of the baseline and of the peak)

What is counted. `peak_bytes` is every tensor alive at the forward's peak: the weights, the inputs (and the
cache passed in, for "decode"), the activations, the KV caches made, the logits (and, for "train", the loss's
log-softmax and everything saved for backward), plus the op temporaries. `weights_bytes` (parameters and
buffers) and `cache_bytes` (the KV caches the forward returns) are also given, so peak - weights is what
the forward adds to a loaded model.

How it is measured.
  CUDA: torch.cuda.reset_peak_memory_stats(); peak = torch.cuda.max_memory_allocated() over the forward
        (bytes handed out by the caching allocator: all tensors, no allocator slack or CUDA context).
  CPU:  the kernel's resident-set high-water mark. We write "5" to /proc/self/clear_refs (which resets VmHWM
        to the current RSS), run the forward, read VmHWM from /proc/self/status; the forward's peak is
        VmHWM - VmRSS(before) plus the tensors alive before it (weights, inputs, cache in). This is only
        honest if freed memory goes back to the kernel and is not reused silently from the malloc heap:
        `measure_isolated` therefore runs the forward in a fresh interpreter with
        MALLOC_MMAP_THRESHOLD_=65536 (glibc: every block >= 64 KiB is its own mmap, unmapped on free; torch's
        CPU allocator does not cache), after a warm-up forward of the same shapes (thread pools, oneDNN
        scratch). Small blocks and page rounding make it read a little high, and the kernel folds each
        thread's RSS count into the process's only every 64 page faults, so it is exact to about 1 MiB.
        In-process CPU measurements (`forward_memory` without that environment) can read far too low.
"""
from __future__ import annotations

import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

MODES = ("train", "prefill", "decode")
ROUTINGS = ("no-skip", "init")
CPU_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: large blocks are mmapped and unmapped on free


@dataclass
class ForwardMemory:
    mode: str
    device: str
    method: str           # "cuda.max_memory_allocated" | "cpu.VmHWM"
    weights_bytes: int    # parameters + buffers
    baseline_bytes: int   # tensors alive before the forward: weights, inputs, (decode) the cache passed in
    peak_bytes: int       # tensors alive at the forward's peak, baseline included
    cache_bytes: int      # KV caches the forward returned (0 for "train")

    @property
    def added_bytes(self) -> int:
        """What the forward added at its peak: activations, caches, logits, temporaries."""
        return self.peak_bytes - self.baseline_bytes


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weights_bytes(model: torch.nn.Module) -> int:
    return sum(tensor_bytes(p) for p in model.parameters()) + sum(tensor_bytes(b) for b in model.buffers())


def decode_weight_bytes(model, routing) -> int:
    """Bytes of parameters one forward over a few tokens must read, given its routing (MoMOutput.routing): every
    parameter outside the pools (fixed blocks, routers, embeddings and the tied head), plus, per routed step,
    each attention / FFN module some token picked, once (a decode step reads a picked module's weights once,
    whatever the number of its tokens). For a vanilla model: all its parameters."""
    pools = {id(p) for c in getattr(model, "chunks", []) for pool in (c.attn_pool, c.ffn_pool)
             for p in pool.parameters()}
    total = sum(tensor_bytes(p) for p in model.parameters() if id(p) not in pools)
    for chunk, steps in zip(getattr(model, "chunks", []), routing or []):
        for pool, key in ((chunk.attn_pool, "attn_ids"), (chunk.ffn_pool, "ffn_ids")):
            per_module = sum(tensor_bytes(p) for p in pool.parameters()) // pool.n_modules
            for step in steps:
                picked = torch.unique(getattr(step, key))
                total += per_module * int((picked < pool.n_modules).sum())
    return total


def cache_bytes(past_key_values) -> int:
    return sum(tensor_bytes(k) + tensor_bytes(v) for k, v in past_key_values or [])


# --- CPU: peak RSS ---------------------------------------------------------------------------------------------
def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_bytes("VmHWM")
        return True
    except OSError:
        return False


class PeakRSS:
    """with PeakRSS() as p: ...  -> p.growth = peak RSS during the block - RSS at its start (bytes)."""

    def __enter__(self):
        self.start = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        return self

    def __exit__(self, *exc):
        self.peak = _status_bytes("VmHWM")
        self.growth = self.peak - self.start
        return False


# --- one measured forward -------------------------------------------------------------------------------------
def _run(model, input_ids, mode, past_key_values=None):
    if mode == "train":
        model.train()
        with torch.enable_grad():
            return model(input_ids, labels=input_ids)
    model.eval()
    with torch.no_grad():
        return model(input_ids, past_key_values=past_key_values, use_cache=True)


def forward_memory(model, input_ids, mode: str, past_key_values=None):
    """Measure one forward (module docstring). Returns (ForwardMemory, the forward's MoMOutput)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dev = input_ids.device
    w = weights_bytes(model)
    base = w + tensor_bytes(input_ids) + cache_bytes(past_key_values)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        out = _run(model, input_ids, mode, past_key_values)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        base, peak, method = before, peak, "cuda.max_memory_allocated"
    elif dev.type == "cpu":
        gc.collect()  # garbage freed during the forward would hide part of its growth
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            with PeakRSS() as p:
                out = _run(model, input_ids, mode, past_key_values)
        finally:
            if gc_was_on:
                gc.enable()
        peak, method = base + p.growth, "cpu.VmHWM"
    else:
        raise ValueError(f"no memory measurement for device {dev}")
    made = 0 if mode == "train" else cache_bytes(out.past_key_values)
    return ForwardMemory(mode, str(dev), method, w, base, peak, made), out


def force_no_skip_(model) -> None:
    """Make every router pick modules only: the SKIP slots' head biases -> -1e4 (worst-case cost)."""
    cfg = model.config
    with torch.no_grad():
        for chunk in model.chunks:
            for router, pool in ((chunk.attn_router, cfg.n_attn), (chunk.ffn_router, cfg.n_ffn)):
                router.head.bias[pool:] = -1e4


# --- a forward measured in a fresh interpreter -----------------------------------------------------------------
@dataclass
class Spec:
    config: dict                 # MoMConfig.to_dict()
    batch: int
    seq_len: int
    mode: str                    # MODES
    dtype: str = "float32"
    device: str = "cpu"
    routing: str = "no-skip"     # ROUTINGS: "no-skip" (force_no_skip_) | "init" (routers as initialised)
    repeats: int = 3             # timed forwards after the measured one (time_s: the best of them)
    seed: int = 0
    extra: dict = field(default_factory=dict)


def _measure_here(spec: Spec) -> dict:
    from . import flops
    from .config import MoMConfig
    from .model import MoMForCausalLM

    torch.manual_seed(spec.seed)
    cfg = MoMConfig.from_dict(spec.config)
    dev = torch.device(spec.device)
    model = MoMForCausalLM(cfg).to(device=dev, dtype=getattr(torch, spec.dtype))
    if spec.routing == "no-skip":
        force_no_skip_(model)
    elif spec.routing != "init":
        raise ValueError(f"routing must be one of {ROUTINGS}")
    g = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (spec.batch, spec.seq_len), generator=g).to(dev)
    past = None
    if spec.mode == "decode":
        with torch.no_grad():
            past = model.eval()(ids[:, :-1], use_cache=True).past_key_values
        ids = ids[:, -1:]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    out = _run(model, ids, spec.mode, past)  # warm-up: same shapes (threads, kernels, scratch)
    del out
    mem, out = forward_memory(model, ids, spec.mode, past)
    count = flops.count(model, ids, past_key_values=past, output=out)
    picks = skips = 0
    for chunk in out.routing or []:
        for s in chunk:
            picks += s.attn_ids.numel() + s.ffn_ids.numel()
            skips += int((s.attn_ids >= cfg.n_attn).sum() + (s.ffn_ids >= cfg.n_ffn).sum())
    del out
    times = []
    for _ in range(spec.repeats):
        sync()
        t0 = time.perf_counter()
        out = _run(model, ids, spec.mode, past)
        sync()
        times.append(time.perf_counter() - t0)
        del out
    # best of the timed forwards: on a shared machine the fastest run is the one least disturbed by others
    return dict(memory=asdict(mem), flops=count.as_dict(), time_s=min(times) if times else None,
                time_median_s=statistics.median(times) if times else None,
                times_s=times, skip_share=skips / picks if picks else 0.0,
                parameters=model.num_parameters())


def measure_isolated(spec: Spec, timeout: Optional[float] = None) -> dict:
    """Run `spec`'s forward in a fresh `python -m mom.memory` (CPU_ENV set) and return its measurements:
    memory (ForwardMemory fields), flops (FlopCount.as_dict of that forward), time_s (best of repeats),
    skip_share (SKIP picks / all picks), parameters."""
    env = {**os.environ, **CPU_ENV}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "mom.memory"], input=json.dumps(asdict(spec)), env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"mom.memory worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main():
    spec = Spec(**json.loads(sys.stdin.read()))
    if spec.device == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        print("warning: MALLOC_MMAP_THRESHOLD_ unset; CPU peak memory may read low", file=sys.stderr)
    print(json.dumps(_measure_here(spec)))


if __name__ == "__main__":
    _main()

"""Pick, on the GPU at hand, the fastest way to run each grouped GEMM: time the candidates once per shape.

    MOM_KERNELS_AUTOTUNE=1 python train.py ...      # opt-in; the first step of each shape pays the timing

A grouped GEMM (`gemm.grouped_gemm`) can run as the Triton GEMM with its epilogue in registers on 4 column slices
or on the whole tile ("fused"), on a grid of one program per tile or a persistent one of 2 programs per SM, as the
Triton GEMM then an epilogue pass ("split"), or as `torch._grouped_mm` then the same pass ("grouped_mm", where
torch has it for the dtype and the rows are 16-byte aligned). Which is fastest
depends on the GPU, the GEMM's role (its epilogue) and its shape. With MOM_KERNELS_AUTOTUNE=1, the first call of a
key - role, epilogue flags, dtype, n_in, n_out, E, and the number of picks rounded up to a power of 2 - on a CUDA
device and outside CUDA-graph capture runs every candidate on the call's own operands (one untimed run that
compiles, then `REPEATS` timed with CUDA events; the median counts) and keeps the fastest for the process. Later
calls of the key, captured ones included, launch the kept choice; a key first met while capturing uses the
default. Every candidate computes the same outputs (they differ in rounding order only, within the kernel tests'
bounds), and each run writes its outputs whole, so the timing runs leave the call's result as the chosen
candidate's. An explicit MOM_KERNELS_GEMM (modes), MOM_KERNELS_PERSISTENT (grid) or an EPI_SUBTILE in
MOM_KERNELS_GEMM_CONFIG wins over tuning.

Why not `triton.autotune`: it chooses among one kernel's tile configs; these candidates are different launch
sequences (one kernel, two kernels, or a cuBLAS/CUTLASS call and a kernel), so the choice sits above any one
kernel. `table()` returns the choices and times (benchmarks print it); `clear()` forgets them.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, Hashable, List, Tuple

import torch

REPEATS = 5
Candidate = Tuple[str, int, int]  # (mode, epilogue slices, programs per SM: 0 = one program per tile)

_chosen: Dict[Hashable, Candidate] = {}
_times: Dict[Hashable, Dict[Candidate, float]] = {}


def enabled(t: torch.Tensor) -> bool:
    """MOM_KERNELS_AUTOTUNE=1 and t lives on a device the timing means something on (CUDA; the CPU under the
    interpreter too, so the mechanism is tested), and none of the modes, the grid or the epilogue slices is set by
    hand."""
    choice = os.environ.get("MOM_KERNELS_AUTOTUNE", "0").strip()
    if choice not in ("0", "1"):
        raise ValueError(f"MOM_KERNELS_AUTOTUNE must be 0 or 1, got {choice!r}")
    if choice == "0" or t.device.type not in ("cuda", "cpu"):
        return False
    return not (os.environ.get("MOM_KERNELS_GEMM", "").strip() or os.environ.get("MOM_KERNELS_PERSISTENT", "").strip()
                or "EPI_SUBTILE" in os.environ.get("MOM_KERNELS_GEMM_CONFIG", ""))


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def time_candidate(run: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of `run` over REPEATS runs after one untimed run (compiles, warms caches)."""
    run()
    times = []
    for _ in range(REPEATS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def pick(key: Hashable, candidates: List[Candidate], run: Callable[[Candidate], object], like: torch.Tensor,
         default: Candidate) -> Candidate:
    """The candidate to launch for key: the kept choice, else (outside capture) the fastest of candidates, timed
    now with run(candidate) and kept; while capturing a new key, the default (nothing is timed or kept)."""
    if key in _chosen:
        return _chosen[key]
    if _capturing(like) or len(candidates) < 2:
        return default
    times = {}
    for c in candidates:
        try:
            times[c] = time_candidate(lambda c=c: run(c), like.device)
        except (RuntimeError, NotImplementedError):  # e.g. torch._grouped_mm on a GPU it does not support
            if c == default:
                raise
            times[c] = float("inf")
    best = min(candidates, key=lambda c: times[c])  # ties: the earlier candidate (the default comes first)
    _chosen[key], _times[key] = best, times
    return best


def table() -> List[dict]:
    """What was tuned in this process: one row per key with the choice and every candidate's median ms."""
    rows = []
    for key, best in _chosen.items():
        ms = {label(c): round(v, 4) for c, v in _times.get(key, {}).items()}
        rows.append(dict(key=key, choice=label(best), ms=ms))
    return rows


def label(c: Candidate) -> str:
    """("fused", 4, 2) -> "fused/4/persistent2"; ("split", 1, 0) -> "split/1"."""
    return f"{c[0]}/{c[1]}" + (f"/persistent{c[2]}" if c[2] else "")


def clear() -> None:
    _chosen.clear()
    _times.clear()

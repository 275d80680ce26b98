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

MOM_KERNELS_AUTOTUNE_CACHE=path.json keeps the choices on disk for the next processes (and the other ranks of a
job, which then launch the same kernels): read at the first tuned call, entries for this device name only;
written after each new choice, merged with what the file holds then, through a temporary file and a rename (an
interrupted write leaves the old file). A file that is not such a table is an error that names it.
"""
from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import torch

REPEATS = 5
Candidate = Tuple[str, int, int]  # (mode, epilogue slices, programs per SM: 0 = one program per tile)

_chosen: Dict[Hashable, Candidate] = {}
_times: Dict[Hashable, Dict[Candidate, float]] = {}
_disk: Dict[str, Dict[str, Candidate]] = {}  # cache path -> {str(key): choice} read from it, for this device


def _device_name(t: torch.Tensor) -> str:
    return torch.cuda.get_device_name(t.device) if t.is_cuda else t.device.type


def _cache_path() -> Optional[str]:
    return os.environ.get("MOM_KERNELS_AUTOTUNE_CACHE", "").strip() or None


def _read_cache(path: str) -> dict:
    """The whole file ({device name: {str(key): {"choice": [mode, slices, per_sm], "ms": {...}}}}), {} if absent."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        for entries in data.values():
            for e in entries.values():
                mode, slices, per_sm = e["choice"]
                if not (isinstance(mode, str) and isinstance(slices, int) and isinstance(per_sm, int)):
                    raise TypeError(e["choice"])
        return data
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"MOM_KERNELS_AUTOTUNE_CACHE: {path} is not an autotune table ({type(e).__name__}: {e}); "
                         f"delete it or point the variable elsewhere") from None


def _from_disk(key: Hashable, like: torch.Tensor) -> Optional[Candidate]:
    path = _cache_path()
    if path is None:
        return None
    if path not in _disk:
        _disk[path] = {k: tuple(e["choice"]) for k, e in _read_cache(path).get(_device_name(like), {}).items()}
    return _disk[path].get(str(key))


def _to_disk(key: Hashable, like: torch.Tensor) -> None:
    path = _cache_path()
    if path is None:
        return
    data = _read_cache(path)  # what other processes wrote meanwhile stays
    data.setdefault(_device_name(like), {})[str(key)] = dict(choice=list(_chosen[key]),
                                                            ms={label(c): v for c, v in _times[key].items()})
    from mom.io import atomic_write_json  # temp file, fsync, rename: an interrupted write leaves the old file

    try:
        atomic_write_json(path, data, indent=1)
    except OSError as e:  # the table is an optimisation: the step goes on, the old file stays
        warnings.warn(f"MOM_KERNELS_AUTOTUNE_CACHE: could not write {path} ({e}); this process keeps its choices "
                      f"in memory")
    _disk.setdefault(path, {})[str(key)] = _chosen[key]


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
    kept = _from_disk(key, like)
    if kept in candidates:  # tuned by an earlier process on this device (MOM_KERNELS_AUTOTUNE_CACHE)
        _chosen[key] = kept
        return kept
    if _capturing(like) or len(candidates) < 2:
        return default
    times = {}
    for c in candidates:
        try:
            times[c] = time_candidate(lambda c=c: run(c), like.device)
        except RuntimeError:  # e.g. torch._grouped_mm on a GPU it does not support
            if c == default:
                raise
            times[c] = float("inf")
    best = min(candidates, key=lambda c: times[c])  # ties: the earlier candidate (the default comes first)
    _chosen[key], _times[key] = best, times
    _to_disk(key, like)
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
    """Forget the choices of this process (and what was read from a cache file; the file stays)."""
    _chosen.clear()
    _times.clear()
    _disk.clear()

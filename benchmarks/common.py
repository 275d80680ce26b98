"""Shared benchmark plumbing: interleaved timing, hardware/commit stamps, CSV rows."""
from __future__ import annotations

import contextlib
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# RESULTS: the committed reference results (written only when asked, e.g. efficiency --update-results).
# OUT: where every benchmark writes by default; git ignores it, so running a benchmark leaves a checkout clean.
RESULTS = os.path.join(HERE, "results")
OUT = os.environ.get("MOM_BENCH_OUT") or os.path.join(HERE, "out")


def hardware(device=None) -> str:
    """The GPU's name for a CUDA device (or, with no device given, when CUDA is there), else the CPU's."""
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if cuda:
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def stamp() -> Dict[str, str]:
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit(), "hardware": hardware(), "torch": torch.__version__}


@contextlib.contextmanager
def env_override(env: Dict[str, str]):
    """Set environment variables (e.g. the tile overrides mom_kernels reads at launch) inside the block and
    restore the previous values after it."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: Dict[str, Callable[[], None]], repeats: int, device="cpu", warmup: int = 1,
                     desc: str = "timing") -> Dict[str, Dict[str, float]]:
    """Median / p20 / p80 seconds of each fn, run round-robin (A B C A B C ...) so that drifts of a noisy
    machine hit every candidate alike. A tqdm bar (stderr, named desc) counts the rounds."""
    from tqdm import tqdm

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in tqdm(range(repeats), desc=desc, unit="round", leave=False, file=sys.stderr):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        ts = sorted(ts)
        q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))]  # noqa: E731
        out[name] = {"median": statistics.median(ts), "p20": q(0.2), "p80": q(0.8)}
    return out


def append_csv(path: str, rows: List[dict]):
    """Append rows; when they bring new columns, the file is rewritten with the union of the columns (old rows
    get empty cells), so a CSV never holds rows under the wrong header. Atomic (mom.io.atomic_write_text: the
    new content goes to a temp file that replaces the old one), so a kill leaves the old file or the new.
    An empty path writes nothing (the benchmarks' `--csv ""`)."""
    import io

    from mom.io import atomic_write_text

    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    old_rows: List[dict] = []
    fields = list(rows[0].keys())
    buf = io.StringIO()
    if os.path.exists(path):
        with open(path, newline="") as f:
            text = f.read()
        reader = csv.DictReader(io.StringIO(text, newline=""))
        old_fields = list(reader.fieldnames or [])
        old_rows = list(reader)
        fields = old_fields + [k for r in rows for k in r if k not in old_fields]
        fields = list(dict.fromkeys(fields))
        if fields == old_fields:
            buf.write(text if not text or text.endswith("\n") else text + "\r\n")
            csv.DictWriter(buf, fieldnames=fields).writerows(rows)
            atomic_write_text(path, buf.getvalue())
            return
    w = csv.DictWriter(buf, fieldnames=fields, restval="")
    w.writeheader()
    w.writerows(old_rows + rows)
    atomic_write_text(path, buf.getvalue())

"""Few-token routed ops (a decode step's): how close their weight reads come to the machine's copy bandwidth.

    python -m benchmarks.bench_gemv                  # CPU: mom.few_tokens (the torch backend), fp32, D 320
    python -m benchmarks.bench_gemv --device cuda    # GPU: mom_kernels.decode (Triton), bf16, D 1280

A decode step routes B tokens; each routed op must read the weights of every module some token picked, once.
Its time floor is those bytes over the memory bandwidth. One row per (op, T): the routed FFN (LN_m, W1, GELU,
W2) and the routed QKV linear (LN_m, W_qkv) over E modules, K picks per token drawn uniformly (distinct per
token), T tokens. MB = the weights, biases and LayerNorm parameters of the distinct picked modules (mean over
the id sets); GB/s = MB / median time; of_copy = that over the bandwidth of a device copy of all E modules'
W1 (read + write bytes / time), timed interleaved in the same run. The calls cycle through 8 id sets so the
picked weights are not all cache-resident (on the GPU an FFN module is 26 MB at D 1280 in bf16).
Target (H200, the few-token Triton kernel): >= 70% of the copy bandwidth.
"""
from __future__ import annotations

import os
import sys

import torch

from mom.cli import ArgumentParser

from .common import OUT, append_csv, hardware, stamp, time_interleaved


def main(argv=None) -> list:
    ap = ArgumentParser(prog="python -m benchmarks.bench_gemv", description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="default float32 on a CPU, bfloat16 on CUDA")
    ap.add_argument("--n-embd", type=int, default=None, help="default 320 on a CPU (GPT-2-large x 1/4), 1280 on CUDA")
    ap.add_argument("--modules", type=int, default=16, help="E, modules in the pool (default 16)")
    ap.add_argument("--top-k", type=int, default=2, help="K, picks per token (default 2)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16], help="tokens per call (default 1 4 16)")
    ap.add_argument("--repeats", type=int, default=30, help="timed runs; the median is reported (default 30)")
    ap.add_argument("--csv", default=os.path.join(OUT, "bench_gemv.csv"),
                    help="append the rows to this CSV (default benchmarks/out/bench_gemv.csv; \"\" for none)")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    dt = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    D = a.n_embd or (1280 if cuda else 320)
    E, K, Fw = a.modules, a.top_k, 4 * (a.n_embd or (1280 if cuda else 320))
    if cuda:
        from mom_kernels.decode import DECODE_MAX_TOKENS as limit
        from mom_kernels.decode import decode_routed_ffn as ffn, decode_routed_linear as linear
    else:
        from mom.few_tokens import MAX_TOKENS as limit
        from mom.few_tokens import routed_ffn as ffn, routed_linear as linear
    if max(a.tokens) > limit:
        ap.error(f"--tokens: the few-token path takes at most {limit} tokens per call")
    if not 1 <= K <= E:
        ap.error(f"--top-k must be in 1..--modules ({E}), got {K}")
    g = torch.Generator().manual_seed(0)
    r = lambda *s, std=0.02: (torch.randn(*s, generator=g) * std).to(dev, dt)  # noqa: E731
    ln_w, ln_b = 1 + r(E, D), r(E, D)
    w1, b1, w2, b2 = r(E, D, Fw), r(E, Fw), r(E, Fw, D), r(E, D)
    wq, bq = r(E, D, 3 * D), r(E, 3 * D)
    size = lambda *ts: sum(t[0].numel() * t.element_size() for t in ts)  # noqa: E731  one module's bytes
    ffn_bytes, qkv_bytes = size(ln_w, ln_b, w1, b1, w2, b2), size(ln_w, ln_b, wq, bq)
    dst = torch.empty_like(w1)
    fns = {"copy": lambda: dst.copy_(w1)}
    sets = {}
    with torch.no_grad():
        for T in a.tokens:
            ids = [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(dev) for _ in range(8)]
            x, gw = r(T, D, std=1.0), torch.rand(T, K, generator=g).to(dev, dt)
            distinct = sum(len(set(i.flatten().tolist())) for i in ids) / len(ids)
            it = {"i": 0}

            def nxt(it=it, ids=ids):
                it["i"] = (it["i"] + 1) % len(ids)
                return ids[it["i"]]

            fns[f"ffn T={T}"] = lambda x=x, gw=gw, nxt=nxt: ffn(x, ln_w, ln_b, w1, b1, w2, b2, nxt(), gw, residual=x)
            fns[f"qkv T={T}"] = lambda x=x, nxt=nxt: linear(x, wq, bq, nxt(), None, ln_w, ln_b)
            sets[T] = distinct
        t = time_interleaved(fns, a.repeats, device=dev, warmup=3, desc="bench_gemv")
    copy_gbs = 2 * dst.numel() * dst.element_size() / t["copy"]["median"] / 1e9
    rows = []
    for T in a.tokens:
        for op, per in (("ffn", ffn_bytes), ("qkv", qkv_bytes)):
            s = t[f"{op} T={T}"]["median"]
            mb = sets[T] * per / 1e6
            rows.append(dict(op=op, T=T, K=K, E=E, D=D, distinct=round(sets[T], 2), MB=round(mb, 2),
                             us=round(s * 1e6, 1), GBs=round(mb / 1e3 / s, 1), copy_GBs=round(copy_gbs, 1),
                             of_copy=round(mb / 1e3 / s / copy_gbs, 3)))
    st = stamp()
    head = (f"few-token routed ops ({'mom_kernels.decode' if cuda else 'mom.few_tokens'}), {hardware(dev)}, "
            f"{str(dt).split('.')[-1]}, D {D}, F {Fw}, E {E}, K {K}; commit {st['commit']}, {st['date']}")
    cols = list(rows[0])
    print(head + "\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    print("\ntarget (H200, the Triton kernel): of_copy >= 0.70")
    if a.csv:
        os.makedirs(os.path.dirname(os.path.abspath(a.csv)), exist_ok=True)
        append_csv(a.csv, [{**row, "device": hardware(dev), "dtype": str(dt), "commit": st["commit"],
                            "date": st["date"]} for row in rows])
        print(f"wrote {a.csv}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()

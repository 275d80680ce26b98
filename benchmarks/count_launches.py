"""What one routed step launches, counted on the CPU (Triton under the interpreter) or on CUDA.

    python -m benchmarks.count_launches            # steps of depth 1, 2, 3 and one router call's route + plan
    python -m benchmarks.count_launches --table    # also the kernels and ops of the depth-1 step
    python -m benchmarks.count_launches --decode   # one decode step: mom-large-efficient vs GPT-2-large
    MOM_KERNELS_DECODE_SPLIT_K=2 python -m benchmarks.count_launches --decode --scale 0.25   # split as on a GPU

The layer (STEP_LAYER, also tests/test_launches.py's: width 32, 4 attention / 3 FFN modules, top-2, GRU
routers, Triton backend) on 2 x 24 tokens; `mom_kernels.launches.count_step`: forward + backward with the
balance loss, parameter gradients unset before; Triton launches plus aten ops that are GPU kernels.
--decode counts one token of greedy decoding with a static cache (after an 8-token prompt and one step) for a
MoM preset and its GPT-2, Triton backend, at --scale of the full width (benchmarks/efficiency.py's rule): at
batch 1 in a replayed CUDA graph each launch costs a few microseconds whatever its size.
"""
from __future__ import annotations

import os

import torch

from mom.cli import ArgumentParser

# the layer of one counted step (tests/test_launches.py budgets the same one)
STEP_LAYER = dict(n_embd=32, n_head=4, n_inner=48, chunks=1, n_attn=4, n_ffn=3, depth=1, top_k=2, n_bottom=0,
                  n_top=0, router_dim=16, backend="triton")


def main(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.count_launches", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu (Triton interpreted) or cuda (default: cuda when available)")
    p.add_argument("--table", action="store_true", help="list the depth-1 step's kernels and ops")
    p.add_argument("--decode", action="store_true", help="count one decode step of --model and its GPT-2 instead")
    p.add_argument("--model", default="mom-large-efficient", help="MoM preset for --decode")
    p.add_argument("--scale", type=float, default=1 / 16, help="width factor for --decode (default 1/16)")
    p.add_argument("--batch", type=int, default=1, help="batch for --decode")
    a = p.parse_args(argv)
    if a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    if a.decode:
        return decode_counts(a.model, a.scale, a.batch, a.device, a.table)
    from mom import MoMConfig
    from mom.layer import MoMLayer
    from mom_kernels.launches import count_launches, count_step
    from mom_kernels.route import route

    def step(depth):
        cfg = MoMConfig(**{**STEP_LAYER, "depth": depth})
        torch.manual_seed(0)
        layer = MoMLayer(cfg).to(a.device)
        x = torch.randn(2, 24, cfg.n_embd, device=a.device, requires_grad=True)
        return count_step(layer, x, torch.randn_like(x), torch.tensor(0.01, device=a.device))

    counts = {d: step(d) for d in (1, 2, 3)}
    for d, c in counts.items():
        print(f"depth {d}: {c.total} launches ({sum(c.triton.values())} Triton), {len(c.syncs)} host syncs")
    print(f"each further step: {counts[2].total - counts[1].total}, {counts[3].total - counts[2].total}")
    logits = torch.randn(40, 5, device=a.device, requires_grad=True)
    route(logits, 4, top_k=2)
    with count_launches() as c:
        r = route(logits, 4, top_k=2)
        torch.autograd.backward([r.weights, r.balance], [torch.randn_like(r.weights),
                                                         torch.tensor(0.01, device=a.device)])
    print(f"route + plan + balance terms of one router call, forward + backward: {c.total} launches")
    if a.table:
        print(counts[1].table())


def decode_count(name: str, scale: float, batch: int, device: str):
    """count_launches of one decode step of preset `name` (Triton backend) at `scale`, batch `batch`."""
    from mom import MoMConfig, MoMForCausalLM
    from mom.cache import StaticCache
    from mom.generate import DecodeStep, sample_next
    from mom.memory import force_no_skip_
    from mom_kernels.launches import count_launches

    from .efficiency import scaled

    torch.manual_seed(0)
    cfg = scaled(MoMConfig.from_name(name, backend="triton"), scale, 16)
    model = MoMForCausalLM(cfg).to(device).eval()
    if cfg.chunks:
        force_no_skip_(model)  # as bench_decode: every router picks modules
    ids = torch.randint(0, cfg.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(1)).to(device)
    cache = StaticCache(cfg, batch, 16, model.wte.weight.dtype, device)
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        step = DecodeStep(model, cache, cuda_graph=False)
        logits = step(sample_next(logits, False))             # warm-up step
        with count_launches() as c:
            step(sample_next(logits, False))
    return c


def decode_counts(model: str, scale: float, batch: int, device: str, table: bool):
    from .bench_decode import PAIRS

    counts = {}
    for name in (model, PAIRS[model]):
        c = counts[name] = decode_count(name, scale, batch, device)
        print(f"{name}: {c.total} launches per decoded token ({sum(c.triton.values())} Triton), "
              f"{len(c.syncs)} host syncs (scale {scale:g}, batch {batch})")
        if table:
            print(c.table())
    return counts


if __name__ == "__main__":
    main()

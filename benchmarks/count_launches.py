"""What one routed step launches, counted on the CPU (Triton under the interpreter) or on CUDA.

    python -m benchmarks.count_launches            # steps of depth 1, 2, 3 and one router call's route + plan
    python -m benchmarks.count_launches --table    # also the kernels and ops of the depth-1 step

The layer (STEP_LAYER, also tests/test_launches.py's: width 32, 4 attention / 3 FFN modules, top-2, GRU
routers, Triton backend) on 2 x 24 tokens; `mom_kernels.launches.count_step`: forward + backward with the
balance loss, parameter gradients unset before; Triton launches plus aten ops that are GPU kernels.
"""
from __future__ import annotations

import argparse
import os

import torch

# the layer of one counted step (tests/test_launches.py budgets the same one)
STEP_LAYER = dict(n_embd=32, n_head=4, n_inner=48, chunks=1, n_attn=4, n_ffn=3, depth=1, top_k=2, n_bottom=0,
                  n_top=0, router_dim=16, backend="triton")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--table", action="store_true", help="list the depth-1 step's kernels and ops")
    a = p.parse_args(argv)
    if a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
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


if __name__ == "__main__":
    main()

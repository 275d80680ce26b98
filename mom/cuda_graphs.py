"""Training steps replayed from a CUDA graph: no Python and no launch overhead per step.

An eager routed step enqueues every kernel from Python, one by one; on a fast GPU that host work, not the
kernels, sets the pace. The Triton backend reads no device value on the host (tests/test_launches.py checks
it), so a whole forward + backward can be captured once with PyTorch's own `torch.cuda.graph` and replayed on
every new batch of the same shape:

    model = MoMForCausalLM(config).cuda()                     # backend "triton" (or "auto" on a GPU)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = GraphedTrainStep(model, ids)                       # ids [B, T] on the GPU: captures once
    for ids in batches:                                       # same shape every time
        loss = step(ids)                                      # replays forward + backward; grads in p.grad
        opt.step()                                            # eager (a few foreach launches)

What a replay does: copies the batch into the captured input, replays the graph, returns the captured loss
tensor (overwritten by the next replay: `.item()` it or clone it to keep it). Each replay overwrites the
parameters' `.grad` (no accumulation): do not call `zero_grad(set_to_none=True)`, which would detach them from
the graph's memory; for gradient accumulation add the grads up yourself.

What cannot be captured, and why:
  - backends "torch" and "reference": each routing plan reads per-module counts back to the host (`.tolist()`)
    to slice its loop; only the Triton backend is sync-free (a ValueError says so);
  - host checks turned on with `mom_kernels.set_check_ids(True)` (they read the ids' range on the host);
  - another batch shape: capture one `GraphedTrainStep` per shape;
  - cached decoding: the KV cache grows by concatenation each token, a new shape every step.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["GraphedTrainStep"]


class GraphedTrainStep:
    """Capture `model(ids, labels=labels).loss.backward()` for one batch shape; call with new batches."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 warmup: int = 2):
        if not (isinstance(ids, torch.Tensor) and ids.is_cuda):
            raise ValueError("GraphedTrainStep: ids must be a CUDA tensor (CUDA graphs need a CUDA device)")
        config = getattr(model, "config", None)
        backend = getattr(config, "backend", None)
        routed = getattr(config, "chunks", 0) > 0
        if routed and (backend not in ("triton", "auto") or (backend == "auto" and not _triton_available())):
            raise ValueError(f"GraphedTrainStep: config.backend={backend!r} cannot be captured in a CUDA graph "
                             f"(its routing plans read counts back to the host); use backend 'triton'")
        import mom_kernels.checks as checks

        if checks._CHECK_IDS:
            raise ValueError("GraphedTrainStep: host id checks are on (mom_kernels.set_check_ids(True) or "
                             "MOM_KERNELS_CHECK_IDS=1); they read device values and cannot be captured")
        self.model = model
        self.ids = ids.clone()
        self.labels = (labels if labels is not None else ids).clone()
        params = [p for p in model.parameters() if p.requires_grad]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream: compiles kernels, fills caches
            for _ in range(warmup):
                for p in params:
                    p.grad = None
                self._forward_backward()
        torch.cuda.current_stream().wait_stream(side)
        for p in params:
            p.grad = None  # so the captured backward allocates the grads in the graph's memory
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._forward_backward()

    def _forward_backward(self) -> torch.Tensor:
        loss = self.model(self.ids, labels=self.labels).loss
        loss.backward()
        return loss.detach()

    def __call__(self, ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if ids.shape != self.ids.shape:
            raise ValueError(f"GraphedTrainStep: ids has shape {tuple(ids.shape)}, the graph was captured for "
                             f"{tuple(self.ids.shape)}; capture another step for this shape")
        self.ids.copy_(ids, non_blocking=True)
        self.labels.copy_(labels if labels is not None else ids, non_blocking=True)
        self.graph.replay()
        return self.loss


def _triton_available() -> bool:
    from .routed import triton_available

    return triton_available()

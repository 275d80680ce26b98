"""The two routed ops of a step, per backend: `routed_linear` (attention projections) and `routed_ffn`.

    N = tokens, K = picks per token, E = pool size (id E = SKIP), D = input width, O = output width

    routed_linear(x, weight, bias, ids, weights=None, ln_weight=None, ln_bias=None, eps, plan=None)
        y[t] = sum over k with ids[t,k] < E of w[t,k] * (LN_m(x[t]) @ weight[m] + bias[m]),  m = ids[t,k]
        (w = 1 when weights is None; LN_m = identity when ln_weight is None)
    routed_ffn(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps, plan=None)
        y[t] = sum over k with ids[t,k] < E of w[t,k] * (gelu_tanh(LN_m(x[t]) @ w1[m] + b1[m]) @ w2[m] + b2[m])

Backends (same signatures; `mom_kernels` has the Triton one):
  "reference": the obvious per-module loop, as the authors' code does it (gather the tokens that picked m,
               run module m, index_add back). The test oracle.
  "torch":     vectorised: one stable sort of the N*K picks per routing plan (shared by a step's QKV and
               output projections), LayerNorm statistics once per token, one matmul per module over its
               contiguous slice of the sorted rows, weighted combine by an index_copy into an [N*K, O]
               buffer and a sum over K (deterministic, no atomics). It reads the E+1 per-module counts
               back to the host once per plan (to slice); the Triton backend has no host sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F


def gelu(x):
    return F.gelu(x, approximate="tanh")  # GPT-2's GELU


# ----------------------------------------------------------------------------------------------------------
# "reference": per-module loop
# ----------------------------------------------------------------------------------------------------------
def _modules(*stacked):
    """Per-module views of stacked [E, ...] parameters. unbind (not weight[m] in a loop): its backward
    stacks the E gradients once, where E selects would each add into a fresh zero [E, ...] tensor."""
    return [None if t is None else t.unbind(0) for t in stacked]


def _module_rows(ids, weights, m):
    """Tokens that picked module m (each picks it at most once) and their weight for it."""
    sel = ids == m                                    # [N, K]
    tok = sel.any(dim=1).nonzero().squeeze(1)         # [n_m]
    w = None if weights is None else (weights * sel).sum(dim=1)[tok]  # [n_m]
    return tok, w


def reference_routed_linear(x, weight, bias, ids, weights=None, ln_weight=None, ln_bias=None, eps=1e-5,
                            plan=None):
    N, D = x.shape
    E, _, O = weight.shape
    W, b, g, beta = _modules(weight, bias, ln_weight, ln_bias)
    y = x.new_zeros(N, O)
    for m in range(E):
        tok, w = _module_rows(ids, weights, m)
        if tok.numel() == 0:
            continue
        u = x[tok]
        if g is not None:
            u = F.layer_norm(u, (D,), g[m], beta[m], eps)
        out = u @ W[m]
        if b is not None:
            out = out + b[m]
        if w is not None:
            out = out * w[:, None]
        y = y.index_add(0, tok, out)
    return y


def reference_routed_ffn(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps=1e-5, plan=None):
    N, D = x.shape
    g, beta, W1, B1, W2, B2 = _modules(ln_weight, ln_bias, w1, b1, w2, b2)
    y = x.new_zeros(N, D)
    for m in range(len(W1)):
        tok, w = _module_rows(ids, weights, m)
        if tok.numel() == 0:
            continue
        u = F.layer_norm(x[tok], (D,), g[m], beta[m], eps)
        out = gelu(u @ W1[m] + B1[m]) @ W2[m] + B2[m]
        y = y.index_add(0, tok, out * w[:, None])
    return y


# ----------------------------------------------------------------------------------------------------------
# "torch": sort once, slice per module
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Picks sorted by module. R = non-SKIP picks."""
    n_tokens: int
    top_k: int
    pick: torch.Tensor      # [R] flat pick index t * K + k, sorted by module (stable: by t, then k)
    token: torch.Tensor     # [R] token of each sorted pick
    slot: torch.Tensor      # [N*K] sorted row of each flat pick; R (a zero row) for SKIP picks
    sizes: List[int]        # [E] host ints: rows of each module, consecutive in sorted order


def make_plan(ids: torch.Tensor, n_modules: int) -> Plan:
    N, K = ids.shape
    flat = ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices                       # [N*K], SKIP (= E) last
    counts = torch.bincount(flat, minlength=n_modules + 1)[: n_modules]  # [E]
    sizes = counts.tolist()                                             # the one host sync per plan
    R = sum(sizes)
    slot = torch.empty_like(order).index_copy_(0, order, torch.arange(N * K, device=ids.device)).clamp_(max=R)
    pick = order[:R]
    return Plan(n_tokens=N, top_k=K, pick=pick, token=pick // K, slot=slot, sizes=sizes)


def _combine(outs, plan: Plan, weights):
    """Per-module outputs (sorted order, R rows in all) -> [N, O]: each token gathers its K rows (a zero row
    for SKIP) and sums them, weighted by a [1, K] x [K, O] product. A gather and a sum, no scatter: two
    passes over [N*K, O] where zero-fill + index_copy + sum take three (and 2.6x the time on a CPU)."""
    N, K = plan.n_tokens, plan.top_k
    rows = torch.cat(outs + [outs[0].new_zeros(1, outs[0].shape[1])])  # [R + 1, O]
    per_pick = rows[plan.slot].view(N, K, -1)                           # [N, K, O]
    if weights is None:
        return per_pick.sum(dim=1) if K > 1 else per_pick[:, 0]
    return torch.bmm(weights.unsqueeze(1).to(per_pick.dtype), per_pick).squeeze(1)


def _module_inputs(x, plan: Plan, ln_weight, eps):
    """Each module's gathered input rows [R_m, D]: x_hat (LayerNorm statistics once per token) when LN is
    on, else x. One split, not E slices: a slice's backward writes into a zero tensor of the full [R, D]."""
    if ln_weight is not None:
        x = F.layer_norm(x, (x.shape[1],), None, None, eps)
    return x[plan.token].split(plan.sizes)  # empty modules get [0, D] (and give [0, O] products)


def torch_routed_linear(x, weight, bias, ids, weights=None, ln_weight=None, ln_bias=None, eps=1e-5,
                        plan: Optional[Plan] = None):
    E = weight.shape[0]
    plan = plan if plan is not None else make_plan(ids, E)
    rows = _module_inputs(x, plan, ln_weight, eps)  # E x [R_m, D]
    W, b, g, beta = _modules(weight, bias, ln_weight, ln_bias)
    outs = []
    for m in range(E):
        u = rows[m]
        if g is not None:
            u = torch.addcmul(beta[m], u, g[m])  # each module's gamma, beta
        outs.append(u @ W[m] if b is None else torch.addmm(b[m], u, W[m]))
    return _combine(outs, plan, weights)


def torch_routed_ffn(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps=1e-5,
                     plan: Optional[Plan] = None):
    E = w1.shape[0]
    plan = plan if plan is not None else make_plan(ids, E)
    rows = _module_inputs(x, plan, ln_weight, eps)  # E x [R_m, D]
    g, beta, W1, B1, W2, B2 = _modules(ln_weight, ln_bias, w1, b1, w2, b2)
    outs = []
    for m in range(E):
        u = torch.addcmul(beta[m], rows[m], g[m])
        outs.append(torch.addmm(B2[m], gelu(torch.addmm(B1[m], u, W1[m])), W2[m]))
    return _combine(outs, plan, weights)


# ----------------------------------------------------------------------------------------------------------
class Ops:
    """The routed ops of one backend."""

    def __init__(self, name, make_plan, routed_linear, routed_ffn):
        self.name, self.make_plan, self.routed_linear, self.routed_ffn = name, make_plan, routed_linear, routed_ffn


REFERENCE = Ops("reference", lambda ids, n_modules: None, reference_routed_linear, reference_routed_ffn)
TORCH = Ops("torch", make_plan, torch_routed_linear, torch_routed_ffn)


def triton_available() -> bool:
    try:
        import mom_kernels  # noqa: F401
        return hasattr(mom_kernels, "routed_ffn") and hasattr(mom_kernels, "routed_linear")
    except Exception:
        return False


def get_ops(backend: str, device: torch.device) -> Ops:
    """The ops for a config backend ("auto": Triton on CUDA when mom_kernels imports, else torch)."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend in ("reference", "torch") and torch.compiler.is_compiling():
        from .opaque import compiled_ops  # data-dependent shapes: hide them from the compiler
        return compiled_ops(backend)
    if backend == "reference":
        return REFERENCE
    if backend == "torch":
        return TORCH
    if backend == "triton":
        return _triton_ops(device)
    raise ValueError(f"unknown backend {backend!r}")


def _triton_ops(device) -> Ops:
    import os

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend 'triton' on a CPU tensor needs TRITON_INTERPRET=1 (slow; for tests); "
                           "use backend 'torch' on the CPU")
    import mom_kernels
    from mom_kernels import routing

    return Ops("triton", routing.make_plan, mom_kernels.routed_linear, mom_kernels.routed_ffn)

"""The torch backend's routed ops for a few tokens (decoding): each picked module once, no sorted plan.

    T tokens, K picks per token, E modules (SKIP = id E), D_in / D_out the layer's widths

    routed_linear(...)[t] = res[t] + sum_{k: ids[t,k] < E} g[t,k] (LN_m(x[t]) @ W[m] + b[m])
    routed_ffn(...)[t]    = res[t] + sum_{k: ids[t,k] < E} g[t,k] (gelu(LN_m(x[t]) @ W1[m] + b1[m]) @ W2[m] + b2[m])
    (mom.routed's math, same signatures; g = None sums the picks unweighted)

Why a second path: the plan-based ops of mom.routed sort the picks by module (a sort, a bincount, a host read
of the counts, index scatters) and run through an autograd.Function; for the B tokens of a decode step on a
CPU those ~30 small operator calls cost about as much as the GEMVs that read the picked modules' weights.
Here, without autograd: one LayerNorm without affine over the T tokens, the picks grouped by module on the
host (ids.tolist(); the plan-based torch ops read the plan's counts back too), then per picked module its
tokens' rows through gamma[m], beta[m], W[m], b[m] (and GELU, W2[m], b2[m]) straight into each pick's slot of a
[T, K, D_out] buffer (SKIP slots stay 0), and one weighted sum over K plus the residual (a baddbmm).

Used by mom.routed's torch ops when autograd is off and T <= MAX_TOKENS (`applies`); the router then builds no
plan either. Tests: tests/test_few_tokens.py (against mom.routed's reference, T = 1..MAX_TOKENS, K = 1..3,
SKIP, repeated modules, fp64 / fp32, non-contiguous inputs, residual).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

MAX_TOKENS = 16  # tokens per call up to which no-grad calls take this path (one decode step of batch <= 16)


def applies(n_tokens: int) -> bool:
    """Whether the torch backend's routed ops take this path for a call with n_tokens rows."""
    return n_tokens <= MAX_TOKENS and not torch.is_grad_enabled()


def _groups(ids: torch.Tensor, n_modules: int) -> Dict[int, Tuple[List[int], List[int]]]:
    """{module: (tokens, picks k)} of the non-SKIP picks of ids [T, K], modules in first-pick order."""
    out: Dict[int, Tuple[List[int], List[int]]] = {}
    for t, row in enumerate(ids.tolist()):
        for k, m in enumerate(row):
            if m < n_modules:
                toks, ks = out.setdefault(m, ([], []))
                toks.append(t)
                ks.append(k)
    return out


def _normed(x, eps):
    return F.layer_norm(x, x.shape[-1:], eps=eps)  # x_hat [T, D], no affine: gamma[m], beta[m] per module


def _rows(xin, toks, m, gamma, beta):
    """Module m's input rows [n, D]: x (or x_hat through gamma[m], beta[m]) of the tokens that picked it."""
    u = xin[toks[0]:toks[0] + 1] if len(toks) == 1 else xin[torch.tensor(toks, device=xin.device)]
    return u if gamma is None else torch.addcmul(beta[m], u, gamma[m])


def _store(slots, toks, ks, y):
    """Write module rows y [n, O] into their picks' slots of slots [T, K, O]."""
    if len(toks) == 1:
        slots[toks[0], ks[0]] = y[0]
    else:
        dev = slots.device
        slots[torch.tensor(toks, device=dev), torch.tensor(ks, device=dev)] = y


def _combine(slots, weights, residual):
    """[T, K, O] slots -> [T, O]: sum over k, weighted by g [T, K] when given, plus the residual [T, O]."""
    if weights is None:
        out = slots.sum(dim=1)
        return out if residual is None else residual + out
    g = weights.to(slots.dtype).unsqueeze(1)                          # [T, 1, K]
    if residual is None:
        return torch.bmm(g, slots).squeeze(1)
    if residual.dtype != slots.dtype:  # under autocast: the sum in the residual's (wider) dtype, as residual + y
        return residual + torch.bmm(g, slots).squeeze(1)
    return torch.baddbmm(residual.unsqueeze(1), g, slots).squeeze(1)


def routed_linear(x, weight, bias, ids, weights=None, ln_weight=None, ln_bias=None, eps=1e-5,
                  residual: Optional[torch.Tensor] = None):
    """x [T, D_in], weight [E, D_in, D_out], bias [E, D_out] or None, ids [T, K] -> [T, D_out]."""
    T, K = ids.shape
    xin = x if ln_weight is None else _normed(x, eps)
    slots = x.new_zeros(T, K, weight.shape[2])                          # [T, K, D_out]; SKIP slots stay 0
    for m, (toks, ks) in _groups(ids, weight.shape[0]).items():
        u = _rows(xin, toks, m, ln_weight, ln_bias)
        y = torch.mm(u, weight[m]) if bias is None else torch.addmm(bias[m], u, weight[m])
        _store(slots, toks, ks, y)
    return _combine(slots, weights, residual)


def routed_ffn(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps=1e-5,
               residual: Optional[torch.Tensor] = None):
    """x [T, D], w1 [E, D, F], w2 [E, F, D] -> [T, D]: each pick's GELU FFN of LN_m(x), weighted, summed."""
    T, K = ids.shape
    xh = _normed(x, eps)
    slots = x.new_zeros(T, K, w2.shape[2])                              # [T, K, D]
    for m, (toks, ks) in _groups(ids, w1.shape[0]).items():
        u = _rows(xh, toks, m, ln_weight, ln_bias)
        h = F.gelu(torch.addmm(b1[m], u, w1[m]), approximate="tanh")    # [n, F]
        _store(slots, toks, ks, torch.addmm(b2[m], h, w2[m]))
    return _combine(slots, weights, residual)

"""The torch backend's routed ops for a few tokens (decoding): each picked module once, a plan made on the host.

    T tokens, K picks per token, E modules (SKIP = id E), D_in / D_out the layer's widths

    routed_linear(...)[t] = res[t] + sum_{k: ids[t,k] < E} g[t,k] (LN_m(x[t]) @ W[m] + b[m])
    routed_ffn(...)[t]    = res[t] + sum_{k: ids[t,k] < E} g[t,k] (gelu(LN_m(x[t]) @ W1[m] + b1[m]) @ W2[m] + b2[m])
    (mom.routed's math, same signatures; g = None sums the picks unweighted)

Why a second path: the plan-based ops of mom.routed sort the picks by module (a sort, a bincount, a host read
of the counts, index scatters) and run through an autograd.Function; for the B tokens of a decode step on a
CPU those ~30 small operator calls cost about as much as the GEMVs that read the picked modules' weights.
Here, without autograd, a plan made on the host from ids.tolist() (a decode step has at most T*K <= 48 picks;
the plan-based torch ops read the plan's counts back too): the non-SKIP picks sorted by module, one gather of
their tokens' rows (none for one token) through each row's gamma, beta (one addcmul), then per picked module
one addmm over its rows into a [R + 1, D_out] buffer (the FFN: all first GEMMs, one GELU, all second GEMMs),
and one gather of each pick's row (SKIP: the zero row R) with the weighted sum over K and the residual (a
baddbmm). About 8 + (1 or 2) x (picked modules) operator calls, where the plan-based path takes ~30 + 4 x.

Used by mom.routed's torch ops when autograd is off and T <= MAX_TOKENS (`applies`); the router then builds no
plan either. Tests: tests/test_few_tokens.py (against per-pick loops written in the test, T = 1..MAX_TOKENS,
K = 1..3, SKIP, repeated modules, fp64 / fp32, non-contiguous inputs, residual; the dispatch).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

MAX_TOKENS = 16  # tokens per call up to which no-grad calls take this path (one decode step of batch <= 16)


def applies(n_tokens: int) -> bool:
    """Whether the torch backend's routed ops take this path for a call with n_tokens rows."""
    return n_tokens <= MAX_TOKENS and not torch.is_grad_enabled()


class _HostPlan:
    """The picks of ids [T, K] sorted by module on the host (ids.tolist(): a decode step's few picks).

    groups: (module, lo, hi): the rows of each picked module; R rows in all.
    T > 1: rows are the non-SKIP picks sorted by (module, token, k), plus a zero row R for SKIP; index is one
    int64 tensor [R + R + T*K] (the token of each row, the module of each row, the row of each flat pick
    t*K + k), made with a single host-to-tensor copy.
    T = 1: row k is pick k (a SKIP pick's row stays 0): no index tensors, no gathers."""

    def __init__(self, ids: torch.Tensor, n_modules: int):
        T, K = ids.shape
        self.T, self.K = T, K
        self.token = self.module = self.row_of_pick = None
        if T == 1:
            self.groups = [(m, k, k + 1) for k, m in enumerate(ids[0].tolist()) if m < n_modules]
            self.R = K
            return
        rows = sorted((m, t, k) for t, row in enumerate(ids.tolist()) for k, m in enumerate(row) if m < n_modules)
        R = len(rows)
        row_of_pick = [R] * (T * K)
        self.groups: List[Tuple[int, int, int]] = []
        for i, (m, t, k) in enumerate(rows):
            row_of_pick[t * K + k] = i
            if not self.groups or self.groups[-1][0] != m:
                self.groups.append((m, i, i + 1))
            else:
                self.groups[-1] = (m, self.groups[-1][1], i + 1)
        idx = torch.tensor([t for _, t, _ in rows] + [m for m, _, _ in rows] + row_of_pick, device=ids.device)
        self.R = R
        self.token, self.module, self.row_of_pick = idx[:R], idx[R:2 * R], idx[2 * R:]

    def rows_buffer(self, like, width):
        """[R (+ 1), width] for the rows; the rows no group writes (SKIP) are 0."""
        if self.T == 1:
            return like.new_zeros(self.K, width) if len(self.groups) < self.K else like.new_empty(self.K, width)
        y = like.new_empty(self.R + 1, width)
        y[self.R].zero_()
        return y


def _normed(x, eps):
    return F.layer_norm(x, x.shape[-1:], eps=eps)  # x_hat [T, D], no affine: gamma[m], beta[m] per module


def _module_inputs(xin, plan: _HostPlan, gamma, beta):
    """(m, lo, hi, u [hi - lo, D]) per picked module: x (or x_hat through gamma[m], beta[m]) of its rows' tokens."""
    if plan.token is None:                                            # one token: its row, per module
        for m, lo, hi in plan.groups:
            yield m, lo, hi, (xin if gamma is None else torch.addcmul(beta[m], xin, gamma[m]))
        return
    u = xin.index_select(0, plan.token)                               # [R, D], one gather
    if gamma is not None:
        u = torch.addcmul(beta.index_select(0, plan.module), u, gamma.index_select(0, plan.module))
    for m, lo, hi in plan.groups:
        yield m, lo, hi, u[lo:hi]


def _combine(y, plan: _HostPlan, weights, residual):
    """Rows y [R + 1, O] (row R = 0 for SKIP) -> [T, O]: each token sums its K picks' rows, weighted by
    g [T, K] when given, plus the residual [T, O]."""
    rows = y if plan.row_of_pick is None else y.index_select(0, plan.row_of_pick)
    slots = rows.view(plan.T, plan.K, -1)                             # [T, K, O]
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
    plan = _HostPlan(ids, weight.shape[0])
    xin = x if ln_weight is None else _normed(x, eps)
    y = plan.rows_buffer(x, weight.shape[2])                                              # [R (+1), D_out]
    for m, lo, hi, u in _module_inputs(xin, plan, ln_weight, ln_bias):
        if bias is None:
            torch.mm(u, weight[m], out=y[lo:hi])
        else:
            torch.addmm(bias[m], u, weight[m], out=y[lo:hi])
    return _combine(y, plan, weights, residual)


def routed_ffn(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps=1e-5,
               residual: Optional[torch.Tensor] = None):
    """x [T, D], w1 [E, D, F], w2 [E, F, D] -> [T, D]: each pick's GELU FFN of LN_m(x), weighted, summed."""
    plan = _HostPlan(ids, w1.shape[0])
    h = plan.rows_buffer(x, w1.shape[2])                                                  # [R (+1), F]
    for m, lo, hi, u in _module_inputs(_normed(x, eps), plan, ln_weight, ln_bias):
        torch.addmm(b1[m], u, w1[m], out=h[lo:hi])
    h = F.gelu(h, approximate="tanh")                                  # one GELU for all rows
    y = plan.rows_buffer(x, w2.shape[2])                                                  # [R (+1), D]
    for m, lo, hi in plan.groups:
        torch.addmm(b2[m], h[lo:hi], w2[m], out=y[lo:hi])
    return _combine(y, plan, weights, residual)

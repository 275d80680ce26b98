"""The torch backend's routed ops for a few tokens (decoding): each picked module once, a plan made on the host.

    T tokens, K picks per token, E modules (SKIP = id E), D_in / D_out the layer's widths

    routed_linear(...)[t] = res[t] + sum_{k: ids[t,k] < E} g[t,k] (LN_m(x[t]) @ W[m] + b[m])
    routed_ffn(...)[t]    = res[t] + sum_{k: ids[t,k] < E} g[t,k] (act(LN_m(x[t]) @ W1[m] + b1[m]) @ W2[m] + b2[m])
    (mom.routed's math, same signatures: LayerNorm or RMSNorm, GELU or SwiGLU, biases optional; g = None sums
    the picks unweighted)

Why a second path: the plan-based ops of mom.routed sort the picks by module (a sort, a bincount, a host read
of the counts, index scatters) and run through an autograd.Function; for the B tokens of a decode step on a
CPU those ~30 small operator calls cost about as much as the GEMVs that read the picked modules' weights.
Here, without autograd, a plan made on the host from ids.tolist() (a decode step has at most T*K <= 48 picks;
the plan-based torch ops read the plan's counts back too): the non-SKIP picks sorted by module, one gather of
their tokens' rows (none for one token) through each row's gamma, beta (one addcmul), then per picked module
one addmm over its rows into a [R + 1, D_out] buffer (the FFN: all first GEMMs, one GELU, all second GEMMs),
and one gather of each pick's row (SKIP: the zero row R) with the weighted sum over K and the residual (a
baddbmm). About 8 + (1 or 2) x (picked modules) operator calls, where the plan-based path takes ~30 + 4 x.

The routers of such a call, same rule: `gru_router` runs the GRU cell and head through the ATen calls
nn.GRUCell and nn.Linear make, without the module calls; `route` is mom.routers.route with the top-K taken on
the host from logits.tolist() (Python's stable sort, no torch.sort) and hands the routed ops the HostPlan of its
ids (a step's QKV and output projections share it). The pools' per-module weight views (W[m], b[m], ...) are
made once per parameter (`per_module`), not selected at every call. Everything here gives the plan-based path's
and the modules' results bit for bit where they run the same kernels (fp32 / fp64 decode logits unchanged).

Used by mom.routed's torch ops when autograd is off and T <= MAX_TOKENS (`applies`); the router then builds no
plan either. Tests: tests/test_few_tokens.py (against per-pick loops written in the test, T = 1..MAX_TOKENS,
K = 1..3, SKIP, repeated modules, fp64 / fp32, non-contiguous inputs, residual; the dispatch; the route against
a top-K loop and routers.route, ties and SKIP included; the router step against the GRU equations and the
modules; the view cache; decode steps bit-identical with and without the few-token routers).
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .blocks import ffn_act
from .routers import Routing, balance_loss, balance_terms

MAX_TOKENS = 16  # tokens per call up to which no-grad calls take this path (one decode step of batch <= 16)


def applies(n_tokens: int) -> bool:
    """Whether the torch backend's routed ops take this path for a call with n_tokens rows."""
    return n_tokens <= MAX_TOKENS and not torch.is_grad_enabled()


_VIEWS: Dict[int, tuple] = {}  # id(t) -> (weakref to t, (data_ptr, shape, strides), (t[0], ..., t[E - 1]))


def per_module(t: Optional[torch.Tensor]):
    """The per-module views (t[0], ..., t[E - 1]) of a stacked [E, ...] tensor (None: None), made once per tensor
    and storage: a decode step indexes the same pool parameters at every step, and t[m] is an operator call
    each time (select), a tuple lookup is not. The views alias t's storage (detached: no autograd; this path
    runs without it), so in-place updates of t show through them; a new storage (t.data = ..., model.to(...))
    makes new views at the next call (until then the old views keep the old storage). An entry goes when t is
    freed (weakref callback)."""
    if t is None:
        return None
    key, where = id(t), (t.data_ptr(), t.shape, t.stride())
    hit = _VIEWS.get(key)
    if hit is not None and hit[1] == where and hit[0]() is t:
        return hit[2]
    views = t.detach().unbind(0)
    _VIEWS[key] = (weakref.ref(t, lambda _, key=key: _VIEWS.pop(key, None)), where, views)
    return views


class HostPlan:
    """The picks of ids [T, K] sorted by module on the host (ids.tolist(): a decode step's few picks).

    groups: (module, lo, hi): the rows of each picked module; R rows in all.
    T > 1: rows are the non-SKIP picks sorted by (module, token, k), plus a zero row R for SKIP; index is one
    int64 tensor [R + R + T*K] (the token of each row, the module of each row, the row of each flat pick
    t*K + k), made with a single host-to-tensor copy.
    T = 1: row k is pick k (a SKIP pick's row stays 0): no index tensors, no gathers."""

    def __init__(self, ids: torch.Tensor, n_modules: int, rows: Optional[List[List[int]]] = None):
        """rows: ids.tolist() when the caller has it already (the few-token route: no second host read)."""
        T, K = ids.shape
        self.T, self.K = T, K
        self.token = self.module = self.row_of_pick = None
        rows = ids.tolist() if rows is None else rows
        if T == 1:
            self.groups = [(m, k, k + 1) for k, m in enumerate(rows[0]) if m < n_modules]
            self.R = K
            return
        picks = sorted((m, t, k) for t, row in enumerate(rows) for k, m in enumerate(row) if m < n_modules)
        R = len(picks)
        row_of_pick = [R] * (T * K)
        self.groups: List[Tuple[int, int, int]] = []
        for i, (m, t, k) in enumerate(picks):
            row_of_pick[t * K + k] = i
            if not self.groups or self.groups[-1][0] != m:
                self.groups.append((m, i, i + 1))
            else:
                self.groups[-1] = (m, self.groups[-1][1], i + 1)
        idx = torch.tensor([t for _, t, _ in picks] + [m for m, _, _ in picks] + row_of_pick, device=ids.device)
        self.R = R
        self.token, self.module, self.row_of_pick = idx[:R], idx[R:2 * R], idx[2 * R:]

    def rows_buffer(self, like, width):
        """[R (+ 1), width] for the rows; the rows no group writes (SKIP) are 0."""
        if self.T == 1:
            return like.new_zeros(self.K, width) if len(self.groups) < self.K else like.new_empty(self.K, width)
        y = like.new_empty(self.R + 1, width)
        y[self.R].zero_()
        return y

    def group_rows(self, buf):
        """buf's rows of each group, in self.groups' order (one token: row k = pick k, the same slices)."""
        return [buf[lo:hi] for _, lo, hi in self.groups]


def gru_router(x, state, w_ih, w_hh, b_ih, b_hh, w_head, b_head):
    """One GRU router step for a few tokens without autograd: x [T, D], state [T, r] or None (= zeros) ->
    (logits [T, S], state [T, r]): the ATen calls nn.GRUCell and nn.Linear make (torch._VF.gru_cell, F.linear),
    bit for bit, without their module calls and argument checks (mom.routers.GRURouter's fused-router hook).
    (A first step that leaves out the hidden side's GEMM, h = 0, with the gate math op for op in Python, was
    bit-identical too but not faster: more Python-level operator calls than the one GEMM it saves.)"""
    if state is None:
        state = x.new_zeros(x.shape[0], w_hh.shape[1])                         # what nn.GRUCell makes
    state = torch._VF.gru_cell(x, state, w_ih, w_hh, b_ih, b_hh)
    return F.linear(state, w_head, b_head), state


def route(logits: torch.Tensor, n_modules: int, config, balance: bool = True):
    """mom.routers.route for a few tokens without autograd, the top-K picked on the host: (Routing, HostPlan), or
    None where this path does not apply (dense routing, straight-through, a NaN logit: routers.route then).

    Same results, bit for bit: p = softmax(logits / tau) as there; each row's slots are its K largest logits, on
    ties the lower slot (Python's sort is stable: the stable descending torch.sort of routers.route); g = p at
    those slots (a gather), renormalised as there. The host read of the logits replaces the sort and the slice,
    and it gives the HostPlan of the routed ops that follow (the step's QKV and output projections share it)."""
    if config.dense_routing or config.straight_through:
        return None
    rows = logits.tolist()                                                     # [N][S] host floats, exact
    K = config.top_k
    slots = []
    for row in rows:
        s = sum(row)
        if s != s:  # a NaN (or inf - inf: then the spec, needlessly): torch.sort's NaN order is not Python's
            return None
        slots.append(sorted(range(len(row)), key=row.__getitem__, reverse=True)[:K])
    ids = [[min(s, n_modules) for s in row] for row in slots]
    tau = config.router_temperature
    probs = torch.softmax(logits if tau == 1.0 else logits / tau, dim=-1)     # [N, S] (x / 1.0 == x exactly)
    slots_t, ids_t = torch.tensor([slots, ids], device=logits.device).unbind(0)  # [N, K] each, one copy
    weights = probs.gather(1, slots_t)                                         # [N, K]
    if config.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    f = P = loss = None
    if balance:
        f, P = balance_terms(slots_t, probs, n_modules, config)
        loss = balance_loss(f, P)
    return (Routing(ids=ids_t, weights=weights, probs=probs, slots=slots_t, f=f, P=P, balance=loss),
            HostPlan(ids_t, n_modules, rows=ids))


def _normed(x, eps, norm="layer"):
    """x_hat [T, D], no affine: gamma[m] (and beta[m]) per module. LayerNorm: F.layer_norm's kernel, called
    directly; RMSNorm: mom.routed's x * rsqrt(mean(x^2) + eps) (the plan-based path's rounding)."""
    if norm == "rms":
        from .routed import _input_norm
        return _input_norm(x, x, eps, "rms")[0]
    return torch.native_layer_norm(x, x.shape[-1:], None, None, eps)[0]


def _module_inputs(xin, plan: HostPlan, gamma, beta):
    """(m, lo, hi, u [hi - lo, D]) per picked module: x (or x_hat through gamma[m], beta[m] or gamma[m] alone) of
    its rows' tokens."""
    if plan.token is None:                                            # one token: its row, per module
        g, b = per_module(gamma), per_module(beta)
        for m, lo, hi in plan.groups:
            u = xin if gamma is None else (xin * g[m] if beta is None else torch.addcmul(b[m], xin, g[m]))
            yield m, lo, hi, u
        return
    u = xin.index_select(0, plan.token)                               # [R, D], one gather
    if gamma is not None and beta is None:
        u = u * gamma.index_select(0, plan.module)
    elif gamma is not None:
        u = torch.addcmul(beta.index_select(0, plan.module), u, gamma.index_select(0, plan.module))
    for (m, lo, hi), rows in zip(plan.groups, plan.group_rows(u)):
        yield m, lo, hi, rows


def _combine(y, plan: HostPlan, weights, residual):
    """Rows y [R + 1, O] (row R = 0 for SKIP) -> [T, O]: each token sums its K picks' rows, weighted by
    g [T, K] when given, plus the residual [T, O]."""
    rows = y if plan.row_of_pick is None else y.index_select(0, plan.row_of_pick)
    slots = rows.view(plan.T, plan.K, -1)                             # [T, K, O]
    if weights is None:
        out = slots.sum(dim=1)
        return out if residual is None else residual + out
    g = (weights if weights.dtype == slots.dtype else weights.to(slots.dtype)).unsqueeze(1)  # [T, 1, K]
    if residual is None:
        return torch.bmm(g, slots).squeeze(1)
    if residual.dtype != slots.dtype:  # under autocast: the sum in the residual's (wider) dtype, as residual + y
        return residual + torch.bmm(g, slots).squeeze(1)
    return torch.baddbmm(residual.unsqueeze(1), g, slots).squeeze(1)


def routed_linear(x, weight, bias, ids, weights=None, ln_weight=None, ln_bias=None, eps=1e-5,
                  residual: Optional[torch.Tensor] = None, plan: Optional[HostPlan] = None, norm: str = "layer"):
    """x [T, D_in], weight [E, D_in, D_out], bias [E, D_out] or None, ids [T, K] -> [T, D_out]. plan: ids' host
    plan when the caller made it (the few-token route does, once for a step's QKV and output projections)."""
    plan = plan if plan is not None else HostPlan(ids, weight.shape[0])
    xin = x if ln_weight is None else _normed(x, eps, norm)
    y = plan.rows_buffer(x, weight.shape[2])                                              # [R (+1), D_out]
    W, b = per_module(weight), per_module(bias)
    for (m, _, _, u), out in zip(_module_inputs(xin, plan, ln_weight, ln_bias), plan.group_rows(y)):
        if bias is None:
            torch.mm(u, W[m], out=out)
        else:
            torch.addmm(b[m], u, W[m], out=out)
    return _combine(y, plan, weights, residual)


def _mm(bias, u, w, out):
    return torch.mm(u, w, out=out) if bias is None else torch.addmm(bias, u, w, out=out)


def routed_ffn(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps=1e-5,
               residual: Optional[torch.Tensor] = None, plan: Optional[HostPlan] = None, norm: str = "layer",
               act: str = "gelu"):
    """x [T, D], w1 [E, D, F or 2F], w2 [E, F, D] -> [T, D]: each pick's FFN of LN_m(x), weighted, summed."""
    plan = plan if plan is not None else HostPlan(ids, w1.shape[0])
    W1, B1, W2, B2 = per_module(w1), per_module(b1), per_module(w2), per_module(b2)
    h = plan.rows_buffer(x, w1.shape[2])                                                  # [R (+1), F or 2F]
    for (m, _, _, u), out in zip(_module_inputs(_normed(x, eps, norm), plan, ln_weight, ln_bias), plan.group_rows(h)):
        _mm(None if B1 is None else B1[m], u, W1[m], out)
    h = ffn_act(h, act)                                                # one activation for all rows [R (+1), F]
    y = plan.rows_buffer(x, w2.shape[2])                                                  # [R (+1), D]
    for (m, _, _), u, out in zip(plan.groups, plan.group_rows(h), plan.group_rows(y)):
        _mm(None if B2 is None else B2[m], u, W2[m], out)
    return _combine(y, plan, weights, residual)

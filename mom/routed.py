"""The two routed ops of a step, per backend: `routed_linear` (attention projections) and `routed_ffn`.

    N = tokens, K = picks per token, E = pool size (id E = SKIP), D = input width, O = output width

    routed_linear(x, weight, bias, ids, weights=None, ln_weight=None, ln_bias=None, eps, plan=None, norm="layer")
        y[t] = sum over k with ids[t,k] < E of w[t,k] * (LN_m(x[t]) @ weight[m] + bias[m]),  m = ids[t,k]
        (w = 1 when weights is None; LN_m = identity when ln_weight is None; bias None: none)
    routed_ffn(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps, plan=None, norm="layer", act="gelu")
        y[t] = sum over k with ids[t,k] < E of w[t,k] * (act(LN_m(x[t]) @ w1[m] + b1[m]) @ w2[m] + b2[m])
    norm: "layer": LN_m(x) = (x - mean) * rstd * ln_weight[m] + ln_bias[m]  (GPT-2's LayerNorm)
          "rms":   LN_m(x) = x * rsqrt(mean(x^2) + eps) * ln_weight[m]        (RMSNorm; ln_bias None)
    act:  "gelu":   act(h) = gelu_tanh(h), w1 [E, D, F]
          "swiglu": act(h) = silu(h[:, :F]) * h[:, F:], w1 [E, D, 2F] = gate | up (the Llama family)
    (b1, b2, bias, ln_bias may be None: bias-free modules)

Backends (same signatures; `mom_kernels` has the Triton one):
  "reference": the obvious per-module loop, as the authors' code does it (gather the tokens that picked m,
               run module m, index_add back). The test oracle.
  "torch":     vectorised: one stable sort of the N*K picks per routing plan (shared by a step's QKV and
               output projections), LayerNorm statistics once per token, one matmul per module over its
               contiguous rows of the sorted order, and a deterministic combine (each token gathers its K
               rows and sums them; no atomics). Autograd Functions with a hand-written backward save only
               x_hat, rstd, the FFN pre-activations (the activation is recomputed from them) and, when the
               routing weights need a gradient, the per-pick outputs. It reads the E per-module counts back to
               the host once per plan (to slice); the Triton backend has no host sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from . import blocks, few_tokens
from .blocks import ffn_act

NORMS, ACTS = ("layer", "rms"), ("gelu", "swiglu")


def gelu(x):
    return F.gelu(x, approximate="tanh")  # GPT-2's GELU


def module_norm(u, gamma, beta, eps: float, norm: str):
    """LN_m of rows u [R, D] with module m's gain gamma [D] and bias beta [D] (None for RMSNorm)."""
    if norm == "layer":
        return F.layer_norm(u, u.shape[-1:], gamma, beta, eps)
    return u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps) * gamma


def act_backward(grad, pre, act: str):
    """d pre from d act(pre): GELU's derivative, or SwiGLU's: pre = [gate | up], h = silu(gate) * up,
    d up = dh * silu(gate), d gate = dh * up * silu'(gate), silu'(z) = s(z) (1 + z (1 - s(z)))."""
    if act == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")
    gate, up = pre.chunk(2, dim=-1)
    s = torch.sigmoid(gate)
    return torch.cat([grad * up * s * (1 + gate * (1 - s)), grad * gate * s], dim=-1)


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
                            plan=None, norm="layer"):
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
            u = module_norm(u, g[m], None if beta is None else beta[m], eps, norm)
        out = u @ W[m]
        if b is not None:
            out = out + b[m]
        if w is not None:
            out = out * w[:, None]
        y = y.index_add(0, tok, out.to(y.dtype))  # (autocast may compute out in another dtype)
    return y


def reference_routed_ffn(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps=1e-5, plan=None,
                         norm="layer", act="gelu"):
    N, D = x.shape
    g, beta, W1, B1, W2, B2 = _modules(ln_weight, ln_bias, w1, b1, w2, b2)
    y = x.new_zeros(N, D)
    for m in range(len(W1)):
        tok, w = _module_rows(ids, weights, m)
        if tok.numel() == 0:
            continue
        u = module_norm(x[tok], g[m], None if beta is None else beta[m], eps, norm)
        h = u @ W1[m] if B1 is None else u @ W1[m] + B1[m]
        out = ffn_act(h, act) @ W2[m]
        if B2 is not None:
            out = out + B2[m]
        y = y.index_add(0, tok, (out * w[:, None]).to(y.dtype))
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


def _rows_buffer(like, plan: Plan, width):
    """[R + 1, width] for rows in sorted order; the last row stays 0 and stands for every SKIP pick."""
    R = sum(plan.sizes)
    buf = like.new_empty(R + 1, width)
    buf[R].zero_()
    return buf


def _per_pick(rows, plan: Plan):
    """Rows in sorted order plus the zero row [R + 1, O] -> [N, K, O] (a gather, no scatter)."""
    return rows[plan.slot].view(plan.n_tokens, plan.top_k, -1)


# Capacity routing gives every token one pick slot per module (K = E, most of them SKIP): there the [N, K, O]
# gather allocates and fills K rows per token for a handful of real ones, so from this many slots on, the sums
# over a token's picks run slot by slot instead (K gathers of [N, O] accumulated in slot order). Measured with
# `python -m benchmarks.bench_step --routing expert_choice` (E 8, 2 CPU threads): the capacity step went from
# 1.48x to 1.16x of the dense block forward. Token choice with top_k <= 3 (every preset's) keeps the one gather.
_SLOT_LOOP_FROM = 4


def _combine(rows, plan: Plan, weights):
    """Rows in sorted order plus the zero row [R + 1, O] -> [N, O]: each token sums its K rows, weighted by
    a [1, K] x [K, O] product (slot by slot when K is large). Deterministic (gathers and sums in slot order; no
    atomics, no index_add)."""
    N, K = plan.n_tokens, plan.top_k
    if K >= _SLOT_LOOP_FROM:
        slot = plan.slot.view(N, K)
        w = None if weights is None else weights.to(rows.dtype)
        y = rows[slot[:, 0]] if w is None else rows[slot[:, 0]] * w[:, :1]
        for k in range(1, K):
            if w is None:
                y += rows[slot[:, k]]
            else:
                y.addcmul_(rows[slot[:, k]], w[:, k:k + 1])
        return y
    per_pick = _per_pick(rows, plan)                                    # [N, K, O]
    if weights is None:
        return per_pick.sum(dim=1)
    return torch.bmm(weights.unsqueeze(1).to(per_pick.dtype), per_pick).squeeze(1)


def _pick_dots(rows, plan: Plan, grad):
    """d w[t, k] = grad[t] . row(t, k) [N, K] for the rows in sorted order plus the zero row (slot by slot when K
    is large, as _combine)."""
    N, K = plan.n_tokens, plan.top_k
    if K >= _SLOT_LOOP_FROM:
        slot = plan.slot.view(N, K)
        return torch.stack([torch.linalg.vecdot(rows[slot[:, k]], grad) for k in range(K)], dim=1)
    return torch.bmm(_per_pick(rows, plan), grad.unsqueeze(2)).squeeze(2)


def _input_norm(x, ln_weight, eps, norm="layer"):
    """x_hat per token and rstd [N, 1] when a norm is on (statistics once per token), else x:
    x_hat = (x - mean) * rstd (LayerNorm) or x * rstd with rstd = rsqrt(mean(x^2) + eps) (RMSNorm)."""
    if ln_weight is None:
        return x, None
    if norm == "rms":
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        rstd = torch.rsqrt(xf.pow(2).mean(dim=1, keepdim=True) + eps)  # [N, 1] (fp32 for 16-bit x)
        return (xf * rstd).to(x.dtype), rstd.to(x.dtype)
    x_hat, _, rstd = torch.native_layer_norm(x, [x.shape[1]], None, None, eps)  # one fused pass
    return x_hat, rstd.to(x.dtype)  # (fp32 statistics for 16-bit x)


def _norm_backward(dxh, xh, rstd, norm="layer"):
    """dx from d x_hat for x_hat = (x - mean) * rstd (LayerNorm) or x * rstd (RMSNorm: no mean term)."""
    c2 = xh * (dxh * xh).mean(dim=1, keepdim=True)
    if norm == "rms":
        return rstd * (dxh - c2)
    return rstd * (dxh - dxh.mean(dim=1, keepdim=True) - c2)


def _module_input(xin, plan: Plan, m, lo, hi, gamma, beta):
    """Module m's input rows [R_m, D]: gathered x (or x_hat, with the module's gamma and beta, if any)."""
    u = xin[plan.token[lo:hi]]                                         # a fresh copy: safe to overwrite
    if gamma is None:
        return u
    return u.mul_(gamma[m]) if beta is None else torch.addcmul(beta[m], u, gamma[m], out=u)


def _input_grads(du_rows, plan: Plan, xin, rstd, norm="layer"):
    """Sum the per-pick input gradients [R + 1, D] over each token's picks (deterministic gather + sum), then
    through the norm (shared statistics) when there is one."""
    d = _combine(du_rows, plan, None)                                  # [N, D] d(x or x_hat)
    return d if rstd is None else _norm_backward(d, xin, rstd, norm)


def _mm(bias, u, w, out):
    """out = u @ w (+ bias), into out."""
    return torch.mm(u, w, out=out) if bias is None else torch.addmm(bias, u, w, out=out)


def _bounds(plan: Plan):
    """(module, first row, end row) of every module with rows: modules nobody picked are skipped (a decoded
    token picks K of E modules; the E - K empty ones would cost a few ops each for nothing)."""
    lo = 0
    for m, n in enumerate(plan.sizes):
        if n:
            yield m, lo, lo + n
        lo += n


class _TorchRoutedLinear(torch.autograd.Function):
    """routed_linear with a hand-written backward: saves x (or x_hat), rstd and, when the routing weights
    need a gradient, the per-pick outputs; the gathered, LayerNormed rows are recomputed in the backward.
    Weight gradients are written straight into [E, ...] tensors (no per-module grads stacked afterwards)."""

    @staticmethod
    def forward(ctx, x, weight, bias, weights, ln_weight, ln_bias, eps, plan, norm):
        xin, rstd = _input_norm(x, ln_weight, eps, norm)                # [N, D], [N, 1]
        y_rows = _rows_buffer(x, plan, weight.shape[2])                 # [R + 1, O] sorted by module
        for m, lo, hi in _bounds(plan):
            u = _module_input(xin, plan, m, lo, hi, ln_weight, ln_bias)
            _mm(None if bias is None else bias[m], u, weight[m], y_rows[lo:hi])
        ctx.plan, ctx.norm = plan, norm
        ctx.save_for_backward(xin, rstd, weight, bias, weights, ln_weight, ln_bias,
                              y_rows if weights is not None and weights.requires_grad else None)
        return _combine(y_rows, plan, weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):                                            # grad [N, O]
        xin, rstd, weight, bias, weights, ln_weight, ln_bias, y_rows = ctx.saved_tensors
        plan = ctx.plan
        grad = grad.contiguous()
        go = grad[plan.token]                                           # [R, O]
        if weights is not None:
            go = go * weights.reshape(-1)[plan.pick].unsqueeze(1).to(go.dtype)
        dweight = torch.zeros_like(weight)                              # 0 for the modules nobody picked
        dbias = torch.zeros_like(bias) if bias is not None else None
        dgamma = torch.zeros_like(ln_weight) if ln_weight is not None else None
        dbeta = torch.zeros_like(ln_bias) if ln_bias is not None else None
        du_rows = _rows_buffer(go, plan, weight.shape[1])               # [R + 1, D]
        for m, lo, hi in _bounds(plan):
            u = _module_input(xin, plan, m, lo, hi, ln_weight, ln_bias)
            torch.mm(u.t(), go[lo:hi], out=dweight[m])
            if dbias is not None:
                torch.sum(go[lo:hi], dim=0, out=dbias[m])
            torch.mm(go[lo:hi], weight[m].t(), out=du_rows[lo:hi])
            if ln_weight is not None:
                xh = xin[plan.token[lo:hi]]
                torch.sum(du_rows[lo:hi] * xh, dim=0, out=dgamma[m])
                if dbeta is not None:
                    torch.sum(du_rows[lo:hi], dim=0, out=dbeta[m])
                du_rows[lo:hi] *= ln_weight[m]
        dx = _input_grads(du_rows, plan, xin, rstd, ctx.norm)
        dweights = None
        if y_rows is not None:                                          # d w[t, k] = grad[t] . y(t, k)
            dweights = _pick_dots(y_rows, plan, grad).to(weights.dtype)
        return dx, dweight, dbias, dweights, dgamma, dbeta, None, None, None


class _TorchRoutedFFN(torch.autograd.Function):
    """routed_ffn with a hand-written backward: saves x_hat, rstd, the pre-activations [R, F] (GELU) or
    [R, 2F] (SwiGLU: gate | up; the activation is recomputed from them) and, when the routing weights need a
    gradient, the per-pick outputs [R, D]."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, w1, b1, w2, b2, weights, eps, plan, norm, act):
        xh, rstd = _input_norm(x, ln_weight, eps, norm)                 # [N, D], [N, 1]
        pre = x.new_empty(sum(plan.sizes), w1.shape[2])                 # [R, F or 2F]
        y_rows = _rows_buffer(x, plan, w2.shape[2])                     # [R + 1, D]
        for m, lo, hi in _bounds(plan):
            u = _module_input(xh, plan, m, lo, hi, ln_weight, ln_bias)
            _mm(None if b1 is None else b1[m], u, w1[m], pre[lo:hi])
            _mm(None if b2 is None else b2[m], ffn_act(pre[lo:hi], act), w2[m], y_rows[lo:hi])
        ctx.plan, ctx.norm, ctx.act = plan, norm, act
        ctx.biases = (b1 is not None, b2 is not None)
        ctx.save_for_backward(xh, rstd, ln_weight, ln_bias, w1, w2, weights, pre,
                              y_rows if weights.requires_grad else None)
        return _combine(y_rows, plan, weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):                                            # grad [N, D]
        xh, rstd, ln_weight, ln_bias, w1, w2, weights, pre, y_rows = ctx.saved_tensors
        plan, act = ctx.plan, ctx.act
        grad = grad.contiguous()
        go = grad[plan.token] * weights.reshape(-1)[plan.pick].unsqueeze(1).to(grad.dtype)  # [R, D]
        dw1, dw2 = torch.zeros_like(w1), torch.zeros_like(w2)           # 0 for the modules nobody picked
        db1 = w1.new_zeros(w1.shape[0], w1.shape[2]) if ctx.biases[0] else None
        db2 = w2.new_zeros(w2.shape[0], w2.shape[2]) if ctx.biases[1] else None
        dgamma = torch.zeros_like(ln_weight)
        dbeta = torch.zeros_like(ln_bias) if ln_bias is not None else None
        du_rows = _rows_buffer(go, plan, w1.shape[1])                   # [R + 1, D]
        for m, lo, hi in _bounds(plan):
            p = pre[lo:hi]
            torch.mm(ffn_act(p, act).t(), go[lo:hi], out=dw2[m])
            if db2 is not None:
                torch.sum(go[lo:hi], dim=0, out=db2[m])
            dpre = act_backward(go[lo:hi] @ w2[m].t(), p, act)          # [R_m, F or 2F]
            u = _module_input(xh, plan, m, lo, hi, ln_weight, ln_bias)
            torch.mm(u.t(), dpre, out=dw1[m])
            if db1 is not None:
                torch.sum(dpre, dim=0, out=db1[m])
            torch.mm(dpre, w1[m].t(), out=du_rows[lo:hi])
            torch.sum(du_rows[lo:hi] * xh[plan.token[lo:hi]], dim=0, out=dgamma[m])
            if dbeta is not None:
                torch.sum(du_rows[lo:hi], dim=0, out=dbeta[m])
            du_rows[lo:hi] *= ln_weight[m]
        dx = _input_grads(du_rows, plan, xh, rstd, ctx.norm)
        dweights = None
        if y_rows is not None:
            dweights = _pick_dots(y_rows, plan, grad).to(weights.dtype)
        return dx, dgamma, dbeta, dw1, db1, dw2, db2, dweights, None, None, None, None


def _autocast(*tensors):
    """Under torch.autocast, the activations and layer tensors in the autocast dtype (as autocast would cast
    a matmul's operands; differentiable, so fp32 parameters get fp32 gradients)."""
    dev = tensors[0].device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def torch_routed_linear(x, weight, bias, ids, weights=None, ln_weight=None, ln_bias=None, eps=1e-5,
                        plan: Optional[Plan] = None, residual: Optional[torch.Tensor] = None, norm: str = "layer"):
    """[residual +] the routed linear; a few tokens without autograd take mom.few_tokens (no plan)."""
    x, weight, bias, ln_weight, ln_bias = _autocast(x, weight, bias, ln_weight, ln_bias)
    if isinstance(plan, few_tokens.HostPlan) or (plan is None and few_tokens.applies(ids.shape[0])):
        return few_tokens.routed_linear(x, weight, bias, ids, weights, ln_weight, ln_bias, eps, residual=residual,
                                        plan=plan, norm=norm)
    plan = plan if plan is not None else make_plan(ids, weight.shape[0])
    y = _TorchRoutedLinear.apply(x, weight, bias, weights, ln_weight, ln_bias, eps, plan, norm)
    return y if residual is None else residual + y


def torch_routed_ffn(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps=1e-5,
                     plan: Optional[Plan] = None, residual: Optional[torch.Tensor] = None, norm: str = "layer",
                     act: str = "gelu"):
    """[residual +] the routed FFN; a few tokens without autograd take mom.few_tokens (no plan)."""
    x, ln_weight, ln_bias, w1, b1, w2, b2 = _autocast(x, ln_weight, ln_bias, w1, b1, w2, b2)
    if isinstance(plan, few_tokens.HostPlan) or (plan is None and few_tokens.applies(ids.shape[0])):
        return few_tokens.routed_ffn(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps, residual=residual,
                                     plan=plan, norm=norm, act=act)
    plan = plan if plan is not None else make_plan(ids, w1.shape[0])
    y = _TorchRoutedFFN.apply(x, ln_weight, ln_bias, w1, b1, w2, b2, weights, eps, plan, norm, act)
    return y if residual is None else residual + y


def _torch_plan(ids: torch.Tensor, n_modules: int) -> Optional[Plan]:
    """The torch backend's plan of a router call: none when its routed ops will take mom.few_tokens."""
    return None if few_tokens.applies(ids.shape[0]) else make_plan(ids, n_modules)


def _torch_route(logits: torch.Tensor, n_modules: int, config, balance: bool = True):
    """(Routing, plan) of the torch backend: a few tokens without autograd are routed on the host
    (mom.few_tokens.route: the same picks and weights, and the host plan of the routed ops that follow); other
    calls: mom.routers.route, then make_plan (none where the routed ops take mom.few_tokens)."""
    if few_tokens.applies(logits.shape[0]):
        fast = few_tokens.route(logits, n_modules, config, balance)
        if fast is not None:
            return fast
    from .routers import route

    r = route(logits, n_modules, config, balance)
    return r, _torch_plan(r.ids, n_modules)


# ----------------------------------------------------------------------------------------------------------
class Ops:
    """The routed ops of one backend: route (logits -> Routing and the plan the routed ops share),
    routed_linear, routed_ffn, and qkv_heads (the routed QKV split into heads, q and k rotated: one Triton
    launch on the Triton backend, mom.blocks.qkv_heads elsewhere)."""

    def __init__(self, name, make_plan, routed_linear, routed_ffn, route=None, gru_router=None,
                 fused_residual=False, few_token_gru_router=None, qkv_heads=None, capacity_route=None):
        self.name, self.make_plan = name, make_plan
        self._capacity_route = capacity_route  # expert choice: (logits, n_modules, config, seq_len, train, balance)
        self.qkv_heads = qkv_heads if qkv_heads is not None else blocks.qkv_heads
        self._linear, self._ffn, self._route = routed_linear, routed_ffn, route
        self.gru_router = gru_router  # a fused GRU router step, cell + head (None: nn.GRUCell + nn.Linear)
        self.fused_residual = fused_residual  # the ops take residual= and add it themselves
        self._few_token_gru_router = few_token_gru_router  # the GRU router step of few-token no-grad calls

    def gru_router_for(self, n_tokens: int):
        """The fused GRU router step (or None: nn.GRUCell + nn.Linear) for router calls of n_tokens rows: the
        torch backend's few-token one (mom.few_tokens.gru_router) where its routed ops take mom.few_tokens."""
        if self._few_token_gru_router is not None and few_tokens.applies(n_tokens):
            return self._few_token_gru_router
        return self.gru_router

    def routed_linear(self, *args, residual=None, **kwargs):
        """residual + routed_linear(...) (residual None: just the routed sum)."""
        if residual is None or self.fused_residual:
            return self._linear(*args, **kwargs, **({"residual": residual} if residual is not None else {}))
        return residual + self._linear(*args, **kwargs)

    def routed_ffn(self, *args, residual=None, **kwargs):
        """residual + routed_ffn(...) (residual None: just the routed sum)."""
        if residual is None or self.fused_residual:
            return self._ffn(*args, **kwargs, **({"residual": residual} if residual is not None else {}))
        return residual + self._ffn(*args, **kwargs)

    def route(self, logits, n_modules: int, config, balance: bool = True, seq_len: Optional[int] = None,
              train: bool = True):
        """(Routing, plan) of router logits [N, S] over a pool of n_modules. balance=False: the balance terms
        may be left out (None; the Triton route computes them in its fused kernel anyway). Expert-choice routing
        (config.routing; mom/capacity.py) takes the sequence length of the N tokens and whether to route
        training-style (top capacity per sequence) or by the threshold rule; every backend then runs its picks."""
        if config.routing == "expert_choice":
            seq_len = seq_len or logits.shape[0]
            if self._capacity_route is not None:
                return self._capacity_route(logits, n_modules, config, seq_len, train, balance)
            from .capacity import route_capacity

            r = route_capacity(logits, n_modules, config, seq_len, train, balance)
            return r, self.make_plan(r.ids, n_modules)
        if self._route is not None:
            return self._route(logits, n_modules, config, balance)
        from .routers import route

        r = route(logits, n_modules, config, balance)
        return r, self.make_plan(r.ids, n_modules)


REFERENCE = Ops("reference", lambda ids, n_modules: None, reference_routed_linear, reference_routed_ffn)
TORCH = Ops("torch", _torch_plan, torch_routed_linear, torch_routed_ffn, _torch_route, fused_residual=True,
            few_token_gru_router=few_tokens.gru_router)


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
    from mom_kernels import decode, rotary, routing
    from mom_kernels.gru import gru_router

    def plan(ids, n_modules):  # (the decoding path needs none)
        return None if decode.use_decode(ids) else routing.make_plan(ids, n_modules)

    # decode.routed_*: the grouped-GEMM ops, or (no grad, at most decode.DECODE_MAX_TOKENS tokens) a pass that
    # reads each picked module's weights once - the decoding path
    return Ops("triton", plan, decode.routed_linear, decode.routed_ffn, _triton_route, gru_router,
               fused_residual=True, qkv_heads=rotary.qkv_heads, capacity_route=_triton_capacity_route)


def _triton_capacity_route(logits, n_modules: int, config, seq_len: int, train: bool, balance: bool = True):
    """Expert-choice route (mom_kernels.capacity): one launch and its loss sum; training-style picks come with
    their uniform plan (static schedule); the threshold rule's picks get a sorted plan, or none for a decode step."""
    from mom_kernels.capacity import capacity_route
    from mom_kernels.decode import use_decode
    from mom_kernels.routing import make_plan

    from .routers import Routing

    n_take = config.capacity_tokens(n_modules, seq_len)
    ids, weights, probs, loss, plan = capacity_route(logits, n_modules, seq_len, n_take, config.router_temperature,
                                                     config.capacity_scale, train)
    if plan is None and not use_decode(ids):
        plan = make_plan(ids, n_modules)
    return Routing(ids, weights, probs, ids, None, None, loss if train and balance else None), plan


def _triton_route(logits, n_modules: int, config, balance: bool = True):
    """Route + plan + balance terms in three Triton launches (mom_kernels.route); a decode step (balance off,
    the few-token ops of mom_kernels.decode ahead) needs neither plan nor balance terms: one launch."""
    from mom_kernels.decode import use_decode
    from mom_kernels.route import route as kernel_route, route_picks

    from .routers import Routing

    if not balance and use_decode(logits):  # (no grad: straight_through_clamp changes nothing)
        ids, weights, probs, slots = route_picks(
            logits, n_modules, top_k=config.top_k, temperature=config.router_temperature,
            renormalize=config.renormalize, straight_through=config.straight_through, dense=config.dense_routing)
        return Routing(ids, weights, probs, slots, None, None, None), None

    r = kernel_route(logits, n_modules, top_k=config.top_k, temperature=config.router_temperature,
                     renormalize=config.renormalize, straight_through=config.straight_through,
                     dense=config.dense_routing, balance_skip=config.balance_skip,
                     straight_through_clamp=config.straight_through_clamp)
    return Routing(r.ids, r.weights, r.probs, r.slots, r.f, r.P, r.balance), r.plan

"""Routed FFN: two gathered grouped GEMMs over the picked FFN modules with a per-module norm.

    y[t] = sum_{k : ids[t,k] < E} g[t,k] * FFN_m(LN_m(x[t])),   m = ids[t,k]
    FFN_m(u) = gelu_tanh(u @ W1[m] + b1[m]) @ W2[m] + b2[m]                          (act="gelu", GPT-2)
             = (silu(u @ W1[m][:, :F]) * (u @ W1[m][:, F:])) @ W2[m]                  (act="swiglu", Llama family)
    LN_m: LayerNorm (norm="layer") or RMSNorm (norm="rms": no beta); b1, b2 None: bias-free

Dataflow (s = module-sorted row, p = t*K + k its pick):
    plan -> mean, rstd per token
    GEMM1: pre[s] = LN_m(x[t]) @ W1[m] + b1[m] (LN_m(x[t]) written in sorted order first by `gather_rows`,
           a transient buffer; MOM_KERNELS_LN=fused: x gathered on load, gamma/beta in the prologue),
           h[s] = gelu(pre[s]) (epilogue; pre kept for backward, grouped store)
    GEMM2: slot[p] = g_p * (h[s] @ W2[m] + b2[m])      (per-pick slot; K == 1: token row)
    combine: y[t] = sum_k slot[t*K + k] in fp32
Backward:
    GEMM2^T: G[s] = dy[t] @ W2[m]^T;  dg_p = G[s] . gelu(pre[s]) + dy[t] . b2[m] (row dots in the
             epilogue, partial per N tile, summed after);  dpre[s] = g_p * G[s] * gelu'(pre[s])
    dW2[m] = sum gelu(pre)^T (g dy[t]),  db2[m] = sum g dy[t]      (no atomics; dW by `grouped_dw`: on CUDA
             bf16 gelu(pre) and g dy[t] gathered in sorted order, then torch._grouped_mm; else a Triton
             kernel walking each module's rows; db by `segment_sum`)
    GEMM1^T: dU[p] = dpre[s] @ W1[m]^T;  dx = LayerNorm backward of sum_k gamma[m] * dU[p]
    dW1[m] = sum LN_m(x[t])^T dpre[s],  db1[m] = sum dpre[s];  dgamma, dbeta from dU and x_hat
SwiGLU: GEMM1 computes gate and up for the same output columns in one mainloop (two accumulators over one A tile,
W1 = [gate | up] made once at load time), h = silu(gate) * up in the epilogue, pre = [gate | up] [T*K, 2F] kept;
GEMM2^T's epilogue writes dpre = [g G up silu'(gate) | g G silu(gate)] and its row dot uses h recomputed from pre.
Saved for backward: x, the parameters, ids, g, the plan, mean / rstd [T] and the pre-activation
pre [T*K, F] (GELU; SwiGLU: [T*K, 2F]) (the activation and h are recomputed from it); no gathered copy of x and no
h is kept.
Tests: tests/test_kernels_routed_ffn.py.
"""
from typing import Optional, Tuple

import torch

from . import checks
from .common import _check_device, acc_dtype, slot_dtype
from .gathers import ln_operand
from .gemm import grouped_gemm, rowdot_tiles
from .reductions import combine, ln_affine_bwd, routing_weight_grad
from .routed_linear import _plan_of
from .routing import RoutingPlan, make_plan
from .weight_grads import grouped_dw

Tensor = torch.Tensor


def _contig(t):
    return t.contiguous() if t is not None else None


def ffn_fwd_impl(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps, plan, save_pre: bool, residual=None,
                 rms=False, swiglu=False):
    """Launch the forward. Returns (y [T, D], mean [T], rstd [T], pre [T*K, F or 2F] or [0, F or 2F]); y includes
    the residual [T, D] when one is given (added by the combine, in fp32). rms: RMSNorm; swiglu: W1 = gate | up."""
    _check_device(x)
    T, K = ids.shape
    E, D, F1 = w1.shape
    F = w2.shape[1]
    P = T * K
    # LN_m(x[t]) written in sorted order with the statistics (one launch), or x and a fused LN prologue
    a, a_gather, (mean, rstd), a_ln = ln_operand(x, plan, ln_weight.contiguous(), _contig(ln_bias), eps, rms)
    g = weights.reshape(-1).contiguous()
    # rows 0..S-1 of h / pre are used (S = non-SKIP picks, known only on the device)
    h = x.new_empty(P, F)
    pre = x.new_empty(P if save_pre else 0, F1)
    grouped_gemm(a, w1, plan, out=h, a_gather=a_gather, bias=b1, ln=a_ln, gelu=True, role="ffn_up",
                 pre=pre if save_pre else None, save_pre=save_pre, store="sorted", swiglu=swiglu)
    del a
    if K == 1 and residual is None:
        y = x.new_zeros(T, D)
        grouped_gemm(h, w2, plan, out=y, a_gather=False, bias=b2, weights=g, store="token", role="ffn_down")
    else:
        buf = torch.empty(P, D, device=x.device, dtype=slot_dtype(x.dtype))  # per-pick slots
        grouped_gemm(h, w2, plan, out=buf, a_gather=False, bias=b2, weights=g, store="pick", role="ffn_down")
        y = x.new_empty(T, D)
        combine(buf, ids, E, y, res=residual)
    return y, mean, rstd, pre


def _like(t, x):
    return torch.empty(t.shape, device=x.device, dtype=t.dtype) if t is not None else None


def ffn_bwd_impl(dy, x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, mean, rstd, pre, plan, add_dy=False,
                 rms=False, swiglu=False):
    """Launch the backward. Returns (dx, dln_weight, dln_bias, dw1, db1, dw2, db2, dweights) (None for absent
    biases); add_dy: x was also the residual, dx includes dy."""
    T, K = ids.shape
    E, D, F1 = w1.shape
    F = w2.shape[1]
    P = T * K
    cdt = acc_dtype(x.dtype)
    dy = dy.to(x.dtype)
    g = weights.reshape(-1).contiguous()
    ln = (mean, rstd, ln_weight.contiguous(), _contig(ln_bias))
    # GEMM2^T: dpre = g * (dy[t] @ W2^T) * act'(pre), row dots with act(pre) for dg (SwiGLU: [P, 2F])
    dpre = x.new_empty(P, F1)
    part = torch.empty(rowdot_tiles(F, x.dtype), P, device=x.device, dtype=cdt)  # SKIP columns unread
    grouped_gemm(dy, w2, plan, out=dpre, a_gather=True, w_transposed=True, pre=pre, gelu_bwd=True, role="ffn_down_dx",
                 weights=g, rowdot=1, part=part, store="sorted", swiglu=swiglu)
    dw2, db2 = grouped_dw(pre, dy, plan, db=_like(b2, x), a_gather=False, a_mode=3 if swiglu else 2, dy_gather=True,
                          weights=g)
    # GEMM1^T: dU[p] = dpre[s] @ W1^T into per-pick slots, then the norm's backward per token
    buf = torch.empty(P, D, device=x.device, dtype=slot_dtype(x.dtype))
    grouped_gemm(dpre, w1, plan, out=buf, a_gather=False, w_transposed=True, store="pick", role="ffn_up_dx")
    dx = x.new_empty(T, D)
    combine(buf, ids, E, dx, gamma=ln[2], ln=(mean, rstd), x=x, res=dy if add_dy else None, rms=rms)
    dgamma = torch.empty(ln_weight.shape, device=x.device, dtype=ln_weight.dtype)
    dbeta = _like(ln_bias, x)
    ln_affine_bwd(buf, x, mean, rstd, plan, dgamma, dbeta)
    dw1, db1 = grouped_dw(x, dpre, plan, db=_like(b1, x), a_gather=True, a_mode=1, ln=ln, dy_gather=False)
    dg = routing_weight_grad(part, dy, b2, ids, E, weights.dtype)
    return dx, dgamma, dbeta, dw1, db1, dw2, db2, dg


# ---------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("mom_kernels::routed_ffn_fwd", mutates_args=())
def _routed_ffn_fwd(x: Tensor, ln_weight: Tensor, ln_bias: Optional[Tensor], w1: Tensor, b1: Optional[Tensor],
                    w2: Tensor, b2: Optional[Tensor], ids: Tensor, weights: Tensor, eps: float, sorted_pick: Tensor,
                    offsets: Tensor, tile_module: Tensor, tile_row_start: Tensor, block_m: int,
                    save_pre: bool, residual: Optional[Tensor], res_is_x: bool, rms: bool, swiglu: bool
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    plan = _plan_of(ids, w1.shape[0], block_m, sorted_pick, offsets, tile_module, tile_row_start)
    return ffn_fwd_impl(x, ln_weight, ln_bias, w1, b1, w2, b2, ids.contiguous(), weights, eps, plan,
                        save_pre, x if res_is_x else residual, rms, swiglu)


@_routed_ffn_fwd.register_fake
def _(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps, sorted_pick, offsets, tile_module,
      tile_row_start, block_m, save_pre, residual, res_is_x, rms, swiglu):
    T, K = ids.shape
    cdt = acc_dtype(x.dtype)
    return (x.new_empty(x.shape), x.new_empty(T, dtype=cdt), x.new_empty(T, dtype=cdt),
            x.new_empty(T * K if save_pre else 0, w1.shape[2]))


@torch.library.custom_op("mom_kernels::routed_ffn_bwd", mutates_args=())
def _routed_ffn_bwd(dy: Tensor, x: Tensor, ln_weight: Tensor, ln_bias: Optional[Tensor], w1: Tensor,
                    b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], ids: Tensor, weights: Tensor, mean: Tensor,
                    rstd: Tensor, pre: Tensor, sorted_pick: Tensor, offsets: Tensor, tile_module: Tensor,
                    tile_row_start: Tensor, block_m: int, add_dy: bool, rms: bool, swiglu: bool
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    plan = _plan_of(ids, w1.shape[0], block_m, sorted_pick, offsets, tile_module, tile_row_start)
    outs = ffn_bwd_impl(dy, x, ln_weight, ln_bias, w1, b1, w2, b2, ids.contiguous(), weights, mean,
                        rstd, pre, plan, add_dy, rms, swiglu)
    return tuple(o if o is not None else x.new_empty(0) for o in outs)  # (empty for absent biases)


@_routed_ffn_bwd.register_fake
def _(dy, x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, mean, rstd, pre, sorted_pick, offsets,
      tile_module, tile_row_start, block_m, add_dy, rms, swiglu):
    return tuple(t.new_empty(t.shape) if t is not None else x.new_empty(0)
                 for t in (x, ln_weight, ln_bias, w1, b1, w2, b2, weights))


def _ffn_setup_context(ctx, inputs, output):
    (x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps, sorted_pick, offsets, tile_module,
     tile_row_start, block_m, save_pre, residual, res_is_x, rms, swiglu) = inputs
    _, mean, rstd, pre = output
    ctx.res = (residual is not None, res_is_x)
    if not save_pre:
        raise RuntimeError("routed_ffn_fwd was called with save_pre=False but a gradient is needed")
    ctx.set_materialize_grads(False)  # mean / rstd / pre get no gradient: no zero-filled tensors for them
    ctx.block_m, ctx.flags = block_m, (rms, swiglu)
    ctx.has = (ln_bias is not None, b1 is not None, b2 is not None)
    ctx.save_for_backward(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, mean, rstd, pre,
                          sorted_pick, offsets, tile_module, tile_row_start)


def _ffn_backward(ctx, dy, _dmean, _drstd, _dpre):
    if dy is None:
        return (None,) * 20
    saved = ctx.saved_tensors
    dx, dgamma, dbeta, dw1, db1, dw2, db2, dg = torch.ops.mom_kernels.routed_ffn_bwd(
        dy, *saved, ctx.block_m, ctx.res[1], *ctx.flags)
    has_lb, has_b1, has_b2 = ctx.has
    # the residual's gradient is dy itself
    return ((dx, dgamma, dbeta if has_lb else None, dw1, db1 if has_b1 else None, dw2, db2 if has_b2 else None,
             None, dg) + (None,) * 7 + (dy if ctx.res[0] else None, None, None, None))


_routed_ffn_fwd.register_autograd(_ffn_backward, setup_context=_ffn_setup_context)


# ---------------------------------------------------------------------------------------------
# Functional
# ---------------------------------------------------------------------------------------------

def routed_ffn(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps=1e-5,
               plan: Optional[RoutingPlan] = None, residual=None, norm: str = "layer", act: str = "gelu"):
    """Routed FFN (see the module docstring). x [T, D]; ln_weight [E, D], ln_bias [E, D] (None: no beta; RMSNorm
    takes none); w1 [E, D, F] (act "gelu") or [E, D, 2F] (act "swiglu": gate | up); b1 [E, F or 2F] or None;
    w2 [E, F, D]; b2 [E, D] or None; ids [T, K] int32/int64 with E = SKIP; weights [T, K]; norm "layer" | "rms";
    plan: a `make_plan(ids, E)` to reuse (built here if None). Returns [T, D] in x's dtype.
    Differentiable in x, every parameter and weights. Under torch.autocast x and the parameters are cast
    to the autocast dtype (the routing weights keep theirs) and y comes back in it. residual [T, D] or None:
    returns residual + y, added in the combine (fp32; no separate add launch, and when residual is x itself
    no separate gradient to add either)."""
    res_is_x = residual is x
    x, ln_weight, ln_bias, w1, b1, w2, b2, residual = checks.autocast_inputs(x, ln_weight, ln_bias, w1, b1, w2,
                                                                             b2, residual)
    checks.check_x(x)
    x, ln_weight, ln_bias, w1, b1, w2, b2, residual = map(checks.int32_safe, (x, ln_weight, ln_bias, w1, b1, w2,
                                                                              b2, residual))
    T, D = x.shape
    dev, dt = x.device, x.dtype
    checks.check_norm(norm, ln_bias, act)
    checks.check_tensor("w1", w1, (None, D, None), dt, dev)
    E, _, F1 = w1.shape
    if E < 1:
        raise ValueError("w1 must hold at least one module (E >= 1)")
    if act == "swiglu" and F1 % 2:
        raise ValueError(f"w1 must be [E, D, 2F] (gate | up) for act='swiglu', got {list(w1.shape)}")
    F = F1 // 2 if act == "swiglu" else F1
    checks.check_tensor("ln_weight", ln_weight, (E, D), dt, dev)
    checks.check_tensor("ln_bias", ln_bias, (E, D), dt, dev, optional=True)
    checks.check_tensor("b1", b1, (E, F1), dt, dev, optional=True)
    checks.check_tensor("w2", w2, (E, F, D), dt, dev)
    checks.check_tensor("b2", b2, (E, D), dt, dev, optional=True)
    checks.check_ids(ids, T, E, dev)
    checks.check_tensor("weights", weights, (T, ids.shape[1]), None, dev)
    checks.check_tensor("residual", residual, (T, D), dt, dev, optional=True)
    checks.check_plan(plan, ids, E)
    if plan is None:
        plan = make_plan(ids, E)
    save_pre = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, ln_weight, ln_bias, w1, b1, w2, b2, weights))
    with torch.autocast(x.device.type, enabled=False):  # inputs are already in their compute dtype
        y = torch.ops.mom_kernels.routed_ffn_fwd(
            x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, float(eps), *plan.tensors(),
            plan.block_m, save_pre, None if res_is_x else residual, res_is_x, norm == "rms", act == "swiglu")[0]
    return y

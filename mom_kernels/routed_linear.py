"""Routed linear layer: a grouped GEMM over the picked modules with an optional per-module LayerNorm.

    y[t] = sum_{k : ids[t,k] < E} g[t,k] * (U_m(x[t]) @ W[m] + b[m]),   m = ids[t,k]
    U_m(x) = LN_m(x) = (x - mean(x)) * rstd(x) * gamma[m] + beta[m]   (or x without LayerNorm)
           = x * rsqrt(mean(x^2) + eps) * gamma[m]                    (norm="rms": RMSNorm, no beta)
    g = 1 when `weights` is None (the QKV projection), the routing weights otherwise (output proj.);
    b = 0 when `bias` is None (bias-free modules: no bias tensor is read or written)

Dataflow: plan (sort picks by module) -> LayerNorm statistics once per token -> LN_m(x[t]) written in
module-sorted order (`gather_rows`, a transient [S, N_in] buffer; MOM_KERNELS_LN=fused applies gamma[m],
beta[m] in the GEMM's prologue instead) -> grouped GEMM (rows gathered on load when there is no LayerNorm),
+ b[m], * g -> per-pick slots -> fp32 sum over the K picks (K == 1: stored straight into the token row).

Backward (G_p = dy[t] @ W[m]^T, dU_p = g_p * G_p, all deterministic, no atomics):
    dx      = sum_k dU_p (no LayerNorm), or LayerNorm backward of sum_k gamma[m] * dU_p
    dW[m]   = sum over module m's rows of U_m(x[t])^T (g_p dy[t]),  db[m] = sum g_p dy[t]
    dgamma[m] = sum dU_p * x_hat[t],  dbeta[m] = sum dU_p
    dg_p    = G_p . U_m(x[t]) + dy[t] . b[m]
Saved for backward: x, the weights, ids, g, the plan and the per-token mean / rstd ([T] each);
U is recomputed from x in the backward, no gathered [T*K, N_in] copy is kept. dW goes through `grouped_dw`
(torch._grouped_mm on gathered operands on CUDA bf16, the segmented Triton kernel otherwise).

Layers, in order: launchers live in `gemm.py`, `gathers.py`, `weight_grads.py` and `reductions.py`; here the implementation functions, the
torch.library custom ops (so torch.compile(fullgraph=True) traces through) with their autograd,
and the functional `routed_linear`. Tests: tests/test_kernels_routed_linear.py.
"""
from typing import Optional, Tuple

import torch

from . import checks
from .common import _check_device, acc_dtype, slot_dtype
from .gathers import ln_operand
from .gemm import grouped_gemm, rowdot_tiles
from .reductions import combine, ln_affine_bwd, routing_weight_grad
from .routing import RoutingPlan, make_plan
from .weight_grads import grouped_dw

Tensor = torch.Tensor


def _plan_of(ids: Tensor, n_modules: int, block_m: int, sorted_pick, offsets, tile_module,
             tile_row_start) -> RoutingPlan:
    T, K = ids.shape
    return RoutingPlan(n_tokens=T, top_k=K, n_modules=n_modules, block_m=block_m,
                       sorted_pick=sorted_pick, offsets=offsets,
                       tile_module=tile_module, tile_row_start=tile_row_start)


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0)


def _contig(t):
    return t.contiguous() if t is not None else None


def linear_fwd_impl(x, weight, bias, ids, weights, ln_weight, ln_bias, eps, plan, residual=None, rms=False):
    """Launch the forward. Returns (y [T, N_out], mean [T] or [0], rstd [T] or [0]); y includes the
    residual [T, N_out] when one is given (added by the combine, in fp32). rms: the norm is RMSNorm (mean 0)."""
    _check_device(x)
    T, K = ids.shape
    E, n_in, n_out = weight.shape
    has_ln = ln_weight is not None
    if has_ln:
        # LN_m(x[t]) written in sorted order with the statistics (one launch), or x and a fused LN prologue
        a, a_gather, (mean, rstd), a_ln = ln_operand(x, plan, ln_weight.contiguous(), _contig(ln_bias), eps, rms)
    else:
        mean = x.new_empty(0, dtype=acc_dtype(x.dtype))  # distinct tensors: op outputs may not alias
        rstd = x.new_empty(0, dtype=acc_dtype(x.dtype))
        a, a_gather, a_ln = x, True, None
    g = weights.reshape(-1).contiguous() if weights is not None else None
    if K == 1 and residual is None:  # each token has one pick: store its row directly, SKIP rows stay zero
        y = x.new_zeros(T, n_out)
        grouped_gemm(a, weight, plan, out=y, a_gather=a_gather, bias=bias, ln=a_ln, weights=g, store="token")
    else:
        buf = torch.empty(T * K, n_out, device=x.device, dtype=slot_dtype(x.dtype))  # per-pick slots
        grouped_gemm(a, weight, plan, out=buf, a_gather=a_gather, bias=bias, ln=a_ln, weights=g, store="pick")
        y = x.new_empty(T, n_out)
        combine(buf, ids, E, y, res=residual)
    return y, mean, rstd


def linear_bwd_impl(dy, x, weight, bias, ids, weights, ln_weight, ln_bias, mean, rstd, plan, add_dy=False,
                    rms=False):
    """Launch the backward. Returns (dx, dweight, dbias or None, dweights or None,
    dln_weight or None, dln_bias or None); add_dy: x was also the residual, dx includes dy."""
    T, K = ids.shape
    E, n_in, n_out = weight.shape
    P = T * K
    cdt = acc_dtype(x.dtype)
    dy = dy.to(x.dtype)
    has_ln = ln_weight is not None
    ln = (mean, rstd, ln_weight.contiguous(), _contig(ln_bias)) if has_ln else None
    g = weights.reshape(-1).contiguous() if weights is not None else None
    # dU_p = g_p * dy[t] @ W[m]^T into per-pick slots; the row dots G_p . U_p give dg
    buf = torch.empty(P, n_in, device=x.device, dtype=slot_dtype(x.dtype))
    part = None
    if g is not None:
        part = torch.empty(rowdot_tiles(n_in, x.dtype), P, device=x.device, dtype=cdt)  # SKIP columns unread
    grouped_gemm(dy, weight, plan, out=buf, a_gather=True, w_transposed=True, weights=g, role="linear_dx",
                 rowdot=2 if g is not None else 0, part=part, u=x, u_ln=ln, store="pick")
    dx = x.new_empty(T, n_in)
    dgamma = dbeta = None
    if has_ln:
        combine(buf, ids, E, dx, gamma=ln[2], ln=(mean, rstd), x=x, res=dy if add_dy else None, rms=rms)
        dgamma = torch.empty(E, n_in, device=x.device, dtype=ln_weight.dtype)
        dbeta = torch.empty_like(dgamma) if ln_bias is not None else None
        ln_affine_bwd(buf, x, mean, rstd, plan, dgamma, dbeta)
    else:
        combine(buf, ids, E, dx, res=dy if add_dy else None)
    db = torch.empty(bias.shape, device=x.device, dtype=bias.dtype) if bias is not None else None
    dw, db = grouped_dw(x, dy, plan, db=db, a_gather=True, a_mode=1 if has_ln else 0, ln=ln,
                        dy_gather=True, weights=g)
    dg = routing_weight_grad(part, dy, bias, ids, E, weights.dtype) if g is not None else None
    return dx, dw, db, dg, dgamma, dbeta


# ---------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile, differentiable through register_autograd)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("mom_kernels::routed_linear_fwd", mutates_args=())
def _routed_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor,
                       weights: Optional[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                       eps: float, sorted_pick: Tensor, offsets: Tensor, tile_module: Tensor,
                       tile_row_start: Tensor, block_m: int, residual: Optional[Tensor],
                       res_is_x: bool, rms: bool) -> Tuple[Tensor, Tensor, Tensor]:
    plan = _plan_of(ids, weight.shape[0], block_m, sorted_pick, offsets, tile_module, tile_row_start)
    return linear_fwd_impl(x, weight, bias, ids.contiguous(), weights, ln_weight, ln_bias, eps, plan,
                           x if res_is_x else residual, rms)


@_routed_linear_fwd.register_fake
def _(x, weight, bias, ids, weights, ln_weight, ln_bias, eps, sorted_pick, offsets, tile_module,
      tile_row_start, block_m, residual, res_is_x, rms):
    T = x.shape[0]
    n_stats = T if ln_weight is not None else 0
    cdt = acc_dtype(x.dtype)
    return (x.new_empty(T, weight.shape[2]), x.new_empty(n_stats, dtype=cdt), x.new_empty(n_stats, dtype=cdt))


@torch.library.custom_op("mom_kernels::routed_linear_bwd", mutates_args=())
def _routed_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor,
                       weights: Optional[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                       mean: Tensor, rstd: Tensor, sorted_pick: Tensor, offsets: Tensor,
                       tile_module: Tensor, tile_row_start: Tensor, block_m: int, add_dy: bool, rms: bool
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    plan = _plan_of(ids, weight.shape[0], block_m, sorted_pick, offsets, tile_module, tile_row_start)
    outs = linear_bwd_impl(dy, x, weight, bias, ids.contiguous(), weights, ln_weight, ln_bias, mean,
                           rstd, plan, add_dy, rms)
    return tuple(o if o is not None else _empty(x) for o in outs)


@_routed_linear_bwd.register_fake
def _(dy, x, weight, bias, ids, weights, ln_weight, ln_bias, mean, rstd, sorted_pick, offsets,
      tile_module, tile_row_start, block_m, add_dy, rms):
    e = x.new_empty(0)
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape) if bias is not None else e,
            weights.new_empty(weights.shape) if weights is not None else e,
            ln_weight.new_empty(ln_weight.shape) if ln_weight is not None else e,
            ln_bias.new_empty(ln_bias.shape) if ln_bias is not None else e)


def _linear_setup_context(ctx, inputs, output):
    (x, weight, bias, ids, weights, ln_weight, ln_bias, eps, sorted_pick, offsets, tile_module,
     tile_row_start, block_m, residual, res_is_x, rms) = inputs
    _, mean, rstd = output
    ctx.set_materialize_grads(False)  # mean / rstd get no gradient: no zero-filled tensors for them
    ctx.block_m, ctx.rms = block_m, rms
    ctx.res = (residual is not None, res_is_x)
    ctx.has = (bias is not None, weights is not None, ln_weight is not None, ln_bias is not None)
    ctx.save_for_backward(x, weight, bias, ids, weights, ln_weight, ln_bias, mean, rstd,
                          sorted_pick, offsets, tile_module, tile_row_start)


def _linear_backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return (None,) * 16
    (x, weight, bias, ids, weights, ln_weight, ln_bias, mean, rstd, sorted_pick, offsets, tile_module,
     tile_row_start) = ctx.saved_tensors
    dx, dw, db, dg, dgamma, dbeta = torch.ops.mom_kernels.routed_linear_bwd(
        dy, x, weight, bias, ids, weights, ln_weight, ln_bias, mean, rstd, sorted_pick, offsets,
        tile_module, tile_row_start, ctx.block_m, ctx.res[1], ctx.rms)
    has_b, has_g, has_lw, has_lb = ctx.has
    return (dx, dw, db if has_b else None, None, dg if has_g else None, dgamma if has_lw else None,
            dbeta if has_lb else None, None, None, None, None, None, None,
            dy if ctx.res[0] else None, None, None)  # the residual's gradient is dy itself


_routed_linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# ---------------------------------------------------------------------------------------------
# Functional
# ---------------------------------------------------------------------------------------------

def routed_linear(x, weight, bias, ids, weights=None, ln_weight=None, ln_bias=None, eps=1e-5,
                  plan: Optional[RoutingPlan] = None, residual=None, norm: str = "layer"):
    """Routed linear layer (see the module docstring). x [T, N_in]; weight [E, N_in, N_out];
    bias [E, N_out] or None; ids [T, K] int32/int64 with E = SKIP; weights [T, K] or None;
    ln_weight, ln_bias [E, N_in] or None (a norm on x per module when ln_weight is given: norm "layer", a
    LayerNorm with ln_bias as beta (None: 0), or "rms", an RMSNorm, which takes no ln_bias);
    plan: a `make_plan(ids, E)` to share between calls with the same ids (built here if None).
    Returns [T, N_out] in x's dtype (the autocast dtype under torch.autocast: x and the layer's tensors are
    cast to it; the routing weights keep theirs). Differentiable in x, weight, bias, weights, ln_weight,
    ln_bias. residual [T, N_out] or None: returns residual + y, added in the combine (fp32; no separate add
    launch, and when residual is x itself no separate gradient to add either)."""
    res_is_x = residual is x
    x, weight, bias, ln_weight, ln_bias, residual = checks.autocast_inputs(x, weight, bias, ln_weight, ln_bias,
                                                                           residual)
    checks.check_x(x)
    x, weight, bias, ln_weight, ln_bias, residual = map(checks.int32_safe, (x, weight, bias, ln_weight, ln_bias,
                                                                            residual))
    T, n_in = x.shape
    dev, dt = x.device, x.dtype
    checks.check_tensor("weight", weight, (None, n_in, None), dt, dev)
    E, _, n_out = weight.shape
    if E < 1:
        raise ValueError("weight must hold at least one module (E >= 1)")
    checks.check_tensor("bias", bias, (E, n_out), dt, dev, optional=True)
    checks.check_ids(ids, T, E, dev)
    K = ids.shape[1]
    checks.check_tensor("weights", weights, (T, K), None, dev, optional=True)
    if ln_bias is not None and ln_weight is None:
        raise ValueError("ln_bias is given without ln_weight; pass both (or ln_weight alone)")
    checks.check_norm(norm, ln_bias)
    checks.check_tensor("ln_weight", ln_weight, (E, n_in), dt, dev, optional=True)
    checks.check_tensor("ln_bias", ln_bias, (E, n_in), dt, dev, optional=True)
    checks.check_tensor("residual", residual, (T, n_out), dt, dev, optional=True)
    checks.check_plan(plan, ids, E)
    if plan is None:
        plan = make_plan(ids, E)
    with torch.autocast(x.device.type, enabled=False):  # inputs are already in their compute dtype
        y, _, _ = torch.ops.mom_kernels.routed_linear_fwd(
            x, weight, bias, ids, weights, ln_weight, ln_bias, float(eps), *plan.tensors(), plan.block_m,
            None if res_is_x else residual, res_is_x, norm == "rms")
    return y

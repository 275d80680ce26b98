"""Reductions over picks: the combine of the K per-pick slots, and what finishes a routed op's backward.

    combine:  out[t] = sum over routed k of (gamma[m] *) slot[t*K + k] in fp32 (+ res[t]); with the norm's
              backward fused (the input gradient of a per-module LayerNorm or RMSNorm), exactly 0 for unrouted
              tokens
    ln_affine_bwd: d gamma[m] (and d beta[m]) by a segmented reduction over module m's rows

    dg[t, k] = sum_j part[j, p] + dy[t] . b[m]   for a routed pick p = t*K + k of module m = ids[t, k]
             = 0                                  for SKIP (and out-of-range) picks
    `part` [n_tiles_N, P] holds the dX GEMM's per-N-tile row dots G_p . U_p (grouped_gemm's ROWDOT); the
    bias term is the gradient of g through the bias: d(g * (u W + b)) / dg = dy . (u W) + dy . b.
Replaces a sum, a [T, E] product, a gather, an add, a mask and a cast (8 launches) with one kernel; the sums
run in a fixed order (deterministic). Reference: `routing_weight_grad_reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _cast, _p2, acc_dtype, interpreting, launch_sms, segment_tiles
from .routing import RoutingPlan

__all__ = ["combine", "ln_affine_bwd", "routing_weight_grad", "routing_weight_grad_reference"]


@triton.jit
def _routing_weight_grad_kernel(
    part_ptr, dy_ptr, bias_ptr, ids_ptr, dg_ptr, acc_ptr,
    T, N, N_PART, N_MOD, stride_dt, stride_dn, stride_be, stride_bn,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    t64 = offs_t.to(tl.int64)
    cdt = acc_ptr.dtype.element_ty
    P = T * K
    for k in range(0, K):
        p = t64 * K + k
        m = tl.load(ids_ptr + p, mask=mask_t, other=N_MOD)
        valid = mask_t & (m >= 0) & (m < N_MOD)
        acc = tl.zeros([BLOCK_T], dtype=cdt)
        for j in range(0, N_PART):
            acc += tl.load(part_ptr + j * P + p, mask=valid, other=0.0).to(cdt)
        if HAS_BIAS:
            m64 = tl.where(valid, m, 0).to(tl.int64)
            for n0 in range(0, N, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask = valid[:, None] & (offs_n < N)[None, :]
                d = tl.load(dy_ptr + t64[:, None] * stride_dt + offs_n[None, :] * stride_dn, mask=mask, other=0.0)
                b = tl.load(bias_ptr + m64[:, None] * stride_be + offs_n[None, :] * stride_bn, mask=mask, other=0.0)
                acc += tl.sum(d.to(cdt) * b.to(cdt), axis=1)
        tl.store(dg_ptr + p, tl.where(valid, acc, 0.0).to(dg_ptr.dtype.element_ty), mask=mask_t)


def routing_weight_grad(part, dy, bias, ids, n_modules: int, dtype: torch.dtype):
    """dg [T, K] in `dtype` (see the module docstring). part [n, T*K] (accumulation dtype), dy [T, N],
    bias [E, N] or None, ids [T, K]."""
    T, K = ids.shape
    dg = torch.empty(T, K, device=ids.device, dtype=dtype)
    if T == 0:
        return dg
    interp = interpreting()
    N = dy.shape[1]
    BLOCK_T = 16 if interp else 32
    BLOCK_N = min(_p2(N), 64 if interp else 128)
    acc = torch.empty(1, device=ids.device, dtype=acc_dtype(dy.dtype))
    b = bias if bias is not None else acc.view(1, 1)
    _routing_weight_grad_kernel[(triton.cdiv(T, BLOCK_T),)](
        part, dy, b, ids.contiguous(), dg, acc, T, N, part.shape[0], n_modules,
        dy.stride(0), dy.stride(1), b.stride(0), b.stride(1),
        K=K, HAS_BIAS=bias is not None, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, num_warps=4)
    return dg


def routing_weight_grad_reference(part, dy, bias, ids, n_modules: int, dtype: torch.dtype):
    """The same in plain PyTorch."""
    T, K = ids.shape
    cdt = acc_dtype(dy.dtype)
    dg = part.to(cdt).sum(0).view(T, K)
    if bias is not None:
        dg = dg + (dy.to(cdt) @ bias.to(cdt).t()).gather(1, ids.long().clamp(0, n_modules - 1))
    valid = (ids >= 0) & (ids < n_modules)
    return torch.where(valid, dg, torch.zeros_like(dg)).to(dtype)


@triton.jit
def _combine_kernel(
    buf_ptr, ids_ptr, gamma_ptr, x_ptr, mean_ptr, rstd_ptr, res_ptr, out_ptr, acc_ptr,
    T, N, TOP_K, N_MOD,
    stride_bm, stride_bn, stride_ge, stride_gn, stride_xt, stride_xn, stride_rt, stride_rn, stride_ot, stride_on,
    HAS_GAMMA: tl.constexpr,  # scale pick slot p by gamma[ids[p]]
    LN_BWD: tl.constexpr,  # out = LayerNorm backward of the combined d x_hat (needs BLOCK_N >= N)
    HAS_RES: tl.constexpr,  # out += res[t] (a residual stream, or its gradient in the backward)
    RMS: tl.constexpr,  # with LN_BWD: the norm is RMSNorm (x_hat = x * rstd: no mean term)
    RTNE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[t] = sum over k with 0 <= ids[t,k] < E of (gamma[ids[t,k]] *) buf[t*K + k], summed in fp32
    in k order (deterministic); with LN_BWD the sum is d x_hat and out is dx:
    dx = rstd * (dxh - mean(dxh) - x_hat * mean(dxh * x_hat)) (RMSNorm: without mean(dxh)), exactly 0 for a
    token with no routed pick (whatever its x); with HAS_RES, + res[t]."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_t = offs_t < T
    mask_n = offs_n < N
    mask = mask_t[:, None] & mask_n[None, :]
    cdt = acc_ptr.dtype.element_ty  # fp32 (fp64 for fp64), also for 16-bit slots
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=cdt)
    routed = tl.zeros([BLOCK_T], dtype=tl.int1)
    for k in range(0, TOP_K):
        p = offs_t.to(tl.int64) * TOP_K + k
        mod = tl.load(ids_ptr + p, mask=mask_t, other=N_MOD)
        valid = mask_t & (mod >= 0) & (mod < N_MOD)
        routed = routed | valid
        vmask = valid[:, None] & mask_n[None, :]
        row = tl.load(buf_ptr + p[:, None] * stride_bm + offs_n[None, :] * stride_bn, mask=vmask,
                      other=0.0).to(cdt)
        if HAS_GAMMA:
            ga = tl.load(gamma_ptr + mod.to(tl.int64)[:, None] * stride_ge + offs_n[None, :] * stride_gn,
                         mask=vmask, other=0.0).to(cdt)
            row = row * ga
        acc += tl.where(vmask, row, 0.0)
    if LN_BWD:
        mu = tl.load(mean_ptr + offs_t, mask=mask_t, other=0.0).to(cdt)
        rs = tl.load(rstd_ptr + offs_t, mask=mask_t, other=0.0).to(cdt)
        x = tl.load(x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + offs_n[None, :] * stride_xn,
                    mask=mask, other=0.0).to(cdt)
        xhat = tl.where(mask, (x - mu[:, None]) * rs[:, None], 0.0)
        c2 = tl.sum(acc * xhat, axis=1) / N
        if RMS:
            d = acc - xhat * c2[:, None]
        else:
            c1 = tl.sum(acc, axis=1) / N
            d = acc - c1[:, None] - xhat * c2[:, None]
        acc = tl.where(routed[:, None], rs[:, None] * d, 0.0)
    if HAS_RES:
        acc += tl.load(res_ptr + offs_t.to(tl.int64)[:, None] * stride_rt + offs_n[None, :] * stride_rn,
                       mask=mask, other=0.0).to(cdt)
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * stride_ot + offs_n[None, :] * stride_on,
             _cast(acc, out_ptr.dtype.element_ty, RTNE), mask=mask)


@triton.jit
def _ln_affine_bwd_kernel(
    dxh_ptr, x_ptr, mean_ptr, rstd_ptr, dgamma_ptr, dbeta_ptr, sorted_pick_ptr, offsets_ptr,
    D, TOP_K,
    stride_bm, stride_bn, stride_xt, stride_xd, stride_ge, stride_gd,
    HAS_BETA: tl.constexpr, RTNE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """d gamma[m] = sum over module m's rows of dU_p * x_hat[t], d beta[m] = sum dU_p (HAS_BETA; dU_p in pick
    slot p of dxh, the gradient of pick p's norm output): a segmented reduction, no atomics."""
    m = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(offsets_ptr + m)
    end = tl.load(offsets_ptr + m + 1)
    cdt = mean_ptr.dtype.element_ty  # fp32 (fp64 for fp64), whatever the slots' dtype
    accg = tl.zeros([BLOCK_D], dtype=cdt)
    accb = tl.zeros([BLOCK_D], dtype=cdt)
    n_iter = tl.cdiv(end - start, BLOCK_R)
    for i in range(0, n_iter):
        offs_s = start + i * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_s < end
        mask = mask_r[:, None] & mask_d[None, :]
        pick = tl.load(sorted_pick_ptr + offs_s, mask=mask_r, other=0)
        tok = pick // TOP_K
        du = tl.load(dxh_ptr + pick.to(tl.int64)[:, None] * stride_bm + offs_d[None, :] * stride_bn,
                     mask=mask, other=0.0).to(cdt)
        x = tl.load(x_ptr + tok.to(tl.int64)[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                    mask=mask, other=0.0).to(cdt)
        mu = tl.load(mean_ptr + tok, mask=mask_r, other=0.0).to(cdt)
        rs = tl.load(rstd_ptr + tok, mask=mask_r, other=0.0).to(cdt)
        xhat = tl.where(mask, (x - mu[:, None]) * rs[:, None], 0.0)
        accg += tl.sum(du * xhat, axis=0)
        if HAS_BETA:
            accb += tl.sum(du, axis=0)
    tl.store(dgamma_ptr + m.to(tl.int64) * stride_ge + offs_d * stride_gd,
             _cast(accg, dgamma_ptr.dtype.element_ty, RTNE), mask=mask_d)
    if HAS_BETA:
        tl.store(dbeta_ptr + m.to(tl.int64) * stride_ge + offs_d * stride_gd,
                 _cast(accb, dbeta_ptr.dtype.element_ty, RTNE), mask=mask_d)


def combine(buf, ids, n_modules: int, out, *, gamma=None, ln=None, x=None, res=None, rms: bool = False):
    """out[t] = sum_k valid (gamma[m] *) buf[t*K + k] in fp32 (deterministic, no atomics).
    With ln = (mean, rstd) and x, out is the norm's input gradient of that sum (needs gamma; rms: RMSNorm).
    With res [T, N], out[t] += res[t] (the residual stream forward, its gradient backward)."""
    T, K = ids.shape
    N = buf.shape[1]
    if T == 0:
        return out
    interp = interpreting()
    if ln is not None:
        BLOCK_N = _p2(N)  # the whole row: the LayerNorm backward reduces over it
        BLOCK_T = 1 if not interp else 4
    else:
        BLOCK_N = min(_p2(N), 256 if not interp else 64)
        BLOCK_T = 8 if not interp else 16
    dummy = torch.empty(1, device=buf.device, dtype=acc_dtype(out.dtype))  # also names the accumulation dtype
    g_t = gamma if gamma is not None else dummy.view(1, 1)
    x_t = x if x is not None else dummy.view(1, 1)
    mean, rstd = ln if ln is not None else (dummy, dummy)
    r_t = res if res is not None else dummy.view(1, 1)
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(N, BLOCK_N))
    _combine_kernel[grid](
        buf, ids, g_t, x_t, mean, rstd, r_t, out, dummy, T, N, K, n_modules,
        buf.stride(0), buf.stride(1), g_t.stride(0), g_t.stride(1), x_t.stride(0), x_t.stride(1),
        r_t.stride(0), r_t.stride(1), out.stride(0), out.stride(1),
        HAS_GAMMA=gamma is not None, LN_BWD=ln is not None, HAS_RES=res is not None, RMS=rms, RTNE=interp,
        BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, num_warps=4 if BLOCK_N <= 2048 else 8)
    return out


def ln_affine_bwd(dxh, x, mean, rstd, plan: RoutingPlan, dgamma, dbeta, tiles=None):
    """d gamma [E, D], d beta [E, D] (None: a norm without beta, none written) of the per-module norms from the
    per-pick gradients dxh [P, D] of the norm outputs (segmented reduction over each module's rows). tiles:
    (BLOCK_R, BLOCK_D), default common.segment_tiles for this device."""
    E, D = dgamma.shape
    interp = interpreting()
    BLOCK_R, BLOCK_D = tiles or segment_tiles(E, D, launch_sms(dxh), 32)
    _ln_affine_bwd_kernel[(E, triton.cdiv(D, BLOCK_D))](
        dxh, x, mean, rstd, dgamma, dbeta if dbeta is not None else dgamma, plan.sorted_pick, plan.offsets, D,
        plan.top_k, dxh.stride(0), dxh.stride(1), x.stride(0), x.stride(1), dgamma.stride(0), dgamma.stride(1),
        HAS_BETA=dbeta is not None, RTNE=interp, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=4)
    return dgamma, dbeta

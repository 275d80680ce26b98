"""Per-module LayerNorm of the routed rows, written in module-sorted order, with the token statistics computed
on the way: one launch where a statistics pass and a gather were two.

    for each sorted row s < S (pick p = sorted_pick[s], token t = p // K, module m of row s):
        mean[t], rstd[t] = statistics of x[t]                (fp32; fp64 for fp64 x)
        out[s]           = (x[t] - mean[t]) * rstd[t] * gamma[m] + beta[m]

The statistics take one pass over the row with a shift (x - x[t, 0], so a large mean does not cancel the
variance away) and a second pass writes the row. A token picked K times gets the same statistics written K
times (identical values: deterministic); a token with no routed pick gets none (nothing reads them: the
combine masks unrouted tokens). Reference: `ln_gather_reference`. Tests: the routed ops' tests (the default
LayerNorm path) and tests/test_kernels_gathers.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grouped_gemm import _cast, _p2, acc_dtype, interpreting
from .routing import RoutingPlan

__all__ = ["ln_gather", "ln_gather_reference"]


@triton.jit
def _ln_gather_kernel(
    x_ptr, out_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, sorted_pick_ptr, offsets_ptr,
    N, TOP_K, N_MOD, eps, stride_xt, stride_xn, stride_om, stride_on, stride_ge, stride_gn,
    RTNE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    S = tl.load(offsets_ptr + N_MOD)
    if pid * BLOCK_R < S:
        offs_s = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_s < S
        pick = tl.load(sorted_pick_ptr + offs_s, mask=mask_r, other=0)
        tok = pick // TOP_K
        rows = tok.to(tl.int64) * stride_xt
        mod = tl.zeros([BLOCK_R], dtype=tl.int32)  # module of row s: how many modules start at or before s
        for e in range(1, N_MOD):
            mod += (offs_s >= tl.load(offsets_ptr + e)).to(tl.int32)
        mod64 = mod.to(tl.int64) * stride_ge
        cdt = mean_ptr.dtype.element_ty
        shift = tl.load(x_ptr + rows, mask=mask_r, other=0.0).to(cdt)
        s1 = tl.zeros([BLOCK_R], dtype=cdt)
        s2 = tl.zeros([BLOCK_R], dtype=cdt)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask = mask_r[:, None] & (offs_n < N)[None, :]
            v = tl.load(x_ptr + rows[:, None] + offs_n[None, :] * stride_xn, mask=mask, other=0.0).to(cdt)
            v = tl.where(mask, v - shift[:, None], 0.0)
            s1 += tl.sum(v, axis=1)
            s2 += tl.sum(v * v, axis=1)
        m1 = s1 / N
        mean = shift + m1
        rstd = 1.0 / tl.sqrt(tl.maximum(s2 / N - m1 * m1, 0.0) + eps)
        tl.store(mean_ptr + tok, mean, mask=mask_r)
        tl.store(rstd_ptr + tok, rstd, mask=mask_r)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask = mask_r[:, None] & (offs_n < N)[None, :]
            v = tl.load(x_ptr + rows[:, None] + offs_n[None, :] * stride_xn, mask=mask, other=0.0).to(cdt)
            ga = tl.load(gamma_ptr + mod64[:, None] + offs_n[None, :] * stride_gn, mask=mask, other=0.0).to(cdt)
            be = tl.load(beta_ptr + mod64[:, None] + offs_n[None, :] * stride_gn, mask=mask, other=0.0).to(cdt)
            u = (v - mean[:, None]) * rstd[:, None] * ga + be
            tl.store(out_ptr + offs_s.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on,
                     _cast(u, out_ptr.dtype.element_ty, RTNE), mask=mask)


def ln_gather(x, plan: RoutingPlan, gamma, beta, eps: float):
    """(out [P, N] rows s < S written, mean [T], rstd [T]) for x [T, N], gamma / beta [E, N] (see the module
    docstring)."""
    T, N = x.shape
    P = plan.n_tokens * plan.top_k
    cdt = acc_dtype(x.dtype)
    out = torch.empty(P, N, device=x.device, dtype=x.dtype)
    mean = torch.empty(T, device=x.device, dtype=cdt)
    rstd = torch.empty(T, device=x.device, dtype=cdt)
    if P == 0:
        return out, mean, rstd
    interp = interpreting()
    BLOCK_R = 16 if interp else 8
    BLOCK_N = min(_p2(N), 64 if interp else 512)
    _ln_gather_kernel[(triton.cdiv(P, BLOCK_R),)](
        x, out, mean, rstd, gamma, beta, plan.sorted_pick, plan.offsets, N, plan.top_k, plan.n_modules,
        float(eps), x.stride(0), x.stride(1), out.stride(0), out.stride(1), gamma.stride(0), gamma.stride(1),
        RTNE=interp, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, num_warps=4)
    return out, mean, rstd


def ln_gather_reference(x, plan: RoutingPlan, gamma, beta, eps: float):
    """The same in plain PyTorch: (rows [S, N] in sorted order, mean [T], rstd [T])."""
    cdt = acc_dtype(x.dtype)
    S = int(plan.offsets[-1])
    pick = plan.sorted_pick[:S].long()
    tok = pick // plan.top_k
    mod = torch.repeat_interleave(torch.arange(plan.n_modules, device=x.device), plan.counts.long())
    xc = x.to(cdt)
    mean = xc.mean(1)
    rstd = torch.rsqrt(xc.var(1, unbiased=False) + eps)
    u = (xc[tok] - mean[tok, None]) * rstd[tok, None] * gamma[mod].to(cdt) + beta[mod].to(cdt)
    return u.to(x.dtype), mean, rstd

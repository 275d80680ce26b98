"""Rows written in module-sorted order: the operands of the grouped GEMMs, and the forward's LayerNorm.

`ln_gather`: the per-module LayerNorm (or RMSNorm) of the routed rows, written in module-sorted order, with
the token statistics computed on the way (one launch where a statistics pass and a gather were two):

    for each sorted row s < S (pick p = sorted_pick[s], token t = p // K, module m of row s):
        mean[t], rstd[t] = statistics of x[t]                (fp32; fp64 for fp64 x)
        out[s]           = (x[t] - mean[t]) * rstd[t] * gamma[m] + beta[m]
    RMSNorm (RMS): mean[t] = 0, rstd[t] = 1 / sqrt(mean(x[t]^2) + eps), no beta

The statistics take one pass over the row with a shift (x - x[t, 0], so a large mean does not cancel the
variance away; RMSNorm: no shift) and a second pass writes the row. A token picked K times gets the same statistics written K
times (identical values: deterministic); a token with no routed pick gets none (nothing reads them: the
combine masks unrouted tokens). Reference: `ln_gather_reference`. Tests: the routed ops' tests (the default
LayerNorm path) and tests/test_kernels_gathers.py.

`gather_rows`: (g_p *) f(a[token or s]) in sorted order, f = identity, the norm, GELU or SwiGLU (operands of
torch._grouped_mm). `ln_stats`: per-token statistics alone (the fused-prologue path, MOM_KERNELS_LN=fused).
`ln_operand` picks the forward's LayerNorm path (`ln_prologue`).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import (_cast, _check_device, _gelu, _p2, _row_module, _sigmoid, _swiglu_of, acc_dtype, has_beta,
                     interpreting, ln_pointers)
from .routing import RoutingPlan

__all__ = ["ln_gather", "ln_gather_reference", "gather_rows", "ln_stats", "ln_operand", "ln_prologue"]


@triton.jit
def _ln_gather_kernel(
    x_ptr, out_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, sorted_pick_ptr, offsets_ptr,
    N, TOP_K, N_MOD, eps, stride_xt, stride_xn, stride_om, stride_on, stride_ge, stride_gn,
    RMS: tl.constexpr, HAS_BETA: tl.constexpr, RTNE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    S = tl.load(offsets_ptr + N_MOD)
    if pid * BLOCK_R < S:
        offs_s = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_s < S
        pick = tl.load(sorted_pick_ptr + offs_s, mask=mask_r, other=0)
        tok = pick // TOP_K
        rows = tok.to(tl.int64) * stride_xt
        mod64 = _row_module(offs_s, offsets_ptr, N_MOD, BLOCK_R).to(tl.int64) * stride_ge
        cdt = mean_ptr.dtype.element_ty
        if RMS:
            shift = tl.zeros([BLOCK_R], dtype=cdt)
        else:
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
        if RMS:  # mean(x^2), no centring
            mean = shift
            rstd = 1.0 / tl.sqrt(s2 / N + eps)
        else:
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
            u = (v - mean[:, None]) * rstd[:, None] * ga
            if HAS_BETA:
                be = tl.load(beta_ptr + mod64[:, None] + offs_n[None, :] * stride_gn, mask=mask, other=0.0).to(cdt)
                u = u + be
            tl.store(out_ptr + offs_s.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on,
                     _cast(u, out_ptr.dtype.element_ty, RTNE), mask=mask)


def ln_gather(x, plan: RoutingPlan, gamma, beta, eps: float, rms: bool = False):
    """(out [P, N] rows s < S written, mean [T], rstd [T]) for x [T, N], gamma [E, N], beta [E, N] or None (see
    the module docstring; rms: RMSNorm, mean 0)."""
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
        x, out, mean, rstd, gamma, beta if beta is not None else gamma, plan.sorted_pick, plan.offsets, N,
        plan.top_k, plan.n_modules, float(eps), x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        gamma.stride(0), gamma.stride(1), RMS=rms, HAS_BETA=beta is not None, RTNE=interp, BLOCK_R=BLOCK_R,
        BLOCK_N=BLOCK_N, num_warps=4)
    return out, mean, rstd


def ln_gather_reference(x, plan: RoutingPlan, gamma, beta, eps: float, rms: bool = False):
    """The same in plain PyTorch: (rows [S, N] in sorted order, mean [T], rstd [T])."""
    cdt = acc_dtype(x.dtype)
    S = int(plan.offsets[-1])
    pick = plan.sorted_pick[:S].long()
    tok = pick // plan.top_k
    mod = torch.repeat_interleave(torch.arange(plan.n_modules, device=x.device), plan.counts.long())
    xc = x.to(cdt)
    if rms:
        mean = torch.zeros_like(xc[:, 0])
        rstd = torch.rsqrt(xc.pow(2).mean(1) + eps)
    else:
        mean = xc.mean(1)
        rstd = torch.rsqrt(xc.var(1, unbiased=False) + eps)
    u = (xc[tok] - mean[tok, None]) * rstd[tok, None] * gamma[mod].to(cdt)
    if beta is not None:
        u = u + beta[mod].to(cdt)
    return u.to(x.dtype), mean, rstd


@triton.jit
def _ln_stats_kernel(
    x_ptr, mean_ptr, rstd_ptr,  # x [T, D]; mean, rstd [T]
    T, D, stride_xt, stride_xd, eps,
    RMS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Mean and 1/std of each token row (two passes over D, fp32 or fp64 as mean_ptr); RMS: mean 0 and
    1 / sqrt(mean(x^2) + eps) (one pass)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    rows = offs_t.to(tl.int64) * stride_xt
    cdt = mean_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_T], dtype=cdt)
    if not RMS:
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = mask_t[:, None] & (offs_d < D)[None, :]
            x = tl.load(x_ptr + rows[:, None] + offs_d[None, :] * stride_xd, mask=mask, other=0.0)
            acc += tl.sum(x.to(cdt), axis=1)
    mean = acc / D
    acc = tl.zeros([BLOCK_T], dtype=cdt)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_t[:, None] & (offs_d < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] + offs_d[None, :] * stride_xd, mask=mask, other=0.0)
        xc = tl.where(mask, x.to(cdt) - mean[:, None], 0.0)
        acc += tl.sum(xc * xc, axis=1)
    rstd = 1.0 / tl.sqrt(acc / D + eps)
    tl.store(mean_ptr + offs_t, mean, mask=mask_t)
    tl.store(rstd_ptr + offs_t, rstd, mask=mask_t)


@triton.jit
def _gather_rows_kernel(
    a_ptr, out_ptr, g_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, sorted_pick_ptr, offsets_ptr,
    N, TOP_K, N_MOD, stride_am, stride_an, stride_om, stride_on, stride_ge, stride_gn,
    GATHER: tl.constexpr, A_MODE: tl.constexpr, WEIGHTED: tl.constexpr, HAS_BETA: tl.constexpr, RTNE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[s] = (g_p *) f(a[row(s)]) for the sorted rows s < S (rows s >= S are left as they are):
    row(s) = token (GATHER) or s; f = identity (A_MODE 0), the norm with module m(s)'s gain (and beta: HAS_BETA)
    (1), GELU (2), SwiGLU of a = [gate | up] [.., 2N] (3). The operands of a weight-gradient GEMM in
    module-sorted order, for torch._grouped_mm."""
    pid_r = tl.program_id(0)
    S = tl.load(offsets_ptr + N_MOD)
    if pid_r * BLOCK_R < S:
        offs_s = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_s < S
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = mask_r[:, None] & (offs_n < N)[None, :]
        pick = tl.load(sorted_pick_ptr + offs_s, mask=mask_r, other=0)
        tok = pick // TOP_K
        if GATHER:
            rows = tok.to(tl.int64)
        else:
            rows = offs_s.to(tl.int64)
        cdt = mean_ptr.dtype.element_ty
        v = tl.load(a_ptr + rows[:, None] * stride_am + offs_n[None, :] * stride_an, mask=mask, other=0.0).to(cdt)
        if A_MODE == 1:
            mod64 = _row_module(offs_s, offsets_ptr, N_MOD, BLOCK_R).to(tl.int64)
            mu = tl.load(mean_ptr + tok, mask=mask_r, other=0.0)
            rs = tl.load(rstd_ptr + tok, mask=mask_r, other=0.0)
            ga = tl.load(gamma_ptr + mod64[:, None] * stride_ge + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
            v = (v - mu[:, None]) * rs[:, None] * ga.to(cdt)
            if HAS_BETA:
                be = tl.load(beta_ptr + mod64[:, None] * stride_ge + offs_n[None, :] * stride_gn, mask=mask,
                             other=0.0)
                v = v + be.to(cdt)
        elif A_MODE == 2:
            v = _gelu(v)
        elif A_MODE == 3:  # v is the gate; the up half N columns on
            up = tl.load(a_ptr + rows[:, None] * stride_am + (N + offs_n)[None, :] * stride_an, mask=mask,
                         other=0.0).to(cdt)
            v = _swiglu_of(v, up, _sigmoid(v))
        if WEIGHTED:
            g = tl.load(g_ptr + pick, mask=mask_r, other=0.0).to(cdt)
            v = _cast(v, out_ptr.dtype.element_ty, RTNE).to(cdt) * g[:, None]
        tl.store(out_ptr + offs_s.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on,
                 _cast(v, out_ptr.dtype.element_ty, RTNE), mask=mask)


def ln_stats(x: torch.Tensor, eps: float, rms: bool = False):
    """Per-token norm statistics of x [T, D]: mean [T], rstd [T] (fp32; fp64 for fp64; rms: mean 0)."""
    _check_device(x)
    T, D = x.shape
    cdt = acc_dtype(x.dtype)
    mean = torch.empty(T, device=x.device, dtype=cdt)
    rstd = torch.empty(T, device=x.device, dtype=cdt)
    if T == 0:
        return mean, rstd
    BLOCK_T = 4 if not interpreting() else 16
    BLOCK_D = min(_p2(D), 1024 if not interpreting() else 64)
    _ln_stats_kernel[(triton.cdiv(T, BLOCK_T),)](
        x, mean, rstd, T, D, x.stride(0), x.stride(1), float(eps),
        RMS=rms, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=4)
    return mean, rstd


def ln_prologue() -> str:
    """Where a routed forward applies the per-module LayerNorm: "gather" (default: `gather_rows` writes
    LN_m(x[t]) in module-sorted order, a transient [P, N_in] buffer, and a plain grouped GEMM reads it; on the
    H200 the LayerNorm in the GEMM's prologue halved its rate, 280 against 540 TFLOP/s) or "fused" (in the
    GEMM's prologue, no buffer). MOM_KERNELS_LN=gather / fused chooses."""
    choice = os.environ.get("MOM_KERNELS_LN", "gather").strip() or "gather"
    if choice not in ("gather", "fused"):
        raise ValueError(f"MOM_KERNELS_LN must be 'gather' or 'fused', got {choice!r}")
    return choice


def ln_operand(x, plan: RoutingPlan, gamma, beta, eps: float, rms: bool = False):
    """The A operand of a forward grouped GEMM over x [T, N_in] with the per-module norm (gamma [E, N_in],
    beta [E, N_in] or None; rms: RMSNorm), per `ln_prologue`: (a, a_gather, (mean, rstd) [T], ln for the GEMM's
    prologue or None). "gather": `gathers.ln_gather` writes LN_m(x[t]) in sorted order and the statistics in one
    launch; "fused": `ln_stats`, then x gathered on load and the norm in the GEMM's prologue."""
    if ln_prologue() == "fused":
        mean, rstd = ln_stats(x, eps, rms)
        return x, True, (mean, rstd), (mean, rstd, gamma, beta)
    a, mean, rstd = ln_gather(x, plan, gamma, beta, eps, rms)
    return a, False, (mean, rstd), None


def gather_rows(a, plan: RoutingPlan, *, gather: bool, mode: int = 0, ln=None, weights=None):
    """[P, N] in module-sorted order: row s = (g_p *) f(a[token or s]) for s < S (`_gather_rows_kernel`; rows
    s >= S are not written). mode 0: a; 1: the norm with ln = (mean, rstd, gamma [E, N], beta [E, N] or None);
    2: GELU; 3: SwiGLU of a [.., 2N] = gate | up (N = half of a's width)."""
    P, N = plan.n_tokens * plan.top_k, a.shape[1] // (2 if mode == 3 else 1)
    out = torch.empty(P, N, device=a.device, dtype=a.dtype)
    interp = interpreting()
    BLOCK_R = 16 if interp else 32
    BLOCK_N = min(_p2(N), 64 if interp else 256)
    cdt = acc_dtype(a.dtype)
    dummy = torch.empty(1, device=a.device, dtype=cdt)
    mean, rstd, gamma, beta = ln_pointers(ln, dummy)
    _gather_rows_kernel[(triton.cdiv(P, BLOCK_R), triton.cdiv(N, BLOCK_N))](
        a, out, weights if weights is not None else dummy, mean, rstd, gamma, beta,
        plan.sorted_pick, plan.offsets, N, plan.top_k, plan.n_modules,
        a.stride(0), a.stride(1), out.stride(0), out.stride(1), gamma.stride(0), gamma.stride(1),
        GATHER=gather, A_MODE=mode, WEIGHTED=weights is not None, HAS_BETA=has_beta(ln), RTNE=interp,
        BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, num_warps=4)
    return out

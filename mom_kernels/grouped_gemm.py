"""Gathered grouped GEMMs over the picked modules, forward and backward, and their launchers.

Index legend: T tokens, K picks, E modules, P = T*K picks, p = t*K + k, s a module-sorted
position (see `routing.py`), m = module of row s, N_in / N_out the GEMM's reduction / output dims.

One grouped GEMM kernel, specialised by constexpr flags, does every row-parallel product:

    out[row_out(s)] = epilogue( prologue(A[row_a(s)]) @ W[m] )      for every sorted row s < S

    row_a(s)   = token t (gather on load, A_GATHER) or s (A already in sorted order)
    prologue   = LayerNorm with module m's affine, statistics once per token (A_LN):
                 (a - mean[t]) * rstd[t] * gamma[m] + beta[m]
    epilogue   = + bias[m]; GELU (tanh) storing the pre-activation for backward; * g[p];
                 * gelu'(pre) (backward); a partial row dot product with a recomputed
                 U row (the gradient of the routing weight g)
    row_out(s) = s (grouped store), p (per-pick slot, for the deterministic combine) or t (K == 1)

Backward uses the same kernel with W[m] transposed (strides swapped, no copy) for dX; dW[m] = U_m^T dY_m
by `grouped_dw`, on one of two paths (`dw_backend`): torch._grouped_mm over U and dY written in module-sorted
order by `_gather_rows_kernel` (CUDA bf16: 620 TFLOP/s on an H200), or `_grouped_dw_kernel`, a segmented
reduction over each module's contiguous sorted rows (one program per output tile); db[m] = sum dY_m by
`_segment_sum_kernel`. All without atomics, deterministic. A per-token combine kernel sums the K pick slots
in fp32 (fused with the LayerNorm backward), and a segmented reduction gives d gamma[m], d beta[m].
LayerNorm statistics come from `_ln_stats_kernel`. The forward's per-module LayerNorm runs in
`_gather_rows_kernel` too (LN_m(x[t]) in sorted order, then a plain GEMM) unless MOM_KERNELS_LN=fused
(`ln_prologue`): on the H200 the fused prologue halved the GEMM's rate.

Measured on an H200 (benchmarks/results/h200_2026-11-28/): 540 TFLOP/s for the plain grouped GEMM at
16384 x 1280 x 5120 (dense cuBLAS 720), 280 with the fused LayerNorm prologue; the Triton dW kernel 140
(430 without the in-loop db sum that it used to carry), torch._grouped_mm 620.

Launchers (plain functions: check, allocate, grid, launch) sit outside autograd so tests and
benchmarks can call them; `routed_linear.py` and `routed_ffn.py` wire them into autograd.
fp32 accumulation for fp16 / bf16 / fp32 (fp64 inputs accumulate in fp64); fp32 dots use IEEE
precision (no TF32). Under TRITON_INTERPRET=1 bf16 / fp16 dot operands are upcast to fp32
(the interpreter's bf16 dot returns garbage) and tiles are small.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .routing import RoutingPlan

# GPT-2's tanh GELU: gelu(u) = 0.5 u (1 + tanh(c (u + a u^3))), c = sqrt(2 / pi) = 0.7978845608028654,
# a = 0.044715 (literals in the jit functions: module-level floats are not visible to a compiled
# kernel, and a tl.constexpr global times a tensor breaks the interpreter).


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _tanh(z):
    # tanh(z) = 2 * sigmoid(2z) - 1, stable at both ends (exp overflow gives -1 or 1)
    return 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0


@triton.jit
def _gelu(u):
    return 0.5 * u * (1.0 + _tanh(0.7978845608028654 * (u + 0.044715 * u * u * u)))


@triton.jit
def _gelu_grad(u):
    th = _tanh(0.7978845608028654 * (u + 0.044715 * u * u * u))
    return 0.5 * (1.0 + th) + 0.5 * u * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * u * u)


@triton.jit
def _cast(x, dtype: tl.constexpr, RTNE: tl.constexpr):
    """x.to(dtype); with RTNE (set under the interpreter, whose fp32 -> bf16 cast truncates instead
    of rounding to nearest even as the GPU does) bf16 is rounded to nearest even by hand first."""
    if RTNE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc += a @ b with fp32 operands under the interpreter (UPCAST: its bf16 dot is garbage) and IEEE
    precision for fp32 / fp64 inputs (no TF32); out_dtype given, which triton 3.6 needs for fp64."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    return tl.dot(a, b, acc, out_dtype=acc.dtype)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _ln_stats_kernel(
    x_ptr, mean_ptr, rstd_ptr,  # x [T, D]; mean, rstd [T]
    T, D, stride_xt, stride_xd, eps,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Mean and 1/std of each token row (two passes over D, fp32 or fp64 as mean_ptr)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    rows = offs_t.to(tl.int64) * stride_xt
    cdt = mean_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_T], dtype=cdt)
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
def _epilogue(acc, m_idx, offs_s64, pick, tok, mask_m, offs_n, mask_n, pid_n,
              bias_ptr, out_ptr, pre_ptr, g_ptr, part_ptr, u_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
              N_PICKS, stride_be, stride_bn, stride_om, stride_on, stride_pm, stride_pn, stride_um, stride_uk,
              stride_ge, stride_gk,
              HAS_BIAS: tl.constexpr, EPI_GELU: tl.constexpr, SAVE_PRE: tl.constexpr, GELU_BWD: tl.constexpr,
              WEIGHTED: tl.constexpr, ROWDOT: tl.constexpr, U_LN: tl.constexpr, STORE_MODE: tl.constexpr,
              RTNE: tl.constexpr):
    """What happens to a [BM, BN] tile of products acc (rows: sorted positions offs_s64, their picks and
    tokens) before it is stored; m_idx is the module (a scalar for a GEMM tile, [BM, 1] for row blocks that
    span modules): + bias[m]; GELU storing the pre-activation; the row dot of the routing weight's gradient
    (part[pid_n, p]); * gelu'(pre); * g[p]; store to row s, p or t."""
    cdt = mean_ptr.dtype.element_ty
    tok64 = tok.to(tl.int64)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + m_idx * stride_be + offs_n[None, :] * stride_bn, mask=mask_n[None, :], other=0.0)
        acc += bias.to(cdt)
    if EPI_GELU:
        if SAVE_PRE:
            tl.store(pre_ptr + offs_s64[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                     _cast(acc, pre_ptr.dtype.element_ty, RTNE), mask=mask_mn)
        acc = _gelu(acc)
    if ROWDOT == 1 or GELU_BWD:
        pre = tl.load(pre_ptr + offs_s64[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                      mask=mask_mn, other=0.0).to(cdt)
    if ROWDOT != 0:
        if ROWDOT == 1:
            uu = _gelu(pre)
        else:
            uu = tl.load(u_ptr + tok64[:, None] * stride_um + offs_n[None, :] * stride_uk,
                         mask=mask_mn, other=0.0).to(cdt)
            if U_LN:
                mu2 = tl.load(mean_ptr + tok, mask=mask_m, other=0.0)
                rs2 = tl.load(rstd_ptr + tok, mask=mask_m, other=0.0)
                ga2 = tl.load(gamma_ptr + m_idx * stride_ge + offs_n[None, :] * stride_gk, mask=mask_n[None, :],
                              other=0.0).to(cdt)
                be2 = tl.load(beta_ptr + m_idx * stride_ge + offs_n[None, :] * stride_gk, mask=mask_n[None, :],
                              other=0.0).to(cdt)
                uu = (uu - mu2[:, None]) * rs2[:, None] * ga2 + be2
        part = tl.sum(tl.where(mask_mn, acc * uu, 0.0), axis=1)  # [BM]
        tl.store(part_ptr + pid_n.to(tl.int64) * N_PICKS + pick, part, mask=mask_m)
    if GELU_BWD:
        acc = acc * _gelu_grad(pre)
    if WEIGHTED:
        g = tl.load(g_ptr + pick, mask=mask_m, other=0.0).to(cdt)
        acc = acc * g[:, None]
    if STORE_MODE == 0:
        o_rows = offs_s64
    elif STORE_MODE == 1:
        o_rows = pick.to(tl.int64)
    else:
        o_rows = tok64
    tl.store(out_ptr + o_rows[:, None] * stride_om + offs_n[None, :] * stride_on,
             _cast(acc, out_ptr.dtype.element_ty, RTNE), mask=mask_mn)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, bias_ptr, out_ptr, pre_ptr, g_ptr, part_ptr,
    u_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
    sorted_pick_ptr, offsets_ptr, tile_module_ptr, tile_row_start_ptr,
    N_IN, N_OUT, TOP_K, N_MOD, N_PICKS, N_TILES,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_be, stride_bn,
    stride_om, stride_on, stride_pm, stride_pn, stride_um, stride_uk, stride_ge, stride_gk,
    A_GATHER: tl.constexpr,  # A row = token (gather on load), else the sorted position
    A_LN: tl.constexpr,  # LayerNorm prologue on A (needs A_GATHER)
    HAS_BIAS: tl.constexpr,
    EPI_GELU: tl.constexpr,  # out = gelu(acc + bias)
    SAVE_PRE: tl.constexpr,  # with EPI_GELU: store acc + bias to pre (sorted rows)
    GELU_BWD: tl.constexpr,  # out = acc * gelu'(pre) (pre: sorted rows)
    WEIGHTED: tl.constexpr,  # out *= g[p]
    ROWDOT: tl.constexpr,  # 0: none, 1: part[n_tile, p] = sum(acc * gelu(pre)), 2: ... * U[t] (LN opt.)
    U_LN: tl.constexpr,  # with ROWDOT 2: U = LayerNorm_m(u[t]), else u[t]
    STORE_MODE: tl.constexpr,  # 0: row s, 1: row p, 2: row t
    UPCAST: tl.constexpr,  # interpreter: dot in fp32
    IEEE: tl.constexpr,  # fp32 / fp64 inputs: exact dot (no TF32)
    RTNE: tl.constexpr,  # interpreter: round bf16 stores to nearest even (see _cast)
    EVEN_K: tl.constexpr,  # N_IN % BLOCK_K == 0: no masks along the reduction
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # one program per (row tile, N tile) of the schedule, or (persistent grid, fewer programs than tiles)
    # each program walks tiles pid, pid + num_programs, ...: same results, the grid size is the launcher's choice
    num_n = tl.cdiv(N_OUT, BLOCK_N)
    for t in tl.range(tl.program_id(0), N_TILES * num_n, tl.num_programs(0)):
        tile = t // num_n
        pid_n = t % num_n
        m = tl.load(tile_module_ptr + tile)
        if m < N_MOD:  # spare tiles (the grid is an upper bound) do nothing
            row_start = tl.load(tile_row_start_ptr + tile)
            row_end = tl.load(offsets_ptr + m + 1)
            offs_s = row_start + tl.arange(0, BLOCK_M)  # [BM] sorted positions
            mask_m = offs_s < row_end
            pick = tl.load(sorted_pick_ptr + offs_s, mask=mask_m, other=0)  # [BM] p = t*K + k
            tok = pick // TOP_K  # [BM]
            offs_s64 = offs_s.to(tl.int64)
            tok64 = tok.to(tl.int64)
            if A_GATHER:
                a_rows = tok64
            else:
                a_rows = offs_s64
            m64 = m.to(tl.int64)
            cdt = mean_ptr.dtype.element_ty  # compute / accumulate dtype (fp32, or fp64 for fp64)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N_OUT
            offs_k = tl.arange(0, BLOCK_K)
            if A_LN:
                mu = tl.load(mean_ptr + tok, mask=mask_m, other=0.0)
                rs = tl.load(rstd_ptr + tok, mask=mask_m, other=0.0)
            a_base = a_ptr + a_rows[:, None] * stride_am  # [BM, 1]
            w_base = w_ptr + m64 * stride_we
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=cdt)
            for k0 in range(0, N_IN, BLOCK_K):
                kk = k0 + offs_k
                if EVEN_K:  # N_IN % BLOCK_K == 0: only the rows are masked
                    mask_k = tl.full([BLOCK_K], 1, tl.int1)
                else:
                    mask_k = kk < N_IN
                a = tl.load(a_base + kk[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :],
                            other=0.0)  # [BM, BK]
                if A_LN:
                    ga = tl.load(gamma_ptr + m64 * stride_ge + kk * stride_gk, mask=mask_k, other=0.0)
                    be = tl.load(beta_ptr + m64 * stride_ge + kk * stride_gk, mask=mask_k, other=0.0)
                    u = (a.to(cdt) - mu[:, None]) * rs[:, None] * ga.to(cdt)[None, :] + be.to(cdt)[None, :]
                    a = _cast(u, a_ptr.dtype.element_ty, RTNE)
                w = tl.load(w_base + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                            mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BK, BN]
                acc = _mma(a, w, acc, UPCAST, IEEE)
            # ---- epilogue (shared with the split path's `_rows_epilogue_kernel`) ----
            _epilogue(acc, m64, offs_s64, pick, tok, mask_m, offs_n, mask_n, pid_n,
                      bias_ptr, out_ptr, pre_ptr, g_ptr, part_ptr, u_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
                      N_PICKS, stride_be, stride_bn, stride_om, stride_on, stride_pm, stride_pn, stride_um,
                      stride_uk, stride_ge, stride_gk,
                      HAS_BIAS, EPI_GELU, SAVE_PRE, GELU_BWD, WEIGHTED, ROWDOT, U_LN, STORE_MODE, RTNE)


@triton.jit
def _rows_epilogue_kernel(
    c_ptr, bias_ptr, out_ptr, pre_ptr, g_ptr, part_ptr, u_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
    sorted_pick_ptr, offsets_ptr,
    N_OUT, TOP_K, N_MOD, N_PICKS,
    stride_cm, stride_cn, stride_be, stride_bn,
    stride_om, stride_on, stride_pm, stride_pn, stride_um, stride_uk, stride_ge, stride_gk,
    HAS_BIAS: tl.constexpr, EPI_GELU: tl.constexpr, SAVE_PRE: tl.constexpr, GELU_BWD: tl.constexpr,
    WEIGHTED: tl.constexpr, ROWDOT: tl.constexpr, U_LN: tl.constexpr, STORE_MODE: tl.constexpr,
    RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The grouped GEMM's epilogue as a pass of its own over a product c [P, N_out] already in module-sorted
    order (from `torch._grouped_mm` or the Triton GEMM without epilogue): the same `_epilogue`, with the module
    of each row found from the offsets. Rows s >= S are not touched."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    S = tl.load(offsets_ptr + N_MOD)
    if pid_r * BLOCK_M < S:
        offs_s = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_s < S
        pick = tl.load(sorted_pick_ptr + offs_s, mask=mask_m, other=0)
        tok = pick // TOP_K
        mod = tl.zeros([BLOCK_M], dtype=tl.int32)  # module of row s: how many modules start at or before s
        for e in range(1, N_MOD):
            mod += (offs_s >= tl.load(offsets_ptr + e)).to(tl.int32)
        offs_s64 = offs_s.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_OUT
        cdt = mean_ptr.dtype.element_ty
        acc = tl.load(c_ptr + offs_s64[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                      mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(cdt)
        _epilogue(acc, mod.to(tl.int64)[:, None], offs_s64, pick, tok, mask_m, offs_n, mask_n, pid_n,
                  bias_ptr, out_ptr, pre_ptr, g_ptr, part_ptr, u_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
                  N_PICKS, stride_be, stride_bn, stride_om, stride_on, stride_pm, stride_pn, stride_um,
                  stride_uk, stride_ge, stride_gk,
                  HAS_BIAS, EPI_GELU, SAVE_PRE, GELU_BWD, WEIGHTED, ROWDOT, U_LN, STORE_MODE, RTNE)


@triton.jit
def _grouped_dw_kernel(
    a_ptr, dy_ptr, g_ptr, dw_ptr,
    mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, sorted_pick_ptr, offsets_ptr,
    N_IN, N_OUT, TOP_K,
    stride_am, stride_ak, stride_dm, stride_dn, stride_we, stride_wk, stride_wn, stride_ge, stride_gk,
    A_GATHER: tl.constexpr, A_MODE: tl.constexpr,  # A_MODE 0: a, 1: LayerNorm_m(a), 2: gelu(a)
    DY_GATHER: tl.constexpr, WEIGHTED: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, RTNE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dW[m] = sum over module m's rows of U_r^T dY_r, one program per (m, K tile, N tile) walking the
    module's contiguous sorted rows in order: no atomics. (db is `_segment_sum_kernel`'s: a column sum of
    dY inside this loop forced dY out of shared memory each step and made the kernel 3x slower on an H200.)"""
    m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    m64 = m.to(tl.int64)
    start = tl.load(offsets_ptr + m)
    end = tl.load(offsets_ptr + m + 1)
    cdt = mean_ptr.dtype.element_ty
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < N_IN
    mask_n = offs_n < N_OUT
    if A_MODE == 1:
        ga = tl.load(gamma_ptr + m64 * stride_ge + offs_k * stride_gk, mask=mask_k, other=0.0).to(cdt)
        be = tl.load(beta_ptr + m64 * stride_ge + offs_k * stride_gk, mask=mask_k, other=0.0).to(cdt)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=cdt)
    n_iter = tl.cdiv(end - start, BLOCK_R)
    for i in range(0, n_iter):
        offs_s = start + i * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
        mask_r = offs_s < end
        pick = tl.load(sorted_pick_ptr + offs_s, mask=mask_r, other=0)
        tok = pick // TOP_K
        if A_GATHER:
            a_rows = tok.to(tl.int64)
        else:
            a_rows = offs_s.to(tl.int64)
        mask_kr = mask_k[:, None] & mask_r[None, :]
        aT = tl.load(a_ptr + offs_k[:, None] * stride_ak + a_rows[None, :] * stride_am,
                     mask=mask_kr, other=0.0)  # [BK, BR]
        if A_MODE == 1:
            mu = tl.load(mean_ptr + tok, mask=mask_r, other=0.0)
            rs = tl.load(rstd_ptr + tok, mask=mask_r, other=0.0)
            u = (aT.to(cdt) - mu[None, :]) * rs[None, :] * ga[:, None] + be[:, None]
            aT = _cast(tl.where(mask_kr, u, 0.0), a_ptr.dtype.element_ty, RTNE)
        elif A_MODE == 2:
            aT = _cast(_gelu(aT.to(cdt)), a_ptr.dtype.element_ty, RTNE)
        if DY_GATHER:
            d_rows = tok.to(tl.int64)
        else:
            d_rows = offs_s.to(tl.int64)
        dy = tl.load(dy_ptr + d_rows[:, None] * stride_dm + offs_n[None, :] * stride_dn,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # [BR, BN]
        if WEIGHTED:
            g = tl.load(g_ptr + pick, mask=mask_r, other=0.0).to(cdt)
            dy = _cast(dy.to(cdt) * g[:, None], dy_ptr.dtype.element_ty, RTNE)
        acc = _mma(aT, dy, acc, UPCAST, IEEE)
    tl.store(dw_ptr + m64 * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
             _cast(acc, dw_ptr.dtype.element_ty, RTNE), mask=mask_k[:, None] & mask_n[None, :])


@triton.jit
def _segment_sum_kernel(
    dy_ptr, g_ptr, out_ptr, acc_ptr, sorted_pick_ptr, offsets_ptr,
    N, TOP_K, stride_dm, stride_dn, stride_oe, stride_on,
    GATHER: tl.constexpr, WEIGHTED: tl.constexpr, RTNE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[m] = sum over module m's sorted rows r of (g_p *) dY[row(r)] (db of a routed layer), one program per
    (m, N tile) walking the rows in order: deterministic, no atomics. row(r) = token (GATHER) or r; g_p * dY is
    rounded to dY's dtype before the fp32 sum, as the weight-gradient GEMM sees it."""
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    start = tl.load(offsets_ptr + m)
    end = tl.load(offsets_ptr + m + 1)
    cdt = acc_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=cdt)
    for i in range(0, tl.cdiv(end - start, BLOCK_R)):
        offs_s = start + i * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_s < end
        pick = tl.load(sorted_pick_ptr + offs_s, mask=mask_r, other=0)
        if GATHER:
            rows = (pick // TOP_K).to(tl.int64)
        else:
            rows = offs_s.to(tl.int64)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dm + offs_n[None, :] * stride_dn,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        if WEIGHTED:
            g = tl.load(g_ptr + pick, mask=mask_r, other=0.0).to(cdt)
            dy = _cast(dy.to(cdt) * g[:, None], dy_ptr.dtype.element_ty, RTNE)
        acc += dy.to(cdt)
    tl.store(out_ptr + m.to(tl.int64) * stride_oe + offs_n * stride_on,
             _cast(tl.sum(acc, axis=0), out_ptr.dtype.element_ty, RTNE), mask=mask_n)


@triton.jit
def _gather_rows_kernel(
    a_ptr, out_ptr, g_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, sorted_pick_ptr, offsets_ptr,
    N, TOP_K, N_MOD, stride_am, stride_an, stride_om, stride_on, stride_ge, stride_gn,
    GATHER: tl.constexpr, A_MODE: tl.constexpr, WEIGHTED: tl.constexpr, RTNE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[s] = (g_p *) f(a[row(s)]) for the sorted rows s < S (rows s >= S are left as they are):
    row(s) = token (GATHER) or s; f = identity (A_MODE 0), LayerNorm with module m(s)'s affine (1), GELU (2).
    The operands of a weight-gradient GEMM in module-sorted order, for torch._grouped_mm."""
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
            mod = tl.zeros([BLOCK_R], dtype=tl.int32)  # module of row s: how many modules start at or before s
            for e in range(1, N_MOD):
                mod += (offs_s >= tl.load(offsets_ptr + e)).to(tl.int32)
            mod64 = mod.to(tl.int64)
            mu = tl.load(mean_ptr + tok, mask=mask_r, other=0.0)
            rs = tl.load(rstd_ptr + tok, mask=mask_r, other=0.0)
            ga = tl.load(gamma_ptr + mod64[:, None] * stride_ge + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
            be = tl.load(beta_ptr + mod64[:, None] * stride_ge + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
            v = (v - mu[:, None]) * rs[:, None] * ga.to(cdt) + be.to(cdt)
        elif A_MODE == 2:
            v = _gelu(v)
        if WEIGHTED:
            g = tl.load(g_ptr + pick, mask=mask_r, other=0.0).to(cdt)
            v = _cast(v, out_ptr.dtype.element_ty, RTNE).to(cdt) * g[:, None]
        tl.store(out_ptr + offs_s.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on,
                 _cast(v, out_ptr.dtype.element_ty, RTNE), mask=mask)


@triton.jit
def _combine_kernel(
    buf_ptr, ids_ptr, gamma_ptr, x_ptr, mean_ptr, rstd_ptr, res_ptr, out_ptr, acc_ptr,
    T, N, TOP_K, N_MOD,
    stride_bm, stride_bn, stride_ge, stride_gn, stride_xt, stride_xn, stride_rt, stride_rn, stride_ot, stride_on,
    HAS_GAMMA: tl.constexpr,  # scale pick slot p by gamma[ids[p]]
    LN_BWD: tl.constexpr,  # out = LayerNorm backward of the combined d x_hat (needs BLOCK_N >= N)
    HAS_RES: tl.constexpr,  # out += res[t] (a residual stream, or its gradient in the backward)
    RTNE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[t] = sum over k with 0 <= ids[t,k] < E of (gamma[ids[t,k]] *) buf[t*K + k], summed in fp32
    in k order (deterministic); with LN_BWD the sum is d x_hat and out is dx:
    dx = rstd * (dxh - mean(dxh) - x_hat * mean(dxh * x_hat)), exactly 0 for a token with no routed pick
    (whatever its x); with HAS_RES, + res[t]."""
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
        c1 = tl.sum(acc, axis=1) / N
        c2 = tl.sum(acc * xhat, axis=1) / N
        acc = tl.where(routed[:, None], rs[:, None] * (acc - c1[:, None] - xhat * c2[:, None]), 0.0)
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
    RTNE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """d gamma[m] = sum over module m's rows of dU_p * x_hat[t], d beta[m] = sum dU_p (dU_p in pick
    slot p of dxh, the gradient of pick p's LayerNorm output): a segmented reduction, no atomics."""
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
        accb += tl.sum(du, axis=0)
    tl.store(dgamma_ptr + m.to(tl.int64) * stride_ge + offs_d * stride_gd,
             _cast(accg, dgamma_ptr.dtype.element_ty, RTNE), mask=mask_d)
    tl.store(dbeta_ptr + m.to(tl.int64) * stride_ge + offs_d * stride_gd,
             _cast(accb, dbeta_ptr.dtype.element_ty, RTNE), mask=mask_d)


# ----------------------------------------------------------------------------------------------
# Configurations (what the launchers use; `aot.py` compiles exactly these)
# ----------------------------------------------------------------------------------------------

def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def slot_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-pick slots [P, N] that a grouped GEMM writes and the combine sums (in fp32): the
    16-bit input dtype itself (half the bytes of fp32 slots, each pick rounded once as the per-module loop
    rounds it), the accumulation dtype otherwise. MOM_KERNELS_SLOTS=fp32 keeps fp32 slots for 16-bit inputs."""
    choice = os.environ.get("MOM_KERNELS_SLOTS", "").strip()
    if choice not in ("", "fp32", "input"):
        raise ValueError(f"MOM_KERNELS_SLOTS must be 'fp32' or 'input', got {choice!r}")
    if dtype in (torch.float16, torch.bfloat16) and choice != "fp32":
        return dtype
    return acc_dtype(dtype)


def _env_override(name: str) -> dict:
    """Tile overrides for tuning on a GPU, e.g. MOM_KERNELS_GEMM_CONFIG="BLOCK_N=256,num_stages=4"
    (16-bit dtypes only; BLOCK_N / BLOCK_K are still clamped to the problem). Empty when unset."""
    spec = os.environ.get(name, "").strip()
    if not spec:
        return {}
    try:
        return {k.strip(): int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
    except ValueError:
        raise ValueError(f"{name} must look like 'BLOCK_N=128,num_warps=8', got {spec!r}") from None


def gemm_config(dtype: torch.dtype, n_in: int, n_out: int, interpret: bool) -> dict:
    """Tile sizes of `_grouped_gemm_kernel` (BLOCK_M comes from the plan).
    GPU: 128x128x64 tiles, 8 warps, 3 stages for 16-bit inputs (the usual Hopper/Ampere
    tensor-core tile); fp32/fp64 halve BLOCK_N/BLOCK_K to stay in registers / shared memory."""
    if interpret:
        return dict(BLOCK_N=min(32, _p2(n_out)), BLOCK_K=min(32, _p2(n_in)), num_warps=4, num_stages=1)
    if dtype in (torch.float16, torch.bfloat16):
        cfg = dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
        cfg.update(_env_override("MOM_KERNELS_GEMM_CONFIG"))
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], _p2(n_out))
        return cfg
    if dtype == torch.float64:
        return dict(BLOCK_N=min(32, _p2(n_out)), BLOCK_K=16, num_warps=4, num_stages=2)
    return dict(BLOCK_N=min(64, _p2(n_out)), BLOCK_K=32, num_warps=8, num_stages=3)


def dw_config(dtype: torch.dtype, n_in: int, n_out: int, interpret: bool) -> dict:
    """Tile sizes of `_grouped_dw_kernel`: one [BLOCK_K, BLOCK_N] tile of dW[m] per program,
    BLOCK_R rows of the module per step."""
    if interpret:
        return dict(BLOCK_R=16, BLOCK_K=min(32, _p2(n_in)), BLOCK_N=min(32, _p2(n_out)),
                    num_warps=4, num_stages=1)
    if dtype in (torch.float16, torch.bfloat16):
        cfg = dict(BLOCK_R=64, BLOCK_K=128, BLOCK_N=128, num_warps=8, num_stages=3)
        cfg.update(_env_override("MOM_KERNELS_DW_CONFIG"))
        cfg["BLOCK_K"], cfg["BLOCK_N"] = min(cfg["BLOCK_K"], _p2(n_in)), min(cfg["BLOCK_N"], _p2(n_out))
        return cfg
    if dtype == torch.float64:
        return dict(BLOCK_R=16, BLOCK_K=min(32, _p2(n_in)), BLOCK_N=min(32, _p2(n_out)),
                    num_warps=4, num_stages=2)
    return dict(BLOCK_R=32, BLOCK_K=min(64, _p2(n_in)), BLOCK_N=min(64, _p2(n_out)),
                num_warps=8, num_stages=3)


def _check_device(*tensors):
    dev = tensors[0].device
    if dev.type == "cpu" and not interpreting():
        raise RuntimeError(
            "mom_kernels: CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before "
            "importing triton / mom_kernels, or use mom_kernels.reference for plain PyTorch.")


# ----------------------------------------------------------------------------------------------
# Launchers (no autograd)
# ----------------------------------------------------------------------------------------------

def ln_stats(x: torch.Tensor, eps: float):
    """Per-token LayerNorm statistics of x [T, D]: mean [T], rstd [T] (fp32; fp64 for fp64)."""
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
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=4)
    return mean, rstd


def grouped_gemm(a, w, plan: RoutingPlan, *, out, a_gather: bool, w_transposed: bool = False,
                 bias=None, ln=None, gelu: bool = False, pre=None, save_pre: bool = False,
                 gelu_bwd: bool = False, weights=None, rowdot: int = 0, part=None, u=None,
                 u_ln=None, store: str = "sorted"):
    """Launch `_grouped_gemm_kernel`: out[row_out(s)] = epi(pro(a[row_a(s)]) @ W[m]).

    a      [T or P, N_in] (rows by token if a_gather else by sorted position)
    w      [E, N_in, N_out], or [E, N_out, N_in] read transposed when w_transposed (for dX)
    ln     (mean [T], rstd [T], gamma [E, N_in], beta [E, N_in]) for the LayerNorm prologue (A side)
    u, u_ln  with rowdot == 2: U = u[t] [T, N_out], or LN_m(u[t]) with u_ln = (mean, rstd, gamma [E, N_out],
           beta) (gamma / beta share strides); ln and u_ln are exclusive (they share kernel pointers)
    pre    [P, N_out] pre-activation (written when save_pre, read when gelu_bwd or rowdot == 1)
    weights [P] routing weights g (contiguous), part [n_tiles_N, P] fp32 row-dot partial sums
    store  "sorted" (row s), "pick" (row p = t*K + k) or "token" (row t)
    """
    E = w.shape[0]
    if w_transposed:
        n_out, n_in = w.shape[1], w.shape[2]
        s_we, s_wk, s_wn = w.stride(0), w.stride(2), w.stride(1)
    else:
        n_in, n_out = w.shape[1], w.shape[2]
        s_we, s_wk, s_wn = w.stride(0), w.stride(1), w.stride(2)
    interp = interpreting()
    cfg = gemm_config(a.dtype, n_in, n_out, interp)
    cdt = acc_dtype(a.dtype)
    dummy = torch.empty(1, device=a.device, dtype=cdt)  # for pointers a variant does not use
    if ln is not None and u_ln is not None:
        raise ValueError("grouped_gemm: ln and u_ln are exclusive")
    stats = ln if ln is not None else u_ln
    if stats is not None:
        mean, rstd, gamma, beta = stats
    else:
        mean = rstd = dummy
        gamma = beta = dummy.view(1, 1)
    num_n = triton.cdiv(n_out, cfg["BLOCK_N"])
    grid = (gemm_programs(plan.n_tiles * num_n, a.device),)
    store_mode = {"sorted": 0, "pick": 1, "token": 2}[store]
    bias_t = bias if bias is not None else dummy.view(1, 1)
    pre_t = pre if pre is not None else dummy.view(1, 1)
    u_t = u if u is not None else dummy.view(1, 1)
    g_t = weights if weights is not None else dummy
    part_t = part if part is not None else dummy
    mode = gemm_mode(a.dtype, n_in, n_out)
    epi = dict(HAS_BIAS=bias is not None, EPI_GELU=gelu, SAVE_PRE=save_pre, GELU_BWD=gelu_bwd,
               WEIGHTED=weights is not None, ROWDOT=rowdot, U_LN=u_ln is not None, STORE_MODE=store_mode)
    if mode == "grouped_mm":  # cuBLAS / CUTLASS grouped GEMM on A in sorted order, then the epilogue pass
        if a_gather or ln is not None:
            a = gather_rows(a, plan, gather=a_gather, mode=1 if ln is not None else 0, ln=ln)
        c = torch._grouped_mm(a, w.transpose(1, 2) if w_transposed else w, offs=plan.offsets[1:])  # [P, N_out]
    else:
        if mode == "split":  # the Triton GEMM without epilogue into sorted fp32 rows, then the epilogue pass
            c = torch.empty(plan.n_tokens * plan.top_k, n_out, device=a.device, dtype=cdt)
            dst, dst_epi = c, dict(HAS_BIAS=False, EPI_GELU=False, SAVE_PRE=False, GELU_BWD=False, WEIGHTED=False,
                                   ROWDOT=0, U_LN=False, STORE_MODE=0)
        else:
            dst, dst_epi = out, epi
        _grouped_gemm_kernel[grid](
            a, w, bias_t, dst, pre_t, g_t, part_t, u_t, mean, rstd, gamma, beta,
            plan.sorted_pick, plan.offsets, plan.tile_module, plan.tile_row_start,
            n_in, n_out, plan.top_k, E, plan.n_tokens * plan.top_k, plan.n_tiles,
            a.stride(0), a.stride(1), s_we, s_wk, s_wn, bias_t.stride(0), bias_t.stride(1),
            dst.stride(0), dst.stride(1), pre_t.stride(0), pre_t.stride(1), u_t.stride(0), u_t.stride(1),
            gamma.stride(0), gamma.stride(1),
            A_GATHER=a_gather, A_LN=ln is not None, **dst_epi,
            UPCAST=interp and a.dtype in (torch.float16, torch.bfloat16),
            IEEE=a.dtype in (torch.float32, torch.float64) or interp, RTNE=interp,
            EVEN_K=n_in % cfg["BLOCK_K"] == 0,
            BLOCK_M=plan.block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if mode == "fused":
            return out
    BLOCK_M = 16 if interp else 64
    P = plan.n_tokens * plan.top_k
    _rows_epilogue_kernel[(max(1, triton.cdiv(P, BLOCK_M)), num_n)](
        c, bias_t, out, pre_t, g_t, part_t, u_t, mean, rstd, gamma, beta, plan.sorted_pick, plan.offsets,
        n_out, plan.top_k, E, P, c.stride(0), c.stride(1), bias_t.stride(0), bias_t.stride(1),
        out.stride(0), out.stride(1), pre_t.stride(0), pre_t.stride(1), u_t.stride(0), u_t.stride(1),
        gamma.stride(0), gamma.stride(1), **epi, RTNE=interp, BLOCK_M=BLOCK_M, BLOCK_N=cfg["BLOCK_N"],
        num_warps=4 if interp else 8)
    return out


def gemm_mode(dtype: torch.dtype, n_in: int, n_out: int) -> str:
    """How `grouped_gemm` runs (MOM_KERNELS_GEMM): "fused" (default: the Triton GEMM with its epilogue in
    registers), "split" (the Triton GEMM writes fp32 products in sorted order, `_rows_epilogue_kernel` does the
    epilogue: fewer registers in the mainloop, one more pass over the products) or "grouped_mm"
    (torch._grouped_mm on A gathered in sorted order, then the same epilogue pass; where it cannot run - fp64,
    rows not a multiple of 16 bytes - the "split" path runs instead). Which is fastest per GEMM role and shape
    is for a GPU run to measure (benchmarks/bench_routed_ffn.py under each setting); until then "fused"."""
    mode = os.environ.get("MOM_KERNELS_GEMM", "").strip() or "fused"
    if mode not in ("fused", "split", "grouped_mm"):
        raise ValueError(f"MOM_KERNELS_GEMM must be 'fused', 'split' or 'grouped_mm', got {mode!r}")
    if mode == "grouped_mm":
        size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 0
        if not (hasattr(torch, "_grouped_mm") and dtype in (torch.bfloat16, torch.float16, torch.float32)
                and (n_in * size) % 16 == 0 and (n_out * size) % 16 == 0):
            return "split"
    return mode


def gemm_programs(n_work: int, device) -> int:
    """Grid size of `_grouped_gemm_kernel` for n_work (row tile, N tile) pairs: one program each (default), or a
    persistent grid of at most MOM_KERNELS_PERSISTENT programs per SM (e.g. 1 or 2) that walk the tiles in
    strides; the interpreter uses 4 programs then, to run the walk on a CPU. Persistence stays opt-in until a
    GPU run measures it against the one-program-per-tile grid."""
    per_sm = os.environ.get("MOM_KERNELS_PERSISTENT", "").strip()
    if not per_sm:
        return max(1, n_work)
    try:
        n = int(per_sm)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"MOM_KERNELS_PERSISTENT must be an int >= 1 (programs per SM), got {per_sm!r}")
    if interpreting() or torch.device(device).type != "cuda":
        return max(1, min(n_work, 4))
    return max(1, min(n_work, n * _sm_count(torch.device(device))))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def rowdot_tiles(n_out: int, dtype: torch.dtype) -> int:
    """Number of N tiles of a grouped GEMM with output width n_out (rows of its `part` buffer)."""
    return triton.cdiv(n_out, gemm_config(dtype, 16, n_out, interpreting())["BLOCK_N"])


def dw_backend(dtype: torch.dtype, device: torch.device, n_in: int, n_out: int) -> str:
    """How `grouped_dw` computes dW: "grouped_mm" (the operands gathered into module-sorted order by
    `_gather_rows_kernel`, then torch._grouped_mm: 620 TFLOP/s on an H200 where the Triton kernel reached
    140-430) on CUDA sm_90+ in bf16 with 16-byte-aligned rows, else "triton" (`_grouped_dw_kernel`).
    MOM_KERNELS_DW=grouped_mm / triton forces a path (grouped_mm also runs on the CPU, for tests)."""
    forced = os.environ.get("MOM_KERNELS_DW", "").strip()
    if forced not in ("", "grouped_mm", "triton"):
        raise ValueError(f"MOM_KERNELS_DW must be 'grouped_mm' or 'triton', got {forced!r}")
    ok = (hasattr(torch, "_grouped_mm") and dtype in (torch.bfloat16, torch.float16, torch.float32)
          and (n_in * torch.finfo(dtype).bits // 8) % 16 == 0 and (n_out * torch.finfo(dtype).bits // 8) % 16 == 0)
    if forced:
        if forced == "grouped_mm" and not ok:
            raise ValueError(f"MOM_KERNELS_DW=grouped_mm needs torch._grouped_mm, a 16/32-bit dtype and rows of a "
                             f"multiple of 16 bytes; got {dtype}, n_in {n_in}, n_out {n_out}")
        return forced
    auto = ok and device.type == "cuda" and dtype == torch.bfloat16 and _capability(device) >= (9, 0)
    return "grouped_mm" if auto else "triton"


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device):
    return torch.cuda.get_device_capability(device)


def grouped_dw(a, dy, plan: RoutingPlan, *, dw=None, db=None, a_gather: bool, a_mode: int = 0, ln=None,
               dy_gather: bool, weights=None):
    """dw[m] = sum_r U_r^T dY_r, db[m] = sum_r dY_r over module m's rows; returns (dw [E, N_in, N_out], db).

    a [T or P, N_in] (U = a, LN_m(a) with ln = (mean, rstd, gamma, beta) for a_mode 1, gelu(a) for
    a_mode 2), dy [T or P, N_out] (times g[p] when weights [P] given), dw [E, N_in, N_out] (allocated when
    None; the grouped_mm path returns its own tensor), db [E, N_out] or None. Path: `dw_backend`.
    """
    E = plan.n_modules
    n_in, n_out = a.shape[1], dy.shape[1]
    if db is not None:
        segment_sum(dy, plan, db, gather=dy_gather, weights=weights)
    if dw_backend(a.dtype, a.device, n_in, n_out) == "grouped_mm":
        # U and dY in module-sorted order (rows >= S unused: offs ends at S), then one grouped GEMM
        if not a_gather and a_mode == 0:
            u = a.contiguous()
        else:
            u = gather_rows(a, plan, gather=a_gather, mode=a_mode, ln=ln)
        if not dy_gather and weights is None:
            d = dy.contiguous()
        else:
            d = gather_rows(dy, plan, gather=dy_gather, weights=weights)
        offs = plan.offsets[1:].to(torch.int32)
        out = torch._grouped_mm(u.t(), d, offs=offs)                         # [E, N_in, N_out]
        if dw is None:
            return out, db
        dw.copy_(out)
        return dw, db
    if dw is None:
        dw = torch.empty(E, n_in, n_out, device=a.device, dtype=a.dtype)
    interp = interpreting()
    cfg = dw_config(a.dtype, n_in, n_out, interp)
    cdt = acc_dtype(a.dtype)
    dummy = torch.empty(1, device=a.device, dtype=cdt)
    if ln is not None:
        mean, rstd, gamma, beta = ln
    else:
        mean = rstd = dummy
        gamma = beta = dummy.view(1, 1)
    grid = (E, triton.cdiv(n_in, cfg["BLOCK_K"]), triton.cdiv(n_out, cfg["BLOCK_N"]))
    _grouped_dw_kernel[grid](
        a, dy, weights if weights is not None else dummy, dw,
        mean, rstd, gamma, beta, plan.sorted_pick, plan.offsets,
        n_in, n_out, plan.top_k,
        a.stride(0), a.stride(1), dy.stride(0), dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        gamma.stride(0), gamma.stride(1),
        A_GATHER=a_gather, A_MODE=a_mode, DY_GATHER=dy_gather, WEIGHTED=weights is not None,
        UPCAST=interp and a.dtype in (torch.float16, torch.bfloat16),
        IEEE=a.dtype in (torch.float32, torch.float64) or interp, RTNE=interp,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dw, db


def ln_prologue() -> str:
    """Where a routed forward applies the per-module LayerNorm: "gather" (default: `gather_rows` writes
    LN_m(x[t]) in module-sorted order, a transient [P, N_in] buffer, and a plain grouped GEMM reads it; on the
    H200 the LayerNorm in the GEMM's prologue halved its rate, 280 against 540 TFLOP/s) or "fused" (in the
    GEMM's prologue, no buffer). MOM_KERNELS_LN=gather / fused chooses."""
    choice = os.environ.get("MOM_KERNELS_LN", "gather").strip() or "gather"
    if choice not in ("gather", "fused"):
        raise ValueError(f"MOM_KERNELS_LN must be 'gather' or 'fused', got {choice!r}")
    return choice


def ln_operand(x, plan: RoutingPlan, gamma, beta, eps: float):
    """The A operand of a forward grouped GEMM over x [T, N_in] with the per-module LayerNorm (gamma, beta
    [E, N_in]), per `ln_prologue`: (a, a_gather, (mean, rstd) [T], ln for the GEMM's prologue or None).
    "gather": `gathers.ln_gather` writes LN_m(x[t]) in sorted order and the statistics in one launch;
    "fused": `ln_stats`, then x gathered on load and the LayerNorm in the GEMM's prologue."""
    if ln_prologue() == "fused":
        mean, rstd = ln_stats(x, eps)
        return x, True, (mean, rstd), (mean, rstd, gamma, beta)
    from .gathers import ln_gather  # (gathers.py imports helpers from here)

    a, mean, rstd = ln_gather(x, plan, gamma, beta, eps)
    return a, False, (mean, rstd), None


def segment_sum(dy, plan: RoutingPlan, out, *, gather: bool, weights=None):
    """out[m] = sum over module m's rows of (g_p *) dY[row] (`_segment_sum_kernel`); out [E, N]."""
    E, N = out.shape
    interp = interpreting()
    BLOCK_R = 16 if interp else 64
    BLOCK_N = min(_p2(N), 64 if interp else 128)
    acc = torch.empty(1, device=dy.device, dtype=acc_dtype(dy.dtype))  # only its dtype is used
    _segment_sum_kernel[(E, triton.cdiv(N, BLOCK_N))](
        dy, weights if weights is not None else acc, out, acc, plan.sorted_pick, plan.offsets,
        N, plan.top_k, dy.stride(0), dy.stride(1), out.stride(0), out.stride(1),
        GATHER=gather, WEIGHTED=weights is not None, RTNE=interp,
        BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, num_warps=4)
    return out


def gather_rows(a, plan: RoutingPlan, *, gather: bool, mode: int = 0, ln=None, weights=None):
    """[P, N] in module-sorted order: row s = (g_p *) f(a[token or s]) for s < S (`_gather_rows_kernel`; rows
    s >= S are not written). mode 0: a; 1: LayerNorm with ln = (mean, rstd, gamma [E, N], beta [E, N]);
    2: GELU."""
    P, N = plan.n_tokens * plan.top_k, a.shape[1]
    out = torch.empty(P, N, device=a.device, dtype=a.dtype)
    interp = interpreting()
    BLOCK_R = 16 if interp else 32
    BLOCK_N = min(_p2(N), 64 if interp else 256)
    cdt = acc_dtype(a.dtype)
    dummy = torch.empty(1, device=a.device, dtype=cdt)
    if ln is not None:
        mean, rstd, gamma, beta = ln
    else:
        mean = rstd = dummy
        gamma = beta = dummy.view(1, 1)
    _gather_rows_kernel[(triton.cdiv(P, BLOCK_R), triton.cdiv(N, BLOCK_N))](
        a, out, weights if weights is not None else dummy, mean, rstd, gamma, beta,
        plan.sorted_pick, plan.offsets, N, plan.top_k, plan.n_modules,
        a.stride(0), a.stride(1), out.stride(0), out.stride(1), gamma.stride(0), gamma.stride(1),
        GATHER=gather, A_MODE=mode, WEIGHTED=weights is not None, RTNE=interp,
        BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, num_warps=4)
    return out


def combine(buf, ids, n_modules: int, out, *, gamma=None, ln=None, x=None, res=None):
    """out[t] = sum_k valid (gamma[m] *) buf[t*K + k] in fp32 (deterministic, no atomics).
    With ln = (mean, rstd) and x, out is the LayerNorm input gradient of that sum (needs gamma).
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
        HAS_GAMMA=gamma is not None, LN_BWD=ln is not None, HAS_RES=res is not None, RTNE=interp,
        BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, num_warps=4 if BLOCK_N <= 2048 else 8)
    return out


def ln_affine_bwd(dxh, x, mean, rstd, plan: RoutingPlan, dgamma, dbeta):
    """d gamma [E, D], d beta [E, D] of the per-module LayerNorms from the per-pick gradients
    dxh [P, D] of the LayerNorm outputs (segmented reduction over each module's rows)."""
    E, D = dgamma.shape
    interp = interpreting()
    BLOCK_R = 16 if interp else 32
    BLOCK_D = min(_p2(D), 64 if interp else 128)
    _ln_affine_bwd_kernel[(E, triton.cdiv(D, BLOCK_D))](
        dxh, x, mean, rstd, dgamma, dbeta, plan.sorted_pick, plan.offsets, D, plan.top_k,
        dxh.stride(0), dxh.stride(1), x.stride(0), x.stride(1), dgamma.stride(0), dgamma.stride(1),
        RTNE=interp, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=4)
    return dgamma, dbeta

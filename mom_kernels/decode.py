"""Routed linear / FFN for few tokens (decoding): one pass over each picked module's weights, no sorted plan.

    T tokens, K picks per token, P = T*K picks, E modules (SKIP = id E), N_in / N_out the layer's widths

    routed_linear(x, W, b, ids, g, gamma, beta)[t] = sum_{k: ids[t,k] < E} g[t,k] (LN_m(x[t]) @ W[m] + b[m])
    routed_ffn(...)[t] = sum_{k: ids[t,k] < E} g[t,k] (act(LN_m(x[t]) @ W1[m] + b1[m]) @ W2[m] + b2[m])
    (the math of mom_kernels.reference; same signatures, plus residual= as the fused ops take it: LayerNorm or
    RMSNorm, GELU or SwiGLU (the FFN up pass keeps gate and up accumulators over W1's two halves), biases optional)

Why: a decode step routes B tokens (often 1). The grouped GEMM tiles BLOCK_M = 128 rows per module and first
builds a module-sorted plan; with a few picks a tile is almost all padding and the plan is pure overhead. Here
program (m, n-tile) of a grid (E, N_out / BLOCK_N) checks whether any pick chose module m (else it returns at
once: unpicked modules cost nothing and their weights are never read), then streams W[m][:, n-tile] once over
N_in (split along K in BLOCK_K chunks) and multiplies it with all P pick rows at once, the rows of other modules
masked to zero (P <= BLOCK_P = 64 rows fit one tl.dot; more picks loop over blocks of 64, re-reading W[m] per
block). Each pick row lands in its own slot [P, N_out]; the combine (reductions.combine: fp32 sum over the K
slots, SKIP masked, + residual) makes [T, N_out]. The FFN is two such launches (h slots [P, F] with b1 + GELU,
then rows per pick through W2 with b2 and g) and the combine. The LayerNorm runs inside the kernel: each program
computes its rows' mean and rstd over the whole input width in the accumulation dtype (two passes over a few
rows: cheaper than the separate LayerNorm launch, and its fp32 copy of 16-bit x, they replace) and applies
gamma[m], beta[m] to each loaded tile. No host sync: capturable.
On a GPU the reduction is split over programs where the picked modules alone would leave SMs idle (`split_k`:
about 4 programs per SM; grid (E, N_out / BLOCK_N, SPLIT)); each split writes fp32 partial sums [SPLIT, P, N_out]
and a second pass adds them in split order (deterministic). Where the pick rows are only summed per token (QKV,
output projection, FFN down) that pass is `_decode_splitk_combine_kernel`: epilogue, sum over the token's K
picks and residual in one launch, so the combine's launch and the per-pick slots go; the FFN up's per-pick
rows go through `_decode_splitk_kernel` (epilogue with GELU).

Forward only (decoding runs under no_grad). `routed_linear` / `routed_ffn` below dispatch: this path when
torch.is_grad_enabled() is False and T <= DECODE_MAX_TOKENS (16: with K <= 3 that is <= 48 picks, one pick
block, so each picked module's weights are read exactly once; above that the tiled grouped GEMM reuses its
weight tiles better. Not yet measured on a GPU: the threshold comes from the tile sizes, not a timing), else
mom_kernels.routed_linear / routed_ffn. Tests: tests/test_decode_kernels.py (vs mom_kernels.reference, T = 1..64,
K = 1..3, SKIP, fp32 / bf16 by the 2x rule).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import checks
from .common import _cast, _check_device, _gelu, _mma, _p2, _sigmoid, _sm_count, _swiglu_of, interpreting, slot_dtype
from .reductions import combine

__all__ = ["decode_routed_linear", "decode_routed_ffn", "routed_linear", "routed_ffn", "use_decode",
           "DECODE_MAX_TOKENS"]

DECODE_MAX_TOKENS = 16  # tokens per call up to which the no-grad dispatch takes this path (module docstring)


@triton.jit
def _decode_gemv_kernel(a_ptr, gamma_ptr, beta_ptr, w_ptr, b_ptr, g_ptr, ids_ptr, out_ptr, part_ptr,
                        P, N_in, N_out, K_PICKS, E, K_PER, EPS,
                        stride_am, stride_ak, stride_ge, stride_gk, stride_we, stride_wk, stride_wn,
                        stride_be, stride_bn, stride_om, stride_on, stride_ps, stride_pp,
                        ROW_PER_PICK: tl.constexpr, HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HAS_G: tl.constexpr, GELU: tl.constexpr, ACC_F64: tl.constexpr, UPCAST: tl.constexpr,
                        IEEE: tl.constexpr, RTNE: tl.constexpr, PARTIAL: tl.constexpr, RMS: tl.constexpr,
                        HAS_BETA: tl.constexpr, SWIGLU: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    m = tl.program_id(0)                                       # module
    pid_n = tl.program_id(1)                                   # output columns tile
    ks = tl.program_id(2)                                      # reduction split: rows [ks K_PER, (ks+1) K_PER)
    k_lo = ks * K_PER
    k_hi = tl.minimum(k_lo + K_PER, N_in)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_out
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)                    # [BLOCK_P] picks p = t * K + k
        ids = tl.load(ids_ptr + offs_p, mask=offs_p < P, other=E)
        sel = ids == m                                         # picks of module m (SKIP never matches)
        if tl.sum(sel.to(tl.int32), axis=0) > 0:               # module m unpicked here: its weights stay unread
            if ROW_PER_PICK:
                rows = offs_p                                  # input row per pick (the FFN's h slots)
            else:
                rows = offs_p // K_PICKS                       # input row per token
            if ACC_F64:
                acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float64)
            else:
                acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
            if SWIGLU:  # the up half's accumulator (W columns N_out + n; N_out = F)
                acc2 = tl.zeros_like(acc)
            else:
                acc2 = acc  # (unused)
            if HAS_LN:  # the rows' norm statistics over all N_in (every split needs them), two passes
                mean, rstd = _row_stats(a_ptr, rows, sel, N_in, stride_am, stride_ak, EPS, acc.dtype, RMS, BLOCK_P,
                                        BLOCK_K)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < k_hi
                a_mask = sel[:, None] & k_mask[None, :]
                a = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=a_mask, other=0.0)
                if HAS_LN:                                     # (x - mean) rstd gamma[m] + beta[m], in acc precision
                    gam = tl.load(gamma_ptr + m * stride_ge + offs_k * stride_gk, mask=k_mask, other=0.0)
                    a = (a.to(acc.dtype) - mean[:, None]) * rstd[:, None]
                    a = a * gam[None, :].to(acc.dtype)
                    if HAS_BETA:
                        bet = tl.load(beta_ptr + m * stride_ge + offs_k * stride_gk, mask=k_mask, other=0.0)
                        a = a + bet[None, :].to(acc.dtype)
                    a = tl.where(a_mask, a, 0.0)
                w = tl.load(w_ptr + m * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                            mask=k_mask[:, None] & n_mask[None, :], other=0.0)   # [BLOCK_K, BLOCK_N], once
                a = _cast(a, w.dtype, RTNE)
                acc = _mma(a, w, acc, UPCAST, IEEE)
                if SWIGLU:
                    w2 = tl.load(w_ptr + m * stride_we + offs_k[:, None] * stride_wk + (N_out + offs_n)[None, :] * stride_wn,
                                 mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                    acc2 = _mma(a, w2, acc2, UPCAST, IEEE)
            if PARTIAL:  # this split's sum for the picks of module m; `_decode_splitk_kernel` finishes them
                tl.store(part_ptr + ks * stride_ps + offs_p[:, None] * stride_pp + offs_n[None, :], acc,
                         mask=sel[:, None] & n_mask[None, :])
                if SWIGLU:  # the up half's partial sums, N_out columns on
                    tl.store(part_ptr + ks * stride_ps + offs_p[:, None] * stride_pp + (N_out + offs_n)[None, :],
                             acc2, mask=sel[:, None] & n_mask[None, :])
            else:
                _gemv_epilogue(acc, acc2, m, offs_p, sel, offs_n, n_mask, N_out, b_ptr, g_ptr, out_ptr, stride_be,
                               stride_bn, stride_om, stride_on, HAS_BIAS, GELU, HAS_G, RTNE, SWIGLU)


@triton.jit
def _row_stats(a_ptr, rows, sel, N_in, stride_am, stride_ak, EPS, ACC_DT: tl.constexpr, RMS: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """Mean and 1 / sqrt(var + EPS) [BLOCK_P] of input rows `rows` (where sel) over N_in, in ACC_DT: the sum,
    then the sum of squared deviations (two passes over the row, as a LayerNorm without the one-pass
    cancellation); RMS: mean 0 and 1 / sqrt(mean(x^2) + EPS) (one pass). Unselected rows get mean 0, rstd
    1 / sqrt(EPS) (never used)."""
    s1 = tl.zeros((BLOCK_P,), dtype=ACC_DT)
    if not RMS:
        for k0 in range(0, N_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = sel[:, None] & (offs_k < N_in)[None, :]
            x = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=mask, other=0.0)
            s1 += tl.sum(x.to(ACC_DT), axis=1)
    mean = s1 / N_in
    s2 = tl.zeros((BLOCK_P,), dtype=ACC_DT)
    for k0 in range(0, N_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = sel[:, None] & (offs_k < N_in)[None, :]
        x = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=mask, other=0.0)
        d = tl.where(mask, x.to(ACC_DT) - mean[:, None], 0.0)
        s2 += tl.sum(d * d, axis=1)
    rstd = 1.0 / tl.sqrt(s2 / N_in + EPS)
    return mean, rstd


@triton.jit
def _gemv_epilogue(acc, acc2, m, offs_p, sel, offs_n, n_mask, N_out, b_ptr, g_ptr, out_ptr, stride_be, stride_bn,
                   stride_om, stride_on, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_G: tl.constexpr,
                   RTNE: tl.constexpr, SWIGLU: tl.constexpr):
    """[BLOCK_P, BLOCK_N] sums of picks offs_p (rows where sel) of module m ([BLOCK_P, 1] or a scalar): + b[m],
    the activation (GELU, or with SWIGLU silu(acc) * acc2, acc2 the up half's sums), * g[p], stored to out[p]."""
    acc = _pick_values(acc, acc2, m, offs_p, sel, offs_n, n_mask, N_out, b_ptr, g_ptr, stride_be, stride_bn,
                       HAS_BIAS, GELU, HAS_G, SWIGLU)
    tl.store(out_ptr + offs_p[:, None] * stride_om + offs_n[None, :] * stride_on,
             _cast(acc, out_ptr.dtype.element_ty, RTNE), mask=sel[:, None] & n_mask[None, :])


@triton.jit
def _pick_values(acc, acc2, m, offs_p, sel, offs_n, n_mask, N_out, b_ptr, g_ptr, stride_be, stride_bn,
                 HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_G: tl.constexpr, SWIGLU: tl.constexpr):
    """The epilogue's values: acc + b[m], the activation (GELU; SwiGLU with acc2 the up half and its bias
    N_out columns on), * g[p] (rows where sel; the others get 0 bias and weight)."""
    if HAS_BIAS:
        bias = tl.load(b_ptr + m * stride_be + offs_n[None, :] * stride_bn, mask=sel[:, None] & n_mask[None, :],
                       other=0.0)
        acc += bias.to(acc.dtype)
        if SWIGLU:
            bias2 = tl.load(b_ptr + m * stride_be + (N_out + offs_n)[None, :] * stride_bn,
                            mask=sel[:, None] & n_mask[None, :], other=0.0)
            acc2 += bias2.to(acc.dtype)
    if GELU:
        if SWIGLU:
            acc = _swiglu_of(acc, acc2, _sigmoid(acc))
        else:
            acc = _gelu(acc)
    if HAS_G:
        g = tl.load(g_ptr + offs_p, mask=sel, other=0.0)
        acc = acc * g[:, None].to(acc.dtype)
    return acc


@triton.jit
def _split_sum(part_ptr, ids_ptr, offs_p, p_mask, offs_n, n_mask, E, SPLIT, stride_ps, stride_pp):
    """Picks offs_p (where p_mask) x columns offs_n: the sum of their SPLIT partial sums in split order, with each
    pick's module and which entries are real (the pick is not SKIP, the column exists)."""
    mod = tl.load(ids_ptr + offs_p, mask=p_mask, other=E)
    sel = mod < E
    mask = sel[:, None] & n_mask[None, :]
    ptrs = part_ptr + offs_p[:, None] * stride_pp + offs_n[None, :]
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for ks in range(1, SPLIT):
        acc += tl.load(ptrs + ks * stride_ps, mask=mask, other=0.0)
    return acc, mod, sel, mask


@triton.jit
def _decode_splitk_kernel(part_ptr, b_ptr, g_ptr, ids_ptr, out_ptr, P, N_out, E, SPLIT,
                          stride_ps, stride_pp, stride_be, stride_bn, stride_om, stride_on,
                          HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_G: tl.constexpr, RTNE: tl.constexpr,
                          SWIGLU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The split-K second pass: out[p] = epilogue(sum over the SPLIT partial sums of pick p, in split order), for
    every pick p that is not SKIP (its module ids[p] wrote all SPLIT partials); SWIGLU: the up half's sums N_out
    columns on. Deterministic: no atomics."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_out
    acc, mod, sel, _ = _split_sum(part_ptr, ids_ptr, offs_p, offs_p < P, offs_n, n_mask, E, SPLIT, stride_ps,
                                  stride_pp)
    if SWIGLU:
        acc2, _, _, _ = _split_sum(part_ptr, ids_ptr, offs_p, offs_p < P, N_out + offs_n, n_mask, E, SPLIT,
                                   stride_ps, stride_pp)
    else:
        acc2 = acc  # (unused)
    _gemv_epilogue(acc, acc2, mod[:, None], offs_p, sel, offs_n, n_mask, N_out, b_ptr, g_ptr, out_ptr, stride_be,
                   stride_bn, stride_om, stride_on, HAS_BIAS, GELU, HAS_G, RTNE, SWIGLU)


@triton.jit
def _decode_splitk_combine_kernel(part_ptr, b_ptr, g_ptr, ids_ptr, res_ptr, y_ptr, T, N_out, E, SPLIT, K_PICKS,
                                  stride_ps, stride_pp, stride_be, stride_bn, stride_rt, stride_rn,
                                  stride_yt, stride_yn,
                                  HAS_BIAS: tl.constexpr, HAS_G: tl.constexpr, HAS_RES: tl.constexpr,
                                  RTNE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """The split-K second pass and the combine in one: y[t] = res[t] + sum_k ([g[t, k]] (sum over the SPLIT
    partial sums of pick t*K + k) + b[m]) over the token's non-SKIP picks, in the partials' precision, splits
    and picks added in order (deterministic, no atomics), one rounding to y's dtype. It replaces
    `_decode_splitk_kernel` + reductions.combine (one launch, and no per-pick slots) wherever the pick rows are
    only summed per token (QKV, output projection, FFN down)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask = offs_t < T
    n_mask = offs_n < N_out
    y = tl.zeros((BLOCK_T, BLOCK_N), dtype=part_ptr.dtype.element_ty)
    for k in range(0, K_PICKS):
        offs_p = offs_t * K_PICKS + k                          # [BLOCK_T] pick k of each token
        acc, mod, sel, mask = _split_sum(part_ptr, ids_ptr, offs_p, t_mask, offs_n, n_mask, E, SPLIT, stride_ps,
                                         stride_pp)
        acc = _pick_values(acc, acc, mod[:, None], offs_p, sel, offs_n, n_mask, N_out, b_ptr, g_ptr, stride_be,
                           stride_bn, HAS_BIAS, False, HAS_G, False)
        y += tl.where(mask, acc, 0.0)
    out_mask = t_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        y += tl.load(res_ptr + offs_t[:, None] * stride_rt + offs_n[None, :] * stride_rn, mask=out_mask,
                     other=0.0).to(y.dtype)
    tl.store(y_ptr + offs_t[:, None] * stride_yt + offs_n[None, :] * stride_yn, _cast(y, y_ptr.dtype.element_ty, RTNE),
             mask=out_mask)


def split_k(n_in: int, n_tiles: int, max_modules: int, block_k: int, device: torch.device) -> int:
    """How many programs share one (module, column tile)'s reduction. A decode step picks few modules, so
    E x (N_out / BLOCK_N) programs of which only the picked modules' work leaves most SMs idle (batch 1 through
    a 1280-wide FFN down: 2 modules x 20 tiles = 40 programs on 132 SMs), far from the copy bandwidth a GEMV
    needs. Split the reduction until the picked modules (at most min(E, P): the host cannot read ids without a
    sync) give about 4 programs per SM, each split keeping >= 4 BLOCK_K steps; partial sums then go through
    `_decode_splitk_kernel` (one more launch). 1 in the interpreter; MOM_KERNELS_DECODE_SPLIT_K overrides."""
    env = os.environ.get("MOM_KERNELS_DECODE_SPLIT_K", "").strip()
    if env:
        try:
            want = int(env)
        except ValueError:
            want = 0
        if want < 1:
            raise ValueError(f"MOM_KERNELS_DECODE_SPLIT_K must be an int >= 1, got {env!r}")
    elif device.type != "cuda":
        return 1
    else:
        want = min(triton.cdiv(4 * _sm_count(device), max(1, max_modules * n_tiles)), max(1, n_in // (4 * block_k)))
    return triton.cdiv(n_in, triton.cdiv(triton.cdiv(n_in, want), block_k) * block_k)  # no empty splits


def _gemv(a, weight, bias, gamma, beta, ids_flat, g_flat, top_k: int, row_per_pick: bool, gelu: bool,
          out_dtype: torch.dtype, eps: float = 1e-5, y=None, residual=None, rms: bool = False,
          swiglu: bool = False) -> Optional[torch.Tensor]:
    """The per-pick rows out [P, N_out] (out_dtype; only picks of modules 0..E-1 written) =
    [act](U_m(a[row(p)]) @ W[m] + b[m]) [* g[p]], where U_m(a) = LN(a) gamma[m] + beta[m] (statistics computed in
    the kernel; rms: RMSNorm, beta None) when gamma is given, else a; act = GELU, or with swiglu silu(gate) * up
    of W [E, N_in, 2 N_out] = gate | up. y [T, N_out] given (no activation): where the reduction is split, the
    second pass combines instead, y[t] = [residual[t] +] sum_k out[t*K + k], and None is returned (no rows)."""
    P = ids_flat.shape[0]
    E, n_in, n_out = weight.shape
    if swiglu:
        n_out //= 2
    if P == 0:
        return a.new_empty(0, n_out, dtype=out_dtype)
    interp = interpreting()
    BLOCK_P = min(_p2(P), 64)
    BLOCK_K = min(_p2(n_in), 128 if interp else 64)
    BLOCK_N = min(_p2(n_out), 128 if interp else 64)
    n_tiles = triton.cdiv(n_out, BLOCK_N)
    split = split_k(n_in, n_tiles, min(E, P), BLOCK_K, a.device)
    k_per = triton.cdiv(triton.cdiv(n_in, split), BLOCK_K) * BLOCK_K
    dummy = weight.new_empty(1, 1)
    gm = gamma if gamma is not None else dummy
    bt = beta if beta is not None else dummy
    bs = bias if bias is not None else dummy
    gp = g_flat if g_flat is not None else dummy.view(-1)
    lowp = weight.dtype in (torch.float16, torch.bfloat16)
    acc_dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    part = (torch.empty(split, P, n_out * (2 if swiglu else 1), device=a.device, dtype=acc_dt) if split > 1
            else dummy.view(1, 1, 1))
    fused = split > 1 and y is not None              # the second pass combines: no per-pick rows
    out = dummy if fused else torch.empty(P, n_out, device=a.device, dtype=out_dtype)
    epi = dict(HAS_BIAS=bias is not None, HAS_G=g_flat is not None, GELU=gelu, RTNE=interp, SWIGLU=swiglu)
    _decode_gemv_kernel[(E, n_tiles, split)](
        a, gm, bt, weight, bs, gp, ids_flat, out, part, P, n_in, n_out, top_k, E, k_per, float(eps),
        a.stride(0), a.stride(1), gm.stride(0), gm.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
        bs.stride(0), bs.stride(1), out.stride(0), out.stride(1), part.stride(0), part.stride(1),
        ROW_PER_PICK=row_per_pick, HAS_LN=gamma is not None, ACC_F64=acc_dt == torch.float64,
        UPCAST=interp and lowp, IEEE=not lowp, PARTIAL=split > 1, RMS=rms, HAS_BETA=beta is not None, **epi,
        BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N, num_warps=4)
    if fused:
        T = y.shape[0]
        BLOCK_T = min(_p2(T), 16)
        r = residual if residual is not None else y
        _decode_splitk_combine_kernel[(triton.cdiv(T, BLOCK_T), n_tiles)](
            part, bs, gp, ids_flat, r, y, T, n_out, E, split, top_k, part.stride(0), part.stride(1),
            bs.stride(0), bs.stride(1), r.stride(0), r.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, HAS_G=g_flat is not None, HAS_RES=residual is not None, RTNE=interp,
            BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, num_warps=4)
        return None
    if split > 1:
        _decode_splitk_kernel[(triton.cdiv(P, BLOCK_P), n_tiles)](
            part, bs, gp, ids_flat, out, P, n_out, E, split, part.stride(0), part.stride(1),
            bs.stride(0), bs.stride(1), out.stride(0), out.stride(1), **epi,
            BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, num_warps=4)
    return out


def decode_routed_linear(x, weight, bias, ids, weights=None, ln_weight=None, ln_bias=None, eps=1e-5,
                         plan=None, residual=None, norm: str = "layer"):
    """routed_linear for few tokens, forward only (module docstring). x [T, N_in] -> [T, N_out] (+ residual).
    `plan` is accepted and ignored (no sorted plan is needed)."""
    x, weight, bias, ln_weight, ln_bias, residual = checks.autocast_inputs(x, weight, bias, ln_weight, ln_bias,
                                                                           residual)
    _check_device(x)
    T, K = ids.shape
    E, n_in, n_out = weight.shape
    ids_flat = ids.reshape(-1).contiguous()
    g = weights.reshape(-1).contiguous() if weights is not None else None
    y = x.new_empty(T, n_out)
    slots = _gemv(x, weight, bias, ln_weight, ln_bias if ln_weight is not None else None, ids_flat, g, K,
                  row_per_pick=False, gelu=False, out_dtype=slot_dtype(x.dtype), eps=eps, y=y, residual=residual,
                  rms=norm == "rms")                                                  # per-pick slots
    return y if slots is None else combine(slots, ids, E, y, res=residual)          # None: combined already


def decode_routed_ffn(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps=1e-5, plan=None, residual=None,
                      norm: str = "layer", act: str = "gelu"):
    """routed_ffn for few tokens, forward only (module docstring). x [T, D] -> [T, D] (+ residual)."""
    x, ln_weight, ln_bias, w1, b1, w2, b2, residual = checks.autocast_inputs(x, ln_weight, ln_bias, w1, b1, w2,
                                                                             b2, residual)
    _check_device(x)
    T, K = ids.shape
    E, D, _ = w1.shape
    ids_flat = ids.reshape(-1).contiguous()
    h = _gemv(x, w1, b1, ln_weight, ln_bias, ids_flat, None, K, row_per_pick=False, gelu=True,
              out_dtype=x.dtype, eps=eps, rms=norm == "rms", swiglu=act == "swiglu")  # [P, F] act(LN_m(x) W1 + b1)
    y = x.new_empty(T, D)
    slots = _gemv(h, w2, b2, None, None, ids_flat, weights.reshape(-1).contiguous(), K, row_per_pick=True,
                  gelu=False, out_dtype=slot_dtype(x.dtype), y=y, residual=residual)
    return y if slots is None else combine(slots, ids, E, y, res=residual)          # None: combined already


def use_decode(ids) -> bool:
    """This path is taken when nothing needs a gradient, T <= DECODE_MAX_TOKENS and torch.compile is not
    tracing (the launchers here are not custom ops)."""
    return (not torch.is_grad_enabled() and ids.shape[0] <= DECODE_MAX_TOKENS
            and not torch.compiler.is_compiling())


def routed_linear(x, weight, bias, ids, weights=None, ln_weight=None, ln_bias=None, eps=1e-5, plan=None,
                  residual=None, norm: str = "layer"):
    """mom_kernels.routed_linear, or decode_routed_linear under no_grad with T <= DECODE_MAX_TOKENS."""
    if use_decode(ids):
        checks.check_norm(norm, ln_bias)
        return decode_routed_linear(x, weight, bias, ids, weights, ln_weight, ln_bias, eps, residual=residual,
                                    norm=norm)
    from .routed_linear import routed_linear as grouped

    kw = {"residual": residual} if residual is not None else {}
    return grouped(x, weight, bias, ids, weights, ln_weight, ln_bias, eps, plan=plan, norm=norm, **kw)


def routed_ffn(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps=1e-5, plan=None, residual=None,
               norm: str = "layer", act: str = "gelu"):
    """mom_kernels.routed_ffn, or decode_routed_ffn under no_grad with T <= DECODE_MAX_TOKENS."""
    if use_decode(ids):
        checks.check_norm(norm, ln_bias, act)
        return decode_routed_ffn(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps, residual=residual,
                                 norm=norm, act=act)
    from .routed_ffn import routed_ffn as grouped

    kw = {"residual": residual} if residual is not None else {}
    return grouped(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps, plan=plan, norm=norm, act=act, **kw)

"""The grouped GEMM over the picked modules (forward and dX), its epilogue, and its launcher.

Index legend: T tokens, K picks, E modules, P = T*K picks, p = t*K + k, s a module-sorted
position (see `routing.py`), m = module of row s, N_in / N_out the GEMM's reduction / output dims.

One grouped GEMM kernel, specialised by constexpr flags, does every row-parallel product:

    out[row_out(s)] = epilogue( prologue(A[row_a(s)]) @ W[m] )      for every sorted row s < S

    row_a(s)   = token t (gather on load, A_GATHER) or s (A already in sorted order)
    prologue   = LayerNorm with module m's affine, statistics once per token (A_LN, MOM_KERNELS_LN=fused):
                 (a - mean[t]) * rstd[t] * gamma[m] + beta[m]   (RMSNorm: mean 0, no beta: HAS_BETA off)
    epilogue   = `_epilogue`: + bias[m]; the activation storing the pre-activation for backward: GELU
                 (tanh), or SwiGLU (SWIGLU: W[m] is [gate | up], N_OUT = F columns each, two accumulators
                 over the same A tile, silu(gate) * up; pre = [gate | up]); * g[p]; * act'(pre) (backward;
                 SwiGLU's writes d gate and d up, [P, 2F]); a partial row dot product with a recomputed U
                 row (the gradient of the routing weight g); run on EPI_SUBTILE column slices of the tile
                 in turn (`gemm_config`: 4 for 16-bit on a GPU), so that only one slice's temporaries are live
    row_out(s) = s (grouped store), p (per-pick slot, for the deterministic combine) or t (K == 1)

The backward uses the same kernel with W[m] transposed (strides swapped, no copy) for dX. The kernel walks the
tile schedule in a loop, so one program per tile (the default grid) and a persistent grid
(MOM_KERNELS_PERSISTENT) run the same code. `gemm_mode` (MOM_KERNELS_GEMM, per GEMM role) picks "fused" (the
epilogue in registers), "split" (plain products, then `_rows_epilogue_kernel`) or "grouped_mm"
(torch._grouped_mm on operands in sorted order, then the same epilogue pass). MOM_KERNELS_TMA=1 (opt-in until
measured on a GPU) loads the W tiles, and the A tiles whose rows are already in sorted order (the FFN down's h,
the FFN up's dX input, the sorted LayerNorm rows), through tensor descriptors (TMA on sm_90; `weight_descriptor`
and `activation_descriptor` say where each is valid; sm_80 and other shapes keep the pointer loads); gathered A
rows stay pointer loads (Hopper's TMA cannot gather rows).

Measured on an H200 (benchmarks/results/h200_2026-11-28/): 540 TFLOP/s for the plain grouped GEMM at
16384 x 1280 x 5120 (dense cuBLAS 720), 280 with the fused LayerNorm prologue (why the forward LayerNorm is
written in sorted order by `gathers.ln_gather` by default).

Launchers (plain functions: check, allocate, grid, launch) sit outside autograd so tests and benchmarks can
call them; `routed_linear.py` and `routed_ffn.py` wire them into autograd.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import autotune
from .common import (_cast, _env_override, _gelu, _gelu_grad_of, _gelu_of, _gelu_tanh, _mma, _p2, _row_module,
                     _sigmoid, _silu_grad_of, _sm_count, _swiglu_of, acc_dtype, has_beta, interpreting, ln_pointers)
from .gathers import gather_rows
from .routing import RoutingPlan


@triton.jit
def _epilogue(acc, acc2, m_idx, offs_s64, pick, tok, mask_m, offs_n, mask_n, N_OUT,
              bias_ptr, out_ptr, pre_ptr, g_ptr, u_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
              stride_be, stride_bn, stride_om, stride_on, stride_pm, stride_pn, stride_um, stride_uk,
              stride_ge, stride_gk,
              HAS_BIAS: tl.constexpr, EPI_GELU: tl.constexpr, SAVE_PRE: tl.constexpr, GELU_BWD: tl.constexpr,
              WEIGHTED: tl.constexpr, ROWDOT: tl.constexpr, U_LN: tl.constexpr, STORE_MODE: tl.constexpr,
              RTNE: tl.constexpr, SWIGLU: tl.constexpr, HAS_BETA: tl.constexpr):
    """What happens to a [BM, BN] tile of products acc (rows: sorted positions offs_s64, their picks and
    tokens) before it is stored; m_idx is the module (a scalar for a GEMM tile, [BM, 1] for row blocks that
    span modules): + bias[m]; the activation (EPI_GELU: GELU, or SwiGLU with SWIGLU, acc2 the up projection's
    tile, columns N_OUT + offs_n of W, bias and pre) storing the pre-activation; * act'(pre) (GELU_BWD; SwiGLU's
    gate gradient goes to columns offs_n, the up gradient to N_OUT + offs_n); * g[p]; store to row s, p or t.
    Returns the tile's part of the routing weight's gradient row dot, [BM] (zeros unless ROWDOT; the caller
    stores it to part[pid_n, p], after adding the subtiles' parts)."""
    cdt = mean_ptr.dtype.element_ty
    tok64 = tok.to(tl.int64)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + m_idx * stride_be + offs_n[None, :] * stride_bn, mask=mask_n[None, :], other=0.0)
        acc += bias.to(cdt)
        if SWIGLU and EPI_GELU:
            bias2 = tl.load(bias_ptr + m_idx * stride_be + (N_OUT + offs_n)[None, :] * stride_bn,
                            mask=mask_n[None, :], other=0.0)
            acc2 += bias2.to(cdt)
    if EPI_GELU:
        if SAVE_PRE:
            tl.store(pre_ptr + offs_s64[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                     _cast(acc, pre_ptr.dtype.element_ty, RTNE), mask=mask_mn)
            if SWIGLU:
                tl.store(pre_ptr + offs_s64[:, None] * stride_pm + (N_OUT + offs_n)[None, :] * stride_pn,
                         _cast(acc2, pre_ptr.dtype.element_ty, RTNE), mask=mask_mn)
        if SWIGLU:
            acc = _swiglu_of(acc, acc2, _sigmoid(acc))
        else:
            acc = _gelu(acc)
    if ROWDOT == 1 or GELU_BWD:
        pre = tl.load(pre_ptr + offs_s64[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                      mask=mask_mn, other=0.0).to(cdt)
        if SWIGLU:  # pre = gate here; up from the other half; one sigmoid for silu (row dot) and silu'
            up = tl.load(pre_ptr + offs_s64[:, None] * stride_pm + (N_OUT + offs_n)[None, :] * stride_pn,
                         mask=mask_mn, other=0.0).to(cdt)
            th = _sigmoid(pre)
        else:
            th = _gelu_tanh(pre)  # one tanh for gelu(pre) (the row dot) and gelu'(pre) (GELU backward)
    if ROWDOT != 0:
        if ROWDOT == 1:
            if SWIGLU:
                uu = _swiglu_of(pre, up, th)
            else:
                uu = _gelu_of(pre, th)
        else:
            uu = tl.load(u_ptr + tok64[:, None] * stride_um + offs_n[None, :] * stride_uk,
                         mask=mask_mn, other=0.0).to(cdt)
            if U_LN:
                mu2 = tl.load(mean_ptr + tok, mask=mask_m, other=0.0)
                rs2 = tl.load(rstd_ptr + tok, mask=mask_m, other=0.0)
                ga2 = tl.load(gamma_ptr + m_idx * stride_ge + offs_n[None, :] * stride_gk, mask=mask_n[None, :],
                              other=0.0).to(cdt)
                uu = (uu - mu2[:, None]) * rs2[:, None] * ga2
                if HAS_BETA:
                    be2 = tl.load(beta_ptr + m_idx * stride_ge + offs_n[None, :] * stride_gk, mask=mask_n[None, :],
                                  other=0.0).to(cdt)
                    uu = uu + be2
        part = tl.sum(tl.where(mask_mn, acc * uu, 0.0), axis=1)  # [BM]
    else:
        part = tl.zeros_like(offs_s64).to(cdt)
    if WEIGHTED:
        g = tl.load(g_ptr + pick, mask=mask_m, other=0.0).to(cdt)
    if STORE_MODE == 0:
        o_rows = offs_s64
    elif STORE_MODE == 1:
        o_rows = pick.to(tl.int64)
    else:
        o_rows = tok64
    if GELU_BWD:
        if SWIGLU:  # d up = G silu(gate) [* g], stored to the up half; acc becomes d gate
            d_up = acc * pre * th
            if WEIGHTED:
                d_up = d_up * g[:, None]
            tl.store(out_ptr + o_rows[:, None] * stride_om + (N_OUT + offs_n)[None, :] * stride_on,
                     _cast(d_up, out_ptr.dtype.element_ty, RTNE), mask=mask_mn)
            acc = acc * up * _silu_grad_of(pre, th)
        else:
            acc = acc * _gelu_grad_of(pre, th)
    if WEIGHTED:
        acc = acc * g[:, None]
    tl.store(out_ptr + o_rows[:, None] * stride_om + offs_n[None, :] * stride_on,
             _cast(acc, out_ptr.dtype.element_ty, RTNE), mask=mask_mn)
    return part


@triton.jit
def _halves(acc, BM: tl.constexpr, BN: tl.constexpr):
    """[BM, BN] -> its left and right column halves, [BM, BN/2] each (registers only)."""
    return tl.split(tl.permute(tl.reshape(acc, [BM, 2, BN // 2]), (0, 2, 1)))


@triton.jit
def _slices(acc, BM: tl.constexpr, BN: tl.constexpr, N_SLICES: tl.constexpr):
    """[BM, BN] -> N_SLICES (1, 2 or 4) column slices [BM, BN / N_SLICES], left to right."""
    if N_SLICES == 1:
        slices = (acc,)
    else:
        left, right = _halves(acc, BM, BN)  # [BM, BN/2] each
        if N_SLICES == 2:
            slices = (left, right)
        else:  # 4: [BM, BN/4] each
            ll, lr = _halves(left, BM, BN // 2)
            rl, rr = _halves(right, BM, BN // 2)
            slices = (ll, lr, rl, rr)
    return slices


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, a_desc, w_ptr, w_desc, bias_ptr, out_ptr, pre_ptr, g_ptr, part_ptr,
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
    SWIGLU: tl.constexpr,  # the activation is SwiGLU: with EPI_GELU a second accumulator over W's columns N_OUT..
    HAS_BETA: tl.constexpr,  # the norm (A_LN, U_LN) has a beta (LayerNorm); off: RMSNorm (mean 0) or no bias
    UPCAST: tl.constexpr,  # interpreter: dot in fp32
    IEEE: tl.constexpr,  # fp32 / fp64 inputs: exact dot (no TF32)
    RTNE: tl.constexpr,  # interpreter: round bf16 stores to nearest even (see _cast)
    EVEN_K: tl.constexpr,  # N_IN % BLOCK_K == 0: no masks along the reduction
    A_TMA: tl.constexpr,  # A tiles (rows in sorted order: no gather, no LN prologue) through the descriptor a_desc
    W_TMA: tl.constexpr,  # W tiles through the tensor descriptor w_desc (TMA on sm_90; needs EVEN_K), else pointers
    W_T: tl.constexpr,  # with W_TMA: w_desc is over the stored [E * N_OUT, N_IN] (dX reads W transposed)
    EPI_SUBTILE: tl.constexpr,  # 1, 2 or 4: the epilogue on that many column slices in turn (fewer live registers)
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
            if SWIGLU and EPI_GELU:  # the up projection's tile: W[m][:, N_OUT + n], the same A tile
                acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=cdt)
            for k0 in range(0, N_IN, BLOCK_K):
                kk = k0 + offs_k
                if EVEN_K:  # N_IN % BLOCK_K == 0: only the rows are masked
                    mask_k = tl.full([BLOCK_K], 1, tl.int1)
                else:
                    mask_k = kk < N_IN
                if A_TMA:  # rows past the module's end are loaded and never stored; past P and N_IN: zeros
                    a = a_desc.load([row_start, k0])  # [BM, BK]
                else:
                    a = tl.load(a_base + kk[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :],
                                other=0.0)  # [BM, BK]
                if A_LN:
                    ga = tl.load(gamma_ptr + m64 * stride_ge + kk * stride_gk, mask=mask_k, other=0.0)
                    u = (a.to(cdt) - mu[:, None]) * rs[:, None] * ga.to(cdt)[None, :]
                    if HAS_BETA:
                        be = tl.load(beta_ptr + m64 * stride_ge + kk * stride_gk, mask=mask_k, other=0.0)
                        u = u + be.to(cdt)[None, :]
                    a = _cast(u, a_ptr.dtype.element_ty, RTNE)
                if W_TMA:  # whole tiles; columns past N_OUT are zero (tensor end) or never stored (next module)
                    if W_T:
                        w = w_desc.load([m * N_OUT + pid_n * BLOCK_N, k0]).T  # [BN, BK] -> [BK, BN]
                    else:
                        w = w_desc.load([m * N_IN + k0, pid_n * BLOCK_N])  # [BK, BN]
                else:
                    w = tl.load(w_base + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                                mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BK, BN]
                acc = _mma(a, w, acc, UPCAST, IEEE)
                if SWIGLU and EPI_GELU:
                    if W_TMA:
                        w2 = w_desc.load([m * N_IN + k0, N_OUT + pid_n * BLOCK_N])  # [BK, BN]
                    else:
                        w2 = tl.load(w_base + kk[:, None] * stride_wk + (N_OUT + offs_n)[None, :] * stride_wn,
                                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BK, BN]
                    acc2 = _mma(a, w2, acc2, UPCAST, IEEE)
            if not (SWIGLU and EPI_GELU):
                acc2 = acc  # (unused)
            # ---- epilogue (shared with the split path's `_rows_epilogue_kernel`) on EPI_SUBTILE column slices
            # [BM, BN / EPI_SUBTILE] one after the other: the live registers are one slice's, not the tile's ----
            slices = _slices(acc, BLOCK_M, BLOCK_N, EPI_SUBTILE)
            slices2 = _slices(acc2, BLOCK_M, BLOCK_N, EPI_SUBTILE)
            BN_S: tl.constexpr = BLOCK_N // EPI_SUBTILE
            part = tl.zeros([BLOCK_M], dtype=cdt)  # [BM] the routing weight's row dot over this tile's columns
            offs_j = pid_n * BLOCK_N + tl.arange(0, BN_S)  # slice j's columns (advanced, not recomputed from j:
            for j in tl.static_range(EPI_SUBTILE):          # 7 registers fewer on sm_90 in the AOT compile)
                part += _epilogue(slices[j], slices2[j], m64, offs_s64, pick, tok, mask_m, offs_j, offs_j < N_OUT,
                                  N_OUT, bias_ptr, out_ptr, pre_ptr, g_ptr, u_ptr, mean_ptr, rstd_ptr, gamma_ptr,
                                  beta_ptr, stride_be, stride_bn, stride_om, stride_on, stride_pm, stride_pn,
                                  stride_um, stride_uk, stride_ge, stride_gk,
                                  HAS_BIAS, EPI_GELU, SAVE_PRE, GELU_BWD, WEIGHTED, ROWDOT, U_LN, STORE_MODE, RTNE,
                                  SWIGLU, HAS_BETA)
                offs_j += BN_S
            if ROWDOT != 0:
                tl.store(part_ptr + pid_n.to(tl.int64) * N_PICKS + pick, part, mask=mask_m)


@triton.jit
def _rows_epilogue_kernel(
    c_ptr, bias_ptr, out_ptr, pre_ptr, g_ptr, part_ptr, u_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
    sorted_pick_ptr, offsets_ptr,
    N_OUT, TOP_K, N_MOD, N_PICKS,
    stride_cm, stride_cn, stride_be, stride_bn,
    stride_om, stride_on, stride_pm, stride_pn, stride_um, stride_uk, stride_ge, stride_gk,
    HAS_BIAS: tl.constexpr, EPI_GELU: tl.constexpr, SAVE_PRE: tl.constexpr, GELU_BWD: tl.constexpr,
    WEIGHTED: tl.constexpr, ROWDOT: tl.constexpr, U_LN: tl.constexpr, STORE_MODE: tl.constexpr,
    RTNE: tl.constexpr, SWIGLU: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The grouped GEMM's epilogue as a pass of its own over a product c [P, N_out] already in module-sorted
    order (from `torch._grouped_mm` or the Triton GEMM without epilogue): the same `_epilogue`, with the module
    of each row found from the offsets (SwiGLU forward: c is [P, 2 N_out], gate | up). Rows s >= S are not
    touched."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    S = tl.load(offsets_ptr + N_MOD)
    if pid_r * BLOCK_M < S:
        offs_s = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_s < S
        pick = tl.load(sorted_pick_ptr + offs_s, mask=mask_m, other=0)
        tok = pick // TOP_K
        mod = _row_module(offs_s, offsets_ptr, N_MOD, BLOCK_M)
        offs_s64 = offs_s.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_OUT
        cdt = mean_ptr.dtype.element_ty
        acc = tl.load(c_ptr + offs_s64[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                      mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(cdt)
        if SWIGLU and EPI_GELU:
            acc2 = tl.load(c_ptr + offs_s64[:, None] * stride_cm + (N_OUT + offs_n)[None, :] * stride_cn,
                           mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(cdt)
        else:
            acc2 = acc  # (unused)
        part = _epilogue(acc, acc2, mod.to(tl.int64)[:, None], offs_s64, pick, tok, mask_m, offs_n, mask_n, N_OUT,
                         bias_ptr, out_ptr, pre_ptr, g_ptr, u_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
                         stride_be, stride_bn, stride_om, stride_on, stride_pm, stride_pn, stride_um,
                         stride_uk, stride_ge, stride_gk,
                         HAS_BIAS, EPI_GELU, SAVE_PRE, GELU_BWD, WEIGHTED, ROWDOT, U_LN, STORE_MODE, RTNE,
                         SWIGLU, HAS_BETA)
        if ROWDOT != 0:
            tl.store(part_ptr + pid_n.to(tl.int64) * N_PICKS + pick, part, mask=mask_m)


def _tma_allowed(t: torch.Tensor) -> bool:
    """MOM_KERNELS_TMA=1 (opt-in: not yet measured on a GPU) and a device with TMA for t: sm_90+ with 16-bit data
    (fp32 / fp64 run FMA dots, not wgmma: descriptor loads there cost up to 255 registers in the AOT compile, for
    no speed), or the interpreter in every dtype (the tests). `meta` tensors count as a GPU's (the AOT check)."""
    choice = os.environ.get("MOM_KERNELS_TMA", "0").strip()
    if choice not in ("0", "1"):
        raise ValueError(f"MOM_KERNELS_TMA must be 0 or 1, got {choice!r}")
    if choice == "0":
        return False
    if t.is_cuda and torch.cuda.get_device_capability(t.device)[0] < 9:
        return False  # sm_80: no TMA, the pointer path
    return t.device.type == "cpu" or t.dtype in (torch.float16, torch.bfloat16)


def weight_descriptor(w, cfg: dict, n_in: int, w_transposed: bool):
    """A tensor descriptor over the stacked weights for the TMA path, or None for the pointer path.

    Taken where `_tma_allowed` and the reduction splits into whole BLOCK_K tiles (N_IN % BLOCK_K == 0, so a tile
    never crosses into the next module along the reduction), w contiguous with 16-byte row strides. The descriptor
    views w [E, N1, N2] as [E * N1, N2] with tiles [BLOCK_K, BLOCK_N] (or [BLOCK_N, BLOCK_K], transposed in
    registers, for dX); a tile's columns past N_OUT come from the next module or the zero fill past the tensor's
    end and are never stored."""
    if not _tma_allowed(w) or n_in % cfg["BLOCK_K"] or not w.is_contiguous() or (w.shape[2] * w.element_size()) % 16:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    block = [cfg["BLOCK_N"], cfg["BLOCK_K"]] if w_transposed else [cfg["BLOCK_K"], cfg["BLOCK_N"]]
    return TensorDescriptor.from_tensor(w.view(w.shape[0] * w.shape[1], w.shape[2]), block)


def activation_descriptor(a, cfg: dict, block_m: int, a_gather: bool, ln):
    """A tensor descriptor over A [P, N_in] in sorted row order for the TMA path, or None for pointer loads.

    Taken where `_tma_allowed` and A's rows are the sorted positions themselves (no token gather: Hopper's TMA
    cannot gather rows; no LayerNorm prologue), with unit column stride and 16-byte aligned rows and base. Tiles
    [BLOCK_M, BLOCK_K] start at the tile's first row: rows past the module's end belong to the next module (their
    products are never stored), rows past P and columns past N_in are the descriptor's zero fill (so the reduction
    need not split into whole tiles)."""
    if a_gather or ln is not None or not _tma_allowed(a) or a.stride(1) != 1:
        return None
    if (a.stride(0) * a.element_size()) % 16 or a.data_ptr() % 16:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(a, [block_m, cfg["BLOCK_K"]])


def gemm_config(dtype: torch.dtype, n_in: int, n_out: int, interpret: bool, two_acc: bool = False) -> dict:
    """Tile sizes of `_grouped_gemm_kernel` (BLOCK_M comes from the plan) and its epilogue slices.
    GPU: 128x128x64 tiles, 8 warps, 3 stages for 16-bit inputs (the usual Hopper/Ampere tensor-core tile), the
    epilogue on 4 column slices of 32: on sm_90 that keeps every variant at <= 153 registers (<= 130 but the
    GELU forward on pointer loads), where the whole-tile epilogue took up to 255 (the GELU backward and TMA
    variants), with the same mainloop (benchmarks/results/aot_cpu_2026-11-29_subtile.md); at <= 128 registers
    two 8-warp programs fit on an SM. fp32/fp64 halve BLOCK_N/BLOCK_K to stay in registers / shared memory and
    keep the whole-tile epilogue (slicing the FMA-path tiles saves no registers there). The interpreter runs 4
    slices too (the 16-bit GPU code path); MOM_KERNELS_GEMM_CONFIG overrides any field, e.g. "EPI_SUBTILE=1"
    (16-bit GPU and interpreter). two_acc (the SwiGLU forward: gate and up accumulators over the same A tile)
    halves BLOCK_N on a GPU, so the two accumulators hold what one did (the same registers as the GELU tile)."""
    if interpret:
        cfg = dict(BLOCK_N=min(32, _p2(n_out)), BLOCK_K=min(32, _p2(n_in)), num_warps=4, num_stages=1,
                   EPI_SUBTILE=4)
        cfg.update(_env_override("MOM_KERNELS_GEMM_CONFIG"))
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], _p2(n_out))
    elif dtype in (torch.float16, torch.bfloat16):
        cfg = dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, EPI_SUBTILE=4)
        cfg.update(_env_override("MOM_KERNELS_GEMM_CONFIG"))
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], _p2(n_out))
    elif dtype == torch.float64:
        cfg = dict(BLOCK_N=min(32, _p2(n_out)), BLOCK_K=16, num_warps=4, num_stages=2, EPI_SUBTILE=1)
    else:
        cfg = dict(BLOCK_N=min(64, _p2(n_out)), BLOCK_K=32, num_warps=8, num_stages=3, EPI_SUBTILE=1)
    if two_acc and not interpret:
        cfg["BLOCK_N"] = max(16, cfg["BLOCK_N"] // 2)
    if cfg["EPI_SUBTILE"] not in (1, 2, 4):
        raise ValueError(f"MOM_KERNELS_GEMM_CONFIG: EPI_SUBTILE must be 1, 2 or 4, got {cfg['EPI_SUBTILE']}")
    # a slice keeps at least 16 columns on a GPU (the MMA layout's width), at least 1 in the interpreter
    cfg["EPI_SUBTILE"] = max(1, min(cfg["EPI_SUBTILE"], cfg["BLOCK_N"] // (1 if interpret else 16)))
    return cfg


def grouped_gemm(a, w, plan: RoutingPlan, *, out, a_gather: bool, w_transposed: bool = False,
                 bias=None, ln=None, gelu: bool = False, pre=None, save_pre: bool = False,
                 gelu_bwd: bool = False, weights=None, rowdot: int = 0, part=None, u=None,
                 u_ln=None, store: str = "sorted", role: str = "linear", swiglu: bool = False):
    """Launch `_grouped_gemm_kernel`: out[row_out(s)] = epi(pro(a[row_a(s)]) @ W[m]).

    a      [T or P, N_in] (rows by token if a_gather else by sorted position)
    w      [E, N_in, N_out], or [E, N_out, N_in] read transposed when w_transposed (for dX); with swiglu and
           gelu (the SwiGLU forward) [E, N_in, 2 N_out] = gate | up, out [.., N_out], bias and pre [.., 2 N_out]
    ln     (mean [T], rstd [T], gamma [E, N_in], beta [E, N_in] or None) for the norm prologue (A side;
           RMSNorm: mean 0, beta None)
    u, u_ln  with rowdot == 2: U = u[t] [T, N_out], or LN_m(u[t]) with u_ln = (mean, rstd, gamma [E, N_out],
           beta or None) (gamma / beta share strides); ln and u_ln are exclusive (they share kernel pointers)
    pre    [P, N_out] pre-activation (written when save_pre, read when gelu_bwd or rowdot == 1); SwiGLU:
           [P, 2 N_out] (gate | up), and the backward (gelu_bwd) writes out [P, 2 N_out] = d gate | d up
    weights [P] routing weights g (contiguous), part [n_tiles_N, P] fp32 row-dot partial sums
    store  "sorted" (row s), "pick" (row p = t*K + k) or "token" (row t)
    role   which GEMM of the routed ops this is (GEMM_ROLES): picks the mode (`gemm_mode`)
    swiglu the activation (gelu / gelu_bwd / rowdot 1) is SwiGLU instead of GELU
    """
    E = w.shape[0]
    if w_transposed:
        n_out, n_in = w.shape[1], w.shape[2]
        s_we, s_wk, s_wn = w.stride(0), w.stride(2), w.stride(1)
    else:
        n_in, n_out = w.shape[1], w.shape[2]
        s_we, s_wk, s_wn = w.stride(0), w.stride(1), w.stride(2)
    two_acc = swiglu and gelu  # the SwiGLU forward: gate and up accumulators, N_out = F of W's 2F columns
    if two_acc:
        if w_transposed or n_out % 2:
            raise ValueError(f"grouped_gemm: the SwiGLU forward takes w [E, N_in, 2F] (gate | up), got {list(w.shape)}")
        n_out //= 2
    interp = interpreting()
    cfg = gemm_config(a.dtype, n_in, n_out, interp, two_acc)
    cdt = acc_dtype(a.dtype)
    dummy = torch.empty(1, device=a.device, dtype=cdt)  # for pointers a variant does not use
    if ln is not None and u_ln is not None:
        raise ValueError("grouped_gemm: ln and u_ln are exclusive")
    mean, rstd, gamma, beta = ln_pointers(ln if ln is not None else u_ln, dummy)
    num_n = triton.cdiv(n_out, cfg["BLOCK_N"])
    store_mode = {"sorted": 0, "pick": 1, "token": 2}[store]
    bias_t = bias if bias is not None else dummy.view(1, 1)
    pre_t = pre if pre is not None else dummy.view(1, 1)
    u_t = u if u is not None else dummy.view(1, 1)
    g_t = weights if weights is not None else dummy
    part_t = part if part is not None else dummy
    epi = dict(HAS_BIAS=bias is not None, EPI_GELU=gelu, SAVE_PRE=save_pre, GELU_BWD=gelu_bwd,
               WEIGHTED=weights is not None, ROWDOT=rowdot, U_LN=u_ln is not None, STORE_MODE=store_mode,
               SWIGLU=swiglu, HAS_BETA=has_beta(ln if ln is not None else u_ln))
    P = plan.n_tokens * plan.top_k

    def launch(mode: str, slices: int, per_sm: int | None):
        """Run the GEMM one way: "fused" with its epilogue on `slices` column slices, "split" or "grouped_mm";
        the Triton GEMM on a grid of one program per tile, or per_sm programs per SM (None: MOM_KERNELS_PERSISTENT)."""
        a_ = a
        n_gemm = 2 * n_out if two_acc and mode != "fused" else n_out  # split / grouped_mm: gate | up products
        if mode == "grouped_mm":  # cuBLAS / CUTLASS grouped GEMM on A in sorted order, then the epilogue pass
            if a_gather or ln is not None:
                a_ = gather_rows(a, plan, gather=a_gather, mode=1 if ln is not None else 0, ln=ln)
            c = torch._grouped_mm(a_, w.transpose(1, 2) if w_transposed else w, offs=plan.offsets[1:])  # [P, N_gemm]
        else:
            if mode == "split":  # the Triton GEMM without epilogue into sorted fp32 rows, then the epilogue pass
                c = torch.empty(P, n_gemm, device=a.device, dtype=cdt)
                dst, dst_epi = c, dict(HAS_BIAS=False, EPI_GELU=False, SAVE_PRE=False, GELU_BWD=False,
                                       WEIGHTED=False, ROWDOT=0, U_LN=False, STORE_MODE=0, SWIGLU=False,
                                       HAS_BETA=False)
            else:
                dst, dst_epi = out, epi
            desc = weight_descriptor(w, cfg, n_in, w_transposed)
            a_desc = activation_descriptor(a, cfg, plan.block_m, a_gather, ln)
            _grouped_gemm_kernel[(gemm_programs(plan.n_tiles * triton.cdiv(n_gemm, cfg["BLOCK_N"]), a.device,
                                                per_sm),)](
                a, a_desc if a_desc is not None else a, w, desc if desc is not None else w, bias_t, dst, pre_t, g_t,
                part_t, u_t, mean, rstd, gamma, beta,
                plan.sorted_pick, plan.offsets, plan.tile_module, plan.tile_row_start,
                n_in, n_gemm, plan.top_k, E, P, plan.n_tiles,
                a.stride(0), a.stride(1), s_we, s_wk, s_wn, bias_t.stride(0), bias_t.stride(1),
                dst.stride(0), dst.stride(1), pre_t.stride(0), pre_t.stride(1), u_t.stride(0), u_t.stride(1),
                gamma.stride(0), gamma.stride(1),
                A_GATHER=a_gather, A_LN=ln is not None, **dst_epi,
                UPCAST=interp and a.dtype in (torch.float16, torch.bfloat16),
                IEEE=a.dtype in (torch.float32, torch.float64) or interp, RTNE=interp,
                EVEN_K=n_in % cfg["BLOCK_K"] == 0, A_TMA=a_desc is not None, W_TMA=desc is not None,
                W_T=desc is not None and w_transposed, EPI_SUBTILE=slices if mode == "fused" else 1,
                BLOCK_M=plan.block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            if mode == "fused":
                return
        block_m = 16 if interp else 64
        _rows_epilogue_kernel[(max(1, triton.cdiv(P, block_m)), num_n)](
            c, bias_t, out, pre_t, g_t, part_t, u_t, mean, rstd, gamma, beta, plan.sorted_pick, plan.offsets,
            n_out, plan.top_k, E, P, c.stride(0), c.stride(1), bias_t.stride(0), bias_t.stride(1),
            out.stride(0), out.stride(1), pre_t.stride(0), pre_t.stride(1), u_t.stride(0), u_t.stride(1),
            gamma.stride(0), gamma.stride(1), **epi, RTNE=interp, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"],
            num_warps=4 if interp else 8)

    choice = (gemm_mode(a.dtype, n_in, n_out, role), cfg["EPI_SUBTILE"], None)
    if autotune.enabled(a):  # MOM_KERNELS_AUTOTUNE=1: the fastest way for this role and shape, timed once
        s_ = cfg["EPI_SUBTILE"]
        cands = [("fused", s_, 0)] + [("fused", 1, 0)] * (s_ != 1) + [("fused", s_, 2), ("split", 1, 0)]
        if _grouped_mm_ok(a.dtype, n_in, n_out):
            cands.append(("grouped_mm", 1, 0))
        key = (role, tuple(epi.values()), a_gather, ln is not None, a.dtype, n_in, n_out, E, triton.next_power_of_2(P))
        choice = autotune.pick(key, cands, lambda c: launch(*c), a, default=cands[0])
    launch(*choice)
    return out


# the grouped GEMMs of the routed ops, by role (MOM_KERNELS_GEMM's per-role overrides name them)
GEMM_ROLES = ("ffn_up", "ffn_down", "ffn_down_dx", "ffn_up_dx", "linear", "linear_dx")
GEMM_MODES = ("fused", "split", "grouped_mm")
# default mode per role: "fused" everywhere until a GPU has timed the three modes per role and shape
# (benchmarks/bench_routed_ffn.py under each MOM_KERNELS_GEMM setting, or MOM_KERNELS_AUTOTUNE=1's table)
DEFAULT_GEMM_MODES = {role: "fused" for role in GEMM_ROLES}


def _mode_setting() -> dict:
    """MOM_KERNELS_GEMM parsed: "split" (every role) or "fused,ffn_down_dx=split,ffn_up=grouped_mm" (a mode for
    every role, then per-role overrides) -> {role: mode}. Read at each launch (tests and benchmarks switch it),
    parsed once per distinct value."""
    return _parse_modes(os.environ.get("MOM_KERNELS_GEMM", "").strip())


@functools.lru_cache(maxsize=16)
def _parse_modes(spec: str) -> dict:
    modes = dict(DEFAULT_GEMM_MODES)
    for item in filter(None, (x.strip() for x in spec.split(","))):
        role, _, mode = item.rpartition("=")
        role, mode = role.strip(), mode.strip()
        if mode not in GEMM_MODES or (role and role not in GEMM_ROLES):
            raise ValueError(f"MOM_KERNELS_GEMM must look like 'fused' or 'fused,ffn_up=grouped_mm' (modes "
                             f"{', '.join(GEMM_MODES)}; roles {', '.join(GEMM_ROLES)}), got {spec!r}")
        if role:
            modes[role] = mode
        else:
            modes = {r: mode for r in GEMM_ROLES}
    return modes


def gemm_mode(dtype: torch.dtype, n_in: int, n_out: int, role: str = "linear") -> str:
    """How `grouped_gemm` runs for a GEMM role (MOM_KERNELS_GEMM, per role; GEMM_ROLES): "fused" (default: the
    Triton GEMM with its epilogue in registers), "split" (the Triton GEMM writes fp32 products in sorted order,
    `_rows_epilogue_kernel` does the epilogue: fewer registers in the mainloop, one more pass over the
    products) or "grouped_mm" (torch._grouped_mm on A gathered in sorted order, then the same epilogue pass;
    where it cannot run - fp64, rows not a multiple of 16 bytes - the "split" path runs instead). Which is
    fastest per role and shape is for a GPU run to measure; until then DEFAULT_GEMM_MODES ("fused"), or, with
    MOM_KERNELS_AUTOTUNE=1 and no MOM_KERNELS_GEMM, the fastest as timed on the GPU at hand (`autotune`)."""
    if role not in GEMM_ROLES:
        raise ValueError(f"gemm_mode: role must be one of {GEMM_ROLES}, got {role!r}")
    mode = _mode_setting()[role]
    if mode == "grouped_mm" and not _grouped_mm_ok(dtype, n_in, n_out):
        return "split"
    return mode


def _grouped_mm_ok(dtype: torch.dtype, n_in: int, n_out: int) -> bool:
    """torch._grouped_mm exists, takes the dtype, and the rows are multiples of 16 bytes."""
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 0
    return (hasattr(torch, "_grouped_mm") and dtype in (torch.bfloat16, torch.float16, torch.float32)
            and (n_in * size) % 16 == 0 and (n_out * size) % 16 == 0)


def gemm_programs(n_work: int, device, per_sm: int | None = None) -> int:
    """Grid size of `_grouped_gemm_kernel` for n_work (row tile, N tile) pairs: one program each (default), or a
    persistent grid of at most MOM_KERNELS_PERSISTENT (or per_sm, when given; 0 = one per tile) programs per SM
    (e.g. 1 or 2) that walk the tiles in strides; the interpreter uses 4 programs then, to run the walk on a CPU.
    Persistence stays opt-in until a GPU run measures it against the one-program-per-tile grid (MOM_KERNELS_AUTOTUNE
    times both)."""
    if per_sm is None:
        env = os.environ.get("MOM_KERNELS_PERSISTENT", "").strip()
        try:
            n = int(env) if env else 0
        except ValueError:
            n = -1
        if n < 0 or (env and n < 1):
            raise ValueError(f"MOM_KERNELS_PERSISTENT must be an int >= 1 (programs per SM), got {env!r}")
    else:
        n = per_sm
    if n == 0:
        return max(1, n_work)
    if interpreting() or torch.device(device).type != "cuda":
        return max(1, min(n_work, 4))
    return max(1, min(n_work, n * _sm_count(torch.device(device))))


def rowdot_tiles(n_out: int, dtype: torch.dtype) -> int:
    """Number of N tiles of a grouped GEMM with output width n_out (rows of its `part` buffer)."""
    return triton.cdiv(n_out, gemm_config(dtype, 16, n_out, interpreting())["BLOCK_N"])

"""Weight and bias gradients of the grouped GEMMs: dW[m] = U_m^T dY_m and db[m] = sum dY_m over module m's rows.

Two paths for dW (`dw_backend`): torch._grouped_mm over U and dY written in module-sorted order by
`gathers.gather_rows` (CUDA sm_90+ bf16), or `_grouped_dw_kernel`, a segmented reduction over each module's
contiguous sorted rows (one program per output tile). db[m] by `_segment_sum_kernel`. No atomics:
deterministic. Measured on an H200 at 16384 x 1280 x 5120 (benchmarks/results/h200_2026-11-28/, equal work,
no db on either side): torch._grouped_mm 620 TFLOP/s, the Triton kernel 433 (140 when it also summed db in
its loop, which is why db has a kernel of its own).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .common import (_cast, _env_override, _gelu, _mma, _p2, _sigmoid, _swiglu_of, acc_dtype, has_beta, interpreting,
                     launch_sms, ln_pointers, segment_tiles)
from .gathers import gather_rows
from .routing import RoutingPlan


@triton.jit
def _grouped_dw_kernel(
    a_ptr, dy_ptr, g_ptr, dw_ptr,
    mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, sorted_pick_ptr, offsets_ptr,
    N_IN, N_OUT, TOP_K,
    stride_am, stride_ak, stride_dm, stride_dn, stride_we, stride_wk, stride_wn, stride_ge, stride_gk,
    A_GATHER: tl.constexpr, A_MODE: tl.constexpr,  # A_MODE 0: a, 1: norm_m(a), 2: gelu(a), 3: swiglu(a = gate | up)
    DY_GATHER: tl.constexpr, WEIGHTED: tl.constexpr, HAS_BETA: tl.constexpr,
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
        if HAS_BETA:
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
            u = (aT.to(cdt) - mu[None, :]) * rs[None, :] * ga[:, None]
            if HAS_BETA:
                u = u + be[:, None]
            aT = _cast(tl.where(mask_kr, u, 0.0), a_ptr.dtype.element_ty, RTNE)
        elif A_MODE == 2:
            aT = _cast(_gelu(aT.to(cdt)), a_ptr.dtype.element_ty, RTNE)
        elif A_MODE == 3:  # aT is the gate; the up half N_IN columns on
            upT = tl.load(a_ptr + (N_IN + offs_k)[:, None] * stride_ak + a_rows[None, :] * stride_am,
                          mask=mask_kr, other=0.0).to(cdt)
            gate = aT.to(cdt)
            aT = _cast(_swiglu_of(gate, upT, _sigmoid(gate)), a_ptr.dtype.element_ty, RTNE)
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


def dw_backend(dtype: torch.dtype, device: torch.device, n_in: int, n_out: int) -> str:
    """How `grouped_dw` computes dW: "grouped_mm" (the operands gathered into module-sorted order by
    `_gather_rows_kernel`, then torch._grouped_mm: on an H200, on sorted operands without db, 620 TFLOP/s
    against the Triton kernel's 433 on the same work) on CUDA sm_90+ in bf16 with 16-byte-aligned rows, else
    "triton" (`_grouped_dw_kernel`).
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

    a [T or P, N_in] (U = a, LN_m(a) with ln = (mean, rstd, gamma, beta or None) for a_mode 1, gelu(a) for
    a_mode 2, silu(gate) * up for a_mode 3 with a = [gate | up] [P, 2 N_in]), dy [T or P, N_out] (times g[p]
    when weights [P] given), dw [E, N_in, N_out] (allocated when None; the grouped_mm path returns its own
    tensor), db [E, N_out] or None. Path: `dw_backend`.
    """
    E = plan.n_modules
    n_in, n_out = a.shape[1] // (2 if a_mode == 3 else 1), dy.shape[1]
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
    mean, rstd, gamma, beta = ln_pointers(ln, dummy)
    grid = (E, triton.cdiv(n_in, cfg["BLOCK_K"]), triton.cdiv(n_out, cfg["BLOCK_N"]))
    _grouped_dw_kernel[grid](
        a, dy, weights if weights is not None else dummy, dw,
        mean, rstd, gamma, beta, plan.sorted_pick, plan.offsets,
        n_in, n_out, plan.top_k,
        a.stride(0), a.stride(1), dy.stride(0), dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        gamma.stride(0), gamma.stride(1),
        A_GATHER=a_gather, A_MODE=a_mode, DY_GATHER=dy_gather, WEIGHTED=weights is not None, HAS_BETA=has_beta(ln),
        UPCAST=interp and a.dtype in (torch.float16, torch.bfloat16),
        IEEE=a.dtype in (torch.float32, torch.float64) or interp, RTNE=interp,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dw, db


def segment_sum(dy, plan: RoutingPlan, out, *, gather: bool, weights=None, tiles=None):
    """out[m] = sum over module m's rows of (g_p *) dY[row] (`_segment_sum_kernel`); out [E, N]. tiles:
    (BLOCK_R, BLOCK_N), default common.segment_tiles for this device."""
    E, N = out.shape
    interp = interpreting()
    BLOCK_R, BLOCK_N = tiles or segment_tiles(E, N, launch_sms(dy), 64)
    acc = torch.empty(1, device=dy.device, dtype=acc_dtype(dy.dtype))  # only its dtype is used
    _segment_sum_kernel[(E, triton.cdiv(N, BLOCK_N))](
        dy, weights if weights is not None else acc, out, acc, plan.sorted_pick, plan.offsets,
        N, plan.top_k, dy.stride(0), dy.stride(1), out.stride(0), out.stride(1),
        GATHER=gather, WEIGHTED=weights is not None, RTNE=interp,
        BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, num_warps=4)
    return out

"""Reductions that finish a routed op's backward in one launch each.

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

from .grouped_gemm import _p2, acc_dtype, interpreting

__all__ = ["routing_weight_grad", "routing_weight_grad_reference"]


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

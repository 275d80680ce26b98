"""The GRU router's cell with its gate arithmetic in one Triton kernel forward and one backward.

    N tokens, D input width, r state width; gates in PyTorch's order (r, z, n), as nn.GRUCell stores them:
    gi = x @ W_ih^T + b_ih        [N, 3r]   (cuBLAS)
    gh = h @ W_hh^T + b_hh        [N, 3r]   (cuBLAS; just b_hh when h is None: a zero state needs no GEMM)
    r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z),  n = tanh(gi_n + r * gh_n)
    h' = (1 - z) * n + z * h                 `_gru_fwd_kernel`
Backward: `_gru_bwd_kernel` recomputes the gates from gi, gh and writes dG = [d gi | d gh] [N, 6r] and
d h (the part through z); then one column sum of dG gives both bias gradients, and cuBLAS the rest:
dW_ih = d gi^T x, dx = d gi W_ih, dW_hh = d gh^T h, d h += d gh W_hh.
Saved for backward: gi, gh (or nothing for a zero state), h. Same values and gradients as
torch.nn.GRUCell (the reference; tests/test_kernels_gru.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .grouped_gemm import _cast, _p2, _tanh, acc_dtype, interpreting

Tensor = torch.Tensor

__all__ = ["gru_cell", "gru_cell_reference"]


@triton.jit
def _sigmoid(u):
    return 1.0 / (1.0 + tl.exp(-u))


@triton.jit
def _gates(gi_ptr, gh_ptr, b_hh_ptr, rows, offs_r, mask, R, HAS_H: tl.constexpr, cdt: tl.constexpr):
    """Load the six gate pre-activations of rows x state columns; gh is b_hh when there is no state."""
    gi = gi_ptr + rows[:, None] * (3 * R) + offs_r[None, :]
    ir = tl.load(gi, mask=mask, other=0.0).to(cdt)
    iz = tl.load(gi + R, mask=mask, other=0.0).to(cdt)
    i_n = tl.load(gi + 2 * R, mask=mask, other=0.0).to(cdt)
    if HAS_H:
        gh = gh_ptr + rows[:, None] * (3 * R) + offs_r[None, :]
        hr = tl.load(gh, mask=mask, other=0.0).to(cdt)
        hz = tl.load(gh + R, mask=mask, other=0.0).to(cdt)
        hn = tl.load(gh + 2 * R, mask=mask, other=0.0).to(cdt)
    else:
        mr = offs_r < R
        hr = tl.load(b_hh_ptr + offs_r, mask=mr, other=0.0).to(cdt)[None, :]
        hz = tl.load(b_hh_ptr + R + offs_r, mask=mr, other=0.0).to(cdt)[None, :]
        hn = tl.load(b_hh_ptr + 2 * R + offs_r, mask=mr, other=0.0).to(cdt)[None, :]
    r = _sigmoid(ir + hr)
    z = _sigmoid(iz + hz)
    n = _tanh(i_n + r * hn)
    return r, z, n, hn


@triton.jit
def _gru_fwd_kernel(gi_ptr, gh_ptr, b_hh_ptr, h_ptr, out_ptr, acc_ptr, N, R,
                    HAS_H: tl.constexpr, RTNE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = (offs_n < N)[:, None] & (offs_r < R)[None, :]
    rows = offs_n.to(tl.int64)
    cdt = acc_ptr.dtype.element_ty
    r, z, n, hn = _gates(gi_ptr, gh_ptr, b_hh_ptr, rows, offs_r, mask, R, HAS_H, cdt)
    out = (1.0 - z) * n
    if HAS_H:
        out += z * tl.load(h_ptr + rows[:, None] * R + offs_r[None, :], mask=mask, other=0.0).to(cdt)
    tl.store(out_ptr + rows[:, None] * R + offs_r[None, :], _cast(out, out_ptr.dtype.element_ty, RTNE), mask=mask)


@triton.jit
def _gru_bwd_kernel(gi_ptr, gh_ptr, b_hh_ptr, h_ptr, dout_ptr, dg_ptr, dh_ptr, acc_ptr, N, R,
                    HAS_H: tl.constexpr, RTNE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """dG[:, 0:3r] = d gi, dG[:, 3r:6r] = d gh (r and z parts equal d gi's; n part d gi_n * r); with a state,
    dh = dout * z (the GEMM through W_hh is added afterwards)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = (offs_n < N)[:, None] & (offs_r < R)[None, :]
    rows = offs_n.to(tl.int64)
    cdt = acc_ptr.dtype.element_ty
    r, z, n, hn = _gates(gi_ptr, gh_ptr, b_hh_ptr, rows, offs_r, mask, R, HAS_H, cdt)
    st = rows[:, None] * R + offs_r[None, :]
    d = tl.load(dout_ptr + st, mask=mask, other=0.0).to(cdt)
    h = tl.zeros([BLOCK_N, BLOCK_R], dtype=cdt)
    if HAS_H:
        h = tl.load(h_ptr + st, mask=mask, other=0.0).to(cdt)
    dn = d * (1.0 - z) * (1.0 - n * n)          # d (gi_n + r gh_n)
    dr = dn * hn * r * (1.0 - r)                # d (gi_r + gh_r)
    dz = d * (h - n) * z * (1.0 - z)            # d (gi_z + gh_z)
    out = dg_ptr.dtype.element_ty
    g = dg_ptr + rows[:, None] * (6 * R) + offs_r[None, :]
    tl.store(g, _cast(dr, out, RTNE), mask=mask)
    tl.store(g + R, _cast(dz, out, RTNE), mask=mask)
    tl.store(g + 2 * R, _cast(dn, out, RTNE), mask=mask)
    tl.store(g + 3 * R, _cast(dr, out, RTNE), mask=mask)
    tl.store(g + 4 * R, _cast(dz, out, RTNE), mask=mask)
    tl.store(g + 5 * R, _cast(dn * r, out, RTNE), mask=mask)
    if HAS_H:
        tl.store(dh_ptr + st, _cast(d * z, dh_ptr.dtype.element_ty, RTNE), mask=mask)


def _grid_cfg(N, R):
    interp = interpreting()
    BLOCK_R = min(_p2(R), 16 if interp else 64)
    BLOCK_N = 16 if interp else 32
    return (triton.cdiv(N, BLOCK_N), triton.cdiv(R, BLOCK_R)), dict(BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
                                                                     RTNE=interp, num_warps=4)


class _GRUCell(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h, w_ih, w_hh, b_ih, b_hh):
        N, R = x.shape[0], w_hh.shape[1]
        gi = torch.addmm(b_ih, x, w_ih.t())                              # [N, 3r]
        gh = torch.addmm(b_hh, h, w_hh.t()) if h is not None else None  # [N, 3r]
        out = x.new_empty(N, R)
        acc = torch.empty(1, device=x.device, dtype=acc_dtype(x.dtype))
        if N:
            grid, cfg = _grid_cfg(N, R)
            _gru_fwd_kernel[grid](gi, gh if gh is not None else gi, b_hh, h if h is not None else gi, out, acc,
                                  N, R, HAS_H=h is not None, **cfg)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h, w_ih, w_hh, b_hh, gi, gh)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, h, w_ih, w_hh, b_hh, gi, gh = ctx.saved_tensors
        if dout is None:
            return (None,) * 6
        N, R = x.shape[0], w_hh.shape[1]
        has_h = h is not None
        dout = dout.contiguous()
        dG = x.new_empty(N, 6 * R)                                        # [d gi | d gh]
        dh = x.new_empty(N, R) if has_h else None
        acc = torch.empty(1, device=x.device, dtype=acc_dtype(x.dtype))
        if N:
            grid, cfg = _grid_cfg(N, R)
            _gru_bwd_kernel[grid](gi, gh if has_h else gi, b_hh, h if has_h else gi, dout, dG,
                                  dh if has_h else dG, acc, N, R, HAS_H=has_h, **cfg)
        dgi, dgh = dG[:, :3 * R], dG[:, 3 * R:]
        need = ctx.needs_input_grad
        dx = dgi @ w_ih if need[0] else None
        if has_h and need[1]:
            dh = torch.addmm(dh, dgh, w_hh)
        else:
            dh = None
        dw_ih = dgi.t() @ x if need[2] else None
        dw_hh = dgh.t() @ h if has_h and need[3] else None
        db = dG.sum(0) if need[4] or need[5] else None                    # [6r]: d b_ih | d b_hh
        return (dx, dh, dw_ih, dw_hh, db[:3 * R] if need[4] else None, db[3 * R:] if need[5] else None)


def gru_cell(x: Tensor, h: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """torch.nn.GRUCell's step (weights as the module stores them: w_ih [3r, D], w_hh [3r, r], b [3r]) with
    the gate arithmetic in one kernel each way; h None means a zero state (no GEMM against it).
    x [N, D], h [N, r] -> h' [N, r]."""
    if x.dim() != 2 or w_ih.dim() != 2 or x.shape[1] != w_ih.shape[1]:
        raise ValueError(f"gru_cell: x must be [N, D={w_ih.shape[-1]}], got {list(x.shape)}")
    R = w_hh.shape[1]
    if w_ih.shape[0] != 3 * R or w_hh.shape[0] != 3 * R or b_ih.shape != (3 * R,) or b_hh.shape != (3 * R,):
        raise ValueError(f"gru_cell: weights must be w_ih [3r, D], w_hh [3r, r], b_ih, b_hh [3r]; got "
                         f"{list(w_ih.shape)}, {list(w_hh.shape)}, {list(b_ih.shape)}, {list(b_hh.shape)}")
    if h is not None and tuple(h.shape) != (x.shape[0], R):
        raise ValueError(f"gru_cell: h must be [N={x.shape[0]}, r={R}] or None, got {list(h.shape)}")
    x = x.contiguous()
    h = h.contiguous() if h is not None else None
    return _GRUCell.apply(x, h, w_ih, w_hh, b_ih, b_hh)


def gru_cell_reference(x, h, w_ih, w_hh, b_ih, b_hh):
    """The same step in plain PyTorch (torch's own GRU cell; a zero state for h None)."""
    return torch._VF.gru_cell(x, h if h is not None else x.new_zeros(x.shape[0], w_hh.shape[1]),
                              w_ih, w_hh, b_ih, b_hh)

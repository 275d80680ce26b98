"""The GRU router: its cell and its head, with the gate arithmetic and the head in one Triton kernel forward
and one backward.

    N tokens, D input width, r state width, S router slots; gates in PyTorch's order (r, z, n), as
    nn.GRUCell stores them:
    gi = x @ W_ih^T + b_ih        [N, 3r]   (cuBLAS)
    gh = h @ W_hh^T + b_hh        [N, 3r]   (cuBLAS; just b_hh when h is None: a zero state needs no GEMM)
    r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z),  n = tanh(gi_n + r * gh_n)
    s = (1 - z) * n + z * h                  \\ `_gru_router_fwd_kernel`: a program holds BLOCK_N full state
    logits = s @ W_head^T + b_head  [N, S]   /  rows, so the head is a [BLOCK_N, r] x [r, S] dot in-kernel
Forward: 2 launches (3 with a state). The head reads s as stored (rounded to its dtype), as nn.Linear would.
Backward (`_gru_router_bwd_kernel`): ds = ds_out + dlogits @ W_head in-kernel, then the gates are recomputed
from gi, gh and the kernel writes dG = [d gi | d gh | dlogits] [N, 6r + S] and d h (the part through z);
one column sum of dG gives b_ih's, b_hh's and b_head's gradients, and cuBLAS the rest:
dW_head = dlogits^T s, dW_ih = d gi^T x, dx = d gi W_ih, dW_hh = d gh^T h, d h += d gh W_hh.
5 launches (7 with a state); gradients only for the inputs that need one.
Saved for backward: gi, gh (nothing for a zero state), h, s. `gru_cell` is the same kernels without the
head. Same values and gradients as torch's GRU cell then F.linear (the references; tests/test_kernels_gru.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import checks
from .common import _cast, _mma, _p2, _tanh, acc_dtype, interpreting

Tensor = torch.Tensor

__all__ = ["gru_router", "gru_router_reference", "gru_cell", "gru_cell_reference", "gru_fwd", "gru_bwd"]


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
def _gru_router_fwd_kernel(gi_ptr, gh_ptr, b_hh_ptr, h_ptr, w_ptr, b_ptr, s_ptr, logits_ptr, acc_ptr, N, R, S,
                           HAS_H: tl.constexpr, HAS_HEAD: tl.constexpr, UPCAST: tl.constexpr,
                           IEEE: tl.constexpr, RTNE: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """s = GRU(gates) for BLOCK_N full rows (BLOCK_R >= r); with HAS_HEAD, logits = s @ W_head^T + b_head."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n, mask_r = offs_n < N, offs_r < R
    mask = mask_n[:, None] & mask_r[None, :]
    rows = offs_n.to(tl.int64)
    cdt = acc_ptr.dtype.element_ty
    r, z, n, hn = _gates(gi_ptr, gh_ptr, b_hh_ptr, rows, offs_r, mask, R, HAS_H, cdt)
    s = (1.0 - z) * n
    if HAS_H:
        s += z * tl.load(h_ptr + rows[:, None] * R + offs_r[None, :], mask=mask, other=0.0).to(cdt)
    s = _cast(s, s_ptr.dtype.element_ty, RTNE)  # (0 outside the mask: zero gates give n = 0)
    tl.store(s_ptr + rows[:, None] * R + offs_r[None, :], s, mask=mask)
    if HAS_HEAD:
        offs_s = tl.arange(0, BLOCK_S)
        mask_s = offs_s < S
        w_t = tl.load(w_ptr + offs_s[None, :] * R + offs_r[:, None], mask=mask_r[:, None] & mask_s[None, :],
                      other=0.0)                                                       # [BLOCK_R, BLOCK_S]
        acc = tl.zeros([BLOCK_N, BLOCK_S], dtype=cdt)
        acc = _mma(s, w_t, acc, UPCAST, IEEE)
        acc += tl.load(b_ptr + offs_s, mask=mask_s, other=0.0).to(cdt)[None, :]
        tl.store(logits_ptr + rows[:, None] * S + offs_s[None, :], _cast(acc, logits_ptr.dtype.element_ty, RTNE),
                 mask=mask_n[:, None] & mask_s[None, :])


@triton.jit
def _gru_router_bwd_kernel(gi_ptr, gh_ptr, b_hh_ptr, h_ptr, w_ptr, ds_ptr, dl_ptr, dg_ptr, dh_ptr, acc_ptr,
                           N, R, S, LDG,
                           HAS_H: tl.constexpr, HAS_DS: tl.constexpr, HAS_DL: tl.constexpr,
                           UPCAST: tl.constexpr, IEEE: tl.constexpr, RTNE: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """d = ds (HAS_DS) + dlogits @ W_head (HAS_DL); dG [N, LDG]: [:, 0:3r] = d gi, [:, 3r:6r] = d gh (r and z
    parts equal d gi's; n part d gi_n * r), [:, 6r:6r+S] = dlogits (HAS_DL); with a state, dh = d * z (the
    GEMM through W_hh is added afterwards)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n, mask_r = offs_n < N, offs_r < R
    mask = mask_n[:, None] & mask_r[None, :]
    rows = offs_n.to(tl.int64)
    cdt = acc_ptr.dtype.element_ty
    out = dg_ptr.dtype.element_ty
    st = rows[:, None] * R + offs_r[None, :]
    if HAS_DS:
        d = tl.load(ds_ptr + st, mask=mask, other=0.0).to(cdt)
    else:
        d = tl.zeros([BLOCK_N, BLOCK_R], dtype=cdt)
    g = dg_ptr + rows[:, None] * LDG + offs_r[None, :]
    if HAS_DL:
        offs_s = tl.arange(0, BLOCK_S)
        mask_s = offs_s < S
        mask_ns = mask_n[:, None] & mask_s[None, :]
        dl = tl.load(dl_ptr + rows[:, None] * S + offs_s[None, :], mask=mask_ns, other=0.0)  # [BLOCK_N, BLOCK_S]
        w = tl.load(w_ptr + offs_s[:, None] * R + offs_r[None, :], mask=mask_s[:, None] & mask_r[None, :],
                    other=0.0)                                                         # [BLOCK_S, BLOCK_R]
        d = _mma(dl, w, d, UPCAST, IEEE)
        tl.store(dg_ptr + rows[:, None] * LDG + 6 * R + offs_s[None, :], dl.to(out), mask=mask_ns)
    r, z, n, hn = _gates(gi_ptr, gh_ptr, b_hh_ptr, rows, offs_r, mask, R, HAS_H, cdt)
    h = tl.zeros([BLOCK_N, BLOCK_R], dtype=cdt)
    if HAS_H:
        h = tl.load(h_ptr + st, mask=mask, other=0.0).to(cdt)
    dn = d * (1.0 - z) * (1.0 - n * n)          # d (gi_n + r gh_n)
    dr = dn * hn * r * (1.0 - r)                # d (gi_r + gh_r)
    dz = d * (h - n) * z * (1.0 - z)            # d (gi_z + gh_z)
    tl.store(g, _cast(dr, out, RTNE), mask=mask)
    tl.store(g + R, _cast(dz, out, RTNE), mask=mask)
    tl.store(g + 2 * R, _cast(dn, out, RTNE), mask=mask)
    tl.store(g + 3 * R, _cast(dr, out, RTNE), mask=mask)
    tl.store(g + 4 * R, _cast(dz, out, RTNE), mask=mask)
    tl.store(g + 5 * R, _cast(dn * r, out, RTNE), mask=mask)
    if HAS_H:
        tl.store(dh_ptr + st, _cast(d * z, dh_ptr.dtype.element_ty, RTNE), mask=mask)


def gru_config(N: int, R: int, S: int, dtype: torch.dtype, interpret: bool):
    """Grid and constexprs of both kernels: a program holds BLOCK_N full state rows (BLOCK_R = next power
    of 2 >= r, at least 16 for the dot) and all S slots (BLOCK_S >= 16); GPU: about 4096 state elements per
    program (BLOCK_N 16 at r = 256), 8 warps above 2048."""
    BLOCK_R, BLOCK_S = _p2(R), _p2(S)
    BLOCK_N = 16 if interpret else max(16, min(64, 4096 // BLOCK_R))
    lowp = dtype in (torch.float16, torch.bfloat16)
    cfg = dict(UPCAST=interpret and lowp, IEEE=not lowp or interpret, RTNE=interpret, BLOCK_N=BLOCK_N,
               BLOCK_R=BLOCK_R, BLOCK_S=BLOCK_S, num_warps=4 if BLOCK_N * BLOCK_R <= 2048 else 8)
    return (triton.cdiv(N, BLOCK_N),), cfg


def gru_fwd(x, h, w_ih, w_hh, b_ih, b_hh, w_head=None, b_head=None):
    """The forward launches: (s [N, r], logits [N, S] or None without a head, gi, gh or None)."""
    N, R = x.shape[0], w_hh.shape[1]
    gi = torch.addmm(b_ih, x, w_ih.t())                              # [N, 3r]
    gh = torch.addmm(b_hh, h, w_hh.t()) if h is not None else None  # [N, 3r]
    S = w_head.shape[0] if w_head is not None else 0
    s = x.new_empty(N, R)
    logits = x.new_empty(N, S) if w_head is not None else None
    if N:
        acc = torch.empty(1, device=x.device, dtype=acc_dtype(x.dtype))
        grid, cfg = gru_config(N, R, S, x.dtype, interpreting())
        _gru_router_fwd_kernel[grid](
            gi, gh if gh is not None else gi, b_hh, h if h is not None else gi,
            w_head if w_head is not None else gi, b_head if b_head is not None else gi,
            s, logits if logits is not None else s, acc, N, R, S,
            HAS_H=h is not None, HAS_HEAD=w_head is not None, **cfg)
    return s, logits, gi, gh


def gru_bwd(ds, dl, x, h, w_ih, w_hh, b_hh, w_head, gi, gh, s, need):
    """The backward launches: gradients of (x, h, w_ih, w_hh, b_ih, b_hh, w_head, b_head), None where
    need[i] is False or there is none. ds [N, r] / dl [N, S] (contiguous) may each be None."""
    if ds is None and dl is None:
        return (None,) * 8
    N, R = x.shape[0], w_hh.shape[1]
    has_h = h is not None
    S = dl.shape[1] if dl is not None else 0
    ldg = 6 * R + S
    dG = x.new_empty(N, ldg)                                          # [d gi | d gh | dlogits]
    dh = x.new_empty(N, R) if has_h else None
    if N:
        acc = torch.empty(1, device=x.device, dtype=acc_dtype(x.dtype))
        grid, cfg = gru_config(N, R, S, x.dtype, interpreting())
        _gru_router_bwd_kernel[grid](
            gi, gh if has_h else gi, b_hh, h if has_h else gi, w_head if dl is not None else gi,
            ds if ds is not None else gi, dl if dl is not None else gi, dG, dh if has_h else dG, acc,
            N, R, S, ldg, HAS_H=has_h, HAS_DS=ds is not None, HAS_DL=dl is not None, **cfg)
    dgi, dgh = dG[:, :3 * R], dG[:, 3 * R:6 * R]
    head = dl is not None
    dx = dgi @ w_ih if need[0] else None
    dh = torch.addmm(dh, dgh, w_hh) if has_h and need[1] else None
    dw_ih = dgi.t() @ x if need[2] else None
    dw_hh = dgh.t() @ h if has_h and need[3] else None
    db = dG.sum(0) if need[4] or need[5] or head and need[7] else None  # [6r + S]: b_ih | b_hh | b_head
    dw_head = dl.t() @ s if head and need[6] else None
    return (dx, dh, dw_ih, dw_hh, db[:3 * R] if need[4] else None, db[3 * R:6 * R] if need[5] else None,
            dw_head, db[6 * R:] if head and need[7] else None)


class _GRURouter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h, w_ih, w_hh, b_ih, b_hh, w_head, b_head):
        s, logits, gi, gh = gru_fwd(x, h, w_ih, w_hh, b_ih, b_hh, w_head, b_head)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h, w_ih, w_hh, b_hh, w_head, gi, gh, s if w_head is not None else None)
        return logits, s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dlogits, ds):
        x, h, w_ih, w_hh, b_hh, w_head, gi, gh, s = ctx.saved_tensors
        ds = ds.contiguous() if ds is not None else None
        dlogits = dlogits.contiguous() if dlogits is not None and w_head is not None else None
        return gru_bwd(ds, dlogits, x, h, w_ih, w_hh, b_hh, w_head, gi, gh, s, ctx.needs_input_grad)


def _check(name, x, h, w_ih, w_hh, b_ih, b_hh, w_head=None, b_head=None):
    if x.dim() != 2 or w_ih.dim() != 2 or x.shape[1] != w_ih.shape[1]:
        raise ValueError(f"{name}: x must be [N, D={w_ih.shape[-1]}], got {list(x.shape)}")
    R = w_hh.shape[1]
    if w_ih.shape[0] != 3 * R or w_hh.shape[0] != 3 * R or b_ih.shape != (3 * R,) or b_hh.shape != (3 * R,):
        raise ValueError(f"{name}: weights must be w_ih [3r, D], w_hh [3r, r], b_ih, b_hh [3r]; got "
                         f"{list(w_ih.shape)}, {list(w_hh.shape)}, {list(b_ih.shape)}, {list(b_hh.shape)}")
    if h is not None and tuple(h.shape) != (x.shape[0], R):
        raise ValueError(f"{name}: h must be [N={x.shape[0]}, r={R}] or None, got {list(h.shape)}")
    if w_head is not None and (w_head.dim() != 2 or w_head.shape[1] != R or b_head.shape != (w_head.shape[0],)):
        raise ValueError(f"{name}: head must be w_head [S, r={R}], b_head [S]; got {list(w_head.shape)}, "
                         f"{list(b_head.shape)}")
    for t in (h, w_ih, w_hh, b_ih, b_hh, w_head, b_head):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name}: every tensor must have x's dtype and device ({x.dtype}, {x.device})")


def gru_router(x: Tensor, h: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor,
               w_head: Tensor, b_head: Tensor) -> Tuple[Tensor, Tensor]:
    """The GRU router's step: s = GRUCell(x, h), logits = s @ w_head^T + b_head (weights as nn.GRUCell and
    nn.Linear store them: w_ih [3r, D], w_hh [3r, r], b_ih, b_hh [3r], w_head [S, r], b_head [S]); h None
    means a zero state. x [N, D], h [N, r] -> (logits [N, S], s [N, r]). Under torch.autocast every tensor
    is cast to the autocast dtype (differentiably) and both outputs come back in it."""
    x, h, w_ih, w_hh, b_ih, b_hh, w_head, b_head = checks.autocast_inputs(x, h, w_ih, w_hh, b_ih, b_hh,
                                                                          w_head, b_head)
    _check("gru_router", x, h, w_ih, w_hh, b_ih, b_hh, w_head, b_head)
    x = x.contiguous()
    h = h.contiguous() if h is not None else None
    with torch.autocast(x.device.type, enabled=False):
        return _GRURouter.apply(x, h, w_ih.contiguous(), w_hh.contiguous(), b_ih.contiguous(),
                                b_hh.contiguous(), w_head.contiguous(), b_head.contiguous())


def gru_cell(x: Tensor, h: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """torch.nn.GRUCell's step alone (the router's kernels without the head). x [N, D], h [N, r] -> h' [N, r]."""
    _check("gru_cell", x, h, w_ih, w_hh, b_ih, b_hh)
    x = x.contiguous()
    h = h.contiguous() if h is not None else None
    return _GRURouter.apply(x, h, w_ih.contiguous(), w_hh.contiguous(), b_ih.contiguous(), b_hh.contiguous(),
                            None, None)[1]


def gru_cell_reference(x, h, w_ih, w_hh, b_ih, b_hh):
    """The cell in plain PyTorch (torch's own GRU cell; a zero state for h None)."""
    return torch._VF.gru_cell(x, h if h is not None else x.new_zeros(x.shape[0], w_hh.shape[1]),
                              w_ih, w_hh, b_ih, b_hh)


def gru_router_reference(x, h, w_ih, w_hh, b_ih, b_hh, w_head, b_head):
    """The router's step in plain PyTorch: torch's GRU cell, then F.linear. -> (logits, s)."""
    s = gru_cell_reference(x, h, w_ih, w_hh, b_ih, b_hh)
    return torch.nn.functional.linear(s, w_head, b_head), s

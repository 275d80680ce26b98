"""Rotary positions for a routed step's QKV: the heads split out of the fused projection, q and k rotated, in one
launch (the Llama family; mom.blocks.qkv_heads is the plain PyTorch spec).

    qkv [B, T, (H + 2 Hkv) hd]  ->  q [B, H, T, hd], k, v [B, Hkv, T, hd]
    (each stored token-major, [B, T, heads, hd], and returned transposed: the layout of GPT-2's head views of
    qkv, so SDPA returns its output token-major and the heads merge without a copy)
    for head h < H + Hkv (q and k), halves x = (x1, x2) of hd / 2 each, c / s = cos / sin [b, t, :hd / 2]:
        y1 = x1 c - x2 s,   y2 = x2 c + x1 s           (transformers' x * cos + rotate_half(x) * sin)
    v is copied as it is.
Backward: the inverse rotation (s -> -s) from dq, dk, dv back into d qkv [B, T, W], one launch.

Why a kernel: the PyTorch form is a split, two chunk / neg / cat and four multiply-adds per tensor, about 12
launches forward and as many backward per routed step, where the step's budget has room for one more launch.
The rotation runs in fp32 (fp64 for fp64) and rounds once. cos / sin come as the model gathers them for the
tokens' positions (mom.blocks.Rotary): [B, T, hd] (left-padded batches, caches) or [T, hd] (shared by the batch).
Tests: tests/test_kernels_rotary.py.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .common import _cast, _check_device, _p2, acc_dtype, interpreting

Tensor = torch.Tensor


@triton.jit
def _rotary_kernel(qkv_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, acc_ptr,
                   N, T, N_HEAD, KV_HEADS, HALF, stride_qkv, stride_cb, stride_ct,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                   BACKWARD: tl.constexpr, RTNE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token block, head h): tokens n = b T + t of the block, head h's hd = 2 HALF columns. Forward:
    qkv [N, W] -> q / k / v [B, heads, T, hd] (any strides, unit stride along hd), rotated for
    h < N_HEAD + KV_HEADS; BACKWARD: the other way, the rotation inverted."""
    h = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] tokens n
    mask_t = offs < N
    b = offs // T
    t = offs % T
    d = tl.arange(0, BLOCK_D)                                   # [BD] columns of a half
    mask = mask_t[:, None] & (d < HALF)[None, :]
    hd = 2 * HALF
    b64 = b.to(tl.int64)
    t64 = t.to(tl.int64)
    if h < N_HEAD:                                              # (b, head, t)'s row of q, k or v
        hm = q_ptr + (b64 * stride_qb + h * stride_qh + t64 * stride_qt)[:, None]
    elif h < N_HEAD + KV_HEADS:
        hm = k_ptr + (b64 * stride_kb + (h - N_HEAD) * stride_kh + t64 * stride_kt)[:, None]
    else:
        hm = v_ptr + (b64 * stride_vb + (h - N_HEAD - KV_HEADS) * stride_vh + t64 * stride_vt)[:, None]
    tm = qkv_ptr + offs.to(tl.int64)[:, None] * stride_qkv + h * hd  # token-major row of (n, head)
    if BACKWARD:
        src = hm
        dst = tm
    else:
        src = tm
        dst = hm
    cdt = acc_ptr.dtype.element_ty
    x1 = tl.load(src + d[None, :], mask=mask, other=0.0).to(cdt)
    x2 = tl.load(src + HALF + d[None, :], mask=mask, other=0.0).to(cdt)
    if h < N_HEAD + KV_HEADS:
        row = b64[:, None] * stride_cb + t64[:, None] * stride_ct + d[None, :]
        c = tl.load(cos_ptr + row, mask=mask, other=0.0).to(cdt)
        s = tl.load(sin_ptr + row, mask=mask, other=0.0).to(cdt)
        if BACKWARD:
            s = -s
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
    else:
        y1 = x1
        y2 = x2
    tl.store(dst + d[None, :], _cast(y1, dst.dtype.element_ty, RTNE), mask=mask)
    tl.store(dst + HALF + d[None, :], _cast(y2, dst.dtype.element_ty, RTNE), mask=mask)


def _launch(qkv, q, k, v, cos, sin, backward: bool):
    B, T, W = qkv.shape
    H, Hkv, hd = q.shape[1], k.shape[1], q.shape[3]
    N = B * T
    if N == 0:
        return
    interp = interpreting()
    BLOCK_T = 16 if interp else 32
    stride_cb = cos.stride(0) if cos.dim() == 3 else 0
    acc = torch.empty(1, device=qkv.device, dtype=acc_dtype(qkv.dtype))  # names the compute dtype
    _rotary_kernel[(triton.cdiv(N, BLOCK_T), H + 2 * Hkv)](
        qkv, q, k, v, cos, sin, acc, N, T, H, Hkv, hd // 2, qkv.stride(1), stride_cb, cos.stride(-2),
        *(s for t_ in (q, k, v) for s in t_.stride()[:3]),
        BACKWARD=backward, RTNE=interp, BLOCK_T=BLOCK_T, BLOCK_D=_p2(hd // 2), num_warps=4)


def _heads(qkv, heads: int, hd: int):
    """[B, heads, T, hd] stored token-major ([B, T, heads, hd] memory), as a head view of qkv is."""
    B, T, _ = qkv.shape
    return qkv.new_empty(B, T, heads, hd).transpose(1, 2)


@torch.library.custom_op("mom_kernels::rotary_fwd", mutates_args=())
def _rotary_fwd(qkv: Tensor, cos: Tensor, sin: Tensor, n_head: int, kv_heads: int) -> Tuple[Tensor, Tensor, Tensor]:
    hd = qkv.shape[2] // (n_head + 2 * kv_heads)
    q, k, v = _heads(qkv, n_head, hd), _heads(qkv, kv_heads, hd), _heads(qkv, kv_heads, hd)
    _launch(qkv, q, k, v, cos, sin, backward=False)
    return q, k, v


@_rotary_fwd.register_fake
def _(qkv, cos, sin, n_head, kv_heads):
    hd = qkv.shape[2] // (n_head + 2 * kv_heads)
    return _heads(qkv, n_head, hd), _heads(qkv, kv_heads, hd), _heads(qkv, kv_heads, hd)


@torch.library.custom_op("mom_kernels::rotary_bwd", mutates_args=())
def _rotary_bwd(dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    B, H, T, hd = dq.shape
    dqkv = dq.new_empty(B, T, (H + 2 * dk.shape[1]) * hd)
    dq, dk, dv = (t if t.stride(-1) == 1 else t.contiguous() for t in (dq, dk, dv))  # (any other strides are read)
    _launch(dqkv, dq, dk, dv, cos, sin, backward=True)
    return dqkv


@_rotary_bwd.register_fake
def _(dq, dk, dv, cos, sin):
    B, H, T, hd = dq.shape
    return dq.new_empty(B, T, (H + 2 * dk.shape[1]) * hd)


def _setup(ctx, inputs, output):
    _, cos, sin, _, _ = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq, dk, dv):
    cos, sin = ctx.saved_tensors
    return torch.ops.mom_kernels.rotary_bwd(dq, dk, dv, cos, sin), None, None, None, None


_rotary_fwd.register_autograd(_backward, setup_context=_setup)


def qkv_heads(qkv, n_head: int, kv_heads: int, rope=None):
    """mom.blocks.qkv_heads with the rotation in one Triton launch: qkv [B, T, (n_head + 2 kv_heads) hd],
    rope = (cos, sin) [B, T, hd] or [T, hd] -> q [B, n_head, T, hd], k, v [B, kv_heads, T, hd] (token-major
    memory, as the head views of qkv; differentiable in qkv). Without rope (GPT-2): the head views of the plain
    split, no launch."""
    if rope is None:
        from mom.blocks import qkv_heads as split
        return split(qkv, n_head, kv_heads)
    _check_device(qkv)
    cos, sin = rope
    B, T, W = qkv.shape
    if W % (n_head + 2 * kv_heads) or (W // (n_head + 2 * kv_heads)) % 2:
        raise ValueError(f"qkv width {W} is not (n_head={n_head} + 2 * kv_heads={kv_heads}) x an even head size")
    hd = W // (n_head + 2 * kv_heads)
    if cos.shape[-2:] != (T, hd) or cos.dim() not in (2, 3) or (cos.dim() == 3 and cos.shape[0] not in (1, B)):
        raise ValueError(f"rope tables must be [B={B} or 1, T={T}, head_dim={hd}] or [T, head_dim], got "
                         f"{list(cos.shape)}")
    if cos.dim() == 3 and cos.shape[0] == 1 and B > 1:
        cos, sin = cos[0], sin[0]
    qkv = qkv if qkv.stride(-1) == 1 and qkv.stride(0) == T * qkv.stride(1) else qkv.contiguous()
    return _rotary_fwd(qkv, cos.contiguous(), sin.contiguous(), n_head, kv_heads)

"""Capacity (expert-choice) routing on the device: router logits -> picks, weights, the BCE aux loss and a uniform
routing plan, in one launch (training) with no host sync; its backward in one more.

Index legend: B sequences of T tokens, N = B T, E modules (one logit each, no SKIP slot), C = tokens each module
takes per sequence, R = B C rows per module, p = t E + m the pick of module m for token t (K = E picks per token).

    z        = logits / tau                                              [N, E]
    taken    training: token t is among the C largest logits[b, :, m] of its sequence b (ties: the earlier
             token; its rank = #{larger} + #{equal and earlier} < C); threshold rule: logit >= 0
    ids      = m where taken, E (SKIP) elsewhere                          [N, E]
    weights  = scale * sigmoid(z) where taken, 0 elsewhere                [N, E]
    probs    = sigmoid(z)                                                  [N, E]
    loss     = mean over the N E decisions of BCE(z, taken)   (training; the fp32 / fp64 partial sums of each
               (sequence, module) program are added in a fixed order: deterministic)
    plan     (training) uniform: module m owns sorted rows [m R, (m + 1) R), sequence b's C tokens of it at
             m R + b C + their order among the taken tokens (ascending t: the stable order of a sorted plan), so
             offsets and the tile schedule are fixed by (E, R, BLOCK_M) and cached; sorted_pick is written by
             the same kernel. The grouped GEMMs then run a static schedule: R rows for every module.
    backward d logits = (d weights * scale * s (1 - s) [taken] + d probs * s (1 - s) + d loss (s - taken) / (N E))
             / tau, one elementwise launch.

The rank takes T^2 / 2 comparisons per (sequence, module) program in BLOCK_I x BLOCK_J tiles (exact for every
dtype and for ties, where a sort of packed keys would not be in fp64): cheap next to the step's GEMMs at the
sequence lengths of training. The plain PyTorch spec is mom.capacity.route_capacity (+ routing.make_plan_torch);
tests/test_capacity.py checks this against it.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
import triton
import triton.language as tl

from .common import _p2, acc_dtype, interpreting
from .routing import RoutingPlan, _identity, default_block_m

Tensor = torch.Tensor

__all__ = ["capacity_route", "uniform_plan_tensors"]


@triton.jit
def _capacity_route_kernel(logits_ptr, ids_ptr, w_ptr, probs_ptr, pick_ptr, loss_ptr,
                           T, E, C, inv_tau, scale, loss_scale, stride_ln, stride_le,
                           TRAIN: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Program (sequence b, module m): walks the sequence's tokens in blocks of BLOCK_I, in order."""
    b = tl.program_id(0)
    m = tl.program_id(1)
    cdt = loss_ptr.dtype.element_ty
    base = b * T
    n_taken = tl.sum(tl.zeros([BLOCK_I], dtype=tl.int32), axis=0)  # taken tokens of earlier blocks (plan positions)
    loss = tl.zeros([BLOCK_I], dtype=cdt)
    for i0 in range(0, T, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < T
        rows_i = (base + offs_i).to(tl.int64)
        zi = tl.load(logits_ptr + rows_i * stride_ln + m * stride_le, mask=mask_i, other=0.0).to(cdt)
        if TRAIN:
            rank = tl.zeros([BLOCK_I], dtype=tl.int32)
            for j0 in range(0, T, BLOCK_J):
                offs_j = j0 + tl.arange(0, BLOCK_J)
                mask_j = offs_j < T
                zj = tl.load(logits_ptr + (base + offs_j).to(tl.int64) * stride_ln + m * stride_le, mask=mask_j,
                             other=0.0).to(cdt)
                before = (zj[None, :] > zi[:, None]) | ((zj[None, :] == zi[:, None]) &
                                                       (offs_j[None, :] < offs_i[:, None]))
                rank += tl.sum((before & mask_j[None, :]).to(tl.int32), axis=1)
            taken = mask_i & (rank < C)
            pos = n_taken + tl.cumsum(taken.to(tl.int32), axis=0) - 1           # order among the taken
            tl.store(pick_ptr + m * (tl.num_programs(0) * C) + b * C + pos, (rows_i * E + m).to(tl.int32),
                     mask=taken)
            n_taken += tl.sum(taken.to(tl.int32), axis=0)
        else:
            taken = mask_i & (zi >= 0)
        z = zi * inv_tau
        s = 1.0 / (1.0 + tl.exp(-z))
        tl.store(ids_ptr + rows_i * E + m, tl.where(taken, m, E).to(tl.int64), mask=mask_i)
        tl.store(w_ptr + rows_i * E + m, tl.where(taken, scale * s, 0.0).to(w_ptr.dtype.element_ty), mask=mask_i)
        tl.store(probs_ptr + rows_i * E + m, s.to(probs_ptr.dtype.element_ty), mask=mask_i)
        if TRAIN:  # BCE(z, taken) = max(z, 0) - z [taken] + log(1 + exp(-|z|))
            bce = tl.maximum(z, 0.0) - tl.where(taken, z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
            loss += tl.where(mask_i, bce, 0.0)
    if TRAIN:  # this program's part of the mean (loss_scale = 1 / (N E)): the loss is the parts' sum
        tl.store(loss_ptr + b * E + m, tl.sum(loss, axis=0) * loss_scale)


@triton.jit
def _capacity_route_bwd_kernel(logits_ptr, ids_ptr, dw_ptr, dprobs_ptr, dlogits_ptr, dloss_ptr, N, E, inv_tau, scale,
                               loss_scale, stride_ln, stride_le, stride_dn,
                               HAS_DW: tl.constexpr, HAS_DPROBS: tl.constexpr, HAS_DLOSS: tl.constexpr,
                               BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)            # flat (t, m) = t E + m
    mask = offs < N * E
    t = (offs // E).to(tl.int64)
    m = offs % E
    acc = dloss_ptr.dtype.element_ty                                 # fp32 (fp64 for fp64 logits)
    z = tl.load(logits_ptr + t * stride_ln + m * stride_le, mask=mask, other=0.0).to(acc) * inv_tau
    s = 1.0 / (1.0 + tl.exp(-z))
    taken = tl.load(ids_ptr + offs, mask=mask, other=E) == m
    ds = tl.zeros_like(z)
    if HAS_DW:
        ds += tl.where(taken, scale * tl.load(dw_ptr + offs, mask=mask, other=0.0).to(z.dtype), 0.0)
    if HAS_DPROBS:
        ds += tl.load(dprobs_ptr + offs, mask=mask, other=0.0).to(z.dtype)
    dz = ds * s * (1.0 - s)
    if HAS_DLOSS:
        dz += tl.load(dloss_ptr) * loss_scale * (s - taken.to(z.dtype))
    tl.store(dlogits_ptr + t * stride_dn + m, (dz * inv_tau).to(dlogits_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=64)
def _uniform_schedule(E: int, R: int, block_m: int, device: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(offsets [E+1], tile_module [n_tiles], tile_row_start [n_tiles]) of a plan where every module owns R rows:
    fixed by the sizes, made once per (E, R, BLOCK_M, device) and reused (no launch per step)."""
    per = max(1, triton.cdiv(R, block_m))
    i = torch.arange(E * per, dtype=torch.int32)
    offsets = torch.arange(E + 1, dtype=torch.int32) * R
    tile_module, tile_row_start = i // per, (i // per) * R + (i % per) * block_m
    if R == 0:
        tile_module = torch.full_like(i, E)
    return tuple(t.to(device) for t in (offsets, tile_module, tile_row_start))


def uniform_plan_tensors(E: int, R: int, block_m: int, device) -> Tuple[Tensor, Tensor, Tensor]:
    """The cached offsets and tile schedule of a uniform plan (module docstring)."""
    return _uniform_schedule(E, R, block_m, str(torch.device(device)))


def _launch(logits, seq_len: int, n_take: int, inv_tau: float, scale: float, train: bool):
    N, E = logits.shape
    B = N // seq_len
    ids = torch.empty(N, E, device=logits.device, dtype=torch.int64)
    weights = torch.empty(N, E, device=logits.device, dtype=logits.dtype)  # (contiguous, whatever logits' strides)
    probs = torch.empty(N, E, device=logits.device, dtype=logits.dtype)
    pick = torch.empty(N * E, device=logits.device, dtype=torch.int32)
    loss = torch.empty(B * E if train else 1, device=logits.device, dtype=acc_dtype(logits.dtype))
    if N:
        interp = interpreting()
        block_i = min(_p2(seq_len), 32 if interp else 64)
        _capacity_route_kernel[(B, E)](
            logits, ids, weights, probs, pick, loss, seq_len, E, n_take, float(inv_tau), float(scale), 1.0 / (N * E),
            logits.stride(0), logits.stride(1), TRAIN=train, BLOCK_I=block_i, BLOCK_J=block_i, num_warps=4)
    return ids, weights, probs, pick, loss


@torch.library.custom_op("mom_kernels::capacity_route", mutates_args=())
def _capacity_route_op(logits: Tensor, seq_len: int, n_take: int, temperature: float, scale: float,
                       train: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ids, weights, probs, pick, partial = _launch(logits, seq_len, n_take, 1.0 / temperature, scale, train)
    loss = partial.sum().to(logits.dtype) if train and logits.shape[0] else logits.new_zeros(())
    return ids, weights, probs, pick, loss


@_capacity_route_op.register_fake
def _(logits, seq_len, n_take, temperature, scale, train):
    N, E = logits.shape
    return (logits.new_empty(N, E, dtype=torch.int64), logits.new_empty(N, E), logits.new_empty(N, E),
            logits.new_empty(N * E, dtype=torch.int32), logits.new_empty(()))


def _launch_bwd(logits, ids, dweights, dprobs, dloss, inv_tau: float, scale: float, has_dw: bool, has_dprobs: bool,
                has_dloss: bool):
    """d logits [N, E] (contiguous) from the gradients of weights, probs ([N, E] contiguous) and loss ([1], the
    accumulation dtype); the flags say which are real (the others are stand-ins, never read)."""
    N, E = logits.shape
    dlogits = torch.empty(N, E, device=logits.device, dtype=logits.dtype)
    if N:
        BLOCK = 256 if interpreting() else 1024
        _capacity_route_bwd_kernel[(triton.cdiv(N * E, BLOCK),)](
            logits, ids, dweights, dprobs, dlogits, dloss, N, E, float(inv_tau), float(scale), 1.0 / (N * E),
            logits.stride(0), logits.stride(1), dlogits.stride(0), HAS_DW=has_dw, HAS_DPROBS=has_dprobs,
            HAS_DLOSS=has_dloss, BLOCK=BLOCK, num_warps=4)
    return dlogits


@torch.library.custom_op("mom_kernels::capacity_route_bwd", mutates_args=())
def _capacity_route_bwd_op(logits: Tensor, ids: Tensor, dweights: Tensor, dprobs: Tensor, dloss: Tensor,
                           temperature: float, scale: float, has_dw: bool, has_dprobs: bool,
                           has_dloss: bool) -> Tensor:
    return _launch_bwd(logits, ids, dweights, dprobs, dloss, 1.0 / temperature, scale, has_dw, has_dprobs, has_dloss)


@_capacity_route_bwd_op.register_fake
def _(logits, ids, dweights, dprobs, dloss, temperature, scale, has_dw, has_dprobs, has_dloss):
    return logits.new_empty(logits.shape)


def _setup(ctx, inputs, output):
    logits, _, _, temperature, scale, _ = inputs
    ctx.set_materialize_grads(False)  # outputs nothing used get no zero-filled gradient
    ctx.save_for_backward(logits, output[0])
    ctx.args = (temperature, scale)


def _backward(ctx, _dids, dweights, dprobs, _dpick, dloss):
    logits, ids = ctx.saved_tensors
    stand_in = logits  # for the gradients that are None (never read: the kernel's HAS_* flags are off)
    dl = dloss.to(acc_dtype(logits.dtype)).reshape(1) if dloss is not None else stand_in.new_empty(1, dtype=acc_dtype(
        logits.dtype))
    dlogits = torch.ops.mom_kernels.capacity_route_bwd(
        logits, ids, dweights.contiguous() if dweights is not None else stand_in,
        dprobs.contiguous() if dprobs is not None else stand_in, dl, *ctx.args, dweights is not None,
        dprobs is not None, dloss is not None)
    return dlogits, None, None, None, None, None


_capacity_route_op.register_autograd(_backward, setup_context=_setup)



def capacity_route(logits: Tensor, n_modules: int, seq_len: int, n_take: int, temperature: float = 1.0,
                   scale: float = 1.0, train: bool = True, block_m: int | None = None):
    """Expert-choice routing of router logits [N, E] (N = B * seq_len; E = n_modules, no SKIP slot): (ids [N, E],
    weights [N, E], probs [N, E], loss [], plan) per the module docstring; n_take = C tokens per module and sequence
    (training). plan: the uniform RoutingPlan (training), None for the threshold rule (its picks vary per module:
    build one with routing.make_plan). Differentiable in logits through weights, probs and loss."""
    if logits.dim() != 2 or logits.shape[1] != n_modules:
        raise ValueError(f"capacity_route: logits must be [N, n_modules={n_modules}], got {list(logits.shape)}")
    N, E = logits.shape
    if seq_len < 1 or N % seq_len:
        raise ValueError(f"capacity_route: {N} tokens are not sequences of seq_len={seq_len}")
    if train and not 1 <= n_take <= seq_len:
        raise ValueError(f"capacity_route: n_take={n_take} must be in [1, seq_len={seq_len}]")
    ids, weights, probs, pick, loss = _capacity_route_op(logits, seq_len, n_take, float(temperature), float(scale),
                                                         bool(train))
    if not train:
        return ids, weights, probs, loss, None
    block_m = int(block_m or default_block_m(logits.device))
    offsets, tile_module, tile_row_start = uniform_plan_tensors(E, (N // seq_len) * n_take, block_m, logits.device)
    plan = RoutingPlan(n_tokens=N, top_k=E, n_modules=E, block_m=block_m, sorted_pick=pick, offsets=offsets,
                       tile_module=tile_module, tile_row_start=tile_row_start,
                       source=None if torch.compiler.is_compiling() else _identity(ids))
    return ids, weights, probs, loss, plan

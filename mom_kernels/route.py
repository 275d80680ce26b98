"""Route + plan on the device in three launches: router logits -> picks, weights, routing plan, balance terms.

Index legend: T tokens, S router slots (slot s >= E means SKIP), E modules, K picks per token,
P = T*K picks, p = t*K + k, b a block of BLOCK_T tokens, nb = balanced slots (E, or S with SKIP).

    probs[t]   = softmax(logits[t] / tau)                                           [T, S]
    slots[t]   = the K largest logits of token t, largest first; ties: lower slot    [T, K]
                 (dense routing: every slot, in slot order)
    weights    = probs[t, slots] (/ their sum when renormalised; 1 forward with the straight-through
                 estimator, whose gradient is the soft weight's)                      [T, K]
    ids        = min(slots, E)                                                        [T, K]
    f[s]       = share of the T*K picks that chose slot s,  P[s] = mean_t probs[t, s]   [nb]
    balance    = nb * sum_s f[s] P[s]   (Switch Transformer's loss of this router call)
    plan       = `routing.RoutingPlan`: picks stably sorted by module, offsets, tile schedule

Launches (no host sync, no atomics; every sum runs in a fixed order, so reruns are bit-identical):
    1. `_route_kernel`, one program per token block: softmax, top-K, weights, ids, probs; per block,
       the picks of each slot (counts [nb_blocks, S]) and the sum of probs over its tokens.
    2. `_plan_scan_kernel`, one program: per-module totals -> offsets, each block's first row inside
       each module, the tile schedule; f, P and the balance loss from the block sums in block order.
    3. `_plan_scatter_kernel`, one program per token block: sorted_pick[offsets[m] + block base +
       rank of the pick among the block's picks of m] = p (a stable counting sort).
    backward: `_route_bwd_kernel`, one launch: d logits from d weights, d probs, d P and d balance.
`plan_from_ids` runs launches 1-3 on given ids (the plan of `routing.make_plan`); `route_picks` runs launch 1
alone (a decode step: no plan, no balance terms).

Non-finite logits: a token whose logits are not all finite is routed to SKIP on all K picks with NaN
weights (and NaN probs), so the plan stays valid and the loss turns NaN instead of silently training
on a wrong plan. `route` raises a ValueError naming `logits` instead when host checks are on (always for
CPU tensors; `checks.set_check_ids(True)` on CUDA, as it needs a host sync).
The plain PyTorch path is `route_reference` (the spec and test oracle). Tests: tests/test_kernels_route.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import checks
from .common import _p2, acc_dtype, interpreting
from .routing import RoutingPlan, _identity, default_block_m

Tensor = torch.Tensor

__all__ = ["route", "route_picks", "route_reference", "plan_from_ids", "Route"]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _route_kernel(
    logits_ptr, ids_ptr, slots_ptr, w_ptr, probs_ptr, cnt_ptr, psum_ptr,
    T, S, E, inv_tau, stride_lt, stride_ls,
    FROM_LOGITS: tl.constexpr,  # False: ids are given (plan only): count them per block
    K: tl.constexpr, DENSE: tl.constexpr, RENORM: tl.constexpr, STRAIGHT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Launch 1: for the tokens of block b, the picks and weights (FROM_LOGITS), and per block the picks of
    each slot cnt[b, s] (slot = module id when ids are given) and the probabilities' sum psum[b, s]."""
    b = tl.program_id(0)
    offs_t = b * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    offs_k = tl.arange(0, BLOCK_K)
    t64 = offs_t.to(tl.int64)
    if FROM_LOGITS:
        cdt = psum_ptr.dtype.element_ty
        mask = mask_t[:, None] & mask_s[None, :]
        z = tl.load(logits_ptr + t64[:, None] * stride_lt + offs_s[None, :] * stride_ls, mask=mask,
                    other=float("-inf")).to(cdt)  # [BT, BS]
        finite = tl.sum((tl.where(mask, z, 0.0) * 0.0 == 0.0).to(tl.int32), axis=1) == BLOCK_S  # no nan/inf
        zs = z * inv_tau
        mx = tl.where(mask_t, tl.max(zs, axis=1), 0.0)  # (rows past T: all -inf)
        ex = tl.where(mask, tl.exp(zs - mx[:, None]), 0.0)
        p = ex / tl.where(mask_t, tl.sum(ex, axis=1), 1.0)[:, None]  # [BT, BS]
        p = tl.where(finite[:, None], p, float("nan"))
        tl.store(probs_ptr + t64[:, None] * S + offs_s[None, :], p.to(probs_ptr.dtype.element_ty), mask=mask)
        tl.store(psum_ptr + b * S + offs_s, tl.sum(tl.where(mask, p, 0.0), axis=0), mask=mask_s)
        # top-K on the logits: K rounds of "largest remaining, lowest slot on ties"
        work = tl.where(mask_s[None, :], z, float("-inf"))
        slot_tk = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
        g_tk = tl.zeros([BLOCK_T, BLOCK_K], dtype=cdt)
        cnt = tl.zeros([BLOCK_S], dtype=tl.int32)
        for k in tl.static_range(K):
            if DENSE:
                slot = tl.zeros([BLOCK_T], dtype=tl.int32) + k
            else:
                best = tl.max(work, axis=1)
                slot = tl.min(tl.where(work == best[:, None], offs_s[None, :], BLOCK_S), axis=1)
                slot = tl.where(finite, slot, S - 1)  # any in-range slot; the id becomes SKIP below
                work = tl.where(offs_s[None, :] == slot[:, None], float("-inf"), work)
            hit = offs_s[None, :] == slot[:, None]  # [BT, BS]
            g = tl.sum(tl.where(hit, p, 0.0), axis=1)  # probs[t, slot]
            cnt += tl.sum((hit & (mask_t & finite)[:, None]).to(tl.int32), axis=0)
            slot_tk = tl.where(offs_k[None, :] == k, slot[:, None], slot_tk)
            g_tk = tl.where(offs_k[None, :] == k, g[:, None], g_tk)
        tl.store(cnt_ptr + b * S + offs_s, cnt, mask=mask_s)
        mask_tk = mask_t[:, None] & (offs_k < K)[None, :]
        w = g_tk
        if RENORM:
            w = g_tk / tl.where(mask_t, tl.sum(tl.where(mask_tk, g_tk, 0.0), axis=1), 1.0)[:, None]
        if STRAIGHT:
            w = tl.where(finite[:, None], 1.0, float("nan")) + w * 0.0
        ids = tl.where(finite[:, None] & (slot_tk < E), slot_tk, E)
        out = t64[:, None] * K + offs_k[None, :]
        tl.store(slots_ptr + out, slot_tk.to(slots_ptr.dtype.element_ty), mask=mask_tk)
        tl.store(ids_ptr + out, ids.to(ids_ptr.dtype.element_ty), mask=mask_tk)
        tl.store(w_ptr + out, w.to(w_ptr.dtype.element_ty), mask=mask_tk)
    else:
        mask_tk = mask_t[:, None] & (offs_k < K)[None, :]
        ids = tl.load(ids_ptr + t64[:, None] * K + offs_k[None, :], mask=mask_tk, other=-1)
        for e in range(0, E):
            n = tl.sum(tl.sum((ids == e).to(tl.int32), axis=1), axis=0)
            tl.store(cnt_ptr + b * S + e, n)


@triton.jit
def _plan_scan_kernel(
    cnt_ptr, psum_ptr, base_ptr, offsets_ptr, tile_module_ptr, tile_row_start_ptr,
    f_ptr, pm_ptr, loss_ptr,
    T, S, E, N_BLOCKS, N_TILES, N_BAL,
    BALANCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """Launch 2 (one program): module totals, offsets, block bases base[b, m] (rows of m in blocks < b),
    the tile schedule; with BALANCE, f, P and the balance loss over the first N_BAL slots."""
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    running = tl.zeros([BLOCK_E], dtype=tl.int32)
    for b in range(0, N_BLOCKS):
        c = tl.load(cnt_ptr + b * S + offs_e, mask=mask_e, other=0)
        tl.store(base_ptr + b * E + offs_e, running, mask=mask_e)
        running += c
    ends = tl.cumsum(running, axis=0)  # [BE] one past each module's rows
    starts = ends - running
    tl.store(offsets_ptr + offs_e, starts, mask=mask_e)
    tl.store(offsets_ptr + E, tl.sum(running, axis=0))
    # tile schedule: module e owns ceil(count / BLOCK_M) consecutive tiles, spare tiles get module E
    tiles = (running + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    tile_begin = tile_end - tiles
    for i0 in range(0, N_TILES, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        past = (tile_end[None, :] <= i[:, None]) & mask_e[None, :]  # [BI, BE]
        mod = tl.sum(past.to(tl.int32), axis=1)  # modules whose tiles all lie before tile i
        sel = offs_e[None, :] == tl.minimum(mod, E - 1)[:, None]
        row0 = tl.sum(tl.where(sel, starts[None, :], 0), axis=1)
        t0 = tl.sum(tl.where(sel, tile_begin[None, :], 0), axis=1)
        mask_i = i < N_TILES
        tl.store(tile_module_ptr + i, mod, mask=mask_i)
        tl.store(tile_row_start_ptr + i, row0 + (i - t0) * BLOCK_M, mask=mask_i)
    if BALANCE:
        offs_s = tl.arange(0, BLOCK_S)
        mask_s = offs_s < S
        cdt = psum_ptr.dtype.element_ty
        n_picks = tl.zeros([BLOCK_S], dtype=cdt)
        psum = tl.zeros([BLOCK_S], dtype=cdt)
        for b in range(0, N_BLOCKS):
            n_picks += tl.load(cnt_ptr + b * S + offs_s, mask=mask_s, other=0).to(cdt)
            psum += tl.load(psum_ptr + b * S + offs_s, mask=mask_s, other=0.0)
        k_total = tl.sum(n_picks, axis=0)  # T * K
        f = n_picks / k_total
        pm = psum / T
        bal = offs_s < N_BAL
        tl.store(f_ptr + offs_s, f.to(f_ptr.dtype.element_ty), mask=bal)
        tl.store(pm_ptr + offs_s, pm.to(pm_ptr.dtype.element_ty), mask=bal)
        loss = N_BAL * tl.sum(tl.where(bal, f * pm, 0.0), axis=0)
        tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))


@triton.jit
def _plan_scatter_kernel(
    ids_ptr, base_ptr, offsets_ptr, sorted_pick_ptr, T, E,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Launch 3: sorted_pick[offsets[m] + base[b, m] + r] = p for the picks p of block b, where r counts the
    block's earlier picks of module m (p order): a stable counting sort. SKIP and out-of-range ids go after
    offsets[E] in the same way (blocks before b hold b * BLOCK_T * K picks, sum_m base[b, m] of them
    routed), so sorted_pick is a permutation of 0..P-1."""
    b = tl.program_id(0)
    offs_t = b * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    mask = (offs_t < T)[:, None] & (offs_k < K)[None, :]
    pick = offs_t[:, None] * K + offs_k[None, :]  # [BT, BK]
    ids = tl.load(ids_ptr + pick.to(tl.int64), mask=mask, other=0)
    bucket = tl.where(mask, tl.where((ids >= 0) & (ids < E), ids, E), -1).to(tl.int32)  # -1: padding
    bucket = tl.reshape(bucket, [BLOCK_T * BLOCK_K])  # in p order
    pick = tl.reshape(pick, [BLOCK_T * BLOCK_K])
    offs_e = tl.arange(0, BLOCK_E)
    routed_before = tl.sum(tl.load(base_ptr + b * E + offs_e, mask=offs_e < E, other=0), axis=0)
    for e in range(0, E + 1):
        hit = (bucket == e).to(tl.int32)
        rank = tl.cumsum(hit, axis=0) - 1
        if e < E:
            first = tl.load(offsets_ptr + e) + tl.load(base_ptr + b * E + e)
        else:
            first = tl.load(offsets_ptr + E) + b * BLOCK_T * K - routed_before
        tl.store(sorted_pick_ptr + first + rank, pick, mask=hit != 0)


@triton.jit
def _route_bwd_kernel(
    logits_ptr, slots_ptr, dw_ptr, dprobs_ptr, dpm_ptr, dloss_ptr, f_ptr, dlogits_ptr, acc_ptr,
    T, S, N_BAL, inv_tau, stride_lt, stride_ls,
    K: tl.constexpr, DENSE: tl.constexpr, RENORM: tl.constexpr, CLAMP: tl.constexpr,
    HAS_DW: tl.constexpr, HAS_DPROBS: tl.constexpr, HAS_DPM: tl.constexpr, HAS_DLOSS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """d logits = p * (d probs - sum_s p d probs) / tau, with d probs gathered from d weights (through the
    renormalisation), d probs, d P / T and d balance * N_BAL * f / T; probs recomputed from the logits."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    mask = mask_t[:, None] & mask_s[None, :]
    t64 = offs_t.to(tl.int64)
    cdt = acc_ptr.dtype.element_ty  # fp32, or fp64 for fp64 logits
    z = tl.load(logits_ptr + t64[:, None] * stride_lt + offs_s[None, :] * stride_ls, mask=mask,
                other=float("-inf")).to(cdt)
    zs = z * inv_tau
    mx = tl.where(mask_t, tl.max(zs, axis=1), 0.0)
    ex = tl.where(mask, tl.exp(zs - mx[:, None]), 0.0)
    p = ex / tl.where(mask_t, tl.sum(ex, axis=1), 1.0)[:, None]
    dp = tl.zeros([BLOCK_T, BLOCK_S], dtype=cdt)
    if HAS_DPROBS:
        dp += tl.load(dprobs_ptr + t64[:, None] * S + offs_s[None, :], mask=mask, other=0.0).to(cdt)
    bal = offs_s < N_BAL
    if HAS_DPM:
        dp += (tl.load(dpm_ptr + offs_s, mask=bal, other=0.0).to(cdt) / T)[None, :]
    if HAS_DLOSS:
        fl = tl.load(f_ptr + offs_s, mask=bal, other=0.0).to(cdt)
        dp += (tl.load(dloss_ptr).to(cdt) * N_BAL * fl / T)[None, :]
    if HAS_DW:
        if RENORM:  # d g_j = (d w_j - sum_k d w_k w_k) / sum_k g_k
            gsum = tl.zeros([BLOCK_T], dtype=cdt)
            wdot = tl.zeros([BLOCK_T], dtype=cdt)
            for k in tl.static_range(K):
                slot = tl.load(slots_ptr + t64 * K + k, mask=mask_t, other=0)
                gsum += tl.sum(tl.where(offs_s[None, :] == slot[:, None], p, 0.0), axis=1)
            for k in tl.static_range(K):
                slot = tl.load(slots_ptr + t64 * K + k, mask=mask_t, other=0)
                g = tl.sum(tl.where(offs_s[None, :] == slot[:, None], p, 0.0), axis=1)
                dwk = tl.load(dw_ptr + t64 * K + k, mask=mask_t, other=0.0).to(cdt)
                if CLAMP:
                    dwk = tl.minimum(tl.maximum(dwk, -1.0), 1.0)
                wdot += dwk * (g / gsum)
        for k in tl.static_range(K):
            if DENSE:
                slot = tl.zeros([BLOCK_T], dtype=tl.int32) + k
            else:
                slot = tl.load(slots_ptr + t64 * K + k, mask=mask_t, other=0)
            dg = tl.load(dw_ptr + t64 * K + k, mask=mask_t, other=0.0).to(cdt)
            if CLAMP:  # the authors' straight-through estimator: its gradient clamped to [-1, 1]
                dg = tl.minimum(tl.maximum(dg, -1.0), 1.0)
            if RENORM:
                dg = (dg - wdot) / gsum
            dp += tl.where(offs_s[None, :] == slot[:, None], dg[:, None], 0.0)
    dz = p * (dp - tl.sum(tl.where(mask, p * dp, 0.0), axis=1)[:, None]) * inv_tau
    tl.store(dlogits_ptr + t64[:, None] * S + offs_s[None, :], dz.to(dlogits_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers (no autograd)
# ----------------------------------------------------------------------------------------------

def _block_t(n_cols: int) -> int:
    """Tokens per program of the per-token kernels: 16 under the interpreter (fast), else enough to keep
    about 4096 elements of a [BLOCK_T, slots] tile per program (64 for 32 slots)."""
    if interpreting():
        return 16
    return max(16, min(128, 4096 // n_cols))


def _scan_and_scatter(ids, cnt, psum, T, K, E, S, n_bal, block_m, BT, f=None, pm=None, loss=None):
    """Launches 2 and 3 (see the module docstring) for the per-block counts cnt [n_blocks, S] of launch 1 (blocks
    of BT tokens: the scatter must use the same blocks); returns the RoutingPlan."""
    dev = ids.device
    n_blocks = cnt.shape[0]
    n_tiles = triton.cdiv(T * K, block_m) + E
    base = torch.empty(n_blocks, E, device=dev, dtype=torch.int32)
    offsets = torch.empty(E + 1, device=dev, dtype=torch.int32)
    tile_module = torch.empty(n_tiles, device=dev, dtype=torch.int32)
    tile_row_start = torch.empty(n_tiles, device=dev, dtype=torch.int32)
    sorted_pick = torch.empty(T * K, device=dev, dtype=torch.int32)
    balance = f is not None
    BLOCK_I = 16 if interpreting() else 128
    _plan_scan_kernel[(1,)](
        cnt, psum, base, offsets, tile_module, tile_row_start,
        f if balance else psum, pm if balance else psum, loss if balance else psum,
        T, S, E, n_blocks, n_tiles, n_bal,
        BALANCE=balance, BLOCK_M=block_m, BLOCK_E=_p2(E, 16), BLOCK_S=_p2(S, 16), BLOCK_I=BLOCK_I, num_warps=4)
    if n_blocks:
        BK = max(2, triton.next_power_of_2(K))
        _plan_scatter_kernel[(n_blocks,)](
            ids, base, offsets, sorted_pick, T, E, K=K, BLOCK_T=BT, BLOCK_K=BK, BLOCK_E=_p2(E, 16), num_warps=4)
    return RoutingPlan(n_tokens=T, top_k=K, n_modules=E, block_m=block_m, sorted_pick=sorted_pick,
                       offsets=offsets, tile_module=tile_module,
                       tile_row_start=tile_row_start)


def plan_from_ids(ids: Tensor, n_modules: int, block_m: int) -> RoutingPlan:
    """The routing plan of given picks ids [T, K] (values 0..E-1 routed, anything else dropped like SKIP):
    launches 1 (per-block counts), 2 and 3. Deterministic, no host sync."""
    T, K = ids.shape
    E = int(n_modules)
    ids = ids.contiguous()
    BT = _block_t(_p2(E, 16))
    n_blocks = triton.cdiv(T, BT)
    cnt = torch.empty(n_blocks, E, device=ids.device, dtype=torch.int32)
    if n_blocks:
        dummy = torch.empty(1, device=ids.device, dtype=torch.float32)
        _route_kernel[(n_blocks,)](
            dummy, ids, ids, dummy, dummy, cnt, dummy, T, E, E, 1.0, 0, 0,
            FROM_LOGITS=False, K=K, DENSE=False, RENORM=False, STRAIGHT=False,
            BLOCK_T=BT, BLOCK_S=_p2(E, 16), BLOCK_K=max(2, triton.next_power_of_2(K)), num_warps=4)
    return _scan_and_scatter(ids, cnt, cnt, T, K, E, E, E, block_m, BT)


def _route_launch(logits: Tensor, n_modules: int, top_k: int, temperature: float, renormalize: bool,
                  straight_through: bool, dense: bool):
    """Launch 1 from logits [T, S]: (ids, weights, probs, slots) [T, K] / [T, S], the per-block counts cnt and
    probability sums psum [n_blocks, S] that launch 2 reduces, and the token block size BT."""
    T, S = logits.shape
    K = S if dense else int(top_k)
    dev, dt = logits.device, logits.dtype
    BS = _p2(S, 16)
    BT = _block_t(BS)
    n_blocks = triton.cdiv(T, BT)
    ids = torch.empty(T, K, device=dev, dtype=torch.int64)
    slots = torch.empty(T, K, device=dev, dtype=torch.int64)
    weights = torch.empty(T, K, device=dev, dtype=dt)
    probs = torch.empty(T, S, device=dev, dtype=dt)
    cnt = torch.empty(n_blocks, S, device=dev, dtype=torch.int32)
    psum = torch.empty(n_blocks, S, device=dev, dtype=acc_dtype(dt))
    if n_blocks:
        _route_kernel[(n_blocks,)](
            logits, ids, slots, weights, probs, cnt, psum, T, S, int(n_modules), 1.0 / float(temperature),
            logits.stride(0), logits.stride(1),
            FROM_LOGITS=True, K=K, DENSE=dense, RENORM=renormalize and not dense, STRAIGHT=straight_through,
            BLOCK_T=BT, BLOCK_S=BS, BLOCK_K=max(2, triton.next_power_of_2(K)), num_warps=4)
    return ids, weights, probs, slots, cnt, psum, BT


def route_fwd(logits: Tensor, n_modules: int, top_k: int, temperature: float, renormalize: bool,
              straight_through: bool, dense: bool, n_bal: int, block_m: int):
    """Launches 1-3 from logits [T, S]. Returns (ids, weights, probs, slots, f, P, balance, plan)."""
    T, S = logits.shape
    E = int(n_modules)
    dt, dev = logits.dtype, logits.device
    ids, weights, probs, slots, cnt, psum, BT = _route_launch(logits, E, top_k, temperature, renormalize,
                                                              straight_through, dense)
    f = torch.empty(n_bal, device=dev, dtype=dt)
    pm = torch.empty(n_bal, device=dev, dtype=dt)
    loss = torch.empty((), device=dev, dtype=dt)
    plan = _scan_and_scatter(ids, cnt, psum, T, ids.shape[1], E, S, n_bal, block_m, BT, f=f, pm=pm, loss=loss)
    return ids, weights, probs, slots, f, pm, loss, plan


def route_bwd(logits, slots, f, dweights, dprobs, dpm, dloss, temperature: float, renormalize: bool,
              dense: bool, clamp: bool = False):
    """d logits [T, S] of route_fwd's differentiable outputs (any gradient may be None)."""
    T, S = logits.shape
    K = slots.shape[1]
    cdt = acc_dtype(logits.dtype)
    dlogits = torch.empty(T, S, device=logits.device, dtype=logits.dtype)
    if T == 0:
        return dlogits
    acc = torch.empty(1, device=logits.device, dtype=cdt)
    BS = _p2(S, 16)
    BT = _block_t(BS)
    c = lambda t: t.contiguous() if t is not None else acc  # noqa: E731
    _route_bwd_kernel[(triton.cdiv(T, BT),)](
        logits, slots, c(dweights), c(dprobs), c(dpm), c(dloss), f, dlogits, acc,
        T, S, f.shape[0], 1.0 / float(temperature), logits.stride(0), logits.stride(1),
        K=K, DENSE=dense, RENORM=renormalize and not dense, CLAMP=clamp, HAS_DW=dweights is not None,
        HAS_DPROBS=dprobs is not None, HAS_DPM=dpm is not None, HAS_DLOSS=dloss is not None,
        BLOCK_T=BT, BLOCK_S=BS, num_warps=4)
    return dlogits


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (torch.compile traces through; autograd via register_autograd)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("mom_kernels::make_plan", mutates_args=())
def _make_plan_op(ids: Tensor, n_modules: int, block_m: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return plan_from_ids(ids, n_modules, block_m).tensors()


@_make_plan_op.register_fake
def _(ids, n_modules, block_m):
    T, K = ids.shape
    n_tiles = -(-T * K // block_m) + n_modules
    i32 = torch.int32
    return (ids.new_empty(T * K, dtype=i32), ids.new_empty(n_modules + 1, dtype=i32),
            ids.new_empty(n_tiles, dtype=i32), ids.new_empty(n_tiles, dtype=i32))


@torch.library.custom_op("mom_kernels::route", mutates_args=())
def _route_op(logits: Tensor, n_modules: int, top_k: int, temperature: float, renormalize: bool,
              straight_through: bool, dense: bool, n_bal: int, block_m: int, st_clamp: bool
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    ids, weights, probs, slots, f, pm, loss, plan = route_fwd(
        logits, n_modules, top_k, temperature, renormalize, straight_through, dense, n_bal, block_m)
    return (ids, weights, probs, slots, f, pm, loss, *plan.tensors())


@_route_op.register_fake
def _(logits, n_modules, top_k, temperature, renormalize, straight_through, dense, n_bal, block_m, st_clamp):
    T, S = logits.shape
    K = S if dense else top_k
    n_tiles = -(-T * K // block_m) + n_modules
    i64, i32 = torch.int64, torch.int32
    return (logits.new_empty(T, K, dtype=i64), logits.new_empty(T, K), logits.new_empty(T, S),
            logits.new_empty(T, K, dtype=i64), logits.new_empty(n_bal), logits.new_empty(n_bal),
            logits.new_empty(()), logits.new_empty(T * K, dtype=i32), logits.new_empty(n_modules + 1, dtype=i32),
            logits.new_empty(n_tiles, dtype=i32), logits.new_empty(n_tiles, dtype=i32))


@torch.library.custom_op("mom_kernels::route_bwd", mutates_args=())
def _route_bwd_op(logits: Tensor, slots: Tensor, f: Tensor, dweights: Optional[Tensor],
                  dprobs: Optional[Tensor], dpm: Optional[Tensor], dloss: Optional[Tensor], temperature: float,
                  renormalize: bool, dense: bool, clamp: bool) -> Tensor:
    return route_bwd(logits, slots, f, dweights, dprobs, dpm, dloss, temperature, renormalize, dense, clamp)


@_route_bwd_op.register_fake
def _(logits, slots, f, dweights, dprobs, dpm, dloss, temperature, renormalize, dense, clamp):
    return torch.empty_like(logits)


def _route_setup_context(ctx, inputs, output):
    logits, n_modules, top_k, temperature, renormalize, straight_through, dense, n_bal, block_m, st_clamp = inputs
    ctx.set_materialize_grads(False)  # outputs nobody used get None, not a zero-filled tensor
    ctx.args = (temperature, renormalize, dense, straight_through and st_clamp)
    ctx.save_for_backward(logits, output[3], output[4])  # logits, slots, f


def _route_backward(ctx, _dids, dweights, dprobs, _dslots, _df, dpm, dloss, *_plan):
    logits, slots, f = ctx.saved_tensors
    if dweights is None and dprobs is None and dpm is None and dloss is None:
        return (None,) * 10
    dlogits = torch.ops.mom_kernels.route_bwd(logits, slots, f, dweights, dprobs, dpm, dloss, *ctx.args)
    return (dlogits,) + (None,) * 9


_route_op.register_autograd(_route_backward, setup_context=_route_setup_context)


# ----------------------------------------------------------------------------------------------
# Functional
# ----------------------------------------------------------------------------------------------

@dataclass
class Route:
    """One router call's decision for T tokens, and what the routed ops and the balance loss need."""
    ids: Tensor       # [T, K] int64 module ids, E = SKIP
    weights: Tensor   # [T, K] routing weight of each pick (differentiable)
    probs: Tensor     # [T, S] softmax(logits / tau) (differentiable)
    slots: Tensor     # [T, K] int64 picked slots before SKIP slots are merged
    f: Tensor         # [nb] share of picks per balanced slot (no gradient)
    P: Tensor         # [nb] mean probability per balanced slot (differentiable)
    balance: Tensor   # [] nb * sum f * P (differentiable)
    plan: RoutingPlan


def _check_route_args(logits, n_modules, top_k, temperature, dense):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [T, S] (tokens, router slots), got {list(logits.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"logits must be fp16, bf16, fp32 or fp64, got {logits.dtype}")
    S = logits.shape[1]
    if not isinstance(n_modules, int) or n_modules < 1:
        raise ValueError(f"n_modules must be an int >= 1, got {n_modules!r}")
    if not dense and not (isinstance(top_k, int) and 1 <= top_k <= S):
        raise ValueError(f"top_k must be an int in 1..{S} (the router's slots, logits.shape[1]), got {top_k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if logits.numel() and not checks._compiling() and (logits.device.type == "cpu" or checks._CHECK_IDS):
        with checks.host_check():
            if not bool(torch.isfinite(logits).all()):
                raise ValueError("logits has non-finite values (nan or inf): the router's input or weights "
                                 "diverged; tokens with non-finite logits would be routed to SKIP with NaN weights")


def route(logits: Tensor, n_modules: int, top_k: int = 1, temperature: float = 1.0, renormalize: bool = True,
          straight_through: bool = False, dense: bool = False, balance_skip: bool = False,
          block_m: Optional[int] = None, straight_through_clamp: bool = False) -> Route:
    """Route T tokens by their router logits [T, S] over a pool of n_modules (slots >= n_modules are SKIP):
    picks, weights, probabilities, the balance terms and the routing plan, in three launches (see the module
    docstring). Differentiable in logits through weights, probs, P and balance. Same semantics as
    `route_reference`. straight_through_clamp: with straight_through, the weights' gradient is clamped to
    [-1, 1] (the authors' estimator)."""
    _check_route_args(logits, n_modules, top_k, temperature, dense)
    S = logits.shape[1]
    block_m = int(block_m or default_block_m(logits.device))
    n_bal = S if balance_skip else min(n_modules, S)
    out = torch.ops.mom_kernels.route(logits, n_modules, S if dense else top_k, float(temperature),
                                      bool(renormalize), bool(straight_through), bool(dense), n_bal, block_m,
                                      bool(straight_through_clamp))
    ids, weights, probs, slots, f, pm, loss, sorted_pick, offsets, tile_module, tile_row_start = out
    T, K = ids.shape
    plan = RoutingPlan(n_tokens=T, top_k=K, n_modules=n_modules, block_m=block_m, sorted_pick=sorted_pick,
                       offsets=offsets, tile_module=tile_module, tile_row_start=tile_row_start,
                       source=None if torch.compiler.is_compiling() else _identity(ids))
    return Route(ids, weights, probs, slots, f, pm, loss, plan)


def route_picks(logits: Tensor, n_modules: int, top_k: int = 1, temperature: float = 1.0, renormalize: bool = True,
                straight_through: bool = False, dense: bool = False):
    """Launch 1 alone, for a decode step: (ids [T, K], weights [T, K], probs [T, S], slots [T, K]) as `route`
    computes them, without the plan and the balance terms (launches 2 and 3: the few-token ops of
    mom_kernels.decode need no plan, a decode step no balance loss). Forward only: no autograd."""
    _check_route_args(logits, n_modules, top_k, temperature, dense)
    return _route_launch(logits, n_modules, top_k, temperature, renormalize, straight_through, dense)[:4]


def route_reference(logits: Tensor, n_modules: int, top_k: int = 1, temperature: float = 1.0,
                    renormalize: bool = True, straight_through: bool = False, dense: bool = False,
                    balance_skip: bool = False, block_m: Optional[int] = None,
                    straight_through_clamp: bool = False) -> Route:
    """`route` in plain PyTorch (the spec and the test oracle)."""
    from .routing import make_plan_torch

    T, S = logits.shape
    probs = torch.softmax(logits / temperature, dim=-1)  # [T, S]
    if dense:
        slots = torch.arange(S, device=logits.device).expand(T, S)
        weights = probs
    else:  # top-K on the logits, largest first, lower slot first on ties (a stable descending sort)
        slots = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_k]
        weights = probs.gather(1, slots)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    if straight_through:
        if straight_through_clamp and weights.requires_grad:  # the soft weights' gradient clamped to [-1, 1]
            weights.register_hook(lambda g: g.clamp(-1.0, 1.0))
        weights = weights - weights.detach() + 1.0
    ids = slots.clamp(max=n_modules)
    n_bal = S if balance_skip else min(n_modules, S)
    f = torch.bincount(slots.reshape(-1), minlength=S)[:n_bal].to(probs.dtype) / slots.numel()
    pm = probs.mean(0)[:n_bal]
    balance = n_bal * (f * pm).sum()
    plan = make_plan_torch(ids, n_modules, block_m=block_m)
    return Route(ids, weights, probs, slots, f, pm, balance, plan)

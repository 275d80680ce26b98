"""The segmented reductions over each module's rows against loops over the picks written here, for every tile
shape the launchers pick (interpreter and GPU tables), with empty modules, SKIP and odd widths:
ln_affine_bwd (d gamma, d beta of the per-module LayerNorms, mom_kernels/reductions.py) and segment_sum (the
bias gradients, mom_kernels/weight_grads.py); and the tile table (common.segment_tiles) keeps >= 4 programs per
SM where the width allows."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mom_kernels.common import segment_tiles  # noqa: E402
from mom_kernels.reductions import ln_affine_bwd  # noqa: E402
from mom_kernels.routing import make_plan  # noqa: E402
from mom_kernels.weight_grads import segment_sum  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def loop(dxh, x, ids, E, eps=1e-5):
    T, K = ids.shape
    mean = x.mean(1)
    rstd = 1 / torch.sqrt(x.var(1, unbiased=False) + eps)
    dg = torch.zeros(E, x.shape[1], dtype=x.dtype)
    db = torch.zeros_like(dg)
    for t in range(T):
        for k in range(K):
            m = int(ids[t, k])
            if m < E:
                dg[m] += dxh[t * K + k] * (x[t] - mean[t]) * rstd[t]
                db[m] += dxh[t * K + k]
    return dg, db, mean, rstd


@pytest.mark.parametrize("tiles", [None, (64, 32), (32, 128), (16, 64)])
@pytest.mark.parametrize("T,K,E,D", [(37, 2, 5, 40), (1, 1, 3, 96), (50, 3, 4, 33)])
def test_ln_affine_bwd_equals_the_pick_loop(tiles, T, K, E, D):
    g = torch.Generator().manual_seed(T * 100 + D)
    ids = torch.randint(0, E + 1, (T, K), generator=g)                     # id E = SKIP
    ids[:, 0] = torch.where(ids[:, 0] == E - 1, 0, ids[:, 0])              # module E - 1 mostly empty
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    dxh = torch.randn(T * K, D, generator=g, dtype=torch.float64)
    dg_want, db_want, mean, rstd = loop(dxh, x, ids, E)
    plan = make_plan(ids.to(DEVICE), E)
    dg = torch.empty(E, D, dtype=torch.float64, device=DEVICE)
    db = torch.empty_like(dg)
    ln_affine_bwd(dxh.to(DEVICE), x.to(DEVICE), mean.to(DEVICE), rstd.to(DEVICE), plan, dg, db, tiles=tiles)
    torch.testing.assert_close(dg.cpu(), dg_want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(db.cpu(), db_want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tiles", [None, (64, 32), (32, 128)])
@pytest.mark.parametrize("gather,weighted", [(True, False), (True, True), (False, True), (False, False)])
def test_segment_sum_equals_the_pick_loop(tiles, gather, weighted):
    g = torch.Generator().manual_seed(7)
    T, K, E, N = 29, 2, 5, 72
    ids = torch.randint(0, E + 1, (T, K), generator=g)
    ids[ids == 3] = E                                                      # module 3 empty
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    per_pick = torch.randn(T * K, N, generator=g, dtype=torch.float64)   # dY of each pick
    if gather:  # dY per token: every pick reads its token's row
        per_pick = torch.randn(T, N, generator=g, dtype=torch.float64).repeat_interleave(K, 0)
    want = torch.zeros(E, N, dtype=torch.float64)
    for p in range(T * K):
        m = int(ids.flatten()[p])
        if m < E:
            want[m] += (w.flatten()[p] if weighted else 1.0) * per_pick[p]
    plan = make_plan(ids.to(DEVICE), E)
    if gather:
        dy = per_pick[::K]                                                 # [T, N]
    else:                                                                  # [rows, N] in the plan's sorted order
        dy = per_pick[plan.sorted_pick.long().cpu()]
    out = torch.empty(E, N, dtype=torch.float64, device=DEVICE)
    segment_sum(dy.to(DEVICE), plan, out, gather=gather, weights=w.to(DEVICE) if weighted else None, tiles=tiles)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-10, atol=1e-10)


def test_tile_table_keeps_four_programs_per_sm():
    assert segment_tiles(16, 1280, 132, 32) == (64, 32)      # the H200 base point: 640 programs, not 160
    assert segment_tiles(64, 4096, 132, 32) == (32, 128)     # enough programs at the widest columns
    assert segment_tiles(16, 5120, 132, 64) == (64, 128)     # FFN up's bias: 640 programs already
    assert segment_tiles(8, 768, 132, 32)[1] == 32           # as narrow as it goes, then stop
    assert segment_tiles(4, 40, None, 32) == (16, 64)        # the interpreter's
    for E, D in ((16, 1280), (64, 4096), (2, 8192)):
        R, BD = segment_tiles(E, D, 132, 32)
        assert BD == 32 or E * -(-D // BD) >= 4 * 132

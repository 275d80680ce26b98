"""ln_affine_bwd (mom_kernels/reductions.py): d gamma, d beta of the per-module LayerNorms against a loop over
the picks written here, for every tile shape the launcher picks (interpreter and GPU tables), with empty
modules, SKIP and odd widths; the tile table keeps >= 4 programs per SM where the width allows."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mom_kernels.reductions import ln_affine_bwd, ln_affine_tiles  # noqa: E402
from mom_kernels.routing import make_plan  # noqa: E402

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


def test_tile_table_keeps_four_programs_per_sm():
    assert ln_affine_tiles(16, 1280, 132) == (64, 32)          # the H200 base point: 640 programs, not 160
    assert ln_affine_tiles(64, 4096, 132) == (32, 128)         # enough programs at the widest columns
    assert ln_affine_tiles(8, 768, 132)[1] == 32               # as narrow as it goes, then stop
    assert ln_affine_tiles(4, 40, None) == (16, 64)            # the interpreter's
    for E, D in ((16, 1280), (64, 4096), (2, 8192)):
        R, BD = ln_affine_tiles(E, D, 132)
        assert BD == 32 or E * -(-D // BD) >= 4 * 132

"""Routing plan (mom_kernels/routing.py): order, counts, offsets, tile schedule, SKIP, determinism."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mom_kernels.routing import make_plan  # noqa: E402
from mom_kernels.testing import make_ids  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check_plan(ids, E, block_m):
    plan = make_plan(ids, E, block_m=block_m)
    T, K = ids.shape
    flat = ids.reshape(-1).cpu().long()
    valid = (flat >= 0) & (flat < E)
    # stable order of the non-SKIP picks by module
    want = [p for e in range(E) for p in range(T * K) if flat[p] == e]
    S = len(want)
    sp = plan.sorted_pick.cpu().long()
    assert sp[:S].tolist() == want
    assert sorted(sp.tolist()) == list(range(T * K))  # a permutation
    counts = torch.bincount(flat[valid], minlength=E)
    assert plan.counts.cpu().long().tolist() == counts.tolist()
    assert plan.offsets.cpu().long().tolist() == [0] + torch.cumsum(counts, 0).tolist()
    # each non-SKIP sorted row is covered by exactly one real tile of its own module
    tm, ts = plan.tile_module.cpu().long(), plan.tile_row_start.cpu().long()
    assert plan.n_tiles == -(-T * K // block_m) + E
    cover = torch.zeros(T * K, dtype=torch.long)
    off = plan.offsets.cpu().long()
    for i in range(plan.n_tiles):
        m = int(tm[i])
        if m == E:
            continue
        assert 0 <= m < E
        lo, hi = int(ts[i]), min(int(ts[i]) + block_m, int(off[m + 1]))
        assert off[m] <= lo < off[m + 1]
        for s in range(lo, hi):
            assert int(flat[sp[s]]) == m
            cover[s] += 1
    assert cover[:S].tolist() == [1] * S and cover[S:].sum() == 0
    # spare tiles are at the end
    real = (tm < E).long()
    assert real.tolist() == sorted(real.tolist(), reverse=True)
    return plan


@pytest.mark.parametrize("T,K,E,skip,block_m", [
    (1, 1, 1, 0.0, 16), (37, 2, 3, 0.25, 16), (50, 3, 8, 0.3, 4), (20, 2, 5, 1.0, 16), (64, 1, 2, 0.0, 16),
])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_plan(T, K, E, skip, block_m, ids_dtype):
    ids = make_ids(T, K, E, skip, generator=torch.Generator().manual_seed(T), dtype=ids_dtype)
    _check_plan(ids.to(DEVICE), E, block_m)


def test_plan_empty_modules_and_deterministic():
    ids = make_ids(40, 2, 6, 0.2, generator=torch.Generator().manual_seed(1), empty=(0, 3, 5)).to(DEVICE)
    p1 = _check_plan(ids, 6, 8)
    p2 = make_plan(ids, 6, block_m=8)
    assert p1.counts.cpu().tolist()[0] == 0 and p1.counts.cpu().tolist()[3] == 0
    for a, b in zip(p1.tensors(), p2.tensors()):
        assert torch.equal(a, b)


def test_plan_out_of_range_ids_are_dropped():
    ids = torch.tensor([[0, -1], [7, 1], [2, 3]], device=DEVICE)  # E = 3: -1 and 7 invalid, 3 SKIP
    plan = make_plan(ids, 3, block_m=16)
    assert plan.offsets.cpu().tolist() == [0, 1, 2, 3]
    assert plan.sorted_pick.cpu().tolist()[:3] == [0, 3, 4]


def test_plan_bad_args():
    with pytest.raises(ValueError, match="ids must be"):
        make_plan(torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="int32 or int64"):
        make_plan(torch.zeros(3, 1), 2)

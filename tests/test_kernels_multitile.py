"""routed_ffn and routed_linear (mom_kernels) when modules hold several row tiles: outputs and EVERY gradient
(x, all parameters, routing weights) against mom_kernels.reference, fp64 tight, bf16 by the 2x rule.

    T tokens, K picks per token, E modules (id E = SKIP), D / F widths, BLOCK_M = the plan's tile height

The grouped GEMM walks a tile schedule (mom_kernels/routing.py): tile i covers sorted rows
[tile_row_start[i], min(tile_row_start[i] + BLOCK_M, offsets[m + 1])) of module m. With random picks and
small T every module fits one tile, so only loads built on purpose reach the second, third and partial last
tiles of a module: one module takes most rows (> 2 * BLOCK_M), one takes exactly two full tiles, an empty
module sits between full ones, and the last token picks only SKIP.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mom_kernels  # noqa: E402
from mom_kernels import reference  # noqa: E402
from mom_kernels.routing import default_block_m, make_plan  # noqa: E402
from mom_kernels.testing import assert_2x_rule, assert_close_verbose, ffn_inputs, linear_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False
BLOCK_M = default_block_m(torch.device(DEVICE))
T = 5 * BLOCK_M - 10  # 70 under the interpreter (BLOCK_M = 16)


def uneven_ids_k2(bm: int):
    """[T, 2] picks, E = 4 (sizes in units of the tile height bm; T = 70 and bm = 16 on the CPU give rows
    [53, 0, 26, 32]): module 0 has 3 full tiles and a partial one, module 1 none, module 2 one full tile
    and a partial one, module 3 exactly 2 full tiles; a few tokens pick only SKIP."""
    E, n0, n3 = 4, 3 * bm + bm // 4 + 1, 2 * bm                  # rows of module 0 and of module 3
    ids = torch.full((T, 2), E, dtype=torch.int64)
    for t in range(n0):                                           # module 0 at k = t % 2 (both columns)
        ids[t, t % 2] = 0
        ids[t, 1 - t % 2] = (2, 3, E)[t % 3]                      # the other pick: 2, 3 or SKIP
    have3 = sum(1 for t in range(n0) if t % 3 == 1)
    for t in range(n0, T - 2):                                    # module 3 up to n3 rows, 2 every other
        if have3 < n3:
            ids[t, 0] = 3
            have3 += 1
        ids[t, 1] = 2 if t % 2 == 0 else E
    ids[T - 2, 1] = 2
    assert have3 == n3
    return ids, E


def uneven_ids_k1(bm: int):
    """[T, 1] picks, E = 3: module 0 on most of the first tokens (every 7th is SKIP), module 1 none,
    module 2 the rest."""
    E, n0 = 3, 3 * bm + 2
    ids = torch.full((T, 1), E, dtype=torch.int64)
    for t in range(T):
        ids[t, 0] = (0 if t % 7 != 6 else E) if t < n0 + n0 // 6 else 2
    return ids, E


CASES = {"K2_E4": uneven_ids_k2, "K1_E3": uneven_ids_k1}


def load_of(ids, E):
    counts = torch.bincount(ids.reshape(-1), minlength=E + 1)[:E]
    return counts.tolist()


def check_load(ids, E):
    """The load is the one the test is about: multi-tile and partial tiles, an empty module."""
    counts = load_of(ids, E)
    assert max(counts) > 2 * BLOCK_M, counts
    assert 0 in counts[1:-1], counts                             # an empty module between others
    assert any(c % BLOCK_M for c in counts if c > BLOCK_M), counts  # a partial last tile after full ones
    plan = make_plan(ids.to(DEVICE), E)
    assert int((plan.tile_module == counts.index(max(counts))).sum()) >= 3  # that module owns >= 3 tiles
    return counts


def _grads(fn, args, leaves, dy):
    y = fn(*args)
    gs = torch.autograd.grad(y, leaves, dy.to(y.dtype), allow_unused=True, materialize_grads=True)
    return y.detach(), gs


def _ffn_run(fn, inputs, dy):
    x, lw, lb, w1, b1, w2, b2, ids, g = [t.detach().clone() for t in inputs]
    leaves = [x, lw, lb, w1, b1, w2, b2, g]
    for t in leaves:
        t.requires_grad_(True)
    return _grads(fn, (x, lw, lb, w1, b1, w2, b2, ids, g), leaves, dy)


FFN_NAMES = ["x", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2", "weights"]


def _compare(names, y, grads, hi, lo, dtype):
    """fp64: tight against the fp64 reference; bf16: 2x rule against the reference's own bf16 error."""
    (y_hi, g_hi), (y_rl, g_rl) = hi, (lo if lo is not None else (None, None))
    if dtype == torch.float64:
        assert_close_verbose("y", y, y_hi, 1e-10, 1e-10)
        for name, a, b in zip(names, grads, g_hi):
            assert a.dtype == dtype and a.shape == b.shape, name
            assert_close_verbose(f"d{name}", a, b, 4e-10, 4e-10)
    else:
        floor = 4e-3  # relative to the largest |value| (tests/test_kernels_routed_*.py)
        assert_2x_rule("y", y, y_rl, y_hi, floor * max(1.0, y_hi.abs().max().item()))
        for name, a, b_lo, b_hi in zip(names, grads, g_rl, g_hi):
            assert a.dtype == dtype, name
            assert_2x_rule(f"d{name}", a, b_lo, b_hi, floor * max(1.0, b_hi.abs().max().item()))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_routed_ffn_multitile(case, dtype):
    ids, E = CASES[case](BLOCK_M)
    counts = check_load(ids, E)
    K = ids.shape[1]
    hi = list(ffn_inputs(T, K, E, 24, 40, torch.float64, DEVICE, 0.0, seed=sum(counts)))
    hi[7] = ids.to(DEVICE)                                                  # the deliberate load
    dy = torch.randn(T, 24, dtype=torch.float64, device=DEVICE)
    lo = [t.to(dtype) if t.is_floating_point() else t for t in hi]
    ref_hi = _ffn_run(reference.routed_ffn, hi, dy)
    ref_lo = _ffn_run(reference.routed_ffn, lo, dy) if dtype != torch.float64 else None
    y, grads = _ffn_run(mom_kernels.routed_ffn, lo, dy)
    assert y.dtype == dtype
    _compare(FFN_NAMES, y, grads, ref_hi, ref_lo, dtype)
    # the SKIP-only token and the empty module: zero output / zero gradient
    skip_only = (ids == E).all(dim=1)
    if skip_only.any():
        assert (y[skip_only.to(DEVICE)] == 0).all()
    assert all((g[1] == 0).all() for g in grads[1:7])                       # module 1 got no rows


# routed_linear forms: (weights, LayerNorm, bias) as the model uses them
VARIANTS = {"qkv": (False, True, True), "proj": (True, False, True), "both": (True, True, True)}


def _linear_run(fn, inputs, dy, variant):
    use_g, use_ln, use_b = VARIANTS[variant]
    x, w, b, ids, g, lw, lb = [t.detach().clone() for t in inputs]
    b, g = (b if use_b else None), (g if use_g else None)
    lw, lb = (lw, lb) if use_ln else (None, None)
    leaves = [t for t in (x, w, b, g, lw, lb) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    return _grads(fn, (x, w, b, ids, g, lw, lb), leaves, dy)


def _linear_names(variant):
    use_g, use_ln, use_b = VARIANTS[variant]
    return ["x", "weight"] + (["bias"] if use_b else []) + (["weights"] if use_g else []) + (
        ["ln_weight", "ln_bias"] if use_ln else [])


LINEAR_CASES = [("K2_E4", "qkv"), ("K2_E4", "proj"), ("K1_E3", "both")]


@pytest.mark.parametrize("case,variant", LINEAR_CASES, ids=[f"{c}-{v}" for c, v in LINEAR_CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_routed_linear_multitile(case, variant, dtype):
    ids, E = CASES[case](BLOCK_M)
    counts = check_load(ids, E)
    K, n_in, n_out = ids.shape[1], 24, 40
    hi = list(linear_inputs(T, K, E, n_in, n_out, torch.float64, DEVICE, 0.0, seed=sum(counts) + 1))
    hi[3] = ids.to(DEVICE)
    dy = torch.randn(T, n_out, dtype=torch.float64, device=DEVICE)
    lo = [t.to(dtype) if t.is_floating_point() else t for t in hi]
    ref_hi = _linear_run(reference.routed_linear, hi, dy, variant)
    ref_lo = _linear_run(reference.routed_linear, lo, dy, variant) if dtype != torch.float64 else None
    y, grads = _linear_run(mom_kernels.routed_linear, lo, dy, variant)
    assert y.dtype == dtype
    _compare(_linear_names(variant), y, grads, ref_hi, ref_lo, dtype)


@pytest.mark.parametrize("env", ["MOM_KERNELS_LN=fused", "MOM_KERNELS_DW=grouped_mm"])
def test_multitile_other_paths(env, monkeypatch):
    """The LayerNorm fused into the GEMM's prologue (x gathered per tile) and the grouped_mm weight-gradient
    path, on the K = 2 load, fp64 (grouped_mm: bf16, its dtype on a GPU)."""
    key, val = env.split("=")
    monkeypatch.setenv(key, val)
    dtype = torch.bfloat16 if val == "grouped_mm" else torch.float64
    ids, E = CASES["K2_E4"](BLOCK_M)
    check_load(ids, E)
    hi = list(ffn_inputs(T, 2, E, 24, 40, torch.float64, DEVICE, 0.0, seed=5))
    hi[7] = ids.to(DEVICE)
    dy = torch.randn(T, 24, dtype=torch.float64, device=DEVICE)
    lo = [t.to(dtype) if t.is_floating_point() else t for t in hi]
    ref_lo = _ffn_run(reference.routed_ffn, lo, dy) if dtype != torch.float64 else None
    _compare(FFN_NAMES, *_ffn_run(mom_kernels.routed_ffn, lo, dy), _ffn_run(reference.routed_ffn, hi, dy),
             ref_lo, dtype)
    hi = list(linear_inputs(T, 2, E, 24, 40, torch.float64, DEVICE, 0.0, seed=6))
    hi[3] = ids.to(DEVICE)
    dy = torch.randn(T, 40, dtype=torch.float64, device=DEVICE)
    lo = [t.to(dtype) if t.is_floating_point() else t for t in hi]
    ref_lo = _linear_run(reference.routed_linear, lo, dy, "both") if dtype != torch.float64 else None
    _compare(_linear_names("both"), *_linear_run(mom_kernels.routed_linear, lo, dy, "both"),
             _linear_run(reference.routed_linear, hi, dy, "both"), ref_lo, dtype)

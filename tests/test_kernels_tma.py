"""The grouped GEMM's TMA paths (MOM_KERNELS_TMA=1, `gemm.weight_descriptor`, `gemm.activation_descriptor`): W
tiles, and A tiles whose rows are in sorted order, through tensor descriptors instead of pointers. In the
interpreter (no GPU here) the same kernel code runs: routed_ffn and routed_linear, outputs and every gradient,
against the pointer path (the forward bit for bit) and the fp64 reference (fp32 tight, bf16 by the 2x rule), with
reductions that split into whole tiles (TMA) and ones that do not (the pointer path), dX tiles whose rows run into
the next module (columns never stored), an empty module, K = 1 and 2, several tiles per module."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mom_kernels import gemm  # noqa: E402
from mom_kernels.routing import default_block_m  # noqa: E402
from mom_kernels.testing import assert_matches_reference, routed_case  # noqa: E402
from mom_kernels.testing import outputs_and_grads as _run  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T = 2 * default_block_m(torch.device(DEVICE)) + 5  # modules over several row tiles


def _case(op, K):
    # D 64 and F 96 split into whole 32-wide tiles (TMA everywhere); F 80 does not (FFN down forward and FFN up
    # dX take pointers) and its dX tiles of W2 [80, 64] run 16 rows into the next module; linear: 64 -> 80
    if op.startswith("ffn"):
        return routed_case("ffn", T, K, 4, 64, 96 if op == "ffn" else 80, seed=K, empty=(2,), device=DEVICE)
    return routed_case("linear", T, K, 4, 64, 80, seed=10 + K, empty=(2,), device=DEVICE)


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("op", ["ffn", "ffn_odd", "linear"])
def test_tma_path_equals_pointer_path_and_reference(op, K, monkeypatch):
    used, used_a = [], []
    real, real_a = gemm.weight_descriptor, gemm.activation_descriptor
    monkeypatch.setattr(gemm, "weight_descriptor", lambda *a: used.append(real(*a)) or used[-1])
    monkeypatch.setattr(gemm, "activation_descriptor", lambda *a: used_a.append(real_a(*a)) or used_a[-1])
    ts, fn, ref, grad_idx, N = _case(op, K)
    dy = torch.randn(T, N, dtype=torch.float64, device=DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        low = [t.to(dtype) if t.is_floating_point() else t for t in ts]
        monkeypatch.setenv("MOM_KERNELS_TMA", "0")
        ptr = _run(fn, low, grad_idx, dy.to(dtype))
        assert used and all(d is None for d in used) and all(d is None for d in used_a)
        used.clear()
        used_a.clear()
        monkeypatch.setenv("MOM_KERNELS_TMA", "1")
        got = _run(fn, low, grad_idx, dy.to(dtype))
        assert any(d is not None for d in used), "no GEMM took the TMA path"
        # sorted A rows (the FFN's h and dpre, the sorted LayerNorm rows) come by TMA; gathered ones never do
        assert any(d is not None for d in used_a), "no GEMM loaded A by TMA"
        assert any(d is None for d in used_a), "gathered A rows must stay pointer loads"
        used_a.clear()
        if op == "ffn_odd":
            assert any(d is None for d in used), "the reductions of 80 should take pointers"
        used.clear()
        assert torch.equal(got[0], ptr[0]), f"{op} {dtype}: the forward differs from the pointer path"
        if dtype == torch.float32:  # (the interpreter's numpy dot rounds a transposed tile differently: ~1e-6)
            for i, (a, b) in enumerate(zip(got, ptr)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{op} #{i} vs the pointer path")
        assert_matches_reference(f"{op} {dtype}", got, ref, low, grad_idx, dy)


def test_weight_descriptor_choice(monkeypatch):
    cfg = dict(BLOCK_N=32, BLOCK_K=32)
    w = torch.zeros(3, 64, 96, device=DEVICE)
    monkeypatch.delenv("MOM_KERNELS_TMA", raising=False)
    assert gemm.weight_descriptor(w, cfg, 64, False) is None                  # opt-in
    monkeypatch.setenv("MOM_KERNELS_TMA", "1")
    d = gemm.weight_descriptor(w, cfg, 64, False)
    assert d is not None and list(d.shape) == [192, 96] and list(d.block_shape) == [32, 32]
    assert list(gemm.weight_descriptor(w, cfg, 96, True).block_shape) == [32, 32]   # dX: [BLOCK_N, BLOCK_K]
    assert gemm.weight_descriptor(w, cfg, 48, False) is None                  # a tile would cross modules
    assert gemm.weight_descriptor(w.transpose(1, 2), cfg, 96, False) is None  # not contiguous
    monkeypatch.setenv("MOM_KERNELS_TMA", "yes")
    with pytest.raises(ValueError, match="MOM_KERNELS_TMA"):
        gemm.weight_descriptor(w, cfg, 64, False)


def test_activation_descriptor_choice(monkeypatch):
    cfg = dict(BLOCK_N=32, BLOCK_K=32)
    a = torch.zeros(40, 48, device=DEVICE)
    monkeypatch.delenv("MOM_KERNELS_TMA", raising=False)
    assert gemm.activation_descriptor(a, cfg, 16, False, None) is None        # opt-in
    monkeypatch.setenv("MOM_KERNELS_TMA", "1")
    d = gemm.activation_descriptor(a, cfg, 16, False, None)
    assert d is not None and list(d.shape) == [40, 48] and list(d.block_shape) == [16, 32]
    assert gemm.activation_descriptor(a, cfg, 16, True, None) is None         # rows gathered by token
    assert gemm.activation_descriptor(a, cfg, 16, False, (a, a, a, a)) is None  # LayerNorm prologue
    assert gemm.activation_descriptor(a[:, ::2], cfg, 16, False, None) is None  # column stride 2
    assert gemm.activation_descriptor(a[:, 1:], cfg, 16, False, None) is None   # base not 16-byte aligned
    assert gemm.activation_descriptor(torch.zeros(40, 47, device=DEVICE)[:, :45], cfg, 16, False, None) is None
    wide = torch.zeros(40, 64, device=DEVICE)[:, :40]                           # padded rows: 256-byte stride
    assert list(gemm.activation_descriptor(wide, cfg, 16, False, None).shape) == [40, 40]

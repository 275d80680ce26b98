"""The grouped GEMM's three modes (MOM_KERNELS_GEMM): "fused" (epilogue in the GEMM), "split" (the Triton GEMM,
then `_rows_epilogue_kernel`) and "grouped_mm" (torch._grouped_mm, then the same epilogue pass; "split" where
it cannot run): outputs and every gradient of routed_ffn and routed_linear (LayerNorm, weights, K = 1 and 2,
an empty module, several tiles per module) against the fp64 reference, fp32 tight and bf16 by the 2x rule."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mom_kernels.gemm import gemm_mode  # noqa: E402
from mom_kernels.routing import default_block_m  # noqa: E402
from mom_kernels.testing import assert_matches_reference, routed_case  # noqa: E402
from mom_kernels.testing import outputs_and_grads as _run  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T = 3 * default_block_m(torch.device(DEVICE)) + 5  # modules over several row tiles


def _case(op, K):  # FFN: D 32, F 48; linear: 32 -> 40
    return routed_case(op, T, K, 4, 32, 48 if op == "ffn" else 40, seed=K if op == "ffn" else 10 + K, empty=(2,),
                       device=DEVICE)


@pytest.mark.parametrize("mode", ["split", "grouped_mm"])
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("op", ["ffn", "linear"])
def test_gemm_modes_match_reference(op, K, mode, monkeypatch):
    monkeypatch.setenv("MOM_KERNELS_GEMM", mode)
    ts, fn, ref, grad_idx, N = _case(op, K)
    dy = torch.randn(T, N, dtype=torch.float64, device=DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        if DEVICE == "cuda" and mode == "grouped_mm" and dtype == torch.float32:
            continue  # torch._grouped_mm is bf16 only on CUDA
        low = [t.to(dtype) if t.is_floating_point() else t for t in ts]
        got = _run(fn, low, grad_idx, dy.to(dtype))
        assert_matches_reference(f"{op} {mode} {dtype}", got, ref, low, grad_idx, dy)


def test_gemm_mode_choice(monkeypatch):
    monkeypatch.setenv("MOM_KERNELS_GEMM", "grouped_mm")
    assert gemm_mode(torch.bfloat16, 64, 64) == "grouped_mm"
    assert gemm_mode(torch.float64, 64, 64) == "split"        # _grouped_mm has no fp64
    assert gemm_mode(torch.bfloat16, 20, 64) == "split"       # rows of 40 bytes: not 16-byte aligned
    monkeypatch.setenv("MOM_KERNELS_GEMM", "cublas")
    with pytest.raises(ValueError, match="MOM_KERNELS_GEMM"):
        gemm_mode(torch.bfloat16, 64, 64)
    monkeypatch.delenv("MOM_KERNELS_GEMM")
    assert gemm_mode(torch.bfloat16, 64, 64) == "fused"


def test_per_role_modes(monkeypatch):
    """MOM_KERNELS_GEMM="fused,ffn_down_dx=split": a mode for every role, then overrides; each GEMM of the routed
    FFN and linear asks for its own role, and gets what the setting says."""
    from mom_kernels import gemm

    monkeypatch.setenv("MOM_KERNELS_GEMM", "fused,ffn_down_dx=split,ffn_up=grouped_mm")
    assert gemm_mode(torch.bfloat16, 64, 64, "ffn_down_dx") == "split"
    assert gemm_mode(torch.bfloat16, 64, 64, "ffn_up") == "grouped_mm"
    assert gemm_mode(torch.bfloat16, 64, 64, "linear_dx") == "fused"
    for bad in ("fused,ffn_up=cublas", "fused,attn=split", "ffn_up=fast"):
        monkeypatch.setenv("MOM_KERNELS_GEMM", bad)
        with pytest.raises(ValueError, match="MOM_KERNELS_GEMM"):
            gemm_mode(torch.bfloat16, 64, 64, "ffn_up")
    with pytest.raises(ValueError, match="role"):
        gemm_mode(torch.bfloat16, 64, 64, "qkv")
    seen = []
    real = gemm.gemm_mode
    monkeypatch.setattr(gemm, "gemm_mode", lambda *a: seen.append((a[3], real(*a))) or seen[-1][1])
    monkeypatch.setenv("MOM_KERNELS_GEMM", "split,ffn_up=fused,linear=fused")
    for op in ("ffn", "linear"):
        ts, fn, _, grad_idx, N = _case(op, 2)
        _run(fn, [t.float() if t.is_floating_point() else t for t in ts], grad_idx,
             torch.randn(T, N, device=DEVICE))
    assert dict(seen) == {"ffn_up": "fused", "ffn_down": "split", "ffn_down_dx": "split", "ffn_up_dx": "split",
                          "linear": "fused", "linear_dx": "split"}

"""The grouped GEMM's sliced epilogue (`gemm_config`'s EPI_SUBTILE: the tile's epilogue on 1, 2 or 4 column slices
in turn, for fewer live registers): routed_ffn and routed_linear, outputs and every gradient, against the fp64
reference (fp32 tight, bf16 by the 2x rule) for each slice count, with an output width whose last N tile is
partly masked (48 = 32 + 16 and 40 = 32 + 8: slices past N_OUT store nothing), K = 1 and 2, an empty module and
modules over several row tiles; the forward equal bit for bit across slice counts (the epilogue is elementwise;
only the routing weight's row dot adds in another order); and the config's checks and clamps."""
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
T = 2 * default_block_m(torch.device(DEVICE)) + 3  # modules over several row tiles


def _case(op, K):  # FFN: D 32, F 48; linear: 32 -> 40
    return routed_case(op, T, K, 4, 32, 48 if op == "ffn" else 40, seed=(20 if op == "ffn" else 30) + K, empty=(1,),
                       device=DEVICE)


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("op", ["ffn", "linear"])
def test_sliced_epilogue_matches_reference(op, K, monkeypatch):
    seen = []
    real = gemm.gemm_config
    monkeypatch.setattr(gemm, "gemm_config", lambda *a: seen.append(real(*a)) or seen[-1])
    ts, fn, ref, grad_idx, N = _case(op, K)
    dy = torch.randn(T, N, dtype=torch.float64, device=DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        low = [t.to(dtype) if t.is_floating_point() else t for t in ts]
        runs = {}
        for slices in (1, 2, 4):
            monkeypatch.setenv("MOM_KERNELS_GEMM_CONFIG", f"EPI_SUBTILE={slices}")
            seen.clear()
            runs[slices] = got = _run(fn, low, grad_idx, dy.to(dtype))
            if DEVICE == "cpu":  # (the interpreter's config: BLOCK_N 32, so every slice count is taken as asked)
                assert {c["EPI_SUBTILE"] for c in seen} == {slices}
            assert_matches_reference(f"{op} K={K} {dtype} slices={slices}", got, ref, low, grad_idx, dy)
        for slices in (2, 4):
            assert torch.equal(runs[slices][0], runs[1][0]), f"{op} {dtype}: forward differs with {slices} slices"


def test_sliced_epilogue_config(monkeypatch):
    monkeypatch.delenv("MOM_KERNELS_GEMM_CONFIG", raising=False)
    assert gemm.gemm_config(torch.bfloat16, 768, 3072, False)["EPI_SUBTILE"] == 4
    assert gemm.gemm_config(torch.bfloat16, 768, 32, False)["EPI_SUBTILE"] == 2   # slices of >= 16 columns
    assert gemm.gemm_config(torch.bfloat16, 768, 16, False)["EPI_SUBTILE"] == 1
    assert gemm.gemm_config(torch.float32, 768, 3072, False)["EPI_SUBTILE"] == 1
    assert gemm.gemm_config(torch.float32, 768, 4, True)["EPI_SUBTILE"] == 4      # interpreter: BLOCK_N 16
    monkeypatch.setenv("MOM_KERNELS_GEMM_CONFIG", "EPI_SUBTILE=3")
    with pytest.raises(ValueError, match="EPI_SUBTILE"):
        gemm.gemm_config(torch.bfloat16, 768, 3072, False)

"""The grouped GEMM's persistent grid (MOM_KERNELS_PERSISTENT: fewer programs than tiles, each walking tiles
in strides) gives bit-identical outputs and gradients to one program per tile, on modules of several tiles."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mom_kernels as mk  # noqa: E402
from mom_kernels.gemm import gemm_programs  # noqa: E402
from mom_kernels.routing import default_block_m  # noqa: E402
from mom_kernels.testing import ffn_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _ffn_run(ts):
    leaves = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in ts]
    y = mk.routed_ffn(*leaves)
    grads = torch.autograd.grad(y, [t for t in leaves if t.is_floating_point()], torch.ones_like(y))
    return [y, *grads]


def test_persistent_grid_is_bit_identical(monkeypatch):
    T = 5 * default_block_m(torch.device(DEVICE)) - 3  # modules of several tiles, partial last tiles
    ts = ffn_inputs(T, 2, 3, 24, 40, skip_frac=0.1, seed=5, device=DEVICE)
    monkeypatch.delenv("MOM_KERNELS_PERSISTENT", raising=False)
    one_per_tile = _ffn_run(ts)
    monkeypatch.setenv("MOM_KERNELS_PERSISTENT", "1")
    assert gemm_programs(1000, DEVICE) < 1000
    persistent = _ffn_run(ts)
    for a, b in zip(one_per_tile, persistent):
        assert torch.equal(a, b)


def test_persistent_env_checked(monkeypatch):
    monkeypatch.setenv("MOM_KERNELS_PERSISTENT", "0")
    with pytest.raises(ValueError, match="MOM_KERNELS_PERSISTENT"):
        gemm_programs(10, DEVICE)

"""ln_gather (mom_kernels/gathers.py): LN_m(x[t]) in module-sorted order and the token statistics, against the
plain PyTorch reference; fp64, fp32 with a large mean (the shifted one-pass variance), bf16; odd widths."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mom_kernels.gathers import ln_gather, ln_gather_reference  # noqa: E402
from mom_kernels.routing import make_plan  # noqa: E402
from mom_kernels.testing import make_ids  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype,offset,tol", [(torch.float64, 0.0, 1e-12), (torch.float32, 300.0, 2e-4),
                                              (torch.bfloat16, 0.0, 2e-2)])
@pytest.mark.parametrize("T,K,E,N", [(37, 2, 3, 50), (1, 1, 1, 8), (40, 3, 5, 96)])
def test_ln_gather_matches_reference(T, K, E, N, dtype, offset, tol):
    ids = make_ids(T, K, E, 0.3, generator=torch.Generator().manual_seed(T)).to(DEVICE)
    plan = make_plan(ids, E)
    x = (torch.randn(T, N, dtype=torch.float64) * 2 + offset).to(device=DEVICE, dtype=dtype)
    gamma = (1 + 0.2 * torch.randn(E, N, dtype=torch.float64)).to(device=DEVICE, dtype=dtype)
    beta = (0.2 * torch.randn(E, N, dtype=torch.float64)).to(device=DEVICE, dtype=dtype)
    out, mean, rstd = ln_gather(x, plan, gamma, beta, 1e-5)
    ref, rmean, rrstd = ln_gather_reference(x, plan, gamma, beta, 1e-5)
    S = ref.shape[0]
    torch.testing.assert_close(out[:S].double(), ref.double(), rtol=tol, atol=tol)
    routed = torch.zeros(T, dtype=torch.bool, device=DEVICE)
    routed[(plan.sorted_pick[:S].long() // K)] = True  # statistics are written for routed tokens
    stat_tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean[routed], rmean[routed], **stat_tol)
    torch.testing.assert_close(rstd[routed], rrstd[routed], **stat_tol)
    again = ln_gather(x, plan, gamma, beta, 1e-5)
    assert torch.equal(out[:S], again[0][:S]) and torch.equal(mean[routed], again[1][routed])

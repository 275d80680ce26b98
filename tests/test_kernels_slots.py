"""Per-pick slots in the 16-bit input dtype (the default) and in fp32 (MOM_KERNELS_SLOTS=fp32): both within the
2x rule of the fp64 reference, outputs and every gradient, for routed_ffn and routed_linear with K = 2."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mom_kernels as mk  # noqa: E402
from mom_kernels import reference  # noqa: E402
from mom_kernels.common import slot_dtype  # noqa: E402
from mom_kernels.testing import assert_2x_rule, ffn_inputs, linear_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(fn, ts, dy, grad_idx):
    leaves = [t.detach().clone().requires_grad_() if i in grad_idx else t for i, t in enumerate(ts)]
    y = fn(*leaves)
    return [y] + list(torch.autograd.grad(y, [leaves[i] for i in grad_idx], dy))


@pytest.mark.parametrize("slots", ["input", "fp32"])
@pytest.mark.parametrize("op", ["ffn", "linear"])
def test_slots_16bit_and_fp32(op, slots, monkeypatch):
    monkeypatch.setenv("MOM_KERNELS_SLOTS", slots)
    assert slot_dtype(torch.bfloat16) == (torch.bfloat16 if slots == "input" else torch.float32)
    if op == "ffn":
        ts = list(ffn_inputs(45, 2, 3, 32, 48, seed=7, device=DEVICE))  # x, lw, lb, w1, b1, w2, b2, ids, g
        fn, ref, grad_idx, N = mk.routed_ffn, reference.routed_ffn, [0, 1, 2, 3, 4, 5, 6, 8], 32
    else:
        x, w, b, ids, g, lw, lb = linear_inputs(45, 2, 3, 32, 40, seed=8, device=DEVICE)
        ts = [x, w, b, ids, g, lw, lb]
        fn, ref, grad_idx, N = mk.routed_linear, reference.routed_linear, [0, 1, 2, 4, 5, 6], 40
    dy = torch.randn(45, N, dtype=torch.float64, device=DEVICE)
    low = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in ts]
    got = _run(fn, low, dy.to(torch.bfloat16), grad_idx)
    ref_low = _run(ref, low, dy.to(torch.bfloat16), grad_idx)
    ref_hi = _run(ref, [t.double() if t.is_floating_point() else t for t in low], dy, grad_idx)
    for i, (a, b, c) in enumerate(zip(got, ref_low, ref_hi)):
        assert_2x_rule(f"{op} output/grad {i}", a, b, c, 2e-2)


def test_slots_env_checked(monkeypatch):
    monkeypatch.setenv("MOM_KERNELS_SLOTS", "fp8")
    with pytest.raises(ValueError, match="MOM_KERNELS_SLOTS"):
        slot_dtype(torch.bfloat16)

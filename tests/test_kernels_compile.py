"""torch.compile(fullgraph=True) traces through the custom ops (mom_kernels::routed_ffn_fwd / _bwd,
routed_linear_fwd / _bwd) and the routing plan, forward and backward, with no graph break."""
import os
import shutil

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mom_kernels as mk  # noqa: E402
from mom_kernels.testing import assert_close_verbose, ffn_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
E = 3


def _step(x, lw, lb, w1, b1, w2, b2, ids, g):
    """A routed step's shape: one plan shared by a routed FFN and a routed linear layer."""
    plan = mk.make_plan(ids, E)
    h = x + mk.routed_ffn(x, lw, lb, w1, b1, w2, b2, ids, g, plan=plan)
    return mk.routed_linear(h, w2.transpose(1, 2), None, ids, g, lw, lb, plan=plan)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_fwd_bwd(backend):
    if backend == "inductor" and DEVICE == "cpu" and not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("inductor on CPU needs a C compiler")
    torch._dynamo.reset()
    inputs = ffn_inputs(13, 2, E, 20, 36, torch.float32, DEVICE, 0.2, seed=1)
    leaves = [t.requires_grad_(True) for i, t in enumerate(inputs) if i != 7]
    compiled = torch.compile(_step, fullgraph=True, backend=backend)
    y = compiled(*inputs)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    y_e = _step(*inputs)
    grads_e = torch.autograd.grad(y_e, leaves, dy)
    assert_close_verbose("y", y, y_e, 1e-5, 1e-5)
    for a, b in zip(grads, grads_e):
        assert_close_verbose("grad", a, b, 1e-5, 1e-5)


def test_custom_ops_registered():
    for name in ("routed_ffn_fwd", "routed_ffn_bwd", "routed_linear_fwd", "routed_linear_bwd", "rotary_fwd",
                 "rotary_bwd"):
        assert hasattr(torch.ops.mom_kernels, name)
    # the fake (meta) kernels give shapes without running anything
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 8)
        w = torch.empty(2, 8, 12)
        ids = torch.zeros(5, 2, dtype=torch.long)
        plan = mk.make_plan(ids, 2, block_m=16)
        y, mean, rstd = torch.ops.mom_kernels.routed_linear_fwd(
            x, w, None, ids, None, None, None, 1e-5, *plan.tensors(), plan.block_m, None, False, False)
        assert y.shape == (5, 12) and mean.shape == (0,)
        q, k, v = torch.ops.mom_kernels.rotary_fwd(torch.empty(2, 3, 32), torch.empty(3, 4), torch.empty(3, 4), 4, 2)
        assert q.shape == (2, 4, 3, 4) and k.shape == v.shape == (2, 2, 3, 4)

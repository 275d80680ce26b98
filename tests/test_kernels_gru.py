"""GRU router (mom_kernels/gru.py) against torch's GRU cell then F.linear: the logits, the new state and every
gradient (x, h, the cell's four tensors, the head's two), with and without a state, with a gradient for the
logits only, the state only or both; fp64 / fp32 tight and bf16 by the 2x rule; odd sizes, N = 1,
non-contiguous x; reruns; its launch counts; GRURouter's fused path against nn.GRUCell + nn.Linear. The cell
alone (`gru_cell`, same kernels without the head) likewise."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mom_kernels.gru import gru_cell, gru_cell_reference, gru_router, gru_router_reference  # noqa: E402
from mom_kernels.launches import count_launches  # noqa: E402
from mom_kernels.testing import assert_2x_rule  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(N, D, R, has_h, dtype):
    g = torch.Generator().manual_seed(N * 1000 + D * 10 + R)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    ts = [r(N, D), r(N, R) if has_h else None, r(3 * R, D, scale=D ** -0.5), r(3 * R, R, scale=R ** -0.5),
          r(3 * R, scale=0.3), r(3 * R, scale=0.3)]
    return [t.to(device=DEVICE, dtype=dtype) if t is not None else None for t in ts]


def _run(fn, ts, dout):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in ts]
    out = fn(*leaves)
    out.backward(dout)
    grads = [(l.grad if l.grad is not None else torch.zeros_like(l)) if l is not None else None for l in leaves]
    return out, grads


@pytest.mark.parametrize("has_h", [False, True])
@pytest.mark.parametrize("N,D,R", [(37, 24, 16), (1, 8, 5), (50, 33, 12)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gru_cell_matches_torch(N, D, R, has_h, dtype):
    ts = _inputs(N, D, R, has_h, dtype)
    dout = torch.randn(N, R, dtype=dtype, device=DEVICE)
    out, grads = _run(gru_cell, ts, dout)
    ref, ref_grads = _run(gru_cell_reference, ts, dout)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    for name, a, b in zip(("x", "h", "w_ih", "w_hh", "b_ih", "b_hh"), grads, ref_grads):
        if b is None:
            continue
        if name == "w_hh" and not has_h:  # a zero state: W_hh gets no gradient (torch's is exactly 0)
            assert b.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, **tol, msg=name)


@pytest.mark.parametrize("has_h", [False, True])
def test_gru_cell_bf16_2x_rule(has_h):
    ts64 = _inputs(40, 32, 16, has_h, torch.float64)
    ts16 = [t.to(torch.bfloat16) if t is not None else None for t in ts64]
    dout = torch.randn(40, 16, dtype=torch.float64, device=DEVICE)
    out, grads = _run(gru_cell, ts16, dout.to(torch.bfloat16))
    low, low_grads = _run(gru_cell_reference, ts16, dout.to(torch.bfloat16))
    hi, hi_grads = _run(gru_cell_reference, [t.double() if t is not None else None for t in ts16], dout)
    assert_2x_rule("h'", out, low, hi, 1e-2)
    for name, a, b, c in zip(("x", "h", "w_ih", "w_hh", "b_ih", "b_hh"), grads, low_grads, hi_grads):
        if c is not None and not (name == "w_hh" and not has_h):
            assert_2x_rule(name, a, b, c, 2e-2)


def test_gru_cell_noncontiguous_and_deterministic():
    x, h, w_ih, w_hh, b_ih, b_hh = _inputs(30, 20, 8, True, torch.float32)
    xt = torch.randn(20, 30, device=DEVICE).t()  # non-contiguous x
    a = gru_cell(xt, h, w_ih, w_hh, b_ih, b_hh)
    torch.testing.assert_close(a, gru_cell_reference(xt, h, w_ih, w_hh, b_ih, b_hh), rtol=1e-5, atol=1e-5)
    assert torch.equal(a, gru_cell(xt, h, w_ih, w_hh, b_ih, b_hh))
    with pytest.raises(ValueError, match="h must be"):
        gru_cell(x, h[:5], w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(ValueError, match="x must be"):
        gru_cell(x[:, :7], h, w_ih, w_hh, b_ih, b_hh)


# ---------------------------------------------------------------------------------------------------------
# the router: cell + head
# ---------------------------------------------------------------------------------------------------------
NAMES = ("x", "h", "w_ih", "w_hh", "b_ih", "b_hh", "w_head", "b_head")


def _router_inputs(N, D, R, S, has_h, dtype):
    g = torch.Generator().manual_seed(N * 1000 + D * 10 + R + 7 * S)
    head = [torch.randn(S, R, generator=g, dtype=torch.float64) * R ** -0.5,
            torch.randn(S, generator=g, dtype=torch.float64) * 0.3]
    return _inputs(N, D, R, has_h, dtype) + [t.to(device=DEVICE, dtype=dtype) for t in head]


def _router_grads_out(N, R, S, which, dtype):
    """Gradients for (logits, s): "both", "logits" only or "state" only (the other output unused)."""
    g = torch.Generator().manual_seed(N + R + S)
    dl = torch.randn(N, S, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    ds = torch.randn(N, R, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    return dl if which != "state" else None, ds if which != "logits" else None


def _run_router(fn, ts, dl, ds):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in ts]
    logits, s = fn(*leaves)
    outs, grads = [o for o, g in ((logits, dl), (s, ds)) if g is not None], [g for g in (dl, ds) if g is not None]
    torch.autograd.backward(outs, grads)
    return (logits, s), [(l.grad if l.grad is not None else torch.zeros_like(l)) if l is not None else None
                         for l in leaves]


@pytest.mark.parametrize("which", ["both", "logits", "state"])
@pytest.mark.parametrize("has_h", [False, True])
@pytest.mark.parametrize("N,D,R,S", [(37, 24, 16, 6), (1, 8, 5, 3), (50, 33, 12, 5), (20, 16, 40, 17)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gru_router_matches_reference(N, D, R, S, has_h, which, dtype):
    ts = _router_inputs(N, D, R, S, has_h, dtype)
    dl, ds = _router_grads_out(N, R, S, which, dtype)
    outs, grads = _run_router(gru_router, ts, dl, ds)
    ref_outs, ref_grads = _run_router(gru_router_reference, ts, dl, ds)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0], ref_outs[0], **tol, msg="logits")
    torch.testing.assert_close(outs[1], ref_outs[1], **tol, msg="s")
    for name, a, b in zip(NAMES, grads, ref_grads):
        if b is None:
            continue
        if (name == "w_hh" and not has_h) or (name in ("w_head", "b_head") and which == "state"):
            assert b.abs().max() == 0 and a.abs().max() == 0, name  # no gradient reaches it
            continue
        assert b.abs().max() > 0, name  # (the comparison below means something)
        torch.testing.assert_close(a, b, **tol, msg=name)


@pytest.mark.parametrize("which", ["both", "logits", "state"])
@pytest.mark.parametrize("has_h", [False, True])
def test_gru_router_bf16_2x_rule(has_h, which):
    N, D, R, S = 40, 33, 12, 5
    ts16 = [t.to(torch.bfloat16) if t is not None else None for t in _router_inputs(N, D, R, S, has_h, torch.float64)]
    dl, ds = _router_grads_out(N, R, S, which, torch.float64)
    lo = lambda t: t.to(torch.bfloat16) if t is not None else None  # noqa: E731
    outs, grads = _run_router(gru_router, ts16, lo(dl), lo(ds))
    low, low_grads = _run_router(gru_router_reference, ts16, lo(dl), lo(ds))
    hi, hi_grads = _run_router(gru_router_reference, [t.double() if t is not None else None for t in ts16], dl, ds)
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    assert_2x_rule("logits", outs[0], low[0], hi[0], 1e-2)
    assert_2x_rule("s", outs[1], low[1], hi[1], 1e-2)
    for name, a, b, c in zip(NAMES, grads, low_grads, hi_grads):
        if c is not None and not (name == "w_hh" and not has_h):
            assert a.dtype == torch.bfloat16, name
            assert_2x_rule(name, a, b, c, 2e-2)


def test_gru_router_noncontiguous_deterministic_and_checks():
    x, h, w_ih, w_hh, b_ih, b_hh, w_head, b_head = _router_inputs(30, 20, 8, 5, True, torch.float32)
    xt = torch.randn(20, 30, device=DEVICE).t()  # non-contiguous x
    a = gru_router(xt, h, w_ih, w_hh, b_ih, b_hh, w_head, b_head)
    ref = gru_router_reference(xt, h, w_ih, w_hh, b_ih, b_hh, w_head, b_head)
    for u, v in zip(a, ref):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    b = gru_router(xt, h, w_ih, w_hh, b_ih, b_hh, w_head, b_head)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="head must be"):
        gru_router(x, h, w_ih, w_hh, b_ih, b_hh, w_head[:, :5], b_head)
    with pytest.raises(ValueError, match="head must be"):
        gru_router(x, h, w_ih, w_hh, b_ih, b_hh, w_head, b_head[:3])
    with pytest.raises(ValueError, match="dtype"):
        gru_router(x, h, w_ih, w_hh, b_ih, b_hh, w_head.double(), b_head)
    with pytest.raises(ValueError, match="h must be"):
        gru_router(x, h[:5], w_ih, w_hh, b_ih, b_hh, w_head, b_head)


@pytest.mark.parametrize("has_h", [False, True])
def test_gru_router_launches(has_h):
    """Forward: the input GEMM (+ the state's), one kernel (gates and head). Backward: one kernel, one column
    sum (all three biases), the GEMMs dW_head, dW_ih, dx (+ dW_hh and dh with a state)."""
    ts = [t.requires_grad_() if t is not None else None for t in _router_inputs(24, 16, 12, 5, has_h, torch.float32)]
    logits, s = gru_router(*ts)  # warm-up
    torch.autograd.backward([logits, s], [torch.ones_like(logits), torch.ones_like(s)])
    for t in ts:
        if t is not None:
            t.grad = None
    with count_launches() as fwd:
        logits, s = gru_router(*ts)
    with count_launches() as bwd:
        torch.autograd.backward([logits, s], [torch.ones_like(logits), torch.ones_like(s)])
    assert fwd.total == 2 + has_h and sum(fwd.triton.values()) == 1, fwd.table()
    # (+2: the two ones_like fills of the test itself)
    assert bwd.total == 2 + 5 + 2 * has_h and sum(bwd.triton.values()) == 1 and bwd.aten["sum"] == 1, bwd.table()
    assert not fwd.syncs and not bwd.syncs


def test_gru_router_module_fused_path_matches_default():
    """GRURouter with the fused router (the Triton backend's) against its nn.GRUCell + nn.Linear default, two
    steps with the state carried: logits, state and every parameter's and x's gradient."""
    from mom import MoMConfig
    from mom.routers import GRURouter

    cfg = MoMConfig(n_embd=24, n_head=4, n_inner=48, router_dim=12, n_attn=3, n_ffn=3, depth=2, top_k=2)
    torch.manual_seed(0)
    router = GRURouter(cfg, 5).to(DEVICE).double()
    x0 = torch.randn(9, 24, device=DEVICE, dtype=torch.float64)

    def run(fused):
        router.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        l1, s1 = router(x, None, gru_router if fused else None)
        l2, s2 = router(x * 0.5, s1, gru_router if fused else None)
        (l1.square().sum() + (l2 * torch.arange(5.0, device=DEVICE, dtype=x.dtype)).sum() + s2.sum()).backward()
        return [l1, l2, s2, x.grad] + [p.grad for _, p in sorted(router.named_parameters())]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gru_router_under_autocast():
    """torch.autocast: fp32 inputs are cast to bf16 (differentiably), both outputs come back in bf16 and every
    gradient in fp32, close to the fp32 reference's (bf16 level)."""
    ts = [t.requires_grad_() if t is not None else None for t in _router_inputs(20, 16, 12, 5, True, torch.float32)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        logits, s = gru_router(*ts)
    assert logits.dtype == s.dtype == torch.bfloat16
    (logits.float().square().sum() + s.float().sum()).backward()
    grads = [t.grad for t in ts]
    for t in ts:
        t.grad = None
    ref = gru_router_reference(*ts)
    (ref[0].square().sum() + ref[1].sum()).backward()
    for name, a, t in zip(NAMES, grads, ts):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a, t.grad, rtol=0.05, atol=0.05 * t.grad.abs().max().item(), msg=name)

"""Property tests (hypothesis): routed_linear and routed_ffn against the reference loop over drawn shapes, dtypes,
strides (non-contiguous x), duplicate ids within a token, SKIP patterns (none, some, all) and optional parts
(LayerNorm, bias, routing weights); outputs and every gradient. Example counts are bounded for CI."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mom_kernels as mk  # noqa: E402
from mom_kernels import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def routed_case(draw, max_width=24):
    T = draw(st.integers(1, 40))
    K = draw(st.integers(1, 3))
    E = draw(st.integers(1, 5))
    skip = draw(st.sampled_from([0.0, 0.3, 1.0]))
    # ids: any module per pick (duplicates within a token allowed), SKIP (= E) with probability `skip`
    ids = torch.tensor(draw(st.lists(st.integers(0, E - 1), min_size=T * K, max_size=T * K))).view(T, K)
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.where(torch.rand(T, K, generator=gen) < skip, torch.full_like(ids, E), ids)
    return dict(T=T, K=K, E=E, ids=ids.to(DEVICE), gen=gen,
                n_in=draw(st.integers(1, max_width)), n_out=draw(st.integers(1, max_width)),
                dtype=draw(st.sampled_from([torch.float64, torch.float32])),
                transposed_x=draw(st.booleans()), ids32=draw(st.booleans()))


def _x(c, width):
    r = torch.randn(width, c["T"], generator=c["gen"], dtype=torch.float64).to(DEVICE, c["dtype"])
    return r.t() if c["transposed_x"] else r.t().contiguous()  # [T, width], strided or contiguous


def _check(fn, ref, args, grad_idx, dtype):
    leaves = [a.detach().clone().requires_grad_() if i in grad_idx else a for i, a in enumerate(args)]
    rleaves = [a.detach().clone().requires_grad_() if i in grad_idx else a for i, a in enumerate(args)]
    y, want = fn(*leaves), ref(*rleaves)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(y, want, **tol)
    dy = torch.randn_like(want)
    got = torch.autograd.grad(y, [leaves[i] for i in grad_idx], dy, allow_unused=True, materialize_grads=True)
    if want.requires_grad:
        exp = torch.autograd.grad(want, [rleaves[i] for i in grad_idx], dy, allow_unused=True,
                                  materialize_grads=True)
    else:  # every pick SKIP: the loop's output does not depend on the inputs
        exp = [torch.zeros_like(rleaves[i]) for i in grad_idx]
    for i, a, b in zip(grad_idx, got, exp):
        # fp32: the absolute bound scales with the gradient's largest entry (a LayerNorm over 2 nearly equal
        # features has rstd up to 1 / sqrt(eps) = 316: both fp32 backwards round at that scale, so a fixed
        # 2e-4 made the same draw pass or fail with the thread count)
        scale = 1.0 if dtype == torch.float64 else max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   msg=lambda m: f"grad of argument {i}: {m}")


@SETTINGS
@given(c=routed_case(), has_ln=st.booleans(), has_bias=st.booleans(), weighted=st.booleans())
def test_routed_linear_properties(c, has_ln, has_bias, weighted):
    E, n_in, n_out, dt, gen = c["E"], c["n_in"], c["n_out"], c["dtype"], c["gen"]
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(DEVICE, dt)  # noqa: E731
    x, w = _x(c, n_in), r(E, n_in, n_out)
    b = r(E, n_out) if has_bias else None
    g = r(c["T"], c["K"]).abs() + 0.1 if weighted else None
    # a LayerNorm over 2 features outputs +-1 whatever x is (its dx is 0 exactly): both fp32 backwards return
    # rounding noise times rstd (up to 1 / sqrt(eps) = 316) there, and a draw then passed or failed with the
    # thread count; from 3 features on the gradient is real
    lw, lb = (1 + 0.2 * r(E, n_in), 0.2 * r(E, n_in)) if has_ln and n_in > 2 else (None, None)
    ids = c["ids"].to(torch.int32) if c["ids32"] else c["ids"]
    args = [x, w, b, ids, g, lw, lb]
    grad_idx = [i for i in (0, 1, 2, 4, 5, 6) if args[i] is not None]
    _check(mk.routed_linear, reference.routed_linear, args, grad_idx, dt)


@SETTINGS
@given(c=routed_case(max_width=20))
def test_routed_ffn_properties(c):
    E, D, F, dt, gen = c["E"], max(2, c["n_in"]), c["n_out"], c["dtype"], c["gen"]
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(DEVICE, dt)  # noqa: E731
    x = _x(c, D)
    args = [x, 1 + 0.2 * r(E, D), 0.2 * r(E, D), r(E, D, F) * D ** -0.5, 0.2 * r(E, F), r(E, F, D) * F ** -0.5,
            0.2 * r(E, D), c["ids"], r(c["T"], c["K"]).abs() + 0.1]
    _check(mk.routed_ffn, reference.routed_ffn, args, [0, 1, 2, 3, 4, 5, 6, 8], dt)

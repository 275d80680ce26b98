"""Route + plan kernels (mom_kernels/route.py) against route_reference (plain PyTorch): ids, slots, weights,
probs, balance terms and the plan, and the gradient of every differentiable output, for every routing option;
ties, all-SKIP, E = 1, K = 1..3; non-finite logits; bad arguments; bit-identical reruns."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mom_kernels import route as R  # noqa: E402
from mom_kernels.routing import make_plan_torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (T, S, E, options): S router slots, E modules (slots >= E are SKIP)
CASES = [
    (37, 5, 4, dict(top_k=2)),                                            # the default: GRU-style, SKIP slot
    (37, 5, 4, dict(top_k=1, renormalize=False)),
    (20, 4, 4, dict(top_k=3)),                                            # no SKIP slot
    (33, 7, 2, dict(top_k=2, balance_skip=True)),                         # shared slots: 5 SKIP slots
    (25, 2, 1, dict(top_k=1, renormalize=False)),                         # E = 1
    (25, 2, 1, dict(top_k=2)),                                            # K = every slot
    (19, 5, 4, dict(top_k=2, straight_through=True, temperature=0.2)),
    (19, 5, 4, dict(dense=True, balance_skip=True)),
    (1, 5, 4, dict(top_k=3, temperature=3.0)),                            # T = 1
    (70, 9, 8, dict(top_k=2, renormalize=False, straight_through=True)),  # several blocks of tokens
    (30, 5, 4, dict(top_k=2, straight_through=True, straight_through_clamp=True)),  # the authors' clamp
]


def _ids(case):
    T, S, E, o = case
    return f"T{T}-S{S}-E{E}-" + ",".join(f"{k}={v}" for k, v in o.items())


def _check(got, want, dtype, block_m=None):
    for name in ("ids", "slots"):
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name).cpu()), name
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    for name in ("weights", "probs", "f", "P", "balance"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **tol, msg=name)
    for a, b in zip(got.plan.tensors(), want.plan.tensors()):
        assert torch.equal(a.cpu(), b.cpu())
    assert torch.equal(got.plan.counts.cpu(), want.plan.counts.cpu())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_route_matches_reference(case, dtype):
    T, S, E, opts = case
    logits = (torch.randn(T, S, dtype=torch.float64) * 2).to(device=DEVICE, dtype=dtype)
    got = R.route(logits, E, **opts)
    want = R.route_reference(logits, E, **opts)
    _check(got, want, dtype)
    # gradients of every differentiable output, with random upstream gradients
    lg = logits.clone().requires_grad_()
    lr = logits.clone().requires_grad_()
    g_out = R.route(lg, E, **opts)
    r_out = R.route_reference(lr, E, **opts)
    ups = [3 * torch.randn_like(getattr(r_out, n)) for n in ("weights", "probs", "P", "balance")]  # some > 1
    sum(((getattr(g_out, n) * u).sum() for n, u in zip(("weights", "probs", "P", "balance"), ups))).backward()
    sum(((getattr(r_out, n) * u).sum() for n, u in zip(("weights", "probs", "P", "balance"), ups))).backward()
    # (d logits scales with 1 / temperature)
    atol = (1e-12 if dtype == torch.float64 else 2e-6) / opts.get("temperature", 1.0)
    tol = dict(rtol=1e-10 if dtype == torch.float64 else 1e-5, atol=atol)
    torch.testing.assert_close(lg.grad, lr.grad, **tol)


@pytest.mark.parametrize("which", ["weights", "probs", "P", "balance"])
def test_route_grad_of_each_output_alone(which):
    """Outputs nobody uses get no gradient (None, not zeros), and each one alone gives the right gradient."""
    logits = torch.randn(21, 5, dtype=torch.float64, device=DEVICE)
    lg, lr = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    (getattr(R.route(lg, 4, top_k=2), which) ** 2).sum().backward()
    (getattr(R.route_reference(lr, 4, top_k=2), which) ** 2).sum().backward()
    torch.testing.assert_close(lg.grad, lr.grad, rtol=1e-10, atol=1e-12)


def test_route_ties_lower_slot_first():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 0.0, 1.0, 0.0]],
                          dtype=torch.float64, device=DEVICE)
    got = R.route(logits, 4, top_k=3)
    assert got.slots.cpu().tolist() == [[1, 2, 4], [0, 1, 2], [1, 3, 0]]
    assert got.ids.cpu().tolist() == [[1, 2, 4], [0, 1, 2], [1, 3, 0]]
    _check(got, R.route_reference(logits, 4, top_k=3), torch.float64)


def test_route_all_skip():
    logits = torch.randn(30, 6, dtype=torch.float64, device=DEVICE)
    logits[:, 3:] += 100.0  # slots 3, 4, 5 are SKIP for E = 3 and always win
    got = R.route(logits, 3, top_k=2, balance_skip=False)
    assert (got.ids == 3).all()
    assert got.plan.offsets.cpu().tolist() == [0, 0, 0, 0]
    assert sorted(got.plan.sorted_pick.cpu().tolist()) == list(range(60))
    _check(got, R.route_reference(logits, 3, top_k=2), torch.float64)


def test_route_bit_identical_reruns():
    logits = torch.randn(200, 9, dtype=torch.float32, device=DEVICE)
    a, b = R.route(logits, 8, top_k=2), R.route(logits, 8, top_k=2)
    for n in ("ids", "weights", "probs", "f", "P", "balance"):
        assert torch.equal(getattr(a, n), getattr(b, n)), n
    for x, y in zip(a.plan.tensors(), b.plan.tensors()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_route_picks_equals_route(case):
    """The decode step's launch-1-only route: the same ids, slots, weights and probs as route, bit for bit."""
    T, S, E, o = case
    o = {k: v for k, v in o.items() if k not in ("balance_skip", "straight_through_clamp")}
    logits = torch.randn(T, S, dtype=torch.float32, device=DEVICE)
    full = R.route(logits, E, **o)
    ids, weights, probs, slots = R.route_picks(logits, E, **o)
    for name, got in (("ids", ids), ("weights", weights), ("probs", probs), ("slots", slots)):
        assert torch.equal(got, getattr(full, name)), name


def test_plan_matches_torch_plan():
    ids = torch.randint(0, 7, (90, 3), device=DEVICE)  # E = 6: id 6 is SKIP
    from mom_kernels.routing import make_plan

    for bm in (4, 16):
        for a, b in zip(make_plan(ids, 6, block_m=bm).tensors(), make_plan_torch(ids, 6, block_m=bm).tensors()):
            assert torch.equal(a, b)


def test_non_finite_logits():
    logits = torch.randn(20, 5, device=DEVICE)
    logits[3, 1] = float("nan")
    logits[7, 0] = float("inf")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="logits has non-finite"):
            R.route(logits, 4, top_k=2)
    # unchecked (a CUDA step without host checks): those tokens are all SKIP with NaN weights, the plan valid
    ids, w, probs, slots, f, pm, loss, plan = R.route_fwd(logits, 4, 2, 1.0, True, False, False, 4, 16)
    assert ids[3].tolist() == [4, 4] and ids[7].tolist() == [4, 4]
    assert torch.isnan(w[3]).all() and torch.isnan(w[7]).all() and torch.isnan(loss)
    ok = torch.ones(20, dtype=torch.bool)
    ok[[3, 7]] = False
    want = R.route_reference(logits[ok], 4, top_k=2)
    assert torch.equal(ids[ok], want.ids) and torch.allclose(w[ok], want.weights)
    assert plan.offsets[-1].item() == int((ids < 4).sum())
    assert sorted(plan.sorted_pick.tolist()) == list(range(40))


def test_bad_arguments():
    x = torch.randn(4, 5, device=DEVICE)
    with pytest.raises(ValueError, match="logits must have shape"):
        R.route(x[0], 4)
    with pytest.raises(TypeError, match="logits must be fp16"):
        R.route(x.long(), 4)
    with pytest.raises(ValueError, match="top_k must be an int in 1..5"):
        R.route(x, 4, top_k=6)
    with pytest.raises(ValueError, match="n_modules must be"):
        R.route(x, 0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        R.route(x, 4, temperature=0.0)
    from mom_kernels.routing import make_plan

    for bm in (0, -16, 12):
        with pytest.raises(ValueError, match="block_m must be a power of two"):
            make_plan(torch.zeros(3, 1, dtype=torch.long, device=DEVICE), 2, block_m=bm)


def test_straight_through_clamp_changes_the_gradient():
    """The clamp must act: with upstream weight gradients beyond [-1, 1] the two estimators differ."""
    logits = torch.randn(16, 5, dtype=torch.float64, device=DEVICE)
    grads = []
    for clamp in (False, True):
        lg = logits.clone().requires_grad_()
        r = R.route(lg, 4, top_k=2, straight_through=True, straight_through_clamp=clamp)
        (r.weights * torch.tensor([5.0, -0.5], dtype=torch.float64, device=DEVICE)).sum().backward()
        grads.append(lg.grad)
    assert not torch.allclose(grads[0], grads[1])


def test_plan_of_other_ids_is_refused():
    """A plan is tied to the ids tensor it was built from: other ids of the same shape, or the same ids changed
    in place, are refused by the routed ops (a host check, no sync)."""
    import mom_kernels as mk
    from mom_kernels.testing import linear_inputs

    x, w, b, ids, g, lw, lb = linear_inputs(12, 2, 3, 8, 8, device=DEVICE)
    plan = mk.make_plan(ids, 3)
    mk.routed_linear(x, w, b, ids, g, plan=plan)  # its own ids: fine
    other = torch.flip(ids, (0,)).contiguous()
    with pytest.raises(ValueError, match="plan was built from other ids"):
        mk.routed_linear(x, w, b, other, g, plan=plan)
    ids[0, 0] = 3  # in place, after the plan was built
    with pytest.raises(ValueError, match="plan was built from other ids"):
        mk.routed_linear(x, w, b, ids, g, plan=plan)

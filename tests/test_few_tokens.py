"""The torch backend's few-token routed ops (mom.few_tokens, the CPU decode path) against per-pick loops written
here, and the dispatch: no-grad calls of <= MAX_TOKENS tokens take it and build no plan, everything else does not."""
import pytest
import torch
import torch.nn.functional as F

from mom import few_tokens, routed
from mom.config import MoMConfig

E = 5


def loop(x, ids, g, res, module, width):
    """One token, one pick at a time: res[t] + sum_k g[t,k] module(m, x[t]); SKIP (id E) adds 0."""
    out = torch.zeros(x.shape[0], width, dtype=x.dtype)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            m = int(ids[t, k])
            if m != E:
                out[t] += (g[t, k] if g is not None else 1) * module(m, x[t])
    return out if res is None else res + out


def ln(u, gamma, beta, m, eps):
    return (u - u.mean()) / torch.sqrt(u.var(unbiased=False) + eps) * gamma[m] + beta[m]


def loop_linear(x, W, b, ids, g, gamma, beta, eps, res):
    """res[t] + sum_k g[t,k] (LN_m(x[t]) @ W[m] + b[m])."""
    return loop(x, ids, g, res, lambda m, u: (ln(u, gamma, beta, m, eps) if gamma is not None else u) @ W[m]
                + (b[m] if b is not None else 0), W.shape[2])


def loop_ffn(x, gamma, beta, W1, b1, W2, b2, ids, g, eps, res):
    """res[t] + sum_k g[t,k] (gelu(LN_m(x[t]) @ W1[m] + b1[m]) @ W2[m] + b2[m])."""
    return loop(x, ids, g, res, lambda m, u: F.gelu(ln(u, gamma, beta, m, eps) @ W1[m] + b1[m], approximate="tanh")
                @ W2[m] + b2[m], W2.shape[2])


def random_ids(T, K, gen, skip_share=0.3):
    """[T, K] distinct modules per token, some SKIP (id E, possibly several per token)."""
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    skip = torch.rand(T, K, generator=gen) < skip_share
    return torch.where(skip, torch.full_like(ids, E), ids)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("T", [1, 2, 7, 16])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_routed_linear_and_ffn_equal_the_pick_loops(dtype, tol, T, K):
    gen = torch.Generator().manual_seed(100 * T + K)
    D, O, Fw = 12, 9, 20
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    x, res = r(T, D), r(T, O)
    W, b, gamma, beta = r(E, D, O), r(E, O), 1 + 0.1 * r(E, D), 0.1 * r(E, D)
    ids, g = random_ids(T, K, gen), torch.rand(T, K, generator=gen, dtype=dtype)
    with torch.no_grad():
        for bias, ln, weights, residual in [(b, True, g, res), (None, False, None, None), (b, True, None, res),
                                            (b, False, g, None)]:
            lw, lb = (gamma, beta) if ln else (None, None)
            got = few_tokens.routed_linear(x, W, bias, ids, weights, lw, lb, 1e-5, residual=residual)
            want = loop_linear(x, W, bias, ids, weights, lw, lb, 1e-5, residual)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        W1, b1, W2, b2 = r(E, D, Fw), r(E, Fw), r(E, Fw, D), r(E, D)
        res = r(T, D)
        for residual in (None, res):
            got = few_tokens.routed_ffn(x, gamma, beta, W1, b1, W2, b2, ids, g, 1e-5, residual=residual)
            torch.testing.assert_close(got, loop_ffn(x, gamma, beta, W1, b1, W2, b2, ids, g, 1e-5, residual),
                                       rtol=tol, atol=tol)


def test_all_skip_repeated_modules_and_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(0)
    T, K, D, O = 6, 2, 8, 5
    x = torch.randn(D, T, generator=gen, dtype=torch.float64).t()          # non-contiguous [T, D]
    f64 = dict(generator=gen, dtype=torch.float64)
    W, b = torch.randn(E, D, O, **f64), torch.randn(E, O, **f64)
    g = torch.rand(K, T, generator=gen, dtype=torch.float64).t()           # non-contiguous weights
    with torch.no_grad():
        skip = torch.full((T, K), E)
        assert torch.equal(few_tokens.routed_linear(x, W, b, skip, g), torch.zeros(T, O, dtype=torch.float64))
        same = torch.tensor([[3, E]] * T)                                  # one module, every token: one group
        torch.testing.assert_close(few_tokens.routed_linear(x, W, b, same, g),
                                   loop_linear(x, W, b, same, g, None, None, 1e-5, None), rtol=1e-12, atol=1e-12)
        mixed = torch.tensor([[0, 4], [4, 0], [E, 2], [2, E], [1, 3], [E, E]])
        torch.testing.assert_close(few_tokens.routed_linear(x, W, b, mixed, g),
                                   loop_linear(x, W, b, mixed, g, None, None, 1e-5, None), rtol=1e-12, atol=1e-12)


def test_reruns_are_bit_identical():
    gen = torch.Generator().manual_seed(3)
    x, W1 = torch.randn(16, 8, generator=gen), torch.randn(E, 8, 12, generator=gen)
    b1 = torch.randn(E, 12, generator=gen)
    W2, b2 = torch.randn(E, 12, 8, generator=gen), torch.randn(E, 8, generator=gen)
    gamma, beta, ids, g = torch.ones(E, 8), torch.zeros(E, 8), random_ids(16, 2, gen), torch.rand(16, 2, generator=gen)
    with torch.no_grad():
        a = few_tokens.routed_ffn(x, gamma, beta, W1, b1, W2, b2, ids, g, residual=x)
        assert torch.equal(a, few_tokens.routed_ffn(x, gamma, beta, W1, b1, W2, b2, ids, g, residual=x))


def test_dispatch_takes_the_path_only_without_grad_and_for_few_tokens(monkeypatch):
    calls = []
    real = few_tokens.routed_linear
    monkeypatch.setattr(few_tokens, "routed_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(1)
    D, O = 8, 6
    W, b = torch.randn(E, D, O, generator=gen), torch.randn(E, O, generator=gen)
    for T, grad, taken in [(1, False, True), (16, False, True), (17, False, False), (4, True, False)]:
        calls.clear()
        x = torch.randn(T, D, generator=gen)
        ids, g = random_ids(T, 2, gen), torch.rand(T, 2, generator=gen)
        with torch.set_grad_enabled(grad):
            plan = routed.TORCH.make_plan(ids, E)
            assert (plan is None) == taken                                  # the router builds no plan either
            y = routed.TORCH.routed_linear(x, W, b, ids, g, plan=plan, residual=x[:, :O])
        assert bool(calls) == taken
        torch.testing.assert_close(y.detach(), loop_linear(x, W, b, ids, g, None, None, 1e-5, x[:, :O]),
                                   rtol=2e-5, atol=2e-5)


def test_decoding_model_takes_the_path_and_matches_the_plan_path(monkeypatch):
    """A torch-backend model's no-grad decode step equals the same step through the plan-based ops."""
    from mom import MoMForCausalLM

    cfg = MoMConfig.from_name("tiny", backend="torch", n_embd=32, n_head=2, vocab_size=64)
    torch.manual_seed(0)
    model = MoMForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 64, (3, 5))
    with torch.no_grad():
        fast = model(ids[:, -1:], past_key_values=model(ids[:, :-1], use_cache=True).past_key_values).logits
        monkeypatch.setattr(few_tokens, "MAX_TOKENS", 0)
        slow = model(ids[:, -1:], past_key_values=model(ids[:, :-1], use_cache=True).past_key_values).logits
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


def test_balance_off_changes_nothing_but_the_aux_loss():
    """A decode step's forward (balance=False) routes and computes exactly what the full forward does."""
    from mom import MoMForCausalLM
    from mom.routers import route

    cfg = MoMConfig.from_name("tiny", backend="torch", n_embd=32, n_head=2, vocab_size=64)
    torch.manual_seed(1)
    model = MoMForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        on = model._forward(ids, None, None, False, None, 0)
        off = model._forward(ids, None, None, False, None, 0, balance=False)
    assert torch.equal(on.logits, off.logits) and float(off.aux_loss) == 0.0 and float(on.aux_loss) > 0
    logits = torch.randn(7, cfg.attn_slots, dtype=torch.float64)
    a, b = route(logits, cfg.n_attn, cfg), route(logits, cfg.n_attn, cfg, balance=False)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.weights, b.weights) and b.f is None and b.balance is None

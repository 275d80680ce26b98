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


# --- the few-token router step and route (a decode step's routers) ---------------------------------------------
def topk_loop(row, K):
    """The K largest of a list, largest first, the lower slot first on ties: K passes of a running maximum."""
    picked = []
    for _ in range(K):
        best = None
        for s, v in enumerate(row):
            if s not in picked and (best is None or v > row[best]):
                best = s
        picked.append(best)
    return picked


@pytest.mark.filterwarnings("ignore:MoMConfig. top_k=1")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [1, 3, 16])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_route_equals_a_top_k_loop_and_the_spec(dtype, N, K):
    from mom.routers import route as spec_route

    gen = torch.Generator().manual_seed(10 * N + K)
    S = 7                                                                  # E = 5 modules + 2 SKIP slots
    for tau, renormalize, balance in [(1.0, True, False), (0.7, True, True), (1.0, False, True)]:
        cfg = MoMConfig.from_name("tiny", n_attn=E, top_k=K, router_temperature=tau, renormalize=renormalize)
        # small integers: many ties, on modules and on SKIP slots
        logits = torch.randint(-2, 3, (N, S), generator=gen).to(dtype) + (torch.rand(N, S, generator=gen, dtype=dtype)
                                                                          < 0.5) * 0.25
        with torch.no_grad():
            r, plan = few_tokens.route(logits, E, cfg, balance)
        slots = [topk_loop(row, K) for row in logits.tolist()]
        assert r.slots.tolist() == slots
        assert r.ids.tolist() == [[min(s, E) for s in row] for row in slots]   # SKIP slots -> id E
        p = [[torch.exp(torch.tensor(v / tau, dtype=torch.float64)).item() for v in row] for row in logits.tolist()]
        want = []
        for t, row in enumerate(slots):
            g = [p[t][s] / sum(p[t]) for s in row]
            want.append([w / sum(g) for w in g] if renormalize else g)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(r.weights, torch.tensor(want, dtype=dtype), rtol=tol, atol=tol)
        spec = spec_route(logits, E, cfg, balance)                          # and bit for bit the routers' spec
        for a, b in [(r.ids, spec.ids), (r.slots, spec.slots), (r.weights, spec.weights), (r.probs, spec.probs)]:
            assert torch.equal(a, b)
        assert (r.balance is None) == (not balance)
        if balance:
            assert torch.equal(r.f, spec.f) and torch.equal(r.P, spec.P) and torch.equal(r.balance, spec.balance)
        # the host plan handed to the routed ops: the plan of these ids
        ref = few_tokens.HostPlan(r.ids, E)
        assert plan.groups == ref.groups and (plan.T, plan.K, plan.R) == (ref.T, ref.K, ref.R)
        if N > 1:
            assert torch.equal(plan.token, ref.token) and torch.equal(plan.row_of_pick, ref.row_of_pick)


def test_route_leaves_nan_dense_and_straight_through_to_the_spec():
    cfg = MoMConfig.from_name("tiny", n_attn=E)
    logits = torch.randn(2, 7, dtype=torch.float64)
    assert few_tokens.route(logits, E, cfg.replace(dense_routing=True)) is None
    assert few_tokens.route(logits, E, cfg.replace(straight_through=True)) is None
    logits[1, 3] = float("nan")
    assert few_tokens.route(logits, E, cfg) is None


def gru_loop(x, h, w_ih, w_hh, b_ih, b_hh):
    """The GRU equations, one token and one unit at a time (torch.nn.GRUCell's documentation)."""
    r_dim = w_hh.shape[1]
    out = torch.empty(x.shape[0], r_dim, dtype=x.dtype)
    sig = lambda v: 1 / (1 + torch.exp(-v))
    for t in range(x.shape[0]):
        ht = h[t] if h is not None else torch.zeros(r_dim, dtype=x.dtype)
        for j in range(r_dim):
            gate = lambda g: (w_ih[g * r_dim + j] @ x[t] + b_ih[g * r_dim + j], w_hh[g * r_dim + j] @ ht + b_hh[g * r_dim + j])
            (ir, hr), (iz, hz), (i_n, h_n) = gate(0), gate(1), gate(2)
            r, z = sig(ir + hr), sig(iz + hz)
            n = torch.tanh(i_n + r * h_n)
            out[t, j] = (1 - z) * n + z * ht[j]
    return out


@pytest.mark.parametrize("N,D,R,S", [(1, 12, 8, 7), (5, 9, 13, 6), (16, 20, 16, 17)])
@pytest.mark.parametrize("has_h", [False, True])
def test_gru_router_equals_the_gru_equations_and_the_modules(N, D, R, S, has_h):
    gen = torch.Generator().manual_seed(N + D)
    r = lambda *s: 0.5 * torch.randn(*s, generator=gen, dtype=torch.float64)
    x, h = r(N, D), (r(N, R) if has_h else None)
    w_ih, w_hh, b_ih, b_hh, w_head, b_head = r(3 * R, D), r(3 * R, R), r(3 * R), r(3 * R), r(S, R), r(S)
    with torch.no_grad():
        logits, state = few_tokens.gru_router(x, h, w_ih, w_hh, b_ih, b_hh, w_head, b_head)
        want = gru_loop(x, h, w_ih, w_hh, b_ih, b_hh)
        torch.testing.assert_close(state, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(logits, want @ w_head.t() + b_head, rtol=1e-12, atol=1e-12)
        for dtype in (torch.float64, torch.float32):                       # and bit for bit nn.GRUCell + nn.Linear
            cell, head = torch.nn.GRUCell(D, R, dtype=dtype), torch.nn.Linear(R, S, dtype=dtype)
            for p, v in zip([cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, head.weight, head.bias],
                            [w_ih, w_hh, b_ih, b_hh, w_head, b_head]):
                p.copy_(v)
            xs, hs = x.to(dtype), (h.to(dtype) if h is not None else None)
            ref_state = cell(xs, hs)
            got = few_tokens.gru_router(xs, hs, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh,
                                        head.weight, head.bias)
            assert torch.equal(got[1], ref_state) and torch.equal(got[0], head(ref_state))


def test_per_module_views_are_cached_follow_the_tensor_and_go_with_it():
    import gc

    t = torch.randn(4, 3, 5, dtype=torch.float64)
    views = few_tokens.per_module(t)
    assert len(views) == 4 and all(torch.equal(v, t[m]) for m, v in enumerate(views))
    assert few_tokens.per_module(t) is views                                # cached: the same tuple
    assert few_tokens.per_module(None) is None
    with torch.no_grad():
        t.mul_(2.0)                                                         # in place: the views see it
    assert all(torch.equal(v, t[m]) for m, v in enumerate(views))
    t.data = torch.randn(4, 3, 5, dtype=torch.float64)                      # a new storage: new views
    fresh = few_tokens.per_module(t)
    assert fresh is not views and all(torch.equal(v, t[m]) for m, v in enumerate(fresh))
    key = id(t)
    assert key in few_tokens._VIEWS
    del t, views, fresh
    gc.collect()
    assert key not in few_tokens._VIEWS                                     # freed with its tensor


def test_decode_step_routers_take_the_few_token_path_and_change_no_bit(monkeypatch):
    """A decode step through the few-token router step and route gives the logits of nn.GRUCell + routers.route,
    bit for bit (fp32 and fp64, a batch with SKIP picks); calls with autograd or > MAX_TOKENS tokens keep them."""
    from mom import MoMForCausalLM
    from mom.cache import StaticCache
    from mom.generate import DecodeStep

    calls = {"route": 0, "gru": 0}
    real_route, real_gru = few_tokens.route, few_tokens.gru_router

    def counted(name, fn):
        def f(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return f

    cfg = MoMConfig.from_name("tiny", backend="torch", n_embd=32, n_head=2, vocab_size=64)
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(4))   # prefill: 18 > MAX_TOKENS

    def decode(dtype, fast):
        torch.manual_seed(0)
        model = MoMForCausalLM(cfg).to(dtype).eval()
        monkeypatch.setattr(few_tokens, "route", counted("route", real_route) if fast else lambda *a, **k: None)
        monkeypatch.setattr(routed.TORCH, "_few_token_gru_router", counted("gru", real_gru) if fast else None)
        with torch.no_grad():
            cache = StaticCache(cfg, 3, 9, dtype, torch.device("cpu"))
            model(ids, past_key_values=cache)
            step = DecodeStep(model, cache)
            return torch.stack([step(torch.tensor([t, t + 1, t + 2])) for t in (3, 9, 27)])

    for dtype in (torch.float32, torch.float64):
        calls.update(route=0, gru=0)
        fast = decode(dtype, True)
        steps = 3 * cfg.chunks * cfg.depth * 2                              # 3 steps, 2 router calls per routed step
        assert calls == {"route": steps, "gru": steps}                      # the prefill kept the spec
        assert torch.equal(fast, decode(dtype, False))
    calls.update(route=0, gru=0)
    monkeypatch.setattr(few_tokens, "route", counted("route", real_route))
    monkeypatch.setattr(routed.TORCH, "_few_token_gru_router", counted("gru", real_gru))
    model = MoMForCausalLM(cfg)
    model(ids[:, :1])                                                       # autograd on: the spec
    assert calls == {"route": 0, "gru": 0}

"""Routing and the balancing loss against values computed by hand, token by token (mom/routers.py).

    N = tokens, S = router slots, E = pool size (slot ids >= E are SKIP, merged to id E), K = top_k

Every backend shares `route` and the balance terms, so comparing backends with each other cannot catch a
bug in them: here the expected picks, weights, probabilities and losses come from plain python loops over
the router logits (never from `route`, `balance_terms` or `balance_loss`). The picks of a token are
compared as a set of (slot, id, weight) triples, so the order `route` lists them in is free, but each
weight must stay with its own slot. Rule assumed: top-K on the logits; among equal logits the lower slot
index wins (only `test_tie_rule_lower_slot_wins` has ties). fp64 throughout.
"""
import math

import pytest
import torch

from mom import MoMConfig
from mom.layer import MoMLayer
from mom.routers import route
from helpers import randomize_

DT = torch.float64


def routing_config(**kw) -> MoMConfig:
    """A one-chunk config; route() reads top_k, router_temperature, renormalize, straight_through and
    dense_routing from it."""
    base = dict(vocab_size=11, n_positions=16, n_embd=16, n_head=2, n_inner=24, n_bottom=0, chunks=1,
                n_attn=3, n_ffn=3, depth=1, top_k=2, router_dim=8, skip=True, anchor=False, backend="torch")
    base.update(kw)
    return MoMConfig(**base)


# ----------------------------------------------------------------------------------------------------------
# the hand computation
# ----------------------------------------------------------------------------------------------------------
def hand_softmax(row, tau):
    """softmax(row / tau) of one token's logits [S], written out."""
    z = row / tau
    e = torch.exp(z - z.max())
    return e / e.sum()


def hand_top_k(row, K):
    """The K slots with the largest logits, ties to the lower slot index (python sort on floats)."""
    vals = row.detach().tolist()
    return sorted(range(len(vals)), key=lambda s: (-vals[s], s))[:K]


def hand_route(logits, E, cfg):
    """Per token: list of (slot, id, weight) with weight a differentiable 0-d tensor; and probs [N, S]."""
    N, S = logits.shape
    picks, probs = [], []
    for t in range(N):
        p = hand_softmax(logits[t], cfg.router_temperature)                  # [S]
        probs.append(p)
        slots = list(range(S)) if cfg.dense_routing else hand_top_k(logits[t], cfg.top_k)
        total = sum(p[s] for s in slots)
        w = [p[s] / total if (cfg.renormalize and not cfg.dense_routing) else p[s] for s in slots]
        if cfg.straight_through:
            w = [wi - wi.detach() + 1.0 for wi in w]
        picks.append([(s, min(s, E), wi) for s, wi in zip(slots, w)])
    return picks, torch.stack(probs)


def as_triples(r, t):
    """route()'s picks of token t as (slot, id, weight) sorted by slot."""
    return sorted(zip(r.slots[t].tolist(), r.ids[t].tolist(), r.weights[t]), key=lambda p: p[0])


def assert_route_matches(r, picks, probs, tol=1e-12):
    assert torch.allclose(r.probs, probs, rtol=tol, atol=tol), float((r.probs - probs).abs().max())
    N = probs.shape[0]
    assert r.ids.shape == r.weights.shape == r.slots.shape == (N, len(picks[0]))
    for t in range(N):
        got, want = as_triples(r, t), sorted(picks[t], key=lambda p: p[0])
        assert [(s, i) for s, i, _ in got] == [(s, i) for s, i, _ in want], (t, got, want)
        for (s, _, wg), (_, _, ww) in zip(got, want):
            assert abs(wg.item() - ww.item()) <= tol, f"token {t} slot {s}: weight {wg.item()} != {ww.item()}"


def random_logits(N, S, scale=2.0):
    return (torch.randn(N, S, dtype=DT) * scale).requires_grad_(True)  # fresh per test (conftest seeds)


# ----------------------------------------------------------------------------------------------------------
# route()
# ----------------------------------------------------------------------------------------------------------
ROUTE_CASES = [  # (config overrides, pool size E)
    (dict(top_k=1, renormalize=False), 3),
    (dict(top_k=2), 3),
    (dict(top_k=2, renormalize=False, router_temperature=0.3), 3),
    (dict(top_k=3, n_attn=4, n_ffn=4, router_temperature=2.5), 4),
    (dict(top_k=2, skip=False), 3),                                      # no SKIP slot at all
    (dict(top_k=3, n_attn=2, n_ffn=4, shared_slots=True), 2),            # S = 5, slots 2, 3, 4 are SKIP
]


@pytest.mark.parametrize("case,E", ROUTE_CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c, _ in
                                                     ROUTE_CASES])
def test_route_top_k_weights_skip(case, E):
    cfg = routing_config(**case)
    S = cfg.attn_slots
    logits = random_logits(37, S)                                            # [N, S]
    with torch.no_grad():  # more SKIP picks: slots >= E a bit more likely
        logits[:, E:] += 0.7
    r = route(logits, E, cfg)
    picks, probs = hand_route(logits, E, cfg)
    assert_route_matches(r, picks, probs)
    if cfg.skip:
        assert (r.ids == E).any(), "no SKIP pick: the case does not test SKIP"
        assert r.ids.max() == E and (r.slots >= E).sum() == (r.ids == E).sum()
    if cfg.renormalize:
        assert torch.allclose(r.weights.sum(-1), torch.ones(37, dtype=DT), atol=1e-12)
    # weights are differentiable in the logits: d/dlogits sum_t,k c[t,k] * w[t,k] by hand
    c = torch.randn(37, cfg.top_k, dtype=DT)
    # c is attached per slot, so both sides weigh the same (token, slot) pair whatever the listing order
    c_slot = torch.zeros(37, S, dtype=DT).scatter(1, r.slots, c)
    got = torch.autograd.grad((r.weights * c).sum(), logits)[0]
    want = torch.autograd.grad(sum(c_slot[t, s] * w for t in range(37) for s, _, w in picks[t]), logits)[0]
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), float((got - want).abs().max())


def test_route_all_skip_token_and_shared_slots():
    """Authors' layout: with shared slots and K = 2 a token can pick only SKIP slots; both ids become E."""
    cfg = routing_config(top_k=2, n_attn=2, n_ffn=4, shared_slots=True)
    E, S = 2, cfg.attn_slots                                                 # S = 5
    logits = random_logits(16, S)
    with torch.no_grad():
        logits[:6, E:] += 6.0                                                # tokens 0..5 prefer SKIP slots
    r = route(logits, E, cfg)
    picks, probs = hand_route(logits, E, cfg)
    assert_route_matches(r, picks, probs)
    all_skip = (r.ids == E).all(dim=1)
    assert all_skip[:6].all() and (r.slots[:6] >= E).all()


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_straight_through(renormalize):
    """Forward weight exactly 1 per pick; the gradient is the soft weight's (renormalised or not)."""
    cfg = routing_config(top_k=2, straight_through=True, renormalize=renormalize, router_temperature=0.6)
    E, S = 3, cfg.attn_slots
    logits = random_logits(23, S)
    r = route(logits, E, cfg)
    assert torch.equal(r.weights.detach(), torch.ones(23, 2, dtype=DT))
    picks, probs = hand_route(logits, E, cfg)
    assert_route_matches(r, picks, probs)
    c = torch.randn(23, 2, dtype=DT)
    c_slot = torch.zeros(23, S, dtype=DT).scatter(1, r.slots, c)
    got = torch.autograd.grad((r.weights * c).sum(), logits)[0]
    # the soft weight, written out once more: p_s (/ sum of the picked p) with p = softmax(logits / tau)
    soft = 0
    for t in range(23):
        p = hand_softmax(logits[t], cfg.router_temperature)
        slots = hand_top_k(logits[t], 2)
        total = p[slots[0]] + p[slots[1]]
        soft = soft + sum(c_slot[t, s] * (p[s] / total if renormalize else p[s]) for s in slots)
    want = torch.autograd.grad(soft, logits)[0]
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), float((got - want).abs().max())
    assert got.abs().max() > 1e-3  # the router does get a gradient


@pytest.mark.parametrize("shared", [False, True])
def test_route_dense(shared):
    """Dense routing: every slot, weighted by the full softmax (top_k and renormalize unused)."""
    cfg = routing_config(top_k=1, renormalize=False, dense_routing=True, shared_slots=shared, n_attn=2,
                         n_ffn=4, router_temperature=0.8)
    E, S = 2, cfg.attn_slots
    logits = random_logits(11, S)
    r = route(logits, E, cfg)
    picks, probs = hand_route(logits, E, cfg)
    assert r.ids.shape == (11, S)
    assert_route_matches(r, picks, probs)
    assert torch.allclose(r.weights.sum(-1), torch.ones(11, dtype=DT), atol=1e-12)
    got = torch.autograd.grad((r.weights * torch.arange(1.0, S + 1, dtype=DT)).sum(), logits)[0]
    want = torch.autograd.grad(sum((s + 1.0) * w for t in range(11) for s, _, w in picks[t]), logits)[0]
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_tie_rule_lower_slot_wins():
    """TIES ON PURPOSE: among equal logits the lower slot index is picked (and listed) first."""
    cfg = routing_config(top_k=2, n_attn=3, n_ffn=3)
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0],      # slots 1 and 2 tie at the top
                           [2.0, 2.0, 2.0, 2.0],      # all equal: slots 0 and 1
                           [0.0, 0.0, 5.0, 0.0],      # slot 2, then the lowest of the tied rest: slot 0
                           [4.0, 1.0, 4.0, 4.0]], dtype=DT)
    r = route(logits, 3, cfg)
    assert r.slots.tolist() == [[1, 2], [0, 1], [2, 0], [0, 2]]
    assert r.slots.tolist() == [hand_top_k(row, 2) for row in logits]


# ----------------------------------------------------------------------------------------------------------
# balancing loss through MoMLayer(...)(x).aux_loss
# ----------------------------------------------------------------------------------------------------------
def capture_logits(layer):
    """Forward hooks recording each router's logits [N, S] at every step (they keep their graph)."""
    seen = {"attn": [], "ffn": []}
    layer.attn_router.register_forward_hook(lambda m, i, o: seen["attn"].append(o[0]))
    layer.ffn_router.register_forward_hook(lambda m, i, o: seen["ffn"].append(o[0]))
    return seen


def hand_f_P(logits, E, cfg):
    """f [S'] share of the N*K assignments per balanced slot (a python count), P [S'] mean probability;
    S' = the E module slots, or all S slots with balance_skip."""
    N, S = logits.shape
    counts, n_picks, P = [0] * S, 0, [0.0] * S
    for t in range(N):
        p = hand_softmax(logits[t], cfg.router_temperature)
        slots = list(range(S)) if cfg.dense_routing else hand_top_k(logits[t], cfg.top_k)
        for s in slots:
            counts[s] += 1
            n_picks += 1
        for s in range(S):
            P[s] = P[s] + p[s] / N
    keep = range(S) if cfg.balance_skip else range(E)
    return [counts[s] / n_picks for s in keep], [P[s] for s in keep]


def hand_switch(f, P):
    """n * sum_e f_e P_e over the n balanced slots."""
    return len(f) * sum(fe * pe for fe, pe in zip(f, P))


BALANCE_CASES = [
    dict(balance_loss="per_step", balance_skip=False),
    dict(balance_loss="per_step", balance_skip=True),
    dict(balance_loss="pooled", balance_skip=False),
    dict(balance_loss="pooled", balance_skip=True),
    dict(balance_loss="per_step", balance_skip=True, shared_slots=True, n_attn=2, n_ffn=4, top_k=3),
    dict(balance_loss="pooled", balance_skip=False, top_k=1, renormalize=False, router="mlp"),
    dict(balance_loss="pooled", balance_skip=True, dense_routing=True),
    dict(balance_loss="per_step", balance_skip=False, skip=False, router_temperature=0.4),
]


@pytest.mark.parametrize("case", BALANCE_CASES, ids=[",".join(f"{k}={v}" for k, v in c.items())
                                                     for c in BALANCE_CASES])
def test_balance_loss_by_hand(case):
    cfg = routing_config(**{**dict(depth=3, n_attn=3, n_ffn=2, router_temperature=0.7), **case})
    layer = randomize_(MoMLayer(cfg)).to(DT)
    with torch.no_grad():  # routers with token-dependent picks (the GPT-2 init gives near-uniform ones)
        for name, p in layer.named_parameters():
            if "_router." in name and p.dim() == 2:
                p.normal_(0.0, 3.0 / p.shape[1] ** 0.5)
    seen = capture_logits(layer)
    x = torch.randn(2, 7, cfg.n_embd, dtype=DT)                              # [B, T, D]
    aux = layer(x).aux_loss
    assert len(seen["attn"]) == len(seen["ffn"]) == cfg.depth
    terms = {r: [hand_f_P(l, E, cfg) for l in seen[r]] for r, E in (("attn", cfg.n_attn), ("ffn", cfg.n_ffn))}
    if cfg.balance_loss == "per_step":
        losses = [hand_switch(f, P) for r in ("attn", "ffn") for f, P in terms[r]]
    else:  # f and P averaged over the steps, one loss per router
        losses = []
        for r in ("attn", "ffn"):
            H = len(terms[r])
            f = [sum(fh[e] for fh, _ in terms[r]) / H for e in range(len(terms[r][0][0]))]
            P = [sum(Ph[e] for _, Ph in terms[r]) / H for e in range(len(terms[r][0][1]))]
            losses.append(hand_switch(f, P))
    want = sum(losses) / len(losses)
    assert math.isclose(aux.item(), want.item(), rel_tol=1e-12, abs_tol=1e-14), (aux.item(), want.item())
    # the gradient reaches the logits through P only (f is a count)
    logits = seen["attn"] + seen["ffn"]
    got = torch.autograd.grad(aux, logits, retain_graph=True)
    exp = torch.autograd.grad(want, logits)
    for i, (a, b) in enumerate(zip(got, exp)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14), (i, float((a - b).abs().max()))


def test_balance_loss_uniform_router_is_one():
    """Zero router heads and dense routing: f_e = P_e = 1/S for all S balanced slots, so the loss is 1."""
    cfg = routing_config(depth=2, dense_routing=True, balance_skip=True, top_k=1, renormalize=False)
    layer = MoMLayer(cfg).to(DT)
    with torch.no_grad():
        for r in (layer.attn_router, layer.ffn_router):
            r.head.weight.zero_()
            r.head.bias.zero_()
    out = layer(torch.randn(1, 5, cfg.n_embd, dtype=DT))
    assert math.isclose(out.aux_loss.item(), 1.0, rel_tol=1e-12)

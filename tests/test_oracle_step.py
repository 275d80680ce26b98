"""MoMLayer (mom/layer.py) against a from-scratch per-token loop: outputs, aux_loss and every gradient.

    B batch, T tokens per row, N = B*T, D = n_embd, H = n_head, hd = D / H, r = router_dim,
    S = router slots, E = pool size (id E = SKIP), K = top_k

The loop below shares nothing with the package but the parameter tensors: its own GRU cell (PyTorch's
GRUCell equations), softmax and top-K (tests/test_oracle_routing.py's hand helpers), LayerNorm, GELU,
the sum of the picked modules' QKV per token, ONE causal multi-head attention per step written as dot
products, the weighted output projection, the FFN router on the updated x with its own GRU state carried
across the steps, the weighted FFN modules, and the Switch balancing loss. Every backend runs the same
`route` and step loop, so only a test like this one catches a bug in them. fp64.
"""
import math

import pytest
import torch

from helpers import assert_close, randomize_
from mom import MoMConfig
from mom.layer import MoMLayer
from test_oracle_routing import hand_f_P, hand_softmax, hand_switch, hand_top_k

DT = torch.float64


def step_config(**kw) -> MoMConfig:
    """One chunk, no fixed blocks: the layer is exactly `depth` routed steps."""
    base = dict(vocab_size=11, n_positions=16, n_embd=12, n_head=3, n_inner=20, n_bottom=0, chunks=1,
                n_attn=3, n_ffn=2, depth=3, top_k=2, anchor=False, router="gru", router_dim=6, skip=True,
                router_temperature=0.7)
    base.update(kw)
    return MoMConfig(**base)


def make_layer(cfg: MoMConfig, skip_bias: float = 0.5) -> MoMLayer:
    """Randomised layer: every parameter perturbed, routers with token-dependent picks, SKIP slots favoured
    a little (so SKIP is picked) unless skip_bias = 0."""
    layer = randomize_(MoMLayer(cfg)).to(DT)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "_router." in name and p.dim() == 2:
                p.normal_(0.0, 3.0 / p.shape[1] ** 0.5)
        layer.attn_router.head.bias[cfg.n_attn:] += skip_bias
        layer.ffn_router.head.bias[cfg.n_ffn:] += skip_bias
    return layer


# ----------------------------------------------------------------------------------------------------------
# the per-token loop
# ----------------------------------------------------------------------------------------------------------
def layer_norm(u, gamma, beta, eps):  # u [D]
    mu = u.mean()
    var = ((u - mu) ** 2).mean()
    return (u - mu) / torch.sqrt(var + eps) * gamma + beta


def gelu_tanh(u):
    return 0.5 * u * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u ** 3)))


def router_step(router, cfg, x, s):
    """One token: (logits [S], new state [r]). GRU: r, z, n gates in PyTorch's order; MLP: stateless."""
    if cfg.router == "mlp":
        hid = torch.relu(router.fc.weight @ x + router.fc.bias)
        return router.head.weight @ hid + router.head.bias, s
    c, R = router.cell, cfg.router_dim
    gi = c.weight_ih @ x + c.bias_ih                                          # [3r]
    gh = c.weight_hh @ s + c.bias_hh                                          # [3r]
    r = torch.sigmoid(gi[:R] + gh[:R])
    z = torch.sigmoid(gi[R:2 * R] + gh[R:2 * R])
    n = torch.tanh(gi[2 * R:] + r * gh[2 * R:])
    s = (1 - z) * n + z * s
    return router.head.weight @ s + router.head.bias, s


def token_picks(logits, E, cfg):
    """One token's picks: [(module id or E, weight g)], weights as route() defines them, by hand."""
    p = hand_softmax(logits, cfg.router_temperature)                         # [S]
    S = p.shape[0]
    slots = list(range(S)) if cfg.dense_routing else hand_top_k(logits, cfg.top_k)
    total = sum(p[s] for s in slots)
    out = []
    for s in slots:
        g = p[s] / total if cfg.renormalize and not cfg.dense_routing else p[s]
        if cfg.straight_through:
            g = g - g.detach() + 1.0
        out.append((min(s, E), g))
    return out


def attention(q, k, v, B, T, H):
    """Causal multi-head attention, one query at a time. q, k, v: lists of N vectors [D]; returns N [D]."""
    D = q[0].shape[0]
    hd = D // H
    o = []
    for b in range(B):
        for i in range(T):
            heads = []
            for h in range(H):
                sl = slice(h * hd, (h + 1) * hd)
                qi = q[b * T + i][sl]
                scores = torch.stack([qi @ k[b * T + j][sl] for j in range(i + 1)]) / math.sqrt(hd)
                a = torch.exp(scores - scores.max())
                a = a / a.sum()
                heads.append(sum(a[j] * v[b * T + j][sl] for j in range(i + 1)))
            o.append(torch.cat(heads))
    return o


def loop_forward(layer: MoMLayer, x):
    """x [B, T, D] -> (hidden states [B, T, D], aux_loss, picks per step {"attn": [...], "ffn": [...]})."""
    cfg = layer.config
    B, T, D = x.shape
    N, eps = B * T, cfg.layer_norm_epsilon
    Ea, Ef = cfg.n_attn, cfg.n_ffn
    pa, pf = layer.attn_pool, layer.ffn_pool
    xs = [x[b, t] for b in range(B) for t in range(T)]                       # N x [D]
    sa = [x.new_zeros(cfg.router_dim) for _ in range(N)]                     # GRU states, 0 at chunk start
    sf = [x.new_zeros(cfg.router_dim) for _ in range(N)]
    logits_seen, picks_seen = {"attn": [], "ffn": []}, {"attn": [], "ffn": []}
    for _ in range(cfg.depth):
        # attention router, QKV summed over each token's picks, one attention over all tokens
        la, picks = [], []
        for t in range(N):
            lt, sa[t] = router_step(layer.attn_router, cfg, xs[t], sa[t])
            la.append(lt)
            picks.append(token_picks(lt, Ea, cfg))
        qkv = []
        for t in range(N):
            acc = x.new_zeros(3 * D)                                          # all SKIP: q = k = v = 0
            for m, g in picks[t]:
                if m < Ea:
                    u = layer_norm(xs[t], pa.ln_weight[m], pa.ln_bias[m], eps)
                    acc = acc + (g if cfg.weighted_qkv else 1.0) * (u @ pa.c_attn_weight[m] + pa.c_attn_bias[m])
            qkv.append(acc)
        o = attention([v[:D] for v in qkv], [v[D:2 * D] for v in qkv], [v[2 * D:] for v in qkv], B, T,
                      cfg.n_head)
        for t in range(N):
            for m, g in picks[t]:
                if m < Ea:
                    xs[t] = xs[t] + g * (o[t] @ pa.c_proj_weight[m] + pa.c_proj_bias[m])
        logits_seen["attn"].append(torch.stack(la))
        picks_seen["attn"].append(picks)
        # FFN router on the updated x (state carried from the previous step), weighted FFN modules
        lf, picks = [], []
        for t in range(N):
            lt, sf[t] = router_step(layer.ffn_router, cfg, xs[t], sf[t])
            lf.append(lt)
            picks.append(token_picks(lt, Ef, cfg))
        for t in range(N):
            x_in = xs[t]
            for m, g in picks[t]:
                if m < Ef:
                    u = layer_norm(x_in, pf.ln_weight[m], pf.ln_bias[m], eps)
                    hid = gelu_tanh(u @ pf.c_fc_weight[m] + pf.c_fc_bias[m])
                    xs[t] = xs[t] + g * (hid @ pf.c_proj_weight[m] + pf.c_proj_bias[m])
        logits_seen["ffn"].append(torch.stack(lf))
        picks_seen["ffn"].append(picks)
    # Switch balancing loss, per step or pooled over the steps
    terms = {r: [hand_f_P(l, E, cfg) for l in logits_seen[r]] for r, E in (("attn", Ea), ("ffn", Ef))}
    if cfg.balance_loss == "per_step":
        losses = [hand_switch(f, P) for r in terms for f, P in terms[r]]
    else:
        losses = []
        for r in terms:
            H = len(terms[r])
            f = [sum(th[0][e] for th in terms[r]) / H for e in range(len(terms[r][0][0]))]
            P = [sum(th[1][e] for th in terms[r]) / H for e in range(len(terms[r][0][1]))]
            losses.append(hand_switch(f, P))
    return torch.stack(xs).view(B, T, D), sum(losses) / len(losses), picks_seen


# ----------------------------------------------------------------------------------------------------------
# the comparison
# ----------------------------------------------------------------------------------------------------------
def grads_of(loss, x, layer):
    names = [n for n, _ in layer.named_parameters()]
    leaves = [x] + [p for _, p in layer.named_parameters()]
    gs = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return dict(zip(["x"] + names, gs))


def check_layer_against_loop(cfg, layer, B=2, T=5, rtol=1e-9, atol=1e-11):
    x = torch.randn(B, T, cfg.n_embd, dtype=DT, requires_grad=True)          # [B, T, D]
    dy = torch.randn(B, T, cfg.n_embd, dtype=DT)
    c_aux = 0.37                                                              # weight of aux in the loss
    out = layer(x)
    want_h, want_aux, picks = loop_forward(layer, x)
    # the same picks (as sets per token), then values and gradients
    for h, step in enumerate(out.routing):
        for r, ids, w in (("attn", step.attn_ids, step.attn_weights), ("ffn", step.ffn_ids, step.ffn_weights)):
            got = [sorted(zip(i, g)) for i, g in zip(ids.reshape(B * T, -1).tolist(),
                                                     w.detach().reshape(B * T, -1).tolist())]
            want = [sorted((m, g.item()) for m, g in tp) for tp in picks[r][h]]
            assert [[m for m, _ in p] for p in got] == [[m for m, _ in p] for p in want], \
                f"step {h} {r} router: picks differ"
            err = max(abs(a[1] - b[1]) for p, q in zip(got, want) for a, b in zip(p, q))
            assert err <= 1e-12, f"step {h} {r} router: weights differ by {err:.3g}"
    assert_close("hidden_states", out.hidden_states, want_h, rtol, atol)
    assert_close("aux_loss", out.aux_loss, want_aux, rtol, atol)
    got = grads_of((out.hidden_states * dy).sum() + c_aux * out.aux_loss, x, layer)
    want = grads_of((want_h * dy).sum() + c_aux * want_aux, x, layer)
    for name in want:
        assert_close(f"grad {name}", got[name], want[name], rtol, atol)
    assert got["x"].abs().max() > 0 and got["attn_router.head.weight"].abs().max() > 0
    return picks


CASES = [
    dict(),                                                          # GRU, top-2, renormalised, tau 0.7
    dict(router="mlp"),
    dict(renormalize=False, router_temperature=1.6),
    dict(weighted_qkv=True),
    dict(weighted_qkv=True, straight_through=True),
    dict(straight_through=True, renormalize=False),
    dict(dense_routing=True, balance_loss="pooled", balance_skip=True),
    dict(shared_slots=True, n_attn=2, n_ffn=4, balance_skip=True),   # several SKIP slots: all-SKIP tokens
    dict(top_k=3, n_attn=4, n_ffn=3, depth=2, balance_loss="pooled", router_temperature=0.4),
    dict(top_k=2, skip=False, n_attn=3, n_ffn=3, depth=2),
]


def case_id(c):
    return ",".join(f"{k}={v}" for k, v in c.items()) or "default"


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_layer_matches_per_token_loop(case, backend):
    cfg = step_config(backend=backend, **case)
    layer = make_layer(cfg, skip_bias=1.5 if cfg.shared_slots else 0.5)
    picks = check_layer_against_loop(cfg, layer)
    if cfg.skip:  # SKIP really was picked, in both routers
        for r, E in (("attn", cfg.n_attn), ("ffn", cfg.n_ffn)):
            assert any(m == E for step in picks[r] for tp in step for m, _ in tp), f"{r}: no SKIP pick"
    if cfg.shared_slots:
        assert any(all(m == cfg.n_attn for m, _ in tp) for step in picks["attn"] for tp in step), \
            "no token with only SKIP attention picks"


def test_layer_matches_loop_triton_backend():
    """The Triton kernels (interpreter on the CPU) in the same layer: one small case."""
    pytest.importorskip("triton")
    cfg = step_config(backend="triton", depth=2, n_attn=3, n_ffn=2, weighted_qkv=True)
    layer = make_layer(cfg)
    picks = check_layer_against_loop(cfg, layer, B=1, T=6)
    assert any(m == cfg.n_attn for step in picks["attn"] for tp in step for m, _ in tp)

"""Capacity (expert-choice) routing, mom/capacity.py and mom_kernels/capacity.py: the picks against loops written
here (ties, capacity 1, one token, T = 1), the Triton route and its uniform plan against the spec, every gradient;
the model: static training work (the same FLOPs for any input), causal inference (cached decoding equals the full
forward, no token depends on later ones), the aux loss, the train / inference agreement, and bad settings."""
import math

import pytest
import torch

from helpers import assert_close, assert_same_run, cached_logits, make_model, run_backend, small_config
from mom import MoMConfig, flops
from mom.capacity import agreement, force_mode, route_capacity
from mom.config import ConfigError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _loop_picks(logits, T, C):
    """taken [N, E] by the rule written out: per sequence and module, sort the tokens by (-logit, token index) and
    take the first C."""
    N, E = logits.shape
    taken = torch.zeros(N, E, dtype=torch.bool)
    for b in range(N // T):
        for m in range(E):
            order = sorted(range(T), key=lambda t: (-float(logits[b * T + t, m]), t))
            for t in order[:C]:
                taken[b * T + t, m] = True
    return taken


def _cfg(**kw):
    return small_config(routing="expert_choice", **kw)


@pytest.mark.parametrize("B,T,E,capacity", [(2, 9, 3, None), (3, 5, 4, 1.0), (2, 7, 3, 0.01), (4, 1, 3, 0.5),
                                            (1, 16, 5, 0.3)])
def test_picks_weights_and_aux_loss_against_a_loop(B, T, E, capacity):
    """Integer logits make ties: the earlier token wins them. capacity 1: every token; 0.01: one token per module
    (ceil); T = 1: each module takes the only token."""
    cfg = _cfg(capacity=capacity, router_temperature=0.7, capacity_scale=0.5)
    logits = torch.randint(-3, 4, (B * T, E)).double()
    C = cfg.capacity_tokens(E, T)
    assert C == max(1, min(T, math.ceil((capacity or cfg.top_k / E) * T - 1e-9)))
    taken = _loop_picks(logits, T, C)
    r = route_capacity(logits, E, cfg, T, train=True)
    assert torch.equal(r.ids, torch.where(taken, torch.arange(E), E))
    s = torch.sigmoid(logits / 0.7)
    assert_close("weights", r.weights, torch.where(taken, 0.5 * s, 0.0), 1e-15, 1e-15)
    want = -(taken * torch.log(s) + (~taken) * torch.log(1 - s)).mean()
    assert_close("aux", r.balance, want, 1e-12, 1e-12)
    for b in range(B):  # every module takes exactly C tokens of every sequence
        assert torch.equal((r.ids[b * T:(b + 1) * T] < E).sum(0), torch.full((E,), C))
    inference = route_capacity(logits, E, cfg, T, train=False)
    assert torch.equal(inference.ids < E, logits >= 0) and inference.balance is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,T,E,C", [(2, 9, 3, 5), (3, 40, 4, 7), (1, 1, 2, 1), (2, 33, 5, 33)])
def test_triton_route_and_uniform_plan_against_the_spec(B, T, E, C, dtype):
    from mom_kernels.capacity import capacity_route
    from mom_kernels.routing import make_plan_torch

    cfg = _cfg(capacity=C / T, router_temperature=0.8, capacity_scale=0.3)
    assert cfg.capacity_tokens(E, T) == C
    base = torch.randint(-4, 5, (E, B * T), dtype=torch.float64)
    base[:, 1::2] += 0.25 * torch.randn(E, B * T // 2, dtype=torch.float64)
    logits = base.t().to(dtype)  # non-contiguous; the even tokens' integer logits tie (the earlier token wins)
    dw, dp, dl = torch.randn(B * T, E, dtype=dtype), torch.randn(B * T, E, dtype=dtype), torch.tensor(0.7, dtype=dtype)

    def grads(fn):
        leaf = logits.detach().clone().requires_grad_()
        out = fn(leaf)
        loss = (out[0] * dw).sum() + (out[1] * dp).sum() + out[2] * dl
        return [t.detach() for t in out] + [torch.autograd.grad(loss, leaf)[0]]

    want = grads(lambda z: (lambda r: (r.weights, r.probs, r.balance))(route_capacity(z, E, cfg, T, True)))
    ids, _, _, _, plan = capacity_route(logits, E, T, C, 0.8, 0.3, True)
    got = grads(lambda z: capacity_route(z, E, T, C, 0.8, 0.3, True)[1:4])
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.equal(ids, route_capacity(logits, E, cfg, T, True).ids)
    for name, a, b in zip(("weights", "probs", "loss", "dlogits"), got, want):
        assert_close(name, a, b, tol, tol)
    ref = make_plan_torch(ids, E, plan.block_m)
    S = B * C * E
    assert torch.equal(plan.offsets, ref.offsets) and torch.equal(plan.sorted_pick[:S], ref.sorted_pick[:S])
    covered = torch.zeros(S, dtype=torch.int32)  # every row of every module in exactly one tile of its module
    for m, start in zip(plan.tile_module.tolist(), plan.tile_row_start.tolist()):
        if m < E:
            end = min(start + plan.block_m, int(plan.offsets[m + 1]))
            assert int(plan.offsets[m]) <= start < end
            covered[start:end] += 1
    assert torch.equal(covered, torch.ones(S, dtype=torch.int32))
    assert capacity_route(logits, E, T, C, 0.8, 0.3, False)[4] is None  # the threshold rule: no uniform plan


@pytest.mark.parametrize("kw", [dict(), dict(family="llama", n_embd=24, router="mlp", weighted_qkv=True)])
def test_torch_equals_reference_with_a_slot_per_module(kw):
    """Pools of 4 and 5 modules: every token has one pick slot per module, so the torch backend sums a token's
    picks slot by slot (mom.routed._SLOT_LOOP_FROM); logits, losses and every gradient (the routing weights'
    too) against the reference loop in fp64, in training and with the threshold rule."""
    from mom.routed import _SLOT_LOOP_FROM

    cfg = _cfg(n_attn=_SLOT_LOOP_FROM, n_ffn=_SLOT_LOOP_FROM + 1, capacity=0.4, **kw)
    model = make_model(cfg, torch.float64).to(DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (2, 7), device=DEVICE)
    assert_same_run(run_backend(model, ids, "torch"), run_backend(model, ids, "reference"), 1e-10, 1e-10)
    with force_mode(model, "threshold"):
        assert_same_run(run_backend(model, ids, "torch"), run_backend(model, ids, "reference"), 1e-10, 1e-10)


def test_training_work_is_static_and_matches_the_expected_count():
    """In training every module takes ceil(c T) tokens of every sequence: the counted FLOPs are the same for any
    input, and equal mom.flops.expected."""
    cfg = _cfg(backend="torch", capacity=0.4)
    model = make_model(cfg, torch.float32).train()
    counts = {flops.count(model, torch.randint(0, cfg.vocab_size, (3, 11))).total for _ in range(3)}
    assert counts == {flops.expected(cfg, 3, 11).total}


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_inference_is_causal_and_cached_decoding_equals_the_full_forward(backend):
    cfg = _cfg(backend=backend, router="mlp")
    model = make_model(cfg, torch.float64).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        assert_close("cached", cached_logits(model, ids, 4)[0], full, 1e-10, 1e-10)
        later = ids.clone()
        later[:, 6:] = torch.randint(0, cfg.vocab_size, (2, 4))
        assert torch.equal(model(later).logits[:, :6], full[:, :6])
        with force_mode(model, "train"):  # training's top capacity looks at the whole sequence
            assert not torch.equal(model(later).logits[:, :6], model(ids).logits[:, :6])


def test_aux_loss_trains_the_logits_toward_the_picks():
    """The model's aux loss is the mean BCE of its routers (training-style steps); eval forwards have none."""
    cfg = _cfg(backend="torch", aux_loss_coef=0.5)
    model = make_model(cfg, torch.float64).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    out = model(ids, labels=ids)
    assert out.aux_loss > 0 and math.isclose(out.loss.item(), (out.lm_loss + 0.5 * out.aux_loss).item(), rel_tol=1e-12)
    assert out.aux_loss.requires_grad
    model.eval()
    assert float(model(ids, labels=ids).aux_loss) == 0.0


def test_agreement_of_training_and_inference_choices(tmp_path):
    from mom import data as mdata

    d = str(tmp_path / "data")
    mdata.prepare("sample", d, "bpe:512", cache=d + "-cache")
    cfg = MoMConfig.from_name("tiny", routing="expert_choice", backend="torch")
    model = make_model(cfg, torch.float32)
    val = mdata.TokenData(d, "val", 32)
    r = agreement(model, val, batch_size=4, n_windows=8)
    assert 0 <= r["agreement"] <= 1 and 0 < r["taken_train"] < 1
    taken = cfg.capacity_tokens(cfg.n_attn, 32) * cfg.n_attn + cfg.capacity_tokens(cfg.n_ffn, 32) * cfg.n_ffn
    assert r["taken_train"] == pytest.approx(taken / (32 * (cfg.n_attn + cfg.n_ffn)), rel=1e-12)  # ceil(c T) each
    assert math.isfinite(r["val_loss_train"]) and math.isfinite(r["val_loss_threshold"])
    assert model.training  # restored


@pytest.mark.parametrize("kw, field", [
    (dict(routing="expert_choice", capacity=0.0), "capacity"), (dict(routing="expert_choice", capacity=1.5), "capacity"),
    (dict(routing="expert_choice", capacity=math.nan), "capacity"), (dict(routing="expert_choice", capacity="0.5"),
                                                                        "capacity"),
    (dict(routing="expert-choice"), "routing"), (dict(routing="expert_choice", dense_routing=True), "dense_routing"),
    (dict(routing="expert_choice", balance_loss="pooled"), "balance_loss"),
    (dict(routing="expert_choice", shared_slots=True), "shared_slots"),
    (dict(routing="expert_choice", routing_prior=50.0, routing_prior_steps=10), "routing_prior"),
    (dict(capacity=0.5), "capacity"), (dict(routing="expert_choice", capacity_scale=0.0), "capacity_scale"),
])
def test_bad_settings_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"MoMConfig\.{field}="):
        small_config(**kw)

"""The function-preserving cut (mom/cut.py): at phase 2's start the MoM's logits are the vanilla's, exactly
(fp64); the routing prior then decays (training forwards only) and is gone after routing_prior_steps; the
default cut and default state dicts are unchanged; configs that cannot preserve the function are named."""
import pytest
import torch

from mom import MoMConfig, MoMForCausalLM
from mom.convert import from_gpt2
from mom.cut import preserving_config, preserving_problems

REPRO = dict(vocab_size=256, n_positions=32, n_embd=32, n_head=4, router_dim=16, n_bottom=1, chunks=1, n_attn=4,
             n_ffn=4, depth=4, top_k=2, anchor=True, n_top=1)

CASES = {
    "repro layout (M = depth = 4, K = 2)": {},
    "two chunks": dict(chunks=2),
    "no anchor, no top": dict(anchor=False, n_top=0, n_bottom=0),
    "K = 1, depth > M (extra steps SKIP)": dict(top_k=1, depth=6, renormalize=False),
    "K = 1 renormalised": dict(top_k=1, depth=4),
    "MLP router": dict(router="mlp"),
    "tau 0.2, weighted qkv": dict(router_temperature=0.2, weighted_qkv=True),
    "shared slots": dict(shared_slots=True),
    "straight-through": dict(straight_through=True),
}


def vanilla_and_cut(backend="torch", seed=0, **kw):
    cfg = MoMConfig.from_name("tiny", **{**REPRO, **kw}, backend=backend)
    torch.manual_seed(seed)
    van = MoMForCausalLM(cfg.vanilla()).eval()
    with torch.no_grad():  # a vanilla whose layers differ clearly (not the near-identity of a fresh init)
        for p in van.parameters():
            p.add_(0.05 * torch.randn_like(p))
    mom = from_gpt2(van.state_dict(), cfg, preserving=True, prior_steps=10).double()  # (from_gpt2 builds fp32)
    van = van.double()
    with torch.no_grad():  # routers far from their N(0, 0.02) init: their own logits of a few nats
        for name, p in mom.named_parameters():
            if "_router." in name and not name.endswith("prior_bias"):
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    return van, mom.eval()


@pytest.mark.filterwarnings("ignore:MoMConfig. top_k=1")
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_the_vanilla_fp64(case, backend):
    van, mom = vanilla_and_cut(backend, **CASES[case])
    x = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    a, b = van(x).logits, mom(x).logits
    assert torch.equal(a, b) or (a - b).abs().max().item() < 1e-12, (a - b).abs().max().item()
    routing = mom(x).routing
    assert routing is not None
    E = mom.config.n_attn
    for chunk in routing:  # step h picks module h first (SKIP = E past the pool), then SKIP
        for h, r in enumerate(chunk):
            for ids in (r.attn_ids, r.ffn_ids):
                assert (ids[..., 0] == min(h, E)).all()
                assert (ids[..., 1:] == E).all()


def test_presets():
    """Which presets can be cut function-preservingly, and why the others cannot."""
    ok = {n: not preserving_problems(MoMConfig.from_name(n)) for n in
          ("mom-small", "mom-medium", "mom-large-deep", "mom-large-efficient", "tiny")}
    assert ok == {"mom-small": True, "mom-medium": False, "mom-large-deep": True, "mom-large-efficient": False,
                  "tiny": False}
    assert any("depth=8 < M=10" in p for p in preserving_problems(MoMConfig.from_name("mom-medium")))
    tiny = preserving_problems(MoMConfig.from_name("tiny"))
    assert any("n_attn=3 != n_ffn=4" in p for p in tiny)
    assert any("top_k=3" in p for p in preserving_problems(MoMConfig.from_name("tiny", **{**REPRO, "top_k": 3})))
    with pytest.raises(ValueError, match="cannot be cut function-preservingly"):
        from_gpt2(MoMForCausalLM(MoMConfig.from_name("tiny").vanilla()).state_dict(), MoMConfig.from_name("tiny"),
                  preserving=True)


def test_exactness_bound_at_its_boundary_fp64():
    """routing_prior P = 38, the bound: with the routers as the cut leaves them (N(0, 0.02): own logits of a few
    hundredths) every step's weight on module h, renormalised over {h, SKIP}, is exactly 1.0 in fp64 and the MoM
    computes the vanilla's logits; P = 37.9, just past the bound, is refused, naming it. Why 38: the weight
    1 / (1 + exp(-P)) rounds to 1.0 from P = 53 ln 2 = 36.74 on; below that it is 1 - 2^-53 (P = 36.5 here,
    routers zeroed), and 38 leaves 1.26 nats of margin for the router's own logits."""
    from mom.routers import GRURouter, route

    cfg = MoMConfig.from_name("tiny", **REPRO, backend="torch")
    assert preserving_problems(cfg.replace(routing_prior=38.0, routing_prior_steps=10)) == []
    past = preserving_problems(cfg.replace(routing_prior=37.9, routing_prior_steps=10))
    assert any("routing_prior=37.9 < 38" in p for p in past), past
    with pytest.raises(ValueError, match="routing_prior=37.9 < 38"):
        preserving_config(cfg, 10, prior=37.9)
    torch.manual_seed(0)
    van = MoMForCausalLM(cfg.vanilla()).eval()
    with torch.no_grad():
        for p in van.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cut = cfg.replace(routing_prior=38.0, routing_prior_steps=10)
    mom = from_gpt2(van.state_dict(), cut, preserving=True).double()
    mom.eval()
    assert mom.config.routing_prior == 38.0
    x = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(5))
    out = mom(x)
    for chunk in out.routing:
        for r in chunk:
            assert torch.all(r.attn_weights[..., 0] == 1.0) and torch.all(r.ffn_weights[..., 0] == 1.0)
    assert (out.logits - van.double()(x).logits).abs().max().item() < 1e-12
    for P, exact in ((38.0, True), (36.8, True), (36.5, False)):   # the edge itself, routers zeroed
        c = cfg.replace(routing_prior=P, routing_prior_steps=10)
        router = GRURouter(c, c.attn_slots).double()
        with torch.no_grad():
            for p in router.parameters():
                p.zero_()
        logits, _ = router(torch.randn(2, c.n_embd, dtype=torch.float64), None)
        w = route(logits, c.n_attn, c).weights[:, 0]
        assert bool(torch.all(w == 1.0)) == exact, (P, (1 - w).tolist())


@pytest.mark.filterwarnings("ignore:MoMConfig. top_k=1")
@pytest.mark.parametrize("over,problem", [
    pytest.param(dict(skip=False, top_k=2), "top_k=2 > 1 + skip", id="k2-no-skip"),   # 2nd pick: a module
    pytest.param(dict(top_k=3), "top_k=3 > 1 + skip", id="k3"),
    pytest.param(dict(depth=6), "depth=6 > M=4", id="extra-steps-k2"),                # they add a module
    pytest.param(dict(depth=6, top_k=1, skip=False), "depth=6 > M=4", id="extra-steps-no-skip"),
    pytest.param(dict(depth=3), "depth=3 < M=4", id="fewer-steps"),
    pytest.param(dict(n_attn=3), "n_attn=3 != n_ffn=4", id="pools-differ"),
    pytest.param(dict(dense_routing=True), "dense_routing", id="dense"),
    pytest.param(dict(top_k=1, depth=6, renormalize=False), None, id="extra-steps-k1-skip"),  # SKIP alone
    pytest.param(dict(top_k=1, skip=False, renormalize=False), None, id="k1-no-skip"),
    pytest.param({}, None, id="repro"),
])
def test_which_configs_can_preserve_the_function(over, problem):
    """Each rule of preserving_problems, one config on each side of it."""
    got = preserving_problems(MoMConfig.from_name("tiny", **{**REPRO, **over}))
    if problem is None:
        assert got == []
    else:
        assert any(problem in p for p in got), got


def test_default_cut_and_state_dict_unchanged():
    cfg = MoMConfig.from_name("tiny", **REPRO, backend="torch")
    assert cfg.routing_prior == 0
    m = MoMForCausalLM(cfg)
    assert not any("prior" in k for k in m.state_dict())
    assert all(r.prior is None for c in m.chunks for r in (c.attn_router, c.ffn_router))
    p = MoMForCausalLM(preserving_config(cfg, 5))
    assert sorted(set(p.state_dict()) - set(m.state_dict())) == [
        "chunks.0.attn_router.prior_t", "chunks.0.ffn_router.prior_t"]


def test_prior_decays_with_training_forwards_only():
    van, mom = vanilla_and_cut()
    cfg = mom.config
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    router = mom.chunks[0].attn_router
    ref = van(x).logits
    for _ in range(3):  # evaluation does not move the prior
        assert torch.equal(mom(x).logits, ref)
    assert router.prior_t.item() == 0
    mom.train()
    mom(x)  # the first training forward: still the vanilla's function (scale 1)
    assert router.prior_t.item() == 1 and mom.chunks[0].ffn_router.prior_t.item() == 1
    mom.eval()
    d1 = (mom(x).logits - ref).abs().max().item()
    assert 0 < d1  # now module h leads SKIP by routing_prior_from (4) nats: weight 0.98, close to the vanilla
    mom.train()
    for _ in range(cfg.routing_prior_steps):
        mom(x)
    mom.eval()
    free = MoMForCausalLM(cfg.replace(routing_prior=0.0, routing_prior_steps=0)).double().eval()
    free.load_state_dict({k: v for k, v in mom.state_dict().items() if "prior" not in k})
    assert torch.equal(mom(x).logits, free(x).logits)  # the prior has decayed to 0: the plain MoM


def test_train_init_from_with_prior_starts_at_phase1_loss(tmp_path):
    """mom.train's init_from with model_overrides routing_prior: phase 2's first loss is the vanilla's."""
    import json
    import os

    from mom import data as mdata
    from mom.train import TrainConfig, train
    d = str(tmp_path / "sample")
    mdata.prepare("sample", d, "bpe:512", cache=d + "-cache")
    ov = {**REPRO, "vocab_size": 512, "backend": "torch"}
    base = dict(model="tiny", data=d, batch_size=4, block_size=32, max_steps=3, warmup_steps=1, lr=3e-3,
                eval_interval=3, eval_windows=4, log_interval=1, ckpt_interval=0, progress=False, threads=1)
    train(TrainConfig(**{**base, "max_steps": 6}, model_overrides=ov, vanilla=True, out_dir=str(tmp_path / "p1")))
    losses = {}
    for name, extra in (("van", dict(vanilla=True)), ("pres", {}), ("plain", {})):
        o = dict(ov, routing_prior=50.0, routing_prior_steps=2) if name == "pres" else ov
        train(TrainConfig(**base, model_overrides=o, init_from=str(tmp_path / "p1"), out_dir=str(tmp_path / name),
                          **extra))
        with open(os.path.join(tmp_path / name, "metrics.jsonl")) as f:
            losses[name] = [r["lm_loss"] for r in map(json.loads, f) if "lm_loss" in r]
    assert abs(losses["pres"][0] - losses["van"][0]) < 1e-5      # same batch, same function (fp32)
    assert abs(losses["plain"][0] - losses["van"][0]) > 1e-3      # the paper's cut computes something else


@pytest.mark.parametrize("case", ["repro layout (M = depth = 4, K = 2)", "two chunks", "MLP router"])
def test_learned_prior_starts_exact_then_trains_and_never_decays(case):
    """routing_prior_learned: the vanilla's logits before training; then module h leads SKIP by
    routing_prior_from nats through a trained parameter that gets a gradient and is not decayed by training
    forwards (only an optimizer step moves it)."""
    from mom.train import no_decay

    van, mom = vanilla_and_cut(**CASES[case], routing_prior_learned=True)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    ref = van(x).logits
    assert (mom(x).logits - ref).abs().max().item() < 1e-12
    names = [n for n, _ in mom.named_parameters() if n.endswith("prior_bias")]
    assert len(names) == 2 * mom.config.chunks and all(no_decay(n) for n in names)
    router = mom.chunks[0].attn_router
    assert router.prior_bias.shape == (mom.config.depth, mom.config.attn_slots)
    tau, E = mom.config.router_temperature, mom.config.n_attn
    assert router.prior_bias[1, 1].item() == 2 * 4.0 * tau and router.prior_bias[1, E].item() == 4.0 * tau
    mom.train()
    mom(x).logits.sum().backward()                       # first training forward: still exact
    assert router.prior_bias.grad is not None
    mom.eval()
    after1 = mom(x).logits
    assert 0 < (after1 - ref).abs().max().item()         # module h by 4 nats over SKIP: close, not exact
    mom.train()
    for _ in range(5):                                   # training forwards alone do not decay it
        mom(x)
    mom.eval()
    assert torch.equal(mom(x).logits, after1)
    with torch.no_grad():                                # the parameter is the prior: zero it, the plain MoM
        for c in mom.chunks:
            c.attn_router.prior_bias.zero_()
            c.ffn_router.prior_bias.zero_()
    free = MoMForCausalLM(mom.config.replace(routing_prior=0.0, routing_prior_learned=False)).double().eval()
    free.load_state_dict({k: v for k, v in mom.state_dict().items() if "prior" not in k})
    assert torch.equal(mom(x).logits, free(x).logits)


@pytest.mark.parametrize("learned", [False, True])
def test_prior_checkpoints_load_back(tmp_path, learned):
    """A cut with a routing prior saves and loads (its integer step counter prior_t sorts before the weights in
    the file: the model's dtype must come from the weights), with the prior's state and function intact."""
    van, mom = vanilla_and_cut(routing_prior_learned=learned)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    mom.train()
    mom(x)                                       # one training forward: prior_t = 1
    mom.eval()
    mom.save_pretrained(str(tmp_path / "ckpt"))
    back = MoMForCausalLM.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert back.wte.weight.dtype == torch.float64
    assert back.chunks[0].attn_router.prior_t.item() == 1
    assert torch.equal(back(x).logits, mom(x).logits)

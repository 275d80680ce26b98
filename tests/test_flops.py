"""mom.flops: the analytic count equals torch's FlopCounterMode on the same forward; the preset claims.

Run: python -m pytest -q tests/test_flops.py   (a few seconds on 2 cores)
"""
import pickle

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mom import MoMConfig, MoMForCausalLM
from mom import flops
from helpers import make_model, small_config

RTOL = 0.01  # the bound we hold the count to; on these configs the two counts agree exactly

CONFIGS = {
    "vanilla-tiny-gpt2": lambda: MoMConfig.from_name("tiny-gpt2"),
    "vanilla-small": lambda: small_config(chunks=0, n_bottom=3, n_top=0, anchor=False),
    "routed-gru-k2-skip": lambda: small_config(),
    "tiny-preset": lambda: MoMConfig.from_name("tiny"),
    "mlp-k1-skip": lambda: small_config(router="mlp", top_k=1),              # all-SKIP tokens happen
    "gru-k3-shared-slots": lambda: small_config(n_attn=4, n_ffn=3, top_k=3, shared_slots=True, depth=3),
    "no-skip-weighted-qkv": lambda: small_config(skip=False, weighted_qkv=True, anchor=False),
    "dense-routing": lambda: small_config(dense_routing=True),
    # the Llama family: three FFN GEMMs, a narrower QKV (grouped-query attention), an untied head
    "vanilla-tiny-llama": lambda: MoMConfig.from_name("tiny-llama-vanilla"),
    "llama-gqa-bias-untied": lambda: small_config(family="llama", n_embd=24, num_key_value_heads=2,
                                                  attention_bias=True, tie_word_embeddings=False),
}


def _flop_counter_total(model, ids, past=None, math_sdpa=False):
    """What FlopCounterMode counts for model(ids): by default with the CPU SDPA kernel given the standard
    SDPA formula (flops.flop_counter); math_sdpa=True: torch's own FlopCounterMode on the math SDPA path."""
    with torch.no_grad():
        if math_sdpa:
            with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as fc:
                out = model(ids, past_key_values=past, use_cache=past is not None)
        else:
            with flops.flop_counter() as fc:
                out = model(ids, past_key_values=past, use_cache=past is not None)
    return fc.get_total_flops(), out


def _skip_picks(out, cfg):
    return sum(int((s.attn_ids >= cfg.n_attn).sum() + (s.ffn_ids >= cfg.n_ffn).sum())
               for chunk in out.routing for s in chunk)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_count_matches_flop_counter(name):
    cfg = CONFIGS[name]().replace(backend="torch")
    model = make_model(cfg, dtype=torch.float32, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (3, 19))
    want, out = _flop_counter_total(model, ids)
    got = flops.count(model, ids)
    assert isinstance(got, int)
    assert got == pytest.approx(want, rel=RTOL), (name, got, want)
    assert got == flops.count(model, ids, output=out)
    if cfg.chunks and cfg.skip and not cfg.dense_routing:
        # picks are token dependent and some are SKIP: the count is below the no-SKIP expectation
        assert _skip_picks(out, cfg) > 0
        assert got < flops.expected(cfg, 3, 19, skip_rate=0.0)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", ["routed-gru-k2-skip", "mlp-k1-skip", "llama-gqa-bias-untied"])
def test_count_matches_default_flop_counter_math_sdpa(name, backend):
    """torch's FlopCounterMode as shipped (math SDPA path, so its bmm calls are counted); both backends."""
    cfg = CONFIGS[name]().replace(backend=backend)
    model = make_model(cfg, dtype=torch.float32, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    want, out = _flop_counter_total(model, ids, math_sdpa=True)
    got = flops.count(model, ids, output=out)
    assert got == pytest.approx(want, rel=RTOL)
    # "torch" combines the K picks with a [1, K] x [K, D] product (counted), "reference" elementwise (not)
    assert (got.combine > 0) == (backend == "torch")


@pytest.mark.parametrize("name", ["vanilla-tiny-gpt2", "mlp-k1-skip"])
def test_count_with_kv_cache(name):
    """Decoding: T new tokens attend over P cached + T keys."""
    cfg = CONFIGS[name]().replace(backend="torch")
    model = make_model(cfg, dtype=torch.float32, seed=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        past = model(ids[:, :9], use_cache=True).past_key_values
    for new in (ids[:, 9:10], ids[:, 9:12]):
        want, _ = _flop_counter_total(model, new, past)
        assert flops.count(model, new, past_key_values=past) == pytest.approx(want, rel=RTOL)


def test_all_skip_rows_and_causal_field():
    cfg = small_config(router="mlp", top_k=1, backend="torch")
    model = make_model(cfg, dtype=torch.float32, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(ids)
    got = flops.count(model, ids, output=out)
    n_all_skip = sum(int((s.attn_ids >= cfg.n_attn).all(-1).sum()) for ch in out.routing for s in ch)
    assert n_all_skip > 0
    assert got.attention_all_skip == n_all_skip * 4 * 16 * cfg.n_embd
    # causal core: query i sees i + 1 of T keys -> (T + 1) / (2 T) of the full square
    assert got.attention_causal * 2 * 16 == got.attention * 17
    assert got.causal_total == got - got.attention + got.attention_causal
    d = got.as_dict()
    assert sum(d[k] for k in flops.PARTS) == d["total"] == got
    assert pickle.loads(pickle.dumps(got)).as_dict() == d


def test_expected_equals_count_without_skip():
    for cfg in (small_config(skip=False, backend="torch"), MoMConfig.from_name("tiny-gpt2"),
                small_config(dense_routing=True, backend="torch")):
        model = make_model(cfg, dtype=torch.float32, seed=4)
        ids = torch.randint(0, cfg.vocab_size, (2, 7))
        assert flops.count(model, ids).as_dict() == flops.expected(cfg, 2, 7).as_dict()


@pytest.mark.parametrize("name", ["vanilla-tiny-gpt2", "no-skip-weighted-qkv", "dense-routing"])
def test_expected_with_a_cache_equals_count_and_flop_counter(name):
    """T new tokens after P = 9 cached ones: expected(..., past_length=9), from the config alone, equals the
    count of that forward (no SKIP: every pick runs a module) and torch's FlopCounterMode; its attention core is
    4 B T (P + T) D per attention call (causal: 4 B D (T P + T (T + 1) / 2))."""
    cfg = CONFIGS[name]().replace(backend="torch")
    model = make_model(cfg, dtype=torch.float32, seed=5)
    B, P = 2, 9
    ids = torch.randint(0, cfg.vocab_size, (B, 12))
    with torch.no_grad():
        past = model(ids[:, :P], use_cache=True).past_key_values
    for T in (1, 3):
        new = ids[:, P:P + T]
        want = flops.expected(cfg, B, T, past_length=P)
        assert want.attention == cfg.n_cache_layers * 4 * B * T * (P + T) * cfg.n_embd
        assert want.attention_causal == cfg.n_cache_layers * 4 * B * cfg.n_embd * (T * P + T * (T + 1) // 2)
        assert flops.count(model, new, past_key_values=past).as_dict() == want.as_dict(), (name, T)
        counted, _ = _flop_counter_total(model, new, past)
        assert want == pytest.approx(counted, rel=RTOL), (name, T, want, counted)


def test_expected_skip_rate():
    cfg = MoMConfig.from_name("mom-large-efficient")
    e0, e_half, e1 = (flops.expected(cfg, 1, 1024, skip_rate=s) for s in (0.0, 0.5, 1.0))
    fixed = flops.expected(cfg.replace(chunks=0), 1, 1024)  # the 4 fixed blocks without the chunks
    assert e1.projections + e1.ffn < e_half.projections + e_half.ffn < e0.projections + e0.ffn
    assert e1.projections == fixed.projections + cfg.chunks * 1024 * 8 * 1280 ** 2  # anchors only
    assert (e0.projections + e0.ffn) - (e_half.projections + e_half.ffn) == \
        (e_half.projections + e_half.ffn) - (e1.projections + e1.ffn)
    with pytest.raises(ValueError):
        flops.expected(cfg, 1, 16, skip_rate=1.5)
    with pytest.raises(ValueError):
        flops.expected(cfg.replace(skip=False), 1, 16, skip_rate=0.1)


@pytest.mark.parametrize("cfg", [small_config(), MoMConfig.from_name("tiny"), small_config(router="mlp"),
                                 small_config(shared_slots=True), MoMConfig.from_name("tiny-gpt2"),
                                 MoMConfig.from_name("tiny-llama"), MoMConfig.from_name("tiny-llama-vanilla"),
                                 small_config(family="llama", n_embd=24, router="mlp")])
def test_num_parameters(cfg):
    model = MoMForCausalLM(cfg)
    assert flops.num_parameters(cfg) == model.num_parameters()
    no_routers = sum(p.numel() for n, p in model.named_parameters() if "_router." not in n)
    assert flops.num_parameters(cfg, routers=False) == no_routers


def test_paper_bounds_analytic():
    """The abstract's claims at full size, seq 1024 (docs/method.md): efficient <= 0.84x GPT-2-large's forward
    FLOPs (no SKIP: the worst case); deep = GPT-2-large's parameters (+ routers) at depth >= 50."""
    large = MoMConfig.from_name("gpt2-large")
    eff, deep = MoMConfig.from_name("mom-large-efficient"), MoMConfig.from_name("mom-large-deep")
    ratio = flops.expected(eff, 1, 1024) / flops.expected(large, 1, 1024)
    assert ratio <= 0.84, ratio
    assert flops.expected(eff, 1, 1024).causal_total / flops.expected(large, 1, 1024).causal_total <= 0.84
    assert eff.graph_depth <= 14 and eff.top_k > 1
    assert flops.num_parameters(large) == 774_030_080  # GPT-2-large, tied head (Hugging Face's count)
    assert flops.num_parameters(deep, routers=False) == flops.num_parameters(large)  # nothing dropped
    routers = flops.num_parameters(deep) - flops.num_parameters(deep, routers=False)
    assert 0 < routers <= 0.0125 * flops.num_parameters(large)  # 4 chunks x 2 GRU routers: 9.47M (1.22%)
    assert deep.graph_depth >= 50


@pytest.mark.parametrize("name", ["smollm-135m", "smollm-360m", "qwen2.5-0.5b"])
def test_llama_presets_analytic(name):
    """The published parameter counts from the config alone, and the efficient cut's forward FLOPs: about 2/3 of
    the layers' work per token at seq 1024 (the LM head and attention core included: below 0.8x)."""
    from test_llama import PUBLISHED

    vanilla, eff = MoMConfig.from_name(name), MoMConfig.from_name(f"mom-{name}-efficient")
    assert flops.num_parameters(vanilla) == PUBLISHED[name][0]
    assert flops.num_parameters(eff, routers=False) == flops.num_parameters(vanilla)
    ratio = flops.expected(eff, 1, 1024) / flops.expected(vanilla, 1, 1024)
    assert 0.6 < ratio < 0.8, ratio
    assert eff.top_k > 1 and eff.graph_depth < vanilla.graph_depth / 2

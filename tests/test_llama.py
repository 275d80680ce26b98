"""The Llama family against transformers' own LlamaForCausalLM / Qwen2ForCausalLM (small random configs, offline,
fp64, eager attention): the vanilla cut's logits (from the model object, and from a save_pretrained folder, sharded
or not), the function-preserving one-module cut, greedy generation; the routed cut's cached decoding and left
padding; `MoMConfig.from_hf` and its refusals; the presets' parameter counts against transformers' models of the
published shapes."""
import pytest
import torch

from helpers import assert_close, cached_logits, randomize_
from mom import MoMConfig, MoMForCausalLM
from mom.config import ConfigError

transformers = pytest.importorskip("transformers")

# transformers computes the rotary tables in fp32 (ours: fp64, then rounded), hence 1e-5 and not 1e-10
HF_TOL = 1e-5
KINDS = {
    "llama_gqa_untied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_mha_tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen2_bias": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)),
}


def hf_model(kind: str, n_layers: int = 4, seed: int = 0):
    family, kw = KINDS[kind]
    cls, cfg_cls = ((transformers.LlamaForCausalLM, transformers.LlamaConfig) if family == "llama" else
                    (transformers.Qwen2ForCausalLM, transformers.Qwen2Config))
    cfg = cfg_cls(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=n_layers,
                  num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=500.0,
                  attn_implementation="eager", bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    torch.manual_seed(seed)
    model = cls(cfg).double().eval()
    randomize_(model, scale=2.0)  # norms and biases away from 1 / 0
    return model


@pytest.mark.parametrize("kind", list(KINDS))
def test_vanilla_cut_matches_transformers(kind):
    hf = hf_model(kind)
    ours = MoMForCausalLM.from_hf(hf).eval()
    cfg = ours.config
    assert cfg.family == "llama" and cfg.chunks == 0 and cfg.n_bottom == 4
    assert cfg.kv_heads == hf.config.num_key_value_heads and cfg.qkv_bias == (kind == "qwen2_bias")
    assert ("lm_head.weight" in dict(ours.named_parameters())) == (not hf.config.tie_word_embeddings)
    ids = torch.randint(0, 97, (3, 17))
    with torch.no_grad():
        assert_close("logits", ours(ids).logits, hf(ids).logits, HF_TOL, HF_TOL)


@pytest.mark.parametrize("kind", ["llama_gqa_untied", "qwen2_bias"])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_from_a_save_pretrained_folder(kind, shard, tmp_path):
    """A folder transformers wrote (one safetensors file, or shards with an index) loads bit for bit the same as
    the model object."""
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard is not None)
    ids = torch.randint(0, 97, (2, 9))
    a, b = MoMForCausalLM.from_hf(hf), MoMForCausalLM.from_hf(str(tmp_path))
    assert a.config == b.config
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("kind", ["llama_gqa_untied", "qwen2_bias"])
def test_one_module_pools_reproduce_the_source(kind, backend):
    """Pools of one module, depth 1, top-1, no SKIP, anchors: the routed cut computes the source model."""
    hf = hf_model(kind, n_layers=6)
    cfg = MoMConfig.from_hf(hf.config, n_bottom=1, chunks=2, n_attn=1, n_ffn=1, depth=1, top_k=1, skip=False,
                            renormalize=False, anchor=True, n_top=1, backend=backend)
    routed = MoMForCausalLM.from_hf(hf, cfg)
    vanilla = MoMForCausalLM.from_hf(hf)
    ids = torch.randint(0, 97, (2, 13))
    got = routed(ids)
    assert all(torch.equal(s.attn_ids, torch.zeros_like(s.attn_ids)) for c in got.routing for s in c)
    assert_close("logits", got.logits, vanilla(ids).logits, 1e-12, 1e-12)
    with torch.no_grad():
        assert_close("logits vs transformers", got.logits, hf(ids).logits, HF_TOL, HF_TOL)


def test_function_preserving_cut_of_a_llama():
    hf = hf_model("llama_gqa_untied", n_layers=6)
    cfg = MoMConfig.from_hf(hf.config, n_bottom=1, chunks=1, n_attn=4, n_ffn=4, depth=4, top_k=2, n_top=1,
                            backend="torch")
    mom = MoMForCausalLM.from_hf(hf, cfg, preserving=True)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert_close("logits", mom(ids).logits, hf(ids).logits, HF_TOL, HF_TOL)


def _routed(kind="llama_gqa_untied", backend="torch"):
    hf = hf_model(kind, n_layers=6)
    cfg = MoMConfig.from_hf(hf.config, n_bottom=1, chunks=1, n_attn=3, n_ffn=4, depth=3, top_k=2, anchor=True,
                            n_top=0, router_dim=16, backend=backend)
    return hf, MoMForCausalLM.from_hf(hf, cfg).double().eval()


def test_cached_decoding_equals_the_full_forward():
    _, model = _routed()
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        logits, out = cached_logits(model, ids, 6)
    assert_close("incremental logits", logits, full, 1e-10, 1e-10)
    assert out.past_key_values[0][0].shape[1] == 2  # K/V heads only: GQA's saving shows in the cache


def test_left_padded_row_equals_the_row_alone_and_static_cache_decoding():
    """Positions from the attention mask (as transformers counts them): a left-padded row's prefill and decode
    steps (StaticCache, mom.generate) give the logits of the row alone."""
    from mom.cache import StaticCache

    _, model = _routed()
    short, long_ = torch.randint(3, 97, (1, 5)), torch.randint(3, 97, (1, 8))
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long_])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    new = torch.randint(3, 97, (2, 3))
    with torch.no_grad():
        cache = StaticCache(model.config, 2, 11, torch.float64)
        logits = [model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1]]
        for t in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            logits.append(model(new[:, t:t + 1], attention_mask=mask, past_key_values=cache).logits[:, -1])
        for row, alone in ((0, short), (1, long_)):
            want = model(torch.cat([alone, new[row:row + 1]], 1)).logits[0, alone.shape[1] - 1:]
            assert_close(f"row {row}", torch.stack([lg[row] for lg in logits]), want, 1e-10, 1e-10)


def test_greedy_generate_equals_transformers():
    hf = hf_model("llama_gqa_untied")
    ours = MoMForCausalLM.from_hf(hf).eval()
    ids = torch.randint(3, 97, (2, 6))
    hf.generation_config.eos_token_id = None  # no stop token: 8 new tokens each
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


def test_save_and_load_are_bit_exact(tmp_path):
    _, model = _routed("qwen2_bias")
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = MoMForCausalLM.from_pretrained(str(tmp_path / "ckpt"))
    assert loaded.config == model.config
    for (n, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), n
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)


def test_from_hf_config_fields_and_layout():
    hf = hf_model("qwen2_bias", n_layers=6)
    van = MoMConfig.from_hf(hf.config)
    assert (van.family, van.n_embd, van.n_head, van.kv_heads, van.ffn_dim, van.vocab_size, van.n_positions) == \
        ("llama", 32, 4, 2, 40, 97, 64)
    assert (van.layer_norm_epsilon, van.rope_theta, van.qkv_bias, van.tie_word_embeddings) == (1e-6, 500.0, True, False)
    assert van.chunks == 0 and van.n_bottom == 6
    assert MoMConfig.from_hf(hf.config.to_dict()) == van  # a config.json's fields
    cut = MoMConfig.from_hf(hf.config, n_bottom=1, chunks=1, n_attn=4, n_ffn=4, depth=2, n_top=1, top_k=2)
    assert cut.vanilla() == van
    gpt2 = MoMConfig.from_hf(transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=50, n_positions=20))
    assert (gpt2.family, gpt2.n_bottom, gpt2.n_embd, gpt2.qkv_bias, gpt2.tie_word_embeddings) == ("gpt2", 3, 32, True, True)


@pytest.mark.parametrize("make, field", [
    (lambda: transformers.BertConfig(), "model_type='bert'"),
    (lambda: transformers.MistralConfig(sliding_window=4096), "sliding_window"),
    (lambda: transformers.Qwen2Config(use_sliding_window=True), "use_sliding_window"),
    (lambda: transformers.LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "rope_type='linear'"),
    (lambda: transformers.LlamaConfig(mlp_bias=True), "mlp_bias"),
    (lambda: transformers.LlamaConfig(attention_bias=True), "attention_bias"),
    (lambda: transformers.LlamaConfig(hidden_act="gelu"), "hidden_act"),
    (lambda: transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=32), "head_dim"),
    (lambda: transformers.GPT2Config(activation_function="relu"), "activation_function"),
])
def test_unsupported_architectures_are_refused_by_name(make, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")):
        MoMConfig.from_hf(make())


def test_bad_checkpoints_and_layouts_name_the_problem(tmp_path):
    hf = hf_model("llama_gqa_untied")
    with pytest.raises(ConfigError, match="consumes source_layers=5 .* the llama model has 4"):
        MoMConfig.from_hf(hf.config, n_bottom=1, chunks=1, n_attn=2, n_ffn=2, depth=2, n_top=1, anchor=True,
                          top_k=2)
    with pytest.raises(ConfigError, match=r"\['n_embd'\] come from the llama config"):
        MoMConfig.from_hf(hf.config, n_embd=64)
    other = MoMConfig.from_hf(hf.config).replace(num_key_value_heads=4)
    with pytest.raises(ValueError, match="kv_heads: config 4, checkpoint 2"):
        MoMForCausalLM.from_hf(hf, other)
    with pytest.raises(FileNotFoundError, match="no weights"):
        hf.config.save_pretrained(tmp_path)
        MoMForCausalLM.from_hf(str(tmp_path))
    sd = {k: v for k, v in hf.state_dict().items() if "layers.2.mlp.up_proj" not in k}
    with pytest.raises(ValueError, match=r"layer 2 has \['mlp.gate_proj.weight'\] but not \['mlp.up_proj.weight'\]"):
        from mom.convert import hf_to_vanilla
        hf_to_vanilla(sd, MoMConfig.from_hf(hf.config))
    sd = dict(hf.state_dict())
    sd["model.layers.0.mlp.down_proj.bias"] = torch.zeros(32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer 0 has tensors with no place in the model: \['mlp.down_proj.bias'\]"):
        hf_to_vanilla(sd, MoMConfig.from_hf(hf.config))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        MoMForCausalLM.from_hf(str(tmp_path / "missing"))


# published parameter counts of the checkpoints whose shapes the presets carry (model cards / config sizes)
PUBLISHED = {"smollm-135m": (134_515_008, transformers.LlamaConfig),
             "smollm-360m": (361_821_120, transformers.LlamaConfig),
             "qwen2.5-0.5b": (494_032_768, transformers.Qwen2Config)}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_parameter_counts(name):
    """Each Llama-family preset has the published parameter count, and so does transformers' model of the same
    config (both built on the meta device); its efficient cut keeps every layer, plus the routers."""
    count, cfg_cls = PUBLISHED[name]
    cfg = MoMConfig.from_name(name)
    hf_cfg = cfg_cls(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_dim,
                     num_hidden_layers=cfg.n_bottom, num_attention_heads=cfg.n_head,
                     num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.n_positions,
                     tie_word_embeddings=True)
    with torch.device("meta"):
        ours = MoMForCausalLM(cfg).num_parameters()
        theirs = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(hf_cfg).parameters())
        cut = MoMForCausalLM(MoMConfig.from_name(f"mom-{name}-efficient"))
    assert ours == theirs == count
    routers = sum(p.numel() for n, p in cut.named_parameters() if "_router." in n)
    assert cut.num_parameters() - routers == count
    assert MoMConfig.from_name(f"mom-{name}-efficient").source_layers == cfg.n_bottom


def test_two_phase_training_of_a_llama(tmp_path):
    """mom.train: phase 1 trains the vanilla Llama-family model (tiny-llama's: RMSNorm, SwiGLU, rotary, GQA,
    q/k/v biases, untied head) and lowers its loss; phase 2 cuts its checkpoint into tiny-llama and trains on;
    mom.analysis reads the routed checkpoint's routing, and removal runs on it."""
    import json
    import math
    import os

    from mom import analysis
    from mom import data as mdata
    from mom.train import TrainConfig, train

    data = str(tmp_path / "sample")
    mdata.prepare("sample", data, "bpe:512", cache=data + "-cache")
    base = dict(model="tiny-llama", data=data, batch_size=8, warmup_steps=5, lr=3e-3, eval_interval=10,
                eval_windows=8, log_interval=1, ckpt_interval=0, progress=False, threads=1,
                model_overrides={"backend": "torch"})
    p1, p2 = str(tmp_path / "phase1"), str(tmp_path / "phase2")
    train(TrainConfig(**base, out_dir=p1, vanilla=True, max_steps=20))
    with open(os.path.join(p1, "metrics.jsonl")) as f:
        val = [r["val_loss"] for r in map(json.loads, f) if "val_loss" in r]
    assert val[-1] < val[0] and val[-1] < math.log(512) - 0.5, val  # below the uniform guess by 0.5 nats
    first = MoMForCausalLM.from_pretrained(os.path.join(p1, "ckpt"))
    assert first.config.family == "llama" and first.config.chunks == 0 and hasattr(first, "lm_head")
    train(TrainConfig(**base, out_dir=p2, init_from=p1, max_steps=6))
    cut = MoMForCausalLM.from_pretrained(os.path.join(p2, "ckpt"))
    assert cut.config == MoMConfig.from_name("tiny-llama", backend="torch")
    val = mdata.TokenData(data, "val", 32)
    freqs = analysis.pick_frequencies(cut, val, n_windows=4, batch_size=4)
    drops = analysis.least_used(freqs, 0.5, 0.25)
    removed = analysis.remove_modules(cut, drops["attn"], drops["ffn"])
    assert (removed.config.n_attn, removed.config.n_ffn) == (3 - len(drops["attn"][0]), 4 - len(drops["ffn"][0]))
    assert analysis.evaluate(removed, val, n_windows=4, batch_size=4) < 7.0  # finite, below ln(512) + 0.8


def test_compiles_fullgraph_and_loads_through_auto_classes(tmp_path):
    """torch.compile(fullgraph=True) traces a routed Llama-family MoM (the rotary tables, GQA attention, the
    opaque routed ops) to the eager logits and loss; the native checkpoint's model through mom.hf and
    AutoModelForCausalLM gives the same logits, and greedy generation through transformers runs."""
    import mom.hf as mhf

    cfg = MoMConfig.from_name("tiny-llama", backend="torch")
    model = MoMForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    want = model(ids, labels=ids)
    got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, labels=ids)
    assert_close("compiled logits", got.logits, want.logits, 1e-6, 1e-6)
    got.loss.backward()
    model.eval()
    mhf.MoMHFForCausalLM.from_mom(model).save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.model.config == cfg and not loaded.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    out = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 12)

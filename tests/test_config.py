"""MoMConfig validation, presets, and bad inputs to the model: clear errors that name the problem."""
import pytest
import torch

from helpers import make_model, small_config
from mom import MoMConfig, MoMForCausalLM, PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_round_trip_json(name):
    cfg = MoMConfig.from_name(name)
    assert MoMConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.graph_depth >= 1


def test_from_name_overrides_and_unknown():
    assert MoMConfig.from_name("tiny", top_k=1).top_k == 1
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        MoMConfig.from_name("gpt3")
    with pytest.raises(ValueError, match="unknown field"):
        MoMConfig.from_dict({"n_layers": 3})


BAD = [
    (dict(n_embd=30, n_head=4), "n_head", "divide"),
    (dict(vocab_size=0), "vocab_size", ">= 1"),
    (dict(n_positions=-1), "n_positions", ">= 1"),
    (dict(n_inner=0), "n_inner", ">= 1"),
    (dict(n_inner=2.5), "n_inner", "int"),
    (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon", "> 0"),
    (dict(n_bottom=-1), "n_bottom", ">= 0"),
    (dict(chunks=-2), "chunks", ">= 0"),
    (dict(n_attn=0), "n_attn", ">= 1"),
    (dict(n_ffn=0), "n_ffn", ">= 1"),
    (dict(depth=0), "depth", ">= 1"),
    (dict(top_k=0), "top_k", ">= 1"),
    (dict(top_k=4, n_attn=3, skip=False), "top_k", "router slots"),
    (dict(top_k=4, n_ffn=2), "top_k", "n_ffn pool"),
    (dict(router="lstm"), "router", "one of"),
    (dict(router_dim=0), "router_dim", ">= 1"),
    (dict(router_temperature=0.0), "router_temperature", "> 0"),
    (dict(aux_loss_coef=-0.1), "aux_loss_coef", ">= 0"),
    (dict(balance_loss="global"), "balance_loss", "one of"),
    (dict(backend="cuda"), "backend", "one of"),
    (dict(skip=1), "skip", "bool"),
    (dict(anchor="yes"), "anchor", "bool"),
    (dict(depth=2.0), "depth", "int"),
    (dict(n_bottom=0, chunks=0, n_top=0), "n_bottom", "at least one block"),
    (dict(shared_slots=True, skip=False, n_attn=2, n_ffn=3, top_k=1), "shared_slots", "n_attn == n_ffn"),
]


def test_top1_renormalized_routing_warns():
    with pytest.warns(UserWarning, match="no gradient"):
        small_config(top_k=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small_config(top_k=1, renormalize=False)
        MoMConfig.from_name("mom-large-deep")


@pytest.mark.parametrize("change,field,rule", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_invalid_config_names_field_and_rule(change, field, rule):
    with pytest.raises(ValueError) as e:
        small_config(**change)
    assert f"MoMConfig.{field}=" in str(e.value) and rule in str(e.value)


def test_set_backend_validates():
    model = MoMForCausalLM(small_config())
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("fast")


@pytest.fixture(scope="module")
def model():
    return make_model(small_config(backend="torch"))


def test_token_ids_outside_vocabulary(model):
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 61\)"):
        model(torch.tensor([[1, 2, 61]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 2]]))


def test_sequence_longer_than_n_positions(model):
    with pytest.raises(ValueError, match="n_positions=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    out = model(torch.zeros(1, 30, dtype=torch.long), use_cache=True)
    with pytest.raises(ValueError, match="30 cached"):
        model(torch.zeros(1, 3, dtype=torch.long), past_key_values=out.past_key_values)


def test_float_ids_wrong_rank_and_labels(model):
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="rank 2"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="rank 2"):
        model(torch.zeros(1, 2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(torch.zeros(2, 4, dtype=torch.long), labels=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[1, 2]])


def test_bad_cache(model):
    out = model(torch.zeros(2, 3, dtype=torch.long), use_cache=True)
    with pytest.raises(ValueError, match="expected"):
        model(torch.zeros(2, 1, dtype=torch.long), past_key_values=out.past_key_values[:-1])
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(1, 1, dtype=torch.long), past_key_values=out.past_key_values)


def test_layer_rejects_wrong_width(model):
    with pytest.raises(ValueError, match="n_embd=20"):
        model.chunks[0](torch.zeros(1, 3, 7, dtype=torch.float64))


def test_from_gpt2_rejects_mismatched_checkpoint():
    vanilla = MoMForCausalLM(small_config().vanilla())
    sd = {f"transformer.{k}": v for k, v in vanilla.state_dict().items()}
    with pytest.raises(ValueError, match="source_layers"):
        MoMForCausalLM.from_gpt2(sd, small_config(chunks=3))
    with pytest.raises(ValueError, match="n_embd"):
        MoMForCausalLM.from_gpt2(sd, small_config(n_embd=24, n_head=4))
    with pytest.raises(FileNotFoundError):
        MoMForCausalLM.from_gpt2("/nonexistent/model.safetensors", small_config())


@pytest.mark.parametrize("over,source,depth", [
    (dict(), 12, 10),                                   # tiny: 1 + 2 x (max(3, 4) + 1) + 1; 1 + 2 x (3 + 1) + 1
    (dict(n_attn=4, n_ffn=3), 12, 10),                  # the larger pool sets M either way
    (dict(anchor=False, n_top=0), 9, 7),
    (dict(chunks=0, n_bottom=5), 6, 6),                 # a GPT-2: 5 + 1 top block
])
def test_source_layers_and_graph_depth(over, source, depth):
    """source_layers = n_bottom + chunks x (max(n_attn, n_ffn) + anchor) + n_top (the GPT-2 layers a cut
    consumes); graph_depth = n_bottom + chunks x (depth + anchor) + n_top; the vanilla is that many layers."""
    cfg = MoMConfig.from_name("tiny", **over)
    assert (cfg.source_layers, cfg.graph_depth, cfg.n_cache_layers) == (source, depth, depth)
    assert cfg.vanilla().n_bottom == cfg.vanilla().graph_depth == source

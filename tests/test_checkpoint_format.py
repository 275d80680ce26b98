"""One checkpoint format: MoMForCausalLM.save_pretrained's folder loads with MoMForCausalLM.from_pretrained and,
after `import mom.hf`, with transformers' AutoModelForCausalLM and pipeline; what MoMHFForCausalLM.save_pretrained
writes loads natively; config.json files of the older native format still load; other model types are refused."""
import json

import pytest
import torch

from helpers import make_model, small_config
from mom import MoMForCausalLM
from mom.config import ConfigError

transformers = pytest.importorskip("transformers")


def _model(**kw):
    return make_model(small_config(backend="torch", vocab_size=300, n_positions=64, **kw), torch.float32).eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_native_checkpoint_loads_through_auto_classes(tmp_path, family):
    import mom.hf  # noqa: F401  (registers model_type "mom")

    model = _model(**({"family": "llama", "n_embd": 24, "tie_word_embeddings": False} if family == "llama" else {}))
    model.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "mom" and cfg["mom_top_k"] == model.config.top_k and "top_k" not in cfg
    ids = torch.randint(0, 300, (2, 9))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert loaded.model.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        assert torch.equal(MoMForCausalLM.from_pretrained(str(tmp_path))(ids).logits, model(ids).logits)


def test_transformers_written_checkpoint_loads_natively(tmp_path):
    import mom.hf as mhf

    model = _model()
    mhf.MoMHFForCausalLM.from_mom(model).save_pretrained(str(tmp_path), max_shard_size="50KB")  # shards, "model."
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = MoMForCausalLM.from_pretrained(str(tmp_path))
    assert loaded.config == model.config
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)


def test_older_native_config_still_loads_and_typos_do_not(tmp_path):
    model = _model()
    model.save_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(model.config.to_json())  # the format before model_type was written
    assert MoMForCausalLM.from_pretrained(str(tmp_path)).config == model.config
    (tmp_path / "config.json").write_text(json.dumps({**model.config.to_dict(), "n_embdd": 3}))
    with pytest.raises(ConfigError, match=r"config\.json: MoMConfig: unknown field\(s\) \['n_embdd'\]"):
        MoMForCausalLM.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="model_type='llama' is not a mom checkpoint .*from_hf"):
        MoMForCausalLM.from_pretrained(str(tmp_path))


def test_pipeline_generates_from_a_native_folder(tmp_path):
    import mom.hf  # noqa: F401

    from mom.tokenizer import train_bpe

    _model().save_pretrained(str(tmp_path))
    bpe = train_bpe(["a small text for a small tokenizer " * 20], 300)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.tokenizer, eos_token="<|endoftext|>",
                                               pad_token="<|endoftext|>")
    gen = transformers.pipeline("text-generation", model=str(tmp_path), tokenizer=tok, device="cpu")
    out = gen("a small", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("a small")

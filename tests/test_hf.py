"""mom.hf: a MoM through transformers' Auto classes, generate and pipeline, offline, with MoMForCausalLM's
weights and logits."""
import os

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, pipeline  # noqa: E402

import mom.hf as mhf  # noqa: E402  (registers model_type "mom")
from helpers import assert_close, make_model, small_config  # noqa: E402
from mom.tokenizer import train_bpe  # noqa: E402

VOCAB = 300


def _models():
    cfg = small_config(backend="torch", vocab_size=VOCAB, n_positions=64)
    model = make_model(cfg, dtype=torch.float32).eval()
    return model, mhf.MoMHFForCausalLM.from_mom(model).eval()


def _tokenizer():
    here = os.path.join(os.path.dirname(__file__), "..", "mom", "assets", "sample.txt")
    with open(here) as f:
        bpe = train_bpe([f.read()], VOCAB)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe.tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", padding_side="left")
    assert len(tok) == VOCAB
    return tok


def test_saved_model_loads_through_auto_classes_with_the_same_weights_and_logits(tmp_path):
    model, hf = _models()
    ids = torch.randint(0, VOCAB, (2, 9))
    assert_close("wrapped logits", hf(ids).logits, model(ids).logits, 0, 0)
    hf.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "mom"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, mhf.MoMHFForCausalLM) and loaded.model.config == model.config
    for (n, p), (_, q) in zip(model.named_parameters(), loaded.model.named_parameters()):
        assert torch.equal(p, q), n
    assert_close("loaded logits", loaded(ids).logits, model(ids).logits, 0, 0)
    out = loaded(ids, labels=ids)
    assert_close("loss", out.loss, model(ids, labels=ids).loss, 1e-6, 1e-6)


def test_hf_generate_equals_native_generate_with_left_padding():
    model, hf = _models()
    ids = torch.randint(1, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    want = model.generate(ids, max_new_tokens=7, attention_mask=mask, do_sample=False)
    got = hf.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_hf_sampling_options_and_eos():
    model, hf = _models()
    ids = torch.randint(1, VOCAB, (2, 4))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=True, top_p=0.9, top_k=20,
              temperature=0.8, pad_token_id=0)
    torch.manual_seed(0)
    a = hf.generate(ids, **kw)
    torch.manual_seed(0)
    b = hf.generate(ids, **kw)
    assert torch.equal(a, b) and a.shape[1] <= 12
    greedy = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=0)
    eos = int(greedy[0, 5])
    stopped = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)
    row = stopped[0, 4:].tolist()
    assert eos in row and all(t == 0 for t in row[row.index(eos) + 1:])


def test_pipeline_text_generation_offline():
    _, hf = _models()
    tok = _tokenizer()
    gen = pipeline("text-generation", model=hf, tokenizer=tok, device="cpu")
    out = gen(["The model", "A longer prompt here"], max_new_tokens=5, do_sample=False)
    assert len(out) == 2 and all(o[0]["generated_text"].startswith(p) for o, p in
                                 zip(out, ["The model", "A longer prompt here"]))


def test_logits_to_keep_computes_only_the_last_positions():
    """logits_to_keep=k: logits [B, k, V], those of the last k positions of the full forward; with a cache too
    (transformers' generate asks for 1 at every prefill and step)."""
    from transformers.cache_utils import DynamicCache

    model, hf = _models()
    ids = torch.randint(0, VOCAB, (2, 9))
    full = model(ids).logits                                                   # [2, 9, V]
    for k in (1, 3):
        out = hf(ids, logits_to_keep=k, use_cache=False).logits
        assert out.shape == (2, k, VOCAB)
        assert_close(f"last {k} logits", out, full[:, -k:], 1e-6, 1e-6)
    assert hf(ids, logits_to_keep=0, use_cache=False).logits.shape == (2, 9, VOCAB)   # 0: every position
    cache = DynamicCache(config=hf.config)
    hf(ids[:, :6], cache=cache)
    out = hf(ids[:, 6:], cache=cache, logits_to_keep=1).logits
    assert out.shape == (2, 1, VOCAB)
    assert_close("cached last logits", out, full[:, -1:], 1e-6, 1e-6)

"""Incremental decoding with a KV cache per routed step equals a full forward over the same tokens."""
import pytest
import torch

from helpers import assert_close, make_model, small_config


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case", [dict(), dict(router="mlp", top_k=1), dict(anchor=False, n_bottom=0, depth=3)])
def test_incremental_decoding_equals_full_forward(backend, case):
    cfg = small_config(backend=backend, **case)
    model = make_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    full = model(ids).logits                                    # [B, 12, V]
    # prefill 5 tokens, then 3 at once (a chunked prefill over a cache), then one at a time
    out = model(ids[:, :5], use_cache=True)
    steps = [out.logits]
    past = out.past_key_values
    assert len(past) == cfg.graph_depth
    for lo, hi in [(5, 8)] + [(t, t + 1) for t in range(8, 12)]:
        out = model(ids[:, lo:hi], past_key_values=past, use_cache=True)
        past = out.past_key_values
        steps.append(out.logits)
    assert_close("incremental logits", torch.cat(steps, dim=1), full, 1e-10, 1e-10)
    assert past[0][0].shape[2] == 12


def test_generate_greedy_matches_argmax_of_full_forward():
    cfg = small_config(backend="torch")
    model = make_model(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 4))
    seq = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert seq.shape == (2, 10) and torch.equal(seq[:, :4], prompt)
    logits = model(seq).logits
    assert torch.equal(seq[:, 4:], logits[:, 3:-1].argmax(-1))


def test_generate_sampling_is_reproducible_and_respects_top_k():
    cfg = small_config(backend="torch")
    model = make_model(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 3))
    a = model.generate(prompt, 5, temperature=0.8, top_k=3, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 5, temperature=0.8, top_k=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    logits = model(a).logits[0, 2:-1]                           # the distributions the samples came from
    top3 = logits.topk(3, dim=-1).indices
    assert all(int(a[0, 3 + i]) in top3[i].tolist() for i in range(5))


def test_generate_rejects_too_long():
    cfg = small_config(backend="torch")
    model = make_model(cfg).eval()
    with pytest.raises(ValueError, match="n_positions"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), max_new_tokens=5)

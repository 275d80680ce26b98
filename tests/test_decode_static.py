"""Static KV cache, left-padded batches, sampling options, stop tokens and the graphed decode step (mom/cache.py
StaticCache, mom/generate.py): each equals the full forward / the sequences one by one."""
import pytest
import torch

from helpers import assert_close, make_model, small_config
from mom.cache import StaticCache
from mom.generate import DecodeStep, sample_next


def _left_pad(prompts, pad=0):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case", [dict(), dict(router="mlp", top_k=1, renormalize=False),
                                  dict(anchor=False, n_bottom=0, depth=3)])
def test_static_cache_decoding_equals_full_forward(backend, case):
    cfg = small_config(backend=backend, **case)
    model = make_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    full = model(ids).logits
    cache = StaticCache(cfg, 2, 14, torch.float64)
    steps = []
    for lo, hi in [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, 12)]:
        out = model(ids[:, lo:hi], past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache
        steps.append(out.logits)
    assert_close("static-cache logits", torch.cat(steps, dim=1), full, 1e-10, 1e-10)
    assert int(cache.length) == cache.seen == 12 and cache.n_valid.tolist() == [12, 12]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_generate_greedy_equals_argmax_of_full_forward(dtype):
    cfg = small_config(backend="torch")
    model = make_model(cfg, dtype=dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (3, 5))
    seq = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert seq.shape == (3, 13) and torch.equal(seq[:, :5], prompt)
    assert torch.equal(seq[:, 5:], model(seq).logits[:, 4:-1].argmax(-1))


def test_graphed_step_runs_eagerly_on_cpu_and_equals_full_forward():
    cfg = small_config(backend="torch")
    model = make_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    full = model(ids).logits
    cache = StaticCache(cfg, 2, 9, torch.float64)
    with torch.no_grad():
        first = model(ids[:, :4], past_key_values=cache, logits_to_keep=1).logits
        step = DecodeStep(model, cache, cuda_graph=True)          # CPU: the same step, eager
        assert step.graph is None
        got = [first[:, -1]] + [step(ids[:, t]) for t in range(4, 9)]
    assert_close("decode-step logits", torch.stack(got, 1), full[:, 3:], 1e-10, 1e-10)
    with pytest.raises(ValueError, match="max_length"):
        model(ids[:, :1], past_key_values=cache)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_left_padded_batch_equals_sequences_one_by_one(backend):
    cfg = small_config(backend=backend)
    model = make_model(cfg).eval()
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (3, 7, 5)]
    ids, mask = _left_pad(prompts, pad=7)
    # forward with attention_mask: each row's real positions equal the row alone
    logits = model(ids, attention_mask=mask).logits
    for b, p in enumerate(prompts):
        alone = model(torch.tensor([p])).logits[0]
        assert_close(f"row {b} logits", logits[b, -len(p):], alone, 1e-10, 1e-10)
    # generation (greedy): each row of the padded batch generates what it generates alone
    batched = model.generate(ids, max_new_tokens=6, attention_mask=mask, do_sample=False)
    for b, p in enumerate(prompts):
        one = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)
        assert torch.equal(batched[b, -6:], one[0, -6:]), b


def test_forward_attention_mask_with_dynamic_cache_equals_full():
    cfg = small_config(backend="torch")
    model = make_model(cfg).eval()
    ids, mask = _left_pad([torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (2, 6)])
    full = model(ids, attention_mask=mask).logits
    out = model(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
    steps = [out.logits]
    for t in range(4, 6):
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values,
                    use_cache=True)
        steps.append(out.logits)
    got = torch.cat(steps, 1)
    assert_close("padded incremental logits", got[mask.bool()], full[mask.bool()], 1e-10, 1e-10)


def test_eos_stops_rows_and_pads_after():
    cfg = small_config(backend="torch")
    model = make_model(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 4))
    free = model.generate(prompt, max_new_tokens=10, do_sample=False)
    eos = int(free[0, 6])                                        # row 0 emits it at its 3rd new token (or before)
    seq = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=60)
    for b in range(2):
        gen, ref = seq[b, 4:].tolist(), free[b, 4:].tolist()
        stop = ref.index(eos) if eos in ref else len(ref)
        assert gen[:stop + 1] == ref[:stop + 1][:len(gen)]
        assert all(t == 60 for t in gen[stop + 1:])
    if all(eos in free[b, 4:].tolist() for b in range(2)):  # every row stopped: trimmed after the last stop
        assert seq.shape[1] == 4 + max(free[b, 4:].tolist().index(eos) for b in range(2)) + 1


def test_sampling_options():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, True, 1.0, top_k=1, generator=g), greedy)
    assert torch.equal(sample_next(logits, True, 1.0, top_p=1e-6, generator=g), greedy)
    assert torch.equal(sample_next(logits, False, 5.0), greedy)
    top5 = logits.topk(5, -1).indices
    for _ in range(20):
        s = sample_next(logits, True, 2.0, top_k=5, generator=g)
        assert all(int(s[b]) in top5[b].tolist() for b in range(4))
    p = torch.softmax(logits, -1)
    srt, idx = p.sort(-1, descending=True)
    nucleus = [idx[b, :int((srt[b].cumsum(0) < 0.5).sum()) + 1].tolist() for b in range(4)]
    for _ in range(20):
        s = sample_next(logits, True, 1.0, top_p=0.5, generator=g)
        assert all(int(s[b]) in nucleus[b] for b in range(4))
    cfg = small_config(backend="torch")
    model = make_model(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 3))
    kw = dict(max_new_tokens=6, do_sample=True, temperature=0.9, top_k=10, top_p=0.9)
    a = model.generate(prompt, generator=torch.Generator().manual_seed(3), **kw)
    b = model.generate(prompt, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)


def test_bad_input_names_the_problem():
    cfg = small_config(backend="torch")
    model = make_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    with pytest.raises(ValueError, match="n_positions"):
        model.generate(torch.zeros(1, 40, dtype=torch.long), max_new_tokens=1)   # prompt > n_positions
    with pytest.raises(ValueError, match="n_positions"):
        model.generate(ids, max_new_tokens=30)
    with pytest.raises(ValueError, match="max_length"):
        model.generate(ids, max_length=3)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ids, max_new_tokens=2, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, max_new_tokens=2, attention_mask=torch.tensor([[1, 1, 1, 1, 0]] * 2))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, max_new_tokens=2, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="max_length"):
        StaticCache(cfg, 2, 40)
    cache = StaticCache(cfg, 2, 6, torch.float64)
    with pytest.raises(ValueError, match="batch"):
        model(ids[:1], past_key_values=cache)
    model(ids, past_key_values=cache)
    with pytest.raises(ValueError, match="max_length=6"):
        model(ids[:, :2], past_key_values=cache)


def test_outputs_are_subscriptable_like_model_output():
    cfg = small_config(backend="torch")
    model = make_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 4))
    out = model(ids, labels=ids)
    assert out["logits"] is out.logits and out[0] is out.loss and out[1] is out.logits
    assert "loss" in out and "past_key_values" not in out
    with pytest.raises(KeyError, match="past_key_values"):
        out["past_key_values"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("chunks", [0, 2])
def test_cuda_graph_generation_equals_eager(chunks):
    cfg = small_config(backend="triton", chunks=chunks, n_positions=64)
    model = make_model(cfg, dtype=torch.float32).cuda().eval()
    ids, mask = _left_pad([torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (3, 9)])
    ids, mask = ids.cuda(), mask.cuda()
    eager = model.generate(ids, max_new_tokens=12, attention_mask=mask, do_sample=False)
    graphed = model.generate(ids, max_new_tokens=12, attention_mask=mask, do_sample=False, cuda_graph=True)
    assert torch.equal(eager, graphed)
    full_mask = torch.cat([mask, torch.ones(2, 12, dtype=mask.dtype, device="cuda")], 1)
    full = model(graphed, attention_mask=full_mask).logits                  # [2, 21, V]
    cache = StaticCache(cfg, 2, 21, torch.float32, "cuda")
    with torch.no_grad():
        model(graphed[:, :9], past_key_values=cache, attention_mask=mask)
        step = DecodeStep(model, cache, cuda_graph=True)
        assert step.graph is not None
        got = torch.stack([step(graphed[:, t]).clone() for t in range(9, 20)], 1)   # [2, 11, V]
    assert_close("graphed step logits", got, full[:, 9:20], 1e-4, 1e-4)

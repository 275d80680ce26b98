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


def test_every_row_stops_output_ends_after_the_last_rows_first_stop():
    """Stop ids every row emits (one taken from each row's free run): each row is its free run up to and
    including its first stop id, then padding; the output ends right after the last row's first stop,
    whether the loop noticed after every token or only every few."""
    cfg = small_config(backend="torch")
    model = make_model(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (3, 4))
    free = model.generate(prompt, max_new_tokens=10, do_sample=False)[:, 4:].tolist()    # [3][10]
    eos = [free[0][2], free[1][5], free[2][3]]
    first = [next(i for i, t in enumerate(row) if t in eos) for row in free]
    n = max(first) + 1                                               # <= 6 of the 10 allowed
    want = [row[:f + 1] + [60] * (n - f - 1) for row, f in zip(free, first)]
    for every in (1, 3, 8):
        seq = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=60,
                             stop_check_every=every)
        assert torch.equal(seq[:, :4], prompt) and seq[:, 4:].tolist() == want, (every, seq[:, 4:].tolist(), want)


def test_padding_masks_and_positions_against_loops():
    """The masks and position ids of a left-padded batch, dynamic (padding_attention) and static
    (StaticCache.begin, prefill then a decode step), against loops: query t at absolute position s sees key l
    iff l <= s and (l is a real token or l == s: a padding query sees itself, so its softmax has a term);
    its position id is the number of real tokens up to s, minus one (0 for leading padding)."""
    from mom.cache import padding_attention

    m = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])   # [B, 7]
    B, S = m.shape

    def want(mask_row, s, l):
        return l <= s and (bool(mask_row[l]) or l == s)

    for P in (0, 4):                                   # no cache; 4 cached + 3 new
        pos, mask = padding_attention(m, P, S - P)
        for b in range(B):
            for t in range(S - P):
                s = P + t
                assert int(pos[b, t]) == max(0, int(m[b, :s + 1].sum()) - 1), (P, b, t)
                assert [bool(x) for x in mask[b, 0, t]] == [want(m[b], s, l) for l in range(S)], (P, b, t)
    cfg = small_config()
    L = 9
    cache = StaticCache(cfg, B, L, torch.float64)
    new = m[:, :5].bool()                              # prefill of 5 (row 0: 3 padding, row 1: 1)
    pos, mask = cache.begin(new)
    keys = torch.zeros(B, L, dtype=torch.long)
    keys[:, :5] = m[:, :5]
    for b in range(B):
        for t in range(5):
            assert int(pos[b, t]) == max(0, int(new[b, :t + 1].sum()) - 1), (b, t)
            assert [bool(x) for x in mask[b, 0, t]] == [want(keys[b], t, l) for l in range(L)], (b, t)
    cache.end(new)
    pos, mask = cache.begin(torch.ones(B, 1, dtype=torch.bool))   # a decode step at position 5
    keys[:, 5] = 1
    for b in range(B):
        assert int(pos[b, 0]) == int(new[b].sum()), b  # the row's real tokens so far, not the cache's length
        assert [bool(x) for x in mask[b, 0, 0]] == [want(keys[b], 5, l) for l in range(L)], b


def test_left_padded_static_prefill_equals_the_dynamic_forward_everywhere():
    """A left-padded prefill into a static cache gives the logits of the same forward without a cache at every
    position, the padded ones included (fp64)."""
    cfg = small_config(backend="torch")
    model = make_model(cfg).eval()
    ids, mask = _left_pad([torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (3, 7, 5)], pad=7)
    with torch.no_grad():
        dyn = model(ids, attention_mask=mask).logits                                   # [3, 7, V]
        stat = model(ids, past_key_values=StaticCache(cfg, 3, 9, torch.float64), attention_mask=mask).logits
    assert_close("static prefill logits (padded positions too)", stat, dyn, 1e-10, 1e-10)


def test_padded_rows_decode_step_logits_equal_each_row_alone():
    """Decode steps of a left-padded batch: each row's logits (not only its argmax) equal those of the row's
    tokens alone, unpadded, through a full forward (fp64)."""
    cfg = small_config(backend="torch")
    model = make_model(cfg).eval()
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (3, 7, 5)]
    cont = torch.randint(0, cfg.vocab_size, (3, 4))                                    # fed tokens, [B, 4]
    ids, mask = _left_pad(prompts, pad=7)
    cache = StaticCache(cfg, 3, 7 + 4, torch.float64)
    with torch.no_grad():
        got = [model(ids, past_key_values=cache, attention_mask=mask, logits_to_keep=1).logits[:, -1]]
        step = DecodeStep(model, cache)
        got += [step(cont[:, t]).clone() for t in range(3)]
        got = torch.stack(got, 1)                                                      # [B, 4, V]
        for b, p in enumerate(prompts):
            alone = model(torch.tensor([p + cont[b, :3].tolist()])).logits[0, len(p) - 1:]   # [4, V]
            assert_close(f"row {b} (prompt of {len(p)}) decode logits", got[b], alone, 1e-10, 1e-10)


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


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    """Nucleus sampling keeps the smallest set of the most likely tokens whose probability reaches top_p, the
    token that crosses it included, renormalised: p = (0.2, 0.5, 0.3) with top_p 0.6 samples token 1 5/8 and
    token 2 3/8 of the time, token 0 never."""
    n = 4000
    logits = torch.tensor([[0.2, 0.5, 0.3]]).log().repeat(n, 1)
    s = sample_next(logits, True, 1.0, top_p=0.6, generator=torch.Generator().manual_seed(0))
    share = torch.bincount(s, minlength=3).double() / n
    assert share[0] == 0 and abs(share[2] - 0.375) < 0.03 and abs(share[1] - 0.625) < 0.03, share.tolist()


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

"""past_key_values is checked entry by entry (count, pairs, rank, batch, heads, head size, equal lengths, dtype,
device), with errors that name the entry and where it sits in the graph; a good cache still decodes exactly."""
import pytest
import torch

from helpers import make_model, small_config
from mom.cache import check_chunk_cache, check_past_key_values, graph_location


@pytest.fixture(scope="module")
def model():
    return make_model(small_config(backend="torch"), dtype=torch.float32)


@pytest.fixture(scope="module")
def past(model):
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    return model(ids, use_cache=True).past_key_values


def _with(past, i, k=None, v=None):
    out = list(past)
    out[i] = (past[i][0] if k is None else k, past[i][1] if v is None else v)
    return out


def _step(model, past, batch=2):
    return model(torch.ones(batch, 1, dtype=torch.long), past_key_values=past)


def test_graph_location_names_every_entry():
    cfg = small_config()  # 1 bottom, 2 chunks x (2 steps + anchor), 1 top
    assert [graph_location(cfg, i) for i in range(cfg.n_cache_layers)] == [
        "bottom block 0", "chunk 0 step 0", "chunk 0 step 1", "chunk 0 anchor", "chunk 1 step 0", "chunk 1 step 1",
        "chunk 1 anchor", "top block 0"]


def test_good_cache_passes_and_decodes_like_a_full_forward(model, past):
    assert check_past_key_values(past, model.config, 2) == 5
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    full = model(ids).logits[:, -1]
    cached = model(ids[:, 5:], past_key_values=model(ids[:, :5], use_cache=True).past_key_values).logits[:, -1]
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)
    assert check_past_key_values(tuple(tuple(e) for e in past), model.config, 2) == 5  # tuples are fine too


def test_bad_caches_name_the_entry(model, past):
    cfg = model.config
    k3 = past[3][0]
    cases = [
        (past[:-1], ValueError, "past_key_values has 7 entries, expected 8"),
        ({"a": 1}, TypeError, "must be a list of \\(k, v\\) tensor pairs"),
        (list(past[:2]) + [past[2][0]] + list(past[3:]), TypeError,
         r"past_key_values\[2\] \(chunk 0 step 1\) must be a \(k, v\) pair, got Tensor"),
        (list(past[:5]) + [(k3, k3, k3)] + list(past[6:]), TypeError, r"past_key_values\[5\].*of length 3"),
        (_with(past, 4, v=k3.tolist()), TypeError, r"past_key_values\[4\] \(chunk 1 step 0\): v must be a "
                                                    r"torch.Tensor, got list"),
        (_with(past, 3, k=k3[0]), ValueError, r"past_key_values\[3\] \(chunk 0 anchor\): k must be \[batch, kv_heads, "
                                              r"cached, head_dim\] \(rank 4\)"),
        (_with(past, 6, k=k3[:1], v=k3[:1]), ValueError, r"past_key_values\[6\] \(chunk 1 anchor\): k was made for "
                                                         r"batch 1, input_ids has batch 2"),
        (_with(past, 7, k=k3[:, :2]), ValueError, r"past_key_values\[7\] \(top block 0\): k has 2 heads, the model "
                                                  r"has 4 K/V heads"),
        (_with(past, 1, v=k3[..., :3]), ValueError, r"past_key_values\[1\] \(chunk 0 step 0\): v has head size 3, "
                                                    r"the model has n_embd / n_head = 5"),
        (_with(past, 5, k=k3[:, :, :4], v=k3[:, :, :4]), ValueError, r"past_key_values\[5\] \(chunk 1 step 1\): k "
                                                                     r"caches 4 positions, past_key_values\[0\] k "
                                                                     r"caches 5"),
        (_with(past, 2, v=k3[:, :, :3]), ValueError, r"past_key_values\[2\] \(chunk 0 step 1\): v caches 3 positions"),
        (_with(past, 0, k=past[0][0].double()), TypeError, r"past_key_values\[0\].*v has dtype torch.float32, "
                                                           r"past_key_values\[0\] k has torch.float64"),
        (_with(past, 7, v=past[7][1].half()), TypeError, r"past_key_values\[7\] \(top block 0\): v has dtype "
                                                         r"torch.float16"),
        (_with(past, 3, k=k3.long()), TypeError, r"past_key_values\[3\].*k has dtype torch.int64, expected a floating"),
        ([(k.double(), v.double()) for k, v in past], TypeError, r"past_key_values has dtype torch.float64, the model "
                                                                 r"computes in torch.float32"),
        (_with(past, 4, k=k3.to("meta")), ValueError, r"past_key_values\[4\].*k is on meta, past_key_values\[0\] k "
                                                      r"on cpu"),
        ([(k.to("meta"), v.to("meta")) for k, v in past], ValueError, r"past_key_values is on meta, the model "
                                                                       r"computes on cpu"),
    ]
    assert cfg.head_dim == 5
    for bad, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            _step(model, bad)


def test_unequal_lengths_no_longer_run_silently(model, past):
    longer = model(torch.ones(2, 6, dtype=torch.long), use_cache=True).past_key_values
    stitched = list(past[:4]) + list(longer[4:])   # half a cache from another, longer forward
    with pytest.raises(ValueError, match=r"past_key_values\[4\] \(chunk 1 step 0\): k caches 6 positions, "
                                         r"past_key_values\[0\] k caches 5"):
        _step(model, stitched)


def test_cache_under_autocast_is_accepted(model):
    ids = torch.ones(1, 3, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, use_cache=True)
        assert out.past_key_values[0][0].dtype == torch.bfloat16
        model(ids[:, :1], past_key_values=out.past_key_values)   # the autocast dtype is the activations' here
    with pytest.raises(TypeError, match="computes in torch.float32"):
        model(ids[:, :1], past_key_values=out.past_key_values)   # outside autocast it is not


def test_chunk_level_check(model):
    """check_chunk_cache: what MoMLayer.forward can call for its own past_key_values (depth + anchor entries)."""
    cfg = model.config
    x = torch.randn(2, 1, cfg.n_embd)
    chunk_past = model(torch.ones(2, 4, dtype=torch.long), use_cache=True).past_key_values[1:4]
    assert check_chunk_cache(chunk_past, cfg, x) == 4
    with pytest.raises(ValueError, match=r"MoMLayer: past_key_values\[1\] \(step 1\): k has 1 heads"):
        check_chunk_cache(_with(chunk_past, 1, k=chunk_past[1][0][:, :1]), cfg, x)
    with pytest.raises(ValueError, match=r"MoMLayer: past_key_values\[2\] \(anchor\): v caches 3 positions"):
        check_chunk_cache(_with(chunk_past, 2, v=chunk_past[2][1][:, :, :3]), cfg, x)
    with pytest.raises(ValueError, match=r"MoMLayer: past_key_values has 2 entries, expected 3"):
        check_chunk_cache(chunk_past[:2], cfg, x)
    with pytest.raises(TypeError, match=r"MoMLayer: past_key_values has dtype torch.float32, the model computes in "
                                        r"torch.float64"):
        check_chunk_cache(chunk_past, cfg, x.double())

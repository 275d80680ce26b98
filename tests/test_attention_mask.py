"""mom.blocks.additive_mask: a forward's bool attention mask converted once for all its attention calls (SDPA
would convert it with three kernels at each call); the attention is bit for bit what the bool mask gives."""
import pytest
import torch
import torch.nn.functional as F

from helpers import make_model, small_config
from mom import blocks
from mom.cache import StaticCache
from mom_kernels.launches import count_launches


_SDPA = F.scaled_dot_product_attention


def _bool_sdpa(q, k, v, attn_mask=None, **kw):
    """SDPA given the bool mask back (what SDPA did before the conversion moved out)."""
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask == 0
    return _SDPA(q, k, v, attn_mask=attn_mask, **kw)


def test_conversion_equals_sdpa_bool_mask():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(2, 3, s, 8, generator=g).to(dtype) for s in (4, 9, 9))
        mask = torch.rand(2, 1, 4, 9, generator=g) > 0.4
        mask[..., 0] = True                                      # every query sees a key
        add = blocks.additive_mask(mask, dtype)
        assert add.dtype == dtype and add.shape == mask.shape
        assert torch.equal(add == 0, mask) and torch.isneginf(add[~mask]).all()
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=add),
                           F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_converted_once_per_mask_dtype_and_version():
    mask = torch.tensor([[[[True, False, True]]]])
    a = blocks.additive_mask(mask, torch.float32)
    assert blocks.additive_mask(mask, torch.float32) is a                 # the same mask: no new kernels
    assert blocks.additive_mask(mask.clone(), torch.float32) is not a    # another tensor
    mask[..., 1] = True                                                   # changed in place: converted again
    b = blocks.additive_mask(mask, torch.float32)
    assert b is not a and torch.equal(b, torch.zeros(1, 1, 1, 3))
    c = blocks.additive_mask(mask, torch.float64)                         # another dtype: converted again
    assert c is not b and c.dtype == torch.float64
    assert blocks.additive_mask(None, torch.float32) is None
    f = torch.zeros(1, 1, 1, 3)
    assert blocks.additive_mask(f, torch.float32) is f                    # float masks pass through


def test_inference_mode_masks_are_converted_each_time():
    """Tensors made under torch.inference_mode have no version counter: converted at every call, still right."""
    cfg = small_config(backend="torch")
    model = make_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits[:, 4:]
    with torch.inference_mode():
        mask = torch.tensor([[[[True, False, True]]]])
        a = blocks.additive_mask(mask, torch.float32)
        assert torch.equal(a, torch.tensor([[[[0.0, float("-inf"), 0.0]]]]))
        assert blocks.additive_mask(mask, torch.float32) is not a
        cache = StaticCache(cfg, 1, 6, torch.float64)
        model(ids[:, :4], past_key_values=cache)
        step = model(ids[:, 4:], past_key_values=cache).logits
    assert torch.allclose(step, full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_decode_step_converts_the_mask_once_and_matches_bool_masks(backend, monkeypatch):
    """A static-cache decode step of a model with several attention calls: the mask is converted once (one
    logical_not; no where / scalar_tensor left), and its logits equal those of SDPA given the bool mask at
    every call, bit for bit."""
    cfg = small_config(backend=backend, depth=3)
    model = make_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0                                                       # a left-padded row

    def decode(sdpa=None):
        if sdpa is not None:
            monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
        cache = StaticCache(cfg, 2, 8, torch.float64)
        with torch.no_grad():
            model(ids, past_key_values=cache, attention_mask=mask)
            step_mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            with count_launches() as c:
                logits = model(ids[:, -1:], past_key_values=cache, attention_mask=step_mask).logits
        monkeypatch.undo()
        return logits, c

    logits, c = decode()
    n_attention = cfg.n_bottom + cfg.chunks * (cfg.depth + int(cfg.anchor)) + cfg.n_top
    assert n_attention >= 4
    assert c.aten["logical_not"] == 1 and c.aten["where"] == 0 and c.aten["scalar_tensor"] == 0, c.table()
    reference, _ = decode(_bool_sdpa)
    assert torch.equal(logits, reference)

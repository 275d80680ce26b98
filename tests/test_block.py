"""mom.MoMBlock, the drop-in layer: a tensor in and out (so it sits in nn.Sequential and trains there), its
routed steps equal to the MoMLayer it holds, causal and bidirectional attention checked against attention written
here, padding masks, mom.aux_loss, and bad arguments named."""
import pytest
import torch
import torch.nn as nn

import mom
from helpers import assert_close
from mom.blocks import merge_heads, split_heads
from mom.config import ConfigError


def test_sequential_trains():
    """The README's example: Linear -> MoMBlock -> Linear fits a target; the balance loss trains along."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), mom.MoMBlock(32, 4, 3, 3, 2), nn.Linear(32, 1))
    x = torch.randn(16, 10, 8)
    y = x[..., :1].cumsum(1)  # a causal target: the running sum of the first feature
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(net(x), y)
        total = loss + 0.01 * mom.aux_loss(net)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    block = net[1]
    assert block.aux_loss.requires_grad and all(p.grad is not None for p in block.layer.attn_router.parameters())


def _attention_oracle(x, block, causal):
    """The block's one routed step (depth 1, top-1 of one module, no SKIP) written out: LN, QKV, attention over
    every key (or the causal ones), output projection, FFN."""
    c, L = block.config, block.layer
    pa, pf = L.attn_pool, L.ffn_pool
    h = nn.functional.layer_norm(x, (c.n_embd,), pa.ln_weight[0], pa.ln_bias[0], c.layer_norm_epsilon)
    q, k, v = (h @ pa.c_attn_weight[0] + pa.c_attn_bias[0]).split(c.n_embd, -1)
    q, k, v = (split_heads(t, c.n_head) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / c.head_dim ** 0.5
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    x = x + merge_heads(s.softmax(-1) @ v) @ pa.c_proj_weight[0] + pa.c_proj_bias[0]
    u = nn.functional.layer_norm(x, (c.n_embd,), pf.ln_weight[0], pf.ln_bias[0], c.layer_norm_epsilon)
    f = nn.functional.gelu(u @ pf.c_fc_weight[0] + pf.c_fc_bias[0], approximate="tanh")
    return x + f @ pf.c_proj_weight[0] + pf.c_proj_bias[0]


@pytest.mark.parametrize("causal", [True, False])
def test_causal_and_bidirectional_attention(causal):
    block = mom.MoMBlock(16, 4, 1, 1, 1, top_k=1, skip=False, renormalize=False, causal=causal).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    assert_close("block", block(x), _attention_oracle(x, block, causal), 1e-12, 1e-12)
    x2 = x.clone()
    x2[:, -1] = torch.randn(2, 16, dtype=torch.float64)  # (not a constant shift: the LayerNorm would remove it)
    if causal:  # a later token never changes an earlier one's output
        assert torch.equal(block(x2)[:, :-1], block(x)[:, :-1])
    else:
        assert (block(x2)[:, 0] - block(x)[:, 0]).abs().max() > 1e-6


@pytest.mark.parametrize("causal", [True, False])
def test_padding_mask_equals_the_row_alone(causal):
    """Right-padded rows: the real tokens' outputs equal those of the row without its padding."""
    block = mom.MoMBlock(16, 4, 3, 2, 2, causal=causal, router="mlp").double().eval()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    with torch.no_grad():
        got = block(x, attention_mask=mask)
        assert_close("row 0", got[0, :6], block(x[:1, :6])[0], 1e-12, 1e-12)
        assert_close("row 1", got[1], block(x[1:])[0], 1e-12, 1e-12)


def test_llama_family_block():
    block = mom.MoMBlock(32, 4, 3, 3, 2, family="llama", num_key_value_heads=2, max_positions=64)
    assert block.config.norm == "rms" and block.layer.attn_pool.ln_bias is None
    y = block(torch.randn(2, 11, 32))
    assert y.shape == (2, 11, 32)


def test_block_equals_its_layer():
    block = mom.MoMBlock(24, 4, 3, 3, 2, router_temperature=0.5).double()
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    out = block.layer(x)
    assert torch.equal(block(x), out.hidden_states) and torch.equal(block.aux_loss, out.aux_loss)


@pytest.mark.parametrize("kwargs, named", [
    (dict(d_model=30, n_head=4, n_attn=3, n_ffn=3, depth=2), "MoMBlock.n_head=4: must divide n_embd=30"),
    (dict(d_model=32, n_head=4, n_attn=3, n_ffn=3, depth=2, top_k=5), "MoMBlock.top_k=5: must be <= the 4"),
    (dict(d_model=32, n_head=4, n_attn=0, n_ffn=3, depth=2), "MoMBlock.n_attn=0"),
    (dict(d_model=32, n_head=4, n_attn=3, n_ffn=3, depth=2, d_ff=0), "MoMBlock.d_ff=0"),
    (dict(d_model=32, n_head=4, n_attn=3, n_ffn=3, depth=2, routr="mlp"), "routr"),
    (dict(d_model=32, n_head=4, n_attn=3, n_ffn=3, depth=2, vocab_size=10), "not layer arguments"),
    (dict(d_model=32, n_head=4, n_attn=3, n_ffn=3, depth=2, causal="yes"), "MoMBlock.causal='yes'"),
])
def test_bad_arguments_are_named(kwargs, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        mom.MoMBlock(**kwargs)


def test_aux_loss_sums_every_block():
    torch.manual_seed(0)
    net = nn.Sequential(mom.MoMBlock(16, 4, 3, 3, 2), nn.GELU(), mom.MoMBlock(16, 4, 2, 3, 1))
    net(torch.randn(2, 5, 16))
    first, second = net[0].aux_loss, net[2].aux_loss
    assert first.item() > 0 and second.item() > 0
    assert torch.equal(mom.aux_loss(net), first + second) and torch.equal(mom.aux_loss(net[2]), second)


def test_bad_inputs_and_aux_loss_errors():
    block = mom.MoMBlock(16, 4, 2, 2, 1)
    with pytest.raises(ValueError, match=r"x must be \[batch, tokens, d_model=16\], got \(4, 16\)"):
        block(torch.randn(4, 16))
    with pytest.raises(ValueError, match="attention_mask must be"):
        block(torch.randn(2, 3, 16), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="has run a forward"):
        mom.aux_loss(nn.Sequential(block))
    with pytest.raises(ValueError, match="holds no MoMBlock"):
        mom.aux_loss(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="MoMConfig.top_k=5"):
        mom.MoMLayer(mom.MoMConfig(n_embd=16, n_head=4, n_attn=3, n_ffn=3, top_k=5))  # chunks=0 is checked too

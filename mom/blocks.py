"""GPT-2's building blocks and MoM's module pools.

Weights are stored as Hugging Face's GPT-2 stores them (Conv1D: [in, out]), so a GPT-2 checkpoint loads
key for key into the fixed blocks and slice for slice into the pools' stacked [E, in, out] weights.

    Block:         x -> x + attn(ln_1(x)) -> x + mlp(ln_2(x))               (pre-LN GPT-2 block)
    AttentionPool: E x (LN_m, c_attn [D, 3D], c_proj [D, D])                 (stacked: [E, ...])
    FFNPool:       E x (LN_m, c_fc [D, F], c_proj [F, D])                    (stacked: [E, ...])
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .config import MoMConfig

KVCache = Tuple[torch.Tensor, torch.Tensor]  # (k, v), each [B, n_head, T_past, head_dim]

try:  # flash-attn's causal kernel when installed (pip install "mom[flash]"); SDPA otherwise
    from flash_attn import flash_attn_func
except Exception:  # ImportError, or a build that does not match this torch
    flash_attn_func = None


class Conv1D(nn.Module):
    """y = x @ weight + bias with weight [in, out] (GPT-2's layout)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):  # [..., in] -> [..., out]
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


def causal_attention(q, k, v, past=None, mask: Optional[torch.Tensor] = None):
    """Causal multi-head attention of T new queries over P cached + T new keys.

    q, k, v: [B, n_head, T, head_dim]; past: (k, v) [B, n_head, P, head_dim], a static cache layer
    (mom.cache.StaticLayerCache: written in place, all L positions attended under `mask`) or None.
    mask: [B, 1, T, S] bool (True = may attend; S = P + T, or L with a static cache) for padded batches and
    static caches; None = plain causal. Returns o [B, n_head, T, head_dim] and the new cache: (k, v)
    [B, n_head, P + T, head_dim], or the static layer itself.
    """
    if past is not None and hasattr(past, "update"):  # static cache: fixed shapes, masked
        k, v = past.update(k, v)                       # [B, n_head, L, head_dim]
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype),
                                              attn_mask=additive_mask(mask, q.dtype)), past
    if past is not None:
        k = torch.cat([past[0], k], dim=2)
        v = torch.cat([past[1], v], dim=2)
    if mask is not None:                               # padding (attention_mask) with a dynamic cache
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(mask, q.dtype)), (k, v)
    T, S = q.shape[2], k.shape[2]
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        # flash-attn >= 2.1 aligns the causal mask bottom-right: query i sees keys 0 .. S - T + i, as below
        o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return o.transpose(1, 2), (k, v)
    if T == S:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif T == 1:  # one new token sees everything cached
        o = F.scaled_dot_product_attention(q, k, v)
    else:  # query i (absolute position P + i) sees keys 0 .. P + i
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o, (k, v)


def additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """mask [B, 1, T, S] bool (True = may attend) -> the additive mask SDPA makes of it (0 / -inf in `dtype`,
    bit for bit the same attention), converted once per mask tensor and dtype. Why: SDPA converts a bool mask
    with three kernels (two scalar_tensor, a where) at every call, and every attention call of a forward gets
    the same mask tensor: 3 launches per layer of each decode step (42 of the 316 a mom-large-efficient token
    launched on the Triton path), now 3 per forward. The conversion is kept on the mask tensor itself (freed
    with it; its version counter makes an in-place change convert again); inside a CUDA graph capture it is
    captured once and replayed with the step. None and float masks pass through; so does everything while
    torch.compile traces (the compiler fuses the conversion itself). A mask made under torch.inference_mode has
    no version counter: it is converted at every call, as SDPA would."""
    if mask is None or mask.dtype != torch.bool or torch.compiler.is_compiling():
        return mask
    keep = not mask.is_inference()
    hit = getattr(mask, "_mom_additive", None) if keep else None
    if hit is not None and hit[0] == mask._version and hit[1] == dtype:
        return hit[2]
    add = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask.logical_not(), float("-inf"))
    if keep:
        mask._mom_additive = (mask._version, dtype, add)
    return add


def split_heads(x, n_head):  # [B, T, D] -> [B, n_head, T, head_dim] (a view)
    return rearrange(x, "b t (h d) -> b h t d", h=n_head)


def merge_heads(x):  # [B, n_head, T, head_dim] -> [B, T, D]
    return rearrange(x, "b h t d -> b t (h d)")


class Attention(nn.Module):
    def __init__(self, config: MoMConfig):
        super().__init__()
        D = config.n_embd
        self.n_head = config.n_head
        self.c_attn = Conv1D(D, 3 * D)
        self.c_proj = Conv1D(D, D)

    def forward(self, x, past: Optional[KVCache] = None, mask=None):  # x [B, T, D]
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=-1)
        o, present = causal_attention(split_heads(q, self.n_head), split_heads(k, self.n_head),
                                      split_heads(v, self.n_head), past, mask)
        return self.c_proj(merge_heads(o)), present


class MLP(nn.Module):
    def __init__(self, config: MoMConfig):
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, config.ffn_dim)
        self.c_proj = Conv1D(config.ffn_dim, config.n_embd)

    def forward(self, x):  # [B, T, D] -> [B, T, D]
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """A fixed GPT-2 block (bottom, anchor and top blocks)."""

    def __init__(self, config: MoMConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, past: Optional[KVCache] = None, mask=None):  # x [B, T, D]; mask: causal_attention's
        a, present = self.attn(self.ln_1(x), past, mask)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


class AttentionPool(nn.Module):
    """n_attn attention modules, each LN_m + c_attn [D, 3D] + c_proj [D, D], stacked along dim 0."""

    def __init__(self, config: MoMConfig):
        super().__init__()
        E, D = config.n_attn, config.n_embd
        self.ln_weight = nn.Parameter(torch.ones(E, D))
        self.ln_bias = nn.Parameter(torch.zeros(E, D))
        self.c_attn_weight = nn.Parameter(torch.empty(E, D, 3 * D))
        self.c_attn_bias = nn.Parameter(torch.zeros(E, 3 * D))
        self.c_proj_weight = nn.Parameter(torch.empty(E, D, D))
        self.c_proj_bias = nn.Parameter(torch.zeros(E, D))

    @property
    def n_modules(self) -> int:
        return self.c_attn_weight.shape[0]


class FFNPool(nn.Module):
    """n_ffn FFN modules, each LN_m + c_fc [D, F] + c_proj [F, D], stacked along dim 0."""

    def __init__(self, config: MoMConfig):
        super().__init__()
        E, D, Fw = config.n_ffn, config.n_embd, config.ffn_dim
        self.ln_weight = nn.Parameter(torch.ones(E, D))
        self.ln_bias = nn.Parameter(torch.zeros(E, D))
        self.c_fc_weight = nn.Parameter(torch.empty(E, D, Fw))
        self.c_fc_bias = nn.Parameter(torch.zeros(E, Fw))
        self.c_proj_weight = nn.Parameter(torch.empty(E, Fw, D))
        self.c_proj_bias = nn.Parameter(torch.zeros(E, D))

    @property
    def n_modules(self) -> int:
        return self.c_fc_weight.shape[0]


def init_weights(model: nn.Module, config: MoMConfig):
    """GPT-2's initialisation: weights N(0, 0.02), residual projections (c_proj) N(0, 0.02 / sqrt(2 * graph
    depth)), biases 0, LayerNorms 1 / 0; routers N(0, 0.02) with zero biases (paper.md, phase 2)."""
    std = config.initializer_range
    proj_std = std / math.sqrt(2 * config.graph_depth)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, Conv1D):
                m.weight.normal_(0.0, proj_std if name.endswith("c_proj") else std)
                m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, (AttentionPool, FFNPool)):
                m.ln_weight.fill_(1.0)
                for pname, p in m.named_parameters(recurse=False):
                    if pname.endswith("_bias"):
                        p.zero_()
                    elif pname != "ln_weight":
                        p.normal_(0.0, proj_std if pname == "c_proj_weight" else std)
            elif isinstance(m, (nn.Linear, nn.GRUCell)):
                for pname, p in m.named_parameters(recurse=False):
                    p.zero_() if "bias" in pname else p.normal_(0.0, std)

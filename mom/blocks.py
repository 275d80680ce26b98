"""The fixed blocks of both families and MoM's module pools.

Weights are stored as Hugging Face's GPT-2 stores them (Conv1D: [in, out]), so a GPT-2 checkpoint loads
key for key into the fixed blocks and slice for slice into the pools' stacked [E, in, out] weights; a
Llama-family checkpoint (nn.Linear: [out, in], separate q/k/v and gate/up) is transposed and concatenated
once at load time (mom/convert.py).

    Block:         x -> x + attn(ln_1(x)) -> x + mlp(ln_2(x))               (pre-norm block)
    AttentionPool: E x (LN_m, c_attn [D, W_qkv], c_proj [D, D])              (stacked: [E, ...])
    FFNPool:       E x (LN_m, c_fc [D, F or 2F], c_proj [F, D])              (stacked: [E, ...])

Per family (config.family; docs/architecture.md):
    gpt2:  LayerNorm (gain, bias); biases everywhere; mlp = c_proj(gelu_tanh(c_fc(x)))
    llama: RMSNorm (gain only); q/k/v biases only with attention_bias; mlp = c_proj(silu(gate) * up) with
           c_fc(x) = [gate | up]; q and k rotated by their positions (`Rotary`, split halves)
W_qkv = (n_head + 2 * kv_heads) * head_dim (3D for multi-head attention): q, then k, then v.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .config import MoMConfig

KVCache = Tuple[torch.Tensor, torch.Tensor]  # (k, v), each [B, kv_heads, T_past, head_dim]
Rope = Tuple[torch.Tensor, torch.Tensor]     # (cos, sin), each [B, T, head_dim] or [T, head_dim]

try:  # flash-attn's causal kernel when installed (pip install "mixture-of-modules[flash]"); SDPA otherwise
    from flash_attn import flash_attn_func
except Exception:  # ImportError, or a build that does not match this torch
    flash_attn_func = None


class Conv1D(nn.Module):
    """y = x @ weight (+ bias) with weight [in, out] (GPT-2's layout); bias=False: none (the Llama family)."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x):  # [..., in] -> [..., out]
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.mm(x2, self.weight) if self.bias is None else torch.addmm(self.bias, x2, self.weight)
        return y.view(*x.shape[:-1], -1)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight (transformers' LlamaRMSNorm: the statistics in fp32 for 16-bit x)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # [..., D]
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps: float):
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def make_norm(config: MoMConfig) -> nn.Module:
    """The family's norm of a fixed block (ln_1, ln_2, ln_f): LayerNorm (gpt2) or RMSNorm (llama)."""
    if config.family == "gpt2":
        return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
    return RMSNorm(config.n_embd, config.layer_norm_epsilon)


class Rotary(nn.Module):
    """Rotary position tables (the Llama family): for position p and frequency i < head_dim / 2,
    angle = p * rope_theta^(-2i / head_dim); cos / sin [n_positions, head_dim] repeat the half-width angles
    twice (transformers' split-halves layout: q * cos + rotate_half(q) * sin). Made once per dtype and
    device (in fp64, then rounded: transformers computes them in fp32, hence ~1e-6 apart from ours), not
    buffers, so model.to(dtype) never rounds them twice. `forward(pos)`: (cos, sin) at positions pos [B, T] or
    [T] -> [B, T, head_dim] or [T, head_dim] (one gather each)."""

    def __init__(self, config: MoMConfig):
        super().__init__()
        self.head_dim, self.theta, self.n_positions = config.head_dim, config.rope_theta, config.n_positions
        self._tables: Dict[tuple, Rope] = {}

    def tables(self, dtype: torch.dtype, device) -> Rope:
        key = (dtype, torch.device(device))
        hit = self._tables.get(key)
        if hit is None:
            hd = self.head_dim
            inv = 1.0 / self.theta ** (torch.arange(0, hd, 2, dtype=torch.float64, device=device) / hd)  # [hd/2]
            ang = torch.arange(self.n_positions, dtype=torch.float64, device=device)[:, None] * inv   # [L, hd/2]
            ang = torch.cat([ang, ang], dim=-1)                                                      # [L, hd]
            hit = self._tables[key] = (ang.cos().to(dtype), ang.sin().to(dtype))
        return hit

    def forward(self, pos: torch.Tensor, dtype: torch.dtype) -> Rope:
        cos, sin = self.tables(dtype, pos.device)
        return cos[pos], sin[pos]


def rotate_half(x):  # [..., hd]: (x1, x2) -> (-x2, x1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x, cos, sin):
    """x [B, heads, T, hd] rotated by cos / sin [B, T, hd] or [T, hd] (positions of the T tokens)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (as transformers: the tables in the activations' dtype)
    return x * cos + rotate_half(x) * sin


def qkv_heads(qkv, n_head: int, kv_heads: int, rope: Optional[Rope] = None):
    """The fused projection qkv [B, T, (n_head + 2 kv_heads) head_dim] -> q [B, n_head, T, hd], k and v
    [B, kv_heads, T, hd] (views), q and k rotated when rope = (cos, sin) is given (the Llama family)."""
    hd = qkv.shape[-1] // (n_head + 2 * kv_heads)
    q, k, v = qkv.split([n_head * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    q, k, v = split_heads(q, n_head), split_heads(k, kv_heads), split_heads(v, kv_heads)
    if rope is not None:
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    return q, k, v


def causal_attention(q, k, v, past=None, mask: Optional[torch.Tensor] = None, causal: bool = True):
    """Causal multi-head attention of T new queries over P cached + T new keys (causal=False: every query sees
    every key of the sequence, under `mask` if given; no cache).

    q: [B, n_head, T, head_dim]; k, v: [B, kv_heads, T, head_dim] (kv_heads < n_head: grouped-query attention,
    query head h reads K/V head h // (n_head / kv_heads)); past: (k, v) [B, kv_heads, P, head_dim], a static cache layer
    (mom.cache.StaticLayerCache: written in place, all L positions attended under `mask`) or None.
    mask: [B, 1, T, S] bool (True = may attend; S = P + T, or L with a static cache) for padded batches and
    static caches; None = plain causal. Returns o [B, n_head, T, head_dim] and the new cache: (k, v)
    [B, kv_heads, P + T, head_dim], or the static layer itself.
    """
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}  # (SDPA reads K/V head h // group)
    if not causal:  # bidirectional (an encoder's or a vision model's layer): the whole sequence, no cache
        if past is not None:
            raise ValueError("causal_attention: a KV cache needs causal attention (causal=False takes no past)")
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(mask, q.dtype), **gqa), (k, v)
    if past is not None and hasattr(past, "update"):  # static cache: fixed shapes, masked
        k, v = past.update(k, v)                       # [B, kv_heads, L, head_dim]
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype),
                                              attn_mask=additive_mask(mask, q.dtype), **gqa), past
    if past is not None:
        k = torch.cat([past[0], k], dim=2)
        v = torch.cat([past[1], v], dim=2)
    if mask is not None:                               # padding (attention_mask) with a dynamic cache
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(mask, q.dtype), **gqa), (k, v)
    T, S = q.shape[2], k.shape[2]
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        # flash-attn >= 2.1 aligns the causal mask bottom-right: query i sees keys 0 .. S - T + i, as below;
        # it takes fewer K/V heads than query heads as grouped-query attention
        o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return o.transpose(1, 2), (k, v)
    if T == S:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    elif T == 1:  # one new token sees everything cached
        o = F.scaled_dot_product_attention(q, k, v, **gqa)
    else:  # query i (absolute position P + i) sees keys 0 .. P + i
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
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
        self.n_head, self.kv_heads = config.n_head, config.kv_heads
        self.c_attn = Conv1D(D, config.qkv_dim, bias=config.qkv_bias)
        self.c_proj = Conv1D(D, D, bias=config.family == "gpt2")

    def forward(self, x, past: Optional[KVCache] = None, mask=None, rope: Optional[Rope] = None):  # x [B, T, D]
        q, k, v = qkv_heads(self.c_attn(x), self.n_head, self.kv_heads, rope)
        o, present = causal_attention(q, k, v, past, mask)
        return self.c_proj(merge_heads(o)), present


def ffn_act(h, act: str):
    """The FFN's activation of its first projection h: gelu_tanh(h) [.., F], or silu(gate) * up for h =
    [gate | up] [.., 2F] (SwiGLU)."""
    if act == "gelu":
        return F.gelu(h, approximate="tanh")
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, config: MoMConfig):
        super().__init__()
        bias = config.family == "gpt2"
        self.act = config.act
        self.c_fc = Conv1D(config.n_embd, config.ffn_in_dim, bias=bias)   # [D, F] or [D, 2F] (gate | up)
        self.c_proj = Conv1D(config.ffn_dim, config.n_embd, bias=bias)

    def forward(self, x):  # [B, T, D] -> [B, T, D]
        return self.c_proj(ffn_act(self.c_fc(x), self.act))


class Block(nn.Module):
    """A fixed block of the config's family (bottom, anchor and top blocks)."""

    def __init__(self, config: MoMConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = Attention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, past: Optional[KVCache] = None, mask=None, rope: Optional[Rope] = None):
        """x [B, T, D]; mask: causal_attention's; rope: (cos, sin) of the tokens' positions (llama)."""
        a, present = self.attn(self.ln_1(x), past, mask, rope)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


def _stacked(shape, fill: Optional[float], keep: bool = True):
    """A pool parameter [E, ...]: filled (norms 1, biases 0) or empty (weights: init_weights draws them), or None
    when the family has none (registered as None, so `pool.ln_bias is None` says so)."""
    if not keep:
        return None
    t = torch.empty(*shape)
    return nn.Parameter(t if fill is None else t.fill_(fill))


class AttentionPool(nn.Module):
    """n_attn attention modules, each LN_m + c_attn [D, W_qkv] + c_proj [D, D], stacked along dim 0.
    The Llama family has no ln_bias, no c_proj_bias and a c_attn_bias only with attention_bias (None)."""

    def __init__(self, config: MoMConfig):
        super().__init__()
        E, D, gpt2 = config.n_attn, config.n_embd, config.family == "gpt2"
        self.ln_weight = _stacked((E, D), 1.0)
        self.ln_bias = _stacked((E, D), 0.0, gpt2)
        self.c_attn_weight = _stacked((E, D, config.qkv_dim), None)
        self.c_attn_bias = _stacked((E, config.qkv_dim), 0.0, config.qkv_bias)
        self.c_proj_weight = _stacked((E, D, D), None)
        self.c_proj_bias = _stacked((E, D), 0.0, gpt2)

    @property
    def n_modules(self) -> int:
        return self.c_attn_weight.shape[0]


class FFNPool(nn.Module):
    """n_ffn FFN modules, each LN_m + c_fc [D, F] (gpt2) or [D, 2F] (llama: gate | up) + c_proj [F, D], stacked
    along dim 0. The Llama family has no biases (None)."""

    def __init__(self, config: MoMConfig):
        super().__init__()
        E, D, Fw, gpt2 = config.n_ffn, config.n_embd, config.ffn_dim, config.family == "gpt2"
        self.ln_weight = _stacked((E, D), 1.0)
        self.ln_bias = _stacked((E, D), 0.0, gpt2)
        self.c_fc_weight = _stacked((E, D, config.ffn_in_dim), None)
        self.c_fc_bias = _stacked((E, config.ffn_in_dim), 0.0, gpt2)
        self.c_proj_weight = _stacked((E, Fw, D), None)
        self.c_proj_bias = _stacked((E, D), 0.0, gpt2)

    @property
    def n_modules(self) -> int:
        return self.c_fc_weight.shape[0]


def init_weights(model: nn.Module, config: MoMConfig):
    """GPT-2's initialisation (both families): weights N(0, 0.02), residual projections (c_proj) N(0, 0.02 /
    sqrt(2 * graph depth)), biases 0, norms 1 / 0; an untied LM head N(0, 0.02); routers N(0, 0.02) with zero
    biases (docs/method.md, phase 2)."""
    std = config.initializer_range
    proj_std = std / math.sqrt(2 * config.graph_depth)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, Conv1D):
                m.weight.normal_(0.0, proj_std if name.endswith("c_proj") else std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
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

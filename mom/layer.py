"""MoMLayer: one chunk of a Mixture-of-Modules model, a drop-in [B, T, D] -> [B, T, D] layer.

A chunk owns an attention pool, an FFN pool, an attention router, an FFN router and (optionally) a fixed
anchor block. It runs `depth` routed steps (docs/method.md, "One routed step"), reusing its pools at each step:

    x [B, T, D]
    for each step h:
        attention router on x           -> ids_a, g_a [N, K]      (N = B*T tokens; id n_attn = SKIP)
        qkv = sum_m LN_m(x) W_qkv[m] + b_qkv[m]                    (optionally weighted by g_a)
        q, k = rotate(q, k) by position                             (the Llama family; once per step)
        o   = causal attention(q, k, v)                             ONE attention per step, own KV cache
        x  += sum_m g_a,m (o W_o[m] + b_o[m])
        FFN router on x                 -> ids_f, g_f [N, K]
        x  += sum_m g_f,m FFN_m(LN_m(x))
    x = anchor(x)                                                   (if config.anchor)

A token whose K attention picks are all SKIP gets q = k = v = 0 at that step: it still sits in the other
tokens' softmax with score 0 and value 0 (the authors' semantics), and its own output is 0. (In the Llama family
its q and k stay 0 after the rotation; a q/k/v bias, when the pool has one, is part of each picked module's
projection, so a token with no pick gets none.)

The block family (config.family) reaches the step as the routed ops' norm ("layer" / "rms") and activation
("gelu" / "swiglu"), the pools' optional biases (None) and the rotary tables (rope).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.utils._pytree as pytree  # (torch's own pytree registry; transformers registers its outputs there too)

from .blocks import AttentionPool, Block, FFNPool, KVCache, Rope, Rotary, causal_attention, init_weights, merge_heads
from .cache import check_chunk_cache
from .capacity import routing_mode
from .config import MoMConfig
from .routed import Ops, get_ops
from .routers import balance_loss, make_router


@dataclass
class StepRouting:
    """What the routers of one step picked, for analysis: ids [B, T, K] (pool size = SKIP), weights [B, T, K]."""
    attn_ids: torch.Tensor
    attn_weights: torch.Tensor
    ffn_ids: torch.Tensor
    ffn_weights: torch.Tensor


@dataclass
class MoMLayerOutput:
    hidden_states: torch.Tensor             # [B, T, D]
    routing: List[StepRouting]              # one per step
    aux_loss: torch.Tensor                  # scalar: mean load-balancing loss of this chunk's routers (0: balance off)
    present: Optional[List[KVCache]] = None  # depth (+1 anchor) KV caches, when use_cache


# Both as pytree nodes, so tools that look for the tensors in a module's output find them: FSDP2 registers a
# chunk's pre-backward all-gather on its output tensors, and on torch 2.11 it did not look inside a plain
# dataclass (the backward then read freed parameters; tests/test_train.py's FSDP run on 2.11 caught it).
pytree.register_dataclass(StepRouting)
pytree.register_dataclass(MoMLayerOutput)


class MoMLayer(nn.Module):
    """One MoM chunk. `MoMLayer(config)` initialises itself; call `forward(x)` with x [B, T, D]."""

    def __init__(self, config: MoMConfig, init: bool = True):
        super().__init__()
        if config.chunks == 0:  # a vanilla model's config skips the pool checks (top_k <= slots, ...): run them
            config = config.replace(chunks=1)
        self.config = config
        self.attn_pool = AttentionPool(config)
        self.ffn_pool = FFNPool(config)
        self.attn_router = make_router(config, config.attn_slots)
        self.ffn_router = make_router(config, config.ffn_slots)
        self.anchor = Block(config) if config.anchor else None
        self.rotary = Rotary(config) if config.family == "llama" else None  # when no rope is passed in
        self.causal = True  # False: bidirectional attention at every step (mom.MoMBlock(causal=False))
        self.capacity_mode = "auto"  # expert choice: "auto" (top capacity when training, else the threshold
        #                              rule), or forced "train" / "threshold" (mom.capacity.force_mode)
        if init:
            init_weights(self, config)

    @property
    def n_caches(self) -> int:
        return self.config.depth + int(self.config.anchor)

    def forward(self, x, past_key_values: Optional[List[KVCache]] = None, use_cache: bool = False,
                ops: Optional[Ops] = None, attn_mask: Optional[torch.Tensor] = None,
                balance: bool = True, rope: Optional[Rope] = None) -> MoMLayerOutput:
        """x [B, T, D]; past_key_values: depth (+1 anchor) (k, v) pairs or static cache layers
        (mom.cache.StaticLayerCache, written in place); attn_mask [B, 1, T, S] bool for padded batches and
        static caches (mom.blocks.causal_attention); balance=False skips the balance terms (aux_loss 0: a
        decode step); rope: (cos, sin) [B or 1, T, head_dim] of the tokens' positions (the Llama family;
        None: positions P .. P + T - 1 after the P cached ones)."""
        cfg = self.config
        if x.dim() != 3 or x.shape[-1] != cfg.n_embd:
            raise ValueError(f"MoMLayer: x must be [B, T, n_embd={cfg.n_embd}], got {tuple(x.shape)}")
        static = isinstance(past_key_values, (list, tuple)) and all(hasattr(p, "update") for p in past_key_values)
        if past_key_values is not None and not static:  # count, batch, heads, head size, lengths, dtype, device
            check_chunk_cache(past_key_values, cfg, x)
        ops = ops if ops is not None else get_ops(cfg.backend, x.device)
        B, T, D = x.shape
        if self.rotary is not None and rope is None:
            P = _cached_length(past_key_values, static)
            rope = self.rotary(torch.arange(P, P + T, device=x.device), x.dtype)
        E_a, E_f = cfg.n_attn, cfg.n_ffn
        pa, pf = self.attn_pool, self.ffn_pool
        eps = cfg.layer_norm_epsilon
        xf = x.reshape(B * T, D)                                     # [N, D]
        state_a = state_f = None                                     # GRU states, zero at chunk start
        gru = ops.gru_router_for(B * T)                              # a fused router step, or None: the modules
        routing, presents, terms = [], [], []
        ec_train = routing_mode(self)  # expert choice: training-style top capacity, or the causal threshold rule
        for h in range(cfg.depth):
            # --- assembled attention ---
            logits, state_a = self.attn_router(xf, state_a, gru)  # [N, S_a]
            ra, plan = ops.route(logits, E_a, cfg, balance, T, ec_train)   # plan: shared by QKV and output projection
            qkv = ops.routed_linear(xf, pa.c_attn_weight, pa.c_attn_bias, ra.ids,
                                    ra.weights if cfg.weighted_qkv else None, pa.ln_weight, pa.ln_bias, eps,
                                    plan=plan, norm=cfg.norm)        # [N, W_qkv]
            q, k, v = ops.qkv_heads(qkv.view(B, T, -1), cfg.n_head, cfg.kv_heads, rope)  # [B, heads, T, hd]
            past = past_key_values[h] if past_key_values is not None else None
            o, present = causal_attention(q, k, v, past, attn_mask, self.causal)
            o = merge_heads(o).reshape(B * T, D)                     # [N, D]
            xf = ops.routed_linear(o, pa.c_proj_weight, pa.c_proj_bias, ra.ids, ra.weights, plan=plan,
                                   residual=xf)                      # xf + the routed projection
            # --- assembled FFN ---
            logits, state_f = self.ffn_router(xf, state_f, gru)   # [N, S_f]
            rf, plan = ops.route(logits, E_f, cfg, balance, T, ec_train)
            xf = ops.routed_ffn(xf, pf.ln_weight, pf.ln_bias, pf.c_fc_weight, pf.c_fc_bias, pf.c_proj_weight,
                                pf.c_proj_bias, rf.ids, rf.weights, eps, plan=plan, residual=xf, norm=cfg.norm,
                                act=cfg.act)                         # xf + FFN
            routing.append(StepRouting(ra.ids.view(B, T, -1), ra.weights.view(B, T, -1),
                                       rf.ids.view(B, T, -1), rf.weights.view(B, T, -1)))
            terms.append((ra, rf))
            if use_cache:
                presents.append(present)
        x = xf.view(B, T, D)
        if self.anchor is not None:
            x, present = self.anchor(x, past_key_values[-1] if past_key_values is not None else None, attn_mask,
                                     rope)
            if use_cache:
                presents.append(present)
        aux = self._aux_loss(terms) if balance else x.new_zeros(())
        return MoMLayerOutput(x, routing, aux, presents if use_cache else None)

    def _aux_loss(self, terms):
        """Mean Switch-style balance loss over routers and steps ("per_step") or over routers ("pooled"); with
        expert choice the mean BCE of the routers' logits against the top-capacity picks (0 when the step routed
        by the threshold rule: eval mode)."""
        if self.config.routing == "expert_choice":
            losses = [r.balance for pair in terms for r in pair if r.balance is not None]
            return torch.stack(losses).mean() if losses else terms[0][0].weights.new_zeros(())
        if self.config.balance_loss == "per_step":
            losses = [r.balance for pair in terms for r in pair]
        else:  # pool f and P over the chunk's steps, one loss per router
            losses = []
            for i in range(2):
                f = torch.stack([t[i].f for t in terms]).mean(0)
                P = torch.stack([t[i].P for t in terms]).mean(0)
                losses.append(balance_loss(f, P))
        return torch.stack(losses).mean()


def _cached_length(past, static: bool) -> int:
    """Positions already cached before this call (0 without a cache; a static cache's layers share theirs)."""
    if not past:
        return 0
    if static:
        return past[0].cache.seen
    return past[0][0].shape[2]

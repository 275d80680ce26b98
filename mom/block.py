"""MoMBlock: a Mixture-of-Modules layer to drop into any model, configured by layer arguments.

    block = mom.MoMBlock(d_model=256, n_head=8, n_attn=4, n_ffn=4, depth=3, top_k=2)
    y = block(x)                     # x, y [B, T, d_model]: `depth` routed steps over the block's own pools
    loss = task_loss + 0.01 * mom.aux_loss(model)   # the routers' balance loss of every MoMBlock in `model`

Which to use: `MoMBlock` is the layer for your own model (a tensor in, a tensor out, so it sits in
nn.Sequential; bidirectional attention with causal=False for encoders and vision models). `MoMLayer` is the
chunk `MoMForCausalLM` is built from: it takes the whole model's MoMConfig and returns an output object with the
routing, the balance loss and KV caches (what generation and analysis need). A MoMBlock holds one MoMLayer.

Every argument is checked when the block is built; a bad one raises a ConfigError naming it (`MoMBlock.top_k=5:
...`). Routing options are MoMConfig's (router, router_dim, router_temperature, skip, renormalize,
straight_through, weighted_qkv, dense_routing, balance_loss, balance_skip, backend, ...); the block family's too
(family="llama" with num_key_value_heads, rope_theta, attention_bias).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .config import ConfigError, MoMConfig
from .layer import MoMLayer

# MoMConfig fields a block does not take: the model around it (embeddings, fixed blocks, head) and the chunking
_MODEL_FIELDS = ("vocab_size", "n_positions", "n_bottom", "chunks", "anchor", "n_top", "tie_word_embeddings",
                 "checkpoint_chunks", "routing_prior", "routing_prior_steps", "routing_prior_from",
                 "routing_prior_learned")
_NAMES = {"n_embd": "d_model", "n_inner": "d_ff", "n_positions": "max_positions"}  # MoMConfig's -> the block's


class MoMBlock(nn.Module):
    """[B, T, d_model] -> [B, T, d_model]: `depth` routed steps over pools of n_attn attention and n_ffn FFN
    modules, top_k of each picked per token and step by the routers (module docstring).

    d_model, n_head: width and attention heads (n_head must divide d_model); n_attn, n_ffn: modules per pool;
    depth: routed steps; top_k: modules picked per step (at most the router's slots: pool size + SKIP);
    causal: causal attention (False: every token attends to the whole sequence); d_ff: FFN width (4 d_model);
    max_positions: the longest sequence (rotary tables of the Llama family); routing_options: MoMConfig fields.
    After a forward, `aux_loss` holds its balance loss (mom.aux_loss sums a model's)."""

    def __init__(self, d_model: int, n_head: int, n_attn: int, n_ffn: int, depth: int, top_k: int = 2,
                 causal: bool = True, d_ff: Optional[int] = None, max_positions: int = 4096, **routing_options):
        super().__init__()
        taken = sorted(k for k in routing_options if k in _MODEL_FIELDS or k in _NAMES)
        if taken:
            raise ConfigError(f"MoMBlock: {taken} are not layer arguments (a block has no embeddings, fixed blocks "
                              f"or chunks; width and FFN size are d_model and d_ff)")
        if not isinstance(causal, bool):
            raise ConfigError(f"MoMBlock.causal={causal!r}: must be a bool")
        try:
            self.config = MoMConfig(vocab_size=1, n_positions=max_positions, n_embd=d_model, n_head=n_head,
                                    n_inner=d_ff, n_bottom=0, chunks=1, n_attn=n_attn, n_ffn=n_ffn, depth=depth,
                                    top_k=top_k, anchor=False, n_top=0, **routing_options)
        except ConfigError as e:  # name the block's argument, not the model config's field
            msg = str(e).replace("MoMConfig.", "MoMBlock.")
            for ours, theirs in _NAMES.items():
                msg = msg.replace(f"MoMBlock.{ours}=", f"MoMBlock.{theirs}=")
            raise ConfigError(msg) from None
        except TypeError as e:  # an unknown keyword
            raise ConfigError(f"MoMBlock: {e}".replace("MoMConfig.__init__()", "")) from None
        self.layer = MoMLayer(self.config)
        self.layer.causal = causal
        self.aux_loss: Optional[torch.Tensor] = None

    @property
    def causal(self) -> bool:
        return self.layer.causal

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]. attention_mask [B, T] (1 = token, 0 = padding): padding keys are
        not attended (a padding query attends to itself only)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.config.n_embd:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MoMBlock: x must be [batch, tokens, d_model={self.config.n_embd}], got {shape}")
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"MoMBlock: attention_mask must be [batch, tokens] = {tuple(x.shape[:2])}, got "
                                 f"{tuple(attention_mask.shape)}")
            keys = attention_mask.bool()[:, None, None, :]                      # [B, 1, 1, T]
            own = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)      # a padding query sees itself
            mask = keys | own
            if self.causal:
                mask = mask & torch.ones_like(own).tril()
        out = self.layer(x, attn_mask=mask, balance=self.training and torch.is_grad_enabled())
        self.aux_loss = out.aux_loss
        return out.hidden_states

    def extra_repr(self) -> str:
        c = self.config
        return (f"d_model={c.n_embd}, n_head={c.n_head}, n_attn={c.n_attn}, n_ffn={c.n_ffn}, depth={c.depth}, "
                f"top_k={c.top_k}, causal={self.causal}, family={c.family}")


def aux_loss(module: nn.Module) -> torch.Tensor:
    """The sum of the balance losses of every MoMBlock inside `module` (module itself included) from their last
    forward (training mode; a no-grad or eval forward has none: 0). Multiply by a coefficient (the paper's 0.01)
    and add it to the task loss."""
    blocks = [m for m in module.modules() if isinstance(m, MoMBlock)]
    if not blocks:
        raise ValueError(f"mom.aux_loss: {type(module).__name__} holds no MoMBlock")
    losses = [b.aux_loss for b in blocks if b.aux_loss is not None]
    if not losses:
        raise ValueError("mom.aux_loss: no MoMBlock inside has run a forward yet")
    return torch.stack(losses).sum()

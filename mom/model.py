"""MoMForCausalLM: a GPT-2 language model whose middle is MoM chunks; generation with a KV cache.

    input_ids [B, T] -> wte + wpe -> bottom blocks -> chunks (MoMLayer) -> top blocks -> ln_f -> logits
    [B, T, vocab] (LM head tied to wte). With chunks=0 this is exactly GPT-2.

past_key_values: a list with one (k, v) per attention call in graph order (bottom blocks, then each chunk's
steps and anchor, then top blocks), each [B, n_head, P, head_dim]; `graph_depth` entries in all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .blocks import Block, KVCache, init_weights
from .cache import check_cache_matches, check_past_key_values
from .config import MoMConfig
from .layer import MoMLayer, StepRouting
from .routed import get_ops


@dataclass
class MoMOutput:
    logits: torch.Tensor                             # [B, T, vocab]
    loss: Optional[torch.Tensor] = None              # LM loss + aux_loss_coef * aux_loss (labels given)
    aux_loss: Optional[torch.Tensor] = None          # mean load-balancing loss (0 for a vanilla model)
    past_key_values: Optional[List[KVCache]] = None  # graph_depth caches, when use_cache
    routing: Optional[List[List[StepRouting]]] = None  # routing[chunk][step]
    lm_loss: Optional[torch.Tensor] = None           # the cross-entropy alone


class MoMForCausalLM(nn.Module):
    def __init__(self, config: MoMConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.bottom = nn.ModuleList(Block(config) for _ in range(config.n_bottom))
        self.chunks = nn.ModuleList(MoMLayer(config, init=False) for _ in range(config.chunks))
        self.top = nn.ModuleList(Block(config) for _ in range(config.n_top))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        init_weights(self, config)

    # --- conveniences ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def set_backend(self, backend: str) -> "MoMForCausalLM":
        """Switch the routed-step implementation; parameters are untouched."""
        self.config = self.config.replace(backend=backend)  # validates
        for chunk in self.chunks:
            chunk.config = self.config
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_gpt2(cls, state_dict_or_path, config: MoMConfig) -> "MoMForCausalLM":
        """Phase 2 of the two-phase recipe: cut an HF-layout GPT-2 checkpoint into this config's modules."""
        from .convert import from_gpt2
        return from_gpt2(state_dict_or_path, config)

    def save_pretrained(self, directory: str):
        from .convert import save_pretrained
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str, **config_overrides) -> "MoMForCausalLM":
        from .convert import from_pretrained
        return from_pretrained(directory, **config_overrides)

    # --- forward ----------------------------------------------------------------------------------------------
    def _check_inputs(self, input_ids, labels, past_key_values):
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len] (rank 2), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
        # The value check reads two numbers back from the device; it is left out while torch.compile traces.
        lo, hi = (0, 0) if torch.compiler.is_compiling() else (int(input_ids.min()), int(input_ids.max()))
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"input_ids holds token ids in [{lo}, {hi}], outside the vocabulary "
                             f"[0, {cfg.vocab_size}) (config.vocab_size)")
        P = 0
        if past_key_values is not None:  # entry by entry: count, batch, heads, head size, lengths, dtype, device
            P = check_past_key_values(past_key_values, cfg, B, device=input_ids.device)
        if P + T > cfg.n_positions:
            raise ValueError(f"sequence of {P + T} tokens ({P} cached + {T} new) is longer than "
                             f"config.n_positions={cfg.n_positions}")
        if labels is not None and tuple(labels.shape) != (B, T):
            raise ValueError(f"labels must have input_ids' shape {(B, T)}, got {tuple(labels.shape)}")
        return P

    def forward(self, input_ids, labels=None, past_key_values=None, use_cache: bool = False) -> MoMOutput:
        """input_ids [B, T] int; labels [B, T] (shifted inside, -100 ignored) -> MoMOutput."""
        cfg = self.config
        P = self._check_inputs(input_ids, labels, past_key_values)
        B, T = input_ids.shape
        pos = torch.arange(P, P + T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)                       # [B, T, D]
        if past_key_values is not None:  # the cache is concatenated with this dtype's keys and values
            check_cache_matches(past_key_values, x.dtype, None)
        ops = get_ops(cfg.backend, x.device)
        past = iter(past_key_values) if past_key_values is not None else None
        presents, routing, aux = [], [], []

        for block in self.bottom:
            x, kv = block(x, next(past) if past else None)
            presents.append(kv)
        for chunk in self.chunks:
            chunk_past = [next(past) for _ in range(chunk.n_caches)] if past else None
            if cfg.checkpoint_chunks and self.training and not use_cache and torch.is_grad_enabled():
                out = checkpoint(chunk, x, chunk_past, False, ops, use_reentrant=False)
            else:
                out = chunk(x, chunk_past, use_cache, ops)
            x = out.hidden_states
            routing.append(out.routing)
            aux.append(out.aux_loss)
            if use_cache:
                presents.extend(out.present)
        for block in self.top:
            x, kv = block(x, next(past) if past else None)
            presents.append(kv)

        logits = F.linear(self.ln_f(x), self.wte.weight)              # [B, T, vocab], tied head
        aux_loss = torch.stack(aux).mean() if aux else logits.new_zeros(())
        loss = lm_loss = None
        if labels is not None:
            lm_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                      labels[:, 1:].reshape(-1), ignore_index=-100)
            loss = lm_loss + cfg.aux_loss_coef * aux_loss
        return MoMOutput(logits=logits, loss=loss, aux_loss=aux_loss,
                         past_key_values=presents if use_cache else None, routing=routing, lm_loss=lm_loss)

    # --- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None):
        """Sample max_new_tokens after input_ids [B, T] with a KV cache per attention call (one per routed
        step). temperature 0 = greedy. Returns [B, T + max_new_tokens]."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be None or >= 1, got {top_k}")
        if input_ids.dim() == 2 and input_ids.shape[1] + max_new_tokens > self.config.n_positions:
            raise ValueError(f"{input_ids.shape[1]} prompt + {max_new_tokens} new tokens exceed "
                             f"config.n_positions={self.config.n_positions}")
        out, past, ids = input_ids, None, input_ids
        for _ in range(max_new_tokens):
            res = self(ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[:, -1, :].float()                      # [B, vocab]
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            out = torch.cat([out, nxt.to(out.dtype)], dim=1)
            ids = nxt.to(out.dtype)
        return out

"""MoMForCausalLM: a GPT-2 or Llama-family language model whose middle is MoM chunks; generation with a KV cache.

    input_ids [B, T] -> wte (+ wpe: gpt2) -> bottom blocks -> chunks (MoMLayer) -> top blocks -> ln_f -> logits
    [B, T, vocab] (LM head tied to wte, or lm_head when tie_word_embeddings=False). With chunks=0 this is exactly
    GPT-2 / the Llama-family model of the config (family="llama": positions rotate q and k in every attention
    call instead of wpe; one (cos, sin) gather per forward, shared by every block and step).

past_key_values: a list with one (k, v) per attention call in graph order (bottom blocks, then each chunk's
steps and anchor, then top blocks), each [B, kv_heads, P, head_dim]; `graph_depth` entries in all. Or a
mom.cache.StaticCache (preallocated for max_length, written in place; fixed shapes for CUDA graphs).
attention_mask [B, P + T] (1 = token, 0 = left padding): position ids count real tokens only, padding is never
attended. Generation (static cache, left-padded batches, sampling, stop tokens, CUDA graphs): mom/generate.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .blocks import Block, KVCache, Rotary, init_weights, make_norm
from .cache import StaticCache, check_cache_matches, check_past_key_values, padding_attention
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

    # transformers' ModelOutput conventions: out["logits"], out[0] (the fields that are set, loss first)
    _ORDER = ("loss", "logits", "past_key_values", "aux_loss", "routing", "lm_loss")

    def keys(self):
        return [k for k in self._ORDER if getattr(self, k) is not None]

    def to_tuple(self):
        return tuple(getattr(self, k) for k in self.keys())

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"MoMOutput has no (set) field {key!r}; set fields: {self.keys()}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key):
        return key in self.keys()


class MoMForCausalLM(nn.Module):
    def __init__(self, config: MoMConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.family == "gpt2":
            self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        else:
            self.rotary = Rotary(config)
        self.bottom = nn.ModuleList(Block(config) for _ in range(config.n_bottom))
        self.chunks = nn.ModuleList(MoMLayer(config, init=False) for _ in range(config.chunks))
        self.top = nn.ModuleList(Block(config) for _ in range(config.n_top))
        self.ln_f = make_norm(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # [vocab, D]
        init_weights(self, config)

    # --- conveniences ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's weight [vocab, D]: wte's (tied) or lm_head's."""
        return self.wte.weight if self.config.tie_word_embeddings else self.lm_head.weight

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

    @classmethod
    def from_hf(cls, model_or_folder, config: Optional[MoMConfig] = None, preserving: bool = False,
                prior_steps: Optional[int] = None) -> "MoMForCausalLM":
        """Cut a transformers GPT-2 / Llama / Qwen2 / Mistral model (object, or a save_pretrained folder) into
        config's layout (None: the vanilla model); config from MoMConfig.from_hf(hf_config, **layout)."""
        from .convert import from_hf
        return from_hf(model_or_folder, config, preserving, prior_steps)

    def save_pretrained(self, directory: str):
        from .convert import save_pretrained
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str, **config_overrides) -> "MoMForCausalLM":
        from .convert import from_pretrained
        return from_pretrained(directory, **config_overrides)

    # --- forward ----------------------------------------------------------------------------------------------
    def _check_inputs(self, input_ids, labels, past_key_values, attention_mask=None):
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
        if isinstance(past_key_values, StaticCache):  # batch, room, dtype, device
            past_key_values.check(B, T, self.wte.weight.dtype, input_ids.device)
            P = past_key_values.seen
        elif past_key_values is not None:  # entry by entry: count, batch, heads, head size, lengths, dtype, device
            P = check_past_key_values(past_key_values, cfg, B, device=input_ids.device)
        if P + T > cfg.n_positions:
            raise ValueError(f"sequence of {P + T} tokens ({P} cached + {T} new) is longer than "
                             f"config.n_positions={cfg.n_positions}")
        if labels is not None and tuple(labels.shape) != (B, T):
            raise ValueError(f"labels must have input_ids' shape {(B, T)}, got {tuple(labels.shape)}")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype.is_floating_point:
                raise TypeError(f"attention_mask must be a bool or integer tensor of 0/1, got "
                                f"{getattr(attention_mask, 'dtype', type(attention_mask).__name__)}")
            ok = [(B, P + T)] + ([(B, T)] if isinstance(past_key_values, StaticCache) else [])
            if tuple(attention_mask.shape) not in ok:
                raise ValueError(f"attention_mask must be [batch, cached + new] = {ok[0]} (one entry per cached "
                                 f"and new token), got {tuple(attention_mask.shape)}")
            if attention_mask.device != input_ids.device:
                raise ValueError(f"attention_mask is on {attention_mask.device}, input_ids on {input_ids.device}")
        return P

    def forward(self, input_ids, labels=None, past_key_values=None, use_cache: bool = False,
                attention_mask=None, logits_to_keep: int = 0) -> MoMOutput:
        """input_ids [B, T] int; labels [B, T] (shifted inside, -100 ignored) -> MoMOutput.

        attention_mask [B, P + T] (1 = token, 0 = left padding; [B, T] with a StaticCache also accepted);
        past_key_values: a list of (k, v) from an earlier forward, or a StaticCache (updated in place and
        returned as past_key_values); logits_to_keep: > 0 computes the logits of the last that many positions
        only (generation needs the last one; saves the [B, T, vocab] tensor of a long prompt)."""
        P = self._check_inputs(input_ids, labels, past_key_values, attention_mask)
        if isinstance(past_key_values, StaticCache):
            out = self._forward(input_ids, labels, past_key_values, use_cache, attention_mask, P, logits_to_keep)
            past_key_values.seen += input_ids.shape[1]
            return out
        return self._forward(input_ids, labels, past_key_values, use_cache, attention_mask, P, logits_to_keep)

    def _forward(self, input_ids, labels, past_key_values, use_cache, attention_mask, P: int,
                 logits_to_keep: int = 0, balance: bool = True) -> MoMOutput:
        """The forward after the checks. With a StaticCache it reads nothing back to the host (a decode step
        runs it inside a CUDA graph capture: mom/generate.py). balance=False: no balance terms (aux_loss 0)."""
        cfg = self.config
        B, T = input_ids.shape
        static = isinstance(past_key_values, StaticCache)
        # cache layers with update(k, v) -> (k_all, v_all) (transformers' Cache through mom.hf): P given, masked
        layered = (not static and isinstance(past_key_values, (list, tuple)) and len(past_key_values) > 0
                   and hasattr(past_key_values[0], "update"))
        mask = new_mask = None
        if static:
            new_mask = (attention_mask[:, -T:].bool() if attention_mask is not None
                        else torch.ones(B, T, dtype=torch.bool, device=input_ids.device))
            pos, mask = past_key_values.begin(new_mask)                # [B, T], [B, 1, T, L]
        elif attention_mask is not None or layered:
            am = attention_mask if attention_mask is not None else input_ids.new_ones(B, P + T)
            pos, mask = padding_attention(am, P, T)                    # [B, T], [B, 1, T, P + T]
        else:
            pos = torch.arange(P, P + T, device=input_ids.device)
        x = self.wte(input_ids)                                       # [B, T, D]
        rope = None
        if cfg.family == "gpt2":
            x = x + self.wpe(pos)
        else:                                                         # (cos, sin) [B or -, T, head_dim]
            rope = self.rotary(pos, x.dtype)
        if past_key_values is not None and not static and not layered:  # the cache is concatenated with this dtype's keys
            check_cache_matches(past_key_values, x.dtype, None)
        ops = get_ops(cfg.backend, x.device)
        # the cache entries in graph order, taken by position (not next() on an iterator: torch 2.11's Dynamo
        # raised StopIteration on that in a comprehension while tracing cached decoding)
        past = list(past_key_values) if past_key_values is not None else None
        at = 0
        presents, routing, aux = [], [], []

        for block in self.bottom:
            x, kv = block(x, past[at] if past else None, mask, rope)
            at += 1
            presents.append(kv)
        for chunk in self.chunks:
            chunk_past = past[at:at + chunk.n_caches] if past else None
            at += chunk.n_caches
            if cfg.checkpoint_chunks and self.training and not use_cache and torch.is_grad_enabled():
                out = checkpoint(chunk, x, chunk_past, False, ops, mask, True, rope, use_reentrant=False)
            else:
                out = chunk(x, chunk_past, use_cache, ops, mask, balance, rope)
            x = out.hidden_states
            routing.append(out.routing)
            aux.append(out.aux_loss)
            if use_cache:
                presents.extend(out.present)
        for block in self.top:
            x, kv = block(x, past[at] if past else None, mask, rope)
            at += 1
            presents.append(kv)
        if static:
            past_key_values.end(new_mask)

        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = F.linear(self.ln_f(x), self.head_weight)             # [B, T, vocab]
        aux_loss = torch.stack(aux).mean() if aux else logits.new_zeros(())
        loss = lm_loss = None
        if labels is not None:
            if logits_to_keep > 0:
                raise ValueError("labels need every position's logits: logits_to_keep must be 0")
            lm_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                      labels[:, 1:].reshape(-1), ignore_index=-100)
            loss = lm_loss + cfg.aux_loss_coef * aux_loss
        cache = past_key_values if static or layered else (presents if use_cache else None)
        return MoMOutput(logits=logits, loss=loss, aux_loss=aux_loss, past_key_values=cache, routing=routing,
                         lm_loss=lm_loss)

    # --- generation ---------------------------------------------------------------------------------------------
    def generate(self, input_ids, max_new_tokens: Optional[int] = None, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None, **kwargs):
        """Generate after input_ids [B, T] with a static KV cache (one per attention call, i.e. per routed step);
        temperature 0 = greedy. Returns [B, T + new tokens]. Every option (attention_mask for left-padded
        batches, do_sample, top_p, eos_token_id, pad_token_id, max_length, cuda_graph, ...): mom.generate."""
        from .generate import generate
        return generate(self, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        generator=generator, **kwargs)

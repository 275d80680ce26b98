"""KV caches: the check every `past_key_values` passes before a forward uses it.

A cache is a list with one (k, v) per attention call in graph order (bottom blocks, then each chunk's steps
and anchor, then top blocks), each [B, kv_heads, P, head_dim] (kv_heads = num_key_value_heads, or n_head), P the
same for all. A cache that breaks any of
these would otherwise fail deep inside attention with a raw shape error, or, with unequal lengths, run
silently with wrong positions. The errors name the entry and where it sits in the graph.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .config import MoMConfig


def graph_location(cfg: MoMConfig, i: int) -> str:
    """Where the attention call with cache index i sits: 'bottom block 0', 'chunk 1 step 2', 'top block 0'."""
    if i < cfg.n_bottom:
        return f"bottom block {i}"
    i -= cfg.n_bottom
    per_chunk = cfg.depth + int(cfg.anchor)
    if i < cfg.chunks * per_chunk:
        c, h = divmod(i, per_chunk)
        return f"chunk {c} {'anchor' if h == cfg.depth else f'step {h}'}"
    return f"top block {i - cfg.chunks * per_chunk}"


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (TypeError, AttributeError, RuntimeError):  # older torch: no device_type argument
        if device.type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None


def check_past_key_values(past: Sequence, cfg: MoMConfig, batch: int, dtype: Optional[torch.dtype] = None,
                          device=None, n_entries: Optional[int] = None, name: str = "past_key_values",
                          locate: Optional[Callable[[int], str]] = None) -> int:
    """Validate a KV cache entry by entry; returns P, the number of cached positions.

    Checked: a list/tuple of n_entries (default cfg.n_cache_layers) (k, v) pairs of tensors, each
    [batch, kv_heads, P, head_dim], the same P, one floating dtype and one device in every entry; with `dtype`
    / `device` given (the activations' the cache will be concatenated with), those too (autocast's dtype
    is accepted while autocast is on).
    """
    n_entries = cfg.n_cache_layers if n_entries is None else n_entries
    locate = locate if locate is not None else (lambda i: graph_location(cfg, i))
    if not isinstance(past, (list, tuple)):
        raise TypeError(f"{name} must be a list of (k, v) tensor pairs (the past_key_values of an earlier "
                        f"forward with use_cache=True), got {type(past).__name__}")
    if len(past) != n_entries:
        raise ValueError(f"{name} has {len(past)} entries, expected {n_entries} (one per attention call, graph "
                         f"depth)")
    P = first = None
    for i, entry in enumerate(past):
        where = f"{name}[{i}] ({locate(i)})"
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise TypeError(f"{where} must be a (k, v) pair, got {type(entry).__name__}"
                            + (f" of length {len(entry)}" if isinstance(entry, (list, tuple)) else ""))
        for part, t in zip("kv", entry):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: {part} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{where}: {part} must be [batch, kv_heads, cached, head_dim] (rank 4), got shape "
                                 f"{tuple(t.shape)}")
            B, H, p, Dh = t.shape
            if B != batch:
                raise ValueError(f"{where}: {part} was made for batch {B}, input_ids has batch {batch}")
            if H != cfg.kv_heads:
                raise ValueError(f"{where}: {part} has {H} heads, the model has {cfg.kv_heads} K/V heads "
                                 f"(config.num_key_value_heads, or n_head)")
            if Dh != cfg.head_dim:
                raise ValueError(f"{where}: {part} has head size {Dh}, the model has n_embd / n_head = "
                                 f"{cfg.head_dim}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"{where}: {part} has dtype {t.dtype}, expected a floating dtype")
            if first is None:
                P, first = p, (f"{name}[0] k", t.dtype, t.device)
                continue
            if p != P:
                raise ValueError(f"{where}: {part} caches {p} positions, {first[0]} caches {P}: every entry must "
                                 f"cache the same tokens (a cache stitched from different forwards?)")
            if t.dtype != first[1]:
                raise TypeError(f"{where}: {part} has dtype {t.dtype}, {first[0]} has {first[1]}")
            if t.device != first[2]:
                raise ValueError(f"{where}: {part} is on {t.device}, {first[0]} on {first[2]}")
    if first is not None:
        check_cache_matches(past, dtype, device, name)
    return 0 if P is None else int(P)


def check_cache_matches(past: Sequence, dtype: Optional[torch.dtype], device, name: str = "past_key_values"):
    """The (already validated) cache's dtype and device are those of the activations it will be concatenated
    with: `dtype` (or autocast's while autocast is on) and `device`. None skips that check."""
    t = past[0][0]
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device}, the model computes on {torch.device(device)}")
    if dtype is not None and t.dtype != dtype:
        auto = _autocast_dtype(t.device)
        if t.dtype != auto:
            raise TypeError(f"{name} has dtype {t.dtype}, the model computes in {dtype}"
                            + (f" (autocast: {auto})" if auto is not None else "")
                            + " (a cache from a model in another dtype?)")


def check_chunk_cache(past: Sequence, cfg: MoMConfig, x: torch.Tensor, name: str = "MoMLayer: past_key_values"
                      ) -> int:
    """The same checks for one chunk's caches (MoMLayer.forward's past_key_values: depth steps + anchor), given
    the chunk's input x [B, T, D]; returns P."""
    return check_past_key_values(past, cfg, x.shape[0], x.dtype, x.device, n_entries=cfg.depth + int(cfg.anchor),
                                 name=name, locate=lambda i: "anchor" if i == cfg.depth else f"step {i}")


# ----------------------------------------------------------------------------------------------------------
# Static KV cache: preallocated, written in place, fixed shapes (CUDA-graph friendly)
# ----------------------------------------------------------------------------------------------------------
class StaticLayerCache:
    """One attention call's slice of a StaticCache: k, v [B, kv_heads, L, head_dim] written in place at the
    positions `cache.write_index` (a device tensor), so a step never changes a shape."""

    def __init__(self, cache: "StaticCache", k: torch.Tensor, v: torch.Tensor):
        self.cache, self.k, self.v = cache, k, v

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Write the T new keys / values [B, kv_heads, T, head_dim] at the cache's write positions; returns the
        whole buffers (k, v) [B, kv_heads, L, head_dim] (unwritten positions are masked by the caller)."""
        idx = self.cache.write_index
        self.k.index_copy_(2, idx, k.to(self.k.dtype))
        self.v.index_copy_(2, idx, v.to(self.v.dtype))
        return self.k, self.v


class StaticCache:
    """A KV cache of fixed size: one StaticLayerCache per attention call (graph order, as past_key_values),
    each [B, kv_heads, max_length, head_dim] (grouped-query attention caches its K/V heads only), plus the
    device-side bookkeeping a step needs:

        length   []     long   positions written so far (the same for every row: batches are left-padded)
        n_valid  [B]    long   real (unpadded) tokens per row so far: the next token's position id
        key_mask [B, L] bool   which written positions hold real tokens (False: left padding)

    A forward with `past_key_values=cache` writes its T tokens at positions length .. length + T - 1, attends
    over all L positions under a mask (causal, written, not padding) and advances `length` / `n_valid` in place.
    Nothing is read back to the host, so a one-token step has fixed shapes and can be captured in a CUDA graph.
    `seen` is a host-side mirror of `length` (for error messages and bounds checks outside a captured step).
    """

    def __init__(self, config: MoMConfig, batch: int, max_length: int, dtype: torch.dtype = torch.float32,
                 device=None):
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"StaticCache: batch must be an int >= 1, got {batch!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"StaticCache: max_length must be an int >= 1, got {max_length!r}")
        if max_length > config.n_positions:
            raise ValueError(f"StaticCache: max_length={max_length} is longer than config.n_positions="
                             f"{config.n_positions}")
        self.config, self.batch, self.max_length = config, batch, max_length
        shape = (batch, config.kv_heads, max_length, config.head_dim)
        self.layers = [StaticLayerCache(self, torch.zeros(shape, dtype=dtype, device=device),
                                        torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(config.n_cache_layers)]
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.n_valid = torch.zeros(batch, dtype=torch.long, device=device)
        self.key_mask = torch.zeros(batch, max_length, dtype=torch.bool, device=device)
        self.write_index = torch.zeros(0, dtype=torch.long, device=device)  # set per forward (T positions)
        self.seen = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].k.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].k.device

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def reset(self):
        """Empty the cache (buffers kept; no allocation)."""
        self.length.zero_()
        self.n_valid.zero_()
        self.key_mask.zero_()
        self.seen = 0

    def nbytes(self) -> int:
        return sum(2 * layer.k.numel() * layer.k.element_size() for layer in self.layers)

    def check(self, batch: int, new_tokens: int, dtype: torch.dtype, device, name: str = "past_key_values"):
        """Host-side checks before a forward (not inside a captured step): batch, room, dtype, device."""
        if batch != self.batch:
            raise ValueError(f"{name}: static cache was made for batch {self.batch}, input_ids has batch {batch}")
        if self.seen + new_tokens > self.max_length:
            raise ValueError(f"{name}: static cache holds max_length={self.max_length} positions; "
                             f"{self.seen} cached + {new_tokens} new exceed it")
        if self.device != torch.device(device) and not (self.device.type == torch.device(device).type
                                                        and torch.device(device).index is None):
            raise ValueError(f"{name}: static cache is on {self.device}, the model computes on {device}")
        if dtype is not None and self.dtype != dtype and self.dtype != _autocast_dtype(self.device):
            raise TypeError(f"{name}: static cache has dtype {self.dtype}, the model computes in {dtype}")

    def begin(self, new_mask: torch.Tensor):
        """Start a forward of T tokens whose padding mask is new_mask [B, T] (bool): set the write positions,
        record the mask, return (position ids [B, T], attention mask [B, 1, T, L] bool). Device ops only."""
        B, T = new_mask.shape
        self.write_index = self.length + torch.arange(T, device=self.device)              # [T]
        self.key_mask.index_copy_(1, self.write_index, new_mask)
        pos = (self.n_valid[:, None] + new_mask.long().cumsum(1) - 1).clamp_(min=0)        # [B, T]
        keys = torch.arange(self.max_length, device=self.device)                          # [L]
        causal = keys[None, :] <= self.write_index[:, None]                               # [T, L]
        own = keys[None, :] == self.write_index[:, None]                                  # [T, L]: a pad query
        mask = causal[None] & (self.key_mask[:, None, :] | own[None])                     # sees itself at least
        return pos, mask[:, None]                                                         # [B, 1, T, L]

    def end(self, new_mask: torch.Tensor):
        """Advance the counters after a forward of new_mask [B, T] (in place, device ops only)."""
        self.length.add_(new_mask.shape[1])
        self.n_valid.add_(new_mask.long().sum(1))


def is_static(past) -> bool:
    return isinstance(past, StaticCache)


def padding_attention(attention_mask: torch.Tensor, P: int, T: int):
    """For a dynamic cache of P positions and T new tokens with attention_mask [B, P + T] (1 = real token,
    0 = padding): position ids [B, T] (real tokens before, GPT-2 / HF style) and the attention mask
    [B, 1, T, P + T] bool (causal, real keys; a padding query sees itself so its softmax stays finite)."""
    m = attention_mask.bool()
    S = P + T
    pos = (m.long().cumsum(1) - 1).clamp_(min=0)[:, P:]                                    # [B, T]
    q = torch.arange(P, S, device=m.device)
    keys = torch.arange(S, device=m.device)
    causal = keys[None, :] <= q[:, None]                                                   # [T, S]
    own = keys[None, :] == q[:, None]
    return pos, (causal[None] & (m[:, None, :] | own[None]))[:, None]

"""KV caches: the check every `past_key_values` passes before a forward uses it.

A cache is a list with one (k, v) per attention call in graph order (bottom blocks, then each chunk's steps
and anchor, then top blocks), each [B, n_head, P, head_dim], P the same for all. A cache that breaks any of
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
    [batch, n_head, P, head_dim], the same P, one floating dtype and one device in every entry; with `dtype`
    / `device` given (the activations' the cache will be concatenated with), those too (autocast's dtype
    is accepted while autocast is on).
    """
    n_entries = cfg.n_cache_layers if n_entries is None else n_entries
    locate = locate or (lambda i: graph_location(cfg, i))
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
                raise ValueError(f"{where}: {part} must be [batch, n_head, cached, head_dim] (rank 4), got shape "
                                 f"{tuple(t.shape)}")
            B, H, p, Dh = t.shape
            if B != batch:
                raise ValueError(f"{where}: {part} was made for batch {B}, input_ids has batch {batch}")
            if H != cfg.n_head:
                raise ValueError(f"{where}: {part} has {H} heads, the model has config.n_head={cfg.n_head}")
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

"""Capacity (expert-choice) routing: each module takes a fixed share of each sequence's tokens.

The Mixture-of-Depths / Mixture-of-Recursions recipe on MoM's pools (MoMConfig.routing = "expert_choice"):

    N = B T tokens, E modules in the pool, c = config.capacity_of(E), C = ceil(c T)  (config.capacity_tokens)

    training:  for each sequence b and module m, the C tokens with the largest logits[b, :, m] (ties: the earlier
               token) are taken by m; a token taken by no module passes the step unchanged (the residual)
    inference: token t goes to module m when sigmoid(logit / tau) >= 1/2, i.e. logit >= 0 (a causal rule: it
               looks at the token alone; eval mode, every cached and few-token path)
    weight of a taken pick: capacity_scale * sigmoid(logit / tau)   (so the LM loss trains the router)
    aux loss:  mean BCE between logit / tau and "taken in training" over the N x E decisions, which teaches the
               logits the threshold rule that inference uses (its coefficient: config.aux_loss_coef)

The picks come out in the routed ops' form, ids [N, E] with ids[t, m] = m where m took t and the SKIP id E
elsewhere, weights [N, E] (0 for SKIP), so every backend and kernel runs them unchanged and SKIP rows cost nothing:
in training module m computes exactly B C rows at every step, whatever the input (static work per step).
Attention keeps the routed step's semantics: a token no attention module took has q = k = v = 0 at that step.
Sequences are the rows of the batch (in training: no padding; padded positions would compete for capacity).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from .config import MoMConfig
from .routers import Routing

MODES = ("auto", "train", "threshold")  # auto: training-style when the router module is training


def capacity_mask(logits: torch.Tensor, seq_len: int, n_take: int) -> torch.Tensor:
    """sel [N, E] bool: per sequence of seq_len rows and per column m, the n_take rows with the largest logits
    (a stable descending sort: on ties the earlier row)."""
    N, E = logits.shape
    lg = logits.detach().reshape(N // seq_len, seq_len, E)                            # [B, T, E]
    top = torch.sort(lg, dim=1, descending=True, stable=True).indices[:, :n_take]   # [B, C, E]
    sel = torch.zeros(lg.shape, dtype=torch.bool, device=logits.device).scatter_(1, top, True)
    return sel.view(N, E)


def route_capacity(logits: torch.Tensor, n_modules: int, config: MoMConfig, seq_len: int, train: bool,
                   balance: bool = True) -> Routing:
    """Expert-choice Routing of router logits [N, E] (N = B * seq_len) over a pool of n_modules: ids / weights
    [N, E] (module docstring); training-style top-capacity picks when `train`, else the threshold rule. f and P
    are None; `balance` holds the BCE aux loss (training-style picks only; None when balance is False)."""
    N, E = logits.shape
    if E != n_modules:
        raise ValueError(f"route_capacity: {E} logits per token for a pool of {n_modules} (no SKIP slot)")
    if N % seq_len:
        raise ValueError(f"route_capacity: {N} tokens are not sequences of {seq_len}")
    z = logits / config.router_temperature
    if train:
        sel = capacity_mask(logits, seq_len, config.capacity_tokens(n_modules, seq_len))
    else:
        sel = logits >= 0
    scores = torch.sigmoid(z)                                                          # [N, E]
    ids = torch.where(sel, torch.arange(E, device=logits.device), E)                  # [N, E], E = SKIP
    weights = torch.where(sel, config.capacity_scale * scores, torch.zeros_like(scores))
    aux = None
    if balance and train:
        aux = F.binary_cross_entropy_with_logits(z, sel.to(z.dtype))
    return Routing(ids=ids, weights=weights, probs=scores, slots=ids, f=None, P=None, balance=aux)


def routing_mode(layer) -> bool:
    """Whether a layer's expert-choice routing is training-style (top capacity) now: its `capacity_mode`
    ("train" / "threshold"), or "auto": when the layer is training."""
    mode = getattr(layer, "capacity_mode", "auto")
    return layer.training if mode == "auto" else mode == "train"


@contextlib.contextmanager
def force_mode(model, mode: str):
    """Within the block, every MoM layer of `model` routes training-style ("train": top capacity, non-causal) or
    by the threshold rule ("threshold"), whatever its training flag (to compare the two on the same data)."""
    if mode not in MODES:
        raise ValueError(f"force_mode: mode must be one of {MODES}, got {mode!r}")
    from .layer import MoMLayer

    layers = [m for m in model.modules() if isinstance(m, MoMLayer)]
    old = [getattr(m, "capacity_mode", "auto") for m in layers]
    for m in layers:
        m.capacity_mode = mode
    try:
        yield
    finally:
        for m, o in zip(layers, old):
            m.capacity_mode = o


@torch.no_grad()
def agreement(model, windows, batch_size: int = 16, n_windows: Optional[int] = None) -> dict:
    """How training's choice and inference's choice compare on data (a mom.data.TokenData of validation windows):
    {"agreement": share of the N x E (token, module) decisions both rules make alike, over every routed step and
    pool; "taken_train" / "taken_threshold": the share of decisions that take the token; "val_loss_train" /
    "val_loss_threshold": the validation loss with each rule}."""
    from .analysis import _windows

    cfg = model.config
    if cfg.routing != "expert_choice" or cfg.chunks == 0:
        raise ValueError("agreement: needs a routed model with routing='expert_choice'")
    was = model.training
    model.eval()
    same = total = taken_a = taken_b = 0
    loss = {"train": 0.0, "threshold": 0.0}
    count = 0
    try:
        for x in _windows(windows, n_windows, batch_size, "expert-choice agreement"):
            x = x.to(model.device)
            outs = {}
            for mode in ("train", "threshold"):
                with force_mode(model, mode):
                    outs[mode] = model(x, labels=x)
                loss[mode] += float(outs[mode].lm_loss) * len(x)
            count += len(x)
            for ca, cb in zip(outs["train"].routing, outs["threshold"].routing):
                for sa, sb in zip(ca, cb):
                    for key, E in (("attn_ids", cfg.n_attn), ("ffn_ids", cfg.n_ffn)):
                        a, b = getattr(sa, key) < E, getattr(sb, key) < E
                        same += int((a == b).sum())
                        total += a.numel()
                        taken_a += int(a.sum())
                        taken_b += int(b.sum())
    finally:
        model.train(was)
    return {"agreement": same / total, "taken_train": taken_a / total, "taken_threshold": taken_b / total,
            "val_loss_train": loss["train"] / count, "val_loss_threshold": loss["threshold"] / count}

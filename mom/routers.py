"""Routers: per token and step, pick top-K modules of a pool (or SKIP) and weight them.

    N = tokens (B * T), D = n_embd, r = router_dim, S = router slots, K = top_k, E = pool size

    GRU router (the paper's): s <- GRUCell(x, s); logits = Linear(s)      s [N, r] starts at 0 each chunk
    MLP router ("naive"):     logits = Linear(ReLU(Linear(x)))           stateless
    route():  p = softmax(logits / tau) [N, S]; slots = the K largest logits (largest first; on ties the
              lower slot), g = p at those slots, renormalised over the K picks (config.renormalize);
              slot ids >= E become the SKIP id E (what the routed ops expect).
    balance:  Switch-style  n * sum_e f_e * P_e  (f_e: share of the N*K top-K assignments to slot e,
              P_e: mean probability of slot e), over the n slots balanced (modules, plus SKIP if balance_skip).
Routing prior (config.routing_prior = P > 0, the function-preserving cut, mom/cut.py): after the router's
forward (any backend, the fused Triton GRU included) logits[:, s] += scale * prior[h, s], h the step:
prior[h] = 2 P tau on module h (on SKIP when h >= the pool), P tau on the SKIP slot, 0 elsewhere. With
P = 50, module h leads every other slot by >= 50 nats (less the router's own small logits), so its softmax
weight renormalised over the picks {h, SKIP} rounds to exactly 1 in fp64 (exp(-50) < 2^-53) and the step is
the cut layer h. t = training forwards of this router's chunk so far (the `prior_t` buffer, saved in
checkpoints; eval forwards do not count): scale = 1 before any (t = 0, the vanilla's function), then
(routing_prior_from / P) * max(0, 1 - t / routing_prior_steps): module h leads SKIP by routing_prior_from nats
(default 4: weight 0.98, the function barely moves, and the softmax passes the routers a gradient), decaying
to 0 after routing_prior_steps micro-batches (with activation checkpointing a recomputed forward counts too).
config.routing_prior_learned: no decay; the routing_prior_from part is a trained parameter prior_bias [depth, S]
(no weight decay: mom.train's no_decay), so routing starts on the layer order and leaves it where the loss's
gradient says so, and the fixed P-part applies before the first training forward only.
The step h is the router's own call count in the chunk (reset by the GRU's state None at the chunk's first
step; the MLP router counts calls modulo depth).
This file is the plain PyTorch spec; the Triton backend does route + plan + balance terms in three launches
(mom_kernels/route.py), tested against it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MoMConfig


class _Prior:
    """The decaying per-step logit bias of the function-preserving cut (module docstring); mixed into routers."""

    def _init_prior(self, config: MoMConfig, n_slots: int):
        self._prior_steps, self._depth, self._h = config.routing_prior_steps, config.depth, -1
        self._prior_from = min(1.0, config.routing_prior_from / config.routing_prior) if config.routing_prior else 0.0
        if not config.routing_prior:
            self.prior = None
            return
        pool = n_slots - int(config.skip)  # slots >= pool are SKIP; the first SKIP slot is `pool`
        P = float(config.routing_prior) * config.router_temperature
        prior = torch.zeros(config.depth, n_slots, dtype=torch.float64)
        for h in range(config.depth):
            if h < pool:
                prior[h, h] = 2 * P
                if config.skip:
                    prior[h, pool] = P
            elif config.skip:
                prior[h, pool] = 2 * P
        self.register_buffer("prior", prior, persistent=False)
        self.register_buffer("prior_t", torch.zeros((), dtype=torch.int64))  # training forwards so far
        self._learned = bool(config.routing_prior_learned)
        if self._learned:  # the decaying part, trained instead: starts at routing_prior_from nats (module h over SKIP)
            self.prior_bias = nn.Parameter((self._prior_from * prior).to(torch.get_default_dtype()))

    def _add_prior(self, logits, first: bool):
        if self.prior is None:
            return logits
        self._h = 0 if first else (self._h + 1) % self._depth
        if self._h == 0 and self.training:
            self.prior_t += 1
        t = (self.prior_t - 1 if self.training else self.prior_t).to(self.prior.dtype)
        if self._learned:  # the fixed prior only before the first training forward; the trained bias always
            fixed = torch.where(t < 1, self.prior[self._h], 0.0)
            return logits + fixed.to(logits.dtype) + self.prior_bias[self._h].to(logits.dtype)
        scale = torch.where(t < 1, 1.0, self._prior_from * (1.0 - t / self._prior_steps).clamp(min=0.0))
        return logits + (scale * self.prior[self._h]).to(logits.dtype)


class GRURouter(_Prior, nn.Module):
    def __init__(self, config: MoMConfig, n_slots: int):
        super().__init__()
        self.cell = nn.GRUCell(config.n_embd, config.router_dim)
        self.head = nn.Linear(config.router_dim, n_slots)
        self._init_prior(config, n_slots)

    def forward(self, x, state: Optional[torch.Tensor], gru_router=None):
        """x [N, D], state [N, r] or None (= zeros) -> logits [N, S], state [N, r]. gru_router: a fused cell +
        head taking (x, state, w_ih, w_hh, b_ih, b_hh, w_head, b_head) -> (logits, state) (the Triton
        backend's, mom_kernels.gru.gru_router), else nn.GRUCell then nn.Linear."""
        first = state is None
        if gru_router is None:
            state = self.cell(x, state)
            return self._add_prior(self.head(state), first), state
        c, h = self.cell, self.head
        logits, state = gru_router(x, state, c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh, h.weight, h.bias)
        return self._add_prior(logits, first), state


class MLPRouter(_Prior, nn.Module):
    def __init__(self, config: MoMConfig, n_slots: int):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.router_dim)
        self.head = nn.Linear(config.router_dim, n_slots)
        self._init_prior(config, n_slots)

    def forward(self, x, state=None, gru_cell=None):  # x [N, D] -> logits [N, S]; no state
        return self._add_prior(self.head(F.relu(self.fc(x))), False), None


def make_router(config: MoMConfig, n_slots: int) -> nn.Module:
    return GRURouter(config, n_slots) if config.router == "gru" else MLPRouter(config, n_slots)


@dataclass
class Routing:
    """One router's decision at one step, for N tokens, and its balance terms."""
    ids: torch.Tensor      # [N, K] int64, module ids; n_modules (= SKIP) where a SKIP slot was picked
    weights: torch.Tensor  # [N, K] g of each pick (differentiable)
    probs: torch.Tensor    # [N, S] softmax(logits / tau) over all slots
    slots: torch.Tensor    # [N, K] int64, picked slot ids before SKIP slots are merged
    f: Optional[torch.Tensor]        # [n] share of the N*K picks per balanced slot (no gradient)
    P: Optional[torch.Tensor]        # [n] mean probability per balanced slot (differentiable)
    balance: Optional[torch.Tensor]  # [] this call's balancing loss n * sum f * P (differentiable)
    # (f, P, balance: None when route(..., balance=False))


def route(logits: torch.Tensor, n_modules: int, config: MoMConfig, balance: bool = True) -> Routing:
    """Top-K (or dense) routing of logits [N, S] over a pool of n_modules; slots >= n_modules are SKIP.
    balance=False leaves f, P and balance None (a decode step needs no balance loss)."""
    probs = torch.softmax(logits / config.router_temperature, dim=-1)  # [N, S]
    N, S = probs.shape
    if config.dense_routing:  # ablation: all slots, weighted by the full softmax
        slots = torch.arange(S, device=probs.device).expand(N, S)
        weights = probs
    else:  # the K largest logits; a stable descending sort puts the lower slot first on ties
        slots = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :config.top_k]  # [N, K]
        weights = probs.gather(1, slots)
        if config.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    if config.straight_through:  # value 1 per pick forward, the soft weight's gradient backward
        if config.straight_through_clamp and weights.requires_grad:  # the authors' clamp to [-1, 1]
            weights.register_hook(lambda g: g.clamp(-1.0, 1.0))
        weights = weights - weights.detach() + 1.0
    ids = slots.clamp(max=n_modules)
    if not balance:
        return Routing(ids=ids, weights=weights, probs=probs, slots=slots, f=None, P=None, balance=None)
    f, P = balance_terms(slots, probs, n_modules, config)
    return Routing(ids=ids, weights=weights, probs=probs, slots=slots, f=f, P=P, balance=balance_loss(f, P))


def balance_terms(slots: torch.Tensor, probs: torch.Tensor, n_modules: int, config: MoMConfig):
    """(f, P) restricted to the balanced slots: f [S'] assignment shares (no gradient), P [S'] mean probs."""
    S = probs.shape[-1]
    counts = F.one_hot(slots.reshape(-1), S).sum(0).to(probs.dtype)  # [S]
    f = counts / slots.numel()
    P = probs.mean(0)
    if not config.balance_skip:
        f, P = f[:n_modules], P[:n_modules]
    return f, P


def balance_loss(f: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's n * sum_e f_e P_e (1 when routing is uniform)."""
    return f.numel() * (f * P).sum()

"""The function-preserving cut: phase 2 starts from the vanilla's function, not from a 0.3-nat jump.

The paper's cut (`mom.convert.from_gpt2`, the default) gives the routers fresh N(0, 0.02) weights: at
phase 2's first step every router picks near-uniformly, each routed step sums K modules with weights ~1/K,
and the MoM computes something else than the vanilla it was cut from (about +0.33 nats at the reproduction's
scale, docs/training.md), which phase 2 spends its first steps recovering.

The function-preserving cut adds a routing prior (MoMConfig.routing_prior = P, routing_prior_steps = S;
mom/routers.py): after each router's forward, logits[:, s] += scale * prior[h, s] with prior[h] = 2 P tau on
module h, P tau on the SKIP slot and 0 elsewhere, scale = max(0, 1 - t / S) over the training forwards t.
At scale 1 step h picks module h (the vanilla's layer h of the chunk) and SKIP; renormalised over the picks,
module h's weight is 1 / (1 + exp(-P)) = 1.0 exactly in fp64 for P >= 38 (default 50) and SKIP adds nothing,
so a routed step is exactly the vanilla's layer h (pre-LN: x += attn(ln_1 x); x += mlp(ln_2 x)), and the MoM
computes the vanilla's logits. The prior then decays linearly to 0 over S forwards; the routers, trained
throughout, take over (their gradient through the softmax is ~exp(-P scale), so they learn once the prior
is within a few nats). The prior is added after the router's forward, so it works for every backend
(the Triton one's fused GRU cell + head included) and costs one [N, S] add per router call.

MoMConfig.routing_prior_learned = True replaces the decay by a trained per-step bias (routers.py: prior_bias
[depth, S], starting at the routing_prior_from value, no weight decay): routing starts on the layer order and
can leave it where the loss's gradient says so instead of on a schedule (in the full-size run of
docs/training.md, section 5, it never did within 600 steps).

    python -m mom.train --config configs/repro_phase2_preserving.json      (model_overrides: routing_prior,
                                                                             routing_prior_steps)
    model = mom.convert.from_gpt2(sd, cfg, preserving=True)   (routing_prior=50 unless cfg sets one)

Which configs can be function-preserving (`preserving_problems`): every layer of the vanilla must survive
the cut and be reachable in order, i.e.
  * n_attn == n_ffn (== M): with n_attn < n_ffn the cut drops layers n_attn.. of their attention halves
    (docs/method.md's layer map), so the vanilla's function is gone whatever the routers do;
  * depth == M, or depth > M with top_k == 1 and a SKIP slot (the extra steps pick SKIP alone, adding 0);
    depth < M runs fewer layers than were cut;
  * top_k <= 1 + skip: the picks are module h and (K = 2) the one SKIP slot; a third pick would be a
    second module with a weight > 0 (the default layout has one SKIP slot per router);
  * not dense_routing (every slot gets a softmax weight > 0).
The presets: mom-small/-medium/-large-like configs whose depth is not M or whose top_k > 2 cannot be
(the test lists them); the reproduction's config (M = depth = 4, K = 2, one chunk) can.
"""
from __future__ import annotations

from typing import List

from .config import MoMConfig

DEFAULT_PRIOR = 50.0  # nats between module h and the SKIP slot (and SKIP and the rest): exp(-50) < 2^-53


def preserving_problems(cfg: MoMConfig) -> List[str]:
    """Why a cut into cfg cannot compute the vanilla's function at phase 2's first step ([] = it can)."""
    out = []
    if cfg.chunks == 0:
        out.append("no routed chunk (a vanilla config)")
        return out
    M = cfg.n_modules
    if cfg.n_attn != cfg.n_ffn:
        out.append(f"n_attn={cfg.n_attn} != n_ffn={cfg.n_ffn}: the cut drops half-layers of the vanilla")
    if cfg.depth < M:
        out.append(f"depth={cfg.depth} < M={M}: fewer routed steps than cut layers")
    if cfg.depth > M and not (cfg.top_k == 1 and cfg.skip):
        out.append(f"depth={cfg.depth} > M={M}: the extra steps must pick SKIP alone (top_k=1 and skip=True)")
    if cfg.top_k > 1 + int(cfg.skip):
        out.append(f"top_k={cfg.top_k} > 1 + skip: a pick besides module h and SKIP would add a second module")
    if cfg.dense_routing:
        out.append("dense_routing: every module gets a weight > 0")
    if P_too_small(cfg):
        out.append(f"routing_prior={cfg.routing_prior} < 38: module h's renormalised weight is not exactly 1")
    return out


def P_too_small(cfg: MoMConfig) -> bool:
    """A routing prior below 38 nats. Module h's weight renormalised over {h, SKIP} is 1 / (1 + exp(-P)) (plus
    the router's own logits), which rounds to exactly 1.0 in fp64 from P = 53 ln 2 = 36.74 on; 38 leaves 1.26
    nats for the router's own logits, a few hundredths at the cut (N(0, 0.02) weights)."""
    return 0 < cfg.routing_prior < 38


def preserving_config(cfg: MoMConfig, steps: int = None, prior: float = DEFAULT_PRIOR) -> MoMConfig:
    """cfg with the routing prior set (routing_prior_steps: `steps`, else cfg's, else 1000); raises ValueError
    naming the reasons when the cut into cfg cannot be function-preserving."""
    steps = steps or cfg.routing_prior_steps or 1000
    new = cfg.replace(routing_prior=cfg.routing_prior or prior, routing_prior_steps=steps)
    bad = preserving_problems(new)
    if bad:
        raise ValueError("this config cannot be cut function-preservingly: " + "; ".join(bad))
    return new

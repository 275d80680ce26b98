"""mom_kernels: Triton kernels for Mixture-of-Modules routed steps (Gong et al., EMNLP 2024).

Public API (contract; see docs/kernels.md):
    routed_ffn(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps=1e-5, plan=None, residual=None,
               norm="layer", act="gelu")          (norm "rms" + act "swiglu": the Llama family's FFN)
    routed_linear(x, weight, bias, ids, weights=None, ln_weight=None, ln_bias=None, eps=1e-5, plan=None,
                  residual=None, norm="layer")
    rotary.qkv_heads(qkv, n_head, kv_heads, rope) -> (q, k, v)   (the routed QKV split, q and k rotated)
    route.route(logits, n_modules, top_k, temperature, ...) -> route.Route   (picks, weights, balance, plan)
    routing.make_plan(ids, n_modules, block_m=None) -> routing.RoutingPlan   (share between calls)
    gru.gru_router(x, h, w_ih, w_hh, b_ih, b_hh, w_head, b_head) -> (logits, h')   (the GRU router's step)
    decode.routed_linear / decode.routed_ffn   (the few-token path under no_grad, else the ops above)
    reference.routed_ffn / reference.routed_linear   (plain PyTorch, same signatures)
    launches.count_launches()   (what code launches, and its host syncs)
    checks.set_check_ids(flag)   (host-syncing id range check on CUDA; always on for CPU)

CUDA tensors run compiled Triton kernels; CPU tensors need TRITON_INTERPRET=1 set before triton is
imported (tests set it at their top when CUDA is absent).
"""
from . import reference, rotary, route, routing
from .checks import set_check_ids
from .common import interpreting
from .routed_ffn import routed_ffn
from .routed_linear import routed_linear
from .routing import RoutingPlan, make_plan

__all__ = ["routed_ffn", "routed_linear", "reference", "rotary", "route", "routing", "make_plan", "RoutingPlan",
           "set_check_ids", "interpreting"]

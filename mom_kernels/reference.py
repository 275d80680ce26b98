"""Plain PyTorch reference of every public op in `mom_kernels` (the spec and the test oracle).

Index legend: T tokens, K picks per token (top-K), E modules in the pool, D model width,
F FFN width, N_in / N_out the widths of a routed linear layer. SKIP is the id E.

    routed_linear(x, W, b, ids, g, gamma, beta)[t]
        = sum_{k : ids[t,k] < E} g[t,k] * (LN_m(x[t]) @ W[m] + b[m]),     m = ids[t,k]
    routed_ffn(x, gamma, beta, W1, b1, W2, b2, ids, g)[t]
        = sum_{k : ids[t,k] < E} g[t,k] * (act(LN_m(x[t]) @ W1[m] + b1[m]) @ W2[m] + b2[m])

LN_m is a LayerNorm over the last dim with module m's affine (gamma[m], beta[m]) (norm="layer"), or an
RMSNorm with gain gamma[m] (norm="rms": x * rsqrt(mean(x^2) + eps) * gamma[m]); without gamma routed_linear
uses x[t] itself, without g every pick has weight 1, without a bias none is added. act is gelu_tanh
(act="gelu", W1 [E, D, F]) or SwiGLU (act="swiglu", W1 [E, D, 2F] = gate | up: silu(h[:F]) * h[F:]).

The code below is deliberately the dumb per-module loop (the authors' structure, without their
`.tolist()` host syncs): for every module, pick its (token, k) rows with a mask, run the dense
module on them, and add the weighted rows back with `index_add` in a fixed order. It is slow
and obviously right, which is what an oracle should be. Same signatures as the fast functionals
(the `plan` keyword is accepted and ignored so callers can switch implementations freely).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F_

__all__ = ["routed_linear", "routed_ffn", "gelu_tanh", "swiglu"]


def gelu_tanh(u: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (GPT-2's `gelu_new`)."""
    return F_.gelu(u, approximate="tanh")


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up] (the Llama family's FFN activation)."""
    gate, up = h.chunk(2, dim=-1)
    return F_.silu(gate) * up


def _norm(x, gamma, beta, eps, norm="layer"):
    if norm == "rms":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gamma
    return F_.layer_norm(x, (x.shape[-1],), gamma, beta, eps)


def routed_linear(x, weight, bias, ids, weights=None, ln_weight=None, ln_bias=None, eps=1e-5,
                  plan=None, norm="layer"):
    """Reference routed linear layer. x [T, N_in], weight [E, N_in, N_out], bias [E, N_out] or None,
    ids [T, K] (E = SKIP), weights [T, K] or None, ln_weight / ln_bias [E, N_in] or None.
    Returns [T, N_out] in x's dtype."""
    T, K = ids.shape
    E, _, N_out = weight.shape
    y = x.new_zeros(T, N_out)
    for m in range(E):
        tok, k = (ids == m).nonzero(as_tuple=True)  # rows of module m, (t, k) in row-major order
        if tok.numel() == 0:
            continue
        u = x[tok]  # [R, N_in]
        if ln_weight is not None:
            u = _norm(u, ln_weight[m], ln_bias[m] if ln_bias is not None else None, eps, norm)
        out = u @ weight[m]  # [R, N_out]
        if bias is not None:
            out = out + bias[m]
        if weights is not None:
            out = out * weights[tok, k].unsqueeze(-1)
        y = y.index_add(0, tok, out)
    return y


def routed_ffn(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps=1e-5, plan=None, norm="layer",
               act="gelu"):
    """Reference routed FFN. x [T, D], ln_weight / ln_bias [E, D] (ln_bias None: none), w1 [E, D, F or 2F],
    b1 [E, F or 2F] or None, w2 [E, F, D], b2 [E, D] or None, ids [T, K] (E = SKIP), weights [T, K]. Returns
    [T, D]."""
    T, K = ids.shape
    E = w1.shape[0]
    y = torch.zeros_like(x)
    for m in range(E):
        tok, k = (ids == m).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        u = _norm(x[tok], ln_weight[m], ln_bias[m] if ln_bias is not None else None, eps, norm)  # [R, D]
        pre = u @ w1[m] if b1 is None else u @ w1[m] + b1[m]  # [R, F or 2F]
        h = gelu_tanh(pre) if act == "gelu" else swiglu(pre)  # [R, F]
        out = h @ w2[m] if b2 is None else h @ w2[m] + b2[m]
        out = out * weights[tok, k].unsqueeze(-1)  # [R, D]
        y = y.index_add(0, tok, out)
    return y

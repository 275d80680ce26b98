"""Forward FLOPs of a MoM (or vanilla) model of either family: counted from the picks a forward made, or expected.

docs/method.md, "Cost model": 2 FLOPs per multiply-add; per token, with D = n_embd, F = ffn_dim, r = router_dim,
S = the key length (cached + new), V = vocab_size, W = the QKV width (n_head + 2 kv_heads) head_dim (3D without
grouped-query attention):

    fixed block                projections 2 D W + 2 D^2 (QKV + output; 8 D^2 for GPT-2), FFN 4 D F (GPT-2's
                               GELU MLP) or 6 D F (the Llama family's SwiGLU: gate, up, down),
                               attention core 4 S D (QK^T 2 S D + PV 2 S D; query heads x head_dim = D whatever
                               the K/V heads)
    routed step                2 D W + 2 D^2 per picked non-SKIP attention module, 4 D F or 6 D F per picked
                               non-SKIP FFN module, one attention core 4 S D (whatever K is), two routers
    router (GRU)               2 (3 r D + 3 r^2) + 2 r slots          (GRUCell + linear head)
    router (MLP)               2 r D + 2 r slots
    LM head                    2 D V (tied or not)
    rotary positions (llama)   3 FLOPs per rotated q / k element, (n_head + kv_heads) head_dim per token and
                               attention call: elementwise, so outside the total (`rope`), as LayerNorm is

Conventions (chosen so that `count` equals what `torch.utils.flop_counter.FlopCounterMode` counts for the
same forward on the "torch" or "reference" backend; tests/test_flops.py checks it within 1%):
  - Only matrix products are counted: LayerNorm, GELU, softmax, the routers' top-K, the weighted combine,
    the embeddings and the loss are not (FlopCounterMode does not count them either; they are < 1%).
  - The attention core counts the full T x S score matrix, as FlopCounterMode's SDPA formula does
    (`attention`). The causal figure (query i sees only its P + i + 1 keys, about half) is the field
    `attention_causal`; `FlopCount.causal_total` swaps it in.
  - The attention core runs once per routed step over every token, as our backends do, including tokens
    whose K attention picks are all SKIP (their q = k = v = 0; docs/method.md). The part spent on such tokens'
    query rows, which a kernel could skip, is `attention_all_skip` (it is inside `attention`).
  - SKIP picks cost nothing: the routed projections and FFNs count only rows that picked a module (the
    "torch" and "reference" backends compute exactly those rows).
  - FlopCounterMode sees no FLOPs in the CPU flash-attention kernel (aten._scaled_dot_product_flash_
    attention_for_cpu has no formula in torch 2.13); `flop_counter()` returns a FlopCounterMode that counts it
    with the standard SDPA formula, and under `torch.nn.attention.sdpa_kernel(SDPBackend.MATH)` the default
    FlopCounterMode counts the same figure through the math path's bmm calls.

API:
    count(model, input_ids, past_key_values=None, output=None) -> FlopCount   (an int, with the split)
    expected(config, batch, seq_len, skip_rate=0.0, past_length=0) -> FlopCount
    flop_counter(**kwargs) -> FlopCounterMode that also counts the CPU SDPA kernel
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import MoMConfig

PARTS = ("projections", "attention", "ffn", "routers", "lm_head", "combine")


class FlopCount(int):
    """Forward FLOPs as an int (the sum of PARTS), with the split as attributes.

    projections        attention QKV + output projections (fixed blocks and routed picks)
    attention          attention core, full T x S scores (FlopCounterMode's convention)
    ffn                FFN up + down projections (fixed blocks and routed picks)
    routers            GRU / MLP routers and their slot heads
    lm_head            the tied output projection
    combine            the weighted sum of each token's K pick outputs, when done as a [1, K] x [K, O]
                       product (the "torch" backend: 2 K O per token per weighted combine; "reference"
                       multiplies elementwise, which no FLOP counter counts: 0); < 0.1% of a forward
    attention_causal   the attention core counting only the keys a causal mask lets each query see
    attention_all_skip the part of `attention` spent on query rows whose attention picks were all SKIP
    rope               the rotary positions' elementwise FLOPs (the Llama family; not in the total, as no
                       FLOP counter counts elementwise work)
    """

    def __new__(cls, projections: int, attention: int, ffn: int, routers: int, lm_head: int,
                attention_causal: int, attention_all_skip: int = 0, combine: int = 0, rope: int = 0):
        parts = dict(projections=int(projections), attention=int(attention), ffn=int(ffn),
                     routers=int(routers), lm_head=int(lm_head), combine=int(combine))
        self = super().__new__(cls, sum(parts.values()))
        for k, v in parts.items():
            setattr(self, k, v)
        self.attention_causal = int(attention_causal)
        self.attention_all_skip = int(attention_all_skip)
        self.rope = int(rope)
        return self

    @property
    def total(self) -> int:
        return int(self)

    @property
    def causal_total(self) -> int:
        """Total with the causal attention core instead of the full-square one."""
        return int(self) - self.attention + self.attention_causal

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in PARTS}
        d.update(total=self.total, attention_causal=self.attention_causal, causal_total=self.causal_total,
                 attention_all_skip=self.attention_all_skip, rope=self.rope)
        return d

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={getattr(self, k) / 1e9:.4g}G" for k in PARTS)
        return f"FlopCount({self.total / 1e9:.4g} GFLOPs: {parts})"

    def __reduce__(self):
        return (FlopCount, (self.projections, self.attention, self.ffn, self.routers, self.lm_head,
                            self.attention_causal, self.attention_all_skip, self.combine, self.rope))


# --- per-token pieces (2 FLOPs per multiply-add) ----------------------------------------------------------------
def _attn_proj(cfg: MoMConfig) -> int:    # QKV D -> W and output D -> D
    return 2 * cfg.n_embd * cfg.qkv_dim + 2 * cfg.n_embd * cfg.n_embd


def _ffn(cfg: MoMConfig) -> int:          # D -> F (GELU) or 2F (gate | up), then F -> D
    return 2 * cfg.n_embd * cfg.ffn_in_dim + 2 * cfg.ffn_dim * cfg.n_embd


def _rope(cfg: MoMConfig) -> int:         # per token and attention call: q and k rotated, 3 FLOPs per element
    return 3 * (cfg.n_head + cfg.kv_heads) * cfg.head_dim if cfg.family == "llama" else 0


def _router(cfg: MoMConfig, slots: int) -> int:
    D, r = cfg.n_embd, cfg.router_dim
    body = 2 * (3 * r * D + 3 * r * r) if cfg.router == "gru" else 2 * r * D
    return body + 2 * r * slots


def _combine(cfg: MoMConfig, k_attn: int, k_ffn: int) -> int:
    """Per token and step: the weighted [1, K] x [K, O] combines of the attention output (O = D), the FFN
    (O = D) and, with weighted_qkv, the QKV projection (O = 3 D); K counts SKIP picks too (zero rows)."""
    return 2 * cfg.n_embd * (k_attn * (1 + 3 * int(cfg.weighted_qkv)) + k_ffn)


def _core_full(B: int, T: int, S: int, D: int) -> int:
    """QK^T and PV over the full T x S score matrix, summed over heads: 4 B T S D."""
    return 4 * B * T * S * D


def _core_causal(B: int, T: int, P: int, D: int) -> int:
    """Query i (absolute position P + i) sees P + i + 1 keys: 4 B D sum_i (P + i + 1)."""
    return 4 * B * D * (T * P + T * (T + 1) // 2)


def _fixed(cfg: MoMConfig, B: int, T: int, P: int):
    """(projections, attention full, ffn, attention causal) of the fixed blocks (bottom, anchors, top)."""
    n = cfg.n_bottom + cfg.n_top + (cfg.chunks if cfg.anchor else 0)
    N, D = B * T, cfg.n_embd
    return (n * N * _attn_proj(cfg), n * _core_full(B, T, P + T, D), n * N * _ffn(cfg),
            n * _core_causal(B, T, P, D))


def count(model, input_ids: torch.Tensor, past_key_values=None, output=None,
          combine: Optional[bool] = None) -> FlopCount:
    """FLOPs of `model(input_ids, past_key_values=...)` with the picks its routers made (SKIP is free).

    Runs that forward under no_grad unless `output` (its MoMOutput) is given. The count is what
    FlopCounterMode counts for the same forward on the "torch" and "reference" backends (module docstring:
    conventions). combine: count the weighted combine as a product (None: as the model's backend does it,
    i.e. all but "reference").
    """
    from .cache import check_past_key_values
    from .routed import get_ops

    cfg = model.config
    if combine is None:
        combine = get_ops(cfg.backend, input_ids.device).name != "reference"
    B, T = input_ids.shape
    P = 0 if past_key_values is None else check_past_key_values(past_key_values, cfg, B)
    if output is None:
        with torch.no_grad():
            output = model(input_ids, past_key_values=past_key_values, use_cache=past_key_values is not None)
    D, N, S = cfg.n_embd, B * T, P + T
    proj, core, ffn, core_causal = _fixed(cfg, B, T, P)
    routers = all_skip = comb = 0
    core_row = 4 * S * D  # full-square core of one query row (all heads)
    for chunk in output.routing or []:
        for step in chunk:
            a_live = step.attn_ids < cfg.n_attn          # [B, T, K] non-SKIP attention picks
            f_live = step.ffn_ids < cfg.n_ffn
            proj += int(a_live.sum()) * _attn_proj(cfg)
            ffn += int(f_live.sum()) * _ffn(cfg)
            core += _core_full(B, T, S, D)
            core_causal += _core_causal(B, T, P, D)
            all_skip += int((~a_live.any(dim=-1)).sum()) * core_row
            routers += N * (_router(cfg, cfg.attn_slots) + _router(cfg, cfg.ffn_slots))
            comb += N * _combine(cfg, step.attn_ids.shape[-1], step.ffn_ids.shape[-1]) if combine else 0
    rope = N * cfg.graph_depth * _rope(cfg)
    return FlopCount(proj, core, ffn, routers, N * 2 * D * cfg.vocab_size, core_causal, all_skip, comb, rope)


def expected(config: MoMConfig, batch: int, seq_len: int, skip_rate: float = 0.0,
             past_length: int = 0, combine: bool = True) -> FlopCount:
    """Expected FLOPs of a forward of `batch` x `seq_len` new tokens after `past_length` cached ones,
    without building the model.

    skip_rate is the share of the routers' B*T*K top-K picks that land on SKIP (0 = every pick runs a
    module; the same rate for both routers). Each token's routed step then runs K * (1 - skip_rate)
    attention and FFN modules on average. With dense_routing every module runs (top_k and skip_rate unused).
    `attention_all_skip` is estimated only for K = 1 (where a SKIP pick is an all-SKIP token); with K > 1 and
    one SKIP slot a token cannot pick SKIP twice, so it is 0. combine: include the "torch" backend's
    weighted-combine products (FlopCount.combine; False for the "reference" backend and the paper's model).
    Expert-choice routing (config.routing): training's static count, each module ceil(c T) tokens of every
    sequence (MoMConfig.capacity_tokens; skip_rate does not apply); the threshold rule of inference takes a
    data-dependent number (`count` counts it from the picks).
    """
    cfg = config
    if not 0.0 <= skip_rate <= 1.0:
        raise ValueError(f"skip_rate must be in [0, 1], got {skip_rate}")
    if skip_rate > 0 and cfg.chunks > 0 and not cfg.skip and not cfg.dense_routing:
        raise ValueError("skip_rate > 0 needs a config with a SKIP slot (config.skip=True)")
    if batch < 1 or seq_len < 1 or past_length < 0:
        raise ValueError(f"need batch >= 1, seq_len >= 1, past_length >= 0; got {batch}, {seq_len}, "
                         f"{past_length}")
    B, T, P, D = batch, seq_len, past_length, cfg.n_embd
    N, S = B * T, P + T
    proj, core, ffn, core_causal = _fixed(cfg, B, T, P)
    steps = cfg.chunks * cfg.depth
    if cfg.routing == "expert_choice" and cfg.chunks:
        if skip_rate:
            raise ValueError("skip_rate does not apply to expert-choice routing (each module takes its capacity)")
        k_attn = cfg.n_attn * cfg.capacity_tokens(cfg.n_attn, T) / T   # module rows per token, on average
        k_ffn = cfg.n_ffn * cfg.capacity_tokens(cfg.n_ffn, T) / T
        all_skip_share = 0.0  # (tokens no attention module took vary with the input; not estimated)
    elif cfg.dense_routing:
        k_attn, k_ffn, all_skip_share = cfg.n_attn, cfg.n_ffn, 0.0
    else:
        k_attn = k_ffn = cfg.top_k * (1.0 - skip_rate)
        all_skip_share = skip_rate if cfg.top_k == 1 else 0.0
    proj += round(steps * N * k_attn * _attn_proj(cfg))
    ffn += round(steps * N * k_ffn * _ffn(cfg))
    core += steps * _core_full(B, T, S, D)
    core_causal += steps * _core_causal(B, T, P, D)
    routers = steps * N * (_router(cfg, cfg.attn_slots) + _router(cfg, cfg.ffn_slots))
    all_skip = round(steps * N * all_skip_share * 4 * S * D)
    ka, kf = (cfg.attn_slots, cfg.ffn_slots) if cfg.dense_routing or cfg.routing == "expert_choice" else \
        (cfg.top_k, cfg.top_k)  # dense routing and expert choice combine every slot of a token
    comb = steps * N * _combine(cfg, ka, kf) if combine else 0
    rope = N * cfg.graph_depth * _rope(cfg)
    return FlopCount(proj, core, ffn, routers, N * 2 * D * cfg.vocab_size, core_causal, all_skip, comb, rope)


def flop_counter(**kwargs):
    """torch's FlopCounterMode, also counting the CPU flash-attention kernel with the standard SDPA formula."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    aten = torch.ops.aten
    mapping = dict(kwargs.pop("custom_mapping", None) or {})
    op = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kw) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

        mapping.setdefault(op, _cpu_sdpa_flop)
    kwargs.setdefault("display", False)
    return FlopCounterMode(custom_mapping=mapping, **kwargs)


def num_parameters(config: MoMConfig, routers: bool = True) -> int:
    """Parameters of MoMForCausalLM(config) without building it; routers=False leaves the routers out (what a MoM
    adds to the vanilla model it is cut from)."""
    D, F, V, W, F1 = config.n_embd, config.ffn_dim, config.vocab_size, config.qkv_dim, config.ffn_in_dim
    gpt2 = config.family == "gpt2"  # (LayerNorm biases and every projection bias)
    norm = 2 * D if gpt2 else D
    attn_mod = norm + D * W + W * int(config.qkv_bias) + D * D + D * int(gpt2)
    ffn_mod = norm + D * F1 + F1 * int(gpt2) + F * D + D * int(gpt2)
    block = attn_mod + ffn_mod
    n_fixed = config.n_bottom + config.n_top + (config.chunks if config.anchor else 0)
    r = config.router_dim

    def router(slots):
        body = 3 * r * D + 3 * r * r + 6 * r if config.router == "gru" else D * r + r
        return body + r * slots + slots

    chunk = config.n_attn * attn_mod + config.n_ffn * ffn_mod
    if routers:
        chunk += router(config.attn_slots) + router(config.ffn_slots)
    head = 0 if config.tie_word_embeddings else V * D
    return V * D + config.n_positions * D * int(gpt2) + n_fixed * block + config.chunks * chunk + norm + head

"""MoMConfig: the shape of a Mixture-of-Modules language model, with GPT-2's field names.

Layout (docs/method.md, "Layout"):

    embeddings -> n_bottom fixed blocks
               -> chunks x [ depth routed steps over the chunk's pools (+ one fixed anchor block) ]
               -> n_top fixed blocks -> ln_f -> LM head (tied to the embeddings unless tie_word_embeddings=False)

    graph depth   = n_bottom + chunks * (depth + anchor) + n_top
    source layers = n_bottom + chunks * (max(n_attn, n_ffn) + anchor) + n_top   (GPT-2 layers consumed
                    by `from_gpt2`; modules beyond n_attn / n_ffn are dropped)

A vanilla model is `chunks=0` with all its layers in `n_bottom`.

Block family (`family`, the one place that decides it; docs/architecture.md):

    "gpt2"   LayerNorm (gain and bias), GELU (tanh) MLP, learned positions (wpe), biases on every projection
    "llama"  RMSNorm (gain only), SwiGLU MLP (c_fc holds gate | up: [D, 2F]), rotary positions (rope_theta,
             split halves as transformers rotates them), no biases but the optional q/k/v ones
             (attention_bias: Qwen2), untied LM head when tie_word_embeddings=False

Both families take grouped-query attention (num_key_value_heads < n_head: the QKV projection is
(n_head + 2 * num_key_value_heads) * head_dim wide and the KV cache holds the K/V heads only).
`MoMConfig.from_hf(hf_config, **layout)` reads a transformers GPT2Config, LlamaConfig, Qwen2Config or
MistralConfig (mom/hf_config.py).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import warnings
from dataclasses import dataclass
from typing import Optional

BACKENDS = ("reference", "torch", "triton", "auto")
FAMILIES = ("gpt2", "llama")
ROUTERS = ("gru", "mlp")
BALANCE_MODES = ("per_step", "pooled")
ROUTINGS = ("token_choice", "expert_choice")


class ConfigError(ValueError, TypeError):
    """A setting of the wrong type or outside its range; the message names the field and the value, and `field`
    holds the field's name when there is one (a command-line tool says where the bad value came from).
    (A ValueError, and a TypeError too, so callers catching either for a bad setting still do.)"""

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


class Checker:
    """need(ok, field, rule) -> ConfigError "Owner.field=value: rule"; typed checks run before comparisons,
    so a value of the wrong type is reported as such (never as a TypeError from `>`)."""

    def __init__(self, obj, owner: str):
        self.obj, self.owner = obj, owner

    def __call__(self, ok: bool, name: str, rule: str):
        if not ok:
            raise ConfigError(f"{self.owner}.{name}={getattr(self.obj, name)!r}: {rule}", field=name)

    def int(self, name: str, rule: str = "must be an int"):
        v = getattr(self.obj, name)
        self(isinstance(v, int) and not isinstance(v, bool), name, rule)

    def number(self, name: str, rule: str = "must be a finite number (int or float)"):
        v = getattr(self.obj, name)
        self(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), name, rule)

    def bool(self, name: str):
        self(isinstance(getattr(self.obj, name), bool), name, "must be a bool (true / false)")

    def str(self, name: str, rule: str = "must be a non-empty string"):
        v = getattr(self.obj, name)
        self(isinstance(v, str) and v != "", name, rule)

    def choice(self, name: str, choices):
        v = getattr(self.obj, name)
        self(isinstance(v, str) and v in choices, name, f"must be one of {choices}")


def dataclass_from_dict(cls, d: dict):
    """cls(**d), refusing keys that are not fields of the dataclass (a typo must not pass silently)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__}: expected a dict of fields, got {type(d).__name__}")
    bad_keys = [k for k in d if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{cls.__name__}: field names must be strings, got {bad_keys[:3]}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {sorted(known)}"
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}{hint}", field=unknown[0])
    return cls(**d)


@dataclass
class MoMConfig:
    # --- GPT-2 fields (same names and defaults as Hugging Face's GPT2Config) -------------------------
    vocab_size: int = 50257
    n_positions: int = 1024          # longest sequence (learned position embeddings)
    n_embd: int = 768                # D
    n_head: int = 12
    n_inner: Optional[int] = None    # F, FFN width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5  # the norm's epsilon: LayerNorm's (gpt2) or RMSNorm's (llama: rms_norm_eps)
    initializer_range: float = 0.02  # std of the normal init (GPT-2's; routers too, docs/method.md phase 2)

    # --- block family (transformers' field names) ------------------------------------------------------------
    family: str = "gpt2"             # "gpt2" | "llama" (module docstring)
    num_key_value_heads: Optional[int] = None  # K/V heads of grouped-query attention; None = n_head (MHA)
    rope_theta: float = 10000.0      # llama: the rotary base
    attention_bias: Optional[bool] = None  # q/k/v biases; None = the family's (gpt2: True, llama: False)
    tie_word_embeddings: bool = True  # LM head = wte; False: its own lm_head [vocab, D]

    # --- MoM layout ----------------------------------------------------------------------------------
    n_bottom: int = 12               # fixed GPT-2 blocks before the first chunk
    chunks: int = 0                  # C; 0 = vanilla GPT-2
    n_attn: int = 1                  # attention modules in each chunk's pool
    n_ffn: int = 1                   # FFN modules in each chunk's pool
    depth: int = 1                   # H, routed steps per chunk
    top_k: int = 1                   # K, modules picked per step by each router
    anchor: bool = False             # one fixed GPT-2 block closes each chunk
    n_top: int = 0                   # fixed GPT-2 blocks after the last chunk

    # --- routers ---------------------------------------------------------------------------------------
    router: str = "gru"              # "gru" (the paper's, state carried over a chunk's steps) | "mlp"
    router_dim: int = 256            # GRU state / MLP hidden width (docs/method.md: 256)
    router_temperature: float = 1.0  # tau in softmax(logits / tau); the authors' scripts use 0.2
    skip: bool = True                # routers have a SKIP slot (costs nothing, adds nothing)
    shared_slots: bool = False       # authors' layout: both routers have max(n_attn, n_ffn) + skip slots and
                                     # every slot id >= the pool size means SKIP; False: n_pool + skip slots
    renormalize: bool = True         # top-K weights renormalised over the K picks (authors' default;
                                     # with top_k=1 the LM loss then gives the router no gradient)
    straight_through: bool = False   # forward uses weight 1 per pick, backward the soft weight's gradient
    straight_through_clamp: bool = False  # with straight_through: the weights' gradient clamped to [-1, 1], as
                                     # the authors' code does (docs/method.md describes the plain estimator)
    weighted_qkv: bool = False       # QKV = sum of g_m * (LN_m(x) W_qkv[m] + b) instead of the plain sum
    dense_routing: bool = False      # ablation: every slot is used, weighted by the full softmax (top_k unused)
    routing_prior: float = 0.0       # function-preserving cut (mom/cut.py): a per-step logit bias added after
                                     # each router's forward; at step h module h gets 2*P*tau, the SKIP slot
                                     # P*tau, the rest 0, so g = 1 on module h exactly. 0: none (the paper's cut)
    routing_prior_steps: int = 0     # after the first training forward the prior drops to routing_prior_from
    routing_prior_from: float = 4.0  # (nats, P's unit) and decays linearly to 0 over this many training forwards
    routing_prior_learned: bool = False  # instead of the decay: the routing_prior_from part is a trained per-step
                                     # logit bias (prior_bias [depth, slots]), left only where the loss says so

    # --- routing mode (docs/method.md, "Capacity routing") ----------------------------------------------
    routing: str = "token_choice"    # "token_choice": each token picks top_k modules per step (the paper's);
                                     # "expert_choice": each module takes a share of each sequence's tokens
                                     # (Mixture-of-Depths / Mixture-of-Recursions; mom/capacity.py)
    capacity: Optional[float] = None  # expert choice: the share c in (0, 1] of a sequence's T tokens each module
                                     # takes, ceil(c T) of them; None = top_k / pool size per pool (a token gets
                                     # top_k modules per pool on average: token choice's FLOPs without SKIP)
    capacity_scale: float = 1.0      # expert choice: a taken token's weight = capacity_scale * sigmoid(logit / tau)

    # --- auxiliary loss: load balancing (token choice, Switch style: n * sum_e f_e * P_e) or, with expert
    # --- choice, the BCE that teaches each router logit whether its token was taken ------------------------
    aux_loss_coef: float = 0.01      # docs/method.md
    balance_loss: str = "per_step"   # "per_step": one loss per router and step, averaged;
                                     # "pooled": f and P pooled over a chunk's steps, one loss per router
    balance_skip: bool = False       # count the SKIP slot as a slot to balance (False: balance modules only)

    # --- execution ---------------------------------------------------------------------------------------
    backend: str = "auto"            # "reference" | "torch" | "triton" | "auto" (triton on CUDA, else torch)
    checkpoint_chunks: bool = False  # recompute each chunk in backward (activation checkpointing)

    # ------------------------------------------------------------------------------------------------------
    def __post_init__(self):
        need = Checker(self, "MoMConfig")
        for name in ("vocab_size", "n_positions", "n_embd", "n_head", "n_bottom", "chunks", "n_attn",
                     "n_ffn", "depth", "top_k", "n_top", "router_dim"):
            need.int(name)
        for name in ("vocab_size", "n_positions", "n_embd", "n_head"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.n_embd % self.n_head == 0, "n_head", f"must divide n_embd={self.n_embd}")
        need.choice("family", FAMILIES)
        if self.num_key_value_heads is not None:
            need.int("num_key_value_heads", "must be None (= n_head) or an int")
            need(self.num_key_value_heads >= 1 and self.n_head % self.num_key_value_heads == 0,
                 "num_key_value_heads", f"must be >= 1 and divide n_head={self.n_head} (grouped-query attention)")
        need.number("rope_theta")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        if self.attention_bias is not None:
            need.bool("attention_bias")
        need(self.family != "gpt2" or self.attention_bias in (None, True), "attention_bias",
             "GPT-2 blocks have q/k/v biases: leave it None (or True) with family='gpt2'")
        need(self.family != "llama" or self.head_dim % 2 == 0, "n_head",
             f"rotary positions rotate halves of each head: n_embd / n_head = {self.head_dim} must be even")
        need.bool("tie_word_embeddings")
        if self.n_inner is not None:
            need.int("n_inner", "must be None (= 4 * n_embd) or an int")
            need(self.n_inner >= 1, "n_inner", "must be None (= 4 * n_embd) or >= 1")
        for name in ("layer_norm_epsilon", "initializer_range", "router_temperature", "aux_loss_coef"):
            need.number(name)
        need(self.layer_norm_epsilon > 0, "layer_norm_epsilon", "must be > 0")
        need(self.initializer_range > 0, "initializer_range", "must be > 0")
        for name in ("n_bottom", "chunks", "n_top"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("anchor", "skip", "shared_slots", "renormalize", "straight_through", "straight_through_clamp",
                     "weighted_qkv", "dense_routing", "balance_skip", "checkpoint_chunks", "routing_prior_learned"):
            need.bool(name)
        need(self.straight_through or not self.straight_through_clamp, "straight_through_clamp",
             "clamps the straight-through estimator's gradient: set straight_through=True too")
        need.choice("router", ROUTERS)
        need.choice("backend", BACKENDS)
        need.choice("balance_loss", BALANCE_MODES)
        need(self.router_temperature > 0, "router_temperature", "must be > 0")
        need.number("routing_prior")
        need(self.routing_prior >= 0, "routing_prior", "must be >= 0 (0: no prior)")
        need.int("routing_prior_steps")
        need(self.routing_prior_steps >= 0, "routing_prior_steps", "must be >= 0")
        need.number("routing_prior_from")
        need(self.routing_prior_from >= 0, "routing_prior_from", "must be >= 0")
        need(self.routing_prior == 0 or self.routing_prior_steps >= 1 or self.routing_prior_learned,
             "routing_prior_steps",
             "must be >= 1 with a routing_prior (the prior decays to 0 over these training forwards) unless "
             "routing_prior_learned")
        need(self.aux_loss_coef >= 0, "aux_loss_coef", "must be >= 0")
        need.choice("routing", ROUTINGS)
        if self.capacity is not None:
            need.number("capacity", "must be None (= top_k / pool size) or a finite number in (0, 1]")
            need(0 < self.capacity <= 1, "capacity", "must be in (0, 1]: the share of a sequence's tokens a module "
                 "takes")
        need.number("capacity_scale")
        need(self.capacity_scale > 0, "capacity_scale", "must be > 0")
        if self.routing == "expert_choice":
            for name, bad in (("dense_routing", True), ("shared_slots", True), ("straight_through", True),
                              ("balance_loss", "pooled"), ("balance_skip", True)):
                need(getattr(self, name) != bad, name, "does not apply to expert-choice routing (routing="
                     "'expert_choice': each module takes its capacity; the routers have no SKIP slot, their aux "
                     "loss is a BCE, not a balance loss)")
            need(not self.routing_prior, "routing_prior", "the function-preserving cut needs token choice (at "
                 "step h module h takes every token: a capacity of 1)")
        else:
            need(self.capacity is None, "capacity", "is for routing='expert_choice' (token choice picks top_k)")
        need(self.graph_depth >= 1, "n_bottom", "the model needs at least one block (n_bottom + chunks * "
             "(depth + anchor) + n_top >= 1)")
        if self.chunks > 0:
            for name in ("n_attn", "n_ffn", "depth", "top_k", "router_dim"):
                need(getattr(self, name) >= 1, name, "must be >= 1 when chunks > 0")
            need(not (self.shared_slots and not self.skip and self.n_attn != self.n_ffn), "shared_slots",
                 f"with skip=False needs n_attn == n_ffn (got {self.n_attn} and {self.n_ffn}): the smaller "
                 f"pool's extra slots would act as SKIP")
            one_slot = self.attn_slots == 1 and self.ffn_slots == 1   # no choice to learn: no router to train
            if self.top_k == 1 and self.renormalize and not (self.straight_through or self.dense_routing
                                                             or self.routing == "expert_choice" or one_slot):
                warnings.warn("MoMConfig: top_k=1 with renormalize=True gives every pick the weight 1, so the "
                              "LM loss gives the routers no gradient (only the balancing loss trains them); "
                              "set renormalize=False or straight_through=True to train them", stacklevel=3)
            for pool, slots in (("n_attn", self.attn_slots), ("n_ffn", self.ffn_slots)):
                need(self.top_k <= slots, "top_k",
                     f"must be <= the {slots} router slots of the {pool} pool ({pool}={getattr(self, pool)}, "
                     f"skip={self.skip}, shared_slots={self.shared_slots})")

    # --- derived sizes -------------------------------------------------------------------------------------
    @property
    def ffn_dim(self) -> int:
        """F, the FFN width."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """K/V heads (num_key_value_heads, or n_head when None)."""
        return self.num_key_value_heads if self.num_key_value_heads is not None else self.n_head

    @property
    def qkv_dim(self) -> int:
        """Width of the fused QKV projection: (n_head + 2 * kv_heads) * head_dim (3 * n_embd for MHA)."""
        return (self.n_head + 2 * self.kv_heads) * self.head_dim

    @property
    def qkv_bias(self) -> bool:
        """Whether the QKV projection has a bias (attention_bias, or the family's default)."""
        return self.attention_bias if self.attention_bias is not None else self.family == "gpt2"

    @property
    def norm(self) -> str:
        """The routed ops' per-module norm: "layer" (gpt2: LayerNorm) or "rms" (llama: RMSNorm)."""
        return "layer" if self.family == "gpt2" else "rms"

    @property
    def act(self) -> str:
        """The FFN's activation: "gelu" (gpt2: gelu_tanh(x W1 + b1) W2 + b2) or "swiglu" (llama: W1 = gate | up,
        silu(x W_gate) * (x W_up) W2, no biases)."""
        return "gelu" if self.family == "gpt2" else "swiglu"

    @property
    def ffn_in_dim(self) -> int:
        """Output width of the FFN's first projection c_fc: F (gelu) or 2F (swiglu: gate | up)."""
        return self.ffn_dim * (2 if self.act == "swiglu" else 1)

    @property
    def n_modules(self) -> int:
        """M = max(n_attn, n_ffn): GPT-2 layers a chunk's pools are cut from."""
        return max(self.n_attn, self.n_ffn)

    def _slots(self, pool_size: int) -> int:
        if self.routing == "expert_choice":  # one logit per module: a token no module takes passes through
            return pool_size
        return (self.n_modules if self.shared_slots else pool_size) + int(self.skip)

    def capacity_of(self, pool_size: int) -> float:
        """Expert choice: the share of a sequence's tokens each module of a pool of pool_size takes."""
        return self.capacity if self.capacity is not None else self.top_k / pool_size

    def capacity_tokens(self, pool_size: int, seq_len: int) -> int:
        """Expert choice: tokens of a sequence of seq_len each module takes in training, ceil(c T) (at least 1,
        at most T)."""
        return max(1, min(seq_len, math.ceil(self.capacity_of(pool_size) * seq_len - 1e-9)))

    @property
    def attn_slots(self) -> int:
        """Router logits of the attention router; slot ids >= n_attn mean SKIP."""
        return self._slots(self.n_attn)

    @property
    def ffn_slots(self) -> int:
        """Router logits of the FFN router; slot ids >= n_ffn mean SKIP."""
        return self._slots(self.n_ffn)

    @property
    def graph_depth(self) -> int:
        """Blocks a token passes through: n_bottom + chunks * (depth + anchor) + n_top."""
        return self.n_bottom + self.chunks * (self.depth + int(self.anchor)) + self.n_top

    @property
    def source_layers(self) -> int:
        """GPT-2 layers `from_gpt2` consumes: n_bottom + chunks * (M + anchor) + n_top."""
        return self.n_bottom + self.chunks * (self.n_modules + int(self.anchor)) + self.n_top

    @property
    def n_cache_layers(self) -> int:
        """Attention calls per forward (one KV cache each): fixed blocks + routed steps."""
        return self.graph_depth

    def vanilla(self) -> "MoMConfig":
        """The vanilla model (chunks=0, same family) whose layers this MoM is cut from by `from_gpt2` /
        `from_hf` (phase 1 of training)."""
        return dataclasses.replace(self, n_bottom=self.source_layers, chunks=0, n_top=0, anchor=False,
                                   n_attn=1, n_ffn=1, depth=1, top_k=1)

    def replace(self, **changes) -> "MoMConfig":
        return dataclasses.replace(self, **changes)

    # --- (de)serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "MoMConfig":
        return dataclass_from_dict(cls, d)

    @classmethod
    def from_hf(cls, hf_config, **layout) -> "MoMConfig":
        """The config of a transformers GPT2Config, LlamaConfig, Qwen2Config or MistralConfig (a config object,
        or a dict of its fields): with no `layout`, the vanilla model (every layer a fixed bottom block); with
        MoM layout fields (n_bottom, chunks, n_attn, n_ffn, depth, top_k, anchor, n_top, skip, router options,
        backend, ...) the MoM that `MoMForCausalLM.from_hf` cuts the checkpoint into, which must consume exactly
        the source's layers (source_layers == num_hidden_layers). Unsupported architectures or options (an
        encoder, sliding-window attention, a RoPE scaling type, MLP biases, another activation) raise a
        ConfigError naming the model type and field (mom/hf_config.py)."""
        from .hf_config import config_from_hf
        return config_from_hf(cls, hf_config, layout)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "MoMConfig":
        """A preset by name (see PRESETS and docs/presets in the README); keyword overrides win."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigError(f"MoMConfig.from_name: unknown preset {name!r}; known: {sorted(PRESETS)}")
        return dataclass_from_dict(cls, {**PRESETS[name], **overrides})


_GPT2_SMALL = dict(n_embd=768, n_head=12)
_GPT2_MEDIUM = dict(n_embd=1024, n_head=16)
_GPT2_LARGE = dict(n_embd=1280, n_head=20)

# transformers' configs of HuggingFaceTB/SmolLM-135M, -360M and Qwen/Qwen2.5-0.5B (vocabulary, widths, heads,
# K/V heads, FFN width, RMSNorm epsilon, RoPE base, longest sequence; all tie the LM head; Qwen2 has q/k/v biases)
_SMOLLM_135M = dict(family="llama", vocab_size=49152, n_positions=2048, n_embd=576, n_head=9, num_key_value_heads=3,
                    n_inner=1536, layer_norm_epsilon=1e-5, rope_theta=10000.0)
_SMOLLM_360M = dict(family="llama", vocab_size=49152, n_positions=2048, n_embd=960, n_head=15,
                    num_key_value_heads=5, n_inner=2560, layer_norm_epsilon=1e-5, rope_theta=10000.0)
_QWEN25_05B = dict(family="llama", vocab_size=151936, n_positions=32768, n_embd=896, n_head=14,
                   num_key_value_heads=2, n_inner=4864, layer_norm_epsilon=1e-6, rope_theta=1000000.0,
                   attention_bias=True)
_TINY_LLAMA = dict(family="llama", vocab_size=512, n_positions=64, n_embd=32, n_head=4, num_key_value_heads=2,
                   n_inner=48, attention_bias=True, tie_word_embeddings=False)

# Every MoM preset consumes exactly its GPT-2's layers (source_layers == 12 / 24 / 36) and keeps n_attn ==
# n_ffn, so `from_gpt2` drops nothing and the parameter count is GPT-2's plus the routers'.
PRESETS: dict[str, dict] = {
    # Vanilla GPT-2 (chunks=0).                                                     depth | K | params
    "gpt2": dict(**_GPT2_SMALL, n_bottom=12),                                      # 12 | - | 124.4M
    "gpt2-medium": dict(**_GPT2_MEDIUM, n_bottom=24),                              # 24 | - | 354.8M
    "gpt2-large": dict(**_GPT2_LARGE, n_bottom=36),                                # 36 | - | 774.0M
    # MoM from GPT-2 small's 12 layers: 1 + 2 x (4 modules + anchor) + 1.           depth 1+2*(4+1)+1 = 12, K 2
    "mom-small": dict(**_GPT2_SMALL, n_bottom=1, chunks=2, n_attn=4, n_ffn=4, depth=4, top_k=2, anchor=True,
                      n_top=1),
    # MoM from GPT-2 medium's 24 layers: 1 + 2 x (10 modules + anchor) + 1.         depth 1+2*(8+1)+1 = 20, K 2
    "mom-medium": dict(**_GPT2_MEDIUM, n_bottom=1, chunks=2, n_attn=10, n_ffn=10, depth=8, top_k=2,
                       anchor=True, n_top=1),
    # Same parameters as GPT-2-large, deeper graph: 2 + 4 x (7 modules + anchor) + 2 = 36 layers;
    # depth 2 + 4 x (11 + 1) + 2 = 52 >= 50 (paper: over 38% deeper than 36), K 1. With K = 1 the weight
    # is the pick's probability (renormalize=False), or the LM loss would give the routers no gradient.
    "mom-large-deep": dict(**_GPT2_LARGE, n_bottom=2, chunks=4, n_attn=7, n_ffn=7, depth=11, top_k=1,
                           anchor=True, n_top=2, renormalize=False),
    # Fewer steps, more modules per step: 1 + 2 x (16 modules + anchor) + 1 = 36 layers;
    # depth 1 + 2 x (5 + 1) + 1 = 14 <= 14 (paper: over 60% less depth), K 2.
    "mom-large-efficient": dict(**_GPT2_LARGE, n_bottom=1, chunks=2, n_attn=16, n_ffn=16, depth=5, top_k=2,
                                anchor=True, n_top=1),
    # CPU tests: 1 + 2 x (4 + anchor) + 1 = 12 source layers of width 32; depth 1 + 2 x (3 + 1) + 1 = 10.
    "tiny": dict(vocab_size=512, n_positions=64, n_embd=32, n_head=4, n_bottom=1, chunks=2, n_attn=3, n_ffn=4,
                 depth=3, top_k=2, anchor=True, n_top=1, router_dim=16),
    # The vanilla GPT-2 that "tiny" is cut from (phase 1 for the tiny model).
    "tiny-gpt2": dict(vocab_size=512, n_positions=64, n_embd=32, n_head=4, n_bottom=12),

    # --- Llama family: the public shapes (transformers' configs of the published checkpoints) -----------------
    #                                                                               layers | params (tied head)
    "smollm-135m": dict(**_SMOLLM_135M, n_bottom=30),                             # 30 | 134,515,008
    "smollm-360m": dict(**_SMOLLM_360M, n_bottom=32),                             # 32 | 361,821,120
    "qwen2.5-0.5b": dict(**_QWEN25_05B, n_bottom=24),                             # 24 | 494,032,768
    # Efficient cuts, by mom-large-efficient's rule: 1 bottom block, 2 chunks of M modules + anchor, 1 top
    # block (every source layer kept), and a depth that runs about 2/3 of the source's layers per token
    # (fixed blocks + chunks * depth * K = 4 + 4 * depth, against 24 of 36 for mom-large-efficient):
    # smollm-135m 1 + 2 x (13 + 1) + 1 = 30 layers, depth 4: 20 of 30, graph depth 12.
    "mom-smollm-135m-efficient": dict(**_SMOLLM_135M, n_bottom=1, chunks=2, n_attn=13, n_ffn=13, depth=4, top_k=2,
                                      anchor=True, n_top=1),
    # smollm-360m 1 + 2 x (14 + 1) + 1 = 32 layers, depth 4: 20 of 32, graph depth 12.
    "mom-smollm-360m-efficient": dict(**_SMOLLM_360M, n_bottom=1, chunks=2, n_attn=14, n_ffn=14, depth=4, top_k=2,
                                      anchor=True, n_top=1),
    # qwen2.5-0.5b 1 + 2 x (10 + 1) + 1 = 24 layers, depth 3: 16 of 24, graph depth 10.
    "mom-qwen2.5-0.5b-efficient": dict(**_QWEN25_05B, n_bottom=1, chunks=2, n_attn=10, n_ffn=10, depth=3, top_k=2,
                                       anchor=True, n_top=1),
    # CPU tests: "tiny" in the Llama family, with grouped-query attention (4 heads, 2 K/V heads), q/k/v biases
    # and an untied head, and the vanilla it is cut from.
    "tiny-llama": dict(_TINY_LLAMA, n_bottom=1, chunks=2, n_attn=3, n_ffn=4, depth=3, top_k=2, anchor=True,
                       n_top=1, router_dim=16),
    "tiny-llama-vanilla": dict(_TINY_LLAMA, n_bottom=12),
}

"""transformers configs in: the MoMConfig of a GPT-2, Llama, Qwen2 or Mistral config (`MoMConfig.from_hf`).

    GPT2Config     -> family "gpt2":  n_embd, n_head, n_layer, n_positions, n_inner, layer_norm_epsilon, vocab
    LlamaConfig    -> family "llama": hidden_size, num_attention_heads, num_key_value_heads, num_hidden_layers,
    Qwen2Config                       max_position_embeddings, intermediate_size, rms_norm_eps, rope_theta,
    MistralConfig                     vocab_size, tie_word_embeddings; Qwen2: q/k/v biases (attention_bias=True)

Every field that changes what the model computes is either carried over or refused with a ConfigError naming
the model type and the field (an encoder, sliding-window attention, RoPE scaling, MLP or output-projection biases,
another activation, a head size other than hidden_size / num_attention_heads). Dropout probabilities are not
carried (the package's models have no dropout: they compute the source's eval-mode function). A config may be
given as a transformers config object or as a dict of its fields (a config.json read as JSON).
"""
from __future__ import annotations

from typing import Any, Dict

from .config import ConfigError

# transformers' model_type -> the family its blocks belong to
SUPPORTED = {"gpt2": "gpt2", "llama": "llama", "qwen2": "llama", "mistral": "llama"}


def _fields(hf_config) -> Dict[str, Any]:
    if isinstance(hf_config, dict):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        d = hf_config.to_dict()
        for k in ("model_type", "rope_parameters", "head_dim", "num_key_value_heads", "sliding_window"):
            if hasattr(hf_config, k):  # attributes set after __init__ (transformers' post-init defaults)
                d[k] = getattr(hf_config, k)
        return d
    raise ConfigError(f"MoMConfig.from_hf: expected a transformers config or a dict of its fields, got "
                      f"{type(hf_config).__name__}")


def _rope_theta(d: Dict[str, Any], mt: str) -> float:
    """The RoPE base; refuses a scaling type other than the default rotation (transformers 4: rope_theta +
    rope_scaling; 5: rope_parameters = {"rope_type", "rope_theta", ...})."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling")
    for src, rp in (("rope_parameters", params), ("rope_scaling", scaling)):
        if isinstance(rp, dict):
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default":
                raise ConfigError(f"{mt}: {src} rope_type={kind!r} is not supported (only the default rotation)")
        elif rp is not None:
            raise ConfigError(f"{mt}: {src}={rp!r} is not supported (only the default rotation)")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0)) if isinstance(params, dict) else 10000.0
    return float(theta)


def _llama_fields(d: Dict[str, Any], mt: str) -> Dict[str, Any]:
    def need(ok, field, why):
        if not ok:
            raise ConfigError(f"{mt}: {field}={d.get(field)!r} is not supported ({why})")

    need(d.get("hidden_act", "silu") == "silu", "hidden_act", "the Llama family's SwiGLU uses silu")
    need(not d.get("mlp_bias", False), "mlp_bias", "the routed SwiGLU FFN has no biases")
    if mt == "llama":
        need(not d.get("attention_bias", False), "attention_bias",
             "Llama's attention_bias adds an o_proj bias as well; only q/k/v biases (Qwen2's) are supported")
    if mt == "qwen2":
        need(not d.get("use_sliding_window", False), "use_sliding_window", "sliding-window attention")
    if mt == "mistral":
        need(d.get("sliding_window") is None, "sliding_window", "sliding-window attention: set it to None")
    need(d.get("pretraining_tp", 1) in (None, 1), "pretraining_tp", "tensor-parallel slicing of the projections")
    D, H = d["hidden_size"], d["num_attention_heads"]
    head_dim = d.get("head_dim") or D // H
    need(head_dim * H == D, "head_dim", f"the head size must be hidden_size / num_attention_heads = {D // H}")
    return dict(family="llama", vocab_size=d["vocab_size"], n_positions=d["max_position_embeddings"], n_embd=D,
                n_head=H, num_key_value_heads=d.get("num_key_value_heads") or H, n_inner=d["intermediate_size"],
                layer_norm_epsilon=float(d.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(d, mt),
                attention_bias=mt == "qwen2", tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                initializer_range=float(d.get("initializer_range", 0.02)), n_bottom=d["num_hidden_layers"])


def _gpt2_fields(d: Dict[str, Any]) -> Dict[str, Any]:
    def need(ok, field, why):
        if not ok:
            raise ConfigError(f"gpt2: {field}={d.get(field)!r} is not supported ({why})")

    need(d.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"), "activation_function",
         "GPT-2 blocks use the tanh GELU")
    need(not d.get("add_cross_attention", False), "add_cross_attention", "a decoder-only model has no cross-attention")
    need(d.get("scale_attn_weights", True), "scale_attn_weights", "attention scores are scaled by 1 / sqrt(head_dim)")
    need(not d.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx",
         "per-layer score scaling")
    need(not d.get("reorder_and_upcast_attn", False), "reorder_and_upcast_attn", "a different attention rounding")
    need(d.get("tie_word_embeddings", True), "tie_word_embeddings", "GPT-2's head is tied to wte")
    return dict(family="gpt2", vocab_size=d["vocab_size"], n_positions=d["n_positions"], n_embd=d["n_embd"],
                n_head=d["n_head"], n_inner=d.get("n_inner"), layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)),
                initializer_range=float(d.get("initializer_range", 0.02)), n_bottom=d["n_layer"])


def config_from_hf(cls, hf_config, layout: Dict[str, Any]):
    """MoMConfig.from_hf (see there)."""
    d = _fields(hf_config)
    mt = d.get("model_type")
    if mt not in SUPPORTED:
        raise ConfigError(f"MoMConfig.from_hf: model_type={mt!r} is not supported (supported: {sorted(SUPPORTED)}; "
                          f"decoder-only GPT-2 and Llama-family models)")
    try:
        fields = _gpt2_fields(d) if SUPPORTED[mt] == "gpt2" else _llama_fields(d, mt)
    except KeyError as e:
        raise ConfigError(f"{mt}: the config has no {e.args[0]!r} field") from None
    n_layers = fields["n_bottom"]
    arch = {k: v for k, v in fields.items() if k != "n_bottom"}
    clash = sorted(k for k in layout if k in arch)
    if clash:
        raise ConfigError(f"MoMConfig.from_hf: {clash} come from the {mt} config and cannot be given as layout "
                          f"(layout fields: n_bottom, chunks, n_attn, n_ffn, depth, top_k, anchor, n_top, routers, ...)")
    vanilla = cls(**arch, n_bottom=n_layers)
    if not layout:
        return vanilla
    cfg = cls.from_dict({**vanilla.to_dict(), "n_bottom": 0, **layout})
    if cfg.source_layers != n_layers:
        raise ConfigError(f"MoMConfig.from_hf: the layout consumes source_layers={cfg.source_layers} layers (n_bottom "
                          f"+ chunks * (max(n_attn, n_ffn) + anchor) + n_top); the {mt} model has {n_layers}")
    return cfg

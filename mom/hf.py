"""Hugging Face transformers integration: a MoM as an `AutoModelForCausalLM` (pip install "mixture-of-modules[hf]").

    import mom.hf                                            # registers model_type "mom" with the Auto classes
    model.save_pretrained("out/mom")                         # the native format (mom.convert) ...
    hf = AutoModelForCausalLM.from_pretrained("out/mom")     # ... loads here too, offline
    hf = mom.hf.MoMHFForCausalLM.from_mom(model)             # same weights and logits as a MoMForCausalLM
    hf.save_pretrained("out/mom-hf")                         # config.json (model_type "mom") + model.safetensors,
                                                             # which MoMForCausalLM.from_pretrained reads too
    hf.generate(ids, attention_mask=mask, do_sample=True, top_p=0.9, eos_token_id=eos, max_new_tokens=20)
    pipeline("text-generation", model=hf, tokenizer=tok)

MoMHFConfig (a PretrainedConfig) holds every MoMConfig field as an attribute (top_k as mom_top_k: transformers
reads a config's top_k as a sampling option), plus num_hidden_layers =
graph_depth (one KV cache per attention call, i.e. per routed step: transformers' DynamicCache gets one layer
per call). MoMHFForCausalLM (PreTrainedModel + GenerationMixin) wraps a MoMForCausalLM as `.model` and runs its
forward; transformers' cache (`cache=`, a DynamicCache) is passed to the attention calls layer by layer, the 2-D
attention_mask (left padding) is MoM's own. The native `MoMForCausalLM.generate` (static cache, CUDA graphs,
mom/generate.py) is the fast path; this one is for the ecosystem (pipelines, generation configs, tokenizers).
Tests: tests/test_hf.py.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import MoMConfig
from .convert import HF_TOP_K, MODEL_TYPE
from .model import MoMForCausalLM

__all__ = ["MoMHFConfig", "MoMHFForCausalLM"]

_FIELDS = [f.name for f in dataclasses.fields(MoMConfig)]
# MoMConfig fields whose names transformers reserves for generation (top_k: the router's picks, not sampling's)
_RENAME = {"top_k": HF_TOP_K}
_HF_NAMES = {_RENAME.get(k, k): k for k in _FIELDS}


class MoMHFConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, **kwargs):
        mom_kwargs = {_HF_NAMES[k]: kwargs.pop(k) for k in list(kwargs) if k in _HF_NAMES}
        mom = MoMConfig(**mom_kwargs)                      # validates every field (ConfigError names it)
        for k, v in mom.to_dict().items():
            setattr(self, _RENAME.get(k, k), v)
        kwargs.pop("num_hidden_layers", None)
        self.use_cache = kwargs.pop("use_cache", True)
        kwargs["tie_word_embeddings"] = mom.tie_word_embeddings  # (a PretrainedConfig field too: keep them one)
        super().__init__(**kwargs)
        self.num_hidden_layers = mom.graph_depth           # cache layers: one per attention call

    def to_mom(self) -> MoMConfig:
        return MoMConfig(**{k: getattr(self, hf) for hf, k in _HF_NAMES.items()})

    @classmethod
    def from_mom(cls, config: MoMConfig, **kwargs) -> "MoMHFConfig":
        return cls(**{_RENAME.get(k, k): v for k, v in config.to_dict().items()}, **kwargs)


class _CacheLayer:
    """One attention call's view of a transformers Cache: update(k, v) -> all keys / values so far."""

    def __init__(self, cache, layer_idx: int):
        self.cache, self.layer_idx = cache, layer_idx

    def update(self, k, v):
        return self.cache.update(k, v, self.layer_idx)


class MoMHFForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MoMHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block", "MoMLayer"]

    def __init__(self, config: MoMHFConfig, model: Optional[MoMForCausalLM] = None):
        super().__init__(config)
        self.model = model if model is not None else MoMForCausalLM(config.to_mom())
        self.post_init()

    def _init_weights(self, module):
        """A no-op on purpose: MoMForCausalLM initialises its own weights (GPT-2's scheme, mom.blocks), and
        loading overwrites them; transformers' default would re-initialise what was loaded."""
        return None

    @classmethod
    def from_mom(cls, model: MoMForCausalLM) -> "MoMHFForCausalLM":
        """Wrap a native model (its parameters are shared, not copied)."""
        return cls(MoMHFConfig.from_mom(model.config), model=model)

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def forward(self, input_ids=None, attention_mask=None, cache=None, past_key_values=None, labels=None,
                use_cache: Optional[bool] = None, logits_to_keep: int = 0, return_dict: Optional[bool] = None,
                **kwargs):
        """transformers' causal-LM forward: input_ids [B, T], attention_mask [B, P + T] (left padding),
        cache (a transformers Cache; `past_key_values` accepted as its older name), labels (shifted inside)."""
        from transformers.cache_utils import DynamicCache

        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config)
        m = self.model
        m._check_inputs(input_ids, labels, None)
        B, T = input_ids.shape
        P = cache.get_seq_length() if cache is not None else 0
        if P + T > m.config.n_positions:
            raise ValueError(f"sequence of {P + T} tokens ({P} cached + {T} new) is longer than "
                             f"config.n_positions={m.config.n_positions}")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, P + T):
            raise ValueError(f"attention_mask must be [batch, cached + new] = {(B, P + T)}, got "
                             f"{tuple(attention_mask.shape)}")
        layers = [_CacheLayer(cache, i) for i in range(m.config.n_cache_layers)] if cache is not None else None
        out = m._forward(input_ids, labels, layers, False, attention_mask, P, logits_to_keep)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, cache=cache if use_cache else None)


AutoConfig.register(MODEL_TYPE, MoMHFConfig, exist_ok=True)
AutoModelForCausalLM.register(MoMHFConfig, MoMHFForCausalLM, exist_ok=True)

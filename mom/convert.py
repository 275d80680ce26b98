"""Vanilla checkpoints in (GPT-2, our own, transformers' Llama family), MoM checkpoints out.

`from_gpt2` is phase 2 of the authors' two-phase recipe (docs/method.md): cut a trained vanilla model into
modules. With M = max(n_attn, n_ffn), the checkpoint's layers are consumed bottom-up:

    layers [0, n_bottom)                      -> bottom blocks
    per chunk c: the next M layers, j = 0..M-1 -> attention module j (ln_1 + attn) if j < n_attn,
                                                 FFN module j (ln_2 + mlp) if j < n_ffn (the rest dropped)
                 then one layer                -> the chunk's anchor block (if anchor)
    the last n_top layers                     -> top blocks
    wte, wpe (gpt2), ln_f, lm_head (untied) copied; routers stay freshly initialised (N(0, 0.02)).

It takes HF GPT-2 state dicts and vanilla MoMForCausalLM ones of either family (chunks=0: our keys).
`from_hf` takes a transformers model object or a folder its save_pretrained wrote (GPT-2, Llama, Qwen2,
Mistral; safetensors, sharded or not, or pytorch_model.bin), maps a Llama-family checkpoint onto our keys
(`hf_to_vanilla`: nn.Linear's [out, in] transposed to [in, out]; q | k | v concatenated into c_attn, gate | up
into c_fc; embed_tokens -> wte, norm -> ln_f) and cuts it by the same rule.

`from_gpt2(..., preserving=True)` (or a config with routing_prior > 0) is the function-preserving cut
(mom/cut.py): a decaying per-step routing prior makes the MoM compute the vanilla exactly at phase 2's start.

Hugging Face's GPT-2 keeps Conv1D weights as [in, out], the layout of our blocks and stacked pools, so no
weight is transposed.

One checkpoint format: `save_pretrained` writes config.json (MoMConfig's fields, model_type "mom", the top_k field
as mom_top_k: transformers reads top_k as a sampling option) and model.safetensors, a folder that
`MoMForCausalLM.from_pretrained` and, after `import mom.hf`, transformers' `AutoModelForCausalLM.from_pretrained`
both load (so does `pipeline("text-generation")`); `from_pretrained` also reads what `MoMHFForCausalLM`'s
save_pretrained writes (weights under "model.", sharded or not) and the older config.json without model_type.
`save_pretrained` replaces its folder atomically (mom.io.atomic_dir: a kill leaves the old checkpoint or the
new one, and other files in the folder are kept); `from_pretrained` / `load_state_dict` read the last complete
version and name the file and what is wrong with it (missing, empty, truncated, a config field).
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Union

import torch

from .config import ConfigError, MoMConfig
from .io import FileFormatError, atomic_dir, complete_dir, load_safetensors, read_json_file, torch_load

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
_LAYER_KEY = re.compile(r"^(?:h|bottom)\.(\d+)\.(.+)$")  # HF's "h.i." or a vanilla MoM's "bottom.i."
_IGNORED = ("attn.bias", "attn.masked_bias")  # causal-mask buffers of old HF checkpoints
_HF_LAYER_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")  # transformers' Llama family

# pool parameter -> the GPT-2 layer tensor each module's slice comes from
_ATTN_POOL = {"ln_weight": "ln_1.weight", "ln_bias": "ln_1.bias", "c_attn_weight": "attn.c_attn.weight",
              "c_attn_bias": "attn.c_attn.bias", "c_proj_weight": "attn.c_proj.weight",
              "c_proj_bias": "attn.c_proj.bias"}
_FFN_POOL = {"ln_weight": "ln_2.weight", "ln_bias": "ln_2.bias", "c_fc_weight": "mlp.c_fc.weight",
             "c_fc_bias": "mlp.c_fc.bias", "c_proj_weight": "mlp.c_proj.weight", "c_proj_bias": "mlp.c_proj.bias"}


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a .safetensors or .bin/.pt file (or a folder holding model.safetensors). Errors name
    the file and what is wrong with it (missing, empty, truncated, not a state dict)."""
    if os.path.isdir(path) or (not os.path.exists(path) and complete_dir(path) is not None):
        folder = complete_dir(path)  # after an interrupted save_pretrained: the complete version
        for name in (WEIGHTS_NAME, "pytorch_model.bin"):
            if os.path.exists(os.path.join(folder, name)):
                path = os.path.join(folder, name)
                break
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in this folder")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    sd = torch_load(path)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict) and not any(
            isinstance(v, torch.Tensor) for v in sd.values()):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise FileFormatError(f"{path}: not a state dict (a dict of name -> tensor), got {type(sd).__name__}")
    return sd


def _vanilla_layers(sd: Dict[str, torch.Tensor]):
    """Split a vanilla state dict (HF GPT2LMHeadModel / GPT2Model keys, or a vanilla MoMForCausalLM's of either
    family) into globals (wte, wpe, ln_f, lm_head) and per-layer dicts."""
    routed = [k for k in sd if k.startswith(("chunks.", "top."))]
    if routed:
        raise ValueError(f"not a vanilla checkpoint: it has routed or top blocks, e.g. '{routed[0]}'")
    globals_, layers = {}, {}
    for key, value in sd.items():
        k = key[len("transformer."):] if key.startswith("transformer.") else key
        m = _LAYER_KEY.match(k)
        if m:
            if m.group(2) not in _IGNORED:
                layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            globals_[k] = value
    n = len(layers)
    if sorted(layers) != list(range(n)):
        raise ValueError(f"vanilla checkpoint: layer indices are not 0..{n - 1}: {sorted(layers)}")
    return globals_, [layers[i] for i in range(n)]


def _skeleton(config: MoMConfig) -> Dict[str, torch.Size]:
    """Every tensor of MoMForCausalLM(config) and its shape (the model built on the meta device: no memory)."""
    from .model import MoMForCausalLM

    with torch.device("meta"):
        return {k: v.shape for k, v in MoMForCausalLM(config).state_dict().items()}


def gpt2_to_mom_state_dict(sd: Dict[str, torch.Tensor], config: MoMConfig) -> Dict[str, torch.Tensor]:
    """Map a vanilla state dict (HF GPT-2 keys, or a vanilla MoMForCausalLM's of config's family) onto
    MoMForCausalLM(config)'s keys by the layer map of the module docstring (routers not included). A pool
    parameter the family does not have (RMSNorm's bias, ...) is not looked for; one it has must be in every
    cut layer."""
    g, layers = _vanilla_layers(sd)
    own = _skeleton(config)
    needed = [k for k in own if k.startswith(("wte.", "wpe.", "ln_f.", "lm_head."))]  # the globals
    if config.tie_word_embeddings:
        g.pop("lm_head.weight", None)  # tied to wte (HF GPT-2 checkpoints store it too)
    for key in needed:
        if key not in g:
            raise ValueError(f"vanilla checkpoint has no '{key}'" + (" (nor 'transformer.wte.weight')"
                                                                     if key == "wte.weight" else ""))
    extra = sorted(set(g) - set(needed))
    if extra:
        raise ValueError(f"vanilla checkpoint: {extra[:3]} have no place in the {config.family} model "
                         f"(tie_word_embeddings={config.tie_word_embeddings})")
    if len(layers) != config.source_layers:
        raise ValueError(f"vanilla checkpoint has {len(layers)} layers; the config consumes "
                         f"config.source_layers={config.source_layers} (n_bottom + chunks * (max(n_attn, n_ffn) "
                         f"+ anchor) + n_top)")
    wte = g["wte.weight"]
    pos = g["wpe.weight"].shape[0] if "wpe.weight" in g else config.n_positions
    if wte.shape != (config.vocab_size, config.n_embd) or pos != config.n_positions:
        raise ValueError(f"vanilla checkpoint sizes (vocab {wte.shape[0]}, n_positions {pos}, n_embd "
                         f"{wte.shape[1]}) do not match the config (vocab_size {config.vocab_size}, n_positions "
                         f"{config.n_positions}, n_embd {config.n_embd})")
    out = {k: g[k] for k in needed}

    def block(prefix, layer):
        for k, v in layer.items():
            out[f"{prefix}.{k}"] = v

    it = iter(layers)
    for i in range(config.n_bottom):
        block(f"bottom.{i}", next(it))
    for c in range(config.chunks):
        cut = [next(it) for _ in range(config.n_modules)]
        p = f"chunks.{c}"
        attn, ffn = cut[: config.n_attn], cut[: config.n_ffn]
        for pool, layers_, names in (("attn_pool", attn, _ATTN_POOL), ("ffn_pool", ffn, _FFN_POOL)):
            for ours, theirs in names.items():  # stacked [E, ...] from each module's layer tensor
                key = f"{p}.{pool}.{ours}"
                if key not in own:  # the family has no such parameter
                    continue
                lacking = [j for j, layer in enumerate(layers_) if theirs not in layer]
                if lacking:
                    raise ValueError(f"vanilla checkpoint: layer {config.n_bottom + c * (config.n_modules + int(config.anchor)) + lacking[0]} "
                                     f"has no '{theirs}' (needed for {key})")
                out[key] = torch.stack([layer[theirs] for layer in layers_])
        if config.anchor:
            block(f"{p}.anchor", next(it))
    for i in range(config.n_top):
        block(f"top.{i}", next(it))
    return out


def _cut(sd: Dict[str, torch.Tensor], config: MoMConfig, source: str = "vanilla checkpoint"):
    """MoMForCausalLM(config) with sd's vanilla layers cut into it (routers new); errors name the tensor."""
    from .model import MoMForCausalLM

    mapped = gpt2_to_mom_state_dict(sd, config)
    own = _skeleton(config)
    for k, v in mapped.items():
        if k not in own:
            raise ValueError(f"{source}: '{k}' has no place in the model (unexpected layer entry)")
        if own[k] != v.shape:
            raise ValueError(f"{source}: '{k}' has shape {tuple(v.shape)}, the model expects {tuple(own[k])}")
    missing = [k for k in own if k not in mapped and ".attn_router." not in k and ".ffn_router." not in k]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    model = MoMForCausalLM(config)
    model.load_state_dict(mapped, strict=False)
    return model


def from_gpt2(state_dict_or_path: Union[str, Dict[str, torch.Tensor]], config: MoMConfig,
              preserving: bool = False, prior_steps: int = None):
    """A MoMForCausalLM initialised from a vanilla checkpoint (HF GPT-2 layout, or a vanilla MoMForCausalLM of
    config's family; routers new).

    preserving=True: the function-preserving cut (mom/cut.py): config gets a routing prior (routing_prior 50
    unless set, routing_prior_steps `prior_steps`, else config's, else 1000) under which the MoM computes the
    vanilla's logits until training moves it; ValueError names why when config cannot (cut.preserving_problems).
    A config that already sets routing_prior > 0 (e.g. mom.train's model_overrides) is cut the same way."""
    if preserving:
        from .cut import preserving_config
        config = preserving_config(config, prior_steps)

    sd = load_state_dict(state_dict_or_path) if isinstance(state_dict_or_path, (str, os.PathLike)) \
        else state_dict_or_path
    return _cut(sd, config)


# --- transformers' checkpoints ---------------------------------------------------------------------------------
# per-layer tensors of a transformers Llama-family layer -> ours: (our key, their keys concatenated along out)
_HF_LLAMA_LAYER = (("ln_1.weight", ("input_layernorm.weight",)),
                   ("attn.c_attn.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                           "self_attn.v_proj.weight")),
                   ("attn.c_attn.bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")),
                   ("attn.c_proj.weight", ("self_attn.o_proj.weight",)),
                   ("ln_2.weight", ("post_attention_layernorm.weight",)),
                   ("mlp.c_fc.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
                   ("mlp.c_proj.weight", ("mlp.down_proj.weight",)))
_HF_LLAMA_GLOBAL = {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "ln_f.weight",
                    "lm_head.weight": "lm_head.weight"}
_HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a buffer older transformers saved


def hf_to_vanilla(sd: Dict[str, torch.Tensor], config: MoMConfig) -> Dict[str, torch.Tensor]:
    """A transformers state dict -> the keys of a vanilla MoMForCausalLM of config's family (bottom.i.*).
    GPT-2's keys are ours already; a Llama-family layer's nn.Linear weights [out, in] are transposed to [in, out]
    and q | k | v, gate | up concatenated along the output (once, at load time). An unknown or missing tensor is
    a ValueError naming it."""
    if config.family == "gpt2":
        return dict(sd)
    out, layers = {}, {}
    for key, value in sd.items():
        m = _HF_LAYER_KEY.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif key in _HF_LLAMA_GLOBAL:
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue  # tied: the same tensor as embed_tokens
            out[_HF_LLAMA_GLOBAL[key]] = value
        elif not _HF_IGNORED.search(key):
            raise ValueError(f"transformers checkpoint: tensor '{key}' has no place in a Llama-family model")
    for i in sorted(layers):
        layer = dict(layers[i])
        for ours, theirs in _HF_LLAMA_LAYER:
            have = [t for t in theirs if t in layer]
            if not have:
                continue  # (no bias in this checkpoint: checked against the config by the cut)
            if len(have) != len(theirs):
                raise ValueError(f"transformers checkpoint: layer {i} has {have} but not "
                                 f"{sorted(set(theirs) - set(have))}")
            # [out, in] -> [in, out] (.t() leaves 1-D norms and biases as they are), concatenated along out
            out[f"bottom.{i}.{ours}"] = torch.cat([layer.pop(t).t() for t in theirs], dim=-1)
        layer = {k: v for k, v in layer.items() if not _HF_IGNORED.search(k)}
        if layer:
            raise ValueError(f"transformers checkpoint: layer {i} has tensors with no place in the model: "
                             f"{sorted(layer)[:3]} (MLP or o_proj biases are not supported)")
    return out


def _read_hf_folder(folder: str):
    """(config dict, state dict) of a folder written by transformers' save_pretrained: config.json and
    model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin."""
    cfg_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found (a folder written by transformers' save_pretrained has one)")
    return read_json_file(cfg_path, "transformers config"), _read_weights(folder)[0]


def from_hf(model_or_folder, config: MoMConfig = None, preserving: bool = False, prior_steps: int = None):
    """A MoMForCausalLM cut from a transformers GPT-2 / Llama / Qwen2 / Mistral model object or a folder its
    save_pretrained wrote, into `config`'s layout (None: the vanilla, every layer a fixed block) by the rule of
    the module docstring (routers new; preserving=True: the function-preserving cut, as in from_gpt2). config's
    architecture (family, widths, heads, K/V heads, vocabulary, positions, epsilon, RoPE base, biases, tied head)
    must be the checkpoint's: build it with MoMConfig.from_hf(hf_config, **layout). A mismatch names the field;
    an unsupported architecture names the model type and option (mom/hf_config.py)."""
    if isinstance(model_or_folder, (str, os.PathLike)):
        if not os.path.isdir(model_or_folder):
            raise FileNotFoundError(f"from_hf: {model_or_folder} is not a folder (a transformers save_pretrained "
                                    f"folder or model object is expected)")
        hf_cfg, sd = _read_hf_folder(str(model_or_folder))
        source = str(model_or_folder)
    elif hasattr(model_or_folder, "config") and hasattr(model_or_folder, "state_dict"):
        hf_cfg, sd = model_or_folder.config, model_or_folder.state_dict()
        source = f"{type(model_or_folder).__name__} object"
    else:
        raise TypeError(f"from_hf: expected a transformers model or a folder path, got "
                        f"{type(model_or_folder).__name__}")
    theirs = MoMConfig.from_hf(hf_cfg)
    config = theirs if config is None else config
    _check_architecture(config, theirs, source)
    if preserving:
        from .cut import preserving_config
        config = preserving_config(config, prior_steps)
    return _cut(hf_to_vanilla(sd, config), config, f"transformers checkpoint {source}")


_ARCH = ("family", "vocab_size", "n_positions", "n_embd", "n_head", "kv_heads", "ffn_dim", "layer_norm_epsilon",
         "rope_theta", "qkv_bias", "tie_word_embeddings")


def _check_architecture(config: MoMConfig, theirs: MoMConfig, source: str):
    diff = [f"{k}: config {getattr(config, k)!r}, checkpoint {getattr(theirs, k)!r}" for k in _ARCH
            if getattr(config, k) != getattr(theirs, k)
            and not (k == "rope_theta" and config.family == "gpt2")]
    if diff:
        raise ValueError(f"from_hf: {source} does not match the config ({'; '.join(diff)}); build the config with "
                         f"MoMConfig.from_hf(hf_config, **layout)")
    if config.source_layers != theirs.n_bottom:
        raise ValueError(f"from_hf: the config consumes source_layers={config.source_layers} layers, {source} has "
                         f"{theirs.n_bottom}")


# --- the checkpoint format ----------------------------------------------------------------------------------------
MODEL_TYPE = "mom"
HF_TOP_K = "mom_top_k"  # MoMConfig.top_k's name in config.json (transformers reads a config's top_k for sampling)
_HF_KEYS = ("model_type", "architectures", "num_hidden_layers", "use_cache")  # written for transformers' loaders


def config_dict(config: MoMConfig) -> dict:
    """What config.json holds: every MoMConfig field (top_k as mom_top_k), model_type "mom" and the class
    transformers loads it with (mom.hf registers both), num_hidden_layers = one KV cache layer per attention call."""
    d = config.to_dict()
    d[HF_TOP_K] = d.pop("top_k")
    return {"model_type": MODEL_TYPE, "architectures": ["MoMHFForCausalLM"], **d,
            "num_hidden_layers": config.graph_depth, "use_cache": True}


def config_from_dict(d: dict, path: str = "config.json", **overrides) -> MoMConfig:
    """The MoMConfig of a config.json's fields: `config_dict`'s, one transformers wrote for a MoMHFForCausalLM
    (its own settings - generation, dtype, version - are not MoMConfig fields and are left out), or an older one
    with MoMConfig's fields alone (then every key must be a field). Errors name the file and the field."""
    d = dict(d)
    if "model_type" in d:
        if d["model_type"] != MODEL_TYPE:
            raise ConfigError(f"{path}: model_type={d['model_type']!r} is not a mom checkpoint (cut a transformers "
                              f"model with MoMForCausalLM.from_hf)")
        written_by_transformers = "transformers_version" in d
        d = {k: v for k, v in d.items() if k not in _HF_KEYS}
        if HF_TOP_K in d:
            d["top_k"] = d.pop(HF_TOP_K)
        if written_by_transformers:
            fields = set(MoMConfig.__dataclass_fields__)
            d = {k: v for k, v in d.items() if k in fields}
    try:
        return MoMConfig.from_dict({**d, **overrides})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def write_config(config: MoMConfig, path: str):
    with open(path, "w") as f:
        json.dump(config_dict(config), f, indent=2)


def save_pretrained(model, directory: str):
    """config.json (`config_dict`) + model.safetensors (a tied LM head is wte; nothing is stored twice).

    Atomic as a whole (mom.io.atomic_dir): both files are written to a temp folder, fsynced, and swapped in,
    the old folder kept until the new one is complete; other files already in `directory` are kept."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_dir(directory, owned=(CONFIG_NAME, WEIGHTS_NAME)) as tmp:
        write_config(model.config, os.path.join(tmp, CONFIG_NAME))
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME))


def read_config(path: str, **overrides) -> MoMConfig:
    """A MoMConfig from a config.json (`config_from_dict`); errors name the file and the field."""
    return config_from_dict(read_json_file(path, "model config"), path, **overrides)


def _read_weights(folder: str):
    """(state dict, the file named in errors) of a checkpoint folder: model.safetensors, or the shards a
    model.safetensors.index.json names (transformers' save_pretrained of a large model); pytorch_model.bin."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json_file(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FileFormatError(f"{index}: no 'weight_map' of tensor -> shard file")
        sd = {}
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(folder, shard)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} not found (named by {index})")
            sd.update(load_safetensors(path))
        lacking = sorted(set(weight_map) - set(sd))
        if lacking:
            raise FileFormatError(f"{index} names tensors no shard holds: {lacking[:3]}")
        return sd, index
    for name in (WEIGHTS_NAME, "pytorch_model.bin"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return load_state_dict(path), path
    raise FileNotFoundError(f"{folder}: no weights (model.safetensors, model.safetensors.index.json or "
                            f"pytorch_model.bin)")


def from_pretrained(directory: str, **config_overrides):
    """The model a checkpoint folder holds (`save_pretrained`'s, or MoMHFForCausalLM's: weights under "model.")."""
    from .model import MoMForCausalLM

    folder = complete_dir(directory)  # after an interrupted save: the last complete version (read-only)
    if folder is None:
        raise FileNotFoundError(f"from_pretrained: {directory} not found")
    cfg_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"from_pretrained: {cfg_path} not found")
    config = read_config(cfg_path, **config_overrides)
    try:
        sd, w_path = _read_weights(folder)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"from_pretrained: {e}") from None
    if sd and all(k.startswith("model.") for k in sd):  # MoMHFForCausalLM's save_pretrained: its .model's keys
        sd = {k[len("model."):]: v for k, v in sd.items()}
    # the weights' dtype (not an integer buffer's, e.g. the routing prior's step count prior_t), before loading:
    # an fp64 checkpoint loaded into fp32 parameters would be rounded
    dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), None)
    model = MoMForCausalLM(config)
    model = model.to(dtype) if dtype is not None else model
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or bad:
        raise FileFormatError(f"from_pretrained: {w_path} does not fit {cfg_path}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, wrong shape {bad[:3]}")
    model.load_state_dict(sd)
    return model

"""GPT-2 checkpoints in, MoM checkpoints out.

`from_gpt2` is phase 2 of the authors' two-phase recipe (paper.md): cut a trained vanilla GPT-2 into
modules. With M = max(n_attn, n_ffn), the checkpoint's layers are consumed bottom-up:

    layers [0, n_bottom)                      -> bottom blocks
    per chunk c: the next M layers, j = 0..M-1 -> attention module j (ln_1 + attn) if j < n_attn,
                                                 FFN module j (ln_2 + mlp) if j < n_ffn (the rest dropped)
                 then one layer                -> the chunk's anchor block (if anchor)
    the last n_top layers                     -> top blocks
    wte, wpe, ln_f copied; routers stay freshly initialised (N(0, 0.02)).

`from_gpt2(..., preserving=True)` (or a config with routing_prior > 0) is the function-preserving cut
(mom/cut.py): a decaying per-step routing prior makes the MoM compute the vanilla exactly at phase 2's start.

Hugging Face's GPT-2 keeps Conv1D weights as [in, out], the layout of our blocks and stacked pools, so no
weight is transposed.

`save_pretrained` replaces its folder atomically (mom.io.atomic_dir: a kill leaves the old checkpoint or the
new one, and other files in the folder are kept); `from_pretrained` / `load_state_dict` read the last complete
version and name the file and what is wrong with it (missing, empty, truncated, a config field).
"""
from __future__ import annotations

import os
import re
from typing import Dict, Union

import torch

from .config import ConfigError, MoMConfig
from .io import FileFormatError, atomic_dir, complete_dir, load_safetensors, read_json_file, torch_load

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
_LAYER_KEY = re.compile(r"^(?:h|bottom)\.(\d+)\.(.+)$")  # HF's "h.i." or a vanilla MoM's "bottom.i."
_IGNORED = ("attn.bias", "attn.masked_bias")  # causal-mask buffers of old HF checkpoints

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


def _gpt2_layers(sd: Dict[str, torch.Tensor]):
    """Split a GPT-2 state dict (HF GPT2LMHeadModel / GPT2Model keys, or a vanilla MoMForCausalLM's) into
    globals and per-layer dicts."""
    routed = [k for k in sd if k.startswith(("chunks.", "top."))]
    if routed:
        raise ValueError(f"not a vanilla GPT-2 checkpoint: it has routed or top blocks, e.g. '{routed[0]}'")
    globals_, layers = {}, {}
    for key, value in sd.items():
        k = key[len("transformer."):] if key.startswith("transformer.") else key
        m = _LAYER_KEY.match(k)
        if m:
            if m.group(2) not in _IGNORED:
                layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif k != "lm_head.weight":  # tied to wte
            globals_[k] = value
    n = len(layers)
    if sorted(layers) != list(range(n)):
        raise ValueError(f"GPT-2 checkpoint: layer indices are not 0..{n - 1}: {sorted(layers)}")
    return globals_, [layers[i] for i in range(n)]


def gpt2_to_mom_state_dict(sd: Dict[str, torch.Tensor], config: MoMConfig) -> Dict[str, torch.Tensor]:
    """Map an HF GPT-2 state dict onto MoMForCausalLM's keys (routers not included)."""
    g, layers = _gpt2_layers(sd)
    for key in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
        if key not in g:
            raise ValueError(f"GPT-2 checkpoint has no '{key}' (nor 'transformer.{key}')")
    if len(layers) != config.source_layers:
        raise ValueError(f"GPT-2 checkpoint has {len(layers)} layers; the config consumes "
                         f"config.source_layers={config.source_layers} (n_bottom + chunks * (max(n_attn, n_ffn) "
                         f"+ anchor) + n_top)")
    D = g["wte.weight"].shape[1]
    if D != config.n_embd or g["wte.weight"].shape[0] != config.vocab_size or \
            g["wpe.weight"].shape[0] != config.n_positions:
        raise ValueError(f"GPT-2 checkpoint sizes (vocab {g['wte.weight'].shape[0]}, n_positions "
                         f"{g['wpe.weight'].shape[0]}, n_embd {D}) do not match the config (vocab_size "
                         f"{config.vocab_size}, n_positions {config.n_positions}, n_embd {config.n_embd})")
    out = {k: g[k] for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}

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
            for ours, theirs in names.items():  # stacked [E, ...] from each module's GPT-2 tensor
                out[f"{p}.{pool}.{ours}"] = torch.stack([layer[theirs] for layer in layers_])
        if config.anchor:
            block(f"{p}.anchor", next(it))
    for i in range(config.n_top):
        block(f"top.{i}", next(it))
    return out


def from_gpt2(state_dict_or_path: Union[str, Dict[str, torch.Tensor]], config: MoMConfig,
              preserving: bool = False, prior_steps: int = None):
    """A MoMForCausalLM initialised from a GPT-2 checkpoint in HF's layout (routers new).

    preserving=True: the function-preserving cut (mom/cut.py): config gets a routing prior (routing_prior 50
    unless set, routing_prior_steps `prior_steps`, else config's, else 1000) under which the MoM computes the
    vanilla's logits until training moves it; ValueError names why when config cannot (cut.preserving_problems).
    A config that already sets routing_prior > 0 (e.g. mom.train's model_overrides) is cut the same way."""
    from .model import MoMForCausalLM

    if preserving:
        from .cut import preserving_config
        config = preserving_config(config, prior_steps)

    sd = load_state_dict(state_dict_or_path) if isinstance(state_dict_or_path, (str, os.PathLike)) \
        else state_dict_or_path
    mapped = gpt2_to_mom_state_dict(sd, config)
    model = MoMForCausalLM(config)
    own = model.state_dict()
    for k, v in mapped.items():
        if k not in own:
            raise ValueError(f"GPT-2 checkpoint: '{k}' has no place in the model (unexpected layer entry)")
        if own[k].shape != v.shape:
            raise ValueError(f"GPT-2 checkpoint: '{k}' has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(own[k].shape)}")
    missing = [k for k in own if k not in mapped and ".attn_router." not in k and ".ffn_router." not in k]
    if missing:
        raise ValueError(f"GPT-2 checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    model.load_state_dict(mapped, strict=False)
    return model


def save_pretrained(model, directory: str):
    """config.json + model.safetensors (the tied LM head is wte; nothing is stored twice).

    Atomic as a whole (mom.io.atomic_dir): both files are written to a temp folder, fsynced, and swapped in,
    the old folder kept until the new one is complete; other files already in `directory` are kept."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_dir(directory, owned=(CONFIG_NAME, WEIGHTS_NAME)) as tmp:
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            f.write(model.config.to_json())
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME))


def read_config(path: str, **overrides) -> MoMConfig:
    """A MoMConfig from a config.json; errors name the file and the field."""
    d = read_json_file(path, "model config")
    try:
        return MoMConfig.from_dict({**d, **overrides})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def from_pretrained(directory: str, **config_overrides):
    from .model import MoMForCausalLM

    folder = complete_dir(directory)  # after an interrupted save: the last complete version (read-only)
    if folder is None:
        raise FileNotFoundError(f"from_pretrained: {directory} not found")
    cfg_path, w_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"from_pretrained: {p} not found")
    config = read_config(cfg_path, **config_overrides)
    sd = load_safetensors(w_path)
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

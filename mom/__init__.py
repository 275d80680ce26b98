"""mom: Mixture-of-Modules transformers (Gong et al., EMNLP 2024) in PyTorch, with Triton kernels."""
from .block import MoMBlock, aux_loss
from .config import ConfigError, MoMConfig, PRESETS
from .layer import MoMLayer, MoMLayerOutput, StepRouting
from .model import MoMForCausalLM, MoMOutput

__all__ = ["MoMBlock", "aux_loss", "ConfigError", "MoMConfig", "PRESETS", "MoMLayer", "MoMLayerOutput", "StepRouting",
           "MoMForCausalLM", "MoMOutput"]
__version__ = "0.1.0"

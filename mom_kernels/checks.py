"""Argument checks of the public functionals: clear ValueError / TypeError / RuntimeError messages
that name the argument, instead of a raw Triton crash.

Shapes, dtypes and devices are checked on the host from metadata (free). Checking that every id
lies in 0..E needs the ids' values, i.e. a host sync on a GPU, so it runs:
  * always for CPU tensors (no sync to speak of),
  * on CUDA only when `set_check_ids(True)` was called or MOM_KERNELS_CHECK_IDS=1 is set,
  * never while torch.compile traces (values are unknown there).
Unchecked out-of-range ids are safe: the plan sorts them with SKIP and the combine masks them,
so they are computed as SKIP (no memory is touched out of bounds).
"""
from __future__ import annotations

import os

import torch

from .routing import RoutingPlan

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHECK_IDS = os.environ.get("MOM_KERNELS_CHECK_IDS", "0") == "1"


def host_check():
    """Context for a check that reads tensor values on the host (CPU tensors, or CUDA when asked): not
    part of a step's launches (`launches.count_launches` skips it)."""
    from .launches import uncounted

    return uncounted()


def set_check_ids(flag: bool) -> None:
    """Turn the host-syncing id range check on or off for CUDA tensors (always on for CPU)."""
    global _CHECK_IDS
    _CHECK_IDS = bool(flag)


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def check_tensor(name, t, shape, dtype=None, device=None, optional=False):
    """shape: tuple of ints (None = any). dtype: required dtype or None (any floating)."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (same as x), got {t.dtype}")
    if dtype is None and t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; all inputs must share a device")


def check_ids(ids, T, E, device):
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be int32 or int64, got {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] != T:
        raise ValueError(f"ids must have shape [T={T}, K], got {list(ids.shape)}")
    if ids.shape[1] < 1:
        raise ValueError("ids must have at least one pick per token (K >= 1)")
    if ids.device != device:
        raise ValueError(f"ids is on {ids.device} but x is on {device}; all inputs must share a device")
    if ids.numel() and not _compiling() and (device.type == "cpu" or _CHECK_IDS):
        with host_check():
            lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi > E:
            raise ValueError(f"ids must lie in 0..{E} ({E} = SKIP), got values in {lo}..{hi}")


def check_norm(norm, ln_bias, act=None):
    """norm "layer" | "rms" (RMSNorm takes no ln_bias); act None | "gelu" | "swiglu"."""
    if norm not in ("layer", "rms"):
        raise ValueError(f"norm must be 'layer' (LayerNorm) or 'rms' (RMSNorm), got {norm!r}")
    if norm == "rms" and ln_bias is not None:
        raise ValueError("norm='rms' (RMSNorm) takes no ln_bias; pass ln_bias=None")
    if act is not None and act not in ("gelu", "swiglu"):
        raise ValueError(f"act must be 'gelu' or 'swiglu', got {act!r}")


def check_x(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must have shape [T, D], got {list(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be fp16, bf16, fp32 or fp64, got {x.dtype}")
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"x must be a CUDA tensor (or a CPU tensor under TRITON_INTERPRET=1), got {x.device}")


def autocast_inputs(x, *tensors):
    """Under torch.autocast for x's device, cast x and the layer's floating tensors (None passes) to the
    autocast dtype, as autocast does for a matmul; the casts are differentiable, so fp32 parameters get
    fp32 gradients. Outside autocast the tensors come back unchanged."""
    if not isinstance(x, torch.Tensor) or x.device.type not in ("cuda", "cpu"):
        return (x, *tensors)
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return (x, *tensors)
    dt = torch.get_autocast_dtype(dev)
    cast = lambda t: t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    return tuple(cast(t) for t in (x, *tensors))


_INT32_SPAN = 2**31


def int32_safe(t):
    """t, or a contiguous copy of it when a kernel's int32 column offsets could overflow on it.

    The kernels compute row offsets (token, sorted row, module) in int64, and offsets along a tensor's other
    dims as int32 index * stride products: those stay below 2^31 when stride * (size - 1) does for every dim
    but the first. A tensor that breaks this (a column-major x of over 2^31 / width rows, a permuted weight
    whose inner stride is huge) is copied into the row-major layout, where the inner strides are the row's
    own sizes. None passes through."""
    if t is None or t.dim() < 2:
        return t
    if all(t.stride(d) * (t.shape[d] - 1) < _INT32_SPAN for d in range(1, t.dim())):
        return t
    t = t.contiguous()
    if not all(t.stride(d) * (t.shape[d] - 1) < _INT32_SPAN for d in range(1, t.dim())):
        raise ValueError(f"a tensor of shape {list(t.shape)} has rows of 2^31 elements or more; the kernels "
                         f"index within a row in int32")
    return t


def check_plan(plan, ids, E):
    if plan is None:
        return
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a mom_kernels.routing.RoutingPlan, got {type(plan).__name__}")
    T, K = ids.shape
    if (plan.n_tokens, plan.top_k, plan.n_modules) != (T, K, E):
        raise ValueError(f"plan was built for T={plan.n_tokens}, K={plan.top_k}, E={plan.n_modules} "
                         f"but the call has T={T}, K={K}, E={E}")
    if plan.device != ids.device:
        raise ValueError(f"plan is on {plan.device} but ids is on {ids.device}")
    if not _compiling() and not plan.built_from(ids):
        raise ValueError("plan was built from other ids (or ids changed in place since): pass the ids tensor the "
                         "plan was built from, or build it with make_plan(ids, E)")

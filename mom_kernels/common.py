"""Shared pieces of the kernels: Triton device helpers (GELU, tanh, rounding casts, the dot) and host helpers
(interpreter detection, dtypes, tile overrides, device checks).

fp32 accumulation for fp16 / bf16 / fp32 (fp64 inputs accumulate in fp64); fp32 dots use IEEE precision (no
TF32). Under TRITON_INTERPRET=1 bf16 / fp16 dot operands are upcast to fp32 (the interpreter's bf16 dot
returns garbage) and bf16 stores are rounded to nearest even by hand (its cast truncates).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# GPT-2's tanh GELU: gelu(u) = 0.5 u (1 + tanh(c (u + a u^3))), c = sqrt(2 / pi) = 0.7978845608028654,
# a = 0.044715 (literals in the jit functions: module-level floats are not visible to a compiled
# kernel, and a tl.constexpr global times a tensor breaks the interpreter).


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (grid sizing)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_sms(t: torch.Tensor):
    """SMs to size a grid for: None under the interpreter; a CPU tensor outside it stands for an H200 (132: what
    mom_kernels.aot records and compiles)."""
    if interpreting():
        return None
    return _sm_count(t.device) if t.is_cuda else 132


def segment_tiles(E: int, N: int, n_sms, block_r: int):
    """(BLOCK_R, BLOCK_N) of a segmented column reduction over each module's rows (grid E x N / BLOCK_N; each
    program walks its module's rows BLOCK_R at a time). n_sms None: the interpreter's (16, <= 64). On a GPU one
    pass with at least 4 programs per SM where the width allows: column blocks from 128 down to 32 (E x N / 128
    = 160 programs on 132 SMs walked ~1000 rows each at the H200 base point), and 64 rows in flight at 32."""
    if n_sms is None:
        return 16, min(_p2(N), 64)
    block_n = min(_p2(N), 128)
    while block_n > 32 and E * triton.cdiv(N, block_n) < 4 * n_sms:
        block_n //= 2
    return (max(block_r, 64) if block_n <= 32 else block_r), block_n


@triton.jit
def _tanh(z):
    # tanh(z) = 2 * sigmoid(2z) - 1, stable at both ends (exp overflow gives -1 or 1)
    return 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0


@triton.jit
def _gelu_tanh(u):
    """th = tanh(sqrt(2/pi) (u + 0.044715 u^3)): the one tanh that GELU (tanh form) and its derivative share."""
    return _tanh(0.7978845608028654 * (u + 0.044715 * u * u * u))


@triton.jit
def _gelu_of(u, th):
    """gelu(u) from th = _gelu_tanh(u)."""
    return 0.5 * u * (1.0 + th)


@triton.jit
def _gelu_grad_of(u, th):
    """gelu'(u) from th = _gelu_tanh(u)."""
    return 0.5 * (1.0 + th) + 0.5 * u * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * u * u)


@triton.jit
def _gelu(u):
    return _gelu_of(u, _gelu_tanh(u))


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _swiglu_of(gate, up, sg):
    """silu(gate) * up from sg = sigmoid(gate) (SwiGLU, the Llama family's FFN activation)."""
    return gate * sg * up


@triton.jit
def _silu_grad_of(gate, sg):
    """silu'(gate) = s (1 + gate (1 - s)) from s = sigmoid(gate)."""
    return sg * (1.0 + gate * (1.0 - sg))


@triton.jit
def _gelu_grad(u):
    return _gelu_grad_of(u, _gelu_tanh(u))


@triton.jit
def _cast(x, dtype: tl.constexpr, RTNE: tl.constexpr):
    """x.to(dtype); with RTNE (set under the interpreter, whose fp32 -> bf16 cast truncates instead
    of rounding to nearest even as the GPU does) bf16 is rounded to nearest even by hand first."""
    if RTNE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc += a @ b with fp32 operands under the interpreter (UPCAST: its bf16 dot is garbage) and IEEE
    precision for fp32 / fp64 inputs (no TF32); out_dtype given, which triton 3.6 needs for fp64."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    return tl.dot(a, b, acc, out_dtype=acc.dtype)


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def slot_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-pick slots [P, N] that a grouped GEMM writes and the combine sums (in fp32): the
    16-bit input dtype itself (half the bytes of fp32 slots, each pick rounded once as the per-module loop
    rounds it), the accumulation dtype otherwise. MOM_KERNELS_SLOTS=fp32 keeps fp32 slots for 16-bit inputs."""
    choice = os.environ.get("MOM_KERNELS_SLOTS", "").strip()
    if choice not in ("", "fp32", "input"):
        raise ValueError(f"MOM_KERNELS_SLOTS must be 'fp32' or 'input', got {choice!r}")
    if dtype in (torch.float16, torch.bfloat16) and choice != "fp32":
        return dtype
    return acc_dtype(dtype)


def _env_override(name: str) -> dict:
    """Tile overrides for tuning on a GPU, e.g. MOM_KERNELS_GEMM_CONFIG="BLOCK_N=256,num_stages=4"
    (16-bit dtypes only; BLOCK_N / BLOCK_K are still clamped to the problem). Empty when unset."""
    spec = os.environ.get(name, "").strip()
    if not spec:
        return {}
    try:
        return {k.strip(): int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
    except ValueError:
        raise ValueError(f"{name} must look like 'BLOCK_N=128,num_warps=8', got {spec!r}") from None


def _check_device(*tensors):
    dev = tensors[0].device
    if dev.type == "cpu" and not interpreting():
        raise RuntimeError(
            "mom_kernels: CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before "
            "importing triton / mom_kernels, or use mom_kernels.reference for plain PyTorch.")


@triton.jit
def _row_module(offs_s, offsets_ptr, N_MOD, BLOCK: tl.constexpr):
    """Module of each sorted row s in offs_s [BLOCK]: how many modules start at or before s (rows past S get
    the last module; callers mask them)."""
    mod = tl.zeros([BLOCK], dtype=tl.int32)
    for e in range(1, N_MOD):
        mod += (offs_s >= tl.load(offsets_ptr + e)).to(tl.int32)
    return mod


def ln_pointers(ln, dummy):
    """(mean, rstd, gamma, beta) of a per-module norm for a launch, or stand-ins (a 1-element tensor, viewed
    [1, 1] for the strided ones) when a variant has none; beta None (RMSNorm, or a LayerNorm without bias) gets
    a stand-in too, and the kernel's HAS_BETA (`has_beta`) is False."""
    if ln is not None:
        mean, rstd, gamma, beta = ln
        return mean, rstd, gamma, beta if beta is not None else gamma
    return dummy, dummy, dummy.view(1, 1), dummy.view(1, 1)


def has_beta(ln) -> bool:
    """Whether a norm tuple (mean, rstd, gamma, beta) has a beta (launchers pass it as HAS_BETA)."""
    return ln is not None and ln[3] is not None


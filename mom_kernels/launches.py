"""Count what a piece of code launches, and catch host syncs: the CPU-side measure of host overhead.

On a GPU every Triton kernel and almost every aten op is one kernel launch, and each costs host time
(about 5-20 us to enqueue) whether the kernel is big or tiny. `count_launches()` counts, for the code run
inside it, the Triton kernel launches plus every aten op that would be a kernel on a GPU. Not counted:
views and metadata queries (no kernel), `empty*` allocations (no kernel), and work done inside a Triton
launch by the interpreter (it emulates one kernel). It runs the same on CPU tensors (Triton under
TRITON_INTERPRET=1) and on CUDA, so a launch budget can be a CPU test.

It also records host syncs: ops that read a device value on the host (`.item()`, `.tolist()`,
`nonzero`, `_local_scalar_dense`, `bool(t)`, ...). A step with none can be captured in a CUDA graph.
`uncounted()` marks host work that exists only for CPU tensors (the kernels' id range check).

    with count_launches() as c:
        loss = step(); loss.backward()
    c.total, c.triton, c.aten, c.syncs, c.table()
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch._library import custom_ops as _custom_ops
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_launches", "count_step", "LaunchCount", "uncounted"]

_state = threading.local()

# aten ops that allocate without writing, or only read metadata: no kernel on a GPU.
_FREE = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_contiguous", "is_same_size",
    "is_non_overlapping_and_dense", "lift_fresh", "set_", "record_stream", "resize_",
}
# ops that read device values back to the host
_SYNC = {"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero", "masked_select", "unique",
         "_unique", "_unique2", "unique_consecutive", "unique_dim", "allclose", "repeat_interleave"}


def _busy() -> bool:
    return getattr(_state, "busy", 0) > 0


@contextlib.contextmanager
def uncounted():
    """Ops run inside are neither counted nor reported as syncs (host checks of CPU tensors only)."""
    _state.busy = getattr(_state, "busy", 0) + 1
    try:
        yield
    finally:
        _state.busy -= 1


@dataclass
class LaunchCount:
    triton: Counter = field(default_factory=Counter)  # kernel name -> launches
    aten: Counter = field(default_factory=Counter)    # op name -> launches
    syncs: list = field(default_factory=list)         # names of ops that read device values on the host

    @property
    def total(self) -> int:
        return sum(self.triton.values()) + sum(self.aten.values())

    def table(self) -> str:
        rows = [f"{n:>4}  triton {k}" for k, n in self.triton.most_common()]
        rows += [f"{n:>4}  aten   {k}" for k, n in self.aten.most_common()]
        return "\n".join([f"{self.total} launches ({sum(self.triton.values())} Triton, "
                          f"{sum(self.aten.values())} aten), {len(self.syncs)} host syncs"] + rows)


class _Mode(TorchDispatchMode):
    def __init__(self, count: LaunchCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace not in ("aten", "prim"):  # a custom op (mom_kernels::...): count what its body runs
            opdef = _custom_ops.OPDEFS.get(func._schema.name)
            if opdef is not None:
                with _Mode(self.count):
                    return opdef._init_fn(*args, **(kwargs or {}))
        if not _busy():
            name = func.overloadpacket.__name__
            if name in _SYNC:
                self.count.syncs.append(name)
            if not (name in _FREE or func.is_view or name in _SYNC or name.startswith("_to_copy")
                    and _same_dtype_device(args, kwargs)):
                self.count.aten[name] += 1
        return func(*args, **(kwargs or {}))


def _same_dtype_device(args, kwargs) -> bool:
    """x.to(its own dtype and device) makes no copy (only an explicit copy=True would)."""
    x = args[0]
    kw = kwargs or {}
    return (kw.get("dtype", x.dtype) == x.dtype and kw.get("device", x.device) == x.device
            and not kw.get("copy", False))


def _patch_triton(count: LaunchCount):
    """Wrap the run methods of Triton's jitted and interpreted kernels to count each launch; ops the
    interpreter runs inside a launch are its emulation of one kernel, not launches of their own."""
    from triton.runtime import jit

    classes = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - a triton without the interpreter: compiled kernels only
        InterpretedFunction = None
    saved = []
    for cls in classes:
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            if not _busy():
                name = getattr(self, "__name__", None) or getattr(getattr(self, "fn", None), "__name__", "?")
                count.triton[name] += 1
            with uncounted():
                return _original(self, *args, **kwargs)

        cls.run = run
        saved.append((cls, original))
    return saved


def _patch_host_reads(count: LaunchCount):
    """tolist / numpy / bool / int / float read values without a dispatched op on CPU tensors."""
    saved = []
    for name in ("tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def method(self, *args, _original=original, _name=name, **kwargs):
            if not _busy():
                count.syncs.append(_name)
            with uncounted():
                return _original(self, *args, **kwargs)

        setattr(torch.Tensor, name, method)
        saved.append((torch.Tensor, name, original))
    return saved


@contextlib.contextmanager
def count_launches():
    """Count Triton launches and GPU-kernel aten ops (and host syncs) of the code run inside."""
    count = LaunchCount()
    triton_saved = _patch_triton(count)
    host_saved = _patch_host_reads(count)
    try:
        with _Mode(count):
            yield count
    finally:
        for cls, original in triton_saved:
            cls.run = original
        for owner, name, original in host_saved:
            setattr(owner, name, original)


def count_step(layer, x, dy, daux) -> LaunchCount:
    """The launches of one training step of a MoM layer (forward, then backward of its output with dy and of
    its balance loss with daux), after one uncounted warm-up step (first calls compile and fill caches);
    parameter and input gradients are unset before each step, as after optimizer.zero_grad()."""
    for counted in (False, True):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with count_launches() if counted else contextlib.nullcontext() as count:
            out = layer(x)
            torch.autograd.backward([out.hidden_states, out.aux_loss], [dy, daux])
    return count

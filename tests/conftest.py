"""Test setup: Triton kernels run under the interpreter on a machine without CUDA; TF32 off; fresh seeds."""
import os

import pytest

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # pytest-xdist runs each worker in a process of its own: each takes its share of the cores, or the workers'
    # thread pools oversubscribe the machine and small-op tests run many times slower (one test: 4 s -> 138 s)
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if _workers > 1:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _workers))
except ImportError:  # pragma: no cover
    pass


def _skip_repeated_language_patching():
    """Triton's interpreter patches triton.language (inspect.getmembers over tl, tl.tensor, tl.math, ...) when a
    kernel launches, and again at every call of a @triton.jit helper inside the kernel, although the modules are
    patched already: a fifth of the interpreter's time in a routed step (cProfile of tests/test_launches.py).
    Here a helper's call patches only modules the running launch has not patched yet (the standard library's
    helpers see triton.language.core, which a kernel module may not import); the launch's own patching and its
    restore are untouched, so every kernel runs exactly as before. Skipped where the interpreter's internals
    differ from those this was written against (triton 3.x's runtime/interpreter.py)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter as interp
    except ImportError:  # pragma: no cover
        return
    real_patch, grid_call = getattr(interp, "_patch_lang", None), getattr(interp.GridExecutor, "__call__", None)
    if real_patch is None or grid_call is None or not hasattr(interp, "_LangPatchScope"):
        return
    launch = {"active": False, "patched": set()}  # the modules the running launch has patched

    def patch_lang(fn):
        langs = {id(v) for v in fn.__globals__.values() if v is interp.tl or v is interp.tl.core}
        if launch["active"] and langs <= launch["patched"]:
            return interp._LangPatchScope()  # nothing to patch, nothing to restore
        scope = real_patch(fn)
        if launch["active"]:
            launch["patched"] |= langs
        return scope

    def call(self, *args, **kwargs):
        if launch["active"]:  # pragma: no cover (a launch inside a launch: leave it to the interpreter)
            return grid_call(self, *args, **kwargs)
        launch["active"], launch["patched"] = True, set()
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            launch["active"] = False

    interp._patch_lang = patch_lang
    interp.GridExecutor.__call__ = call


_skip_repeated_language_patching()


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test (from its id), so no test sees zeros or a shared draw."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield

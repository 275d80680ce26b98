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


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test (from its id), so no test sees zeros or a shared draw."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield

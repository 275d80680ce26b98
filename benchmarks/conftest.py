"""The kernel and step benchmarks under pytest-benchmark (benchmarks/test_bench.py).

    pytest benchmarks/ --benchmark-only                        # timed, at benchmark sizes
    pytest benchmarks/ --benchmark-only --benchmark-autosave   # ... and keep the JSON (.benchmarks/, ignored)
    pytest benchmarks/ --benchmark-only --benchmark-compare    # ... against the last saved run
    pytest benchmarks/ --benchmark-only --benchmark-group-by param:case   # routed / dense / loop side by side
    python -m pytest -q                                        # CI: each benchmark once, at small sizes

Groups: "routed" (the torch backend; triton on CUDA), "dense" (a dense block / GEMM doing the same matrix
FLOPs), "loop" (the authors' per-module loop, mom_kernels.reference). Without --benchmark-only or
--benchmark-enable, benchmarking is disabled: each test runs its function once at small sizes (a smoke test
of a few seconds). Without pytest-benchmark installed, a stand-in fixture does the same.
"""
from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads the option into its session
def pytest_configure(config):
    opt = config.option
    if hasattr(opt, "benchmark_disable") and not (opt.benchmark_only or getattr(opt, "benchmark_enable", False)):
        opt.benchmark_disable = True  # a plain `pytest` run: smoke tests, not timings
        session = getattr(config, "_benchmarksession", None)
        if session is not None:  # this conftest was loaded after the plugin configured itself
            session.disabled = True


@pytest.fixture
def quick(request) -> bool:
    """True when the benchmarks only run once (CI smoke tests): small sizes."""
    return getattr(request.config.option, "benchmark_disable", True)


try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # the dev extra is not installed: run each benchmark's function once
    class _Once:
        group = None
        extra_info: dict = {}

        def __call__(self, fn, *args, **kwargs):
            return fn(*args, **kwargs)

        def pedantic(self, fn, args=(), kwargs=None, setup=None, rounds=1, iterations=1, warmup_rounds=0):
            if setup is not None:
                setup()
            return fn(*args, **(kwargs or {}))

    @pytest.fixture
    def benchmark():
        return _Once()


def pytest_benchmark_update_machine_info(config, machine_info):
    """The saved JSON names the libraries the measured code runs on (and the device)."""
    import importlib

    import torch

    versions = {}
    for lib in ("torch", "triton", "einops", "tokenizers", "pytest_benchmark"):
        try:
            versions[lib] = importlib.import_module(lib).__version__
        except Exception:  # not installed (triton on some CPU machines)
            versions[lib] = None
    machine_info["libraries"] = versions
    machine_info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

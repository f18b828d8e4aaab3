"""pytest benchmarks/: the cases as pytest-benchmark tests.

Without CUDA the Triton interpreter is switched on here, before any test module makes triton compile the kernels,
and every test runs its callable once with pytest-benchmark's timing disabled: interpreter timings are never
performance numbers. Every test runs with the kernels forced (the fused providers must never time the fallback).
"""

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Inductor compiles in this process, not in a pool of workers: the tests' graphs are tiny, and under torch 2.11 the
# pool's shutdown at exit waited out a 300 s timeout.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def no_eager_plans(monkeypatch):
    """Every test starts with no eager plans, as tests/conftest.py's fixture of that name says why."""
    for name in ("relora_kernels.kernels.passes", "relora_kernels.kernels.passes_fp8"):
        module = sys.modules.get(name)
        if module is not None:
            monkeypatch.setattr(module, "_forward_plans", {})


@pytest.fixture(autouse=True)
def kernels_forced():
    import relora_kernels as rk

    with rk.settings(backend="triton"):
        yield


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def run_case(benchmark):
    """run_case(fn): time fn with pytest-benchmark on a GPU (synchronised, warmed up); run it once on a CPU."""

    def run(fn):
        if not HAS_CUDA:
            benchmark.disabled = True  # the fixture then calls fn once and records nothing
            benchmark(fn)
            return

        def synchronized():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synchronized, rounds=20, iterations=1, warmup_rounds=3)

    return run

"""pytest benchmarks/: the cases as pytest-benchmark tests.

Importing the `benchmarks` package (which pytest does before this file) switches the Triton interpreter on when
there is no CUDA, before triton is imported, and forces the kernels for the fused providers. Without CUDA every test
runs its callable once with pytest-benchmark's timing disabled: interpreter timings are never performance numbers.
"""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


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

"""Test set-up: without CUDA the Triton kernels run through the interpreter (set before triton is imported)."""

import os
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import GPU_DRY_RUN, count_launches

# The example's modules (model, data, config, ...) are imported by their tests as the example imports them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
HAS_CUDA = torch.cuda.is_available()
# Inductor compiles in this process, not in a pool of workers: the tests' graphs are tiny, and under torch 2.11 the
# pool's shutdown at exit waited out a 300 s timeout.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA or GPU_DRY_RUN:  # the dry run runs the GPU tests on stand-ins (helpers.GPU_DRY_RUN)
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def default_switches(monkeypatch):
    """Every test starts from the package's default backend and mode, whatever the process inherited: a user's
    exported switches, or `pytest tests benchmarks`, whose import of `benchmarks` forces the kernels process-wide."""
    monkeypatch.delenv("RELORA_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("RELORA_KERNELS_DETERMINISTIC", raising=False)
    monkeypatch.delenv("RELORA_KERNELS_ENGINE", raising=False)


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels (the interpreter on CPU) for the duration of a test."""
    monkeypatch.setenv("RELORA_KERNELS_BACKEND", "triton")


@pytest.fixture
def reference_blocked(monkeypatch, triton_backend):
    """Force the kernels and make the op's reference fallback fail, so a test proves the kernels ran."""
    from relora_kernels import functional

    def forbidden(*args, **kwargs):
        raise AssertionError("the reference op ran where the Triton kernels were forced")

    # Only the op's fallback is blocked; tests still call relora_kernels.reference as their oracle.
    monkeypatch.setattr(functional, "reference", types.SimpleNamespace(lora_linear=forbidden))


@pytest.fixture(params=["triton", "cublas"])
def engine(request, monkeypatch):
    """Each engine of the frozen GEMMs in turn (RELORA_KERNELS_ENGINE): the fused Triton GEMM, and the Triton
    launches composed with the CPU's (here) or cuBLAS's (on a GPU) addmm."""
    monkeypatch.setenv("RELORA_KERNELS_ENGINE", request.param)
    return request.param


@pytest.fixture
def kernel_calls(monkeypatch, reference_blocked, engine):
    """Count kernel-op calls (eager only: torch.compile cannot trace the counting wrapper), for each engine."""
    from relora_kernels import ops

    return count_launches(monkeypatch, ops, ("lora_forward", "lora_backward"))

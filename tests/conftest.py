"""Test set-up: without CUDA the Triton kernels run through the interpreter. TRITON_INTERPRET=1 is set here, before
the package is imported: the package reads it once at import, and Triton when each @triton.jit kernel is defined
(as the kernel modules are imported), so it must be in place before either."""

import dataclasses
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

import relora_kernels as rk  # noqa: E402 (after TRITON_INTERPRET: see the docstring)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA or GPU_DRY_RUN:  # the dry run runs the GPU tests on stand-ins (helpers.GPU_DRY_RUN)
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# CUDA errors after which the process's context is lost: every later CUDA call in it fails with the same error.
_STICKY_CUDA_ERRORS = ("illegal memory access", "misaligned address", "unspecified launch failure",
                       "illegal instruction")
_context_lost = False


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    global _context_lost
    if HAS_CUDA and report.failed and any(error in str(report.longrepr) for error in _STICKY_CUDA_ERRORS):
        _context_lost = True


def pytest_runtest_logfinish(nodeid, location):
    # Under pytest-xdist a worker whose CUDA context a test took down leaves, so that the controller reports that
    # test as the one it crashed on and starts a fresh worker for the rest, instead of every later test on this
    # worker failing with the first one's error. Without xdist the run goes on (and those failures follow).
    if _context_lost and os.environ.get("PYTEST_XDIST_WORKER"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(70)


@pytest.fixture(autouse=True)
def no_eager_plans(monkeypatch):
    """Every test starts with no eager plans (kernels/passes.py, passes_fp8.py), so a key's first call in a test runs
    its passes in full, as its first call in a process does: plans are keyed by the settings' values, so a plan made
    by an earlier test under equal settings would otherwise serve it. A module not yet imported has none."""
    for name in ("relora_kernels.kernels.passes", "relora_kernels.kernels.passes_fp8"):
        module = sys.modules.get(name)
        if module is not None:
            monkeypatch.setattr(module, "_forward_plans", {})


@pytest.fixture(autouse=True)
def default_switches():
    """Every test starts from the package's default settings, whatever the process inherited (a user's exported
    RELORA_KERNELS_* variables), and whatever it changes (rk.configure) is undone after it."""
    previous = rk.configure(**dataclasses.asdict(rk.Settings()))
    yield
    rk.configure(**dataclasses.asdict(previous))


@pytest.fixture
def triton_backend():
    """Force the Triton kernels (the interpreter on CPU) for the duration of a test."""
    rk.configure(backend="triton")


@pytest.fixture
def reference_blocked(monkeypatch, triton_backend):
    """Force the kernels and make the op's reference fallback fail, so a test proves the kernels ran."""
    from relora_kernels import functional

    def forbidden(*args, **kwargs):
        raise AssertionError("the reference op ran where the Triton kernels were forced")

    # Only the op's fallback is blocked; tests still call relora_kernels.reference as their oracle.
    monkeypatch.setattr(functional, "reference", types.SimpleNamespace(lora_linear=forbidden))


@pytest.fixture(params=["triton", "cublas"])
def engine(request):
    """Each engine of the frozen GEMMs in turn (the engine setting): the fused Triton GEMM, and the Triton launches
    composed with the CPU's (here) or cuBLAS's (on a GPU) addmm."""
    rk.configure(engine=request.param)
    return request.param


@pytest.fixture
def kernel_calls(monkeypatch, reference_blocked, engine):
    """Count calls of the two passes, for each engine: kernels/passes.py's eager_forward and eager_backward, which
    functional.py calls itself eagerly (planned or not), or the registered ops lora_forward and lora_backward, which
    run for meta tensors (the GPU tests' dry run); counted under the ops' names. torch.compile cannot trace the
    counting wrappers."""
    from relora_kernels import ops
    from relora_kernels.kernels import passes

    calls = count_launches(monkeypatch, ops, ("lora_forward", "lora_backward"))
    return count_launches(monkeypatch, passes, {"eager_forward": "lora_forward", "eager_backward": "lora_backward"},
                          calls)

"""Loader of the native cuBLAS baseline (`lora_native.cpp`): built on first use, cached on disk, loaded once.

    from csrc_bench import load, NativeUnavailable
    ops = load()                       # torch.ops.relora_bench: lora_forward, lora_backward, floor_*
    y, shrunk, x_dropped = ops.lora_forward(x, weight, bias, lora_a, lora_b, scale, mask, dropout_p)

The build goes through torch.utils.cpp_extension (ninja + a C++ compiler; no nvcc: the source only calls ATen
operators). The compiled library is cached under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) and
rebuilt only when the source changes, one build per torch version (`extension_name`). Where it cannot be built or
used, `load` raises NativeUnavailable whose message says why, and `unavailable_reason` returns that reason without
raising.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("lora_native.cpp")
EXTENSION_NAME = "relora_bench_native"


def extension_name(torch_version: str = torch.__version__) -> str:
    """The build's name, torch's version in it: torch keys its build folders by Python and CUDA version only, so two
    torch versions with one CUDA tag (2.12.1+cu130, 2.14.1+cu130) would share one, and a process that waits for
    another's build there loads what that one built, against the other torch (it crashed so)."""
    return f"{EXTENSION_NAME}_torch_" + "".join(c if c.isalnum() else "_" for c in torch_version)


class NativeUnavailable(RuntimeError):
    """The native baseline cannot be built or run here; str(error) is the reason."""


def unavailable_reason(require_cuda: bool = True) -> str | None:
    """Why the extension cannot be built (or, with require_cuda, benchmarked) here; None when it can."""
    if require_cuda and not torch.cuda.is_available():
        return "no CUDA device: the native baseline is a cuBLAS benchmark"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} is not on PATH (set CXX to choose one)"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (torch.utils.cpp_extension needs it to build): pip install ninja"
    return None


def load(require_cuda: bool = True, verbose: bool = False):
    """Build (first call on this machine) and load the extension; returns the op namespace torch.ops.relora_bench.

    require_cuda=False allows a CPU-only machine, for the test that checks the C++ math against the reference.
    """
    reason = unavailable_reason(require_cuda)
    if reason is not None:
        raise NativeUnavailable(reason)
    return _build_and_load(verbose)


@functools.cache
def _build_and_load(verbose: bool):
    from torch.utils.cpp_extension import load as build

    try:
        build(name=extension_name(), sources=[str(SOURCE)], extra_cflags=["-O3"], is_python_module=False,
              verbose=verbose)
    except (RuntimeError, OSError, ImportError) as error:  # compiler or linker failure; the log is in the message
        raise NativeUnavailable(f"building {SOURCE.name} failed: {error}") from error
    return torch.ops.relora_bench

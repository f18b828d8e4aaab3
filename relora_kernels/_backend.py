"""Which implementation runs an op: the Triton kernels or the PyTorch reference (docs/DESIGN.md section 4).

The backend setting (relora_kernels.settings; RELORA_KERNELS_BACKEND seeds it):
  auto       Triton for CUDA tensors, the reference elsewhere (and on CUDA, with a warning, where triton is not
             installed: it has wheels for Linux only, so the package installs without it elsewhere).
  triton     the kernels always; on a CPU tensor they run only under TRITON_INTERPRET=1, otherwise a clear error;
             without triton installed, a clear error.
  reference  the pure-PyTorch twins.
The deterministic setting (or torch.use_deterministic_algorithms(True)) replaces the kernels' fp32 atomics with
per-program partials and a fixed-order sum, so gradients are bit-identical run to run on one GPU model (the work is
split by its SM count).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from . import _settings

# Read once: Triton itself reads TRITON_INTERPRET once, when it is imported.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 when the package was imported).
    The package's one reader of the variable; importing triton is not needed for it."""
    return _INTERPRETING


def cpu_kernels_allowed() -> bool:
    """Whether the kernels may take CPU tensors: through the interpreter. (The host-time benchmark replaces this to
    drive compiled kernels against a stand-in driver that launches nothing.)"""
    return _INTERPRETING


def _triton_installed() -> bool:
    # Found, not imported: the reference path never needs triton loaded.
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


# Read once, as TRITON_INTERPRET: a plain module constant is also what torch.compile can trace through.
_TRITON_INSTALLED = _triton_installed()
_warned_no_triton = False


def triton_available() -> bool:
    """Whether triton is installed (it has wheels for Linux only; elsewhere the package installs without it)."""
    return _TRITON_INSTALLED


def _warn_no_triton_once() -> None:
    global _warned_no_triton
    if not _warned_no_triton:
        _warned_no_triton = True
        warnings.warn("triton is not installed, so the LoRA ops run the PyTorch reference on CUDA tensors (slower): "
                      "pip install triton (Linux) for the kernels, or set the backend to reference to silence this",
                      RuntimeWarning, stacklevel=4)


def use_triton(device: torch.device) -> bool:
    """True when the kernels should run for tensors on `device`; raises where they were forced but cannot run."""
    name = _settings._current.backend
    if name == "auto":
        if device.type != "cuda":
            return False
        if not triton_available():
            _warn_no_triton_once()
            return False
        return True
    if name == "reference":
        return False
    if not triton_available():
        raise RuntimeError(
            "the backend setting is triton (RELORA_KERNELS_BACKEND=triton) but triton is not installed: install it "
            "(pip install triton; it has wheels for Linux on x86_64 and aarch64), or use the backend auto or reference"
        )
    if device.type == "cpu" and not cpu_kernels_allowed():
        raise RuntimeError(
            "the backend setting is triton (RELORA_KERNELS_BACKEND=triton) but the tensors are on the CPU: the "
            "Triton kernels run on a CPU only through the interpreter (set TRITON_INTERPRET=1 before importing "
            "triton), or use the backend auto or reference"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the backend setting is triton but the tensors are on device type {device.type!r}")
    return True


def deterministic() -> bool:
    return _settings._current.deterministic or torch.are_deterministic_algorithms_enabled()

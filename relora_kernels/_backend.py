"""Which implementation runs an op: the Triton kernels or the PyTorch reference (docs/DESIGN.md section 4).

RELORA_KERNELS_BACKEND=auto|triton|reference, read at every call so a test or a user can switch it at run time.
  auto       Triton for CUDA tensors, the reference elsewhere.
  triton     the kernels always; on a CPU tensor they run only under TRITON_INTERPRET=1, otherwise a clear error.
  reference  the pure-PyTorch twins.
RELORA_KERNELS_DETERMINISTIC=1 (or torch.use_deterministic_algorithms(True)) replaces the kernels' fp32 atomics
with per-program partials and a fixed-order sum, so gradients are bit-identical run to run on one GPU model (the
work is split by its SM count).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "reference")


def backend_name() -> str:
    name = os.environ.get("RELORA_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"RELORA_KERNELS_BACKEND must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1, which Triton itself reads once,
    when it is imported). The package's one reader of the variable; importing triton is not needed for it."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(device: torch.device) -> bool:
    """True when the kernels should run for tensors on `device`; raises where they were forced but cannot run."""
    name = backend_name()
    if name == "reference":
        return False
    if name == "auto":
        return device.type == "cuda"
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "RELORA_KERNELS_BACKEND=triton but the tensors are on the CPU: the Triton kernels run on a CPU only "
            "through the interpreter (set TRITON_INTERPRET=1 before importing triton), or use "
            "RELORA_KERNELS_BACKEND=auto|reference"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"RELORA_KERNELS_BACKEND=triton cannot run on device type {device.type!r}")
    return True


def deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("RELORA_KERNELS_DETERMINISTIC") == "1"

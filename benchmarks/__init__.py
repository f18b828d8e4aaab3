"""Benchmarks of relora_kernels: cases (cases.py, e2e.py) apart from the harness (harness.py, sweep.py, report.py).

Importing this package prepares the process for them:
- without CUDA, the Triton kernels can only run through the interpreter, which must be switched on before triton
  is first imported (smoke runs; their timings are never performance numbers);
- the `fused` providers must run the kernels, never the package's PyTorch fallback, so the backend is forced.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["RELORA_KERNELS_BACKEND"] = "triton"

"""benchmarks/isolate_fault.py on a CPU: its cases are well formed and each kind of case runs (through the
interpreter, on the smallest shape) and reports the GEMM's error against float64."""

from __future__ import annotations

import re

import pytest
import torch

from . import isolate_fault


def test_every_tile_is_a_case_at_the_odd_shape_and_every_launcher_is_covered():
    from relora_kernels.kernels import policy

    cases = isolate_fault._cases()
    for what in ("forward_gemm", "input_grad_gemm"):
        assert {f"{what}/odd/{tile.name}" for tile in policy.GEMM_TILES} <= set(cases)  # the wrong ones too
    assert {kind for kind, _, _ in cases.values()} == {"shrink", "grad_ab", "op_triton", "op_cublas", "forward_gemm",
                                                       "input_grad_gemm"}
    assert all(shape in isolate_fault.SHAPES for _, shape, _ in cases.values())


# The Triton engine's op case is these launches in sequence, so it is left to the GPU (9 s here).
@pytest.mark.parametrize("name", ["shrink/tiny", "grad_ab/tiny", "op_cublas/tiny",
                                  "forward_gemm/tiny/32x32x32 g8 w4 s2"])
def test_a_case_runs_and_reports(name):
    result = isolate_fault.run_case(name, device="cpu")
    if name.startswith("forward_gemm"):
        # fp32 accumulation of K + r = 28 products (~28 x 6e-8), then one rounding into fp16 (half an ulp, 4.9e-4
        # relative): under fp16's eps in norm, the bound the tool itself holds a GEMM to
        error = float(re.fullmatch(r"ok, relative error (\S+)", result).group(1))
        assert error < torch.finfo(torch.float16).eps
    else:
        assert result == "ok"


def test_a_gemm_off_by_more_than_the_dtype_allows_is_called_wrong(monkeypatch):
    from relora_kernels.kernels import passes

    forward = passes.lora_forward_matmul
    monkeypatch.setattr(passes, "lora_forward_matmul", lambda *args: forward(*args) * 1.01)  # 1 % off
    assert isolate_fault.run_case("forward_gemm/tiny/32x32x32 g8 w4 s2", device="cpu").startswith("WRONG")

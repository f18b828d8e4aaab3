"""The FP8 path on a CUDA GPU with FP8 tensor cores (marker `gpu`): realistic shapes in bf16 against the float64
reference on the same quantised operands (the bounds of tests/test_fp8_op.py: fp32 accumulation plus a few roundings
into the dtype), and one compiled graph on the triton_ops. Skipped in the GPU tests' dry run, whose meta tensors
cannot run torch._scaled_mm's probe, and, with the reason, where the GPU or torch has no FP8 GEMM."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import GPU_DRY_RUN, make_inputs
from test_fp8_op import check_against_float64_reference

import relora_kernels as rk

pytestmark = pytest.mark.gpu

# (tokens, K, N): GPT-2 124M's MLP projection, and 3-D x with a token count no multiple of a block.
SHAPES = {"4096 x 768 x 3072": ((4096,), 768, 3072), "2 x 1021 x 1024 x 1536": ((2, 1021), 1024, 1536)}


def _skip_reason(dtype) -> str | None:
    if GPU_DRY_RUN:
        return "the dry run's meta tensors cannot run torch._scaled_mm"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    from relora_kernels import functional
    from relora_kernels.kernels.passes_fp8 import scaled_mm_support

    problem = functional._fp8_gpu_problem(torch.cuda.current_device()) or scaled_mm_support(
        "cuda", torch.cuda.current_device(), dtype)
    return problem


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp8_op_on_gpu_matches_float64_reference(shape, dropout_p):
    dtype = torch.bfloat16
    if (reason := _skip_reason(dtype)) is not None:
        pytest.skip(reason)
    rk.configure(backend="triton")
    lead, k, n = SHAPES[shape]
    check_against_float64_reference(make_inputs(lead, k, n, 16, dtype, device="cuda"), 0.5, dropout_p, 7, dtype)


def test_a_planned_fp8_call_matches_float64_reference():
    # The second call of a key runs its plan: each compiled launcher started by kernels/launch.py itself (its
    # AlignedLaunch), not by Triton's own launch as the first call.
    dtype = torch.bfloat16
    if (reason := _skip_reason(dtype)) is not None:
        pytest.skip(reason)
    rk.configure(backend="triton")
    lead, k, n = SHAPES["4096 x 768 x 3072"]
    inputs = make_inputs(lead, k, n, 16, dtype, device="cuda")
    for _ in range(2):
        check_against_float64_reference(inputs, 0.5, 0.1, 7, dtype)


def test_a_gpu_without_fp8_tensor_cores_raises_naming_it():
    if GPU_DRY_RUN or not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this GPU has FP8 tensor cores")
    layer = rk.LoRALinear(64, 64, r=4, frozen_dtype="fp8", device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=torch.cuda.get_device_name()):
        layer(torch.randn(8, 64, device="cuda", dtype=torch.bfloat16))


def test_compiled_fp8_model_on_the_triton_ops():
    from torch._dynamo.testing import CompileCounterWithBackend

    if (reason := _skip_reason(torch.bfloat16)) is not None:
        pytest.skip(reason)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(rk.LoRALinear(512, 1024, r=16, dropout=0.0, frozen_dtype="fp8"), nn.GELU(),
                          rk.LoRALinear(1024, 512, r=16, frozen_dtype="fp8")).to("cuda", torch.bfloat16)
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.lora_B, std=0.02)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(4, 512, 512, device="cuda", dtype=torch.bfloat16)
    want, got = model(x), compiled(x)
    # The same ops in the same order; Inductor may fuse the GELU differently: a few bf16 ulps.
    torch.testing.assert_close(got, want, rtol=2**-6, atol=2**-6)
    got.float().square().sum().backward()
    assert counter.frame_count == 1
    torch._dynamo.reset()

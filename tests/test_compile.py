"""torch.compile and torch.library: zero graph breaks, same results as eager, registrations that pass opcheck.

On this CPU machine the "triton" cases run the kernels through the interpreter, where the ops are opaque custom
ops (torch cannot trace into interpreted kernels); on a GPU they are triton_ops (tests/test_gpu.py compiles those).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import make_inputs
from torch._dynamo.testing import CompileCounterWithBackend

import relora_kernels as rk
from relora_kernels import reference


def lora_model(dropout: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        rk.LoRALinear(24, 40, r=4, alpha=8, dropout=dropout),  # r < 16, K and N not multiples of a block
        nn.GELU(),
        rk.LoRALinear(40, 19, r=1, dropout=dropout, bias=False),  # r = 1, no bias, N prime
    )
    for layer in model:
        if isinstance(layer, rk.LoRALinear):
            nn.init.normal_(layer.lora_B, std=0.2)  # nonzero B, so the low-rank path reaches every output
    return model


def output_and_grads(run, model: nn.Module, x: torch.Tensor):
    """y = run(x) (model itself or its compiled form) and the gradients of sum(y**2) in x and model's parameters."""
    torch.manual_seed(1)  # the dropout seeds are drawn from here
    x = x.clone().requires_grad_()
    y = run(x)
    y.square().sum().backward()
    grads = {"x": x.grad} | {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.fixture
def compile_state():
    torch._dynamo.reset()
    # Inductor draws random numbers with its own generator unless told to fall back to eager's: with the fallback
    # the compiled model draws the same dropout seeds as the eager one, so results can be compared exactly.
    with torch._inductor.config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("backend", ["reference", "triton", "cublas"])  # the kernels on each engine
def test_compiled_lora_model_has_no_graph_breaks_and_matches_eager(backend, dropout, monkeypatch, compile_state,
                                                                   request):
    if backend != "reference":
        request.getfixturevalue("reference_blocked")  # the kernels forced, the reference op blocked
        rk.configure(engine=backend)
    else:
        rk.configure(backend="reference")
    model = lora_model(dropout)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # fullgraph: any graph break raises

    for batch in (3, 5):  # a second batch size: recompiled with a dynamic batch dimension, still one graph each
        x = torch.randn(batch, 7, 24)
        want_y, want_grads = output_and_grads(model, model, x)
        got_y, got_grads = output_and_grads(compiled, model, x)
        torch.testing.assert_close(got_y, want_y)  # fp32 defaults: rtol 1.3e-6, atol 1e-5
        assert got_grads.keys() == want_grads.keys()
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], msg=lambda m, n=name: f"grad {n}: {m}")
    assert counter.frame_count == 2, f"{counter.frame_count} graphs for 2 batch sizes: a graph break or a recompile"


def test_compiled_functional_op_with_symbolic_scalars(kernel_calls, compile_state):
    # dynamic=True traces scale and dropout_p as symbolic floats: validation and launch must take them as such.
    compiled = torch.compile(rk.lora_linear, fullgraph=True, dynamic=True)
    x, weight, lora_a, lora_b, bias = make_inputs((11,), 24, 16, 4, torch.float32).values()
    for scale, dropout_p, seed in ((0.5, 0.1, 3), (2.0, 0.3, 4)):
        args = (x, weight, lora_a, lora_b, scale, bias, dropout_p, seed)
        torch.testing.assert_close(compiled(*args), rk.lora_linear(*args))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiled_merge_and_reinit_matches_eager(backend, monkeypatch, compile_state):
    rk.configure(backend=backend)
    inputs = make_inputs((1,), 40, 33, 5, torch.float32, bias=False)

    def restart(weight, lora_a, lora_b):
        rk.merge_and_reinit_(weight, lora_a, lora_b, 0.5, seed=11)
        return weight, lora_a, lora_b

    eager = restart(*(inputs[k].clone() for k in ("weight", "lora_a", "lora_b")))
    compiled = torch.compile(restart, fullgraph=True)(*(inputs[k].clone() for k in ("weight", "lora_a", "lora_b")))
    for name, got, want in zip(("weight", "lora_a", "lora_b"), compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_compiled_reference_path_under_cpu_autocast(monkeypatch, compile_state):
    rk.configure(backend="reference")
    model = lora_model(0.0)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_y, want_grads = output_and_grads(model, model, x)
        got_y, got_grads = output_and_grads(compiled, model, x)
    assert got_y.dtype == torch.bfloat16
    # bf16 compute: Inductor may fuse and round differently from eager, so allow a few bf16 ulps of the output.
    torch.testing.assert_close(got_y, want_y, rtol=2**-6, atol=2**-6)
    for name, grad in got_grads.items():
        assert grad.dtype == want_grads[name].dtype == torch.float32, name  # fp32 parameters get fp32 grads
        torch.testing.assert_close(grad, want_grads[name], rtol=2**-6, atol=2**-6, msg=lambda m, n=name: f"{n}: {m}")


def op_cases():
    """(op name, args) for every registered op: tiny odd shapes, with and without dropout / bias."""
    inputs = make_inputs((37,), 40, 24, 5, torch.float32)  # M prime, r < 16
    x, weight, lora_a, lora_b, bias = (inputs[k] for k in ("x", "weight", "lora_a", "lora_b", "bias"))
    seed = torch.tensor(5)
    shrunk = reference.lora_shrink(x, lora_a, 0.0, None)
    grad_y = torch.randn(37, 24)
    backward = (grad_y, x, weight, lora_a, lora_b, shrunk, 0.5)
    return {
        "lora_forward, dropout, bias": ("lora_forward", (x, weight, lora_a, lora_b, 0.5, bias, 0.2, seed)),
        "lora_forward": ("lora_forward", (x, weight, lora_a, lora_b, 0.5, None, 0.0, None)),
        "lora_backward, dropout, bias": ("lora_backward", (*backward, 0.2, seed, True, True, False)),
        "lora_backward, deterministic": ("lora_backward", (*backward, 0.0, None, True, False, True)),
        "lora_backward, no dx": ("lora_backward", (*backward, 0.0, None, False, False, False)),
        "merge_lora_weight_": ("merge_lora_weight_", (weight.clone(), lora_a, lora_b, 0.5)),
        "reinit_lora_": ("reinit_lora_", (lora_a.clone(), lora_b.clone(), 7)),
    }


@pytest.mark.parametrize("case", list(op_cases()))
def test_kernel_ops_pass_opcheck(case, engine):
    from relora_kernels import ops

    name, args = op_cases()[case]
    if engine == "cublas" and name.startswith(("merge", "reinit")):
        pytest.skip("the restart ops have one engine")
    torch.library.opcheck(getattr(ops, name), args)  # schema, fake implementation, autograd registration, AOT


@pytest.mark.parametrize("stream", ["philox_bits", "dropout_bits"])
def test_reference_random_stream_op_passes_opcheck(stream):
    # The reference's Philox streams are opaque ops, so compiling the reference path never traces them.
    torch.library.opcheck(getattr(torch.ops.relora_kernels, stream).default, (torch.tensor(3), 5, 7))


def test_launchers_register_as_triton_ops():
    # On a GPU ops.py registers triton_ops (not runnable here): schema inference and the search for the kernels a
    # launcher calls must accept every launcher, giving the schemas of the custom ops that the CPU tests exercise.
    from relora_kernels import ops

    for name, (launcher, mutates, _) in ops._LAUNCHERS.items():
        op = torch.library.triton_op(f"relora_kernels_registration_test::{name}", launcher, mutates_args=mutates)
        registered = getattr(ops, name)._opoverload._schema
        assert str(op._opoverload._schema).split("::")[1] == str(registered).split("::")[1], name


@pytest.mark.slow
def test_launchers_trace_with_symbolic_shapes():
    # On a GPU the ops are triton_ops: torch.compile(dynamic=True) and opcheck's AOT checks run each launcher on fake
    # tensors of symbolic sizes, which must neither key a cache nor choose a tile unspecialised (a SymInt is
    # unhashable). The script traces every op, both engines and FP8, without the interpreter; nothing launches.
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("trace_launchers.py"))],
                            capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    from test_fp8_op import op_cases as fp8_op_cases

    traced = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert len(traced) == 2 * len(op_cases()) + len(fp8_op_cases()), result.stdout

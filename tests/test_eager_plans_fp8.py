"""The FP8 op's eager plans (kernels/passes_fp8.py), as tests/test_eager_plans.py checks the bf16 op's: a key's first
call runs the passes in full and plans them; later calls run the plan. Both must give the float64 reference's result
on the same quantised operands (test_fp8_op.py's bounds), the plan must really be taken and reproduce the first call
bit for bit, a change of settings must not reuse a plan made under other ones, and a broken plan must be caught."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_within_bound, make_inputs
from test_fp8_op import _PROBLEM, bounds_on_quantised_operands, grad_output
from test_strided_operands import column_major, every_other_column

import relora_kernels as rk
from relora_kernels import reference
from relora_kernels.kernels import lora_linear, passes_fp8

pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"no FP8 GEMM on the CPU here: {_PROBLEM}")

M, K, N, R = 37, 45, 51, 5  # M prime, K and N not multiples of any block, r < 16: partial blocks everywhere
SCALE, SEED = 0.5, 11
NAMES = ("x", "lora_a", "lora_b", "bias")


def _fwd_bwd(fn, frozen, inputs, dropout_p, grad_out, need_x=True, dtype=None):
    """y and the gradients of fn(x, frozen, ...) on fresh leaves (cast to `dtype`); x a leaf without grad unless
    `need_x` (then the backward asks no dx)."""
    leaves = {name: inputs[name].detach().to(dtype or inputs[name].dtype).requires_grad_(name != "x" or need_x)
              for name in NAMES if inputs.get(name) is not None}
    y = fn(leaves["x"], frozen, leaves["lora_a"], leaves["lora_b"], SCALE, leaves.get("bias"), dropout_p, SEED)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), {name: t.grad for name, t in leaves.items() if t.requires_grad}


def _check_against_reference(inputs, frozen, dropout_p, grad_out, y, grads):
    y64, grads64 = _fwd_bwd(reference.lora_linear_fp8, frozen, inputs, dropout_p, grad_out.float(),
                            need_x="x" in grads, dtype=torch.float64)
    bounds = bounds_on_quantised_operands(inputs, frozen, SCALE, dropout_p, SEED, grad_out, torch.float32)
    assert_within_bound("y", y, y64, bounds["y"])
    assert set(grads) == set(grads64)
    for name, grad in grads.items():
        assert_within_bound(f"d{name}", grad, grads64[name], bounds[name])


def _strided(inputs: dict, grad_out: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Every operand as a strided view of the same values: x, A, B and the bias every other column, W column-major
    (its FP8 copies are contiguous whatever its layout), dy column-major."""
    views = {name: None if t is None else every_other_column(t) for name, t in inputs.items()}
    views["weight"] = column_major(inputs["weight"])
    return views, column_major(grad_out)


def _first_and_planned_call(monkeypatch, dropout_p, bias, need_x, break_plan=None, strided=False):
    """The op's first call of a key and its second (planned) one, the unplanned passes made to fail for the second;
    `break_plan(inputs, frozen)` may spoil the plans in between; `strided`: every operand a strided view. Checks
    both against the reference and each other."""
    monkeypatch.setattr(passes_fp8, "_forward_plans", {})
    inputs = make_inputs((M,), K, N, R, torch.float32, bias=bias)
    grad_out = grad_output(inputs, N)
    if strided:
        inputs, grad_out = _strided(inputs, grad_out)
        assert not any(t.is_contiguous() for t in (*inputs.values(), grad_out) if t is not None)
    frozen = rk.quantize_fp8_weight(inputs["weight"])
    first = _fwd_bwd(rk.lora_linear_fp8, frozen, inputs, dropout_p, grad_out, need_x)
    (plan,) = passes_fp8._forward_plans.values()  # the backward's plans are kept by its forward's
    assert len(plan.backward_plans) == 1, "the first call planned nothing"
    if break_plan is not None:
        break_plan(inputs, frozen)

    def unplanned(*args, **kwargs):
        raise AssertionError("a planned key ran the passes in full")

    monkeypatch.setattr(passes_fp8, "lora_forward_fp8", unplanned)
    monkeypatch.setattr(passes_fp8, "lora_backward_fp8", unplanned)
    second = _fwd_bwd(rk.lora_linear_fp8, frozen, inputs, dropout_p, grad_out, need_x)
    for y, grads in (first, second):
        _check_against_reference(inputs, frozen, dropout_p, grad_out, y, grads)
    # Same kernels, same inputs, same seed: the plan reproduces the full passes bit for bit.
    assert torch.equal(first[0], second[0])
    assert set(first[1]) == set(second[1])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


# Each backward route of each engine: dx by the frozen GEMM (with and without dropout: on the cuBLAS-composed engine
# the dA launch then writes dx's start), and no dx at all.
CASES = {"p0-bias": (0.0, True, True), "p0.3-no-bias": (0.3, False, True), "p0.3-bias-no-dx": (0.3, True, False)}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("case", CASES)
def test_a_planned_call_runs_the_plan_and_matches_the_reference(triton_backend, engine, case, deterministic,
                                                                  monkeypatch):
    rk.configure(deterministic=deterministic)  # the planned backward's two ways of adding up dA, dB, dbias
    _first_and_planned_call(monkeypatch, *CASES[case])


@pytest.mark.parametrize("case", CASES)
def test_a_planned_call_on_strided_operands(triton_backend, engine, case, monkeypatch):
    # The plan's launches were bound once with the key's strides: each operand's own must reach every launch.
    _first_and_planned_call(monkeypatch, *CASES[case], strided=True)


def test_a_broken_plan_is_caught(triton_backend, engine, monkeypatch):
    # The backward's plan rebuilt for twice the LoRA scale, under the key of the true one: its gradient launches
    # compute dS, dA and dB twice too large, which the reference and the first call must both catch.
    def break_plan(inputs, frozen):
        (forward_plan,) = passes_fp8._forward_plans.values()
        backward_plans = forward_plan.backward_plans
        (key, plan), = backward_plans.items()
        grad_y = torch.empty(M, N)  # as autograd hands it: contiguous
        shrunk = torch.empty(M, R)
        backward_plans[key] = passes_fp8._backward_plan(
            grad_y, inputs["x"], frozen.q_t, frozen.scale_t, inputs["lora_a"], inputs["lora_b"], shrunk, 2 * SCALE,
            0.0, True, True, False)
        assert backward_plans[key].cublas == plan.cublas

    with pytest.raises(AssertionError, match="dlora_a|dlora_b|dx"):
        _first_and_planned_call(monkeypatch, 0.0, True, True, break_plan)


def _spy(monkeypatch, module, name, record):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        record(*args, **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def test_a_change_of_engine_is_not_served_by_an_old_plan(triton_backend, monkeypatch):
    inputs = make_inputs((M,), K, N, R, torch.float32)
    frozen = rk.quantize_fp8_weight(inputs["weight"])
    grad_out = grad_output(inputs, N)
    rk.configure(engine="triton")
    for _ in range(2):  # planned on the Triton engine
        _fwd_bwd(rk.lora_linear_fp8, frozen, inputs, 0.0, grad_out)
    gemms = []
    _spy(monkeypatch, passes_fp8, "scaled_mm", lambda *args, **kwargs: gemms.append("cublas"))
    # The FP8 GEMM's launch, which planned and unplanned calls share (a planned forward's does not pass through
    # fused_matmul_fp8).
    _spy(monkeypatch, lora_linear, "_launch_fused_matmul_fp8", lambda *args, **kwargs: gemms.append("triton"))
    rk.configure(engine="cublas")
    for _ in range(2):
        _fwd_bwd(rk.lora_linear_fp8, frozen, inputs, 0.0, grad_out)
    assert gemms == ["cublas"] * 4, gemms  # y and dx of each call


def test_a_change_of_determinism_is_not_served_by_an_old_plan(triton_backend, engine, monkeypatch):
    inputs = make_inputs((M,), K, N, R, torch.float32)
    frozen = rk.quantize_fp8_weight(inputs["weight"])
    grad_out = grad_output(inputs, N)
    for _ in range(2):  # planned with atomics: one partial sum per reduction
        _fwd_bwd(rk.lora_linear_fp8, frozen, inputs, 0.0, grad_out)
    partials = []

    def record(*args, launches=None, **kwargs):
        if launches is not None:  # a planned call's; the full pass's own are deterministic's by construction
            partials.append(launches[0][4])

    _spy(monkeypatch, lora_linear, "_grad_ab", record)
    rk.configure(deterministic=True)
    for _ in range(2):
        _fwd_bwd(rk.lora_linear_fp8, frozen, inputs, 0.0, grad_out)
    # deterministic: one partial per token block (the interpreter's blocks are 32 rows: 2 for M = 37)
    assert partials == [2], partials

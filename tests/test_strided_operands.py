"""Every operand of every op as a strided view: column-major storage, every other column, stride 0 (broadcast).

The kernels take any strides; a kernel that ignored one (reading a strided bias as if contiguous, say) computes
silently wrong numbers, or reads past a stride-0 operand's one-element buffer. Each case runs the kernels and the
reference on the view and checks both against the float64 reference of a contiguous copy.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_within_torch_error, make_inputs
from test_lora_linear import GRAD_NAMES, run

import relora_kernels as rk
from relora_kernels import reference
from relora_kernels.kernels import passes

M, K, N, R = 29, 40, 36, 6


def column_major(t: torch.Tensor) -> torch.Tensor:
    return t.T.contiguous().T


def every_other_column(t: torch.Tensor) -> torch.Tensor:
    """The same values, as a view that skips every other element of its last dimension."""
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def broadcast(t: torch.Tensor) -> torch.Tensor:
    """Stride 0 along the first dimension: every row (every element, for a vector) is the first one."""
    return t[:1].expand(t.shape)


LAYOUTS = {"column-major": column_major, "every other column": every_other_column, "stride 0": broadcast}
CASES = [(name, layout) for name in ("x", "weight", "lora_a", "lora_b") for layout in LAYOUTS]
CASES += [("bias", "every other column"), ("bias", "stride 0"), ("grad_y", "column-major"), ("grad_y", "stride 0")]


def strided_inputs(operand: str, layout: str, dtype: torch.dtype = torch.float32):
    inputs = make_inputs((M,), K, N, R, dtype)
    grad_out = torch.randn(M, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    if operand == "grad_y":
        grad_out = LAYOUTS[layout](grad_out)
    else:
        inputs[operand] = LAYOUTS[layout](inputs[operand])
    view = inputs[operand] if operand != "grad_y" else grad_out
    assert not view.is_contiguous(), (operand, layout, view.stride())
    return inputs, grad_out


# fp32 with both reductions, fp16 (the other dtype the interpreter computes; bf16 runs on a GPU) with atomics.
MODES = [(torch.float32, False), (torch.float32, True), (torch.float16, False)]


@pytest.mark.parametrize("dtype, deterministic", MODES, ids=["fp32-atomics", "fp32-deterministic", "fp16-atomics"])
@pytest.mark.parametrize("operand, layout", CASES, ids=[f"{o}-{lay}" for o, lay in CASES])
def test_strided_operand_forward_and_gradients(operand, layout, dtype, deterministic, monkeypatch, kernel_calls):
    if deterministic:
        rk.configure(deterministic=True)
    inputs, grad_out = strided_inputs(operand, layout, dtype)
    contiguous = {name: None if t is None else t.contiguous() for name, t in inputs.items()}
    scale, p, seed = 0.7, 0.2, 99
    exact = run(reference.lora_linear, contiguous, scale, p, seed, grad_out.double(), dtype=torch.float64)
    torch_twin = run(reference.lora_linear, contiguous, scale, p, seed, grad_out.contiguous())
    for path, fn in (("kernels", rk.lora_linear), ("reference", reference.lora_linear)):
        y, grads = run(fn, inputs, scale, p, seed, grad_out)
        assert_within_torch_error(f"{path} y", y, exact[0], torch_twin[0])
        for name in GRAD_NAMES:
            assert_within_torch_error(f"{path} d{name}", grads[name], exact[1][name], torch_twin[1][name])
    assert kernel_calls == {"lora_forward": 1, "lora_backward": 1}


def poisoned_view(t: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, view): `view` holds t's values inside `base`, whose other elements are NaN (the merge and the reinit
    write views in place: what they must not touch stays NaN)."""
    if layout == "column-major":
        base = t.T.contiguous()
        return base, base.T
    base = torch.full((t.shape[0], 2 * t.shape[1]), float("nan"), dtype=t.dtype)
    base[:, 1::2] = t
    return base, base[:, 1::2]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("operand", ["weight", "lora_a", "lora_b"])
@pytest.mark.parametrize("layout", ["column-major", "every other column"])
def test_strided_merge_and_reinit(operand, layout, backend, monkeypatch):
    rk.configure(backend=backend)
    inputs = make_inputs((1,), K, N, R, torch.float32)
    tensors = {name: inputs[name] for name in ("weight", "lora_a", "lora_b")}
    base, tensors[operand] = poisoned_view(tensors[operand], layout)
    untouched = base.isnan()

    def restart_and_check(seed: int, label: str) -> None:
        before = {name: t.contiguous() for name, t in tensors.items()}
        merged = reference.merged_weight(before["weight"].double(), before["lora_a"].double(),
                                         before["lora_b"].double(), 0.5)
        torch_twin = reference.merged_weight(before["weight"], before["lora_a"], before["lora_b"], 0.5)
        rk.merge_and_reinit_(tensors["weight"], tensors["lora_a"], tensors["lora_b"], 0.5, seed=seed)
        assert_within_torch_error(label, tensors["weight"].contiguous(), merged, torch_twin)
        assert torch.equal(tensors["lora_a"], reference.reinit_uniform(seed, R, K))
        assert torch.equal(tensors["lora_b"], torch.zeros(N, R))
        assert base[untouched].isnan().all(), "an element outside the view was written"

    restart_and_check(21, "W")
    # The next restart of the same views (the launches bound by the first call, as a training run's later restarts
    # run them), after training has moved B.
    tensors["lora_b"].copy_(torch.randn(N, R, generator=torch.Generator().manual_seed(3)))
    restart_and_check(22, "W after the second restart")


@pytest.mark.parametrize("dtype, deterministic", MODES, ids=["fp32-atomics", "fp32-deterministic", "fp16-atomics"])
@pytest.mark.parametrize("operand, layout", CASES, ids=[f"{o}-{lay}" for o, lay in CASES])
def test_strided_operand_planned_call(operand, layout, dtype, deterministic, triton_backend, engine, monkeypatch):
    """A key's second call runs its plan, whose launches were bound once with the key's strides: on every strided
    operand it must give the first call's result (checked against the reference above) bit for bit, without running
    the passes in full."""
    if deterministic:
        rk.configure(deterministic=True)
    inputs, grad_out = strided_inputs(operand, layout, dtype)
    scale, p, seed = 0.7, 0.2, 99
    first = run(rk.lora_linear, inputs, scale, p, seed, grad_out)

    def unplanned(*args, **kwargs):
        raise AssertionError("a planned key ran the passes in full")

    monkeypatch.setattr(passes, "lora_forward", unplanned)
    monkeypatch.setattr(passes, "lora_backward", unplanned)
    second = run(rk.lora_linear, inputs, scale, p, seed, grad_out)
    assert torch.equal(first[0], second[0])
    for name in GRAD_NAMES:
        assert torch.equal(first[1][name], second[1][name]), name

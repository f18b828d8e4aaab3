"""LoRALinear(frozen_dtype="fp8"): the master W stays the saved Parameter, the FP8 copies are derived buffers that
are never saved and never stale (every path that changes W is tested, each failing if its refresh were removed),
torch.compile captures the layer whole, and nothing exported holds FP8 data. Every path that changes W is run with
the master W beside the copies and kept in CPU memory (master_device="cpu"), where each path refreshes through a copy
of W made on the compute device (tests/test_fp8_master.py has the rest of that option)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend

import relora_kernels as rk
from relora_kernels import reference
from relora_kernels.kernels.passes_fp8 import scaled_mm_support

_PROBLEM = scaled_mm_support("cpu", None, torch.float32)
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"no FP8 GEMM on the CPU here: {_PROBLEM}")

FP8_BUFFERS = ("weight_fp8", "weight_fp8_scale", "weight_t_fp8", "weight_t_fp8_scale")


def fp8_layer(seed=0, **kwargs) -> rk.LoRALinear:
    torch.manual_seed(seed)
    layer = rk.LoRALinear(40, 24, r=4, alpha=8, frozen_dtype="fp8", **kwargs)  # K, N not multiples of a block
    nn.init.normal_(layer.lora_B, std=0.2)  # nonzero B: a restart changes W
    return layer


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == reference.FP8_DTYPE else t


def assert_copies_are_of(layer: rk.LoRALinear, weight: torch.Tensor):
    """The layer's buffers, as they are now, are quantize_fp8_weight(weight) bit for bit."""
    want = reference.quantize_fp8_weight(weight)
    for name, expected in zip(FP8_BUFFERS, want, strict=True):
        got = layer._buffers[name]
        assert (got.dtype, got.shape, got.device) == (expected.dtype, expected.shape, expected.device), name
        assert torch.equal(bits(got), bits(expected)), f"{name} is stale"


def assert_forward_uses_fresh_copies(layer: rk.LoRALinear, x: torch.Tensor):
    """An eager forward computes with the copies of the current W: equal to the functional op on W's fresh copies."""
    want = rk.lora_linear_fp8(x, reference.quantize_fp8_weight(layer.weight), layer.lora_A, layer.lora_B, layer.scale,
                              layer.bias)
    assert torch.equal(layer(x), want), "the forward used stale FP8 copies"
    assert_copies_are_of(layer, layer.weight)


def changed_weight(layer):
    """A new W whose FP8 copies differ from the layer's current ones (so a stale copy is visible)."""
    new = layer.weight.detach() * 1.5 + 0.01
    assert not torch.equal(bits(reference.quantize_fp8_weight(new).q), bits(layer.weight_fp8))
    return new


X = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))


@pytest.fixture(params=[None, "cpu"], ids=["master-beside", "master-cpu"])
def master(request):
    """master_device of the layers a write-path test makes: each path must refresh the copies in both."""
    return request.param


def test_buffers_are_the_copies_of_w_and_never_saved(master):
    layer = fp8_layer(master_device=master)
    assert_copies_are_of(layer, layer.weight)
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]
    assert layer.weight.dtype == torch.float32 and not layer.weight.requires_grad
    # A checkpoint moves between the two kinds of layer in both directions (strict keys).
    plain = rk.LoRALinear(40, 24, r=4, alpha=8)
    plain.load_state_dict(layer.state_dict())
    layer2 = fp8_layer(seed=1, master_device=master)
    layer2.load_state_dict(plain.state_dict())
    assert_copies_are_of(layer2, plain.weight)


def test_restart_refreshes_although_the_kernel_bumps_no_version(master):
    rk.configure(backend="triton")  # the merge kernel (interpreted) writes W in place
    layer = fp8_layer(master_device=master)
    old_q, version = layer.weight_fp8.clone(), layer.weight._version
    want_w = reference.merged_weight(layer.weight, layer.lora_A, layer.lora_B, layer.scale).detach()
    layer.merge_and_reinit(seed=7)
    if master is None:
        assert layer.weight._version == version, "the kernel bumped the version: this test no longer tests the refresh"
    else:  # the kernel wrote W's copy on the compute device; the master took it by copy_
        assert layer.weight.device == torch.device("cpu") and layer.weight._version > version
    torch.testing.assert_close(layer.weight, want_w)  # merged (fp32, one rounding; the kernel's sum order)
    assert not torch.equal(bits(old_q), bits(layer.weight_fp8))
    assert_copies_are_of(layer, layer.weight)  # at once, before any forward
    rk.configure(backend="reference")
    assert_forward_uses_fresh_copies(layer, X)


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
def test_load_state_dict_refreshes_at_once(assign, master):
    layer = fp8_layer(master_device=master)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["weight"] = changed_weight(layer)
    layer.load_state_dict(state, assign=assign)
    assert_copies_are_of(layer, state["weight"])  # at once: a compiled forward next would not check
    assert_forward_uses_fresh_copies(layer, X)


def test_dtype_move_refreshes_at_once(master):
    layer = fp8_layer(master_device=master)
    layer.to(torch.float64)  # _apply would also have cast the FP8 copies to float64
    assert layer.weight.dtype == torch.float64
    assert_copies_are_of(layer, layer.weight)
    assert_forward_uses_fresh_copies(layer, X.double())
    layer.half()
    assert_copies_are_of(layer, layer.weight)


@pytest.mark.parametrize("write", ["copy_", "add_"])
def test_in_place_write_to_the_parameter_is_seen_by_the_next_forward(write, master):
    layer = fp8_layer(master_device=master)
    new = changed_weight(layer)
    with torch.no_grad():
        if write == "copy_":
            layer.weight.copy_(new)
        else:
            layer.weight.add_(new - layer.weight)
    assert_forward_uses_fresh_copies(layer, X)


def test_optimizer_step_on_an_unfrozen_weight_is_seen(master):
    layer = fp8_layer(master_device=master)
    layer.weight.requires_grad_(True)
    layer.weight.grad = torch.ones_like(layer.weight)
    torch.optim.SGD([layer.weight], lr=0.5).step()
    assert_forward_uses_fresh_copies(layer, X)


def test_data_assignment_is_seen_by_the_next_forward(master):
    layer = fp8_layer(master_device=master)
    layer.weight.data = changed_weight(layer)
    assert_forward_uses_fresh_copies(layer, X)
    # Twice in a row, the second onto the first's size: the first W's memory is kept by the stamp, so the
    # address comparison cannot be fooled by a reused address.
    first = layer.weight.data
    layer.weight.data = changed_weight(layer)
    layer.weight.data = changed_weight(layer)
    assert layer.weight.data_ptr() != first.data_ptr() or torch.equal(layer.weight, first)
    assert_forward_uses_fresh_copies(layer, X)


def test_new_parameter_is_seen_at_once_and_by_the_forward(master):
    layer = fp8_layer(master_device=master)
    layer.weight = nn.Parameter(changed_weight(layer), requires_grad=False)
    assert_copies_are_of(layer, layer.weight)
    # Bypassing __setattr__ (as torch's own conversions may): the forward's identity check sees it.
    layer._parameters["weight"] = nn.Parameter(changed_weight(layer), requires_grad=False)
    assert_forward_uses_fresh_copies(layer, X)


def test_writes_through_data_need_an_explicit_refresh(master):
    # .data shares W's memory but not its version counter: the one write no stamp sees (documented), and what
    # refresh_frozen_weight is for.
    layer = fp8_layer(master_device=master)
    old = layer.weight_fp8.clone()
    layer.weight.data.mul_(1.5)
    layer(X)
    assert torch.equal(bits(layer.weight_fp8), bits(old))
    layer.refresh_frozen_weight()
    assert_forward_uses_fresh_copies(layer, X)


def test_apply_lora_and_from_linear_take_frozen_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 16))
    base_weight = model[0].weight.detach().clone()
    rk.apply_lora(model, ["0"], r=2, frozen_dtype="fp8")
    assert isinstance(model[0], rk.LoRALinear) and model[0].frozen_dtype == "fp8"
    assert isinstance(model[2], nn.Linear)
    assert torch.equal(model[0].weight, base_weight)
    assert_copies_are_of(model[0], base_weight)
    model(torch.randn(3, 40))


@pytest.mark.parametrize("make", [
    lambda: rk.LoRALinear(8, 8, r=2, frozen_dtype="fp16"),
    lambda: rk.LoRALinear.from_linear(nn.Linear(8, 8), r=2, frozen_dtype=torch.float8_e4m3fn),
    lambda: rk.apply_lora(nn.Sequential(nn.Linear(8, 8)), ["0"], r=2, frozen_dtype="e4m3"),
])
def test_bad_frozen_dtype_is_refused_by_name(make):
    with pytest.raises(ValueError, match="frozen_dtype must be None"):
        make()


def test_exports_hold_the_master_weight_not_fp8(tmp_path, master):
    layer = fp8_layer(master_device=master)
    merged = layer.to_linear()
    assert merged.weight.dtype == torch.float32
    assert torch.equal(merged.weight, reference.merged_weight(layer.weight, layer.lora_A, layer.lora_B, layer.scale))
    model = nn.Sequential(fp8_layer(master_device=master))
    want = model[0].to_linear().weight
    rk.merge_lora(model)
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, want)
    assert all(t.dtype != reference.FP8_DTYPE for t in model.state_dict().values())
    adapted = nn.Sequential(fp8_layer(master_device=master))
    rk.save_peft_adapter(adapted, tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())


def test_restart_keeps_the_function_up_to_the_fp8_rounding(master):
    # The same layer with and without FP8 copies restarts to the same master W and factors.
    layer = fp8_layer(master_device=master)
    plain = rk.LoRALinear(40, 24, r=4, alpha=8)
    plain.load_state_dict(layer.state_dict())
    layer.merge_and_reinit(seed=3)
    plain.merge_and_reinit(seed=3)
    for name, p in plain.state_dict().items():
        assert torch.equal(layer.state_dict()[name], p), name
    assert_forward_uses_fresh_copies(layer, X)


@pytest.fixture
def compile_state():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_fp8_model_is_one_graph_and_gets_fresh_copies(compile_state):
    rk.configure(backend="triton")  # the interpreted kernels: opaque custom ops, captured whole
    torch.manual_seed(0)
    model = nn.Sequential(fp8_layer(), nn.GELU(), rk.LoRALinear(24, 19, r=1, bias=False, frozen_dtype="fp8"))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # fullgraph: any graph break raises
    x = torch.randn(4, 40)

    def output_and_grads(run):
        xi = x.clone().requires_grad_()
        y = run(xi)
        y.square().sum().backward()
        grads = {"x": xi.grad} | {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return y.detach(), grads

    def check():
        want_y, want_grads = output_and_grads(model)
        got_y, got_grads = output_and_grads(compiled)
        torch.testing.assert_close(got_y, want_y)
        assert got_grads.keys() == want_grads.keys()
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], msg=lambda m, n=name: f"grad {n}: {m}")
        return got_y

    before = check()
    model[0].merge_and_reinit(seed=5)  # refreshes at once: the compiled graph reads the new copies
    assert not torch.equal(check(), before)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    model[0].refresh_frozen_weight()  # compiled forwards do not check freshness: refreshed before one
    check()
    assert counter.frame_count == 1, f"{counter.frame_count} graphs: a graph break or a recompile"


def test_kernel_quantisation_of_the_copies_is_the_references_bit_for_bit(monkeypatch):
    # functional.quantize_fp8_weight on the kernels (the interpreter here): the quantising launch, once for W and
    # once for W.T, equal bit for bit to the reference's copies, on a strided W with rows over many magnitudes, a
    # zero row and a shape no block divides.
    from helpers import count_launches

    from relora_kernels import functional
    from relora_kernels.kernels import lora_linear

    rk.configure(backend="triton")
    calls = count_launches(monkeypatch, lora_linear, ("quantize_rows_fp8",))
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(37, 2 * 45, generator=g) * torch.logspace(-20, 20, 37)[:, None]
    wide[5] = 0.0
    weight = wide[:, ::2]
    got, want = functional.quantize_fp8_weight(weight), reference.quantize_fp8_weight(weight)
    assert calls == {"quantize_rows_fp8": 2}
    for name, a, b in zip(reference.FP8Weight._fields, got, want, strict=True):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        assert torch.equal(bits(a), bits(b)), name
    with pytest.raises(TypeError, match="weight must be a 2-D floating-point tensor"):
        functional.quantize_fp8_weight(weight[0])

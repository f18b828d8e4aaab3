"""LoRALinear(frozen_dtype="fp8", master_device="cpu"): the master W kept in CPU memory computes, restarts and saves
bit for bit as the same layer with W beside its copies (same seeds), through the ReLoRA controller too; W stays on
the CPU while the rest of the layer moves; the restart always merges into a copy of W on the compute device. The
copies' freshness after every path that writes W is checked in tests/test_fp8_layer.py (its `master` fixture)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from test_fp8_layer import FP8_BUFFERS, assert_copies_are_of, bits, fp8_layer

import relora_kernels as rk
from relora_kernels import modules, reference
from relora_kernels.kernels.passes_fp8 import scaled_mm_support

_PROBLEM = scaled_mm_support("cpu", None, torch.float32)
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"no FP8 GEMM on the CPU here: {_PROBLEM}")
CPU = torch.device("cpu")


def assert_same_tensors(got: dict, want: dict, what: str):
    assert got.keys() == want.keys(), what
    for name, expected in want.items():
        assert torch.equal(bits(got[name]), bits(expected)), f"{what}: {name} differs"


def forward_backward(layer: rk.LoRALinear, x: torch.Tensor) -> dict:
    x = x.clone().requires_grad_()
    y = layer(x)
    y.square().sum().backward()
    out = {"y": y.detach(), "dx": x.grad} | {f"d{n}": p.grad.clone() for n, p in layer.named_parameters()
                                            if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cpu_master_is_the_plain_fp8_layer_bit_for_bit(backend):
    rk.configure(backend=backend)  # triton: the interpreted kernels quantise, compute and merge
    beside, kept = fp8_layer(), fp8_layer(master_device="cpu")
    assert kept.master_device == CPU and kept.weight.device == CPU and not kept.weight.is_pinned()
    x = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(1))  # 3-D x, 21 tokens
    assert_same_tensors(forward_backward(kept, x), forward_backward(beside, x), "before the restart")
    beside.merge_and_reinit(seed=11)
    kept.merge_and_reinit(seed=11)
    assert_same_tensors(kept.state_dict(), beside.state_dict(), "state_dict after the restart")
    assert_same_tensors(dict(kept.named_buffers()), dict(beside.named_buffers()), "copies after the restart")
    assert_copies_are_of(kept, kept.weight)
    nn.init.normal_(beside.lora_B, std=0.2, generator=torch.Generator().manual_seed(2))
    nn.init.normal_(kept.lora_B, std=0.2, generator=torch.Generator().manual_seed(2))
    assert_same_tensors(forward_backward(kept, x), forward_backward(beside, x), "after the restart")


def test_a_relora_run_with_the_cpu_master_is_the_plain_runs_bit_for_bit():
    def run(master_device):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 16))
        rk.apply_lora(model, ["0", "2"], r=4, frozen_dtype="fp8", master_device=master_device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        relora = rk.ReLoRA(model, optimizer, restart_every=2, seed=5)
        g = torch.Generator().manual_seed(3)
        losses = []
        for step in range(1, 6):  # restarts after steps 2 and 4
            loss = model(torch.randn(6, 40, generator=g)).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            relora.step(step)
            losses.append(loss.detach())
        assert relora.restarts == 2
        return model, torch.stack(losses)

    beside, beside_losses = run(None)
    kept, kept_losses = run("cpu")
    assert torch.equal(kept_losses, beside_losses)
    assert_same_tensors(kept.state_dict(), beside.state_dict(), "state_dict after two restarts")
    for layer in (kept[0], kept[2]):
        assert layer.weight.device == CPU
        assert_copies_are_of(layer, layer.weight)


def test_the_restart_merges_into_a_copy_and_writes_it_back(monkeypatch):
    # Always a copy, also when the layer computes on the CPU: the path a GPU takes, run here.
    layer = fp8_layer(master_device="cpu")
    master, address = layer.weight, layer.weight.data_ptr()
    want = reference.merged_weight(master, layer.lora_A, layer.lora_B, layer.scale)
    merged_into = []
    real = modules.merge_and_reinit_

    def spy(weight, *args, **kwargs):
        merged_into.append(weight)
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(modules, "merge_and_reinit_", spy)
    layer.merge_and_reinit(seed=4)
    (weight,) = merged_into
    assert weight is not master and weight.untyped_storage().data_ptr() != master.untyped_storage().data_ptr()
    assert layer.weight is master and master.data_ptr() == address  # written in place: optimizers keep it
    assert torch.equal(master, weight) and torch.equal(master, want)
    assert_copies_are_of(layer, master)


def test_the_master_stays_on_the_cpu_while_the_layer_moves():
    # The meta device stands in for an accelerator here: everything but W goes there.
    layer = fp8_layer(master_device="cpu")
    w, alias = layer.weight.detach().clone(), layer.weight.detach()  # the alias keeps W's memory from reuse
    keys = list(layer.state_dict())
    layer.to("meta")
    assert layer.weight.device == CPU and layer.weight.data_ptr() == alias.data_ptr() and torch.equal(layer.weight, w)
    assert not layer.weight.is_pinned()  # no accelerator here to pin for
    moved = [layer.lora_A, layer.lora_B, layer.bias, *(layer._buffers[name] for name in FP8_BUFFERS)]
    assert all(t.is_meta for t in moved)
    assert list(layer.state_dict()) == keys  # W sat the move out but keeps its place
    assert layer.to_linear().weight.is_meta  # merged on the compute device
    layer.to(torch.float64)  # the dtype follows, on the CPU
    assert layer.weight.device == CPU and layer.weight.dtype == torch.float64


def test_a_layer_built_on_meta_gets_its_master_on_the_cpu():
    layer = rk.LoRALinear(40, 24, r=4, frozen_dtype="fp8", master_device="cpu", device="meta")
    assert layer.weight.device == CPU and layer.lora_A.is_meta and layer.weight_fp8.is_meta
    layer.to_empty(device="cpu")
    nn.init.normal_(layer.weight)
    layer.refresh_frozen_weight()  # an in-place init: the next eager forward would refresh too
    assert layer.weight.device == CPU and layer.lora_A.device == CPU
    assert_copies_are_of(layer, layer.weight)


def test_apply_lora_and_from_linear_take_master_device():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24), nn.GELU())
    base_weight = model[0].weight.detach().clone()
    rk.apply_lora(model, ["0"], r=2, frozen_dtype="fp8", master_device="cpu")
    assert model[0].master_device == CPU and torch.equal(model[0].weight, base_weight)
    assert "master_device=cpu" in repr(model[0])
    layer = rk.LoRALinear.from_linear(nn.Linear(8, 16), r=2, frozen_dtype="fp8", master_device=torch.device("cpu"))
    assert layer.master_device == CPU
    assert_copies_are_of(layer, layer.weight)


@pytest.mark.parametrize("make, message", [
    (lambda: rk.LoRALinear(8, 8, r=2, master_device="cpu"), "master_device='cpu' needs frozen_dtype='fp8'"),
    (lambda: rk.LoRALinear.from_linear(nn.Linear(8, 8), r=2, master_device="cpu"), "needs frozen_dtype='fp8'"),
    (lambda: rk.apply_lora(nn.Sequential(nn.Linear(8, 8)), ["0"], r=2, master_device="cpu"),
     "needs frozen_dtype='fp8'"),
    (lambda: rk.LoRALinear(8, 8, r=2, frozen_dtype="fp8", master_device="cuda"), "master_device must be None"),
    (lambda: rk.LoRALinear(8, 8, r=2, frozen_dtype="fp8", master_device=True), "master_device must be None"),
])
def test_bad_master_device_is_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_sharded_master_is_still_refused(monkeypatch):
    # FSDP2 with FP8 copies is not built: a DTensor master is refused by name, before any placement or copy.
    layer = fp8_layer(master_device="cpu")
    monkeypatch.setattr(modules, "is_dtensor", lambda t: t is layer.weight)
    with pytest.raises(TypeError, match="FSDP2-sharded"):
        layer.refresh_frozen_weight()


@pytest.mark.gpu
def test_on_a_gpu_only_the_copies_are_there_and_the_layer_is_the_same():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from relora_kernels import functional

    device, dtype = torch.device("cuda"), torch.bfloat16
    if (problem := functional._fp8_gpu_problem(torch.cuda.current_device())) is not None:
        pytest.skip(problem)
    rk.configure(backend="triton")

    def make(master_device):
        torch.manual_seed(0)
        layer = rk.LoRALinear(1024, 1536, r=16, frozen_dtype="fp8", master_device=master_device, dtype=dtype)
        nn.init.normal_(layer.lora_B, std=0.02)
        return layer.to(device)

    beside, kept = make(None), make("cpu")
    assert kept.weight.device == CPU and kept.weight.is_pinned() and kept.lora_A.device.type == "cuda"
    assert kept.weight_fp8.device.type == "cuda"
    x = torch.randn(4, 511, 1024, device=device, dtype=dtype)
    assert_same_tensors(forward_backward(kept, x), forward_backward(beside, x), "before the restart")
    beside.merge_and_reinit(seed=11)
    kept.merge_and_reinit(seed=11)
    # The master is complete on the host when merge_and_reinit returns: compared with no synchronisation first.
    assert torch.equal(kept.weight, beside.weight.cpu())
    assert_same_tensors({k: v.cpu() for k, v in kept.state_dict().items()},
                        {k: v.cpu() for k, v in beside.state_dict().items()}, "state_dict after the restart")
    assert_same_tensors(dict(kept.named_buffers()), dict(beside.named_buffers()), "copies after the restart")

"""What the kernel path must never do: crash under torch's TF32 switches, compute a dtype it does not support, copy
from the host (a stream sync) on every call, or launch on a device other than its tensors'."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import make_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import relora_kernels as rk
from relora_kernels import _settings as rk_settings
from relora_kernels import ops, reference
from relora_kernels.kernels import launch


@pytest.fixture
def restore_matmul_precision():
    """Put torch's fp32 matmul switches back as they were (the legacy flag and the new API share one state)."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision, torch.backends.fp32_precision
    yield matmul
    torch.backends.fp32_precision = saved[1]
    matmul.fp32_precision = saved[0]


@pytest.mark.parametrize("setting, precision", [
    (("new", "tf32"), "tf32"), (("new", "ieee"), "ieee"),
    (("legacy", True), "tf32"), (("legacy", False), "ieee"),
    (("global", "tf32"), "tf32"),  # torch.backends.fp32_precision, inherited by cuda.matmul
])
def test_fp32_follows_both_tf32_apis(setting, precision, restore_matmul_precision, kernel_calls):
    api, value = setting
    if api == "new":
        restore_matmul_precision.fp32_precision = value
    elif api == "legacy":
        restore_matmul_precision.allow_tf32 = value
    else:
        restore_matmul_precision.fp32_precision = "none"
        torch.backends.fp32_precision = value
    assert launch.dot_precision(torch.float32) == precision
    assert launch.dot_precision(torch.bfloat16) == "tf32"  # 16-bit inputs are exact in tf32 whatever the switch
    inputs = make_inputs((9,), 24, 20, 4, torch.float32)
    y = rk.lora_linear(inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"], bias=inputs["bias"])
    assert y.shape == (9, 20) and kernel_calls["lora_forward"] == 1


def test_float64_is_refused_by_the_kernels_and_computed_by_the_reference(triton_backend):
    inputs = make_inputs((9,), 24, 20, 4, torch.float64)
    args = (inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"])
    with pytest.raises(TypeError, match=r"x: the Triton kernels compute in float32, float16 or bfloat16, got "
                                        r"torch.float64.*RELORA_KERNELS_BACKEND=reference"):
        rk.lora_linear(*args)
    weight = inputs["weight"].clone()
    with pytest.raises(TypeError, match="weight: the Triton kernels"):
        rk.merge_and_reinit_(weight, inputs["lora_a"], inputs["lora_b"], 1.0, seed=0)
    assert torch.equal(weight, inputs["weight"])  # refused before anything was written
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rk_settings, "_current", rk.Settings(backend="reference"))
        assert torch.equal(rk.lora_linear(*args), reference.lora_linear(*args))


class HostCopies(TorchDispatchMode):
    """Records the ATen ops that make a tensor from host data or read one back to the host: on a GPU each is a
    copy that synchronises the stream."""

    SYNCING = {"aten.lift_fresh.default", "aten._local_scalar_dense.default"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.SYNCING:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("seed", [1234, None])
def test_a_training_step_copies_nothing_from_or_to_the_host(seed, kernel_calls):
    # An int seed once became torch.tensor(seed, device=x.device) on every call: a host-to-device copy and a sync.
    inputs = make_inputs((9,), 24, 20, 4, torch.float32)
    leaves = {name: t.clone().requires_grad_(name != "weight") for name, t in inputs.items()}
    with HostCopies() as mode:
        y = rk.lora_linear(leaves["x"], leaves["weight"], leaves["lora_a"], leaves["lora_b"], 0.5, leaves["bias"],
                           0.1, seed)
        y.square().sum().backward()
    assert mode.seen == [] and kernel_calls["lora_backward"] == 1


def test_launches_run_on_their_tensors_device(monkeypatch):
    # CPU torch cannot make CUDA tensors: a stand-in says it is on cuda:1, and torch.cuda.device records what was
    # made current around the launch.
    entered, launched = [], []

    @contextlib.contextmanager
    def device(which):
        entered.append(which)
        yield
        entered.append("left")

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    class OnGpu:  # what the guard reads of a CUDA tensor
        is_cuda = True

        def __init__(self, index):
            self.device = torch.device("cuda", index)

        def get_device(self):
            return self.device.index

    guarded = launch.on_tensors_device(lambda first, *args: launched.append(list(entered)))
    guarded(OnGpu(1), 2)
    assert launched == [[torch.device("cuda", 1)]] and entered[-1] == "left"
    entered.clear()
    guarded(OnGpu(0), 2)  # already the current device: no switch (it costs the host a few microseconds)
    assert entered == [] and launched[-1] == []
    guarded(torch.zeros(1), 2)  # a CPU tensor (the interpreter) makes no CUDA device current
    assert entered == []
    # Every registered launcher is guarded so.
    guard_code = launch.on_tensors_device(lambda first: None).__code__
    for name, (launcher, _, _) in ops._LAUNCHERS.items():
        assert launcher.__code__ is guard_code and callable(launcher.__wrapped__), name

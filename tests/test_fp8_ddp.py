"""DistributedDataParallel and the FP8 copies: DDP must not broadcast them (derived data; gloo has no float8 type).
The two-process run with W differing by rank is the example's torchrun test (tests/test_pretrain_example.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import relora_kernels as rk
from relora_kernels.kernels.passes_fp8 import scaled_mm_support

_PROBLEM = scaled_mm_support("cpu", None, torch.float32)
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")

COPIES = ("weight_fp8", "weight_fp8_scale", "weight_t_fp8", "weight_t_fp8_scale")


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def lora_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 8)))
    return rk.apply_lora(model, ["0", "2.0"], r=2, frozen_dtype="fp8")


def test_apply_lora_names_every_copy_for_ddp_once():
    model = lora_model()
    want = [f"{layer}.{name}" for layer in ("0", "2.0") for name in COPIES]
    assert model._ddp_params_and_buffers_to_ignore == want
    model._ddp_params_and_buffers_to_ignore.insert(0, "kept")  # what others asked DDP to ignore stays
    assert rk.ddp_skip_fp8_copies(model)._ddp_params_and_buffers_to_ignore == ["kept", *want]
    plain = rk.apply_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], r=1)
    assert not hasattr(plain, "_ddp_params_and_buffers_to_ignore")  # no copies, nothing to skip


@pytest.mark.skipif(_PROBLEM is not None, reason=f"no FP8 GEMM on the CPU here: {_PROBLEM}")
def test_ddp_wraps_an_fp8_model_and_its_parent_once_told(one_rank_group):
    model = lora_model()
    x = torch.randn(4, 16)
    want = model(x)
    wrapped = nn.parallel.DistributedDataParallel(model)  # apply_lora's own model: told already
    assert torch.equal(wrapped(x), want)
    parent = nn.Sequential(model)
    with pytest.raises(RuntimeError, match="Invalid scalar type"):  # gloo cannot broadcast float8
        nn.parallel.DistributedDataParallel(parent)
    wrapped = nn.parallel.DistributedDataParallel(rk.ddp_skip_fp8_copies(parent))
    assert torch.equal(wrapped(x), want)

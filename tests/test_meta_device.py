"""Meta-device tensors (shape inference without memory) through lora_linear and LoRALinear, autocast on or off."""

from __future__ import annotations

import pytest
import torch

import relora_kernels as rk


@pytest.mark.parametrize("autocast", [False, True])
def test_meta_tensors_infer_shapes(autocast):
    # autocast's device query has no "meta" type: it raised "unknown device type for autocast" before anything ran.
    layer = rk.LoRALinear(8, 4, r=2, dropout=0.1, device="meta")
    x = torch.empty(3, 5, 8, device="meta", requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
        z = rk.lora_linear(x, layer.weight, layer.lora_A, layer.lora_B)
    assert y.shape == z.shape == (3, 5, 4) and y.device.type == z.device.type == "meta"
    y.sum().backward()
    assert layer.lora_A.grad.shape == (2, 8) and x.grad.shape == (3, 5, 8) and x.grad.device.type == "meta"

"""CUDA graphs: torch.compile(mode="reduce-overhead") of LoRALinear layers captures the kernels (marker `gpu`).

Eagerly the op is launched from Python on every call; under reduce-overhead the compiled graph, the Triton launches
and the dropout seed's draw included, is recorded once into a CUDA graph and replayed, so the host cost of a step
no longer grows with the number of layers. A skipped capture (a CPU tensor, a data-dependent branch, a mutated
input) would be counted by Inductor, and is what this test refuses.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import relora_kernels as rk

gpu = pytest.mark.gpu


def _model(dropout: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(rk.LoRALinear(256, 512, r=16, dropout=dropout), nn.GELU(),
                          rk.LoRALinear(512, 256, r=16, dropout=dropout))
    for layer in model:
        if isinstance(layer, rk.LoRALinear):
            nn.init.normal_(layer.lora_B, std=0.02)  # as after some training: the LoRA term is not zero
    return model.cuda().to(torch.bfloat16)


def _step(model, x):
    y = model(x)
    y.float().square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


@gpu
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_reduce_overhead_captures_the_kernels_and_matches_eager(dropout):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _model(dropout).train()
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        compiled_y, compiled_grads = _step(compiled, x)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert torch.isfinite(compiled_y.float()).all()
    if dropout == 0.0:
        # Without dropout both run the same kernels on the same inputs: equal up to bf16 rounding of the outputs
        # (Inductor may round the GELU between the layers differently): within 4 bf16 units of the largest value.
        eager_y, eager_grads = _step(model, x)
        for got, want in zip((compiled_y, *compiled_grads), (eager_y, *eager_grads), strict=True):
            bound = 4 * torch.finfo(torch.bfloat16).eps * want.float().abs().max().item()
            assert (got.float() - want.float()).abs().max().item() <= bound

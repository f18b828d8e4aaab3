"""Run by tests/test_relora_controller.py under `torchrun --nproc_per_node=2` (gloo): ReLoRA with torch's
ZeroRedundancyOptimizer (AdamW inside), whose own `.state` is empty and whose inner `.optim` holds the state of the
parameters each rank owns. Both ranks train on the same batches, so they hold the same model throughout.

Rank 0 writes OUT_DIR/results.json: for every rank, the state of each LoRA factor it owns just before and just
after the restart, and a checksum of every parameter after one more step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.optim import ZeroRedundancyOptimizer

import relora_kernels as rk
from relora_kernels.relora import ReLoRA

RESTART_EVERY, PRUNE_RATIO = 2, 0.75


def lora_state(model, inner) -> dict:
    return {f"{name}.{factor}": {key: inner.state[getattr(layer, factor)][key].tolist()
                                 for key in ("exp_avg", "exp_avg_sq")}
            for name, layer in model.named_modules() if isinstance(layer, rk.LoRALinear)
            for factor in ("lora_A", "lora_B") if inner.state.get(getattr(layer, factor))}


def main(out_dir: Path) -> int:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    rk.apply_lora(model, ["0", "2"], r=4)
    optimizer = ZeroRedundancyOptimizer([p for p in model.parameters() if p.requires_grad],
                                        optimizer_class=torch.optim.AdamW, lr=1e-2)
    relora = ReLoRA(model, optimizer, restart_every=RESTART_EVERY, prune_ratio=PRUNE_RATIO, seed=3)
    record = {}
    for step in (1, 2, 3):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))  # the same batch on both ranks
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        if step == RESTART_EVERY:
            record["before"] = lora_state(model, optimizer.optim)
        record[f"restarted_{step}"] = relora.step(step)
        if step == RESTART_EVERY:
            record["after"] = lora_state(model, optimizer.optim)
    record["checksum"] = [float(p.detach().double().sum()) for p in model.parameters()]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, record)
    if dist.get_rank() == 0:
        (out_dir / "results.json").write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main(Path(sys.argv[1]))
    # Without interpreter shutdown, as the other distributed workers: a gloo worker thread freeing a finished
    # collective during shutdown can abort the process (pytorch issue #190489). results.json is closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

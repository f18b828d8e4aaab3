"""Worker of tests/test_fsdp_fp8.py: `torchrun --nproc_per_node=WORLD tests/fsdp_fp8_worker.py OUT_DIR
[--compiled]` on CPU with gloo, for a model of LoRALinear(frozen_dtype="fp8") layers whose W is sharded by
fsdp_shard_fp8_weights and left out of fully_shard (ignored_params). Rank 0 writes OUT_DIR/results_WORLD.json:

  runs       on the reference backend, and when TRITON_INTERPRET=1 on the kernels with each engine of the
             frozen GEMMs ("triton": the FP8 Triton GEMM, "cublas": torch._scaled_mm composed): at the start,
             after every ReLoRA restart and after a torch.distributed.checkpoint save and load into a fresh
             sharded model, each layer's gathered FP8 copies against reference.quantize_fp8_weight of the whole W
             (bit for bit) and the rows of the copies each rank holds; the sharded model's output against a
             one-process FP8 model holding the same state (bit for bit: the same GEMMs on the same rows); every
             step's losses and input gradients against that model's from the same state, the reduced gradients of
             the factors beside its sum of the shares', and the all-gathers of each pass; the quantising launches
  errors     what fully_shard says to an FP8 layer fsdp_shard_fp8_weights has not sharded first
  compiled   with --compiled, on the kernels with each engine: every FP8 layer of a sharded model compiled
             (fullgraph), one step against the same model eager: loss, input gradient and reduced gradients equal,
             per name (each rank's first compile costs ~10 s of CPU)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from helpers import finish_gloo_worker
from torch.distributed.fsdp import fully_shard

import relora_kernels as rk
from relora_kernels import reference
from relora_kernels.kernels import lora_linear as kernels
from relora_kernels.kernels import passes_fp8
from relora_kernels.relora import ReLoRA

LOCAL_BATCH = 4
IN_FEATURES = 6
STEPS = {"reference": 6, "triton": 4}
RESTART_EVERY = 2
SEED = 11
QUANTIZE_CALLS = {"whole": 0, "given_amax": 0, "scaled_mm": 0}  # the last: cuBLAS-composed frozen GEMMs
GATHERS = {"count": 0}  # all-gathers of a piece of the copies (distributed._all_gather_blocks)


class Model(nn.Module):
    """Row counts that split unevenly: 7 rows are 4 + 3 on 2 ranks, 2 + 2 + 2 + 1 on 4; the head's 3 rows leave
    the 4th of 4 ranks none."""

    def __init__(self):
        super().__init__()
        self.up = rk.LoRALinear(IN_FEATURES, 7, r=4, alpha=8, frozen_dtype="fp8")
        self.head = rk.LoRALinear(7, 3, r=2, bias=False, frozen_dtype="fp8")

    def forward(self, x):
        return self.head(torch.tanh(self.up(x)))


def build_model(seed: int = 0) -> Model:
    torch.manual_seed(seed)
    model = Model()
    with torch.no_grad():  # B != 0 from the start, so that the first restart merges something
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.5)
    return model


def lora_layers(model) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, rk.LoRALinear)}


def shard(model: Model) -> Model:
    ignored = rk.fsdp_shard_fp8_weights(model)
    fully_shard(model.up, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return model


def count_calls() -> None:
    launcher = kernels.quantize_rows_fp8
    gather = rk.distributed._all_gather_blocks

    def counted(t, amax=None):
        QUANTIZE_CALLS["whole" if amax is None else "given_amax"] += 1
        return launcher(t, amax)

    def counted_gather(*args):
        GATHERS["count"] += 1
        return gather(*args)

    scaled_mm = passes_fp8.scaled_mm

    def counted_scaled_mm(*args, **kwargs):
        QUANTIZE_CALLS["scaled_mm"] += 1
        return scaled_mm(*args, **kwargs)

    kernels.quantize_rows_fp8 = counted
    rk.distributed._all_gather_blocks = counted_gather
    passes_fp8.scaled_mm = counted_scaled_mm


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t.view(torch.int32)


def copies_check(model) -> dict:
    """Per layer: the gathered copies equal to the whole W's quantisation, and this rank's rows of them (all ranks'
    answers gathered, so a wrong rank is seen)."""
    mine = {}
    for name, layer in lora_layers(model).items():
        whole = reference.quantize_fp8_weight(layer.weight.full_tensor())
        gathered = layer.frozen_weight_fp8()
        equal = [bool(torch.equal(bits(g), bits(w))) for g, w in zip(gathered, whole, strict=True)]
        mine[name] = {"equal": equal, "local_rows": layer.weight_fp8.shape[0],
                      "local_t_columns": layer.weight_t_fp8.shape[1]}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {name: {"equal": [all(r[name]["equal"][i] for r in everyone) for i in range(4)],
                   "local_rows": [r[name]["local_rows"] for r in everyone],
                   "local_t_columns": [r[name]["local_t_columns"] for r in everyone]} for name in mine}


def as_list(t: torch.Tensor):
    return t.detach().double().tolist()  # fp32 -> float64 -> JSON's repr of it: exact


@torch.no_grad()
def sync_state(single, model) -> None:
    """Give the one-process model the sharded model's state (gathered; W's copy_ bumps its version: re-quantised)."""
    for name, p in model.named_parameters():
        single.get_parameter(name).copy_(rk.distributed.full_tensor(p.detach()))


def same_output_as_one_process(model, x_local: torch.Tensor) -> bool:
    """The sharded model's output on this rank's rows, against a one-process FP8 model given the same state."""
    single = build_model(seed=1)
    sync_state(single, model)
    with torch.no_grad():
        sharded_out = model(x_local)
        single_out = single(x_local)
    same = torch.tensor(float(torch.equal(sharded_out, single_out)))
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


# A run's name: (backend, engine of the frozen GEMMs)
RUNS = {"reference": ("reference", "auto"), "triton": ("triton", "triton"), "cublas": ("triton", "cublas")}


def train(run: str, rank: int, world: int, out_dir: Path) -> dict:
    backend, engine = RUNS[run]
    rk.configure(backend=backend, engine=engine)
    g = torch.Generator().manual_seed(1)
    steps = STEPS[backend]
    xs = torch.randn(steps + 1, world * LOCAL_BATCH, IN_FEATURES, generator=g)
    ys = torch.randn(steps, world * LOCAL_BATCH, 3, generator=g)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    QUANTIZE_CALLS.update(whole=0, given_amax=0, scaled_mm=0)

    model = shard(build_model())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2, foreach=False)
    relora = ReLoRA(model, optimizer, restart_every=RESTART_EVERY, prune_method="zero", seed=SEED)
    # The one-process model beside it (every rank runs it; it is tiny) is given the sharded model's state before
    # every step and computes each rank's share of the global batch, its loss divided by the world size as FSDP2's
    # averaging divides the gradients: the ranks' operations on the ranks' shapes, so each rank's loss and input
    # gradient (which FSDP2 does not reduce: dx runs through the gathered W.T copy) equal its share's to the bit.
    # The reduced gradients of A, B and the bias sum the shares' in another order on more than 2 ranks: recorded
    # with the shares' magnitudes, for a bound.
    single = build_model(seed=1)
    out = {"checks": [["start", copies_check(model)]], "losses": [], "single_losses": [], "dx_equal": [],
           "grads": [], "restarts": [], "gathers_per_step": []}
    for step in range(1, steps + 1):
        sync_state(single, model)
        x = xs[step - 1][rows].clone().requires_grad_(True)
        GATHERS["count"] = 0
        loss = F.mse_loss(model(x), ys[step - 1][rows])
        out["gathers_per_step"].append([GATHERS["count"]])
        loss.backward()
        out["gathers_per_step"][-1].append(GATHERS["count"])
        each = [None] * world
        dist.all_gather_object(each, loss.item())
        out["losses"].append(each)

        trainable = {name: p for name, p in single.named_parameters() if p.requires_grad}
        summed = {name: torch.zeros_like(p) for name, p in trainable.items()}
        magnitude = {name: torch.zeros_like(p) for name, p in trainable.items()}
        single_each, dx_share = [], None
        for k in range(world):
            share = slice(k * LOCAL_BATCH, (k + 1) * LOCAL_BATCH)
            x_share = xs[step - 1][share].clone().requires_grad_(True)
            part = F.mse_loss(single(x_share), ys[step - 1][share])
            grads = torch.autograd.grad(part / world, [x_share, *trainable.values()])
            single_each.append(part.item())
            dx_share = grads[0] * world if k == rank else dx_share  # the rank's own loss was not divided
            for name, g in zip(trainable, grads[1:], strict=True):
                summed[name] += g
                magnitude[name] += g.abs()
        out["single_losses"].append(single_each)
        dx_equal = torch.tensor(float(torch.equal(x.grad, dx_share)))
        dist.all_reduce(dx_equal, op=dist.ReduceOp.MIN)
        out["dx_equal"].append(bool(dx_equal.item()))
        out["grads"].append({name: {"sharded": as_list(model.get_parameter(name).grad.full_tensor()),
                                    "single": as_list(summed[name]), "magnitude": as_list(magnitude[name])}
                             for name in trainable})
        optimizer.step()
        optimizer.zero_grad()
        if relora.step(step):
            out["restarts"].append(step)
            out["checks"].append([f"restart at step {step}", copies_check(model)])
    out["same_output"] = same_output_as_one_process(model, xs[-1][rows])

    checkpoint = out_dir / f"checkpoint_{run}_{world}"
    dcp.save(model.state_dict(), checkpoint_id=checkpoint)
    loaded = shard(build_model(seed=2))
    state = loaded.state_dict()
    dcp.load(state, checkpoint_id=checkpoint)
    loaded.load_state_dict(state)
    out["checks"].append(["loaded from a checkpoint", copies_check(loaded)])
    with torch.no_grad():
        same = torch.tensor(float(torch.equal(loaded(xs[-1][rows]), model(xs[-1][rows]))))
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    out["loaded_same_output"] = bool(same.item())
    out["quantize_calls"] = dict(QUANTIZE_CALLS)
    return out


def compiled_check(run: str, rank: int, world: int) -> dict:
    """Each FP8 layer of a sharded model compiled whole (fullgraph: the gathers traced as functional collectives),
    one step against the same model eager from the same state and input: loss, input gradient and every reduced
    gradient, bit for bit (the interpreted kernels are opaque ops, the gathers move bytes)."""
    backend, engine = RUNS[run]
    rk.configure(backend=backend, engine=engine)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(world * LOCAL_BATCH, IN_FEATURES, generator=g)[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]
    target = torch.randn(LOCAL_BATCH, 3, generator=g)
    eager, compiled = shard(build_model()), shard(build_model())
    for layer in lora_layers(compiled).values():
        layer.compile(fullgraph=True)
    results = []
    for model in (eager, compiled):
        xi = x.clone().requires_grad_(True)
        loss = F.mse_loss(model(xi), target)
        loss.backward()
        results.append((loss.detach(), xi.grad, {name: p.grad.full_tensor() for name, p in model.named_parameters()
                                                 if p.requires_grad}))
    (loss_e, dx_e, grads_e), (loss_c, dx_c, grads_c) = results
    same = {"loss": torch.equal(loss_e, loss_c), "dx": torch.equal(dx_e, dx_c)}
    same |= {name: torch.equal(grads_e[name], grads_c[name]) for name in grads_e}
    everyone = [None] * world
    dist.all_gather_object(everyone, same)
    return {key: all(r[key] for r in everyone) for key in same}


def error_checks() -> dict:
    """fully_shard on FP8 layers whose W fsdp_shard_fp8_weights has not sharded: FSDP2 would all-gather W in its
    dtype at every step, which the layer refuses by name as FSDP2 puts its DTensor in."""
    rk.configure(backend="reference", engine="auto")
    try:
        fully_shard(build_model())
        return {"fully_shard_first": "no error"}
    except TypeError as error:
        return {"fully_shard_first": str(error)}


def main() -> None:
    out_dir, compiled = Path(sys.argv[1]), sys.argv[2:] == ["--compiled"]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    count_calls()
    runs = ["reference"] + (["triton", "cublas"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    # The cuBLAS-composed engine needs torch._scaled_mm with row-wise scales on the CPU (torch 2.13, not 2.11).
    without = passes_fp8.scaled_mm_support("cpu", None, torch.float32)
    if without is not None:
        runs.remove("cublas")
    results = {"world": world, "runs": {run: train(run, rank, world, out_dir) for run in runs},
               "not_run": {"cublas": without} if without is not None else {}, "errors": error_checks()}
    # Each rank compiles into a cache of its own: ranks sharing one can load a library another is still writing.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(out_dir / f"inductor_cache_{rank}")
    results["compiled"] = {run: compiled_check(run, rank, world) for run in runs if run != "reference" and compiled}
    finish_gloo_worker(results, out_dir / f"results_{world}.json", rank)


if __name__ == "__main__":
    main()

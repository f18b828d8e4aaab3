"""Worker of tests/test_fsdp.py: `torchrun --nproc_per_node=2 tests/fsdp_worker.py OUT_DIR` on CPU with gloo.

One launch computes everything test_fsdp.py checks and rank 0 writes it to OUT_DIR/results.json:

  runs       for each backend ("reference", and "triton" when TRITON_INTERPRET=1): a model of LoRALinear layers
             under fully_shard trained with ReLoRA restarts, next to the same model trained in one process on the
             same global batches (rank 0 runs both); per-step losses, the gathered state before and after every
             restart, the collectives each restart issued, the restart ops' call counts
  pruning    prune_optimizer_state_ on DTensor Adam state whose two shards differ in scale
  api        what merge_and_reinit_, merge_lora, to_linear and save_peft_adapter do on the sharded model

The one-process run is the data-parallel equivalent: each step accumulates the gradients of the two ranks' halves
of the global batch, each half's loss halved, so it performs the same operations on the same shapes as the ranks
(FSDP2's reduce-scatter averages g0 and g1: (g0 + g1) / 2, the same sum exactly).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from helpers import finish_gloo_worker
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

import relora_kernels as rk
from relora_kernels.distributed import merge_and_reinit_sharded_
from relora_kernels.relora import ReLoRA, prune_optimizer_state_

WORLD = 2
LOCAL_BATCH = 4
IN_FEATURES = 6
STEPS = {"reference": 8, "triton": 4}
RESTART_EVERY = {"reference": 3, "triton": 2}
SEED = 11
# Calls of the kernels' ops, counted by name (wrapped once in main): the reference backend must call none.
OP_CALLS: dict[str, int] = {}
# Each op's name, and where functional.py's eager path reaches its kernels: the forward pass (planned or not) and
# the merge's two launches (which the registered ops reach too).
COUNTED_OPS = {"lora_forward": ("passes", "eager_forward"), "merge_lora_weight_": ("merge", "_merge"),
               "reinit_lora_": ("merge", "_reinit")}


class Block(nn.Module):
    """A block holding two LoRALinear layers, sharded as one FSDP2 unit."""

    def __init__(self):
        super().__init__()
        # 7 rows split 4 + 3; r = 4 with alpha 8 (scale 2) splits A 2 + 2.
        self.up = rk.LoRALinear(IN_FEATURES, 7, r=4, alpha=8)
        # r = 1: rank 1 holds no row of A.
        self.mid = rk.LoRALinear(7, 5, r=1)

    def forward(self, x):
        return self.mid(torch.tanh(self.up(x)))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        # One output row: rank 1 holds no row of its W, B or bias.
        self.head = rk.LoRALinear(5, 1, r=2)

    def forward(self, x):
        return self.head(torch.tanh(self.block(x)))


def build_model() -> Model:
    torch.manual_seed(0)
    model = Model()
    with torch.no_grad():  # B != 0 from the start, so that the first restart merges something
        for layer in model.modules():
            if isinstance(layer, rk.LoRALinear):
                layer.lora_B.normal_(0.0, 0.5)
    return model


def make_optimizer(model):
    # foreach=False on both sides: one Adam implementation, elementwise on the shards as on the whole tensors.
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2, foreach=False)


def as_list(t: torch.Tensor):
    return t.detach().double().tolist()  # fp32 -> float64 -> JSON's repr of it: exact


def gathered_state(model) -> dict:
    """Every parameter in full (a collective when they are DTensors)."""
    return {name: as_list(rk.distributed.full_tensor(p.detach())) for name, p in model.named_parameters()}


def lora_layers(model) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, rk.LoRALinear)}


def count_ops() -> None:
    # What functional.py calls eagerly (the registered ops are what torch.compile sees); ops registers its
    # launchers first, as the originals.
    from relora_kernels import ops  # noqa: F401
    from relora_kernels.kernels import merge, passes

    modules = {"merge": merge, "passes": passes}
    for name, (module_name, attribute) in COUNTED_OPS.items():
        module = modules[module_name]
        launcher = getattr(module, attribute)

        def counted(*args, _launcher=launcher, _name=name, **kwargs):
            OP_CALLS[_name] = OP_CALLS.get(_name, 0) + 1
            return _launcher(*args, **kwargs)

        setattr(module, attribute, counted)


class Collectives(TorchDispatchMode):
    """Logs every collective the ranks run (name and input shapes), as DTensor issues them."""

    def __init__(self):
        super().__init__()
        self.log = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor turn its op into plain ops and collectives, which come back here
        name = str(func.overloadpacket)
        if "c10d" in name and not name.endswith(("wait_tensor", "_wrap_tensor_autograd")):
            self.log.append([name, [list(a.shape) for a in args if isinstance(a, torch.Tensor)]])
        return func(*args, **(kwargs or {}))


def counting(fn, *args):
    """fn(*args) and the kernels' ops it called."""
    OP_CALLS.clear()
    result = fn(*args)
    return result, dict(OP_CALLS)


def train(backend: str, rank: int):
    """The sharded run on every rank and, on rank 0, the single-process run beside it, step by step."""
    rk.configure(backend=backend)
    steps, restart_every = STEPS[backend], RESTART_EVERY[backend]
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(steps, WORLD * LOCAL_BATCH, IN_FEATURES, generator=g)
    ys = torch.randn(steps, WORLD * LOCAL_BATCH, 1, generator=g)

    model = build_model()
    fully_shard(model.block)
    fully_shard(model.head)
    fully_shard(model)
    optimizer = make_optimizer(model)
    local_shapes = {name: list(p.to_local().shape) for name, p in model.named_parameters()}
    relora = ReLoRA(model, optimizer, restart_every=restart_every, prune_method="zero", seed=SEED)
    single = build_model()  # built on every rank (it is tiny), trained on rank 0
    single_optimizer = make_optimizer(single)
    single_relora = ReLoRA(single, single_optimizer, restart_every=restart_every, prune_method="zero", seed=SEED)

    def sharded_step(x, y):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        loss = F.mse_loss(model(x[rows]), y[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        return (total / WORLD).item()

    def single_step(x, y):
        halves = []
        for k in range(WORLD):  # rank k's rows, its loss halved as FSDP2's averaging halves its gradient
            rows = slice(k * LOCAL_BATCH, (k + 1) * LOCAL_BATCH)
            half = F.mse_loss(single(x[rows]), y[rows])
            (half / WORLD).backward()
            halves.append(half.detach())
        single_optimizer.step()
        single_optimizer.zero_grad()
        return ((halves[0] + halves[1]) / WORLD).item()

    out = {"losses": [], "single_losses": [], "restarts": [], "step_calls": [], "single_step_calls": [],
           "local_shapes": local_shapes}
    for step in range(1, steps + 1):
        x, y = xs[step - 1], ys[step - 1]
        loss, calls = counting(sharded_step, x, y)
        out["losses"].append(loss)
        out["step_calls"].append(calls)
        if rank == 0:
            loss, calls = counting(single_step, x, y)
            out["single_losses"].append(loss)
            out["single_step_calls"].append(calls)
        if step % restart_every:
            continue
        record = {"step": step, "fsdp_before": gathered_state(model)}
        with Collectives() as collectives:
            record["restarted"], record["calls"] = counting(relora.step, step)
        record["collectives"] = collectives.log
        record["fsdp_after"] = gathered_state(model)
        if rank == 0:
            record["single_before"] = gathered_state(single)
            record["single_restarted"], record["single_calls"] = counting(single_relora.step, step)
            record["single_after"] = gathered_state(single)
            # The single run goes on from the sharded run's merged W (the test bounds their difference), so that
            # every later step compares the two from one state.
            with torch.no_grad():
                for name, layer in lora_layers(single).items():
                    layer.weight.copy_(torch.tensor(record["fsdp_after"][f"{name}.weight"]))
        out["restarts"].append(record)
    out["fsdp_final"] = gathered_state(model)
    out["single_final"] = gathered_state(single)
    return out, model, single, relora


def api_checks(model, single, relora, out_dir: Path, rank: int) -> dict:
    """The sharded model through the package's other entry points, next to the single-process model."""
    result = {}
    model.block.unshard()  # the block's layers now hold the all-gathered, plain parameters
    before = gathered_state(model)
    try:
        relora.step(relora.restart_every)
        result["unsharded_restart"] = "returned"
    except RuntimeError as error:
        result["unsharded_restart"] = str(error)
    model.block.reshard()
    result["unsharded_restart_changed_nothing"] = gathered_state(model) == before
    layer = model.block.up
    try:
        rk.merge_and_reinit_(layer.weight, layer.lora_A, layer.lora_B, layer.scale, seed=0)
        result["merge_and_reinit_"] = "returned"
    except TypeError as error:
        result["merge_and_reinit_"] = str(error)
    try:
        layer.merge_and_reinit()
        result["merge_and_reinit_no_seed"] = "returned"
    except ValueError as error:
        result["merge_and_reinit_no_seed"] = str(error)
    mesh = init_device_mesh("cpu", (WORLD,))
    replicated_b = distribute_tensor(torch.zeros(7, 4), mesh, [Replicate()])
    try:
        merge_and_reinit_sharded_(layer.weight, layer.lora_A, replicated_b, layer.scale, seed=0)
        result["mismatched_placements"] = "returned"
    except ValueError as error:
        result["mismatched_placements"] = str(error)
    try:
        rk.merge_lora(model)
        result["merge_lora"] = "returned"
    except TypeError as error:
        result["merge_lora"] = str(error)
    result["to_linear"] = {}
    for name, sharded_layer in lora_layers(model).items():
        linear = sharded_layer.to_linear()
        reference = single.get_submodule(name).to_linear()
        result["to_linear"][name] = {"fsdp": as_list(linear.weight), "single": as_list(reference.weight),
                                     "fsdp_bias": as_list(linear.bias), "single_bias": as_list(reference.bias)}
    rk.save_peft_adapter(model, out_dir / f"adapter_fsdp_{rank}")
    if rank == 0:
        rk.save_peft_adapter(single, out_dir / "adapter_single")
    return result


def pruning_checks(rank: int) -> dict:
    """prune_optimizer_state_ on Adam state sharded like FSDP2's: rows split 4 + 3, rank 0's rows 100x larger."""
    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(2)
    full = torch.randn(7, 5, generator=g)
    full[:4] *= 100.0
    result = {"full": as_list(full)}
    for method in ("magnitude", "random"):
        param = nn.Parameter(distribute_tensor(torch.zeros(7, 5), mesh, [Shard(0)]))
        optimizer = torch.optim.Adam([param])
        optimizer.state[param] = {"step": torch.tensor(3.0),
                                  "exp_avg": distribute_tensor(full.clone(), mesh, [Shard(0)]),
                                  "exp_avg_sq": distribute_tensor(full.abs(), mesh, [Shard(0)])}
        prune_optimizer_state_(optimizer, [param], ratio=0.5, method=method)
        state = optimizer.state[param]
        result[method] = {key: as_list(state[key].full_tensor()) for key in ("exp_avg", "exp_avg_sq")}
        result[method]["step"] = state["step"].item()
    return result


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == WORLD
    count_ops()
    backends = ["reference"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    results = {"world": WORLD, "runs": {}}
    per_rank = {}
    for backend in backends:
        run, model, single, relora = train(backend, rank)
        per_rank[backend] = {"local_shapes": run.pop("local_shapes"), "step_calls": run.pop("step_calls"),
                             "restart_calls": [r.pop("calls") for r in run["restarts"]],
                             "collectives": [r.pop("collectives") for r in run["restarts"]]}
        results["runs"][backend] = run
        if backend == "reference":
            results["api"] = api_checks(model, single, relora, out_dir, rank)
    rk.configure(backend="reference")
    results["pruning"] = pruning_checks(rank)
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, per_rank)
    results["per_rank"] = gathered
    finish_gloo_worker(results, out_dir / "results.json", rank)


if __name__ == "__main__":
    main()

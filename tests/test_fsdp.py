"""ReLoRA under FSDP2 (fully_shard) on 2 CPU processes with gloo: shard-local restarts, sharded optimizer-state
pruning, and the package's entry points on a sharded model.

One torchrun launch of tests/fsdp_worker.py (module-scoped fixture) computes everything, for the reference backend
and for the Triton kernels through the interpreter; the tests read its results.json. The worker's one-process run
performs the ranks' operations on the ranks' shapes (see its docstring), so its losses and states must equal the
sharded run's exactly; only the merge multiplies B by A in row blocks of another shape, so W is compared within
the rounding bound of its fp32 r-term sums.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import assert_within_bound, rounding_bound

from relora_kernels import reference
from relora_kernels.distributed import merge_and_reinit_sharded_
from relora_kernels.relora import restart_seed

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fsdp_worker.py")
SEED = 11  # the worker's ReLoRA seed
# The worker's LoRALinear layers in modules() order: (scale, r, in_features K)
LAYERS = {"block.up": (8 / 4, 4, 6), "block.mid": (1.0, 1, 7), "head": (1.0, 2, 5)}
BACKENDS = ("reference", "triton")

pytestmark = [pytest.mark.slow,  # torchrun
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    # One thread per process (2 processes on 2 cores); the interpreter so the worker also runs the kernels' path.
    # MKL_CBWR=AUTO,STRICT: MKL's small-matrix kernels otherwise round by their operands' memory alignment (seen on
    # AVX-512 at these shapes), and FSDP2's all-gather buffer places parameters at other offsets than one process.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT", "TRITON_INTERPRET": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(out_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    data = json.loads((out_dir / "results.json").read_text())
    data["out_dir"] = out_dir
    return data


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).float()  # JSON held the fp32 values exactly


def restarts(results, backend):
    run = results["runs"][backend]
    assert run["restarts"], f"{backend}: no restart happened"
    return run["restarts"]


def merge_bound(weight, lora_a, lora_b, scale) -> torch.Tensor:
    """Elementwise bound on |W1 - W2| for two fp32 merges fl(W + fl(s * fl(B @ A))) that sum each element's r
    products in any order: each is within gamma_{r+3} (|W| + |s| |B| @ |A|) of the exact value (r products and W
    summed, the product by s, and s rounded to fp32), hence twice that between them."""
    w, a, b = weight.double(), lora_a.double(), lora_b.double()
    return 2 * rounding_bound(torch.float32, a.shape[0] + 3, w.abs() + abs(scale) * (b.abs() @ a.abs()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_and_states_equal_the_single_process_run(results, backend):
    run = results["runs"][backend]
    assert len(run["losses"]) == len(run["single_losses"]) > 0
    # Same operations on the same shapes (the ranks' halves of each global batch): equal to the bit.
    assert run["losses"] == run["single_losses"]
    for record in restarts(results, backend):
        assert record["fsdp_before"] == record["single_before"], f"step {record['step']}: states before the restart"
    assert run["fsdp_final"] == run["single_final"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_restart_draws_a_bit_identical_and_zeros_b(results, backend):
    for restart, record in enumerate(restarts(results, backend), start=1):
        assert record["restarted"] and record["single_restarted"], record["step"]
        for index, name in enumerate(LAYERS):
            got = tensor(record["fsdp_after"][f"{name}.lora_A"])
            # The single-process draw, and the oracle's: the A that seed gives in one process.
            assert torch.equal(got, tensor(record["single_after"][f"{name}.lora_A"])), (record["step"], name)
            drawn = reference.reinit_uniform(restart_seed(SEED, restart, index), *got.shape)
            assert torch.equal(got, drawn), (record["step"], name)
            # The layer was really re-drawn: the A before the restart was another one.
            assert not torch.equal(got, tensor(record["fsdp_before"][f"{name}.lora_A"]))
            lora_b = tensor(record["fsdp_after"][f"{name}.lora_B"])
            assert lora_b.numel() and torch.equal(lora_b, torch.zeros_like(lora_b)), (record["step"], name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_restart_merges_w_within_fp32_rounding(results, backend):
    for record in restarts(results, backend):
        for name, (scale, _, _) in LAYERS.items():
            before = {part: tensor(record["single_before"][f"{name}.{part}"]) for part in ("weight", "lora_A",
                                                                                          "lora_B")}
            got = tensor(record["fsdp_after"][f"{name}.weight"])
            want = tensor(record["single_after"][f"{name}.weight"])
            bound = merge_bound(before["weight"], before["lora_A"], before["lora_B"], scale)
            assert_within_bound(f"step {record['step']} {name}.weight", got, want, bound)
            # The restart merged a nonzero update: W moved.
            assert not torch.equal(got, before["weight"]), (record["step"], name)
            # Other parameters (the biases) are untouched by a restart.
            assert record["fsdp_after"][f"{name}.bias"] == record["fsdp_before"][f"{name}.bias"]


def test_shards_are_uneven_and_some_empty(results):
    # What the worker's layer shapes are there for: FSDP2's Shard(0) blocks, ceil(rows / 2) rows on rank 0.
    shapes = [per_rank["reference"]["local_shapes"] for per_rank in results["per_rank"]]
    assert [s["block.up.weight"] for s in shapes] == [[4, 6], [3, 6]]  # uneven
    assert [s["block.up.lora_B"] for s in shapes] == [[4, 4], [3, 4]]  # B's rows split as W's
    assert [s["block.mid.lora_A"] for s in shapes] == [[1, 7], [0, 7]]  # r = 1: rank 1 holds no row of A
    assert [s["head.weight"] for s in shapes] == [[1, 5], [0, 5]]  # N = 1: rank 1 holds no row of W or B
    assert [s["head.lora_B"] for s in shapes] == [[1, 2], [0, 2]]


def test_restart_gathers_only_a(results):
    # One collective per layer per restart: the all-gather of its A, each rank sending at most one shard of A's
    # rows (DTensor pads a short or empty shard to ceil(r / world) rows); W and B never leave their rank.
    world = results["world"]
    want = [(-(-r // world), k) for _, r, k in LAYERS.values()]
    for rank, per_rank in enumerate(results["per_rank"]):
        for backend in BACKENDS:
            for log in per_rank[backend]["collectives"]:
                assert [name.rpartition(".")[2] for name, _ in log] == ["all_gather_into_tensor"] * len(LAYERS)
                for (_, shapes), (rows, k) in zip(log, want, strict=True):
                    assert len(shapes) == 1 and shapes[0][1] == k and shapes[0][0] <= rows, (rank, backend, log)


def test_triton_backend_runs_the_kernels_on_every_rank(results):
    restart_ops = {"merge_lora_weight_": len(LAYERS), "reinit_lora_": len(LAYERS)}
    for rank, per_rank in enumerate(results["per_rank"]):
        kernels, plain = per_rank["triton"], per_rank["reference"]
        assert kernels["restart_calls"] == [restart_ops] * len(restarts(results, "triton")), rank
        assert all(calls == {"lora_forward": len(LAYERS)} for calls in kernels["step_calls"]), rank
        assert all(calls == {} for calls in plain["restart_calls"] + plain["step_calls"]), rank
    # The one-process runs beside them (rank 0): the same ops, each step on both halves of the batch.
    for backend, runs_kernels in (("triton", True), ("reference", False)):
        run = results["runs"][backend]
        assert all(r["single_calls"] == (restart_ops if runs_kernels else {}) for r in run["restarts"]), backend
        step_ops = {"lora_forward": results["world"] * len(LAYERS)} if runs_kernels else {}
        assert run["single_step_calls"] == [step_ops] * len(run["losses"]), backend


def test_pruning_ranks_within_each_shard(results):
    pruning = results["pruning"]
    full = tensor(pruning["full"])
    # FSDP2's Shard(0) rows: torch.chunk's blocks, 4 + 3 rows; rank 0's values are 100x larger.
    shards = torch.chunk(full, results["world"])

    def keep_largest(t):  # magnitude pruning of one tensor at ratio 0.5: its round(numel / 2) largest |values|
        flat = t.flatten()
        keep = flat.abs().argsort(descending=True)[: round(0.5 * flat.numel())]
        kept = torch.zeros_like(flat)
        kept[keep] = flat[keep]
        return kept.view_as(t)

    within_shards = torch.cat([keep_largest(shard) for shard in shards])
    whole_tensor = keep_largest(full)
    assert not torch.equal(within_shards, whole_tensor)  # the data tell the two rankings apart
    magnitude = pruning["magnitude"]
    assert torch.equal(tensor(magnitude["exp_avg"]), within_shards)
    assert torch.equal(tensor(magnitude["exp_avg_sq"]), within_shards.abs())
    assert magnitude["step"] == 3.0

    # "random": n_keep from each shard's numel, the kept elements unchanged, one mask for both moments.
    assert torch.equal(tensor(pruning["random"]["exp_avg"]) != 0, tensor(pruning["random"]["exp_avg_sq"]) != 0)
    for key, original in (("exp_avg", full), ("exp_avg_sq", full.abs())):
        got = tensor(pruning["random"][key])
        for got_shard, shard in zip(torch.chunk(got, results["world"]), torch.chunk(original, results["world"]),
                                    strict=True):
            kept = got_shard != 0
            assert int(kept.sum()) == round(0.5 * shard.numel()), key
            assert torch.equal(got_shard[kept], shard[kept]), key


def test_entry_points_on_a_sharded_model(results):
    api = results["api"]
    assert "LoRALinear.merge_and_reinit" in api["merge_and_reinit_"] and "ReLoRA" in api["merge_and_reinit_"]
    assert "FSDP2" in api["merge_lora"] and "to_linear" in api["merge_lora"]
    assert "seed must be given" in api["merge_and_reinit_no_seed"]
    assert "sharded alike" in api["mismatched_placements"]
    # A restart while FSDP2 holds the block unsharded would write to copies it drops: refused, nothing changed.
    assert "block.up is under fully_shard but holds unsharded" in api["unsharded_restart"]
    assert api["unsharded_restart_changed_nothing"]
    assert set(api["to_linear"]) == set(LAYERS)
    for name, linear in api["to_linear"].items():  # the full merged layer, as the single-process model gives it
        assert linear["fsdp"] == linear["single"] and linear["fsdp_bias"] == linear["single_bias"], name

    from safetensors.torch import load_file

    out_dir = results["out_dir"]
    assert not (out_dir / "adapter_fsdp_1").exists()  # rank 0 writes, rank 1 only gathers
    written = load_file(out_dir / "adapter_fsdp_0" / "adapter_model.safetensors")
    want = load_file(out_dir / "adapter_single" / "adapter_model.safetensors")
    assert set(written) == set(want) and len(want) == 2 * len(LAYERS)
    for key, value in want.items():
        assert torch.equal(written[key], value), key
    assert (out_dir / "adapter_fsdp_0" / "adapter_config.json").read_text() == (
        out_dir / "adapter_single" / "adapter_config.json").read_text()


def test_sharded_restart_rejects_plain_tensors():
    weight, lora_a, lora_b = torch.zeros(3, 2), torch.zeros(1, 2), torch.zeros(3, 1)
    with pytest.raises(TypeError, match="weight, lora_a, lora_b are plain"):
        merge_and_reinit_sharded_(weight, lora_a, lora_b, 1.0, seed=0)


"""FP8 frozen weights under FSDP2 on 2 and 4 CPU processes with gloo: W sharded by rows by fsdp_shard_fp8_weights
and left out of fully_shard, each rank's FP8 copies of its own rows, gathered whole for the GEMMs.

One torchrun launch of tests/fsdp_fp8_worker.py per world size (module-scoped fixture) computes everything, for the
reference backend and for the Triton kernels (through the interpreter) on both engines of the frozen GEMMs, and at
4 processes the compiled layers; the tests read its results. The copies are compared bit for bit with the whole W's
quantisation (row scales are per row, and the backward copy's are the whole W's column maxima, all-reduced), and
every training step with a one-process model given the same state, which performs the ranks' operations on the
ranks' shapes: losses, input gradients and outputs equal to the bit, the reduced factor gradients within the
rounding of their sum's order.
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
import torch.nn as nn
from helpers import assert_within_bound, rounding_bound

import relora_kernels as rk

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fsdp_fp8_worker.py")
RUNS = ("reference", "triton", "cublas")  # the reference; the kernels with each engine of the frozen GEMMs
# The worker's layers: out_features, and so the rows each rank holds (torch.chunk's split)
ROWS = {"up": 7, "head": 3}
FIELDS = ("q", "scale", "q_t", "scale_t")
# The world size whose launch also compiles the layers: its ranks split both layers unevenly and one of them holds
# none of the head's rows, which covers what 2 processes would.
COMPILED_AT_WORLD = 4


def _chunks(rows: int, world: int) -> list[int]:
    per_rank = -(-rows // world)
    return [max(0, min(per_rank, rows - rank * per_rank)) for rank in range(world)]


@pytest.fixture(scope="module")
def results_at(tmp_path_factory):
    """results_at(world): the worker's results at that world size, launched once per process whatever order the
    tests run in (the compiled test reads the 4-process launch outside the parametrised fixture's order)."""
    launched = {}

    def at(world: int) -> dict:
        if world not in launched:
            out_dir = tmp_path_factory.mktemp(f"fsdp_fp8_{world}")
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT", "TRITON_INTERPRET": "1",
                   "PYTHONPATH": str(ROOT)}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   str(WORKER), str(out_dir), *(["--compiled"] if world == COMPILED_AT_WORLD else [])]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
            launched[world] = json.loads((out_dir / f"results_{world}.json").read_text())
        return launched[world]

    return at


@pytest.fixture(scope="module", params=[2, COMPILED_AT_WORLD], ids=lambda world: f"world{world}")
def results(request, results_at):
    return results_at(request.param)


def run_of(results, name: str) -> dict:
    """The worker's run `name`, or a skip saying why it was not made (the cuBLAS engine where torch's _scaled_mm has
    no row-wise CPU case)."""
    if name in results["not_run"]:
        pytest.skip(f"{name}: {results['not_run'][name]}")
    return results["runs"][name]


# The tests reading the workers' results: slow (torchrun), and only where gloo exists.
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")


@pytest.mark.parametrize("backend", RUNS)
@pytest.mark.slow
@needs_gloo
def test_each_rank_holds_its_rows_and_the_gathered_copies_are_the_whole_quantisation(results, backend):
    run = run_of(results, backend)
    labels = [label for label, _ in run["checks"]]
    assert labels[0] == "start" and labels[-1] == "loaded from a checkpoint"
    assert [f"restart at step {step}" for step in run["restarts"]] == labels[1:-1] and run["restarts"]
    for label, layers in run["checks"]:
        for name, check in layers.items():
            assert check["equal"] == [True] * 4, (label, name, dict(zip(FIELDS, check["equal"], strict=True)))
            rows = _chunks(ROWS[name], results["world"])
            assert check["local_rows"] == rows and check["local_t_columns"] == rows, (label, name, check)


@pytest.mark.parametrize("backend", RUNS)
@pytest.mark.slow
@needs_gloo
def test_every_step_equals_one_process_from_the_same_state(results, backend):
    run = run_of(results, backend)
    assert len(run["losses"]) == len(run["single_losses"]) == len(run["dx_equal"]) > 0
    assert run["losses"] == run["single_losses"]  # each rank's loss, to the bit
    assert all(run["dx_equal"])  # each rank's input gradient, through the gathered W.T copy: to the bit
    assert run["same_output"]  # after training and restarts, the same state in one process: the same output
    assert run["loaded_same_output"]  # a checkpoint of the sharded model loads into a fresh one


@pytest.mark.parametrize("backend", RUNS)
@pytest.mark.slow
@needs_gloo
def test_the_reduced_factor_gradients_are_the_sum_of_the_shares(results, backend):
    # FSDP2 sums the ranks' gradients in its own order; the one-process sum adds the shares in rank order. Each is
    # within gamma_{world-1} |sum| of the exact sum, so they are within twice that of each other; with 2 ranks
    # there is one addition, the same in both: equal.
    world = results["world"]
    for step in run_of(results, backend)["grads"]:
        for name, grad in step.items():
            sharded, single = torch.tensor(grad["sharded"]), torch.tensor(grad["single"])
            if world == 2:
                assert torch.equal(sharded, single), name
            else:
                bound = 2 * rounding_bound(torch.float32, world - 1, torch.tensor(grad["magnitude"]))
                assert_within_bound(name, sharded, single, bound)


@pytest.mark.parametrize("backend", RUNS)
@pytest.mark.slow
@needs_gloo
def test_each_pass_gathers_only_the_copy_it_reads(results, backend):
    # Before a layer's forward its copy by rows and their scales (two pieces); before its backward the copy of W.T
    # (one piece; its scales are every rank's already). The steps' equality above checks the bits gathered.
    layers = len(ROWS)
    run = run_of(results, backend)
    assert run["gathers_per_step"] == [[2 * layers, 3 * layers]] * len(run["losses"])


@pytest.mark.parametrize("engine", RUNS[1:])
@pytest.mark.slow
@needs_gloo
def test_the_kernels_quantised_the_shards(results, engine):
    run = run_of(results, engine)
    calls = run["quantize_calls"]
    # Each layer's W.T block with the all-reduced maxima: at the start, after each restart, and after the load
    # (the fresh model's own start, then the loaded W).
    restarts = len(run["restarts"])
    assert calls["given_amax"] == len(ROWS) * (1 + restarts + 2)
    assert results["runs"]["reference"]["quantize_calls"] == {"whole": 0, "given_amax": 0, "scaled_mm": 0}
    # The engine setting chose the frozen GEMMs' engine: torch._scaled_mm on the cuBLAS-composed one only.
    assert (calls["scaled_mm"] > 0) == (engine == "cublas"), calls


@pytest.mark.parametrize("engine", RUNS[1:])
@pytest.mark.slow
@needs_gloo
def test_compiled_sharded_fp8_layers_equal_eager(results_at, engine):
    # Compiled, a sharded layer gathers its copies inside its graph (functional collectives, fullgraph); the
    # kernels are opaque ops there, so a step gives eager's loss, input gradient and reduced gradients to the bit.
    results = results_at(COMPILED_AT_WORLD)
    run_of(results, engine)  # skips where the engine did not run
    same = results["compiled"][engine]
    assert same and all(same.values()), same


@pytest.mark.slow
@needs_gloo
def test_fully_shard_without_sharding_the_fp8_weights_first_is_refused_by_name(results):
    message = results["errors"]["fully_shard_first"]
    assert "fsdp_shard_fp8_weights" in message and "ignored_params" in message


def test_sharding_refuses_a_master_in_cpu_memory():
    model = nn.Sequential(rk.LoRALinear(8, 4, r=2, frozen_dtype="fp8", master_device="cpu"))
    with pytest.raises(ValueError, match="master_device='cpu'"):
        rk.fsdp_shard_fp8_weights(model)


def test_sharding_needs_the_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        rk.fsdp_shard_fp8_weights(nn.Sequential(rk.LoRALinear(8, 4, r=2, frozen_dtype="fp8")))


def test_a_model_without_fp8_layers_has_nothing_to_shard():
    assert rk.fsdp_shard_fp8_weights(nn.Sequential(rk.LoRALinear(8, 4, r=2), nn.Linear(4, 4))) == set()


def test_quantising_a_block_of_rows_with_the_whole_column_maxima_is_that_block_of_the_whole():
    torch.manual_seed(0)
    weight = torch.randn(7, 5) * torch.logspace(-3, 3, 5)  # columns of very different magnitudes
    whole = rk.quantize_fp8_weight(weight)
    column_amax = weight.abs().amax(dim=0)
    for rows in (slice(0, 4), slice(4, 7), slice(7, 7)):
        block = rk.quantize_fp8_weight(weight[rows], column_amax)
        assert torch.equal(block.q.view(torch.uint8), whole.q[rows].view(torch.uint8))
        assert torch.equal(block.scale, whole.scale[rows])
        assert torch.equal(block.q_t.view(torch.uint8), whole.q_t[:, rows].view(torch.uint8))
        assert torch.equal(block.scale_t, whole.scale_t)
    # The block's own maxima would scale W.T's rows otherwise: the test above can fail.
    own = rk.quantize_fp8_weight(weight[:4])
    assert not torch.equal(own.scale_t, whole.scale_t)


@pytest.mark.parametrize("bad", [torch.ones(4), torch.ones(5, dtype=torch.float64), "amax"])
def test_column_amax_of_the_wrong_shape_or_dtype_is_refused(bad):
    with pytest.raises(ValueError, match="column_amax"):
        rk.quantize_fp8_weight(torch.randn(7, 5), bad)

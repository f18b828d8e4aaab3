"""The ReLoRA controller: restarts at the right steps, keeps the function, prunes only LoRA state, resumes."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import assert_within_torch_error

import relora_kernels as rk
from relora_kernels import _settings as rk_settings
from relora_kernels.relora import ReLoRA, jagged_cosine, restart_seed

ROOT = Path(__file__).resolve().parents[1]


def setup(seed=0, restart_every=3, prune_ratio=0.5):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.Linear(16, 4))
    rk.apply_lora(model, ["0", "2"], r=4, alpha=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = ReLoRA(model, optimizer, restart_every=restart_every, prune_ratio=prune_ratio, seed=7)
    return model, optimizer, controller


def train_step(model, optimizer, step):
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    optimizer.step()


def test_restarts_at_multiples_of_restart_every_and_keep_the_function(triton_backend):
    model, optimizer, controller = setup()
    x = torch.randn(5, 16)
    fired = []
    for step in range(1, 8):
        train_step(model, optimizer, step)
        before = model(x).detach()
        with pytest.MonkeyPatch.context() as patch:  # the float64 twin runs on the reference
            patch.setattr(rk_settings, "_current", rk.Settings(backend="reference"))
            exact = copy.deepcopy(model).double()(x.double())
        lora_b = [m.lora_B.detach().clone() for m in model.modules() if isinstance(m, rk.LoRALinear)]
        if controller.step(step):
            fired.append(step)
            assert all(not m.lora_B.any() for m in model.modules() if isinstance(m, rk.LoRALinear))
            # The merged model against float64, within twice the unmerged fp32 model's error.
            assert_within_torch_error("merged", model(x).detach(), exact, before)
        else:  # nothing changes off a restart step
            assert all(torch.equal(m.lora_B, b) for m, b in
                       zip([m for m in model.modules() if isinstance(m, rk.LoRALinear)], lora_b, strict=True))
    assert fired == [3, 6] and controller.restarts == 2


def test_prunes_only_lora_state():
    model, optimizer, controller = setup(prune_ratio=0.75)
    for step in (1, 2):
        train_step(model, optimizer, step)
    lora_params = {id(p) for m in model.modules() if isinstance(m, rk.LoRALinear) for p in (m.lora_A, m.lora_B)}
    before = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for g in optimizer.param_groups
              for p in g["params"]}
    train_step(model, optimizer, 3)
    after_step = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for g in optimizer.param_groups
                  for p in g["params"]}
    assert controller.step(3)
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if id(p) in lora_params:
                for key in ("exp_avg", "exp_avg_sq"):
                    assert int((state[key] != 0).sum()) == round(0.25 * p.numel()), key
                assert torch.equal(state["step"], after_step[id(p)]["step"])
            else:
                for key, value in state.items():
                    assert torch.equal(value, after_step[id(p)][key]), key
    assert before  # the state existed before the restart step too


def test_ranks_end_up_bit_identical_without_communication():
    # Two "ranks": same training, different unrelated RNG use before the restart. The reinit is keyed by
    # (seed, restart, layer), so both hold the same parameters afterwards.
    ranks = [setup(), setup()]
    for rank, (model, optimizer, controller) in enumerate(ranks):
        for step in (1, 2, 3):
            train_step(model, optimizer, step)
        torch.rand(100 + rank)  # rank-specific use of the global generator
        assert controller.step(3)
    (model_0, *_), (model_1, *_) = ranks
    for (name, p0), p1 in zip(model_0.named_parameters(), model_1.parameters(), strict=True):
        assert torch.equal(p0, p1), name


def test_layer_seeds_differ_by_layer_and_restart():
    seeds = {restart_seed(7, restart, layer) for restart in range(1, 4) for layer in range(5)}
    assert len(seeds) == 15 and all(0 <= s < 2**63 for s in seeds)
    assert restart_seed(7, 1, 0) == restart_seed(7, 1, 0)


def test_state_dict_round_trip_and_settings_check():
    _, _, controller = setup()
    controller.step(3)
    state = controller.state_dict()
    _, _, resumed = setup()
    resumed.load_state_dict(state)
    assert resumed.restarts == 1 and resumed.state_dict() == state
    _, _, other = setup(restart_every=4)
    with pytest.raises(ValueError, match="saved with settings"):
        other.load_state_dict(state)


def test_bad_arguments():
    model, optimizer, _ = setup()
    with pytest.raises(ValueError, match="restart_every must be an integer >= 1"):
        ReLoRA(model, optimizer, restart_every=0)
    with pytest.raises(ValueError, match="prune_method must be one of"):
        ReLoRA(model, optimizer, restart_every=2, prune_method="largest")
    with pytest.raises(ValueError, match="no LoRALinear layers"):
        ReLoRA(nn.Linear(2, 2), optimizer, restart_every=2)
    with pytest.raises(ValueError, match="step must be an integer >= 1"):
        ReLoRA(model, optimizer, restart_every=2).step(0)


def test_optimizer_missing_lora_factors_is_refused_before_any_restart():
    model, _, _ = setup()
    second = [m for m in model.modules() if isinstance(m, rk.LoRALinear)][1]
    partial = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and p is not second.lora_A])
    weights = [m.weight.clone() for m in model.modules() if isinstance(m, rk.LoRALinear)]
    with pytest.raises(ValueError, match=r"does not hold lora_A and lora_B of 2\b"):
        ReLoRA(model, partial, restart_every=1)
    assert all(torch.equal(m.weight, w) for m, w in
               zip([m for m in model.modules() if isinstance(m, rk.LoRALinear)], weights, strict=True))


def test_optimizer_whose_state_cannot_be_pruned_is_refused_by_name():
    model, _, _ = setup()
    adagrad = torch.optim.Adagrad([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(TypeError, match="does not know the per-element state of Adagrad"):
        ReLoRA(model, adagrad, restart_every=1)

    class Wrapper(torch.optim.Optimizer):  # accelerate's pattern: the real optimizer in .optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

        @property
        def param_groups(self):
            return self.optimizer.param_groups

        @property
        def state(self):
            return self.optimizer.state

    with pytest.raises(TypeError, match="of Wrapper -> Adagrad"):
        ReLoRA(model, Wrapper(adagrad), restart_every=1)
    adamax = torch.optim.Adamax([p for p in model.parameters() if p.requires_grad])
    controller = ReLoRA(model, Wrapper(adamax), restart_every=1, prune_ratio=1.0)
    train_step(model, adamax, 1)
    assert controller.step(1)
    lora = [p for m in model.modules() if isinstance(m, rk.LoRALinear) for p in (m.lora_A, m.lora_B)]
    assert all(not adamax.state[p][key].any() for p in lora for key in ("exp_avg", "exp_inf"))


def test_no_restart_after_the_last_step():
    model, optimizer, _ = setup()
    controller = ReLoRA(model, optimizer, restart_every=3, prune_ratio=0.5, seed=7, max_steps=6)
    for step in range(1, 7):
        train_step(model, optimizer, step)
        weights = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(optimizer.state_dict())
        restarted = controller.step(step)
        assert restarted == (step == 3), step
        if step == 6:  # the last step is a multiple of restart_every: nothing merges, nothing is pruned
            assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
            assert all(torch.equal(a[k], b[k]) for a, b in zip(optimizer.state_dict()["state"].values(),
                                                               state["state"].values(), strict=True) for k in a)
    assert controller.restarts == 1
    with pytest.raises(ValueError, match="max_steps must be an integer >= 1"):
        ReLoRA(model, optimizer, restart_every=3, max_steps=0)


def test_layer_sharing_its_weight_with_another_module_is_refused():
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 16)
    head = nn.Linear(16, 10, bias=False)
    head.weight = embedding.weight  # tied input and output embeddings
    model = nn.ModuleDict({"wte": embedding, "head": head, "body": nn.Linear(16, 16)})
    rk.apply_lora(model, ["head", "body"], r=2)  # the LoRA layer's weight is a new Parameter over wte's memory
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match=r"head.weight shares its memory with wte.weight \(tied weights\)"):
        ReLoRA(model, optimizer, restart_every=1)
    # Why: a restart merges into the layer's weight in place, which would move the embedding as well.
    wte = embedding.weight.detach().clone()
    model["head"].lora_B.data.fill_(0.5)
    model["head"].merge_and_reinit(seed=0)
    assert not torch.equal(embedding.weight, wte)

    untied = nn.ModuleDict({"wte": nn.Embedding(10, 16), "head": nn.Linear(16, 10, bias=False)})
    rk.apply_lora(untied, ["head"], r=2)
    ReLoRA(untied, torch.optim.AdamW([p for p in untied.parameters() if p.requires_grad]), restart_every=1)


def test_lora_layer_added_after_construction_is_refused_at_step():
    model, optimizer, controller = setup()
    train_step(model, optimizer, 1)
    assert not controller.step(1)
    rk.apply_lora(model, ["3"], r=2)
    weights = [p.detach().clone() for p in model.parameters()]
    for step in (2, 3):  # at any step, and before anything changes at a restart step
        with pytest.raises(RuntimeError, match=r"LoRALinear layers changed .*added: 3\b"):
            controller.step(step)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


def test_non_finite_state_is_refused_before_any_layer_merges():
    model, optimizer, controller = setup()
    for step in (1, 2, 3):
        train_step(model, optimizer, step)
        if step < 3:
            controller.step(step)
    second = [m for m in model.modules() if isinstance(m, rk.LoRALinear)][1]
    optimizer.state[second.lora_B]["exp_avg"][0, 0] = float("nan")
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"^2.lora_B: optimizer state 'exp_avg' holds 1 NaN or infinite"):
        controller.step(3)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


@pytest.mark.parametrize("ratio", [0.9, 0.99])
def test_factors_stay_bounded_across_restarts_with_magnitude_pruning(ratio):
    # 60 AdamW steps at lr 1e-2 on a regression, restarts every 20 steps with a 4-step re-warmup. In the first
    # cycle (no restart yet) max |A| is what training does to the factors in one cycle; each restart draws A
    # afresh in the same range, so later cycles must stay within a small factor of it. Pruning the moments apart
    # sent max |A| to ~1e4 (ratio 0.9) and ~4e3 (ratio 0.99) here.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    rk.apply_lora(model, ["0"], r=8)
    target = torch.randn(32, 32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    schedule = functools.partial(jagged_cosine, max_steps=60, warmup_steps=4, restart_every=20,
                                 restart_warmup_steps=4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    controller = ReLoRA(model, optimizer, restart_every=20, prune_ratio=ratio)
    batches = torch.Generator().manual_seed(1)
    largest = {"first cycle": 0.0, "after restarts": 0.0}
    for step in range(1, 61):
        x = torch.randn(64, 32, generator=batches)
        optimizer.zero_grad()
        (model(x) - x @ target.T).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        cycle = "first cycle" if step <= 20 else "after restarts"
        largest[cycle] = max(largest[cycle], model[0].lora_A.abs().max().item())
        controller.step(step)  # after the measurement: the restart at step 60 changes nothing measured
    assert controller.restarts == 3
    assert largest["after restarts"] <= 2 * largest["first cycle"], largest


@pytest.mark.slow
def test_zero_redundancy_optimizer_state_is_pruned_on_each_rank(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "zero_worker.py"), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ranks = json.loads((tmp_path / "results.json").read_text())
    owned = [set(rank["before"]) for rank in ranks]
    # ZeroRedundancyOptimizer partitions the parameters: every LoRA factor's state lives on exactly one rank.
    assert not owned[0] & owned[1] and owned[0] | owned[1] == {f"{layer}.{factor}" for layer in ("0", "2")
                                                                for factor in ("lora_A", "lora_B")}
    for rank in ranks:
        assert rank["restarted_2"] and not rank["restarted_1"] and not rank["restarted_3"]
        for name, before in rank["before"].items():
            m, v = (torch.tensor(before[key]) for key in ("exp_avg", "exp_avg_sq"))
            after_m, after_v = (torch.tensor(rank["after"][name][key]) for key in ("exp_avg", "exp_avg_sq"))
            kept = after_m != 0
            assert int(kept.sum()) == round(0.25 * m.numel()), name
            assert torch.equal(kept, after_v != 0), name  # one mask for both moments
            assert torch.equal(after_m[kept], m[kept]) and torch.equal(after_v[kept], v[kept]), name
            assert not m.eq(0).any() and not v.eq(0).any(), name  # so a zero after the restart means pruned
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # the ranks still hold one model


def test_amsgrad_running_maximum_is_pruned_too():
    model, _, _ = setup()
    adam = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, amsgrad=True)
    controller = ReLoRA(model, adam, restart_every=2, prune_ratio=1.0)
    for step in (1, 2):
        train_step(model, adam, step)
    lora_params = [p for m in model.modules() if isinstance(m, rk.LoRALinear) for p in (m.lora_A, m.lora_B)]
    assert all(adam.state[p]["max_exp_avg_sq"].any() for p in lora_params)
    assert controller.step(2)
    for p in lora_params:
        assert not any(adam.state[p][key].any() for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))

"""The ReLoRA controller: restarts at the right steps, keeps the function, prunes only LoRA state, resumes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from helpers import assert_within_torch_error

import relora_kernels as rk
from relora_kernels import _settings as rk_settings
from relora_kernels.relora import ReLoRA, restart_seed


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


def test_sgd_warns_once_that_nothing_is_pruned():
    model, _, _ = setup()
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2, momentum=0.9)
    controller = ReLoRA(model, sgd, restart_every=1, prune_ratio=0.5)
    train_step(model, sgd, 1)
    with pytest.warns(RuntimeWarning, match="SGD holds no Adam moments"):
        assert controller.step(1)
    train_step(model, sgd, 2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert controller.step(2)


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

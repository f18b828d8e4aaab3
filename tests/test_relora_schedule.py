"""ReLoRA machinery: optimizer-state pruning (prune_optimizer_state_) and the jagged cosine schedule."""

from __future__ import annotations

import copy
import functools
import itertools
import math

import pytest
import torch
from torch import nn

from relora_kernels.relora import jagged_cosine, prune_optimizer_state_

# --------------------------------------------------------------------------------------------------------------
# Optimizer-state pruning
# --------------------------------------------------------------------------------------------------------------

STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _num_kept(ratio: float, numel: int) -> int:
    # The documented rule, written out here so a change to it in the module makes these tests fail.
    return round((1 - ratio) * numel)


def _trained_model_and_optimizer(seed: int = 0):
    """Two Linear layers after 2 AdamW steps, with the moments overwritten by values that have no zeros and no
    ties in magnitude, so "the top-k elements" is a unique set and every survivor is a nonzero."""
    torch.manual_seed(seed)
    # Sizes chosen so (1 - ratio) * numel is not an integer: weights 91 and 65 elements, biases 13 and 5.
    model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        loss = model(torch.randn(16, 7)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for p in model.parameters():
            state = optimizer.state[p]
            distinct = (torch.randperm(p.numel()) + 1).to(p.dtype).view(p.shape) / p.numel()
            sign = torch.randint(0, 2, p.shape).to(p.dtype) * 2 - 1
            state["exp_avg"].copy_(distinct * sign * 1e-2)
            state["exp_avg_sq"].copy_(distinct.flip(-1) * 1e-4)  # second moment must stay positive
    return model, optimizer


def _snapshot(optimizer):
    return {id(p): copy.deepcopy(optimizer.state[p]) for group in optimizer.param_groups for p in group["params"]}


def _assert_state_identical(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), f"{what}: state keys {sorted(actual)} != {sorted(expected)}"
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            # Bit-equal; a NaN planted by a test equals itself.
            same = actual[key].shape == value.shape and bool((actual[key] == value).logical_or(
                actual[key].isnan() & value.isnan()).all())
            assert same, f"{what}: state[{key!r}] changed"
        else:
            assert actual[key] == value, f"{what}: state[{key!r}] changed from {value} to {actual[key]}"


def _assert_kept_exactly(pruned: torch.Tensor, original: torch.Tensor, kept: torch.Tensor, what: str) -> None:
    """pruned must equal original where kept is True and be exactly 0 elsewhere."""
    expected = torch.where(kept, original, torch.zeros_like(original))
    mismatch = (pruned != expected).flatten().nonzero().flatten()
    assert mismatch.numel() == 0, (
        f"{what}: {mismatch.numel()} of {pruned.numel()} elements differ from the expected pruning, "
        f"first flat indices {mismatch[:5].tolist()}, got {pruned.flatten()[mismatch[:5]].tolist()}, "
        f"expected {expected.flatten()[mismatch[:5]].tolist()}"
    )


def _update_size64(state: dict, eps: float = 1e-8) -> torch.Tensor:
    """The documented magnitude score, in float64: |exp_avg| / (sqrt(exp_avg_sq) + eps)."""
    return state["exp_avg"].double().abs() / (state["exp_avg_sq"].double().sqrt() + eps)


def _top_mask(score: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The n_keep largest of a float64 score; asserts the set is unambiguous in float32 (the gap at the threshold is
    far above float32's rounding of the score), so the module's float32 ranking must pick the same set."""
    order = score.flatten().argsort(descending=True)
    if 0 < n_keep < score.numel():
        last_kept, first_dropped = score.flatten()[order[n_keep - 1]], score.flatten()[order[n_keep]]
        assert last_kept - first_dropped > 16 * torch.finfo(torch.float32).eps * last_kept, "ambiguous test data"
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[order[:n_keep]] = True
    return mask.view(score.shape)


@pytest.mark.parametrize("ratio", [0.99, 0.9, 0.5, 0.25, 0.0, 1.0])
def test_magnitude_keeps_the_largest_updates_with_both_moments(ratio):
    model, optimizer = _trained_model_and_optimizer()
    first, last = model[0], model[2]
    pruned_params = [first.weight, last.bias]
    before = _snapshot(optimizer)

    prune_optimizer_state_(optimizer, pruned_params, ratio=ratio, method="magnitude")

    for p in pruned_params:
        state, original = optimizer.state[p], before[id(p)]
        n_keep = _num_kept(ratio, p.numel())
        # One mask for both moments: the elements whose update |m| / (sqrt(v) + eps) is largest.
        top = _top_mask(_update_size64(original), n_keep)
        for key in STATE_KEYS:
            what = f"{key} of a {tuple(p.shape)} param at ratio={ratio}"
            assert int(state[key].count_nonzero()) == n_keep, f"{what}: {int(state[key].count_nonzero())} nonzeros"
            _assert_kept_exactly(state[key], original[key], top, what)
        assert state["step"] == original["step"], "step counter of a pruned param changed"

    for p in (first.bias, last.weight):
        _assert_state_identical(optimizer.state[p], before[id(p)], f"unpruned param {tuple(p.shape)}")


@pytest.mark.parametrize("ratio", [0.9, 0.99])
@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_no_element_keeps_a_first_moment_without_its_second(ratio, method):
    # The data where pruning each moment on its own goes wrong: the largest |exp_avg| sit where exp_avg_sq is
    # smallest, so per-moment magnitude pruning keeps m and drops v there.
    model, optimizer = _trained_model_and_optimizer()
    weight = model[0].weight
    state = optimizer.state[weight]
    with torch.no_grad():
        magnitude = torch.linspace(1.0, 2.0, weight.numel()).view(weight.shape)
        state["exp_avg"].copy_(magnitude * 1e-3)
        state["exp_avg_sq"].copy_(magnitude.flip(-1).flip(0) * 1e-6)
    torch.manual_seed(0)
    prune_optimizer_state_(optimizer, [weight], ratio=ratio, method=method)
    m_kept, v_kept = state["exp_avg"] != 0, state["exp_avg_sq"] != 0
    assert torch.equal(m_kept, v_kept), f"{int((m_kept & ~v_kept).sum())} elements kept exp_avg but not exp_avg_sq"
    assert int(m_kept.sum()) == _num_kept(ratio, weight.numel())


@pytest.mark.parametrize("ratio", [0.9, 0.99])
def test_no_element_takes_a_larger_step_after_pruning(ratio):
    # An AdamW step with a zero gradient at lr 1e-4 after pruning, against the same step without pruning: a kept
    # element takes the step it would have taken, a pruned one none (0 / (0 + eps)). Element by element, never
    # more. An element left with exp_avg and no exp_avg_sq would step lr * m_hat / eps instead, about 1e4 here.
    model, optimizer = _trained_model_and_optimizer()
    for group in optimizer.param_groups:
        group.update(lr=1e-4, weight_decay=0.0)
    twin_model, twin_optimizer = copy.deepcopy((model, optimizer))
    prune_optimizer_state_(optimizer, list(model.parameters()), ratio=ratio)
    steps = []
    for m, opt in ((model, optimizer), (twin_model, twin_optimizer)):
        start = [p.detach().clone() for p in m.parameters()]
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        steps.append([(p.detach() - s).abs() for p, s in zip(m.parameters(), start, strict=True)])
    for (name, _), pruned, unpruned in zip(model.named_parameters(), *steps, strict=True):
        # Both steps round the same float32 arithmetic where the state is kept: equal to the last bit.
        assert (pruned <= unpruned).all(), f"{name}: largest step {pruned.max().item():.3g} after pruning, " \
            f"{unpruned.max().item():.3g} without"


def test_amsgrad_running_maximum_takes_the_same_mask():
    model = nn.Linear(7, 13)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    for seed in range(3):
        model(torch.randn(16, 7, generator=torch.Generator().manual_seed(seed))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    state = optimizer.state[model.weight]
    original = {key: state[key].clone() for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    prune_optimizer_state_(optimizer, [model.weight], ratio=0.75)
    # The score divides by sqrt(max_exp_avg_sq): amsgrad's denominator.
    score = original["exp_avg"].double().abs() / (original["max_exp_avg_sq"].double().sqrt() + 1e-8)
    top = _top_mask(score, _num_kept(0.75, model.weight.numel()))
    for key, value in original.items():
        _assert_kept_exactly(state[key], value, top, key)


def test_adamax_infinity_norm_is_pruned_with_the_first_moment():
    model = nn.Linear(7, 13)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-2)
    for seed in range(3):
        model(torch.randn(16, 7, generator=torch.Generator().manual_seed(seed))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    state = optimizer.state[model.weight]
    original = {key: state[key].clone() for key in ("exp_avg", "exp_inf")}
    prune_optimizer_state_(optimizer, [model.weight], ratio=0.75)
    score = original["exp_avg"].double().abs() / (original["exp_inf"].double() + 1e-8)
    top = _top_mask(score, _num_kept(0.75, model.weight.numel()))
    for key, value in original.items():
        _assert_kept_exactly(state[key], value, top, f"Adamax {key}")


def test_sgd_momentum_is_pruned():
    model = nn.Linear(7, 13)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    model(torch.randn(16, 7)).square().mean().backward()
    optimizer.step()
    buffer = optimizer.state[model.weight]["momentum_buffer"]
    original = buffer.clone()
    prune_optimizer_state_(optimizer, [model.weight], ratio=0.75)
    _assert_kept_exactly(buffer, original, _top_mask(original.double().abs(), _num_kept(0.75, buffer.numel())),
                         "momentum_buffer")


def test_optimizer_with_unknown_state_is_refused_by_name():
    model = nn.Linear(7, 13)
    adagrad = torch.optim.Adagrad(model.parameters())
    with pytest.raises(TypeError, match="does not know the per-element state of Adagrad"):
        prune_optimizer_state_(adagrad, [model.weight])

    class AdamWithTrace(torch.optim.AdamW):  # a subclass that keeps one more per-element tensor
        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["trace"] = p.detach().clone()

    optimizer = AdamWithTrace(model.parameters())
    model(torch.randn(16, 7)).square().mean().backward()
    optimizer.step()
    before = _snapshot(optimizer)
    with pytest.raises(TypeError, match="per-element 'trace'"):
        prune_optimizer_state_(optimizer, [model.weight])
    _assert_state_identical(optimizer.state[model.weight], before[id(model.weight)], "refused state")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_state_is_refused_with_the_parameter_name(bad):
    model, optimizer = _trained_model_and_optimizer()
    optimizer.state[model[2].weight]["exp_avg_sq"][1, 2] = bad
    before = _snapshot(optimizer)
    with pytest.raises(ValueError, match=r"params\[1\]: optimizer state 'exp_avg_sq' holds 1 NaN or infinite"):
        prune_optimizer_state_(optimizer, [model[0].weight, model[2].weight], ratio=0.5)
    for p in model.parameters():  # nothing pruned, not even the parameter listed before the bad one
        _assert_state_identical(optimizer.state[p], before[id(p)], f"param {tuple(p.shape)}")
    with pytest.raises(ValueError, match=r"^last.weight: optimizer state 'exp_avg_sq'"):
        prune_optimizer_state_(optimizer, [model[2].weight], names=["last.weight"])


def test_magnitude_ties_never_keep_more_than_the_count():
    model, optimizer = _trained_model_and_optimizer()
    weight, bias = model[0].weight, model[0].bias  # 91 and 13 elements
    for p in (weight, bias):
        optimizer.state[p]["exp_avg"].fill_(0.5)  # every element ties at the threshold

    prune_optimizer_state_(optimizer, [weight, bias], ratio=0.5)

    # round(45.5) = 46 and round(6.5) = 6: Python's round sends halves to the even integer.
    for p, n_keep in ((weight, 46), (bias, 6)):
        exp_avg = optimizer.state[p]["exp_avg"]
        assert int(exp_avg.count_nonzero()) == n_keep
        assert set(exp_avg.unique().tolist()) == {0.0, 0.5}


def test_random_keeps_the_count_and_is_reproducible_under_manual_seed():
    ratio = 0.9
    masks = []
    for seed in (123, 123, 7):
        model, optimizer = _trained_model_and_optimizer()
        params = list(model.parameters())
        before = _snapshot(optimizer)
        torch.manual_seed(seed)
        prune_optimizer_state_(optimizer, params, ratio=ratio, method="random")
        run_masks = []
        for p in params:
            for key in STATE_KEYS:
                pruned, original = optimizer.state[p][key], before[id(p)][key]
                kept = pruned != 0
                what = f"random {key} of a {tuple(p.shape)} param"
                assert int(kept.sum()) == _num_kept(ratio, p.numel()), what
                _assert_kept_exactly(pruned, original, kept, what)  # survivors keep their values
                run_masks.append(kept)
            assert torch.equal(run_masks[-1], run_masks[-2]), "the two moments were pruned with different masks"
            assert optimizer.state[p]["step"] == before[id(p)]["step"]
        masks.append(run_masks)

    same_seed = all(torch.equal(a, b) for a, b in zip(masks[0], masks[1], strict=True))
    other_seed = all(torch.equal(a, b) for a, b in zip(masks[0], masks[2], strict=True))
    assert same_seed, "random pruning is not reproduced by torch.manual_seed"
    assert not other_seed, "random pruning ignores the seed"


def test_zero_method_zeros_the_moments_and_nothing_else():
    model, optimizer = _trained_model_and_optimizer()
    weight = model[2].weight
    before = _snapshot(optimizer)

    prune_optimizer_state_(optimizer, [weight], method="zero")

    for key in STATE_KEYS:
        assert int(optimizer.state[weight][key].count_nonzero()) == 0, f"{key} not zeroed"
    assert optimizer.state[weight]["step"] == before[id(weight)]["step"]
    for p in model.parameters():
        if p is not weight:
            _assert_state_identical(optimizer.state[p], before[id(p)], f"unpruned param {tuple(p.shape)}")


def test_param_without_state_is_skipped():
    model, optimizer = _trained_model_and_optimizer()
    never_stepped = nn.Parameter(torch.randn(3, 3))  # no grad ever, so AdamW never creates its state
    optimizer.add_param_group({"params": [never_stepped]})

    prune_optimizer_state_(optimizer, [never_stepped, model[0].weight])

    assert never_stepped not in optimizer.state, "pruning created state for a param that had none"
    assert int(optimizer.state[model[0].weight]["exp_avg"].count_nonzero()) == _num_kept(0.99, 91)


def test_param_listed_twice_is_pruned_once():
    model, optimizer = _trained_model_and_optimizer()
    weight = model[0].weight
    torch.manual_seed(0)
    prune_optimizer_state_(optimizer, [weight, weight], ratio=0.5, method="random")
    assert int(optimizer.state[weight]["exp_avg"].count_nonzero()) == _num_kept(0.5, weight.numel())


def test_adamw_still_steps_after_pruning():
    model, optimizer = _trained_model_and_optimizer()
    prune_optimizer_state_(optimizer, model.parameters(), ratio=0.99)
    weights_before = [p.detach().clone() for p in model.parameters()]

    loss = model(torch.randn(16, 7)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    for p, w in zip(model.parameters(), weights_before, strict=True):
        assert torch.isfinite(p).all(), f"non-finite weights in a {tuple(p.shape)} param after pruning"
        assert not torch.equal(p, w), f"a {tuple(p.shape)} param did not move"
        assert float(optimizer.state[p]["step"]) == 3.0


@pytest.mark.parametrize("ratio", [-0.1, 1.01, float("nan"), float("inf"), "0.5", None, True])
def test_bad_ratio_raises(ratio):
    model, optimizer = _trained_model_and_optimizer()
    with pytest.raises(ValueError, match="ratio"):
        prune_optimizer_state_(optimizer, [model[0].weight], ratio=ratio)


@pytest.mark.parametrize("method", ["topk", "Magnitude", "", None])
def test_bad_method_raises(method):
    model, optimizer = _trained_model_and_optimizer()
    with pytest.raises(ValueError, match="'magnitude', 'random', 'zero'"):
        prune_optimizer_state_(optimizer, [model[0].weight], method=method)


def test_foreign_param_raises_before_changing_anything():
    model, optimizer = _trained_model_and_optimizer()
    before = _snapshot(optimizer)
    foreign = nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="not in the optimizer"):
        prune_optimizer_state_(optimizer, [model[0].weight, foreign])
    # The valid param listed first must not have been pruned either.
    for p in model.parameters():
        _assert_state_identical(optimizer.state[p], before[id(p)], f"param {tuple(p.shape)}")


# --------------------------------------------------------------------------------------------------------------
# Jagged cosine schedule
# --------------------------------------------------------------------------------------------------------------

# Restarts at 250, 500, 750, 1000 (and 1250, past the end); each re-warms over 50 steps.
SCHEDULE = dict(max_steps=1100, warmup_steps=100, restart_every=250, restart_warmup_steps=50, min_lr_ratio=0.1)
RESTARTS = (250, 500, 750, 1000, 1250)


def _envelope(step: int) -> float:
    # The cosine envelope as specified, to check the schedule at points without a closed form.
    progress = min(max((step - 100) / (1100 - 100), 0.0), 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _schedule(step: int, **overrides) -> float:
    return jagged_cosine(step, **{**SCHEDULE, **overrides})


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),
        (25, 0.25),
        (50, 0.5),
        (99, 0.99),
        (100, 1.0),  # end of the initial warmup
        (1100, 0.1),  # end of the run
        (1200, 0.1),  # past max_steps the envelope stays at min_lr_ratio
        (1275, 0.05),  # ... and restarts still dip: 0.1 * 25 / 50
    ]
    + [(restart, 0.0) for restart in RESTARTS],
)
def test_schedule_exact_values(step, expected):
    assert _schedule(step) == expected


def test_schedule_follows_the_envelope_between_restarts():
    assert _schedule(600) == pytest.approx(0.55, rel=1e-12, abs=0)  # halfway: cos(pi / 2) = 0
    assert _schedule(350) == pytest.approx(0.1 + 0.9 * (0.5 + math.sqrt(2) / 4), rel=1e-12, abs=0)  # quarter way
    for restart in RESTARTS[:-1]:
        # Mid restart warmup: half the envelope; then the ramp ends exactly on the envelope.
        assert _schedule(restart + 25) == pytest.approx(0.5 * _envelope(restart + 25), rel=1e-12, abs=0)
        assert _schedule(restart + 49) == pytest.approx(49 / 50 * _envelope(restart + 49), rel=1e-12, abs=0)
        assert _schedule(restart + 50) == pytest.approx(_envelope(restart + 50), rel=1e-12, abs=0)


def test_envelope_decreases_monotonically_and_bounds_the_ramps():
    outside_ramps = [s for s in range(100, 1300) if not any(r <= s < r + 50 for r in RESTARTS)]
    values = [_schedule(s) for s in outside_ramps]
    steps_and_values = list(zip(outside_ramps, values, strict=True))
    rises = [(s, v, w) for (_, v), (s, w) in itertools.pairwise(steps_and_values) if w > v]
    assert not rises, f"{len(rises)} increases of the envelope, first (step, before, after): {rises[:3]}"
    assert values[0] == 1.0 and values[-1] == 0.1
    for restart in RESTARTS:
        ramp = [_schedule(s) for s in range(restart, restart + 50)]
        assert all(a < b for a, b in itertools.pairwise(ramp)), f"restart warmup at {restart} is not increasing"
        assert all(v <= _envelope(s) for s, v in zip(range(restart, restart + 50), ramp, strict=True))


def test_initial_warmup_takes_precedence_over_restarts():
    # Restarts at 40 and 80 fall inside the initial warmup: no dip there.
    early = dict(restart_every=40, restart_warmup_steps=20)
    assert _schedule(40, **early) == 0.4
    assert _schedule(80, **early) == 0.8
    assert _schedule(100, **early) == 1.0  # j = 20: the restart-80 ramp has ended exactly
    assert _schedule(120, **early) == 0.0  # first restart after the initial warmup
    # A restart at 90 whose ramp straddles the end of the warmup continues its own ramp from j = 10.
    straddle = dict(restart_every=45, restart_warmup_steps=20)
    assert _schedule(90, **straddle) == 0.9
    assert _schedule(100, **straddle) == pytest.approx(0.5 * _envelope(100), rel=1e-12, abs=0)
    assert _schedule(110, **straddle) == pytest.approx(_envelope(110), rel=1e-12, abs=0)


def test_no_warmups():
    assert _schedule(0, warmup_steps=0) == 1.0
    assert _schedule(250, restart_warmup_steps=0) == pytest.approx(_envelope(250), rel=1e-12, abs=0)


def test_schedule_inside_lambda_lr():
    base_lr = 3e-4
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=base_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(jagged_cosine, **SCHEDULE))
    for step in range(1300):
        assert scheduler.get_last_lr()[0] == base_lr * jagged_cosine(step, **SCHEDULE), f"step {step}"
        assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize(
    "step, overrides, name",
    [
        (-1, {}, "step"),
        (1.5, {}, "step"),
        (True, {}, "step"),
        (0, {"max_steps": 100}, "max_steps"),  # == warmup_steps
        (0, {"max_steps": 50}, "max_steps"),
        (0, {"warmup_steps": -1}, "warmup_steps"),
        (0, {"restart_every": 0}, "restart_every"),
        (0, {"restart_warmup_steps": -1}, "restart_warmup_steps"),
        (0, {"restart_warmup_steps": 251}, "restart_warmup_steps"),  # > restart_every
        (0, {"min_lr_ratio": -0.1}, "min_lr_ratio"),
        (0, {"min_lr_ratio": 1.5}, "min_lr_ratio"),
        (0, {"min_lr_ratio": float("nan")}, "min_lr_ratio"),
    ],
)
def test_schedule_bad_args_raise(step, overrides, name):
    bad_value = overrides.get(name, step)
    with pytest.raises(ValueError, match=rf"{name} must .* got {bad_value!r}"):
        _schedule(step, **overrides)

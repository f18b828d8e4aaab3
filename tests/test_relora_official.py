"""ReLoRA as its authors' code (the paper's reference implementation) defines it, stated here independently, and this
package against it: equal where the two are meant to agree, and different exactly as documented where not.

The statement below is written from that code's behaviour and the paper, in this project's own words and code:

Learning rate (its "cosine_restarts" schedule, a LambdaLR multiplier of the 0-based scheduler step t, for a run of
N steps, first warm-up F, restarts every R steps, re-warm-up W, floor m):
    t < F                       t / F
    else, with k = t // R and j = t % R:
      t >= R and j < W          (j / W) * envelope(k * R + W)       a straight line up to the envelope's value
                                                                    at the end of the re-warm-up
      otherwise                 envelope(t)
    envelope(t) = m + (1 - m) * (1 + cos(pi * (t - F) / (N - F))) / 2      (not clamped past N)
A run with a warm start is two runs: a full-rank one, then a LoRA run from its weights with a fresh optimizer and
this schedule over the LoRA run's own steps (its own first warm-up to the peak).

Optimizer state at a restart: each moment tensor (exp_avg, exp_avg_sq) pruned on its own; "magnitude" keeps the
elements whose |value| exceeds the ratio-quantile of |values|; "random" keeps each element with probability
1 - ratio; a "reset" is random pruning at 0.999.

Merge: W += scale * B @ A; A re-drawn from U(-1/sqrt(K), 1/sqrt(K)) (kaiming-uniform with a = sqrt(5)); B = 0.
"""

from __future__ import annotations

import dataclasses
import math

import config
import pretrain_gpt2
import pytest
import torch
from torch import nn

import relora_kernels as rk
from relora_kernels.relora import jagged_cosine, prune_optimizer_state_

EPS64 = torch.finfo(torch.float64).eps


# --------------------------------------------------------------------------------------------------------------
# The statement
# --------------------------------------------------------------------------------------------------------------


def official_envelope(t: float, *, n: int, first_warmup: int, floor: float) -> float:
    return floor + (1 - floor) * (1 + math.cos(math.pi * (t - first_warmup) / max(1, n - first_warmup))) / 2


def official_multiplier(t: int, *, n: int, first_warmup: int, restart_every: int, rewarmup: int,
                        floor: float) -> float:
    if t < first_warmup:
        return t / max(1, first_warmup)
    k, j = divmod(t, restart_every)
    env = dict(n=n, first_warmup=first_warmup, floor=floor)
    if t >= restart_every and j < rewarmup:
        return j / max(1, rewarmup) * official_envelope(k * restart_every + rewarmup, **env)
    return official_envelope(t, **env)


def official_prune_moment(value: torch.Tensor, ratio: float) -> torch.Tensor:
    """Magnitude pruning of one moment tensor on its own."""
    magnitude = value.abs()
    threshold = torch.quantile(magnitude.flatten().float(), ratio)
    return value * (magnitude > threshold)


# --------------------------------------------------------------------------------------------------------------
# The schedule
# --------------------------------------------------------------------------------------------------------------

# The tiny preset of the example (examples/config.py): 300 steps, warm-up 30, restarts every 50, re-warm-up 10.
TINY = dict(max_steps=300, warmup_steps=30, restart_every=50, restart_warmup_steps=10, min_lr_ratio=0.1)


def _official_tiny(t: int) -> float:
    return official_multiplier(t, n=TINY["max_steps"], first_warmup=TINY["warmup_steps"],
                               restart_every=TINY["restart_every"], rewarmup=TINY["restart_warmup_steps"],
                               floor=TINY["min_lr_ratio"])


def _in_rewarmup(t: int) -> bool:
    k, j = divmod(t, TINY["restart_every"])
    return k >= 1 and j < TINY["restart_warmup_steps"] and t >= TINY["warmup_steps"]


def test_schedule_agrees_with_the_official_outside_the_rewarmups():
    # Both evaluate the same cosine in float64 by different but equivalent expressions: a few ulps apart at most.
    outside = [t for t in range(TINY["max_steps"]) if not _in_rewarmup(t)]
    assert len(outside) > 200
    for t in outside:
        assert abs(jagged_cosine(t, **TINY) - _official_tiny(t)) <= 4 * EPS64, t
    for t in range(TINY["warmup_steps"]):  # the first warm-up: the same fractions exactly
        assert jagged_cosine(t, **TINY) == _official_tiny(t) == t / TINY["warmup_steps"]


def test_rewarmup_follows_the_envelope_where_the_official_ramps_straight():
    # Documented: ours is envelope(t) * j / W; the official is envelope(k R + W) * j / W, lower by
    # (envelope(t) - envelope(k R + W)) * j / W, never more than the envelope's fall over one re-warm-up.
    R, W = TINY["restart_every"], TINY["restart_warmup_steps"]
    env = dict(n=TINY["max_steps"], first_warmup=TINY["warmup_steps"], floor=TINY["min_lr_ratio"])
    largest = 0.0
    for t in (t for t in range(TINY["max_steps"]) if _in_rewarmup(t)):
        k, j = divmod(t, R)
        ours, official = jagged_cosine(t, **TINY), _official_tiny(t)
        expected_gap = (official_envelope(t, **env) - official_envelope(k * R + W, **env)) * j / W
        assert abs((ours - official) - expected_gap) <= 8 * EPS64, t
        assert 0 <= ours - official <= official_envelope(k * R, **env) - official_envelope(k * R + W, **env), t
        largest = max(largest, ours - official)
    # The figure docs/DESIGN.md gives for the tiny preset's schedule: at most 1.3 % of the peak learning rate.
    assert 0.0130 < largest < 0.0131, largest


def test_past_the_end_ours_stays_at_the_floor_where_the_official_cosine_rises():
    t = TINY["max_steps"] + 25  # not in a re-warm-up (300 + 25 = 6 * 50 + 25)
    assert jagged_cosine(t, **TINY) == TINY["min_lr_ratio"]
    assert _official_tiny(t) > TINY["min_lr_ratio"] + 1e-3


@pytest.mark.parametrize("schedule", ["continuous", "restart"])
def test_example_schedules_against_the_official_statement(schedule):
    # continuous: one run's schedule over all steps, no dips during the full-rank warm start (the paper's runs,
    # which set the whole run's length and stopped the warm start early). restart: the LoRA phase is the
    # official second run, its schedule counted from the switch with a first warm-up of its own to the peak.
    cfg = config.resolve_config({"lora_schedule": schedule}, None, torch.device("cpu"))
    start, steps, R, W = cfg.warmup_full_steps, cfg.max_steps, cfg.restart_every, cfg.restart_warmup_steps
    for step in range(1, steps + 1):
        t = step - 1  # the example's step `step` runs at scheduler index step - 1
        if schedule == "restart" and t >= start:  # the second run, its steps counted from the switch
            t, n, rewarm = t - start, steps - start, W
        else:
            n, rewarm = steps, W if t >= start else 0  # no dips in the full-rank warm start
        if t < cfg.warmup_steps:  # the example's warm-ups read one index ahead: no step at rate 0
            t += 1
        env = dict(n=n, first_warmup=cfg.warmup_steps, floor=cfg.min_lr_ratio)
        official = official_multiplier(t, restart_every=R, rewarmup=rewarm, **env)
        ours = pretrain_gpt2.lr_at(cfg, step) / cfg.lr
        k, j = divmod(t, R)
        gap = 0.0
        if t >= R and j < rewarm:  # the documented difference of the re-warm-up's shape
            gap = (official_envelope(t, **env) - official_envelope(k * R + W, **env)) * j / W
        assert abs(ours - official - gap) <= 8 * EPS64, (step, ours, official, gap)
    # The LoRA phase's mean learning rate, as a fraction of the peak: the restart schedule's is higher.
    mean = sum(pretrain_gpt2.lr_at(cfg, s) for s in range(start + 1, steps + 1)) / (steps - start) / cfg.lr
    assert mean == pytest.approx({"continuous": 0.357, "restart": 0.496}[schedule], abs=5e-4)


def test_restart_schedule_options_are_checked():
    with pytest.raises(config.UsageError, match="--lora_schedule 'jagged' is not one of continuous, restart"):
        config.resolve_config({"lora_schedule": "jagged"}, None, torch.device("cpu"))
    with pytest.raises(config.UsageError, match=r"needs --warmup_full_steps \(120\) to be a multiple of "
                                                r"--restart_every \(50\)"):
        config.resolve_config({"lora_schedule": "restart", "warmup_full_steps": 120}, None, torch.device("cpu"))
    assert "lora_schedule" in config.RUN_DEFINING  # a resumed run cannot switch schedules halfway


def test_restart_is_the_default_and_older_checkpoints_keep_continuous():
    cpu = torch.device("cpu")
    assert config.resolve_config({}, None, cpu).lora_schedule == "restart"  # it won the side-by-side run
    # A checkpoint written before the option existed was trained with the continuous schedule: it resumes so,
    # with or without the option on the command line, and cannot be switched to restart halfway.
    older = dataclasses.asdict(config.resolve_config({"lora_schedule": "continuous"}, None, cpu))
    del older["lora_schedule"]
    assert config.resolve_config({}, older, cpu).lora_schedule == "continuous"
    assert config.resolve_config({"lora_schedule": "continuous"}, older, cpu).lora_schedule == "continuous"
    with pytest.raises(config.UsageError, match="--lora_schedule=restart differs from the checkpoint's 'continuous'"):
        config.resolve_config({"lora_schedule": "restart"}, older, cpu)


def test_restart_schedule_starts_the_lora_phase_with_a_fresh_optimizer(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "merge the low rank factors into the frozen weight then restart them while the loss falls".split()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text("\n".join(" ".join(words[(i + k) % len(words):] + words[:k])
                                                      for k in range(60)) + "\n")
    carried = {}

    def start_lora_phase(run, step):
        before = {name for name, p in run.model.named_parameters() if run.optimizer.state.get(p)}
        original(run, step)
        after = {name for name, p in run.model.named_parameters() if run.optimizer.state.get(p)}
        trainable = {name for name, p in run.model.named_parameters() if p.requires_grad}
        carried.update(before=before, after=after, trainable=trainable, step=step)

    original = pretrain_gpt2.start_lora_phase
    monkeypatch.setattr(pretrain_gpt2, "start_lora_phase", start_lora_phase)
    args = ["--data", str(corpus), "--cache_dir", str(tmp_path / "cache"), "--device", "cpu", "--n_layer", "1",
            "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--vocab_size", "300", "--batch_size", "2",
            "--eval_batches", "1", "--sample_tokens", "0", "--lora_r", "2", "--max_steps", "6",
            "--warmup_full_steps", "2", "--restart_every", "2", "--restart_warmup_steps", "1", "--warmup_steps",
            "1", "--eval_every", "6", "--ckpt_every", "6"]
    pretrain_gpt2.train([*args, "--lora_schedule", "restart", "--out_dir", str(tmp_path / "run")])
    # The embeddings, norms and biases had Adam state and stay trainable (--lora_schedule continuous carries
    # their state over); a fresh optimizer starts with none.
    assert carried["step"] == 3 and {"wte.weight", "ln_f.weight"} <= carried["before"] & carried["trainable"]
    assert carried["after"] == set()


# --------------------------------------------------------------------------------------------------------------
# Pruning and the merge
# --------------------------------------------------------------------------------------------------------------


def _adam_state_with_a_heavy_first_moment(numel: int = 400) -> tuple[nn.Parameter, torch.optim.AdamW]:
    """Adam state as after training with a gradient that shrank: where |exp_avg| is largest, exp_avg_sq is small."""
    p = nn.Parameter(torch.zeros(numel))
    optimizer = torch.optim.AdamW([p], lr=1e-4)
    p.grad = torch.zeros(numel)
    optimizer.step()
    generator = torch.Generator().manual_seed(0)
    rank = torch.randperm(numel, generator=generator).double() + 1
    optimizer.state[p]["exp_avg"].copy_(rank / numel * 1e-3)
    optimizer.state[p]["exp_avg_sq"].copy_((numel + 1 - rank) / numel * 1e-6)
    return p, optimizer


@pytest.mark.parametrize("ratio", [0.9, 0.99])
def test_official_pruning_leaves_first_moments_without_second_ones_and_ours_does_not(ratio):
    p, optimizer = _adam_state_with_a_heavy_first_moment()
    m, v = (optimizer.state[p][key].clone() for key in ("exp_avg", "exp_avg_sq"))
    official_m, official_v = official_prune_moment(m, ratio), official_prune_moment(v, ratio)
    stranded = (official_m != 0) & (official_v == 0)
    assert stranded.sum() == (official_m != 0).sum() > 0  # every kept first moment lost its second one
    prune_optimizer_state_(optimizer, [p], ratio=ratio)
    ours_m, ours_v = (optimizer.state[p][key].clone() for key in ("exp_avg", "exp_avg_sq"))
    assert torch.equal(ours_m != 0, ours_v != 0)
    assert int((ours_m != 0).sum()) == round((1 - ratio) * p.numel())  # the exact count
    # The next Adam update (zero gradient): the official state's stranded elements step by about lr * m / eps.
    for state_m, state_v, bound in ((official_m, official_v, None), (ours_m, ours_v, 10.0)):
        optimizer.state[p]["exp_avg"].copy_(state_m)
        optimizer.state[p]["exp_avg_sq"].copy_(state_v)
        before = p.detach().clone()
        optimizer.step()
        largest = ((p.detach() - before).abs().max() / optimizer.param_groups[0]["lr"]).item()
        if bound is None:
            assert largest > 1e3  # hundreds of times any step Adam takes from sound state
        else:
            assert largest <= bound  # |m_hat| / sqrt(v_hat) of the kept elements: below 10 here


def test_merge_and_redraw_match_the_official_statement():
    torch.manual_seed(0)
    layer = rk.LoRALinear(256, 64, r=64, alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_()
    w, a, b = (t.detach().double().clone() for t in (layer.weight, layer.lora_A, layer.lora_B))
    layer.merge_and_reinit(seed=5)
    merged = w + layer.scale * (b @ a)
    # One fp32 merge of r products per element (see tests/test_merge.py for the kernel's own bound).
    slack = 64 * torch.finfo(torch.float32).eps * (w.abs() + layer.scale * (b.abs() @ a.abs()))
    assert ((layer.weight.double() - merged).abs() <= slack).all()
    assert not layer.lora_B.any()
    # A ~ U(-1/sqrt(K), 1/sqrt(K)): inside the bounds, and a Kolmogorov-Smirnov distance below the 0.1 % critical
    # value 1.95 / sqrt(n) of its 16384 draws (seeded: the same draws every run).
    bound = 1 / math.sqrt(256)
    draws = layer.lora_A.detach().double().flatten().sort().values
    assert draws.abs().max() <= bound
    n = draws.numel()
    cdf = (draws + bound) / (2 * bound)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    distance = torch.maximum(ranks / n - cdf, cdf - (ranks - 1) / n).max().item()
    assert distance < 1.95 / math.sqrt(n), distance

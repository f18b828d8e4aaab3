"""The warm-up floor of short runs: a stretched preset keeps at least an Adam-sized warm-up, the presets' own runs
and longer ones keep exactly the schedule they had, and a 60-step run trains without a loss spike."""

from __future__ import annotations

import hashlib
import math

import config
import pretrain_gpt2
import pytest
import torch
from test_pretrain_example import read_rows, write_corpus

from relora_kernels.relora import jagged_cosine

CPU = torch.device("cpu")

# sha256 of repr([lr_at(cfg, step) for every step]) for these runs: the warm-up floor leaves the presets' own runs
# and longer ones exactly as they are, and the published losses were trained on these schedules.
SCHEDULES = [
    ({}, 30, "7f01b6c86cf3a7fab08fcd7512b07d6231e8397021e0ae54d762df21971f9444"),
    ({"max_steps": 1200}, 120, "1fe07da9a8f864b97218676a5a0867b9adb48e796600f23a35b80c9bc29b4b84"),
    ({"mode": "full"}, 30, "1febb4283798a807a59b8b04943663651e1f2e36681d7aa9f35365ecd84347c0"),
    ({"mode": "full", "max_steps": 1200}, 120, "72777ec6a3fd9cd8e7dd7df1be35371cc6ee7db5f33463253912ef1e305b9a31"),
    ({"mode": "lora"}, 30, "1febb4283798a807a59b8b04943663651e1f2e36681d7aa9f35365ecd84347c0"),
    ({"lora_schedule": "continuous"}, 30, "065dafd5fa984dc92655f1ed502d6f755a47a7d27f4c9f9077acc1b862af1799"),
    ({"lora_schedule": "continuous", "max_steps": 1200}, 120,
     "2738233e7150c3d67e1e744e078ef328b971b7d8413f0b5328f5b16c5f77d111"),
    ({"preset": "gpt2-124m"}, 200, "6a727aec9e2600d939dc3ee8579ab3c6d36ba3a3480cb28e4113837b9890fc7a"),
    ({"preset": "gpt2-124m", "max_steps": 10000}, 400,
     "7a5e27978bdb2a6aa23ac6b4a03c33f3c9a2e8026305f06380bb8bd8d6ae7767"),
]


@pytest.mark.parametrize("given, warmup, digest", SCHEDULES, ids=lambda v: repr(v)[:40])
def test_the_presets_and_longer_runs_keep_exactly_their_schedule(given, warmup, digest):
    cfg = config.resolve_config(dict(given), None, CPU)
    lrs = [pretrain_gpt2.lr_at(cfg, step) for step in range(1, cfg.max_steps + 1)]
    assert cfg.warmup_steps == warmup
    assert hashlib.sha256(repr(lrs).encode()).hexdigest() == digest
    assert lrs[0] == cfg.lr / warmup > 0


def lambdalr_indexed_lr(cfg, step: int) -> float:
    """lr_at with every phase read at LambdaLR's index step - 1, the warm-ups included (step 1 then runs at rate 0):
    the schedule lr_at must equal at every step after its warm-ups."""
    restarting = cfg.mode == "relora" and step - 1 >= cfg.warmup_full_steps
    shape = dict(warmup_steps=cfg.warmup_steps, restart_every=cfg.restart_every, min_lr_ratio=cfg.min_lr_ratio)
    if restarting and cfg.lora_schedule == "restart":
        return cfg.lr * jagged_cosine(step - 1 - cfg.warmup_full_steps, max_steps=cfg.max_steps - cfg.warmup_full_steps,
                                      restart_warmup_steps=cfg.restart_warmup_steps, **shape)
    return cfg.lr * jagged_cosine(step - 1, max_steps=cfg.max_steps,
                                  restart_warmup_steps=cfg.restart_warmup_steps if restarting else 0, **shape)


WARM_UP_CASES = [given for given, _, _ in SCHEDULES] + [
    {"max_steps": 60}, {"max_steps": 60, "lora_schedule": "continuous"}, {"max_steps": 60, "warmup_steps": 6},
    {"preset": "llama-tiny"}, {"max_steps": 10, "mode": "full"},
    # a warm-up longer than a restart cycle: the switch to LoRA (step 21) falls inside the global warm-up
    {"max_steps": 60, "warmup_steps": 25, "lora_schedule": "continuous"},
]


@pytest.mark.parametrize("given", WARM_UP_CASES, ids=lambda v: repr(v)[:40])
def test_the_warm_ups_start_at_step_one_and_every_later_step_is_unchanged(given):
    """Step j of a warm-up runs at lr * j / warmup_steps, so step 1 is above 0 and step warmup_steps is at the peak;
    the warm-ups are the global one (steps 1 to warmup_steps) and, under --lora_schedule restart, the LoRA phase's
    own (from step warmup_full_steps + 1). Every other step keeps its value bit for bit: the restart dips, the switch
    to LoRA under continuous, the cosine."""
    cfg = config.resolve_config(dict(given), None, CPU)
    warm_ups = [1]
    if cfg.mode == "relora" and cfg.lora_schedule == "restart":
        warm_ups.append(cfg.warmup_full_steps + 1)
    in_warm_up = {first + j: j + 1 for first in warm_ups for j in range(cfg.warmup_steps)}
    assert pretrain_gpt2.lr_at(cfg, 1) > 0
    for step in range(1, cfg.max_steps + 1):
        lr = pretrain_gpt2.lr_at(cfg, step)
        if step in in_warm_up:
            assert lr == cfg.lr * (in_warm_up[step] / cfg.warmup_steps), step
        else:
            assert lr == lambdalr_indexed_lr(cfg, step), step
    for first in warm_ups:
        assert pretrain_gpt2.lr_at(cfg, first + cfg.warmup_steps - 1) == cfg.lr


@pytest.mark.parametrize("given, warmup", [
    ({"max_steps": 60}, 20),  # relora, restart schedule: half of the 40-step LoRA phase
    ({"max_steps": 60, "mode": "full"}, 30),  # the preset's own 30 (below 2 / (1 - 0.95) = 40), half of 60
    ({"max_steps": 60, "lora_schedule": "continuous"}, 30),
    ({"preset": "gpt2-124m", "max_steps": 500}, 40),  # stretched to 20, raised to 2 / (1 - beta2)
    ({"max_steps": 10, "mode": "full"}, 5),
    ({"max_steps": 60, "warmup_steps": 6}, 6),  # an explicit warm-up is the user's
])
def test_a_stretched_warmup_gets_the_floor(given, warmup):
    assert config.resolve_config(dict(given), None, CPU).warmup_steps == warmup


def test_the_floor_is_adams_averaging_time():
    assert config.adam_warmup_floor(0.95) == 40 and config.adam_warmup_floor(0.999) == 2000


@pytest.fixture
def one_thread():
    # As the example's other runs in the tests: one thread, which a loaded 2-core machine runs fastest, and the
    # arithmetic the figures below were measured with.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_60_step_run_has_no_loss_spike(tmp_path, one_thread):
    """A model wide enough to spike at the stretched 6-step warm-up (its loss jumped 1.97 nats above its best so
    far at step 6, grad norm 21), trained for 60 steps with the preset's schedule otherwise. No step's training
    loss may exceed the lowest loss before it by more than ln 2: the model would then give the batch's tokens on
    average less than half the probability it gave the best batch so far, far beyond the batch-to-batch noise here
    (with the floor the largest such rise was 0.20 nats)."""
    out = tmp_path / "run"
    args = ["--data", str(write_corpus(tmp_path / "corpus")), "--cache_dir", str(tmp_path / "cache"), "--out_dir",
            str(out), "--device", "cpu", "--vocab_size", "320", "--n_layer", "2", "--n_head", "4", "--n_embd", "256",
            "--block_size", "64", "--batch_size", "4", "--eval_batches", "1", "--sample_tokens", "0",
            "--max_steps", "60", "--eval_every", "60", "--ckpt_every", "60"]
    assert pretrain_gpt2.main(args) == 0
    losses = [row["train_loss"] for row in read_rows(out) if row.get("train_loss") is not None]
    assert len(losses) == 60
    rises = [loss - min(losses[:i]) for i, loss in enumerate(losses) if i]
    assert max(rises) < math.log(2), f"step {rises.index(max(rises)) + 2} rose {max(rises):.2f} nats: {losses}"
    assert losses[-1] < losses[0] - 1.0  # and it trained

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

CPU = torch.device("cpu")

# sha256 of repr([lr_at(cfg, step) for every step]) for these runs, computed with the code before the floor
# existed: the floor must leave them bit for bit as they were (the published losses were trained on them).
SCHEDULES_BEFORE_THE_FLOOR = [
    ({}, 30, "26d2a8f06a05f8d3e73a5345bb43fba4dd2fb116c57b3ed0b25f5fb0d4ca0c2f"),
    ({"max_steps": 1200}, 120, "e0306ac83204c8d118ca4d5a22ddd37f3ba3c86a66843a2b62014ca88abb1cc1"),
    ({"mode": "full"}, 30, "6be44d035bd2fb549282bdd090552b59ca9c77f77f5c2ef66ca8e3e45b539061"),
    ({"mode": "full", "max_steps": 1200}, 120, "2d1db5d1d9fbbb1759a45ab54c4412d6b05997a4bdd35b07d0c397ea29c2fc72"),
    ({"mode": "lora"}, 30, "6be44d035bd2fb549282bdd090552b59ca9c77f77f5c2ef66ca8e3e45b539061"),
    ({"lora_schedule": "continuous"}, 30, "0aa32c7b46ebab0b9b7e1198b37ab8707fc97afc09d85342995f890eae4127a6"),
    ({"lora_schedule": "continuous", "max_steps": 1200}, 120,
     "0abf6f0456970bee974770114fafda37c69ed6bb609861b4c6009a9ce98bd98a"),
    ({"preset": "gpt2-124m"}, 200, "4b5cf5c093e2bb6d48ee076cf1bb5ae9c74e7caa3421255ae39d3d7c65828b3a"),
    ({"preset": "gpt2-124m", "max_steps": 10000}, 400,
     "988b65ff9c96524103713616cb911ff70d803ee6933a9902e5f4647e2fd22a43"),
]


@pytest.mark.parametrize("given, warmup, digest", SCHEDULES_BEFORE_THE_FLOOR, ids=lambda v: repr(v)[:40])
def test_the_presets_and_longer_runs_keep_exactly_their_schedule(given, warmup, digest):
    cfg = config.resolve_config(dict(given), None, CPU)
    lrs = [pretrain_gpt2.lr_at(cfg, step) for step in range(1, cfg.max_steps + 1)]
    assert cfg.warmup_steps == warmup
    assert hashlib.sha256(repr(lrs).encode()).hexdigest() == digest
    assert lrs[0] == 0.0  # the first step still runs at lr 0, as every published figure did


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
    """A model wide enough to spike at the stretched 6-step warm-up (its loss jumped 1.59 nats above its best so
    far at step 7, grad norm 30), trained for 60 steps with the preset's schedule otherwise. No step's training
    loss may exceed the lowest loss before it by more than ln 2: the model would then give the batch's tokens on
    average less than half the probability it gave the best batch so far, far beyond the batch-to-batch noise here
    (with the floor the largest such rise was 0.21 nats)."""
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

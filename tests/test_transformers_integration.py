"""ReLoRA in the Hugging Face Trainer (relora_kernels.integrations.transformers): restarts at the right global steps
doing exactly what ReLoRA.step does, the function kept across each restart, only the LoRA optimizer state pruned,
the jagged learning rate in the Trainer's logs, exact resume from a checkpoint, identical DDP ranks, bad input, and
no transformers import from the core package. Tiny GPT-2 (Conv1D) and Llama (nn.Linear) configs built locally.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import transformers  # the dev extra's
from helpers import assert_within_torch_error

import relora_kernels as rk
from relora_kernels.integrations.transformers import ReLoRACallback, jagged_cosine_scheduler
from relora_kernels.relora import ReLoRA, jagged_cosine

pytestmark = pytest.mark.slow  # Trainer runs and a torchrun launch
ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, BATCH = 96, 16, 4
MAX_STEPS, WARMUP, RESTART_EVERY, RESTART_WARMUP = 12, 2, 4, 2
PRUNE_RATIO, LR, SEED = 0.75, 1e-2, 3
SAVE_EVERY = 2
# Where each family's run is resumed: at a restart (its checkpoint holds the merged model) and between two.
RESUME_FROM = {"gpt2": 4, "llama": 6}
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


class TokenDataset(torch.utils.data.Dataset):
    """n random sequences of token ids, labels = input_ids (the causal LM shifts them)."""

    def __init__(self, n: int, seed: int):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def make_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_layer=2, n_head=2, n_embd=32,
                                          bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ)
        model = transformers.LlamaForCausalLM(config)
    return rk.apply_lora(model, TARGETS[family], r=4, alpha=8)


def make_trainer(model, out_dir, callbacks, *, max_steps=MAX_STEPS, save_steps=SAVE_EVERY):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    scheduler = jagged_cosine_scheduler(optimizer, max_steps=MAX_STEPS, warmup_steps=WARMUP,
                                        restart_every=RESTART_EVERY, restart_warmup_steps=RESTART_WARMUP)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=BATCH, logging_steps=1,
        save_strategy="steps", save_steps=save_steps, report_to="none", disable_tqdm=True, use_cpu=True, seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(MAX_STEPS * BATCH, seed=1),
                                optimizers=(optimizer, scheduler), callbacks=callbacks)


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, rk.LoRALinear)]


def lora_layer_names(model):
    return [name for name, m in model.named_modules() if isinstance(m, rk.LoRALinear)]


def snapshot(model, optimizer) -> dict:
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    names = {id(p): name for name, p in model.named_parameters()}
    state = {names[id(p)]: {k: v.clone() for k, v in optimizer.state[p].items()}
             for group in optimizer.param_groups for p in group["params"] if p in optimizer.state}
    return {"params": params, "state": state}


EVAL_IDS = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def eval_logits_and_loss(model):
    was_training = model.training
    model.eval()
    out = model(input_ids=EVAL_IDS, labels=EVAL_IDS)
    model.train(was_training)
    return out.logits, out.loss.item()


class BeforeReLoRA(transformers.TrainerCallback):
    """Runs just before ReLoRACallback.on_step_end: what the model and optimizer hold after the optimizer step,
    and at restart steps an oracle, ReLoRA.step applied to a deep copy of both."""

    def __init__(self):
        self.seen, self.lr_used = {}, {}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # Between the optimizer's step and the scheduler's: the learning rate this step ran at.
        self.lr_used[state.global_step + 1] = optimizer.param_groups[0]["lr"]

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        record = {"snapshot": snapshot(model, optimizer)}
        if state.global_step % RESTART_EVERY == 0:
            record["logits"], record["loss"] = eval_logits_and_loss(model)
            record["logits64"] = eval_logits_and_loss(copy.deepcopy(model).double())[0]
            without_lora = copy.deepcopy(model)
            for layer in lora_layers(without_lora):
                layer.lora_B.data.zero_()
            record["logits_without_lora"] = eval_logits_and_loss(without_lora)[0]
            # One deepcopy of both keeps the copied optimizer keyed by the copied parameters; the Trainer's optimizer
            # is accelerate's wrapper around the torch one.
            oracle_model, oracle_opt = copy.deepcopy((model, optimizer.optimizer))
            ReLoRA(oracle_model, oracle_opt, restart_every=RESTART_EVERY, prune_ratio=PRUNE_RATIO,
                   seed=SEED).step(state.global_step)
            record["oracle"] = snapshot(oracle_model, oracle_opt)
        self.seen[state.global_step] = record


class AfterReLoRA(transformers.TrainerCallback):
    """Runs just after ReLoRACallback.on_step_end."""

    def __init__(self):
        self.seen = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        record = {"snapshot": snapshot(model, optimizer)}
        if state.global_step % RESTART_EVERY == 0:
            record["logits"], record["loss"] = eval_logits_and_loss(model)
        self.seen[state.global_step] = record


class TrainingLosses:
    """Forward hook: the exact training loss of every micro-batch (the Trainer's logs average and round)."""

    def __init__(self, model):
        self.losses = []
        model.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        if module.training:
            self.losses.append(output.loss.item())


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def run(request, tmp_path_factory):
    """One 12-step Trainer run with restart_every=4, checkpoints every 2 steps, probes around the callback."""
    family = request.param
    model = make_model(family)
    before, after = BeforeReLoRA(), AfterReLoRA()
    relora = ReLoRACallback(RESTART_EVERY, prune_ratio=PRUNE_RATIO, seed=SEED)
    losses = TrainingLosses(model)
    out_dir = tmp_path_factory.mktemp(f"run_{family}")
    trainer = make_trainer(model, out_dir, [before, relora, after])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return {"warnings": [str(w.message) for w in caught if "ReLoRACallback" in str(w.message)], "family": family,
            "trainer": trainer, "model": model, "callback": relora, "out_dir": out_dir, "before": before.seen,
            "after": after.seen, "lr_used": before.lr_used, "losses": losses.losses}


def changed(a: dict, b: dict) -> set[str]:
    """Names of the parameters and optimizer-state entries that differ between two snapshots."""
    names = {name for name in a["params"] if not torch.equal(a["params"][name], b["params"][name])}
    for name in a["state"]:
        names |= {f"{name}:{key}" for key in a["state"][name] if not torch.equal(a["state"][name][key],
                                                                                   b["state"][name][key])}
    return names


def test_restarts_at_multiples_of_restart_every_exactly_as_relora_step(run):
    restarted = [step for step in sorted(run["after"]) if changed(run["before"][step]["snapshot"],
                                                                  run["after"][step]["snapshot"])]
    # 12 is the last step: a restart after it would merge and re-draw for nothing.
    assert restarted == [4, 8] and run["callback"].restarts == 2
    assert run["trainer"].state.global_step == MAX_STEPS
    for step in restarted:
        oracle, got = run["before"][step]["oracle"], run["after"][step]["snapshot"]
        assert not changed(oracle, got), f"step {step}: the callback and ReLoRA.step differ in {changed(oracle, got)}"
        assert all(not got["params"][name].any() for name in got["params"] if name.endswith("lora_B"))


def test_restart_keeps_the_function(run):
    for step in (4, 8):
        before, after = run["before"][step], run["after"][step]
        # The float64 copy computes the function before the merge without rounding; after the merge the fp32
        # model must be as close to it as fp32 evaluation before the merge was (the project's error rule).
        assert_within_torch_error(f"logits after restart {step}", after["logits"],
                                  exact=before["logits64"], torch_same_dtype=before["logits"])
        # The eval loss (mean cross-entropy over T tokens) moves by at most 2 * max |logit change| (its gradient has
        # L1 norm <= 2 per token), plus its own fp32 rounding in each evaluation: log-softmax within a few ulps of
        # log V + max |logit| per token, and the mean over T tokens at most T ulps of the loss (the classical
        # summation bound).
        logit_change = (after["logits"] - before["logits"]).abs().max().item()
        tokens = EVAL_IDS[:, 1:].numel()
        rounding = torch.finfo(torch.float32).eps * (math.log(VOCAB) + before["logits"].abs().max().item()
                                                     + tokens * before["loss"])
        assert abs(after["loss"] - before["loss"]) <= 2 * logit_change + 2 * rounding, step
        # The check can fail: a restart that dropped B @ A instead of merging it would change the logits this much.
        with pytest.raises(AssertionError, match="exceed the bound"):
            assert_within_torch_error("logits without the LoRA update", before["logits_without_lora"],
                                      exact=before["logits64"], torch_same_dtype=before["logits"])


def test_prunes_lora_state_by_the_ratio_and_touches_nothing_else(run):
    # What a restart may change: the LoRA factors and the weights they merge into; everything else stays bit-equal.
    restarted = {f"{layer}.{p}" for layer in lora_layer_names(run["model"]) for p in ("weight", "lora_A", "lora_B")}
    for step in (4, 8):
        before, after = run["before"][step]["snapshot"], run["after"][step]["snapshot"]
        pruned = untouched = 0
        for name, state in before["state"].items():
            if name.endswith(("lora_A", "lora_B")):
                old_m, old_v = state["exp_avg"], state["exp_avg_sq"]
                new_m, new_v = after["state"][name]["exp_avg"], after["state"][name]["exp_avg_sq"]
                # One mask for both moments: each element keeps both (unchanged) or loses both.
                kept = new_m.eq(old_m) & new_v.eq(old_v)
                assert (kept | (new_m.eq(0) & new_v.eq(0))).all(), (step, name)
                # The kept ones are those whose update |m| / (sqrt(v) + eps) is largest (AdamW's eps 1e-8), at
                # most n_keep of the elements that had state (zeros of old and new state are indistinguishable).
                score = old_m.abs() / (old_v.sqrt() + 1e-8)
                live = old_m.ne(0) | old_v.ne(0)
                n_keep = round((1 - PRUNE_RATIO) * old_m.numel())
                assert int((kept & live).sum()) <= n_keep, (step, name)
                if (kept & live).any() and (live & ~kept).any():
                    assert score[kept & live].min() >= score[live & ~kept].max(), (step, name)
                pruned += int(live.sum()) > n_keep
                assert torch.equal(after["state"][name]["step"], state["step"])
            else:
                for key, value in state.items():
                    assert torch.equal(after["state"][name][key], value), (step, name, key)
                untouched += 1
        assert pruned and untouched, (step, pruned, untouched)  # both kinds of state were there to check
        for name, value in before["params"].items():
            if name not in restarted:
                assert torch.equal(after["params"][name], value), (step, name)


def test_learning_rate_follows_the_jagged_schedule(run):
    expected = [LR * jagged_cosine(s - 1, max_steps=MAX_STEPS, warmup_steps=WARMUP, restart_every=RESTART_EVERY,
                                   restart_warmup_steps=RESTART_WARMUP) for s in range(1, MAX_STEPS + 1)]
    used = [run["lr_used"][s] for s in range(1, MAX_STEPS + 1)]
    assert used == expected
    assert expected[RESTART_EVERY] == 0.0 == expected[2 * RESTART_EVERY]  # the step after a restart
    assert run["warnings"] == []  # so the callback does not warn about the schedule
    logged = {row["step"]: row["learning_rate"] for row in run["trainer"].state.log_history if "learning_rate" in row}
    assert sorted(logged) == list(range(1, MAX_STEPS + 1))
    if "learning_rate" in inspect.signature(transformers.Trainer._maybe_log_save_evaluate).parameters:
        shift = 0  # newer transformers (checked: 4.57, 5.24) log the learning rate the step ran at
    else:
        shift = 1  # older ones (checked: 4.46) log the scheduler's value after its step, the next step's
    assert [logged[s] for s in range(1, MAX_STEPS + 1 - shift)] == expected[shift:]


def test_warns_once_about_a_scheduler_that_does_not_rewarm_at_restarts(tmp_path):
    model = make_model("gpt2")
    trainer = make_trainer(model, tmp_path, [ReLoRACallback(RESTART_EVERY, prune_ratio=PRUNE_RATIO, seed=SEED)],
                           max_steps=2 * RESTART_EVERY + 1, save_steps=100)
    optimizer = trainer.optimizer
    trainer.lr_scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, WARMUP, 2 * RESTART_EVERY + 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
                and "ReLoRACallback" in str(w.message)]
    assert len(messages) == 1, messages  # two restarts, one warning
    assert f"after the restart at step {RESTART_EVERY}" in messages[0]
    assert "jagged_cosine_scheduler" in messages[0]


def test_resume_from_a_checkpoint_continues_exactly(run, tmp_path):
    # The run's own checkpoint, written before its later steps ran: what a run killed after it left on disk.
    resume_step = RESUME_FROM[run["family"]]
    checkpoint = run["out_dir"] / f"checkpoint-{resume_step}"
    model = make_model(run["family"])
    for p in model.parameters():  # nothing of the fresh model may survive the load
        p.data.add_(1.0)
    relora = ReLoRACallback(RESTART_EVERY, prune_ratio=PRUNE_RATIO, seed=SEED)
    losses = TrainingLosses(model)
    trainer = make_trainer(model, tmp_path, [relora])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert losses.losses == run["losses"][resume_step:]
    assert len(losses.losses) == MAX_STEPS - resume_step
    assert relora.restarts == 2 == run["callback"].restarts
    for (name, p), q in zip(model.named_parameters(), run["model"].parameters(), strict=True):
        assert torch.equal(p, q), name


def test_two_gloo_ranks_hold_identical_factors_after_a_restart(tmp_path):
    # One thread per process: two processes on two cores must not oversubscribe them.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "transformers_ddp_worker.py"), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert not torch.equal(ranks[0]["first_ids"][0], ranks[1]["first_ids"][0])  # each rank trained on its own shard
    for step in (1, 2, 3):
        params = [rank["steps"][step] for rank in ranks]
        for name in params[0]:
            assert torch.equal(params[0][name], params[1][name]), (step, name)
    restart, before = ranks[0]["steps"][2], ranks[0]["steps"][1]
    lora_a = [name for name in restart if name.endswith("lora_A")]
    assert lora_a and all(not restart[name.replace("lora_A", "lora_B")].any() for name in lora_a)
    assert all(not torch.equal(restart[name], before[name]) for name in lora_a)  # re-drawn at the restart


def test_bad_arguments():
    with pytest.raises(ValueError, match="restart_every must be an integer >= 1"):
        ReLoRACallback(0)
    with pytest.raises(ValueError, match="ratio must be a real number in \\[0, 1\\]"):
        ReLoRACallback(4, prune_ratio=1.5)
    with pytest.raises(ValueError, match="prune_method must be one of"):
        ReLoRACallback(4, prune_method="largest")
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        ReLoRACallback(4, seed=-1)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="restart_warmup_steps must be <= restart_every"):
        jagged_cosine_scheduler(optimizer, max_steps=10, warmup_steps=1, restart_every=2, restart_warmup_steps=3)
    with pytest.raises(ValueError, match="max_steps must be > warmup_steps"):
        jagged_cosine_scheduler(optimizer, max_steps=1, warmup_steps=1, restart_every=2, restart_warmup_steps=1)


def test_bad_model_or_optimizer_is_refused_when_training_begins(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="model has no LoRALinear layers"):
        ReLoRACallback(2).on_train_begin(args, state, control, model=model,
                                         optimizer=torch.optim.AdamW(model.parameters()))
    rk.apply_lora(model, ["1"], r=2)
    only_first = torch.optim.AdamW(model[0].parameters())
    with pytest.raises(ValueError, match=r"optimizer lacks 2 LoRA factors of the model \(1.lora_A, 1.lora_B\)"):
        ReLoRACallback(2).on_train_begin(args, state, control, model=model, optimizer=only_first)
    with pytest.raises(TypeError, match="optimizer is None"):
        ReLoRACallback(2).on_train_begin(args, state, control, model=model, optimizer=None)
    sharded = types.SimpleNamespace(deepspeed=None, fsdp="full_shard")
    with pytest.raises(ValueError, match="does not support DeepSpeed or FSDP"):
        ReLoRACallback(2).on_train_begin(sharded, state, control, model=model, optimizer=only_first)
    with pytest.raises(RuntimeError, match="before on_train_begin"):
        ReLoRACallback(2).on_step_end(args, state, control)


def test_import_relora_kernels_imports_nothing_from_transformers():
    code = ("import sys, relora_kernels, relora_kernels.integrations, relora_kernels.relora; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"

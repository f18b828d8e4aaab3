"""The example's --fp8: the LoRA layers run their frozen GEMMs on FP8 copies of W (LoRALinear frozen_dtype='fp8'),
through the switch to LoRA and a restart, with --fp8_master_cpu keeping the master weights on the CPU; under --fsdp
with each rank holding the copies of its rows, resumed exactly and at another world size; and the options it does
not take are refused by name."""

from __future__ import annotations

import math
import shutil

import config
import pretrain_gpt2
import pytest
import torch
from test_pretrain_example import RELORA_RUN, read_rows, run_script, tiny_args, torchrun, write_corpus

from relora_kernels import modules

CPU = torch.device("cpu")


@pytest.mark.parametrize("given, message", [
    ({"mode": "full", "fp8": True}, "--mode full has none"),
    ({"fp8_master_cpu": True}, "--fp8_master_cpu .* needs --fp8"),
])
def test_fp8_is_refused_where_it_does_not_apply(given, message):
    with pytest.raises(config.UsageError, match=message):
        config.resolve_config(dict(given), None, CPU)


@pytest.mark.slow
def test_a_relora_run_with_fp8_and_the_cpu_master_trains_on_the_fp8_copies(tmp_path, monkeypatch):
    fp8_calls, merged_into = [], []
    real, real_merge = modules.lora_linear_fp8, modules.merge_and_reinit_

    def counted(x, frozen, *args, **kwargs):
        fp8_calls.append(frozen.q.dtype)
        return real(x, frozen, *args, **kwargs)

    def merge(weight, *args, **kwargs):
        merged_into.append(type(weight))
        return real_merge(weight, *args, **kwargs)

    monkeypatch.setattr(modules, "lora_linear_fp8", counted)
    monkeypatch.setattr(modules, "merge_and_reinit_", merge)
    out = tmp_path / "run"
    # relora: 8 full-rank steps, the switch, a restart at step 16, 24 steps in all.
    args = tiny_args(write_corpus(tmp_path / "corpus"), tmp_path / "cache", out, "--fp8", "--fp8_master_cpu",
                     "--max_steps", "24", "--warmup_full_steps", "8", "--restart_every", "8",
                     "--restart_warmup_steps", "2", "--warmup_steps", "4", "--eval_every", "24", "--ckpt_every", "24")
    assert pretrain_gpt2.main(args) == 0
    rows = read_rows(out)
    losses = [row["train_loss"] for row in rows if row.get("train_loss") is not None]
    assert len(losses) == 24 and all(math.isfinite(loss) for loss in losses)
    vals = [row["val_loss"] for row in rows if row.get("val_loss") is not None]
    assert vals[-1] < vals[0]  # it trained
    # The LoRA phase (steps 9-24) ran every LoRA layer on e4m3 copies; the full-rank warm start ran none.
    assert fp8_calls and set(fp8_calls) == {torch.float8_e4m3fn}
    # The restart at step 16 merged every layer into a copy of its master (a plain tensor, not the Parameter).
    assert merged_into and set(merged_into) == {torch.Tensor}


@pytest.mark.slow
def test_fsdp_fp8_run_resumes_exactly_and_at_another_world_size(tmp_path):
    # --fsdp --fp8 at 2 processes (the tiny model's 32-wide layers and 128-wide MLP split by rows): uninterrupted,
    # and killed after the checkpoint of step 8 (after the LoRA phase's first restart), then resumed: the same
    # losses. That checkpoint also resumes at 4 processes, W resharded by DCP and its FP8 copies rebuilt per rank.
    corpus, cache = write_corpus(tmp_path / "corpus"), tmp_path / "cache"
    args = {run: tiny_args(corpus, cache, tmp_path / run, *RELORA_RUN, "--fsdp", "--fp8")
            for run in ("whole", "split", "four")}
    whole = run_script(args["whole"], launcher=torchrun(2))
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-3000:]
    assert "their frozen weights in FP8 (e4m3)" in whole.stdout
    crashed = run_script([*args["split"], "--kill_at_step", "8"], launcher=torchrun(2))
    assert crashed.returncode != 0 and "Signal 9 (SIGKILL)" in crashed.stderr, crashed.stderr[-3000:]
    shutil.copytree(tmp_path / "split", tmp_path / "four")
    resumed = run_script([*args["split"], "--resume"], launcher=torchrun(2))
    assert resumed.returncode == 0 and "(step 8)" in resumed.stdout, resumed.stderr[-3000:]
    keys = ("step", "train_loss", "val_loss", "tokens", "restarts", "restart", "lora_start")
    rows = {run: [{k: r.get(k) for k in keys} for r in read_rows(tmp_path / run)] for run in ("whole", "split")}
    assert rows["split"] == rows["whole"], "the resumed --fsdp --fp8 run's losses differ from the uninterrupted run's"
    assert [r["step"] for r in rows["whole"] if r["restart"]] == [8, 12]
    assert rows["whole"][-1]["val_loss"] < rows["whole"][0]["val_loss"] - 0.5

    four = run_script([*args["four"], "--resume"], launcher=torchrun(4), timeout=300)
    assert four.returncode == 0, four.stdout[-2000:] + four.stderr[-3000:]
    assert "written by 2 processes, resharded to 4" in four.stdout
    losses = [r["train_loss"] for r in read_rows(tmp_path / "four") if r.get("train_loss") is not None]
    assert len(losses) == 16 and all(math.isfinite(loss) for loss in losses)

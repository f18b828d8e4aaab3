"""The GPT-2 ReLoRA pre-training example (examples/pretrain_gpt2.py): data, fused-vs-eager tracking, exact resume,
DDP, faults, arguments. Every run here is a ~100k-parameter model on a generated folder of text, a few steps long.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import checkpoints  # examples/ and tests/ are on sys.path (conftest.py)
import config
import data as example_data
import fault_run
import pretrain_gpt2
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_within_torch_error
from model import GPT, LORA_TARGETS, GPTConfig
from payloads import plant_byte_item

import relora_kernels as rk
from relora_kernels.relora import ReLoRA, jagged_cosine, prune_optimizer_state_

pytestmark = pytest.mark.slow  # the example trains, in this process, in subprocesses and under torchrun
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

WORDS = ("the model merges low rank factors into frozen weights and restarts them while the loss keeps falling "
         "def return import class self for in if else while tokens batch step learning rate warmup").split()


def write_corpus(folder: Path, n_files: int = 12, seed: int = 0) -> Path:
    """A folder of n_files generated text files (~2.5 KB each), plus a binary file that must be ignored."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(40)]
        (folder / f"doc_{i:02d}.txt").write_text("\n".join(lines) + "\n")
    (folder / "image.bin").write_bytes(bytes(range(256)) * 4)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("token_cache")


def tiny_args(corpus, cache_dir, out_dir, *extra):
    """A ~100k-parameter run on the generated corpus: every default that makes the example slow is overridden."""
    return ["--data", str(corpus), "--cache_dir", str(cache_dir), "--out_dir", str(out_dir), "--device", "cpu",
            "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--vocab_size", "320",
            "--batch_size", "4", "--eval_batches", "2", "--sample_tokens", "0", "--lora_r", "4", *extra]


def read_rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def script_env() -> dict:
    # One thread per process: these models are too small to gain from more, and two processes on two cores must
    # not oversubscribe them. The same env for every run keeps the CPU arithmetic identical between runs.
    # tests/fault_run.py imports the example's modules from examples/.
    path = os.pathsep.join(p for p in (str(EXAMPLES), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "RELORA_KERNELS_BACKEND": "auto", "PYTHONPATH": path}


def run_script(args, *, launcher=(), timeout=240, log_file=None, file_size_limit=None):
    """The script in a subprocess; with log_file, stdout and stderr go to that file (as `... > log 2>&1`) and the
    result's stdout and stderr both hold its text. file_size_limit (bytes): a write past it fails (RLIMIT_FSIZE,
    inherited by torchrun's workers), as on a full disk."""
    # Fault options (--kill_at_step, ...) are the test wrapper's: it installs their hooks and runs the example.
    faulty = any(arg.partition("=")[0] in fault_run.OPTIONS for arg in args)
    cmd = [sys.executable, *launcher, fault_run.__file__ if faulty else str(EXAMPLES / "pretrain_gpt2.py"), *args]
    def limit_file_size():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    if log_file is None:
        return subprocess.run(cmd, capture_output=True, text=True, env=script_env(), timeout=timeout,
                              preexec_fn=limit_file_size if file_size_limit else None)
    with open(log_file, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=script_env(), timeout=timeout)
    done.stdout = done.stderr = Path(log_file).read_bytes().decode()  # bytes: text mode would turn \r into \n
    return done


# --------------------------------------------------------------------------------------------------------------
# Data pipeline
# --------------------------------------------------------------------------------------------------------------


def test_data_pipeline_on_a_folder(corpus, tmp_path):
    cache = example_data.prepare_data(str(corpus), 320, tmp_path, log=lambda *_: None)
    dataset = example_data.load_data(cache)
    meta = dataset.meta
    text_files = sorted(p.name for p in corpus.glob("*.txt"))
    # Split by file: disjoint, complete, the binary file left out, about 10% (at least one file) for validation.
    assert sorted(meta["train_files"] + meta["val_files"]) == text_files
    assert not set(meta["train_files"]) & set(meta["val_files"]) and len(meta["val_files"]) == 1
    # uint16 streams whose lengths match the meta, documents separated by EOT, all ids in the vocabulary.
    assert dataset.train.dtype == dataset.val.dtype == example_data.np.uint16
    assert (len(dataset.train), len(dataset.val)) == (meta["train_tokens"], meta["val_tokens"])
    assert int((dataset.train == meta["eot_id"]).sum()) == len(meta["train_files"])
    assert int(dataset.train.max()) < dataset.vocab_size == 320
    # Byte-level BPE: the validation file decodes back to exactly its text.
    val_text = (corpus / meta["val_files"][0]).read_text()
    assert dataset.tokenizer.decode(dataset.val[:-1].tolist()) == val_text
    assert dataset.tokenizer.decode(dataset.tokenizer.encode("naïve → ∑ \t\n").ids) == "naïve → ∑ \t\n"

    # A second call finds the cache (nothing rewritten); changing a file changes the key and rebuilds.
    stamp = (cache / "train.bin").stat().st_mtime_ns
    assert example_data.prepare_data(str(corpus), 320, tmp_path, log=lambda *_: None) == cache
    assert (cache / "train.bin").stat().st_mtime_ns == stamp
    changed = write_corpus(tmp_path / "changed")
    (changed / "doc_00.txt").write_text("something else entirely\n" * 50)
    assert example_data.prepare_data(str(changed), 320, tmp_path, log=lambda *_: None) != cache
    assert example_data.prepare_data(str(corpus), 300, tmp_path, log=lambda *_: None) != cache
    assert not list(tmp_path.glob(".tmp-*")), "a temporary cache directory was left behind"

    # Batches: targets are the inputs shifted by one, and the same key gives the same windows.
    x, y = example_data.get_batch(dataset.train, 3, 16, seed=5)
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, example_data.get_batch(dataset.train, 3, 16, seed=5)[0])
    assert not torch.equal(x, example_data.get_batch(dataset.train, 3, 16, seed=6)[0])


def test_data_pipeline_on_a_single_file(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(400))
    (tmp_path / "one.txt").write_text(text)
    dataset = example_data.load_data(example_data.prepare_data(str(tmp_path / "one.txt"), 300, tmp_path / "c",
                                                               log=lambda *_: None))
    # One file is split by position at a line break: 90% train, 10% validation, together the whole text.
    decoded = [dataset.tokenizer.decode(s[:-1].tolist()) for s in (dataset.train, dataset.val)]
    assert decoded[0] + decoded[1] == text and decoded[1].startswith("line ")
    assert 0.05 < len(decoded[1]) / len(text) < 0.15


def test_default_corpus_is_the_standard_library():
    root, files = example_data.stdlib_files()
    names = {str(f.relative_to(root)) for f in files}
    assert "os.py" in names and "json/decoder.py" in names
    assert not any(part.startswith("test") or part in ("site-packages", "idlelib") for n in names
                   for part in Path(n).parts)


# --------------------------------------------------------------------------------------------------------------
# The fused LoRALinear tracks an eager nn.Linear + LoRA model, restart included
# --------------------------------------------------------------------------------------------------------------


class EagerLoRALinear(nn.Module):
    """PEFT-style LoRA from plain modules: frozen nn.Linear plus scale * B(A(x)), no fused op anywhere."""

    def __init__(self, fused: rk.LoRALinear):
        super().__init__()
        self.base = nn.Linear(fused.in_features, fused.out_features)
        self.base.weight = nn.Parameter(fused.weight.detach().clone(), requires_grad=False)
        self.base.bias = nn.Parameter(fused.bias.detach().clone())
        self.lora_A = nn.Parameter(fused.lora_A.detach().clone())
        self.lora_B = nn.Parameter(fused.lora_B.detach().clone())
        self.scale = fused.scale

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_fused_lora_tracks_eager_lora_through_a_restart(backend, monkeypatch):
    # auto: the CPU path of lora_linear; triton: the Triton kernels themselves (through the interpreter on a CPU)
    rk.configure(backend=backend)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, block_size=24, n_layer=2, n_head=2, n_embd=32)
    fused = GPT(config)
    rk.apply_lora(fused, LORA_TARGETS, r=4, alpha=8)
    eager = copy.deepcopy(fused)
    for name, module in list(eager.named_modules()):
        if isinstance(module, rk.LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(eager.get_submodule(parent), child, EagerLoRALinear(module))
    assert not any(isinstance(m, rk.LoRALinear) for m in eager.modules())

    def optimizer(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)

    # The float64 twin of the eager model is the exact reference: each fp32 model must be as close to it as the
    # other (helpers.assert_within_torch_error), a bound set by the dtype, not by hand.
    exact = copy.deepcopy(eager).double()
    models = {"fused": fused, "eager": eager, "exact": exact}
    opts = {name: optimizer(model) for name, model in models.items()}
    relora = ReLoRA(fused, opts["fused"], restart_every=3, prune_ratio=1.0, seed=1)
    losses = {name: [] for name in models}
    x = torch.randint(97, (4, 24), generator=torch.Generator().manual_seed(0))  # one batch, so the loss must fall
    for step in range(1, 7):
        # The jagged schedule's re-warmup after the restart (lr 0, then half), as the script uses it. The factors'
        # Adam state is reset whole (prune_ratio=1): a kept first moment over a zeroed second moment makes a huge
        # update that would amplify the rounding differences between the two models past any useful bound.
        lr = 1e-2 * jagged_cosine(step - 1, max_steps=100, warmup_steps=0, restart_every=3, restart_warmup_steps=2)
        for name, model in models.items():
            for group in opts[name].param_groups:
                group["lr"] = lr
            logits, _ = model(x[:, :-1])  # the loss in the logits' dtype (the model's own would cast to fp32)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), x[:, 1:].reshape(-1))
            loss.backward()
            opts[name].step()
            opts[name].zero_grad()
            losses[name].append(loss.item())
        if relora.step(step):  # the eager twins restart by hand: W += s * B @ A, A as the fused one drew it, B = 0
            for twin in ("eager", "exact"):
                lora_params = []
                with torch.no_grad():
                    for f, e in zip(lora_modules(fused), eager_modules(models[twin]), strict=True):
                        e.base.weight += e.scale * e.lora_B @ e.lora_A
                        e.lora_A.copy_(f.lora_A)
                        e.lora_B.zero_()
                        lora_params += [e.lora_A, e.lora_B]
                prune_optimizer_state_(opts[twin], lora_params, 1.0)

    as_tensor = {name: torch.tensor(values, dtype=torch.float64) for name, values in losses.items()}
    assert_within_torch_error("losses", as_tensor["fused"].float(), as_tensor["exact"], as_tensor["eager"].float())
    assert losses["fused"][-1] < losses["fused"][0] - 0.3, f"the loss did not fall: {losses['fused']}"
    # After six steps and two restarts the merged weights still agree; B was zeroed by the restart of step 6 in
    # all three, exactly.
    for f, e, e64 in zip(lora_modules(fused), eager_modules(eager), eager_modules(exact), strict=True):
        assert_within_torch_error("merged weight", f.weight.detach(), e64.base.weight.detach(), e.base.weight.detach())
        assert not f.lora_B.any() and not e.lora_B.any()


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, rk.LoRALinear)]


def eager_modules(model):
    return [m for m in model.modules() if isinstance(m, EagerLoRALinear)]


# --------------------------------------------------------------------------------------------------------------
# Runs of the script
# --------------------------------------------------------------------------------------------------------------

RELORA_RUN = ("--mode", "relora", "--max_steps", "16", "--warmup_full_steps", "4", "--restart_every", "4",
              "--restart_warmup_steps", "1", "--warmup_steps", "2", "--eval_every", "4", "--ckpt_every", "4",
              "--lr", "3e-3")


def test_killed_run_resumes_to_exactly_the_uninterrupted_losses(corpus, cache_dir, tmp_path):
    whole = run_script(tiny_args(corpus, cache_dir, tmp_path / "whole", *RELORA_RUN), log_file=tmp_path / "log")
    assert whole.returncode == 0, whole.stderr[-3000:]
    # Into a file (no terminal) no progress bar: no carriage-return frames, one line per evaluation.
    assert "\r" not in whole.stdout
    evals = [int(m) for m in re.findall(r"^step (\d+): (?:train loss \S+, )?val loss", whole.stdout, flags=re.M)]
    assert evals == [0, 4, 8, 12, 16], whole.stdout

    # Killed (SIGKILL, no clean-up) right after a checkpoint, twice: at step 4, the last full-rank step (the resumed
    # run must switch to LoRA itself), and at step 12, in the LoRA phase just after the restart of step 12.
    split_args = tiny_args(corpus, cache_dir, tmp_path / "split", *RELORA_RUN)
    for kill_at, resume in ((4, ()), (12, ("--resume",))):
        crashed = run_script([*split_args, *resume, "--kill_at_step", str(kill_at)])
        assert crashed.returncode == -9, crashed.stderr[-3000:]
        assert (tmp_path / f"split/ckpt/step_{kill_at:08d}/DONE").exists()
        assert max(r["step"] for r in read_rows(tmp_path / "split")) == kill_at
    # Then Ctrl-C in the middle of step 14 (no checkpoint due there): the step completes and is checkpointed, one
    # line, exit status 130. Then a kill mid-write of metrics.jsonl, which tears its last line.
    interrupted = run_script([*split_args, "--resume", "--signal_at_step", "14:SIGINT"])
    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    assert interrupted.stderr.strip().splitlines()[-1] == ("pretrain_gpt2.py: SIGINT at step 14: stopped after writing "
                                                          "its checkpoint; --resume continues exactly")
    assert "Traceback" not in interrupted.stderr and (tmp_path / "split/ckpt/step_00000014/DONE").exists()
    with open(tmp_path / "split/metrics.jsonl", "a") as f:
        f.write('{"step": 15, "tokens": 19')
    resumed = run_script([*split_args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "(step 14)" in resumed.stdout
    assert "dropped 0 after it and a torn last line" in resumed.stdout

    keys = ("step", "train_loss", "val_loss", "lr", "tokens", "restarts", "restart", "lora_start")
    rows = {run: [{k: r.get(k) for k in keys} for r in read_rows(tmp_path / run)] for run in ("whole", "split")}
    assert [r["step"] for r in rows["split"]] == list(range(17))
    assert rows["split"] == rows["whole"], "the resumed run's losses differ from the uninterrupted run's"
    assert [r["step"] for r in rows["whole"] if r["restart"]] == [8, 12]  # and none after the last step
    assert [r["step"] for r in rows["whole"] if r["lora_start"]] == [5]
    assert rows["whole"][-1]["val_loss"] < rows["whole"][0]["val_loss"] - 0.5


def test_compiled_training_forward_tracks_the_eager_run(corpus, cache_dir, tmp_path):
    # --compile: full-rank steps, the switch to LoRA (a new compiled forward), two restarts (in-place merges under
    # an existing graph); fp32, so the compiled run may differ from eager only by reordered rounding.
    eager = run_script(tiny_args(corpus, cache_dir, tmp_path / "eager", *RELORA_RUN))
    compiled = run_script(tiny_args(corpus, cache_dir, tmp_path / "compiled", *RELORA_RUN, "--compile"))
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-3000:]
    rows = {run: read_rows(tmp_path / run) for run in ("eager", "compiled")}
    # Compiling fuses and reorders fp32 reductions, which moves a loss by a few fp32 roundings (measured: at most
    # 0.8 eps relative over these 16 steps); 8 eps leaves room for other CPUs' kernels, and a real difference (a
    # missed restart, a stale graph over swapped modules) is orders of magnitude larger.
    rel = 8 * torch.finfo(torch.float32).eps
    for want, got in zip(rows["eager"], rows["compiled"], strict=True):
        assert got.get("restart") == want.get("restart") and got.get("lora_start") == want.get("lora_start")
        for key in ("train_loss", "val_loss"):
            if want.get(key) is not None:
                assert got[key] == pytest.approx(want[key], rel=rel), f"step {want['step']} {key}"


def test_two_process_gloo_run_keeps_ranks_identical(corpus, cache_dir, tmp_path):
    # With --fp8: DDP must not broadcast the LoRA layers' FP8 copies (gloo has no float8 type; each rank derives them
    # from the W DDP broadcasts); DDP without it is the Llama example's torchrun test.
    args = tiny_args(corpus, cache_dir, tmp_path, "--mode", "relora", "--max_steps", "8", "--warmup_full_steps", "2",
                     "--restart_every", "2", "--restart_warmup_steps", "1", "--warmup_steps", "1",
                     "--eval_every", "4", "--ckpt_every", "4", "--fp8")
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    result = run_script(args, launcher=launcher)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = read_rows(tmp_path)
    restarts = [r for r in rows if r.get("restart")]
    assert [r["step"] for r in restarts] == [4, 6]  # LoRA from step 3; no restart after the last step
    for r in restarts:  # a checksum of every parameter's bits, gathered from both ranks right after the restart
        assert len(r["rank_checksums"]) == 2 and len(set(r["rank_checksums"])) == 1, r
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world"] == 2 and summary["restarts"] == 2
    assert rows[-1]["tokens"] == 8 * 2 * 4 * 32  # steps x ranks x batch x block


def torchrun(n: int) -> tuple[str, ...]:
    return ("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}")


def test_fsdp_run_resumes_exactly_and_at_other_world_sizes(corpus, cache_dir, tmp_path):
    # --fsdp at 2 processes: uninterrupted; killed (SIGKILL on every rank) after the checkpoint of step 8, in the
    # LoRA phase after its first restart, then resumed; that checkpoint resumed at 4 processes, and the 4-process
    # run's checkpoint of step 12 resumed at 2.
    args = {run: tiny_args(corpus, cache_dir, tmp_path / run, *RELORA_RUN, "--fsdp")
            for run in ("whole", "split", "four", "back")}
    whole = run_script(args["whole"], launcher=torchrun(2))
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-3000:]
    crashed = run_script([*args["split"], "--kill_at_step", "8"], launcher=torchrun(2))
    assert crashed.returncode != 0 and "Signal 9 (SIGKILL)" in crashed.stderr, crashed.stderr[-3000:]
    assert (tmp_path / "split/ckpt/step_00000008/DONE").exists()
    assert max(r["step"] for r in read_rows(tmp_path / "split")) == 8
    ckpt = tmp_path / "split/ckpt/step_00000008"
    assert sorted(f.name for f in ckpt.iterdir()) == [".metadata", "DONE", "__0_0.distcp", "__1_0.distcp",
                                                      "state.pt"]  # one file of shards per rank
    shutil.copytree(tmp_path / "split", tmp_path / "four")  # before the resume prunes step 8
    # A full disk at the checkpoint of step 12 (a file-size limit: the kernel refuses every rank's shard file as a
    # full disk would, through DCP's CheckpointException): one line, step 8 intact, nothing half-written left.
    full = run_script([*args["split"], "--resume"], launcher=torchrun(2), file_size_limit=200_000)
    assert full.returncode != 0 and "CheckpointException" not in full.stderr, full.stderr[-3000:]
    assert f"error: step 12: file too large writing checkpoint {ckpt.parent / 'step_00000012'} (it needs about " \
        in full.stderr, full.stderr[-3000:]
    assert sorted(d.name for d in ckpt.parent.iterdir()) == ["step_00000004", "step_00000008"]
    # A newer checkpoint whose DCP byte item (the optimizer's param_groups) was swapped for a payload, .metadata and
    # DONE rewritten to match: skipped at start-up (DCP's own loader would have run it), the resume from step 8.
    planted = ckpt.parent / "step_00000010"
    shutil.copytree(ckpt, planted)
    item = plant_byte_item(planted, tmp_path / "payload-ran")
    checkpoints.mark_done(planted, step=10, world=2)
    resumed = run_script([*args["split"], "--resume"], launcher=torchrun(2))
    assert resumed.returncode == 0 and "(step 8)" in resumed.stdout, resumed.stderr[-3000:]
    assert f"skipping checkpoint {planted}: {item}: Weights only load failed" in resumed.stdout
    assert not (tmp_path / "payload-ran").exists()

    keys = ("step", "train_loss", "val_loss", "lr", "tokens", "restarts", "restart", "lora_start")
    rows = {run: [{k: r.get(k) for k in keys} for r in read_rows(tmp_path / run)] for run in ("whole", "split")}
    assert rows["split"] == rows["whole"], "the resumed --fsdp run's losses differ from the uninterrupted run's"
    assert [r["step"] for r in rows["whole"] if r["restart"]] == [8, 12]
    assert [r["step"] for r in rows["whole"] if r["lora_start"]] == [5]
    assert rows["whole"][-1]["val_loss"] < rows["whole"][0]["val_loss"] - 0.5

    four = run_script([*args["four"], "--resume"], launcher=torchrun(4), timeout=300)
    assert four.returncode == 0, four.stdout[-2000:] + four.stderr[-3000:]
    assert "written by 2 processes, resharded to 4" in four.stdout
    shutil.copytree(tmp_path / "four", tmp_path / "back")
    shutil.rmtree(tmp_path / "back/ckpt/step_00000016")
    back = run_script([*args["back"], "--resume"], launcher=torchrun(2))
    assert back.returncode == 0 and "written by 4 processes, resharded to 2" in back.stdout, back.stderr[-3000:]

    # The tolerance. Batches are keyed by rank, so at 4 processes a step's loss averages the same two batches as at
    # 2 plus two more: on equal weights the two losses differ by half the difference of two two-batch means, the
    # size of the loss's noise from one step to the next. So each loss (train, and val on the same windows) must be
    # within the spread of the same-size run's step-to-step changes over those steps; a reshard that lost or
    # misplaced weights or Adam state would move it by more (a fresh model is 0.5 above).
    def train_losses(run, first):
        return {r["step"]: r["train_loss"] for r in read_rows(tmp_path / run) if r["step"] >= first}

    for run, same_size, first in (("four", "whole", 8), ("back", "four", 12)):
        want, got = train_losses(same_size, first), train_losses(run, first)
        assert want[first] == got[first] and sorted(got) == list(range(first, 17))  # the checkpoint's step, kept
        spread = statistics.stdev(want[s] - want[s - 1] for s in range(first + 1, 17))
        for step in range(first + 1, 17):
            assert abs(got[step] - want[step]) <= spread, f"{run} step {step}: {got[step]} vs {want[step]}, {spread}"
        want_val, got_val = (read_rows(tmp_path / r)[-1]["val_loss"] for r in (same_size, run))
        assert abs(got_val - want_val) <= spread, f"{run}: final val loss {got_val} vs {want_val}"
    assert read_rows(tmp_path / "four")[-1]["tokens"] == 8 * 2 * 4 * 32 + 8 * 4 * 4 * 32  # steps x ranks x batch x T


def test_nan_loss_is_skipped_and_a_streak_stops_the_run(corpus, cache_dir, tmp_path, capsys):
    args = tiny_args(corpus, cache_dir, tmp_path / "one", "--mode", "full", "--max_steps", "6", "--eval_every", "3",
                     "--ckpt_every", "3", "--nan_at_steps", "4")
    assert fault_run.main(args) == 0
    rows = {r["step"]: r for r in read_rows(tmp_path / "one")}
    assert rows[4].get("skipped") and math.isnan(rows[4]["train_loss"]) and rows[4]["skipped_steps"] == 1
    assert all(math.isfinite(rows[s]["train_loss"]) and not rows[s].get("skipped") for s in (1, 2, 3, 5, 6))
    assert rows[6]["skipped_steps"] == 1 and math.isfinite(rows[6]["val_loss"])
    assert (tmp_path / "one/ckpt/step_00000006/DONE").exists()

    capsys.readouterr()
    args = tiny_args(corpus, cache_dir, tmp_path / "streak", "--mode", "full", "--max_steps", "8", "--ckpt_every", "2",
                     "--nan_at_steps", "3,4,5", "--max_bad_steps", "3")
    assert fault_run.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3 non-finite steps in a row" in err, err
    # Skipped steps leave the weights as they were, so the checkpoint of step 4 is a good one; nothing after step 5.
    assert max(r["step"] for r in read_rows(tmp_path / "streak")) == 5
    assert [d.name for d in checkpoints.checkpoint_dirs(tmp_path / "streak")] == ["step_00000002", "step_00000004"]


def test_checkpoints_are_atomic_and_never_written_from_non_finite_weights(tmp_path, capsys):
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8))
    for step in (5, 10):
        checkpoints.save_checkpoint(tmp_path, step, model, {"step": step}, keep=2)
    # An interrupted write leaves a temporary directory, or a renamed one without its DONE marker: neither counts.
    (tmp_path / "ckpt/.tmp-step_00000015-123").mkdir()
    (tmp_path / "ckpt/step_00000020").mkdir()
    (tmp_path / "ckpt/step_00000020/state.pt").write_bytes(b"truncated")
    assert [d.name for d in checkpoints.checkpoint_dirs(tmp_path)] == ["step_00000005", "step_00000010"]
    assert checkpoints.load_checkpoint_state(checkpoints.checkpoint_dirs(tmp_path)[-1])["step"] == 10
    # Rewriting step 20 replaces the incomplete directory; keep=2 drops the oldest.
    checkpoints.save_checkpoint(tmp_path, 20, model, {"step": 20}, keep=2)
    assert [d.name for d in checkpoints.checkpoint_dirs(tmp_path)] == ["step_00000010", "step_00000020"]

    # A fresh run (no --resume) refuses to start on top of them.
    assert pretrain_gpt2.main(["--out_dir", str(tmp_path), "--device", "cpu"]) == 2
    assert "holds a run (checkpoint at step 20): --resume continues it" in capsys.readouterr().err

    with torch.no_grad():
        model.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(checkpoints.RunError, match="not finite"):
        checkpoints.save_checkpoint(tmp_path, 25, model, {"step": 25}, keep=2)
    assert [d.name for d in checkpoints.checkpoint_dirs(tmp_path)] == ["step_00000010", "step_00000020"]


# --------------------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------------------


def test_options_take_both_forms_and_resolve_against_the_preset():
    given = pretrain_gpt2.parse_args(["--mode=full", "--max_steps", "600", "--lr=1e-3", "--resume", "--seed", "3"])
    assert given == {"mode": "full", "max_steps": 600, "lr": 1e-3, "resume": True, "seed": 3}
    cfg = pretrain_gpt2.resolve_config(given, None, torch.device("cpu"))
    assert (cfg.preset, cfg.n_embd, cfg.batch_size) == ("tiny", 256, config.TRAIN_PRESETS["tiny"]["batch_size"])
    # A run of twice the preset's length stretches the schedule with it; the LoRA phase starts on a restart.
    assert cfg.restart_every == 2 * config.TRAIN_PRESETS["tiny"]["restart_every"]
    assert cfg.warmup_full_steps % cfg.restart_every == 0
    assert pretrain_gpt2.parse_args(["--resume=false"]) == {"resume": False}


@pytest.mark.parametrize("args, message", [
    (["--preset", "gpt9"], "--preset 'gpt9' is not one of"),
    (["--data", "/no/such/folder"], "no such file or folder"),
    (["--restart_every", "0"], "--restart_every must be >= 1"),
    (["--restart_every=-3"], "--restart_every must be >= 1"),
    (["--mode", "qlora"], "--mode 'qlora' is not one of"),
    (["--max_steps", "many"], "invalid int value"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--n_embd", "30", "--n_head", "4"], "must be a multiple of --n_head"),
    (["--warmup_full_steps", "400", "--max_steps", "300"], "the LoRA phase never starts"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--frobnicate", "1"], "unrecognized arguments"),
    (["--beta1", "1.5"], "--beta1 must be in [0, 1), got 1.5"),
    (["--beta2", "-1"], "--beta2 must be in [0, 1), got -1.0"),
    (["--lora_alpha", "0"], "--lora_alpha must be a positive number, got 0.0"),
    (["--lora_alpha", "nan"], "--lora_alpha must be a positive number, got nan"),
    (["--weight_decay", "-0.1"], "--weight_decay must be a number >= 0, got -0.1"),
    (["--signal_at_step", "3"], "--signal_at_step must be STEP:SIGINT or STEP:SIGTERM"),
    (["--fsdp"], "--fsdp runs under torchrun: torchrun --standalone --nproc_per_node=N"),
    (["--seed", str(2**64)], f"--seed must be in [0, 2**64 - 1 = {2**64 - 1}], got {2**64}"),
    (["--seed", "-1"], "--seed must be in [0, 2**64 - 1"),
])
def test_bad_arguments_get_one_line(args, message, tmp_path, capsys):
    main = fault_run.main if "--signal_at_step" in args else pretrain_gpt2.main  # a fault option: the tests' own
    assert main([*args, "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err and message in err, err


def test_kernel_rank_limit_and_a_file_as_out_dir_are_refused_at_start_up(tmp_path, capsys, monkeypatch):
    # Both used to surface late: the rank at the first LoRA forward (after the warm start), the file at the first
    # write of metrics.jsonl. The kernels (through the interpreter here) take r <= 256.
    rk.configure(backend="triton")
    assert pretrain_gpt2.main(["--lora_r", "300", "--out_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().endswith("error: --lora_r 300: lora_a has r = 300 rows; the Triton "
                                                    "kernels support r <= 256")
    (tmp_path / "file").write_text("")
    assert pretrain_gpt2.main(["--out_dir", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"error: --out_dir {tmp_path / 'file'} is a file, not a folder")


def test_bad_argument_from_the_command_line_has_no_traceback(tmp_path):
    result = run_script(["--restart_every", "0", "--out_dir", str(tmp_path)], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "pretrain_gpt2.py: error: --restart_every must be >= 1, got 0"


# --------------------------------------------------------------------------------------------------------------
# Faults and misuse: changed or undecodable data, signals, a shared out_dir, broken checkpoints, torn metrics
# --------------------------------------------------------------------------------------------------------------


def test_undecodable_files_are_named_and_a_mostly_undecodable_corpus_is_refused(tmp_path):
    folder = write_corpus(tmp_path / "mixed", n_files=3)
    (folder / "latin1.txt").write_bytes("café crème brûlée\n".encode("latin-1") * 20)
    logs = []
    cache = example_data.prepare_data(str(folder), 300, tmp_path / "cache", log=logs.append)
    skipped = [line for line in logs if "skipped" in line]
    assert len(skipped) == 1 and "skipped 2 of 5 files, not UTF-8 text" in skipped[0], logs
    assert "latin1.txt: not UTF-8 (byte 0xe9 at offset 3)" in skipped[0] and "image.bin: not UTF-8" in skipped[0]
    meta = example_data.load_data(cache).meta
    assert {name.split("[")[0] for name in meta["train_files"] + meta["val_files"]} == {f"doc_{i:02d}.txt" for i in
                                                                                       range(3)}

    # Before: a single Latin-1 file trained as U+FFFD characters; a folder of mostly such files went on silently.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_text("hello world\n" * 10)
    (bad / "b.txt").write_bytes("é".encode("latin-1") * 1000)
    with pytest.raises(ValueError, match=r"1 of 2 files, 89% of the bytes, are not UTF-8 text"):
        example_data.prepare_data(str(bad), 300, tmp_path / "cache", log=lambda *_: None)
    with pytest.raises(ValueError, match=r"b.txt: not UTF-8 \(byte 0xe9 at offset 0\)"):
        example_data.prepare_data(str(bad / "b.txt"), 300, tmp_path / "cache", log=lambda *_: None)


def test_validation_share_stays_bounded_with_few_files(tmp_path):
    # Two files: a split by file gave validation half the text. Now 10% of the bytes, cut at a line break.
    folder = write_corpus(tmp_path / "two", n_files=2)
    dataset = example_data.load_data(example_data.prepare_data(str(folder), 300, tmp_path / "c", log=lambda *_: None))
    meta = dataset.meta
    share = meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"])
    assert 0.05 < share < 0.15, meta
    (val,) = meta["val_files"]  # "doc_0X.txt[cut:]": the tail of one file, whose head trains
    name, cut = val.removesuffix(":]").split("[")
    assert f"{name}[:{cut}]" in meta["train_files"] and len(meta["train_files"]) == 2
    text = (folder / name).read_text()
    assert dataset.tokenizer.decode(dataset.val[:-1].tolist()) == text[int(cut):] and text[int(cut) - 1] == "\n"


def test_resume_refuses_a_changed_corpus_and_sigterm_stops_with_a_checkpoint(cache_dir, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", n_files=6)
    args = tiny_args(corpus, cache_dir, tmp_path / "run", "--mode", "full", "--max_steps", "4", "--ckpt_every", "4",
                     "--eval_every", "2")
    # SIGTERM during step 2: the step completes and is checkpointed (none was due), one line, 128 + 15.
    assert fault_run.main([*args, "--signal_at_step", "2:SIGTERM"]) == 143
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(": SIGTERM at step 2: stopped after writing its checkpoint; "
                                                       "--resume continues exactly"), err
    ckpt = tmp_path / "run/ckpt/step_00000002"
    saved = checkpoints.load_checkpoint_state(ckpt)["data"]
    metrics = (tmp_path / "run/metrics.jsonl").read_text()
    assert [r["step"] for r in read_rows(tmp_path / "run")] == [0, 1, 2]

    # A file added to --data: before, a new BPE was trained and the run went on with ids that changed meaning.
    (corpus / "doc_99.txt").write_text("an added document\n" * 30)
    assert pretrain_gpt2.main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "changed since the checkpoint: added doc_99.txt" in err, err
    assert (tmp_path / "run/metrics.jsonl").read_text() == metrics  # a refused resume leaves the metrics alone

    assert pretrain_gpt2.main([*args, "--resume", "--allow_data_change"]) == 0
    out = capsys.readouterr().out
    assert "going on with the checkpoint's tokenizer" in out and "resumed from" in out
    final = checkpoints.load_checkpoint_state(tmp_path / "run/ckpt/step_00000004")["data"]
    assert final["tokenizer"] == saved["tokenizer"]  # the checkpoint's tokenizer, not one trained on the new files
    assert "doc_99.txt" in {name for name, *_ in final["manifest"]} - {name for name, *_ in saved["manifest"]}


def test_a_second_run_in_the_same_out_dir_is_refused_and_a_stale_lock_taken_over(corpus, cache_dir, tmp_path,
                                                                                   capsys):
    logs = []
    with checkpoints.out_dir_lock(tmp_path, logs.append):
        assert pretrain_gpt2.main(tiny_args(corpus, cache_dir, tmp_path, "--max_steps", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--out_dir {tmp_path} is in use by another run (pid {os.getpid()}); wait for it to end, "
                        "or use another --out_dir"), err
    assert (tmp_path / ".lock").read_text() == "" and not logs  # unlocked, and no stale pid left behind
    (tmp_path / ".lock").write_text("999999\n")  # what a killed run leaves: its pid, and no lock held
    with checkpoints.out_dir_lock(tmp_path, logs.append):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    assert logs == [f"{tmp_path}: taking over the lock of a run that did not end cleanly (pid 999999)"]


def test_resume_falls_back_past_broken_checkpoints_and_cleans_up(tmp_path, monkeypatch):
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8))
    for step in (5, 10, 15):
        checkpoints.save_checkpoint(tmp_path, step, model, {"step": step}, keep=3)
    ckpt = tmp_path / "ckpt"
    weights = (ckpt / "step_00000015/model.safetensors").read_bytes()
    (ckpt / "step_00000015/model.safetensors").write_bytes(weights[: len(weights) // 2])
    (ckpt / "step_00000010/state.pt").unlink()
    (ckpt / ".tmp-step_00000020-123").mkdir()  # a write killed before its rename
    (ckpt / "step_00000001").mkdir()  # a prune cut short: DONE gone first, some files left
    (ckpt / "step_00000001/state.pt").write_bytes(b"x")
    logs = []
    checkpoints.clean_checkpoints(tmp_path, logs.append)
    assert sorted(d.name for d in ckpt.iterdir()) == ["step_00000005", "step_00000010", "step_00000015"]
    assert logs == [f"removed 2 unfinished checkpoint folder(s) in {ckpt}: .tmp-step_00000020-123, step_00000001"]

    logs.clear()
    found, state = checkpoints.newest_loadable_checkpoint(tmp_path, logs.append)
    assert found == ckpt / "step_00000005" and state == {"step": 5}
    assert len(logs) == 2 and "step_00000015: Error while deserializing header" in logs[0], logs
    assert "step_00000010: [Errno 2] No such file or directory" in logs[1] and "moved it to broken-step_" in logs[1]
    assert [d.name for d in checkpoints.checkpoint_dirs(tmp_path)] == ["step_00000005"]

    # A full disk: one line naming the checkpoint, the partial folder removed, the others kept.
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_model", no_space)
    with pytest.raises(checkpoints.RunError, match=r"step 20: no space left on device writing checkpoint "
                                                     r".*step_00000020 \(it needs about 7.7 KiB, .* free there\); "
                                                     r"removed the partial"):
        checkpoints.save_checkpoint(tmp_path, 20, model, {"step": 20}, keep=3)
    assert not list(ckpt.glob(".tmp-*")) and [d.name for d in checkpoints.checkpoint_dirs(tmp_path)] == \
        ["step_00000005"]


def test_resume_falls_back_past_a_truncated_shard_of_a_sharded_checkpoint(tmp_path):
    # DCP in one process (no process group) writes the same layout as the ranks of an --fsdp run: .metadata and
    # __0_0.distcp; a kill or a full disk can leave one rank's shard file short, after DONE was written.
    import torch.distributed.checkpoint as dcp

    for step in (5, 10):
        folder = tmp_path / f"ckpt/step_{step:08d}"
        dcp.save({"model": {"w": torch.arange(64.0)}}, storage_writer=dcp.FileSystemWriter(folder))
        torch.save({"step": step}, folder / "state.pt")
        checkpoints.mark_done(folder, step=step)
    shard = tmp_path / "ckpt/step_00000010/__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    logs = []
    found, state = checkpoints.newest_loadable_checkpoint(tmp_path, logs.append)
    assert found == tmp_path / "ckpt/step_00000005" and state == {"step": 5}
    assert len(logs) == 1 and "step_00000010: shard file __0_0.distcp is missing or truncated" in logs[0], logs


def test_torn_metrics_line_is_dropped_and_earlier_rows_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": step, "train_loss": 1.0 / (step + 1)} for step in range(7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "train_lo')
    assert checkpoints.read_metrics(path) == rows  # was a JSONDecodeError
    logs = []
    checkpoints.restart_metrics(path, 4, logs.append)
    assert checkpoints.read_metrics(path) == rows[:5] and path.read_text().endswith("}\n")
    assert logs == [f"{path}: kept the 5 rows up to step 4, dropped 2 after it and a torn last line"]
    checkpoints.restart_metrics(path, 4, logs.append)  # nothing to drop: untouched, nothing said
    assert len(logs) == 1
    checkpoints.restart_metrics(path, 0, logs.append)  # a run from step 0 moves the old rows aside
    assert not path.exists() and checkpoints.read_metrics(tmp_path / "metrics.previous.jsonl") == rows[:5]


# --------------------------------------------------------------------------------------------------------------
# A full disk at every write of the run
# --------------------------------------------------------------------------------------------------------------


class DiskFull:
    """Make the nth write of a file named `name` fail as a full disk does (OSError ENOSPC), from inside the writer
    the run uses for it, after part of the data went out; every other write goes through. The atomic writers'
    temporary files (".NAME.xxxx") count as writes of NAME."""

    def __init__(self, monkeypatch, name: str, nth: int):
        import pathlib

        import matplotlib.figure

        self.name, self.nth, self.seen, self.fired = name, nth, 0, False
        real_save_model, real_torch_save = checkpoints.save_model, torch.save
        real_write_text, real_savefig = pathlib.Path.write_text, matplotlib.figure.Figure.savefig
        real_open = open
        disk = self

        def save_model(model, path, *args, **kwargs):
            disk.check(path, lambda: Path(path).write_bytes(b"\0" * 100))
            return real_save_model(model, path, *args, **kwargs)

        def torch_save(obj, f, *args, **kwargs):
            path = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "")
            disk.check(path, lambda: Path(path).write_bytes(b"PK\3\4"))
            return real_torch_save(obj, f, *args, **kwargs)

        def write_text(self, text, *args, **kwargs):
            disk.check(self, lambda: real_write_text(self, text[: len(text) // 2]))
            return real_write_text(self, text, *args, **kwargs)

        def savefig(self, fname, *args, **kwargs):
            disk.check(fname, lambda: Path(fname).write_bytes(b"\x89PNG"))
            return real_savefig(self, fname, *args, **kwargs)

        class HalfWritten:  # a file whose write puts out half the text, then fails
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, text):
                self.f.write(text[: len(text) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")

        def open_(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            if "a" in mode and disk.matches(path):
                return HalfWritten(f)
            return f

        monkeypatch.setattr(checkpoints, "save_model", save_model)
        monkeypatch.setattr(torch, "save", torch_save)
        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
        monkeypatch.setattr(checkpoints, "open", open_, raising=False)

    def matches(self, path) -> bool:
        base = Path(path).name
        if not (base == self.name or base.startswith(f".{self.name}.")) or self.fired:
            return False
        self.seen += 1
        self.fired = self.seen == self.nth
        return self.fired

    def check(self, path, partial) -> None:
        if self.matches(path):
            partial()
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_each_write_ends_the_run_in_one_line_and_the_resume_is_exact(corpus, cache_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    # An 8-step run (checkpoints every 2 steps) in which the disk fills at one file after another, each time resumed
    # on a disk with room: the checkpoint's weights, its state, its DONE, the plot redrawn after it, a metrics row,
    # the summary. Each failure: one line naming the file (or checkpoint) and the space it needed, the last good
    # checkpoint intact, nothing half-written that could count as one; at the end, the uninterrupted run's losses.
    run = ("--mode", "full", "--max_steps", "8", "--ckpt_every", "2", "--eval_every", "4")
    assert pretrain_gpt2.main(tiny_args(corpus, cache_dir, tmp_path / "whole", *run)) == 0
    args = tiny_args(corpus, cache_dir, tmp_path / "run", *run)
    checkpoint_4 = f"checkpoint {tmp_path / 'run/ckpt/step_00000004'}"
    # (file, which of its writes fails, what the line names, the checkpoints after it)
    faults = [("model.safetensors", 2, checkpoint_4, [2]), ("state.pt", 1, checkpoint_4, [2]),
              ("DONE", 1, checkpoint_4, [2]), ("loss.png", 1, tmp_path / "run/loss.png", [2, 4]),
              ("metrics.jsonl", 2, tmp_path / "run/metrics.jsonl", [2, 4]),  # the row of step 6, torn
              ("summary.json", 1, tmp_path / "run/summary.json", [6, 8])]
    for i, (name, nth, written, steps) in enumerate(faults):
        capsys.readouterr()
        with monkeypatch.context() as patches:
            disk = DiskFull(patches, name, nth)
            assert pretrain_gpt2.main([*args, *(("--resume",) if i else ())]) == 1, name
            assert disk.fired, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"no space left on device writing {written} (it needs about " in err, err
        ckpt_dir = tmp_path / "run/ckpt"
        assert [d.name for d in checkpoints.checkpoint_dirs(tmp_path / "run")] == [f"step_{s:08d}" for s in steps]
        assert sorted(d.name for d in ckpt_dir.iterdir()) == [f"step_{s:08d}" for s in steps], name
        assert not [f.name for f in (tmp_path / "run").iterdir() if f.name.startswith(".") and f.name != ".lock"]
    assert pretrain_gpt2.main([*args, "--resume"]) == 0
    keys = ("step", "train_loss", "val_loss", "lr", "tokens")
    rows = {run: [{k: r.get(k) for k in keys} for r in read_rows(tmp_path / run)] for run in ("whole", "run")}
    assert rows["run"] == rows["whole"]
    assert json.loads((tmp_path / "run/summary.json").read_text())["val_loss"] == rows["whole"][-1]["val_loss"]


def test_a_finished_run_extended_past_its_end_restarts_where_a_run_of_that_length_would(corpus, cache_dir, tmp_path,
                                                                                       capsys):
    # An 8-step relora run (LoRA from step 5, restarts every 4 steps) makes no restart after its last step: nothing
    # trains after it. Extended to 16 steps it must restart after step 8 (as a 16-step run does) and 12, not 16.
    run = ("--mode", "relora", "--warmup_full_steps", "4", "--restart_every", "4", "--restart_warmup_steps", "1",
           "--warmup_steps", "1", "--eval_every", "8", "--ckpt_every", "8")
    args = tiny_args(corpus, cache_dir, tmp_path, *run)
    assert pretrain_gpt2.main([*args, "--max_steps", "8"]) == 0
    assert [r["step"] for r in read_rows(tmp_path) if r.get("restart")] == []
    capsys.readouterr()
    assert pretrain_gpt2.main([*args, "--resume", "--max_steps", "16"]) == 0
    assert "step 8: restart (the run ended there before, without one; it now goes on to step 16)" in \
        capsys.readouterr().out
    rows = read_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(17))
    assert [(r["step"], r["restarts"]) for r in rows if r.get("restart")] == [(8, 1), (12, 2)]
    assert rows[-1]["restarts"] == 2
    assert rows[9]["lr"] == 0.0  # the re-warmup after the restart of step 8 begins at 0


# --------------------------------------------------------------------------------------------------------------
# A cluster's time limit under torchrun: SIGTERM to every process, or the launcher killed
# --------------------------------------------------------------------------------------------------------------


def start_torchrun(args, env_extra=None) -> subprocess.Popen:
    cmd = [sys.executable, *torchrun(2), fault_run.__file__, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**script_env(), **(env_extra or {})})


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def wait_for_rows(out_dir: Path, n: int, launcher: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out_dir / "metrics.jsonl").exists() and len(checkpoints.read_metrics(out_dir / "metrics.jsonl")) >= n:
            return
        assert launcher.poll() is None, launcher.communicate()
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} metrics rows after {timeout} s")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


LONG_RUN = ("--mode", "full", "--max_steps", "100000", "--ckpt_every", "100000", "--eval_every", "100000")


@pytest.mark.parametrize("how", ["scancel", "launcher_killed"])
def test_under_torchrun_a_time_limit_checkpoints_the_step_and_every_worker_exits(corpus, cache_dir, tmp_path, how):
    # scancel / a time limit: SIGTERM to torchrun and to every worker at once, so each worker gets two (its own and
    # torchrun's forwarded one); the second used to kill it before its checkpoint. launcher_killed: SIGKILL to
    # torchrun alone (it cannot forward it); the workers used to train on, unsupervised, holding the out_dir lock.
    # There, the run's shutdown grace is 1 s and step 2 takes 1.5 s longer: a warning says so.
    out_dir = tmp_path / "run"
    extra = ("--sleep_at_step", "2:1.5") if how == "launcher_killed" else ("--step_time", "1")
    launcher = start_torchrun(tiny_args(corpus, cache_dir, out_dir, *LONG_RUN, *extra),
                              {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "1"} if how == "launcher_killed" else None)
    workers = []
    try:
        wait_for_rows(out_dir, 3 if how == "launcher_killed" else 2, launcher)  # step 2 is the slow one there
        workers = children(launcher.pid)
        assert len(workers) == 2, workers
        if how == "scancel":  # the workers' own first, torchrun's forwarded one 0.3 s later, within the step
            for pid in workers:
                os.kill(pid, signal.SIGTERM)
            time.sleep(0.3)
            os.kill(launcher.pid, signal.SIGTERM)
        else:
            os.kill(launcher.pid, signal.SIGKILL)
        stdout, stderr = launcher.communicate(timeout=120)  # the workers hold the pipes: EOF once they exit
    finally:
        workers = workers or children(launcher.pid)
        for pid in [launcher.pid, *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not any(alive(pid) for pid in workers)
    stopped = re.findall(r"SIGTERM at step (\d+): stopped after writing its checkpoint; --resume continues exactly",
                         stderr)
    assert len(stopped) == 2 and len(set(stopped)) == 1, stderr[-3000:]
    step = int(stopped[0])
    assert [d.name for d in checkpoints.checkpoint_dirs(out_dir)] == [f"step_{step:08d}"]
    assert max(r["step"] for r in read_rows(out_dir)) == step
    assert 'pretrain_gpt2.py", line' not in stderr, stderr[-3000:]  # no worker's traceback (torchrun prints its own)
    assert (out_dir / ".lock").read_text() == ""  # given up: the run ended cleanly
    if how == "launcher_killed":
        assert stderr.count(f"the launcher (pid {launcher.pid}) is gone; stopping after this step") == 2, stderr
        assert re.search(r"warning: step 2 took \d+\.\d s with its evaluation and checkpoint, more than the 1 s "
                         "torchrun waits", stdout), stdout[-3000:]

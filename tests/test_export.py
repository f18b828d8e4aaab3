"""examples/export.py and examples/generate.py: a run's checkpoint as a Hugging Face model (GPT-2 and Llama), equal
logits in transformers, the checkpoint choice a resume would make, deterministic samples.
"""

from __future__ import annotations

import checkpoints  # examples/ and tests/ are on sys.path (conftest.py)
import export
import generate
import pretrain_gpt2
import pytest
import torch
from helpers import assert_within_torch_error
from test_pretrain_example import tiny_args, write_corpus

import relora_kernels as rk

# relora with the LoRA phase from step 3 and restarts after steps 4 and 6: the last checkpoint (step 8) holds
# LoRALinear layers whose B trained two steps since its restart, so the export has a non-zero B @ A to merge.
RELORA_8 = ("--mode", "relora", "--max_steps", "8", "--warmup_full_steps", "2", "--restart_every", "2",
            "--restart_warmup_steps", "1", "--warmup_steps", "1", "--eval_every", "4", "--ckpt_every", "4",
            "--lr", "3e-3")
FAMILIES = {"gpt2": (), "llama": ("--preset", "llama-tiny", "--intermediate_size", "64")}


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """One finished relora run per model family (in this process: a few seconds each)."""
    root = tmp_path_factory.mktemp("runs")
    corpus = write_corpus(root / "corpus")
    runs = {}
    for family, extra in FAMILIES.items():
        out = root / family
        assert pretrain_gpt2.main(tiny_args(corpus, root / "cache", out, *RELORA_8, *extra)) == 0
        runs[family] = out
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_with_the_same_logits(family, trained_runs, tmp_path):
    import transformers

    run_dir = trained_runs[family]
    unmerged = export.TrainedRun(run_dir, log=lambda *_: None, merge=False)
    lora_b = [m.lora_B for m in unmerged.model.modules() if isinstance(m, rk.LoRALinear)]
    assert lora_b and all(b.abs().max() > 0 for b in lora_b), "the checkpoint should hold trained LoRA factors"

    run = export.TrainedRun(run_dir, log=lambda *_: None)
    assert run.step == 8 and not any(isinstance(m, rk.LoRALinear) for m in run.model.modules())
    out = run.export(tmp_path / "hf", log=lambda *_: None)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in out.iterdir()}
    model_class = transformers.LlamaForCausalLM if family == "llama" else transformers.GPT2LMHeadModel
    hf = model_class.from_pretrained(out).eval()
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)) is model_class
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "the model merges low rank factors"
    assert tokenizer(text)["input_ids"] == run.tokenizer.encode(text).ids

    # The export is the merged model: its logits in transformers (fp32) against the merged weights evaluated in
    # float64, within twice the example's own fp32 error on the same input plus ATOL[fp32]: a transposed Conv1D, a
    # lost tie, another rotary pairing or norm eps moves logits by orders of magnitude more.
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, run.tokenizer.get_vocab_size(), (3, run.model_cfg.block_size), generator=g)
    with torch.no_grad():
        got = hf(idx).logits
        ours = run.model(idx)[0]
        exact = run.model.double()(idx)[0]
        # ... and the merge kept the function: the LoRA layers' fp32 output is as close to it as our own fp32 path.
        unmerged_logits = unmerged.model(idx)[0]
    assert_within_torch_error(f"{family} transformers logits", got, exact, ours)
    assert_within_torch_error(f"{family} unmerged logits", unmerged_logits, exact, ours)
    # Tied head for GPT-2 (one matrix), untied for Llama.
    assert (hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()) == (family == "gpt2")


def test_export_takes_the_newest_checkpoint_that_loads_and_leaves_the_broken_one(trained_runs, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_runs["gpt2"], run_dir)
    newest = run_dir / "ckpt/step_00000008"
    (newest / "model.safetensors").write_bytes(b"\0" * 16)  # truncated
    logs = []
    run = export.TrainedRun(run_dir, log=logs.append)
    assert run.step == 4 and any("skipping checkpoint" in line for line in logs), logs
    assert newest.exists() and [d.name for d in checkpoints.checkpoint_dirs(run_dir)][-1] == "step_00000008"


def test_export_and_generate_refuse_a_folder_without_checkpoints_in_one_line(tmp_path, capsys):
    assert export.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(f"error: {tmp_path}: no ckpt/ folder; give the --out_dir of a "
                                                       "pre-training run"), err
    assert generate.main([str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no ckpt/ folder" in err, err


def test_generate_is_deterministic_with_a_seed_and_continues_the_prompt(trained_runs, capsys):
    run_dir = trained_runs["llama"]
    args = [str(run_dir), "--prompt", "the model", "--tokens", "12"]
    texts = []
    for seed in ("1", "1", "2"):
        assert generate.main([*args, "--seed", seed]) == 0
        captured = capsys.readouterr()
        assert "sampling 12 tokens from step 8" in captured.err
        texts.append(captured.out)
    assert texts[0] == texts[1] and texts[0].startswith("the model")
    assert texts[0] != texts[2]  # 12 tokens from a 320-token vocabulary: two seeds agreeing is ~impossible
    run = export.TrainedRun(run_dir, log=lambda *_: None)
    sampled = generate.generate(run, "the model", 12, seed=1)
    assert sampled == texts[0].rstrip("\n")
    assert len(run.tokenizer.encode(sampled).ids) >= 12  # the prompt's tokens and the sample's

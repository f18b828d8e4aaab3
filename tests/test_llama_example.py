"""The Llama-style model of the pre-training example (examples/llama.py, --preset llama-*): the paper's sizes, every
mode, the switch to LoRA and restarts, exact resume, DDP and --fsdp under torchrun; --tokenizer with an existing
Hugging Face tokenizer (a vocabulary past uint16); the end-of-run sample.
"""

from __future__ import annotations

import json

import checkpoints  # examples/ and tests/ are on sys.path (conftest.py)
import config
import data as example_data
import export
import pretrain_gpt2
import pytest
import torch
from helpers import assert_within_torch_error
from llama import Llama, LlamaConfig
from model import GPT, GPTConfig
from test_pretrain_example import WORDS, read_rows, run_script, tiny_args, torchrun, write_corpus

LLAMA = ("--preset", "llama-tiny", "--intermediate_size", "64")
RELORA_12 = ("--mode", "relora", "--max_steps", "12", "--warmup_full_steps", "4", "--restart_every", "4",
             "--restart_warmup_steps", "1", "--warmup_steps", "2", "--eval_every", "4", "--ckpt_every", "4",
             "--lr", "3e-3")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("token_cache")


@pytest.mark.parametrize("preset, millions", [("llama-60m", 60), ("llama-130m", 130), ("llama-350m", 350)])
def test_paper_presets_have_the_paper_sizes(preset, millions):
    # With the official configs' 32100-token vocabulary the parameter count is the size in the name, within 10%
    # (58.2M, 134.1M, 367.9M); a tied head would make the 60M model 41.8M.
    with torch.device("meta"):
        model = Llama(LlamaConfig(vocab_size=32100, **config.PRESETS[preset]))
    assert abs(model.num_params() / 1e6 - millions) < 0.1 * millions, model.num_params()
    assert model.lm_head.weight is not model.wte.weight
    assert config.TRAIN_PRESETS[preset]["vocab_size"] == 32000 and config.is_llama(preset)


def test_llama_tiny_trains_like_tiny_and_gpt2_presets_keep_their_shapes():
    cfg = config.resolve_config({"preset": "llama-tiny"}, None, torch.device("cpu"))
    tiny = config.resolve_config({}, None, torch.device("cpu"))
    shared = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "max_steps", "lr", "restart_every")
    assert [getattr(cfg, k) for k in shared] == [getattr(tiny, k) for k in shared]
    assert cfg.intermediate_size == 688 and tiny.intermediate_size is None
    with pytest.raises(config.UsageError, match="--intermediate_size is for the llama presets"):
        config.resolve_config({"intermediate_size": 64}, None, torch.device("cpu"))
    with pytest.raises(config.UsageError, match="must be even for rotary"):
        config.resolve_config({"preset": "llama-tiny", "n_embd": 36, "n_head": 4}, None, torch.device("cpu"))


@pytest.mark.slow
def test_llama_relora_run_killed_and_resumed_gives_the_same_losses(corpus, cache_dir, tmp_path):
    whole = run_script(tiny_args(corpus, cache_dir, tmp_path / "whole", *LLAMA, *RELORA_12))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "relora | preset llama-tiny:" in whole.stdout
    split_args = tiny_args(corpus, cache_dir, tmp_path / "split", *LLAMA, *RELORA_12)
    crashed = run_script([*split_args, "--kill_at_step", "8"])  # in the LoRA phase, right after a restart
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    resumed = run_script([*split_args, "--resume"])
    assert resumed.returncode == 0 and "(step 8)" in resumed.stdout, resumed.stderr[-3000:]
    keys = ("step", "train_loss", "val_loss", "lr", "tokens", "restarts", "restart", "lora_start")
    rows = {run: [{k: r.get(k) for k in keys} for r in read_rows(tmp_path / run)] for run in ("whole", "split")}
    assert rows["split"] == rows["whole"]
    assert [r["step"] for r in rows["whole"] if r["lora_start"]] == [5]
    assert [r["step"] for r in rows["whole"] if r["restart"]] == [8]
    assert rows["whole"][-1]["val_loss"] < rows["whole"][0]["val_loss"] - 0.3


@pytest.mark.slow
def test_llama_under_torchrun_ddp_and_fsdp_and_the_sharded_checkpoint_exports(corpus, cache_dir, tmp_path):
    runs = {}
    for name, extra in (("ddp", ()), ("fsdp", ("--fsdp",))):
        args = tiny_args(corpus, cache_dir, tmp_path / name, *LLAMA, "--mode", "relora", "--max_steps", "8",
                         "--warmup_full_steps", "2", "--restart_every", "2", "--restart_warmup_steps", "1",
                         "--warmup_steps", "1", "--eval_every", "4", "--ckpt_every", "4", *extra)
        result = run_script(args, launcher=torchrun(2))
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        runs[name] = read_rows(tmp_path / name)
    for rows in runs.values():
        assert [r["step"] for r in rows if r.get("restart")] == [4, 6]
        assert rows[-1]["tokens"] == 8 * 2 * 4 * 32 and rows[-1]["val_loss"] < rows[0]["val_loss"]
    for r in runs["ddp"]:  # every parameter's bits equal on both ranks right after each restart
        assert "rank_checksums" not in r or len(set(r["rank_checksums"])) == 1, r
    # The same global batches and the same fp32 CPU arithmetic; DDP's all-reduce and FSDP's reduce-scatter both
    # average two ranks' gradients, (g0 + g1) / 2, one rounding either way: the losses are the same bits (measured
    # so with torch 2.13 and gloo), through the switch to LoRA (rebuilt and resharded under FSDP) and the restarts.
    keys = ("step", "train_loss", "val_loss", "lr", "restart", "lora_start")
    assert [{k: r.get(k) for k in keys} for r in runs["fsdp"]] == [{k: r.get(k) for k in keys} for r in runs["ddp"]]

    # The sharded checkpoint (DCP) exports in one process, as the one-file one does.
    assert (tmp_path / "fsdp/ckpt/step_00000008/.metadata").exists()
    import transformers

    run = export.TrainedRun(tmp_path / "fsdp", log=lambda *_: None)
    hf = transformers.LlamaForCausalLM.from_pretrained(run.export(tmp_path / "hf", log=lambda *_: None)).eval()
    idx = torch.randint(0, run.tokenizer.get_vocab_size(), (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ours = hf(idx).logits, run.model(idx)[0]
        exact = run.model.double()(idx)[0]
    assert_within_torch_error("exported fsdp run", got, exact, ours)


def large_vocabulary_tokenizer(folder, size: int = 70_000):
    """A word-level Hugging Face tokenizer saved in `folder`: `size` tokens, the corpus's words at ids past 65535
    (so a uint16 cache would wrap them), </s> the end of a document."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"filler{i}": i for i in range(size - len(WORDS) - 2)}
    vocab.update({"<unk>": len(vocab), "</s>": len(vocab) + 1})
    vocab.update({word: len(vocab) + i for i, word in enumerate(dict.fromkeys(WORDS))})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(folder)
    return vocab


def test_given_tokenizer_with_a_large_vocabulary_gives_a_uint32_cache_and_trains(corpus, tmp_path):
    vocab = large_vocabulary_tokenizer(tmp_path / "tok")
    assert max(vocab.values()) > 2**16
    args = tiny_args(corpus, tmp_path / "cache", tmp_path / "run", *LLAMA, "--tokenizer", str(tmp_path / "tok"),
                     "--mode", "full", "--max_steps", "2", "--eval_every", "2", "--ckpt_every", "2")
    assert pretrain_gpt2.main(args) == 0
    [cache] = [d for d in (tmp_path / "cache").iterdir() if (d / "meta.json").exists()]
    dataset = example_data.load_data(cache)
    assert dataset.meta["dtype"] == "uint32" and dataset.train.dtype == example_data.np.uint32
    assert dataset.vocab_size == len(vocab) and dataset.eot == "</s>"
    assert dataset.meta["eot_id"] == vocab["</s>"]
    # Every word of the corpus past uint16, kept whole; the documents end with </s> (one per training file).
    train = torch.from_numpy(dataset.train.astype("int64"))
    assert int(train.min()) >= vocab["</s>"] and int((train == vocab["</s>"]).sum()) == len(dataset.meta["train_files"])
    first = sorted(corpus.glob("*.txt"))
    first = next(f for f in first if f.name in dataset.meta["train_files"])
    words = first.read_text().split()
    assert dataset.train[: len(words)].tolist() == [vocab[w] for w in words]
    state = checkpoints.load_checkpoint_state(tmp_path / "run/ckpt/step_00000002")
    assert state["config"]["tokenizer"] == str(tmp_path / "tok") and state["data"]["eot"] == "</s>"
    assert json.loads(state["data"]["tokenizer"])["model"]["type"] == "WordLevel"
    # The run's model has the tokenizer's vocabulary (padded to a multiple of 64).
    assert state["model_config"]["vocab_size"] == -(-len(vocab) // 64) * 64
    # The checkpoint keeps the tokenizer: the run resumes (and goes on in the same cache) with the folder gone.
    import shutil

    shutil.rmtree(tmp_path / "tok")
    extended = [*args[: args.index("--max_steps")], "--max_steps", "3", *args[args.index("--max_steps") + 2 :]]
    assert pretrain_gpt2.main([*extended, "--resume"]) == 0
    assert read_rows(tmp_path / "run")[-1]["step"] == 3
    assert [d for d in (tmp_path / "cache").iterdir() if (d / "meta.json").exists()] == [cache]


@pytest.mark.parametrize("folder, message", [("empty", "not a Hugging Face tokenizer folder"),
                                             ("missing", "no such folder")])
def test_given_tokenizer_folder_that_is_not_one_is_refused_in_one_line(folder, message, corpus, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = tiny_args(corpus, tmp_path / "cache", tmp_path / "run", *LLAMA, "--tokenizer", str(tmp_path / folder))
    assert pretrain_gpt2.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--tokenizer {tmp_path / folder}: {message}" in err, err


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_llama_tiny_trains_in_every_mode_and_samples_after_a_validation_prompt_without_the_lock(
        mode, corpus, cache_dir, tmp_path, capsys, monkeypatch):
    # relora (the switch, restarts, resume): the slow test above. The end-of-run sample: its prompt a window of the
    # validation text, the out_dir lock already freed (a second holder can take it).
    lock_free = []
    original = pretrain_gpt2.sample

    def sample_checking_the_lock(run):
        try:
            with checkpoints.out_dir_lock(run.out_dir, lambda *_: None):
                lock_free.append(True)
        except config.UsageError:
            lock_free.append(False)
        original(run)

    monkeypatch.setattr(pretrain_gpt2, "sample", sample_checking_the_lock)
    args = tiny_args(corpus, cache_dir, tmp_path, *LLAMA, "--mode", mode, "--max_steps", "6", "--warmup_steps", "1",
                     "--eval_every", "6", "--ckpt_every", "6", "--lr", "3e-3")
    args[args.index("--sample_tokens") + 1] = "8"
    assert pretrain_gpt2.main(args) == 0
    rows = read_rows(tmp_path)
    assert rows[-1]["step"] == 6 and rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.05, rows
    run = export.TrainedRun(tmp_path, log=lambda *_: None, merge=False)
    lora_layers = sum(type(m).__name__ == "LoRALinear" for m in run.model.modules())
    assert lora_layers == (7 * 2 if mode == "lora" else 0)  # q, k, v, o, gate, up, down in each of 2 blocks

    assert lock_free == [True]
    out = capsys.readouterr().out
    assert "sampling 8 tokens after 16 tokens of the validation data" in out, out
    prompt = out.split("prompt:\n", 1)[1].split("\nsample:\n", 1)[0]
    meta = json.loads(next(p for p in cache_dir.rglob("meta.json")).read_text())
    val_text = "".join((corpus / name).read_text() for name in meta["val_files"])
    assert len(prompt) > 8 and prompt in val_text, prompt


def test_gpt2_model_creates_its_parameters_as_before_the_llama_model():
    # The default run's losses depend on the GPT's parameters being drawn in the same order from the same seed:
    # the sum of every parameter's 32-bit words and their names, as the GPT-2-only example drew them (torch 2.13,
    # CPU generator; the draws do not depend on the machine).
    torch.manual_seed(1337)
    model = GPT(GPTConfig(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=32))
    names = [name for name, _ in model.named_parameters()]
    words = sum(p.detach().reshape(-1).view(torch.int32).sum(dtype=torch.int64).item() for p in model.parameters())
    assert names[:4] == ["wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.ln_1.bias"] and len(names) == 28
    assert words == -2372340982865

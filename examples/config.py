"""The pre-training example's options: Config (every field a command-line option, its help text beside it), the
presets' training defaults, and every check of the options, each a one-line UsageError (exit status 2).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from llama import PRESETS as LLAMA_PRESETS
from model import PRESETS as GPT_PRESETS

import relora_kernels as rk

# Every model preset; the llama-* ones build llama.Llama, the others model.GPT.
PRESETS = {**GPT_PRESETS, **LLAMA_PRESETS}


def is_llama(preset: str) -> bool:
    return preset in LLAMA_PRESETS


class UsageError(Exception):
    """A bad option: reported in one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------
# Configuration: every field is a command-line option (--name=value or --name value), its help text beside it.
# None means "the preset's".
# ----------------------------------------------------------------------------------------------------------------


def option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    mode: str = option("relora", "relora | full | lora")
    preset: str | None = option(None, "tiny | gpt2-124m | gpt2-355m (GPT-2) | llama-tiny | llama-60m | llama-130m | "
                                      "llama-350m (Llama-style: RMSNorm, SwiGLU, rotary, no biases) (default: tiny "
                                      "on CPU, gpt2-124m on GPU)")
    n_layer: int | None = option(None, "model shape overrides (default: the preset's)")
    n_head: int | None = option(None, "attention heads")
    n_embd: int | None = option(None, "embedding width")
    block_size: int | None = option(None, "context length")
    intermediate_size: int | None = option(None, "llama presets: the SwiGLU's hidden width")
    vocab_size: int | None = option(None, "BPE vocabulary size to train (default: 4096 tiny and llama-tiny, 50257 "
                                          "GPT-2 presets, 32000 the other llama presets)")
    tokenizer: str | None = option(None, "a folder holding a Hugging Face tokenizer (tokenizer.json ...), used "
                                         "instead of training a BPE; --vocab_size is then the tokenizer's")
    # data
    data: str | None = option(None, "a text file or a folder of text files (default: the Python standard library)")
    cache_dir: str | None = option(None, "tokenizer + token cache (default: ~/.cache/relora-kernels/data)")
    # optimisation
    max_steps: int | None = option(None, "optimizer steps")
    batch_size: int | None = option(None, "sequences per micro-batch, per process")
    grad_accum: int | None = option(None, "micro-batches per optimizer step")
    lr: float | None = option(None, "peak learning rate")
    min_lr_ratio: float = option(0.1, "the cosine ends at lr * min_lr_ratio")
    warmup_steps: int | None = option(None, "initial linear warmup")
    weight_decay: float = option(0.1, "on 2-D parameters (matrices, embeddings, LoRA factors); none on biases and "
                                      "norms")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "max global gradient norm (0: no clipping)")
    # ReLoRA / LoRA
    warmup_full_steps: int | None = option(None, "relora: full-rank steps before the LoRA phase")
    restart_every: int | None = option(None, "relora: merge + reinit every this many steps")
    restart_warmup_steps: int | None = option(None, "relora: lr re-warmup after each restart")
    prune_ratio: float | None = option(None, "relora: fraction of the LoRA factors' Adam state zeroed at each "
                                             "restart")
    lora_schedule: str = option("restart", "relora: continuous (one warmup and cosine over the whole run; the "
                                              "Adam state of the parameters that stay trainable carries into the LoRA "
                                              "phase) | restart (the LoRA phase starts a fresh optimizer and its own "
                                              "--warmup_steps warmup to the peak lr, then a cosine over the steps "
                                              "left)")
    lora_r: int | None = option(None, "LoRA rank")
    lora_alpha: float | None = option(None, "LoRA scale = alpha / r (default alpha = r, scale 1)")
    lora_dropout: float = option(0.0, "dropout on the LoRA branch's input")
    # evaluation, logging, checkpoints
    out_dir: str | None = option(None, "metrics, plot, checkpoints (default: out/<preset>-<mode>)")
    eval_every: int | None = option(None, "evaluate the val loss every this many steps (and at the end)")
    eval_batches: int | None = option(None, "micro-batches per evaluation (the same windows every time)")
    ckpt_every: int | None = option(None, "checkpoint every this many steps (and at the end)")
    keep_ckpts: int = option(2, "complete checkpoints kept; older ones are deleted")
    resume: bool = option(False, "continue from the newest complete checkpoint in out_dir")
    allow_data_change: bool = option(False, "resume on a changed --data corpus, tokenised with the checkpoint's "
                                            "tokenizer")
    sample_tokens: int = option(200, "tokens of text sampled at the end (0: none)")
    # system
    device: str = option("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    dtype: str = option("auto", "autocast dtype: auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32")
    compile: bool = option(False, "torch.compile the training forward (the LoRA kernels compile into the same graph)")
    fsdp: bool = option(False, "shard every block and the root with FSDP2 (fully_shard) instead of DDP; under "
                               "torchrun")
    fp8: bool = option(False, "lora / relora: the LoRA layers keep FP8 (e4m3) copies of their frozen weights and run "
                              "both frozen GEMMs on them (LoRALinear frozen_dtype='fp8'); relora's full-rank warm "
                              "start stays in its dtype; with --fsdp each rank keeps the copies of its rows")
    fp8_master_cpu: bool = option(False, "with --fp8: keep the LoRA layers' master weights in (pinned) CPU memory "
                                         "(LoRALinear master_device='cpu'), leaving the GPU only the FP8 copies; they "
                                         "cross to the GPU and back at each restart")
    seed: int = option(1337, "seeds the model's init, the batches and the LoRA re-initialisations")
    max_bad_steps: int = option(10, "stop after this many non-finite steps in a row")


# Training defaults per preset. tiny is sized for a 2-core CPU (~3 minutes of training, see examples/README.md); its
# prune_ratio=1.0 (reset the factors' Adam state whole) trained better there than the ReLoRA paper's 0.99.
TRAIN_PRESETS = {
    "tiny": dict(
        vocab_size=4096, max_steps=300, batch_size=8, grad_accum=1, lr=2e-3, warmup_steps=30,
        warmup_full_steps=100, restart_every=50, restart_warmup_steps=10, lora_r=64, prune_ratio=1.0,
        eval_every=50, eval_batches=8, ckpt_every=100,
    ),
    "gpt2-124m": dict(
        vocab_size=50257, max_steps=5000, batch_size=16, grad_accum=8, lr=6e-4, warmup_steps=200,
        warmup_full_steps=1000, restart_every=1000, restart_warmup_steps=50, lora_r=128, prune_ratio=0.99,
        eval_every=250, eval_batches=40, ckpt_every=1000,
    ),
}
TRAIN_PRESETS["gpt2-355m"] = dict(TRAIN_PRESETS["gpt2-124m"], batch_size=8, grad_accum=16, lr=3e-4)
# llama-tiny trains as tiny does (same steps, batches, schedule and ReLoRA settings), so the two compare directly.
# The paper-sized llama presets take the GPT-2 GPU presets' schedule with a 32000-token BPE: a starting point, not
# the paper's hyperparameters.
TRAIN_PRESETS["llama-tiny"] = dict(TRAIN_PRESETS["tiny"])
TRAIN_PRESETS["llama-60m"] = dict(TRAIN_PRESETS["gpt2-124m"], vocab_size=32000)
TRAIN_PRESETS["llama-130m"] = dict(TRAIN_PRESETS["gpt2-124m"], vocab_size=32000)
TRAIN_PRESETS["llama-350m"] = dict(TRAIN_PRESETS["gpt2-355m"], vocab_size=32000)
SCALED_WITH_MAX_STEPS = ("warmup_steps", "restart_every", "restart_warmup_steps", "eval_every", "ckpt_every")
# Options that define the run: a resumed run must keep them, or it is not the same run.
RUN_DEFINING = ("mode", "preset", "n_layer", "n_head", "n_embd", "block_size", "intermediate_size", "vocab_size",
                "tokenizer", "data", "lora_r",
                "lora_alpha", "seed", "batch_size", "grad_accum", "warmup_full_steps", "restart_every", "prune_ratio",
                "lora_schedule", "fsdp", "fp8")  # fsdp: its checkpoints are sharded (DCP), the others one file
NOT_INHERITED = ("resume", "device", "out_dir", "allow_data_change")  # a resumed run takes these from its own line


def require(ok, message: str) -> None:
    """The one check of options and inputs: a one-line message, exit status 2 (see main)."""
    if not ok:
        raise UsageError(message)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv, description: str | None = None) -> dict:
    """Only the options given on the command line, typed; so that defaults can come from a checkpoint. description:
    the text --help shows above the options (the script's docstring)."""
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                     argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        kind = {"int": int, "float": float, "str": str, "bool": _parse_bool}[f.type.split(" ")[0]]
        if kind is _parse_bool:  # --resume alone means --resume=true
            parser.add_argument(f"--{f.name}", type=kind, nargs="?", const=True, help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", type=kind, metavar=f.name.upper(), help=f.metadata["help"])
    return vars(parser.parse_args(argv))


def preset_defaults(preset: str, max_steps: int | None) -> dict:
    """The preset's model and training defaults. A shorter or longer run keeps the preset's proportions: warmups,
    restarts, evals and checkpoints are stretched with max_steps, and the LoRA phase still starts on a restart."""
    train = TRAIN_PRESETS[preset]
    defaults = {**PRESETS[preset], **train}
    if max_steps is not None and max_steps != defaults["max_steps"]:
        stretch = max_steps / defaults["max_steps"]
        for key in SCALED_WITH_MAX_STEPS:
            defaults[key] = max(round(defaults[key] * stretch), 0 if "warmup" in key else 1)
        restarts_in_warm_start = train["warmup_full_steps"] // train["restart_every"]
        defaults["warmup_full_steps"] = defaults["restart_every"] * restarts_in_warm_start
        defaults["restart_warmup_steps"] = min(defaults["restart_warmup_steps"], defaults["restart_every"])
    return defaults


def adam_warmup_floor(beta2: float) -> int:
    """The fewest warm-up steps a stretched preset gets: 2 / (1 - beta2), 40 at beta2 = 0.95.

    Adam's second-moment estimate averages the squared gradients over about 1 / (1 - beta2) steps; before that it
    rests on a few gradients, so the per-parameter step sizes lr / sqrt(v) vary widely (the variance RAdam
    analyses), and a warm-up shorter than that averaging time takes those poorly normalised steps at a high rate.
    2 / (1 - beta2) is the linear warm-up length Ma and Yarats ("On the adequacy of untuned warmup for adaptive
    optimization", AAAI 2021) derive from it.
    """
    return math.ceil(2 / (1 - beta2))


def short_run_warmup(cfg: Config, preset_warmup: int) -> int:
    """The warm-up of a run whose --warmup_steps comes from its preset: the stretched value, or the floor where that
    is larger. The floor is adam_warmup_floor, but never more than the preset's own warm-up (so the preset's length
    and every longer run keep exactly their schedule) nor half of the steps the warm-up ramps (the LoRA phase's
    under --lora_schedule restart, which repeats the warm-up there)."""
    if not 0 <= cfg.beta2 < 1:  # check_config names the bad value
        return cfg.warmup_steps
    ramped = cfg.max_steps
    if cfg.mode == "relora" and cfg.lora_schedule == "restart":
        ramped = cfg.max_steps - cfg.warmup_full_steps
    floor = min(adam_warmup_floor(cfg.beta2), preset_warmup, ramped // 2)
    return max(cfg.warmup_steps, floor)


def resolve_config(given: dict, saved: dict | None, device: torch.device) -> Config:
    """Config = defaults < the preset's < the checkpoint's (when resuming) < the command line; then checked."""
    if saved:
        # Fields this version does not know (e.g. an older version's test knobs) are dropped.
        known = {f.name for f in fields(Config)} - set(NOT_INHERITED)
        saved = {key: value for key, value in saved.items() if key in known}
        # Checkpoints written before the option existed ran the one schedule there was then.
        saved.setdefault("lora_schedule", "continuous")
        for key in RUN_DEFINING:
            require(key not in given or given[key] == saved.get(key), f"--{key}={given.get(key)} differs from the "
                    f"checkpoint's {saved.get(key)!r}; resume with the same setting or use a new --out_dir")
    values = {**(saved or {}), **given}
    preset = values.get("preset") or ("gpt2-124m" if device.type == "cuda" else "tiny")
    require(preset in PRESETS, f"--preset {preset!r} is not one of {', '.join(PRESETS)}")
    values["preset"] = preset
    cfg = Config(**values)
    warmup_from_preset = cfg.warmup_steps is None  # a resumed run has the warm-up it started with
    for key, value in preset_defaults(preset, cfg.max_steps).items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if warmup_from_preset:
        cfg.warmup_steps = short_run_warmup(cfg, TRAIN_PRESETS[preset]["warmup_steps"])
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    require(cfg.mode in ("relora", "full", "lora"), f"--mode {cfg.mode!r} is not one of relora, full, lora")
    for key in ("n_layer", "n_head", "n_embd", "block_size", "max_steps", "batch_size", "grad_accum", "lora_r",
                "eval_every", "eval_batches", "ckpt_every", "keep_ckpts", "restart_every", "max_bad_steps"):
        require(getattr(cfg, key) >= 1, f"--{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("warmup_steps", "warmup_full_steps", "restart_warmup_steps", "sample_tokens"):
        require(getattr(cfg, key) >= 0, f"--{key} must be >= 0, got {getattr(cfg, key)}")
    # torch's generators take 64-bit seeds
    require(0 <= cfg.seed < 2**64, f"--seed must be in [0, 2**64 - 1 = {2**64 - 1}], got {cfg.seed}")
    require(cfg.n_embd % cfg.n_head == 0, f"--n_embd ({cfg.n_embd}) must be a multiple of --n_head ({cfg.n_head})")
    # A trained BPE has at least its 256 byte tokens and EOT; a given --tokenizer brings its own size.
    require(cfg.tokenizer is not None or 257 <= cfg.vocab_size <= 2**16, f"--vocab_size must be in [257, 65536], "
            f"got {cfg.vocab_size}")
    require(cfg.intermediate_size is None or cfg.intermediate_size >= 1, f"--intermediate_size must be >= 1, got "
            f"{cfg.intermediate_size}")
    require(cfg.intermediate_size is None or is_llama(cfg.preset), "--intermediate_size is for the llama presets "
            "(GPT-2's MLP is 4 x n_embd)")
    require(not is_llama(cfg.preset) or (cfg.n_embd // cfg.n_head) % 2 == 0, f"--n_embd / --n_head "
            f"({cfg.n_embd // cfg.n_head}) must be even for rotary positions")
    require(cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be a positive number, got {cfg.lr}")
    for key, low, high in (("min_lr_ratio", 0, 1), ("prune_ratio", 0, 1)):
        require(low <= getattr(cfg, key) <= high, f"--{key} must be in [{low}, {high}], got {getattr(cfg, key)}")
    for key in ("lora_dropout", "beta1", "beta2"):
        require(0 <= getattr(cfg, key) < 1, f"--{key} must be in [0, 1), got {getattr(cfg, key)}")
    require(cfg.grad_clip >= 0, f"--grad_clip must be >= 0, got {cfg.grad_clip}")
    require(0 <= cfg.weight_decay < math.inf, f"--weight_decay must be a number >= 0, got {cfg.weight_decay}")
    require(cfg.lora_alpha is None or 0 < cfg.lora_alpha < math.inf, f"--lora_alpha must be a positive number, got "
            f"{cfg.lora_alpha}")
    require(cfg.warmup_steps < cfg.max_steps, f"--warmup_steps ({cfg.warmup_steps}) must be < --max_steps "
            f"({cfg.max_steps})")
    require(cfg.restart_warmup_steps <= cfg.restart_every, f"--restart_warmup_steps ({cfg.restart_warmup_steps}) "
            f"must be <= --restart_every ({cfg.restart_every})")
    require(cfg.mode != "relora" or cfg.warmup_full_steps < cfg.max_steps, f"--warmup_full_steps "
            f"({cfg.warmup_full_steps}) must be < --max_steps ({cfg.max_steps}), or the LoRA phase never starts")
    require(cfg.lora_schedule in ("continuous", "restart"), f"--lora_schedule {cfg.lora_schedule!r} is not one of "
            "continuous, restart")
    require(not cfg.fp8 or cfg.mode != "full", "--fp8 quantises the LoRA layers' frozen weights: --mode full has none")
    require(not cfg.fp8_master_cpu or cfg.fp8, "--fp8_master_cpu keeps the master weights of --fp8's layers on the "
            "CPU: it needs --fp8")
    if cfg.mode == "relora" and cfg.lora_schedule == "restart":
        # The LoRA phase's schedule counts from the switch, its dips from the restarts, which count in global steps.
        require(cfg.warmup_full_steps % cfg.restart_every == 0, f"--lora_schedule restart needs --warmup_full_steps "
                f"({cfg.warmup_full_steps}) to be a multiple of --restart_every ({cfg.restart_every})")
        require(cfg.warmup_steps < cfg.max_steps - cfg.warmup_full_steps, f"--lora_schedule restart repeats the "
                f"--warmup_steps ({cfg.warmup_steps}) warmup in the LoRA phase, which has only "
                f"{cfg.max_steps - cfg.warmup_full_steps} steps")
    require(cfg.dtype in ("auto", "bfloat16", "float32"), f"--dtype {cfg.dtype!r} is not one of auto, bfloat16, "
            "float32")
    require(cfg.data is None or Path(cfg.data).expanduser().exists(), f"--data {cfg.data}: no such file or folder")


def check_lora_rank(cfg: Config, device: torch.device) -> None:
    """Run one LoRA product of rank --lora_r on the device now, so that a rank the kernels cannot take is refused at
    start-up rather than at the switch to LoRA after the warm start. Zeros and no dropout: no RNG is drawn."""
    if cfg.mode == "full":
        return
    x = torch.zeros(1, 8, device=device)
    try:
        rk.lora_linear(x, torch.zeros(8, 8, device=device), torch.zeros(cfg.lora_r, 8, device=device),
                       torch.zeros(8, cfg.lora_r, device=device))
    except ValueError as e:
        raise UsageError(f"--lora_r {cfg.lora_r}: {e}") from None


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    require(device.type in ("cpu", "cuda"), f"--device {name!r}: only cpu and cuda are supported")
    if device.type == "cuda":
        require(torch.cuda.is_available(), f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)  # one GPU per process under torchrun
    return device

"""Pre-train a GPT-2 style model with ReLoRA: full-rank warm start, then LoRA layers merged and restarted.

    python examples/pretrain_gpt2.py                      # CPU: tiny model on the Python stdlib, 3-4 minutes
    python examples/pretrain_gpt2.py --mode full          # the same run, ordinary full-rank training
    python examples/pretrain_gpt2.py --resume             # continue from the newest checkpoint in --out_dir
    python examples/pretrain_gpt2.py --preset gpt2-124m --data my_corpus/       # GPU: GPT-2 small, bf16
    torchrun --standalone --nproc_per_node=2 examples/pretrain_gpt2.py ...         # DDP (gloo CPU, NCCL GPU)
    torchrun --standalone --nproc_per_node=2 examples/pretrain_gpt2.py --fsdp ...  # FSDP2: weights, grads, Adam sharded

Modes, all on the same data and tokens:
    relora  (default) full-rank training for --warmup_full_steps, then every attention and MLP linear becomes a
            LoRALinear (frozen W, trained A and B), and every --restart_every steps ReLoRA merges B @ A into W,
            re-initialises A and B, prunes their Adam state and re-warms the learning rate (the jagged schedule).
            Embeddings, LayerNorms, biases and the tied head stay full-rank and trainable throughout.
    full    ordinary full-rank training.
    lora    plain LoRA from step 0 on the randomly initialised model: no warm start, no restarts.

Restarts are counted in global steps: ReLoRA restarts after every optimizer step that is a multiple of
--restart_every once the LoRA phase has begun, and the learning rate dips to 0 and climbs back over
--restart_warmup_steps right after each of those steps. The switch to LoRA at --warmup_full_steps (a multiple of
--restart_every by default) gets the same dip: its factors and their Adam state are fresh too.

Writes to --out_dir: metrics.jsonl (one JSON object per step), loss.png (loss vs tokens, restarts marked) and
ckpt/step_XXXXXXXX/ (model.safetensors + state.pt: optimizer, ReLoRA controller, RNG states, step, tokenizer, corpus
manifest; under --fsdp DCP's shards of the model and optimizer replace model.safetensors and the optimizer, see
fsdp.py). Resuming from a checkpoint reproduces the uninterrupted run's losses exactly (same settings, same
machine), after a kill -9 or a Ctrl-C (SIGINT/SIGTERM finish the step and checkpoint it). The run holds a lock on
--out_dir, resumes from the newest checkpoint that loads, and refuses --data that changed since the checkpoint.
"""

from __future__ import annotations

import argparse
import fcntl
import inspect
import json
import math
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import relora_kernels as rk
from relora_kernels.relora import ReLoRA, jagged_cosine

sys.path.insert(0, str(Path(__file__).resolve().parent))  # model.py and data.py sit next to this script
import fsdp as sharded  # noqa: E402
from data import batch_seed, get_batch, load_data, prepare_data  # noqa: E402
from model import GPT, LORA_TARGETS, PRESETS, GPTConfig  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# Configuration: every field is a command-line option (--name=value or --name value). None means "the preset's".
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Config:
    mode: str = "relora"  # relora | full | lora
    preset: str | None = None  # tiny | gpt2-124m | gpt2-355m (default: tiny on CPU, gpt2-124m on GPU)
    n_layer: int | None = None  # model shape overrides (default: the preset's)
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None  # context length
    vocab_size: int | None = None  # BPE vocabulary size to train (default: 4096 tiny, 50257 GPT-2 presets)
    # data
    data: str | None = None  # a text file or a folder of text files (default: the Python standard library)
    cache_dir: str | None = None  # tokenizer + token cache (default: ~/.cache/relora-kernels/data)
    # optimisation
    max_steps: int | None = None  # optimizer steps
    batch_size: int | None = None  # sequences per micro-batch, per process
    grad_accum: int | None = None  # micro-batches per optimizer step
    lr: float | None = None  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int | None = None  # initial linear warmup
    weight_decay: float = 0.1  # on 2-D parameters (matrices, embeddings, LoRA factors); none on biases and norms
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    # ReLoRA / LoRA
    warmup_full_steps: int | None = None  # relora: full-rank steps before the LoRA phase
    restart_every: int | None = None  # relora: merge + reinit every this many steps
    restart_warmup_steps: int | None = None  # relora: lr re-warmup after each restart
    prune_ratio: float | None = None  # relora: fraction of the LoRA factors' Adam state zeroed at each restart
    lora_r: int | None = None  # LoRA rank
    lora_alpha: float | None = None  # LoRA scale = alpha / r (default alpha = r, scale 1)
    lora_dropout: float = 0.0
    # evaluation, logging, checkpoints
    out_dir: str | None = None  # metrics, plot, checkpoints (default: out/<preset>-<mode>)
    eval_every: int | None = None  # evaluate the val loss every this many steps (and at the end)
    eval_batches: int | None = None  # micro-batches per evaluation (the same windows every time)
    ckpt_every: int | None = None  # checkpoint every this many steps (and at the end)
    keep_ckpts: int = 2  # complete checkpoints kept; older ones are deleted
    resume: bool = False  # continue from the newest complete checkpoint in out_dir
    allow_data_change: bool = False  # resume on a changed --data corpus, tokenised with the checkpoint's tokenizer
    sample_tokens: int = 200  # tokens of text sampled at the end (0: none)
    # system
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32
    compile: bool = False  # torch.compile the training forward (the LoRA kernels compile into the same graph)
    fsdp: bool = False  # shard every block and the root with FSDP2 (fully_shard) instead of DDP; under torchrun
    seed: int = 1337
    # fault handling, and fault injection for the tests
    max_bad_steps: int = 10  # stop after this many non-finite steps in a row
    nan_at_steps: str = ""  # comma-separated steps whose loss is replaced by NaN (testing)
    kill_at_step: int = 0  # SIGKILL this process after this step (testing an interrupted run)
    signal_at_step: str = ""  # STEP:SIGNAL, e.g. 14:SIGINT: this process signals itself during that step (testing)


# Training defaults per preset. tiny is sized for a 2-core CPU: ~3 minutes of training, val loss 8.36 -> 5.05 (see
# examples/README.md). Its prune_ratio=1.0 (reset the factors' Adam state whole) beat the ReLoRA paper's 0.99 there:
# val loss 5.053 vs 5.068, and the train loss after each restart up to 0.05 lower on the same batches.
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
    "gpt2-355m": dict(
        vocab_size=50257, max_steps=5000, batch_size=8, grad_accum=16, lr=3e-4, warmup_steps=200,
        warmup_full_steps=1000, restart_every=1000, restart_warmup_steps=50, lora_r=128, prune_ratio=0.99,
        eval_every=250, eval_batches=40, ckpt_every=1000,
    ),
}
SCALED_WITH_MAX_STEPS = ("warmup_steps", "restart_every", "restart_warmup_steps", "eval_every", "ckpt_every")
# Options that define the run: a resumed run must keep them, or it is not the same run.
RUN_DEFINING = ("mode", "preset", "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "data", "lora_r",
                "lora_alpha", "seed", "batch_size", "grad_accum", "warmup_full_steps", "restart_every", "prune_ratio",
                "fsdp")  # fsdp: its checkpoints are sharded (DCP), the others one file


class UsageError(Exception):
    """A bad option: reported in one line, exit status 2."""


class RunError(Exception):
    """The run cannot go on (divergence, non-finite weights): reported in one line, exit status 1."""


class Interrupted(Exception):
    """SIGINT or SIGTERM: the run stopped after a step and its checkpoint; exit status 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _option_help() -> dict[str, str]:
    # The comment after each Config field is its --help text, so the two never drift apart.
    return dict(re.findall(r"^    (\w+): [^=]+=[^#\n]+#\s*(.+)$", inspect.getsource(Config), flags=re.M))


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv) -> dict:
    """Only the options given on the command line, typed; so that defaults can come from a checkpoint."""
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                     argument_default=argparse.SUPPRESS)
    helps = _option_help()
    for f in fields(Config):
        kind = {"int": int, "float": float, "str": str, "bool": _parse_bool}[f.type.split(" ")[0]]
        if kind is _parse_bool:  # --resume alone means --resume=true
            parser.add_argument(f"--{f.name}", type=kind, nargs="?", const=True, help=helps.get(f.name))
        else:
            parser.add_argument(f"--{f.name}", type=kind, metavar=f.name.upper(), help=helps.get(f.name))
    return vars(parser.parse_args(argv))


def resolve_config(given: dict, saved: dict | None, device: torch.device) -> Config:
    """Config = defaults < the preset's < the checkpoint's (when resuming) < the command line; then checked."""
    if saved:
        # Test knobs and the device are never inherited; fields this version does not know are dropped.
        known = {f.name for f in fields(Config)} - {"resume", "device", "out_dir", "nan_at_steps", "kill_at_step",
                                                    "signal_at_step", "allow_data_change"}
        saved = {key: value for key, value in saved.items() if key in known}
        for key in RUN_DEFINING:
            if key in given and given[key] != saved.get(key):
                raise UsageError(f"--{key}={given[key]} differs from the checkpoint's {saved.get(key)!r}; "
                                 "resume with the same setting or use a new --out_dir")
    values = {**(saved or {}), **given}
    preset = values.get("preset") or ("gpt2-124m" if device.type == "cuda" else "tiny")
    if preset not in PRESETS:
        raise UsageError(f"--preset {preset!r} is not one of {', '.join(PRESETS)}")
    values["preset"] = preset
    cfg = Config(**values)
    defaults = {**PRESETS[preset], **TRAIN_PRESETS[preset]}
    if cfg.max_steps is not None and cfg.max_steps != defaults["max_steps"]:
        # A shorter or longer run keeps the preset's proportions: warmups, restarts, evals and checkpoints are
        # stretched with max_steps, and the LoRA phase still starts on a restart boundary.
        stretch = cfg.max_steps / defaults["max_steps"]
        for key in SCALED_WITH_MAX_STEPS:
            defaults[key] = max(round(defaults[key] * stretch), 0 if "warmup" in key else 1)
        restarts_in_warm_start = TRAIN_PRESETS[preset]["warmup_full_steps"] // TRAIN_PRESETS[preset]["restart_every"]
        defaults["warmup_full_steps"] = defaults["restart_every"] * restarts_in_warm_start
        defaults["restart_warmup_steps"] = min(defaults["restart_warmup_steps"], defaults["restart_every"])
    for key, value in defaults.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    def need(ok, message):
        if not ok:
            raise UsageError(message)

    need(cfg.mode in ("relora", "full", "lora"), f"--mode {cfg.mode!r} is not one of relora, full, lora")
    for key in ("n_layer", "n_head", "n_embd", "block_size", "max_steps", "batch_size", "grad_accum", "lora_r",
                "eval_every", "eval_batches", "ckpt_every", "keep_ckpts", "restart_every", "max_bad_steps"):
        need(getattr(cfg, key) >= 1, f"--{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("warmup_steps", "warmup_full_steps", "restart_warmup_steps", "sample_tokens", "kill_at_step", "seed"):
        need(getattr(cfg, key) >= 0, f"--{key} must be >= 0, got {getattr(cfg, key)}")
    need(cfg.n_embd % cfg.n_head == 0, f"--n_embd ({cfg.n_embd}) must be a multiple of --n_head ({cfg.n_head})")
    need(257 <= cfg.vocab_size <= 2**16, f"--vocab_size must be in [257, 65536] (tokens are uint16), "
         f"got {cfg.vocab_size}")
    need(cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be a positive number, got {cfg.lr}")
    need(0 <= cfg.min_lr_ratio <= 1, f"--min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    need(0 <= cfg.prune_ratio <= 1, f"--prune_ratio must be in [0, 1], got {cfg.prune_ratio}")
    need(0 <= cfg.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    need(cfg.grad_clip >= 0, f"--grad_clip must be >= 0, got {cfg.grad_clip}")
    for key in ("beta1", "beta2"):
        need(0 <= getattr(cfg, key) < 1, f"--{key} must be in [0, 1), got {getattr(cfg, key)}")
    need(0 <= cfg.weight_decay < math.inf, f"--weight_decay must be a number >= 0, got {cfg.weight_decay}")
    need(cfg.lora_alpha is None or 0 < cfg.lora_alpha < math.inf, f"--lora_alpha must be a positive number, got "
         f"{cfg.lora_alpha}")
    need(cfg.warmup_steps < cfg.max_steps, f"--warmup_steps ({cfg.warmup_steps}) must be < --max_steps "
         f"({cfg.max_steps})")
    need(cfg.restart_warmup_steps <= cfg.restart_every, f"--restart_warmup_steps ({cfg.restart_warmup_steps}) "
         f"must be <= --restart_every ({cfg.restart_every})")
    if cfg.mode == "relora":
        need(cfg.warmup_full_steps < cfg.max_steps, f"--warmup_full_steps ({cfg.warmup_full_steps}) must be < "
             f"--max_steps ({cfg.max_steps}), or the LoRA phase never starts")
    need(cfg.dtype in ("auto", "bfloat16", "float32"), f"--dtype {cfg.dtype!r} is not one of auto, bfloat16, "
         "float32")
    if cfg.data is not None:
        need(Path(cfg.data).expanduser().exists(), f"--data {cfg.data}: no such file or folder")
    try:
        [int(s) for s in cfg.nan_at_steps.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--nan_at_steps must be comma-separated integers, got {cfg.nan_at_steps!r}") from None
    need(not cfg.signal_at_step or re.fullmatch(r"\d+:SIG(INT|TERM)", cfg.signal_at_step),
         f"--signal_at_step must be STEP:SIGINT or STEP:SIGTERM, got {cfg.signal_at_step!r}")


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
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)  # one GPU per process under torchrun
    elif device.type != "cpu":
        raise UsageError(f"--device {name!r}: only cpu and cuda are supported")
    return device


# ----------------------------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------------------------


def lr_at(cfg: Config, step: int) -> float:
    """The learning rate of optimizer step `step` (1-based): warmup, cosine, and in relora mode the restart dips.

    jagged_cosine counts steps from 0 like LambdaLR, so step `step` reads index step - 1: the first step after the
    restart made at the end of step k * restart_every reads index k * restart_every, where the dip is 0.
    """
    restarting = cfg.mode == "relora" and step - 1 >= cfg.warmup_full_steps  # no dips in the full-rank warm start
    return cfg.lr * jagged_cosine(
        step - 1, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps, restart_every=cfg.restart_every,
        restart_warmup_steps=cfg.restart_warmup_steps if restarting else 0, min_lr_ratio=cfg.min_lr_ratio,
    )


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device, old=None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only. `old` (optimizer, names) carries the
    Adam state of parameters that survive a switch to LoRA (embeddings, norms, biases), matched by name."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        dict(params=[p for _, p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
        dict(params=[p for _, p in params if p.dim() < 2], weight_decay=0.0),
    ]
    # fused on CUDA for plain tensors; FSDP2's DTensor parameters take the foreach implementation.
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type == "cuda" and not cfg.fsdp)
    if old is not None:
        old_state = old  # {name: state dict}
        for name, p in params:
            state = old_state.get(name)
            if state and state["exp_avg"].shape == p.shape:
                optimizer.state[p] = state
    return optimizer


def switch_to_lora(model: GPT, cfg: Config, device, optimizer=None):
    """Every attention and MLP linear becomes a LoRALinear (base weight frozen); returns the new optimizer.

    The optimizer is rebuilt because A and B are new parameters; the Adam state of what stays trainable is kept.
    """
    state_by_name = None
    if optimizer is not None:
        state_by_name = {name: optimizer.state[p] for name, p in model.named_parameters() if p in optimizer.state}
    rk.apply_lora(model, LORA_TARGETS, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    return build_optimizer(model, cfg, device, old=state_by_name)


def switch_to_lora_sharded(model, model_cfg: GPTConfig, cfg: Config, device, optimizer):
    """switch_to_lora for an FSDP2 model: returns (new model, new optimizer).

    fully_shard fixes each unit's parameters when it wraps, so the LoRA layers cannot replace modules inside it:
    the weights are gathered to the CPU one tensor at a time, loaded into an unsharded model built on the meta
    device (no init), given LoRA layers there (A drawn as the unsharded example draws it) and sharded again. The
    Adam state of what stays trainable is kept: its DTensors sit on the same mesh, sharded as the new parameters.
    """
    state_by_name = {name: optimizer.state[p] for name, p in model.named_parameters() if p in optimizer.state}
    full = sharded.full_state_on_cpu(model)
    with torch.device("meta"):
        new = GPT(model_cfg)
    new.load_state_dict(full, assign=True)
    new.lm_head.weight = new.wte.weight  # assign=True loaded the two names as two tensors: tie them again
    rk.apply_lora(new, LORA_TARGETS, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    sharded.shard(new, device)
    return new, build_optimizer(new, cfg, device, old=state_by_name)


def param_counts(model) -> str:
    trainable, frozen = model.num_params(trainable=True), model.num_params(trainable=False)
    return f"{trainable / 1e6:.2f}M trainable, {frozen / 1e6:.2f}M frozen ({trainable + frozen:,} parameters)"


def param_checksum(model) -> int:
    """Sum of every parameter's 16-bit words: any flipped bit changes it, and it is cheap on any device."""
    return int(sum(p.detach().reshape(-1).view(torch.int16).sum(dtype=torch.int64) for p in model.parameters()))


@torch.no_grad()
def evaluate(model, data, cfg, autocast, device, rank, world) -> float:
    """Mean val loss over cfg.eval_batches fixed windows, shared out among the ranks.

    Under FSDP every forward is a collective, so every rank runs as many as the busiest one; the extra ones (on
    window 0) are not counted.
    """
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, count)
    windows = -(-cfg.eval_batches // world) * world if cfg.fsdp else cfg.eval_batches
    for i in range(rank, windows, world):
        counted = i < cfg.eval_batches
        x, y = get_batch(data.val, cfg.batch_size, cfg.block_size, batch_seed(cfg.seed, "val", i if counted else 0),
                         device)
        with autocast:
            _, loss = model(x, y)
        if counted:
            total += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


# --- checkpoints: ckpt/step_XXXXXXXX/{model.safetensors, state.pt, DONE} -------------------------------------------


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a DONE marker), oldest first."""
    found = [d for d in (out_dir / "ckpt").glob("step_*") if re.fullmatch(r"step_\d{8}", d.name)]
    return sorted((d for d in found if (d / "DONE").exists()), key=lambda d: d.name)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out_dir: Path, step: int, model, state: dict, keep: int) -> Path:
    """Written into a temporary directory, renamed into place, then marked DONE: a write interrupted at any point
    leaves at worst a directory without DONE, which is ignored, and the previous checkpoint intact. A failed write
    (a full disk) removes its temporary directory and raises RunError."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RunError(f"step {step}: the weights are not finite; refusing to write a checkpoint over good ones")
    root = out_dir / "ckpt"
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"))  # drops the tied lm_head.weight, restored on load
        torch.save(state, tmp / "state.pt")
        for f in tmp.iterdir():
            _fsync(f)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = (e.strerror or str(e)).lower()
        raise RunError(f"step {step}: {reason} writing checkpoint {final}; removed the partial {tmp.name}, the "
                       "earlier checkpoints are intact (--resume continues from the newest)") from None
    if final.exists():  # an incomplete earlier attempt at this step (no DONE): it is not a checkpoint
        shutil.rmtree(final)
    tmp.rename(final)
    (final / "DONE").write_text(json.dumps({"step": step}) + "\n")
    _fsync(final / "DONE")
    _fsync(root)
    prune_checkpoints(out_dir, keep)
    return final


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    for old in checkpoint_dirs(out_dir)[:-keep]:
        (old / "DONE").unlink()  # first, so that a prune cut short leaves no half checkpoint that counts as one
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)


def clean_checkpoints(out_dir: Path, log) -> None:
    """Remove what interrupted writes and prunes leave: temporary folders and step folders without DONE. Run under
    the out_dir lock, so no other process is writing them."""
    root = out_dir / "ckpt"
    junk = [d for d in root.glob(".tmp-step_*") if d.is_dir()]
    junk += [d for d in root.glob("step_*") if d.is_dir() and not (d / "DONE").exists()]
    for d in junk:
        shutil.rmtree(d, ignore_errors=True)
    if junk:
        log(f"removed {len(junk)} unfinished checkpoint folder(s) in {root}: {', '.join(sorted(d.name for d in junk))}")


def newest_loadable_checkpoint(out_dir: Path, log, move_broken: bool = True) -> tuple[Path, dict] | tuple[None, None]:
    """The newest checkpoint whose state and weights files load, and its state. A newer one that does not is
    renamed broken-step_XXXXXXXX (kept to inspect, no longer a checkpoint; by rank 0 only), and the log says why."""
    ckpts = checkpoint_dirs(out_dir)
    for ckpt in reversed(ckpts):
        try:
            state = load_checkpoint_state(ckpt)
            if sharded.is_sharded(ckpt):  # DCP's index and the shard files it names: a truncated one fails here
                sharded.check(ckpt)
            else:
                with safe_open(ckpt / "model.safetensors", "pt"):  # reads the header: a truncated file fails here
                    pass
            return ckpt, state
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
            broken = ckpt.with_name(f"broken-{ckpt.name}")
            if move_broken:
                shutil.rmtree(broken, ignore_errors=True)
                ckpt.rename(broken)
            log(f"skipping checkpoint {ckpt}: {str(e).splitlines()[0][:200]}; moved it to {broken.name}")
    if ckpts:
        raise UsageError(f"none of the {len(ckpts)} checkpoints in {out_dir / 'ckpt'} loads (see above); a new "
                         "--out_dir, or deleting the folder, starts over")
    return None, None


@contextmanager
def out_dir_lock(out_dir: Path, log):
    """Hold an exclusive lock on out_dir for the run; a second run there is refused, naming the holder's pid. The
    lock is the kernel's (flock), so it dies with its process: a killed run's lock file is simply taken over."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out_dir {out_dir} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"--out_dir {out_dir}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UsageError(f"--out_dir {out_dir} is in use by another run (pid {holder}); wait for it to end, or "
                             "use another --out_dir") from None
        if previous := os.pread(fd, 32, 0).decode(errors="replace").strip():
            log(f"{out_dir}: taking over the lock of a run that did not end cleanly (pid {previous})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # an ended run leaves an empty lock file: a pid left in it is a run that was killed
    finally:
        os.close(fd)


class StopSignals:
    """SIGINT / SIGTERM ask the loop to stop after the current step, with a checkpoint, rather than die mid-step;
    a second signal acts as it normally would (KeyboardInterrupt, termination)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self._previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        self.__exit__()

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


# --- metrics and the plot ---------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a torn last line (the process killed mid-write) is left out."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise RunError(f"{path}: line {i + 1} is not JSON (only a last line can be torn by a kill)") from None
    return rows


def restart_metrics(path: Path, start_step: int, log) -> None:
    """Make metrics.jsonl hold the rows up to start_step, the step resumed from: later rows are for steps that will
    run again, a torn last line is dropped. Rewritten atomically, and only when that changes it. A run from step 0
    moves an earlier file aside (metrics.previous.jsonl) rather than empty it."""
    if not path.exists():
        return
    text, rows = path.read_text(), read_metrics(path)
    if start_step == 0:
        if rows:
            os.replace(path, path.with_name("metrics.previous.jsonl"))
            log(f"{path}: {len(rows)} rows of an earlier run that left no checkpoint, moved to metrics.previous.jsonl")
        return
    kept = [r for r in rows if r["step"] <= start_step]
    new = "".join(json.dumps(r) + "\n" for r in kept)
    if new != text:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(new)
        os.replace(tmp, path)
        log(f"{path}: kept the {len(kept)} rows up to step {start_step}, dropped {len(rows) - len(kept)} after it"
            + ("" if text.endswith("\n") and len(text.splitlines()) == len(rows) else " and a torn last line"))


def plot_metrics(path: Path, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    train = [(r["tokens"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    val = [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot(*zip(*train, strict=True), lw=0.6, alpha=0.3, color="tab:blue")
        smooth, ema = [], train[0][1]
        for tokens, loss in train:  # an exponential moving average: single batches are too noisy to read
            ema = 0.9 * ema + 0.1 * loss if math.isfinite(loss) else ema
            smooth.append((tokens, ema))
        ax.plot(*zip(*smooth, strict=True), lw=1.2, color="tab:blue", label="train loss (EMA)")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", ms=4, color="tab:orange", label="val loss")
    for i, r in enumerate(r for r in rows if r.get("restart")):
        ax.axvline(r["tokens"], color="gray", ls="--", lw=0.8, label="ReLoRA restart" if i == 0 else None)
    for r in rows:
        if r.get("lora_start"):
            ax.axvline(r["tokens"], color="tab:red", ls=":", lw=1.2, label="LoRA phase starts")
    ax.set(xlabel="tokens", ylabel="cross-entropy loss (nats)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak resident set: KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def train(argv=None) -> dict:
    with ExitStack() as run_scope:  # the out_dir lock and the signal handlers, released however the run ends
        return _train(argv, run_scope)


def _train(argv, run_scope: ExitStack) -> dict:
    given = parse_args(argv)

    # --- processes and device: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK ---------------------------------------
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(given.get("device", "auto"), local_rank)
    multi = world > 1 or "RANK" in os.environ  # under torchrun: a process group, also for --fsdp on one process
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls; the one API torch 2.8 to 2.13 all take
    if multi and not dist.is_initialized():
        # A long timeout: the other ranks wait while rank 0 trains the tokenizer on a first run.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1),
                                device_id=device if device.type == "cuda" else None)
    master = rank == 0
    log = tqdm.write if master else (lambda message: None)  # tqdm.write keeps the progress bar intact

    # --- configuration: a resumed run takes its settings from the checkpoint ------------------------------------------
    preset = given.get("preset") or ("gpt2-124m" if device.type == "cuda" else "tiny")
    out_dir = Path(given.get("out_dir") or f"out/{preset}-{given.get('mode', Config.mode)}")
    given["out_dir"] = str(out_dir)
    if master:
        run_scope.enter_context(out_dir_lock(out_dir, log))
        clean_checkpoints(out_dir, log)
    ckpts = checkpoint_dirs(out_dir)
    if ckpts and not given.get("resume"):
        # Never start over on top of a run's checkpoints: a forgotten --resume would delete them one by one.
        raise UsageError(f"{out_dir} holds a run (checkpoint at step {int(ckpts[-1].name[5:])}): --resume continues "
                         "it; a new --out_dir, or deleting the folder, starts over")
    ckpt, ckpt_state = newest_loadable_checkpoint(out_dir, log, move_broken=master) if ckpts else (None, None)
    cfg = resolve_config(given, ckpt_state["config"] if ckpt_state else None, device)
    if cfg.fsdp and not multi:
        raise UsageError("--fsdp runs under torchrun: torchrun --standalone --nproc_per_node=N "
                         "examples/pretrain_gpt2.py --fsdp ...")
    ddp = world > 1 and not cfg.fsdp  # the DDP wrapper: more than one process, without --fsdp
    check_lora_rank(cfg, device)
    if given.get("resume") and not ckpts:
        log(f"--resume: no complete checkpoint in {out_dir}/ckpt, starting from scratch")
    if cfg.mode == "relora" and cfg.warmup_full_steps % cfg.restart_every:
        log(f"note: --warmup_full_steps ({cfg.warmup_full_steps}) is not a multiple of --restart_every "
            f"({cfg.restart_every}), so the switch to LoRA gets no learning-rate re-warmup")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    nan_steps = {int(s) for s in cfg.nan_at_steps.split(",") if s.strip()}

    # --- data: rank 0 builds the tokenizer and token cache, the others wait and read it ------------------------------
    cache = None
    if master:
        saved = ckpt_state.get("data", {}) if ckpt_state else {}  # a resumed run keeps its tokenizer and corpus
        try:
            cache = prepare_data(cfg.data, cfg.vocab_size, cfg.cache_dir, log=log,
                                 tokenizer_json=saved.get("tokenizer"), manifest=saved.get("manifest"),
                                 allow_change=cfg.allow_data_change)
        except (OSError, ValueError) as e:
            raise UsageError(str(e)) from None
    if multi:
        holder = [str(cache)]
        dist.broadcast_object_list(holder, src=0)
        cache = Path(holder[0])
    data = load_data(cache)
    for split in ("train", "val"):
        if len(getattr(data, split)) < cfg.block_size + 2:
            raise UsageError(f"the {split} split has {len(getattr(data, split))} tokens, too few for --block_size "
                             f"{cfg.block_size}; give more text or a smaller --block_size")

    # --- model (the same on every rank: same seed), LoRA layers before the optimizer and the DDP wrapper ----------
    torch.manual_seed(cfg.seed)
    # The embedding is padded to a multiple of 64 rows (never a target, so never predicted): faster matmuls on GPU.
    model_cfg = GPTConfig(vocab_size=-(-data.vocab_size // 64) * 64, block_size=cfg.block_size, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd)
    # Under --fsdp the model is built on the CPU and fully_shard moves only this rank's shards to the device.
    model = GPT(model_cfg) if cfg.fsdp else GPT(model_cfg).to(device)
    start_step = ckpt_state["step"] if ckpt_state else 0
    start_tokens = ckpt_state["tokens"] if ckpt_state else 0  # counted: a resume may run at another world size
    lora_on = ckpt_state["lora_on"] if ckpt_state else cfg.mode == "lora"  # relora switches inside the loop
    if cfg.fsdp:
        if lora_on:
            rk.apply_lora(model, LORA_TARGETS, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        optimizer = build_optimizer(sharded.shard(model, device), cfg, device)
    else:
        optimizer = switch_to_lora(model, cfg, device) if lora_on else build_optimizer(model, cfg, device)
    relora = ReLoRA(model, optimizer, restart_every=cfg.restart_every, prune_ratio=cfg.prune_ratio,
                    seed=cfg.seed) if cfg.mode == "relora" and lora_on else None
    if ckpt_state:
        if cfg.fsdp:
            sharded.load(ckpt, model, optimizer)
        else:
            load_model(model, str(ckpt / "model.safetensors"), device=str(device))
            optimizer.load_state_dict(ckpt_state["optimizer"])
        if relora is not None:
            relora.load_state_dict(ckpt_state["relora"])
        # Last, so that building the model and its LoRA layers above does not move the restored generators.
        torch.set_rng_state(ckpt_state["rng"]["torch"])
        if device.type == "cuda" and ckpt_state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt_state["rng"]["cuda"], device)
    def wrap_for_training(model):
        """(the DDP wrapper or the model itself (sharded under --fsdp), the forward the loop calls: compiled with
        --compile)."""
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
        return wrapped, torch.compile(wrapped) if cfg.compile else wrapped

    train_model, train_forward = wrap_for_training(model)

    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    log(f"{cfg.mode} | preset {cfg.preset}: {cfg.n_layer} layers, d={cfg.n_embd}, {cfg.n_head} heads, context "
        f"{cfg.block_size}, vocab {data.vocab_size} | {device} x{world}, {str(dtype).removeprefix('torch.')} | "
        f"{tokens_per_step:,} tokens/step, {cfg.max_steps} steps")
    log(f"parameters: {param_counts(model)}" + (f", LoRA r={cfg.lora_r} on every attention and MLP linear"
                                                if lora_on else ""))
    if ckpt_state:
        saved_world = ckpt_state.get("world", 1)
        log(f"resumed from {ckpt} (step {start_step})" + (f"; written by {saved_world} processes, resharded to "
                                                            f"{world}" if cfg.fsdp and saved_world != world else ""))

    def tokens_at(step):
        return start_tokens + (step - start_step) * tokens_per_step

    # --- metrics: rank 0 appends one JSON object per step; a resumed run drops what came after its checkpoint ------
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    if master:
        restart_metrics(metrics_path, start_step, log)

    def log_metrics(row):
        if master:
            with open(metrics_path, "a") as f:  # reopened every step, so a crash loses at most the current line
                f.write(json.dumps(row) + "\n")

    def checkpoint(step):
        if cfg.fsdp:
            return checkpoint_sharded(step)
        if master:
            state = checkpoint_state(step)
            state["optimizer"] = optimizer.state_dict()
            path = save_checkpoint(out_dir, step, model, state, cfg.keep_ckpts)
            plot_metrics(metrics_path, out_dir / "loss.png", f"{cfg.mode}, preset {cfg.preset}")
            log(f"step {step}: checkpoint {path}")
        if ddp:
            dist.barrier()  # nobody runs ahead of a checkpoint that may be needed to resume

    def checkpoint_sharded(step):
        if not sharded.local_finite(model):
            raise RunError(f"step {step}: the weights are not finite; refusing to write a checkpoint over good ones")
        try:  # every rank writes its shards; rank 0 the rest and, once all are written, DONE
            path = sharded.save(out_dir / "ckpt", step, model, optimizer, checkpoint_state(step) if master else None)
        except OSError as e:
            raise RunError(f"step {step}: {e} writing checkpoint {out_dir / 'ckpt'}/step_{step:08d}; removed the "
                           "partial folder, the earlier checkpoints are intact (--resume continues from the newest)"
                           ) from None
        if master:
            prune_checkpoints(out_dir, cfg.keep_ckpts)
            plot_metrics(metrics_path, out_dir / "loss.png", f"{cfg.mode}, preset {cfg.preset}")
            log(f"step {step}: checkpoint {path}")

    def checkpoint_state(step):
        """What state.pt holds besides the optimizer (in DCP's shards under --fsdp)."""
        return dict(
            step=step, tokens=tokens_at(step), config=asdict(cfg), model_config=asdict(model_cfg), world=world,
            lora_on=lora_on, relora=relora.state_dict() if relora is not None else None,
            rng=dict(torch=torch.get_rng_state(),
                     cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None),
            skipped_steps=skipped, data=dict(batches="keyed by (seed, step, micro-step, rank)", step=step,
                                             manifest=data.meta["manifest"],
                                             tokenizer=(data.cache_dir / "tokenizer.json").read_text()),
            schedule=dict(lr=lr_at(cfg, step) if step else 0.0, next_step=step + 1),
        )

    def stop_requested() -> int:
        """The signal number if SIGINT / SIGTERM reached any rank (all ranks agree), else 0."""
        signum = torch.tensor(stop.signum or 0, device=device)
        if multi:
            dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        return int(signum)

    skipped = ckpt_state["skipped_steps"] if ckpt_state else 0
    bad_streak = 0
    if start_step == 0:
        val_loss = evaluate(model, data, cfg, autocast, device, rank, world)
        log(f"step 0: val loss {val_loss:.4f} (ln(vocab) = {math.log(data.vocab_size):.2f})")
        log_metrics(dict(step=0, tokens=0, lr=0.0, train_loss=None, val_loss=val_loss, val_ppl=math.exp(val_loss)))

    # --- the loop ------------------------------------------------------------------------------------------------
    # On a terminal only: into a log file a bar writes a carriage-return frame per update, and the eval lines
    # already give one line of progress per eval. stdout, so that stderr holds only errors.
    pbar = tqdm(total=cfg.max_steps, initial=start_step, disable=not master or not sys.stdout.isatty(),
                dynamic_ncols=True, unit="step", file=sys.stdout)
    stop = run_scope.enter_context(StopSignals())
    signal_step, _, signal_name = cfg.signal_at_step.partition(":")
    train_time, tok_s = 0.0, 0.0
    for step in range(start_step + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        row = dict(step=step)

        # relora: the full-rank warm start is over; from here on the block linears are LoRA layers.
        if cfg.mode == "relora" and not lora_on and step > cfg.warmup_full_steps:
            if cfg.fsdp:
                model, optimizer = switch_to_lora_sharded(model, model_cfg, cfg, device, optimizer)
            else:
                optimizer = switch_to_lora(model, cfg, device, optimizer)
            relora = ReLoRA(model, optimizer, restart_every=cfg.restart_every, prune_ratio=cfg.prune_ratio,
                            seed=cfg.seed)
            lora_on, row["lora_start"] = True, True
            # A new wrapper: the old DDP's gradient hooks (and a compiled graph) are on the old modules.
            del train_model, train_forward
            train_model, train_forward = wrap_for_training(model)
            log(f"step {step}: LoRA phase starts: {param_counts(model)}")

        # learning rate: warmup, cosine, and the jagged re-warmups after restarts
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # forward / backward over the micro-batches; DDP averages gradients on the last one only
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x, y = get_batch(data.train, cfg.batch_size, cfg.block_size,
                             batch_seed(cfg.seed, "train", step, micro, rank), device)
            if ddp:
                train_model.require_backward_grad_sync = micro == cfg.grad_accum - 1
            elif cfg.fsdp:  # accumulate unsharded gradients; reduce-scatter them on the last micro-batch
                model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            with autocast:
                _, loss = train_forward(x, y)
            if step in nan_steps and master:
                loss = loss * float("nan")  # injected fault (--nan_at_steps): only rank 0, the others must follow
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        if signal_name and step == int(signal_step):
            os.kill(os.getpid(), getattr(signal, signal_name))  # injected Ctrl-C / kill (--signal_at_step)
        if multi:
            dist.all_reduce(loss_sum)
        train_loss = (loss_sum / (cfg.grad_accum * world)).item()

        # clip, then step, unless the loss or the gradients are not finite (the same verdict on every rank:
        # both the loss and the gradients were just averaged across ranks)
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = sharded.plain(grad_norm)  # a replicated DTensor under FSDP
        if math.isfinite(train_loss) and torch.isfinite(grad_norm):
            optimizer.step()
            bad_streak = 0
        else:
            skipped, bad_streak = skipped + 1, bad_streak + 1
            row["skipped"] = True
            log(f"step {step}: non-finite loss ({train_loss}) or gradient norm; step skipped "
                f"({bad_streak} in a row, {skipped} in all)")
        optimizer.zero_grad(set_to_none=True)

        # ReLoRA boundary: merge B @ A into W, re-initialise A and B, prune their Adam state. Not after the last
        # step: the function would not change, and nothing trains after it.
        if relora is not None and step < cfg.max_steps and relora.step(step):
            row["restart"] = True
            if ddp:  # reinit is keyed by (seed, restart, layer): every rank must now hold the same weights
                sums = [None] * world
                dist.all_gather_object(sums, param_checksum(model))
                row["rank_checksums"] = sums
                if len(set(sums)) != 1:
                    raise RunError(f"step {step}: ranks hold different parameters after a restart: {sums}")

        dt = time.perf_counter() - t0
        train_time += dt
        tok_s = tokens_per_step / dt if tok_s == 0 else 0.9 * tok_s + 0.1 * tokens_per_step / dt
        row.update(tokens=tokens_at(step), lr=lr, train_loss=train_loss,
                   grad_norm=grad_norm.item() if torch.isfinite(grad_norm) else None, tok_per_s=round(tok_s),
                   restarts=relora.restarts if relora is not None else 0, skipped_steps=skipped)

        # evaluation
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            row["val_loss"] = evaluate(model, data, cfg, autocast, device, rank, world)
            row["val_ppl"] = math.exp(min(row["val_loss"], 50.0))
            log(f"step {step}: train loss {train_loss:.4f}, val loss {row['val_loss']:.4f} "
                f"(ppl {row['val_ppl']:.1f}), {tokens_at(step):,} tokens")
        log_metrics(row)
        if bad_streak >= cfg.max_bad_steps:
            raise RunError(f"step {step}: {bad_streak} non-finite steps in a row (--max_bad_steps); the run has "
                           "diverged. Lower --lr, or resume from the last checkpoint")
        pbar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.1e}", restarts=row["restarts"],
                         refresh=False)
        pbar.update()

        # checkpoint (atomically), then the injected crash of the resume test
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            checkpoint(step)
        if step < cfg.max_steps and (signum := stop_requested()):
            if step % cfg.ckpt_every:
                checkpoint(step)
            raise Interrupted(f"{signal.Signals(signum).name} at step {step}: stopped after writing its checkpoint; "
                              "--resume continues exactly", signum)
        if step == cfg.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
    pbar.close()

    # --- the end: summary, plot, a sample of text ------------------------------------------------------------------
    rows = read_metrics(metrics_path) if master else []
    val_rows = [r for r in rows if r.get("val_loss") is not None]
    summary = dict(mode=cfg.mode, preset=cfg.preset, steps=cfg.max_steps, tokens=tokens_at(cfg.max_steps),
                   val_loss=val_rows[-1]["val_loss"] if val_rows else None, skipped_steps=skipped,
                   restarts=relora.restarts if relora is not None else 0,
                   tok_per_s=round((cfg.max_steps - start_step) * tokens_per_step / train_time) if train_time else None,
                   peak_mem_mib=round(peak_memory_mib(device)), device=str(device), world=world, fsdp=cfg.fsdp)
    if master:
        plot_metrics(metrics_path, out_dir / "loss.png", f"{cfg.mode}, preset {cfg.preset}")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if val_rows:
            first, last = val_rows[0], val_rows[-1]
            log(f"val loss {first['val_loss']:.3f} at step {first['step']} -> {last['val_loss']:.3f} at step "
                f"{last['step']} (ppl {math.exp(last['val_loss']):.1f}); "
                f"{summary['tok_per_s']} tokens/s; peak memory {summary['peak_mem_mib']} MiB; "
                f"{summary['restarts']} restarts, {skipped} skipped steps")
        log(f"wrote {metrics_path}, {out_dir / 'loss.png'}, {out_dir / 'ckpt'}")
    if cfg.sample_tokens and (master or cfg.fsdp):  # under FSDP each forward is a collective: every rank samples
        idx = torch.tensor([data.tokenizer.encode("def ").ids], device=device)
        model.eval()
        with autocast:
            out = model.generate(idx, cfg.sample_tokens, generator=torch.Generator(device).manual_seed(cfg.seed))
        log("sample:\n" + data.tokenizer.decode(out[0].tolist()))
    return summary


def main(argv=None) -> int:
    try:
        train(argv)
        return 0
    except UsageError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"{Path(sys.argv[0]).name}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted; the newest complete checkpoint, if any, is where --resume "
              "continues", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

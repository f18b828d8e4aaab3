"""Pre-train a GPT-2 style model with ReLoRA: full-rank warm start, then LoRA layers merged and restarted.

    python examples/pretrain_gpt2.py                      # CPU: tiny model on the Python stdlib, 3-4 minutes
    python examples/pretrain_gpt2.py --mode full          # the same run, ordinary full-rank training
    python examples/pretrain_gpt2.py --resume             # continue from the newest checkpoint in --out_dir
    python examples/pretrain_gpt2.py --preset gpt2-124m --data my_corpus/       # GPU: GPT-2 small, bf16
    python examples/pretrain_gpt2.py --preset llama-tiny  # a Llama-style model (llama.py; also llama-60m/130m/350m)
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
--restart_every by default) gets the same dip: its factors and their Adam state are fresh too. By default
(--lora_schedule restart) the LoRA phase starts a fresh optimizer and a schedule of its own over the steps left (a
--warmup_steps warmup to the peak, then the cosine), as a second run from the warm-start weights would;
--lora_schedule continuous keeps one schedule and the Adam state across the switch.

Afterwards: examples/export.py writes a run as a Hugging Face model (LoRA merged), examples/generate.py samples.

Writes to --out_dir: metrics.jsonl (one JSON object per step), loss.png (losses and learning rate vs tokens,
restarts and resumes marked; examples/plot_runs.py overlays several runs) and ckpt/step_XXXXXXXX/
(model.safetensors and state.pt: optimizer, ReLoRA controller, RNG states, step, tokenizer, corpus manifest; under
--fsdp DCP's shards of the model and optimizer replace model.safetensors and the optimizer, see fsdp.py). Resuming
from a checkpoint reproduces the uninterrupted run's losses exactly (same settings, same machine), after a kill -9
or a Ctrl-C (SIGINT/SIGTERM finish the step and checkpoint it). The run holds a lock on --out_dir, resumes from the
newest checkpoint that loads, and refuses --data that changed since the checkpoint.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import fsdp as sharded
import torch
import torch.distributed as dist
from checkpoints import (
    RunError,
    append_metrics,
    checkpoint_dirs,
    clean_checkpoints,
    newest_loadable_checkpoint,
    out_dir_lock,
    plot_metrics,
    prune_checkpoints,
    read_metrics,
    restart_metrics,
    save_checkpoint,
    write_json,
)
from config import Config, UsageError, check_lora_rank, is_llama, parse_args, pick_device, require, resolve_config
from data import EOT, batch_seed, get_batch, load_data, load_hf_tokenizer, prepare_data
from llama import Llama, LlamaConfig
from model import GPT, GPTConfig
from safetensors.torch import load_model
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import relora_kernels as rk
from relora_kernels.relora import ReLoRA, jagged_cosine

# Fault injection for the tests (tests/fault_run.py installs hooks here; a run of the example has none). Each hook is
# called as hook(event, step, value) and returns the value: "loss" (rank 0's loss of each micro-batch, the value),
# "backward" (after the micro-batches of a step) and "step_end" (after the step's checkpoint).
FAULT_HOOKS: list[Callable] = []


def fault_point(event: str, step: int, value=None):
    for hook in FAULT_HOOKS:
        value = hook(event, step, value)
    return value


class Interrupted(Exception):
    """SIGINT or SIGTERM: the run stopped after a step and its checkpoint; exit status 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# ----------------------------------------------------------------------------------------------------------------
# Set-up: processes, configuration, data, model
# ----------------------------------------------------------------------------------------------------------------


def init_processes(given: dict) -> tuple[torch.device, int, int, bool]:
    """(device, rank, world, multi): torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; multi is "under torchrun"."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(given.get("device", "auto"), local_rank)
    multi = world > 1 or "RANK" in os.environ  # a process group, also for --fsdp on one process
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls; the one API torch 2.8 to 2.13 all take
    if multi and not dist.is_initialized():
        # A long timeout: the other ranks wait while rank 0 trains the tokenizer on a first run.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1),
                                device_id=device if device.type == "cuda" else None)
    return device, rank, world, multi


def load_config(given: dict, device, multi: bool, master: bool, log, run_scope: ExitStack):
    """(cfg, checkpoint folder, its state): a resumed run takes its settings from the checkpoint. Rank 0 holds the
    out_dir lock for the run."""
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
    require(not cfg.fsdp or multi, "--fsdp runs under torchrun: torchrun --standalone --nproc_per_node=N "
            "examples/pretrain_gpt2.py --fsdp ...")
    # DDP wraps a module whose parameters are on one device, and a CPU master is on another than the GPU's.
    require(not (cfg.fp8_master_cpu and multi), "--fp8_master_cpu runs in one process for now (not under torchrun)")
    check_lora_rank(cfg, device)
    if given.get("resume") and not ckpts:
        log(f"--resume: no complete checkpoint in {out_dir}/ckpt, starting from scratch")
    if cfg.mode == "relora" and cfg.warmup_full_steps % cfg.restart_every:
        log(f"note: --warmup_full_steps ({cfg.warmup_full_steps}) is not a multiple of --restart_every "
            f"({cfg.restart_every}), so the switch to LoRA gets no learning-rate re-warmup")
    return cfg, ckpt, ckpt_state


def load_dataset(cfg: Config, ckpt_state: dict | None, master: bool, multi: bool, log):
    """Rank 0 builds the tokenizer and token cache (a resumed run keeps its tokenizer and corpus), the others wait
    and read it."""
    cache = None
    if master:
        saved = ckpt_state.get("data", {}) if ckpt_state else {}
        tokenizer_json, eot, vocab_size = saved.get("tokenizer"), saved.get("eot", EOT), cfg.vocab_size
        try:
            if cfg.tokenizer is not None:
                if tokenizer_json is None:  # a fresh run; a resumed one has the tokenizer in its checkpoint
                    tokenizer_json, eot = load_hf_tokenizer(cfg.tokenizer)
                from tokenizers import Tokenizer

                vocab_size = Tokenizer.from_str(tokenizer_json).get_vocab_size()
            cache = prepare_data(cfg.data, vocab_size, cfg.cache_dir, log=log, tokenizer_json=tokenizer_json,
                                 manifest=saved.get("manifest"), allow_change=cfg.allow_data_change, eot=eot)
        except (OSError, ValueError) as e:
            raise UsageError(str(e)) from None
    if multi:
        holder = [str(cache)]
        dist.broadcast_object_list(holder, src=0)
        cache = Path(holder[0])
    data = load_data(cache)
    for split in ("train", "val"):
        n = len(getattr(data, split))
        require(n >= cfg.block_size + 2, f"the {split} split has {n} tokens, too few for --block_size "
                f"{cfg.block_size}; give more text or a smaller --block_size")
    return data


def build_model(cfg: Config, vocab_size: int, device) -> tuple[GPTConfig | LlamaConfig, GPT | Llama]:
    """The same on every rank (same seed). Under --fsdp built on the CPU: fully_shard moves this rank's shards."""
    torch.manual_seed(cfg.seed)
    # The embedding is padded to a multiple of 64 rows (never a target, so never predicted): faster matmuls on GPU.
    padded = -(-vocab_size // 64) * 64
    if is_llama(cfg.preset):
        model_cfg = LlamaConfig(vocab_size=padded, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                n_embd=cfg.n_embd, intermediate_size=cfg.intermediate_size)
    else:
        model_cfg = GPTConfig(vocab_size=padded, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                              n_embd=cfg.n_embd)
    model_class = model_class_for(model_cfg)
    return model_cfg, model_class(model_cfg) if cfg.fsdp else model_class(model_cfg).to(device)


def model_class_for(model_cfg: GPTConfig | LlamaConfig) -> type[GPT] | type[Llama]:
    return Llama if isinstance(model_cfg, LlamaConfig) else GPT


def restore(ckpt: Path, state: dict, run: Run) -> None:
    """Load a checkpoint into the run's model, optimizer and ReLoRA controller, then the RNG states."""
    if run.cfg.fsdp:
        sharded.load(ckpt, run.model, run.optimizer)
    else:
        load_model(run.model, str(ckpt / "model.safetensors"), device=str(run.device))
        run.optimizer.load_state_dict(state["optimizer"])
    if run.relora is not None:
        run.relora.load_state_dict(state["relora"])
    # Last, so that building the model and its LoRA layers does not move the restored generators.
    torch.set_rng_state(state["rng"]["torch"])
    if run.device.type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], run.device)


@dataclass
class Run:
    """What the pieces of the run share. The switch to LoRA replaces model (under --fsdp), optimizer and relora here,
    so every piece reads the current ones."""

    cfg: Config
    model_cfg: GPTConfig | LlamaConfig
    device: torch.device
    rank: int
    world: int
    multi: bool  # under torchrun: a process group
    log: Callable
    data: object
    autocast: object
    model: GPT | Llama
    optimizer: torch.optim.Optimizer | None = None
    relora: ReLoRA | None = None
    lora_on: bool = False
    start_step: int = 0
    start_tokens: int = 0  # counted: a resume may run at another world size
    skipped: int = 0  # non-finite steps skipped in all
    bad_streak: int = 0  # ... and in a row
    train_time: float = 0.0
    tok_s: float = 0.0
    train_model: object = None  # the DDP wrapper, or the model itself
    train_forward: object = None  # its forward, compiled under --compile
    stop: StopSignals | None = None
    restarted_on_resume: bool = False  # the restart after the checkpoint's step, made at start-up

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:  # the DDP wrapper: more than one process, without --fsdp
        return self.world > 1 and not self.cfg.fsdp

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.block_size * self.cfg.grad_accum * self.world

    def tokens_at(self, step: int) -> int:
        return self.start_tokens + (step - self.start_step) * self.tokens_per_step


def new_relora(run: Run) -> ReLoRA:
    return ReLoRA(run.model, run.optimizer, restart_every=run.cfg.restart_every, prune_ratio=run.cfg.prune_ratio,
                  seed=run.cfg.seed)


def set_up(argv, run_scope: ExitStack) -> Run:
    """Processes, configuration, data, the model with its LoRA layers (before the optimizer and the DDP wrapper),
    the checkpoint resumed from."""
    given = parse_args(argv, __doc__)
    device, rank, world, multi = init_processes(given)
    log = tqdm.write if rank == 0 else (lambda message: None)  # tqdm.write keeps the progress bar intact
    cfg, ckpt, state = load_config(given, device, multi, rank == 0, log, run_scope)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    data = load_dataset(cfg, state, rank == 0, multi, log)
    model_cfg, model = build_model(cfg, data.vocab_size, device)
    run = Run(cfg, model_cfg, device, rank, world, multi, log, data, autocast, model,
              lora_on=state["lora_on"] if state else cfg.mode == "lora",  # relora switches inside the loop
              start_step=state["step"] if state else 0, start_tokens=state["tokens"] if state else 0,
              skipped=state["skipped_steps"] if state else 0)
    if cfg.fsdp:
        if run.lora_on:
            apply_lora(model, cfg)
        run.optimizer = build_optimizer(sharded.shard(model, device), cfg, device)
    else:
        run.optimizer = switch_to_lora(model, cfg, device) if run.lora_on else build_optimizer(model, cfg, device)
    run.relora = new_relora(run) if cfg.mode == "relora" and run.lora_on else None
    if state:
        restore(ckpt, state, run)
        restart_skipped_at_the_old_end(run, state)
    wrap_for_training(run)
    log(f"{cfg.mode} | preset {cfg.preset}: {cfg.n_layer} layers, d={cfg.n_embd}, {cfg.n_head} heads, context "
        f"{cfg.block_size}, vocab {data.vocab_size} | {device} x{world}, {str(dtype).removeprefix('torch.')} | "
        f"{run.tokens_per_step:,} tokens/step, {cfg.max_steps} steps")
    log(f"parameters: {param_counts(model)}" + (f", LoRA r={cfg.lora_r} on every attention and MLP linear"
                                                if run.lora_on else "")
        + (", their frozen weights in FP8 (e4m3) from the switch to LoRA" if cfg.fp8 else ""))
    if state:
        saved_world = state.get("world", 1)
        resharded = f"; written by {saved_world} processes, resharded to {world}" if saved_world != world else ""
        log(f"resumed from {ckpt} (step {run.start_step})" + (resharded if cfg.fsdp else ""))
    return run


def restart_skipped_at_the_old_end(run: Run, state: dict) -> None:
    """A run extended past its end (--resume with a larger --max_steps) makes the restart it skipped after its last
    step (nothing trained after it then), so that it restarts where a run of the new length does."""
    old_end = state["config"].get("max_steps")
    if run.relora is not None and run.start_step == old_end < run.cfg.max_steps and run.relora.step(run.start_step):
        run.restarted_on_resume = True
        run.log(f"step {run.start_step}: restart (the run ended there before, without one; it now goes on to step "
                f"{run.cfg.max_steps})")


def wrap_for_training(run: Run) -> None:
    """The DDP wrapper (or the model itself, sharded under --fsdp), and the forward the loop calls: compiled with
    --compile. A new one after the switch to LoRA: the old DDP's gradient hooks (and graph) are on the old modules."""
    run.train_model = run.train_forward = None
    device_ids = [run.device.index] if run.device.type == "cuda" else None
    run.train_model = DDP(run.model, device_ids=device_ids) if run.ddp else run.model
    run.train_forward = torch.compile(run.train_model) if run.cfg.compile else run.train_model


# ----------------------------------------------------------------------------------------------------------------
# The model's pieces: learning rate, optimizer, the switch to LoRA
# ----------------------------------------------------------------------------------------------------------------


def lr_at(cfg: Config, step: int) -> float:
    """The learning rate of optimizer step `step` (1-based): warmup, cosine, and in relora mode the restart dips.

    jagged_cosine counts steps from 0 like LambdaLR, so step `step` reads index step - 1: the first step after the
    restart made at the end of step k * restart_every reads index k * restart_every, where the dip is 0. The initial
    warm-ups are the exception: read at index step - 1 they would spend step 1 at rate 0, so they read index `step`
    instead, starting at lr / warmup_steps and reaching the peak at step warmup_steps (warm_up_from_step_one).
    """
    restarting = cfg.mode == "relora" and step - 1 >= cfg.warmup_full_steps  # no dips in the full-rank warm start
    if restarting and cfg.lora_schedule == "restart":
        # The LoRA phase as a run of its own: warmup to the peak, cosine over the steps left, the dips at the same
        # global steps (warmup_full_steps is a multiple of restart_every, checked).
        return cfg.lr * warm_up_from_step_one(
            step - 1 - cfg.warmup_full_steps, max_steps=cfg.max_steps - cfg.warmup_full_steps,
            warmup_steps=cfg.warmup_steps, restart_every=cfg.restart_every,
            restart_warmup_steps=cfg.restart_warmup_steps, min_lr_ratio=cfg.min_lr_ratio,
        )
    return cfg.lr * warm_up_from_step_one(
        step - 1, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps, restart_every=cfg.restart_every,
        restart_warmup_steps=cfg.restart_warmup_steps if restarting else 0, min_lr_ratio=cfg.min_lr_ratio,
    )


def warm_up_from_step_one(index: int, **schedule) -> float:
    """jagged_cosine(index, **schedule), except that its initial warmup, index / warmup_steps (0 at index 0, as
    LambdaLR expects), runs one index ahead: (index + 1) / warmup_steps, so no optimizer step is spent at rate 0 and
    the last warmup index is at the peak. jagged_cosine's initial warmup takes precedence over restarts, so this
    changes no dip; every index from warmup_steps on is jagged_cosine's."""
    if index < schedule["warmup_steps"]:
        return (index + 1) / schedule["warmup_steps"]
    return jagged_cosine(index, **schedule)


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


def switch_to_lora(model: GPT | Llama, cfg: Config, device, optimizer=None):
    """Every attention and MLP linear becomes a LoRALinear (base weight frozen); returns the new optimizer.

    The optimizer is rebuilt because A and B are new parameters; the Adam state of what stays trainable is kept.
    """
    state_by_name = None
    if optimizer is not None:
        state_by_name = {name: optimizer.state[p] for name, p in model.named_parameters() if p in optimizer.state}
    apply_lora(model, cfg)
    return build_optimizer(model, cfg, device, old=state_by_name)


def apply_lora(model: GPT | Llama, cfg: Config) -> None:
    """LoRA layers in place of the model's attention and MLP linears, as the options say."""
    rk.apply_lora(model, model.lora_targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                  frozen_dtype="fp8" if cfg.fp8 else None, master_device="cpu" if cfg.fp8_master_cpu else None)


def switch_to_lora_sharded(model, model_cfg: GPTConfig | LlamaConfig, cfg: Config, device, optimizer=None):
    """switch_to_lora for an FSDP2 model: returns (new model, new optimizer).

    fully_shard fixes each unit's parameters when it wraps, so the LoRA layers cannot replace modules inside it:
    the weights are gathered to the CPU one tensor at a time, loaded into an unsharded model built on the meta
    device (no init), given LoRA layers there (A drawn as the unsharded example draws it) and sharded again. The
    Adam state of what stays trainable is kept: its DTensors sit on the same mesh, sharded as the new parameters.
    """
    state_by_name = None
    if optimizer is not None:
        state_by_name = {name: optimizer.state[p] for name, p in model.named_parameters() if p in optimizer.state}
    full = sharded.full_state_on_cpu(model)
    with torch.device("meta"):
        new = model_class_for(model_cfg)(model_cfg)
    new.load_state_dict(full, assign=True)
    if new.tied_head:
        new.lm_head.weight = new.wte.weight  # assign=True loaded the two names as two tensors: tie them again
    apply_lora(new, cfg)
    sharded.shard(new, device)
    return new, build_optimizer(new, cfg, device, old=state_by_name)


def param_counts(model) -> str:
    trainable, frozen = model.num_params(trainable=True), model.num_params(trainable=False)
    return f"{trainable / 1e6:.2f}M trainable, {frozen / 1e6:.2f}M frozen ({trainable + frozen:,} parameters)"


def param_checksum(model) -> int:
    """Sum of every parameter's 16-bit words: any flipped bit changes it, and it is cheap on any device."""
    return int(sum(p.detach().reshape(-1).view(torch.int16).sum(dtype=torch.int64) for p in model.parameters()))


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean val loss over cfg.eval_batches fixed windows, shared out among the ranks.

    Under FSDP every forward is a collective, so every rank runs as many as the busiest one; the extra ones (on
    window 0) are not counted.
    """
    cfg, device, world = run.cfg, run.device, run.world
    run.model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, count)
    windows = -(-cfg.eval_batches // world) * world if cfg.fsdp else cfg.eval_batches
    for i in range(run.rank, windows, world):
        counted = i < cfg.eval_batches
        x, y = get_batch(run.data.val, cfg.batch_size, cfg.block_size,
                         batch_seed(cfg.seed, "val", i if counted else 0), device)
        with run.autocast:
            _, loss = run.model(x, y)
        if counted:
            total += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(total)
    run.model.train()
    return (total[0] / total[1]).item()


def evaluate_into(run: Run, step: int, row: dict) -> None:
    """The val loss into the step's row, when an evaluation is due (every --eval_every steps and at the end)."""
    if step % run.cfg.eval_every and step != run.cfg.max_steps:
        return
    row["val_loss"] = evaluate(run)
    row["val_ppl"] = math.exp(min(row["val_loss"], 50.0))
    run.log(f"step {step}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f} "
            f"(ppl {row['val_ppl']:.1f}), {run.tokens_at(step):,} tokens")


def log_metrics(run: Run, row: dict) -> None:
    if run.master:  # rank 0 appends one JSON object per step
        append_metrics(run.metrics_path, row)


# ----------------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------------


def start_lora_phase(run: Run, step: int) -> None:
    """relora: the full-rank warm start is over; from here on the block linears are LoRA layers."""
    cfg = run.cfg
    # --lora_schedule restart: a fresh optimizer, as a separate LoRA run started from the warm-start weights would.
    carried = run.optimizer if cfg.lora_schedule == "continuous" else None
    if cfg.fsdp:
        run.model, run.optimizer = switch_to_lora_sharded(run.model, run.model_cfg, cfg, run.device, carried)
    else:
        run.optimizer = switch_to_lora(run.model, cfg, run.device, carried)
    run.relora = new_relora(run)
    run.lora_on = True
    wrap_for_training(run)
    run.log(f"step {step}: LoRA phase starts: {param_counts(run.model)}")


def forward_backward(run: Run, step: int) -> float:
    """The micro-batches' forward and backward; gradients are synchronised (DDP all-reduce, FSDP reduce-scatter) on
    the last one only. Returns the step's train loss, averaged over micro-batches and ranks."""
    cfg = run.cfg
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(cfg.grad_accum):
        x, y = get_batch(run.data.train, cfg.batch_size, cfg.block_size,
                         batch_seed(cfg.seed, "train", step, micro, run.rank), run.device)
        last = micro == cfg.grad_accum - 1
        if run.ddp:
            run.train_model.require_backward_grad_sync = last
        elif cfg.fsdp:  # accumulate unsharded gradients; reduce-scatter them on the last micro-batch
            run.model.set_requires_gradient_sync(last)
        with run.autocast:
            _, loss = run.train_forward(x, y)
        if run.master:
            loss = fault_point("loss", step, loss)  # tests: a NaN on rank 0 only, the others must follow
        (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach()
    fault_point("backward", step)  # tests: a Ctrl-C or kill during the step
    if run.multi:
        dist.all_reduce(loss_sum)
    return (loss_sum / (cfg.grad_accum * run.world)).item()


def update(run: Run, step: int, train_loss: float, row: dict) -> torch.Tensor:
    """Clip, then step, unless the loss or the gradients are not finite (the same verdict on every rank: both were
    just averaged across ranks). Returns the gradient norm."""
    params = [p for p in run.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip if run.cfg.grad_clip > 0 else float("inf"))
    grad_norm = sharded.plain(grad_norm)  # a replicated DTensor under FSDP
    if math.isfinite(train_loss) and torch.isfinite(grad_norm):
        run.optimizer.step()
        run.bad_streak = 0
    else:
        run.skipped, run.bad_streak = run.skipped + 1, run.bad_streak + 1
        row["skipped"] = True
        run.log(f"step {step}: non-finite loss ({train_loss}) or gradient norm; step skipped "
                f"({run.bad_streak} in a row, {run.skipped} in all)")
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def restart(run: Run, step: int, row: dict) -> None:
    """ReLoRA boundary: merge B @ A into W, re-initialise A and B, prune their Adam state. Not after the last step:
    the function would not change, and nothing trains after it."""
    if run.relora is None or step >= run.cfg.max_steps or not run.relora.step(step):
        return
    row["restart"] = True
    if run.ddp:  # reinit is keyed by (seed, restart, layer): every rank must now hold the same weights
        sums = [None] * run.world
        dist.all_gather_object(sums, param_checksum(run.model))
        row["rank_checksums"] = sums
        if len(set(sums)) != 1:
            raise RunError(f"step {step}: ranks hold different parameters after a restart: {sums}")


def train_step(run: Run, step: int) -> dict:
    """One optimizer step: the switch to LoRA when due, the learning rate (warmup, cosine, the jagged re-warmups),
    the micro-batches, the update, the restart when due. Returns the step's metrics row."""
    t0 = time.perf_counter()
    row = dict(step=step)
    if run.cfg.mode == "relora" and not run.lora_on and step > run.cfg.warmup_full_steps:
        start_lora_phase(run, step)
        row["lora_start"] = True
    lr = lr_at(run.cfg, step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    train_loss = forward_backward(run, step)
    grad_norm = update(run, step, train_loss, row)
    restart(run, step, row)
    dt = time.perf_counter() - t0
    run.train_time += dt
    run.tok_s = run.tokens_per_step / dt if run.tok_s == 0 else 0.9 * run.tok_s + 0.1 * run.tokens_per_step / dt
    row.update(tokens=run.tokens_at(step), lr=lr, train_loss=train_loss,
               grad_norm=grad_norm.item() if torch.isfinite(grad_norm) else None, tok_per_s=round(run.tok_s),
               restarts=run.relora.restarts if run.relora is not None else 0, skipped_steps=run.skipped)
    return row


# ----------------------------------------------------------------------------------------------------------------
# Checkpointing (the files themselves: checkpoints.py, and fsdp.py under --fsdp)
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_state(run: Run, step: int) -> dict:
    """What state.pt holds besides the optimizer (in DCP's shards under --fsdp)."""
    cfg, data, device = run.cfg, run.data, run.device
    return dict(
        step=step, tokens=run.tokens_at(step), config=asdict(cfg), model_config=asdict(run.model_cfg),
        world=run.world, lora_on=run.lora_on, relora=run.relora.state_dict() if run.relora is not None else None,
        rng=dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None),
        skipped_steps=run.skipped, data=dict(batches="keyed by (seed, step, micro-step, rank)", step=step,
                                             manifest=data.meta["manifest"],
                                             tokenizer=(data.cache_dir / "tokenizer.json").read_text(),
                                             eot=data.eot),
        schedule=dict(lr=lr_at(cfg, step) if step else 0.0, next_step=step + 1),
    )


def plot(run: Run) -> None:
    cfg = run.cfg
    data = Path(cfg.data).name if cfg.data else "the Python standard library"
    plot_metrics(run.metrics_path, run.out_dir / "loss.png",
                 f"{run.out_dir.name}: --mode {cfg.mode}, preset {cfg.preset}, data: {data}")


def checkpoint(run: Run, step: int) -> None:
    """Write the checkpoint of `step` atomically (every rank its shards under --fsdp, else rank 0), prune old ones,
    redraw the plot; no rank runs ahead of a checkpoint that may be needed to resume, and a failure on rank 0 (a
    full disk) stops every rank with its message."""
    if run.cfg.fsdp:
        if not sharded.local_finite(run.model):
            raise RunError(f"step {step}: the weights are not finite; refusing to write a checkpoint over good ones")
        # Every rank writes its shards; rank 0 the rest and, once all are written, DONE. A failure on any rank raises
        # the same RunError on every rank.
        state = checkpoint_state(run, step) if run.master else None
        path = sharded.save(run.out_dir / "ckpt", step, run.model, run.optimizer, state)
    failure = None
    if run.master:
        try:
            if run.cfg.fsdp:
                prune_checkpoints(run.out_dir, run.cfg.keep_ckpts)
            else:
                state = {**checkpoint_state(run, step), "optimizer": run.optimizer.state_dict()}
                path = save_checkpoint(run.out_dir, step, run.model, state, run.cfg.keep_ckpts)
            plot(run)
            run.log(f"step {step}: checkpoint {path}")
        except RunError as e:
            failure = str(e)
    if run.multi:  # also the barrier that keeps every rank behind the checkpoint
        failures = [None] * run.world
        dist.all_gather_object(failures, failure)
        failure = failures[0]
    if failure:
        raise RunError(failure)


def stop_requested(run: Run) -> int:
    """The signal number if SIGINT / SIGTERM reached any rank (all ranks agree), else 0."""
    signum = torch.tensor(run.stop.signum or 0, device=run.device)
    if run.multi:
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
    return int(signum)


def end_step(run: Run, step: int) -> None:
    """The checkpoint when due; after a SIGINT / SIGTERM, a checkpoint (if none was due) and the stop."""
    if step % run.cfg.ckpt_every == 0 or step == run.cfg.max_steps:
        checkpoint(run, step)
    if step < run.cfg.max_steps and (signum := stop_requested(run)):
        if step % run.cfg.ckpt_every:
            checkpoint(run, step)
        raise Interrupted(f"{signal.Signals(signum).name} at step {step}: stopped after writing its checkpoint; "
                          "--resume continues exactly", signum)
    fault_point("step_end", step)  # tests: a kill -9 right after a checkpoint


class StopSignals:
    """SIGINT / SIGTERM ask the loop to stop after the current step, with a checkpoint, rather than die mid-step.
    A second SIGINT (Ctrl-C twice) stops at once (KeyboardInterrupt); more SIGTERMs change nothing: a cluster's
    scheduler (scancel, a time limit) signals every process, and torchrun forwards its own on top."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    active: StopSignals | None = None  # the one the loop is under, for the launcher watch

    def __init__(self):
        self.signum, self._previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        StopSignals.active = self
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            self.__exit__()
            raise KeyboardInterrupt
        self.request(signum)

    def request(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        StopSignals.active = None


def shutdown_grace() -> float:
    """The seconds torchrun waits, after forwarding a SIGTERM to the workers, before it kills them
    (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, which torchrun reads too; 30 by default)."""
    try:
        return max(float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")), 0.0)
    except ValueError:
        return 30.0


def watch_launcher() -> None:
    """Under torchrun: a worker whose launcher is gone (torchrun killed with SIGKILL, which it cannot forward)
    stops as after a SIGTERM: the step ends and is checkpointed, then the run exits. Before the loop (start-up,
    waiting for the other ranks) it exits at once. A worker still running max(grace, 60) s later exits anyway: with
    no launcher, a rank that died would leave the others waiting in a collective for ever."""
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(0.5)
        name = Path(sys.argv[0]).name
        stop = StopSignals.active
        if stop is None:
            print(f"{name}: the launcher (pid {launcher}) is gone; exiting", file=sys.stderr, flush=True)
            os._exit(1)
        print(f"{name}: the launcher (pid {launcher}) is gone; stopping after this step and its checkpoint",
              file=sys.stderr, flush=True)
        stop.request(signal.SIGTERM)
        time.sleep(max(shutdown_grace(), 60.0))
        print(f"{name}: still running {max(shutdown_grace(), 60.0):g} s after the launcher went; exiting",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak resident set: KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def finish(run: Run) -> dict:
    """The summary (summary.json), the plot, the log's last lines."""
    cfg = run.cfg
    rows = read_metrics(run.metrics_path) if run.master else []
    val_rows = [r for r in rows if r.get("val_loss") is not None]
    trained_tokens = (cfg.max_steps - run.start_step) * run.tokens_per_step
    summary = dict(mode=cfg.mode, preset=cfg.preset, steps=cfg.max_steps, tokens=run.tokens_at(cfg.max_steps),
                   val_loss=val_rows[-1]["val_loss"] if val_rows else None, skipped_steps=run.skipped,
                   restarts=run.relora.restarts if run.relora is not None else 0,
                   tok_per_s=round(trained_tokens / run.train_time) if run.train_time else None,
                   peak_mem_mib=round(peak_memory_mib(run.device)), device=str(run.device), world=run.world,
                   fsdp=cfg.fsdp)
    if run.master:
        plot(run)
        write_json(run.out_dir / "summary.json", summary)
        if val_rows:
            first, last = val_rows[0], val_rows[-1]
            run.log(f"val loss {first['val_loss']:.3f} at step {first['step']} -> {last['val_loss']:.3f} at step "
                    f"{last['step']} (ppl {math.exp(last['val_loss']):.1f}); "
                    f"{summary['tok_per_s']} tokens/s; peak memory {summary['peak_mem_mib']} MiB; "
                    f"{summary['restarts']} restarts, {run.skipped} skipped steps")
        run.log(f"wrote {run.metrics_path}, {run.out_dir / 'loss.png'}, {run.out_dir / 'ckpt'}")
    return summary


SAMPLE_PROMPT_TOKENS = 16


def sample(run: Run) -> None:
    """A sample of text after a prompt drawn from the validation data (a window keyed by --seed, so unseen text of
    the corpus itself, whatever the corpus); under FSDP each forward is a collective, so every rank samples."""
    cfg = run.cfg
    if cfg.sample_tokens and (run.master or cfg.fsdp):
        prompt_len = min(SAMPLE_PROMPT_TOKENS, cfg.block_size // 2)
        idx, _ = get_batch(run.data.val, 1, prompt_len, batch_seed(cfg.seed, "sample"), run.device)
        prompt = run.data.tokenizer.decode(idx[0].tolist())
        run.log(f"sampling {cfg.sample_tokens} tokens after {prompt_len} tokens of the validation data "
                f"(temperature 0.8, top-k 50, seed {cfg.seed}); --sample_tokens 0 skips this")
        run.model.eval()
        with run.autocast:
            generator = torch.Generator(run.device).manual_seed(cfg.seed)
            out = run.model.generate(idx, cfg.sample_tokens, generator=generator)
        run.log(f"prompt:\n{prompt}\nsample:\n{run.data.tokenizer.decode(out[0, prompt_len:].tolist())}")


def train(argv=None) -> dict:
    with ExitStack() as run_scope:  # the out_dir lock and the signal handlers, let go however the run ends
        run = set_up(argv, run_scope)
        cfg = run.cfg
        run.out_dir.mkdir(parents=True, exist_ok=True)
        if run.master:  # a resumed run drops the rows after its checkpoint
            restart_metrics(run.metrics_path, run.start_step, run.log,
                            restarts=run.relora.restarts if run.restarted_on_resume else None)
        if run.start_step == 0:
            val_loss = evaluate(run)
            run.log(f"step 0: val loss {val_loss:.4f} (ln(vocab) = {math.log(run.data.vocab_size):.2f})")
            log_metrics(run, dict(step=0, tokens=0, lr=0.0, train_loss=None, val_loss=val_loss,
                                  val_ppl=math.exp(val_loss)))
        # On a terminal only: into a log file a bar writes a carriage-return frame per update, and the eval lines
        # already give one line of progress per eval. stdout, so that stderr holds only errors.
        pbar = tqdm(total=cfg.max_steps, initial=run.start_step, disable=not run.master or not sys.stdout.isatty(),
                    dynamic_ncols=True, unit="step", file=sys.stdout)
        run.stop = run_scope.enter_context(StopSignals())
        grace, warned = shutdown_grace(), not run.multi
        if run.multi:
            run.log(f"SIGTERM (to torchrun, or to every process): each rank finishes its step and writes its part of "
                    f"the checkpoint; torchrun kills the workers {grace:g} s after it forwards the signal "
                    "(TORCH_ELASTIC_SHUTDOWN_TIMEOUT)")
        for step in range(run.start_step + 1, cfg.max_steps + 1):
            started = time.perf_counter()
            row = train_step(run, step)
            if step == run.start_step + 1 and run.start_step:
                row["resumed_from"] = run.start_step  # marked on loss.png
            evaluate_into(run, step, row)
            log_metrics(run, row)
            if run.bad_streak >= cfg.max_bad_steps:
                raise RunError(f"step {step}: {run.bad_streak} non-finite steps in a row (--max_bad_steps); the run "
                               "has diverged. Lower --lr, or resume from the last checkpoint")
            pbar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{run.tok_s:,.0f}", lr=f"{row['lr']:.1e}",
                             restarts=row["restarts"], refresh=False)
            pbar.update()
            end_step(run, step)
            if not warned and (took := time.perf_counter() - started) > grace:
                warned = True
                run.log(f"warning: step {step} took {took:.1f} s with its evaluation and checkpoint, more than the "
                        f"{grace:g} s torchrun waits after forwarding a SIGTERM before it kills the workers: a SIGTERM "
                        "then can end the run without the step's checkpoint (the previous one stays). Set "
                        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT (seconds) above a step's time for torchrun and the run")
        pbar.close()
        summary = finish(run)
        # The run is complete: the out_dir lock (and the signal handlers) go before the sampling, so that a resume or
        # another run in this out_dir need not wait for it.
        run_scope.close()
        sample(run)
        if run.multi:  # every rank done with its collectives before any tears the process group down
            dist.barrier()
        return summary


def main(argv=None) -> int:
    name = Path(sys.argv[0]).name
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker
        watch_launcher()
    try:
        train(argv)
        return 0
    except UsageError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"{name}: interrupted; the newest complete checkpoint, if any, is where --resume continues",
              file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if dist.is_initialized():
            # The DDP wrapper must be gone before the group is: its Reducer, left holding the group's last reference,
            # joins gloo's threads while holding the GIL one of them needs (a hang at exit, pytorch issue #190489).
            gc.collect()
            dist.destroy_process_group()


def exit_process(code: int) -> None:
    """sys.exit(code), or after a run with a process group, os._exit(code) once stdout and stderr are flushed.

    gloo's worker threads outlive destroy_process_group while torch's DTensor caches still hold the device mesh, and
    one of them freeing a finished collective during interpreter shutdown aborts the process after a complete run
    (SIGABRT, "terminate called without an active exception"; pytorch issue #190489). By now every checkpoint and
    metrics row is written and its file closed, so nothing is lost by skipping that shutdown."""
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())

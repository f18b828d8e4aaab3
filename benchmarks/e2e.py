"""End-to-end: tokens/s and peak memory of one training step of the GPT-2 model in examples/model.py.

Same model, same random tokens (no data download), AdamW, bf16 autocast on a GPU; three configurations:
  full_eager    every Linear full-rank and trainable (plain nn.Linear)
  lora_eager    the attention and MLP Linears (LORA_TARGETS) as PEFT-style eager LoRA layers
  relora_fused  the same Linears as relora_kernels.LoRALinear (apply_lora) on the Triton kernels
  relora_fused_compile   relora_fused under torch.compile(fullgraph=True): the kernels inside one compiled graph
GPU: preset gpt2-124m, GPT-2's 50304-token (padded) vocabulary, 8 x 1024 tokens per step, LoRA r = 128 (the
example's gpt2 setting), alpha = r, dropout 0.1. Smoke (CPU, interpreter): a 2-layer 32-wide model, 1 step, no timing.

    python -m benchmarks.e2e [--smoke] [--out DIR]     # or as part of python -m benchmarks.sweep (op pretrain)
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import relora_kernels as rk

from . import harness
from .cases import eager_lora_linear


def _example_module(name: str):
    """examples/<name>.py as the module `name` (as the example's own scripts import it), without putting examples/
    on sys.path (it is a folder of scripts)."""
    if name not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up there
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


_model = _example_module("model")
GPT, LORA_TARGETS, PRESETS, GPTConfig = _model.GPT, _model.LORA_TARGETS, _model.PRESETS, _model.GPTConfig

CONFIGS = ("full_eager", "lora_eager", "relora_fused", "relora_fused_compile")
MODEL = "gpt2-124m"
GPU_SETUP = {"vocab_size": 50304, "batch_size": 8, "r": 128, "p": 0.1, "warmup_steps": 3, "steps": 10}
SMOKE_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16}
SMOKE_SETUP = {"vocab_size": 64, "batch_size": 2, "r": 4, "p": 0.1, "warmup_steps": 0, "steps": 1}
LR = 3e-4


class EagerLoRALinear(nn.Module):
    """PEFT-style LoRA around a frozen nn.Linear: base(x) + lora_B(lora_A(dropout(x))) * scale, all eager ops."""

    def __init__(self, base: nn.Linear, r: int, dropout: float):
        super().__init__()
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = base.bias
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale, self.dropout = 1.0, dropout  # alpha = r

    def forward(self, x):
        return eager_lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale,
                                 self.dropout if self.training else 0.0)


def build_model(config: str, model_config: GPTConfig, r: int, p: float, device: torch.device) -> GPT:
    torch.manual_seed(0)
    model = GPT(model_config).to(device)
    if config.startswith("relora_fused"):
        rk.apply_lora(model, LORA_TARGETS, r=r, dropout=p)
    elif config == "lora_eager":
        for name, module in list(model.named_modules()):
            if re.fullmatch(LORA_TARGETS, name):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, EagerLoRALinear(module, r, p))
    return model


@dataclass(frozen=True)
class PretrainCase:
    """The end-to-end case as the sweep plans it: one training step of `model`, one row per configuration."""

    model: str
    op: str = "pretrain"
    mode: str = "train_step"

    def row(self) -> dict:
        return {"op": self.op, "mode": self.mode, "model": self.model}

    def label(self) -> str:
        return f"pretrain {self.model}"


def case(smoke: bool) -> PretrainCase:
    return PretrainCase("smoke-tiny" if smoke else MODEL)


def run(device: torch.device, smoke: bool, configs=CONFIGS) -> list[dict]:
    """One row per configuration (see run_config)."""
    return [run_config(config, device, smoke) for config in configs]


def run_config(config: str, device: torch.device, smoke: bool) -> dict:
    """The row of one configuration: op pretrain, the step time's median / p20 / p80, tokens_per_s, peak_mem_mb."""
    setup = SMOKE_SETUP if smoke else GPU_SETUP
    shape = SMOKE_MODEL if smoke else PRESETS[MODEL]
    model_config = GPTConfig(vocab_size=setup["vocab_size"], **shape)
    tokens = setup["batch_size"] * model_config.block_size
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(model_config.vocab_size, (setup["batch_size"], model_config.block_size + 1),
                          generator=generator).to(device)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    lora = config != "full_eager"
    row = {**case(smoke).row(), "provider": config, "M": tokens, "r": setup["r"] if lora else None,
           "p": setup["p"] if lora else None, "dtype": "bf16" if device.type == "cuda" else "fp32"}
    try:
        row.update(_measure(config, model_config, setup, batch, autocast, device, smoke), status="ok")
    except Exception as error:  # an OOM or a kernel failure is recorded, the other configurations still run
        row.update(median_ms=None, p20_ms=None, p80_ms=None, peak_mem_mb=None, tokens_per_s=None, status="error",
                   reason=harness.error_reason(error))
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _measure(config, model_config, setup, batch, autocast, device, smoke) -> dict:
    model = build_model(config, model_config, setup["r"], setup["p"], device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, fused=device.type == "cuda")
    inputs, targets = batch[:, :-1], batch[:, 1:]
    forward = torch.compile(model, fullgraph=True) if config.endswith("_compile") else model

    def step():
        with autocast:
            _, loss = forward(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if smoke:
        step()
        return {"median_ms": None, "p20_ms": None, "p80_ms": None, "peak_mem_mb": None, "tokens_per_s": None,
                "trainable_params": sum(p.numel() for p in params)}
    for _ in range(setup["warmup_steps"]):  # autotuning, optimizer state allocation
        step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(setup["steps"] + 1)]
    events[0].record()
    for i in range(setup["steps"]):
        step()
        events[i + 1].record()
    torch.cuda.synchronize(device)
    step_ms = torch.tensor([a.elapsed_time(b) for a, b in zip(events, events[1:], strict=False)])
    median, p20, p80 = torch.quantile(step_ms, torch.tensor([0.5, 0.2, 0.8])).tolist()
    tokens = inputs.numel()
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80,
            "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            # tokens/s = tokens per step / median step time
            "tokens_per_s": tokens / (median * 1e-3), "trainable_params": sum(p.numel() for p in params)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, one untimed step (CPU CI)")
    parser.add_argument("--out", type=Path, default=None, help="write <device>-e2e.json into this folder")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device: end-to-end timings need a GPU; use --smoke for the CPU smoke run")
    harness.require_interpreter_without_gpu(parser)
    rows = run(device, args.smoke)
    for row in rows:
        print({k: row.get(k) for k in ("provider", "median_ms", "tokens_per_s", "peak_mem_mb", "status", "reason")})
    if args.out is not None:
        name = "cpu-smoke" if args.smoke else harness.device_slug(harness.device_name(device))
        path = harness.write_results(args.out / f"{name}-e2e.json", harness.environment(device, args.smoke), None,
                                     rows)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Host time of the fused op: what one call costs the CPU that feeds the GPU (Python, dispatch, launch set-up).

    python -m benchmarks.host_overhead                    # every row, 15 repeats x 40 calls, to stdout
    python -m benchmarks.host_overhead --out DIR          # also DIR/host_overhead.json and .md
    python -m benchmarks.host_overhead --quick            # 3 repeats x 10 calls (CI: the code cannot rot)
    python -m benchmarks.host_overhead --small-kernels    # the small ATen kernels of one planned fwd+bwd, as JSON
    python -m benchmarks.host_overhead --shape 16,16,16,16  # the layer rows at another M,K,N,r
    python -m benchmarks.host_overhead --backward engine  # layer rows as within a model's backward (see below)

A GPU runs only as fast as the host feeds it: when one call's host time exceeds its GPU time the op is host-bound,
whatever its kernels do. This measures the host side alone.

Method. On a machine without CUDA, every Triton launch runs all of Triton's launch path (argument binding, the
specialisation on alignment and on strides of 1, the compiled-kernel cache lookup, the grid and the launcher call)
against a stand-in driver for an sm_90 GPU whose launcher does nothing: everything but the driver call. The kernels
are compiled for sm_90 by Triton's own compiler on the first call, outside the timing. Tensors are on the CPU, so
torch's own ops in the rows (F.linear, the cuBLAS-composed engine's addmm, autograd's bookkeeping, the eager
baseline) run on the CPU, tiny: their time is an upper bound of their dispatch on a GPU. With CUDA the launches are
real and the timed calls run on the GPU (its queue is far from full at these sizes, so the host is what is timed).
One thread; each row is the thread's CPU time per call, the minimum over `repeats` rounds of the mean of `calls`
calls, the rows taking turns in a shuffled order within each round (the GPT-2 rows apart, with fewer of both), and
every ratio is to rows of the same run. Each layer row runs its backward with torch.autograd.grad, as a call of the
op by itself would; that function's Python checks of its arguments (a layer row is 25-42 us faster without them
on a 2-vCPU x86_64 VM) are paid once per backward call, which a model makes once per step for all its layers:
`--backward engine` runs the autograd engine alone instead, the per-layer share of a model's step (the GPT-2 rows
are whole steps either way).

Rows (fp32, M=64 tokens, K=48, N=80, r=16 unless named or --shape given; " bias": the layer has a bias, which the
backward's gradients include; every fused row is compared with the floor and eager rows of the same bias):
  floor [bias]        F.linear(x, W[, bias]) forward + backward (dx): the frozen GEMMs alone
  autograd floor      a torch.autograd.Function with the fused op's eleven arguments whose forward and backward
                      only allocate their outputs (no bias): what torch's autograd alone costs any op written as
                      one, the part of every fused row no Python code of this package can remove; no goal
  eager p=P [bias]    PEFT's LoRA forward (benchmarks.cases.eager_lora_linear) + backward, dropout P (0, 0.1)
  fused E p=P [bias]  rk.lora_linear on engine E (triton, cublas), forward + backward
  fp8 E p=P bias      rk.lora_linear_fp8 (W's e4m3 copies made once, outside the timing) on engine E, forward +
                      backward, against the bf16 op's row ("/ bf16 op"); no goal of its own. Left out, with the
                      reason printed, where this torch's _scaled_mm lacks the case (the cublas engine).
  merge_and_reinit_   rk.merge_and_reinit_ (two launches) against merge_floor: two torch.empty_like + one addmm_
  gpt2 step           one training step (forward, backward, AdamW) of the example's GPT-2 124M structure (12 layers,
                      48 LoRA linears, r = 128 as its preset) at width 96, 16 tokens: LoRALinear against an eager
                      PEFT-style LoRA layer. Host cost does not depend on the width; a small one keeps the CPU's
                      own matmuls (which a GPU would run) out of the figure. The stubbed launches write nothing, so
                      the LoRA factors' gradients stay zero (and the rest read uninitialised memory), and torch's
                      CPU sqrt takes ~3x longer on zeros than on other values: AdamW's second moments start from
                      the same 1e-4 in both rows, so its foreach ops (the same for both models on a GPU) cost both
                      rows alike rather than charging the fused one for the stub.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.graph import _engine_run_backward

import relora_kernels as rk
from benchmarks.cases import eager_lora_linear
from relora_kernels import _backend

SHAPE = {"M": 64, "K": 48, "N": 80, "r": 16}
DROPOUTS = (0.0, 0.1)
ENGINES = ("triton", "cublas")
# The goals of the host path (README): fused fwd+bwd <= 0.7x eager and <= 2x floor; merge <= 2x merge_floor; the
# GPT-2 step <= eager's.
GOALS = {"eager": 0.7, "floor": 2.0, "merge_floor": 2.0, "gpt2_eager": 1.0}


class _NoLaunch:
    """The launcher of a compiled kernel, minus the driver call."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        return None


class _StandInSm90:
    """Triton's driver for an sm_90 GPU that is not there: compiling works (Triton's compiler, LLVM and ptxas run on
    the CPU); loading a kernel gives a handle and launching it does nothing."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)
        properties = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                      "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}
        self.utils = SimpleNamespace(
            get_device_properties=lambda device: properties,
            load_binary=lambda name, kernel, shared, device: (object(), object(), 0, 0, 1024),
            unload_module=lambda module: None,
        )
        self.launcher_cls = _NoLaunch

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("nothing can be timed on a stand-in driver")


@contextlib.contextmanager
def stubbed_launches():
    """Kernels forced on CPU tensors, launched against the stand-in sm_90 driver (the method in the docstring)."""
    from triton.runtime import driver

    previous = driver._active  # None on a machine without a GPU: no driver to go back to
    driver.set_active(_StandInSm90())
    try:
        with rk.settings(backend="triton", autotune=False), \
                mock.patch.object(_backend, "cpu_kernels_allowed", lambda: True):  # nothing to time tiles on
            yield
    finally:
        driver.set_active(previous)


class Timed(NamedTuple):
    """A row to time: one call, and the engine setting it runs under."""
    call: Callable[[], None]
    engine: str = "auto"


def best_per_call(rows: dict[str, Timed], repeats: int, calls: int) -> dict[str, float]:
    """CPU seconds per call of each row on this thread: the minimum over `repeats` rounds of the mean of `calls`
    calls (after one warm-up call each). CPU time, not wall time: the host's own cost, which a busy machine does not
    inflate by the time the thread waits for a core. The rows take turns within each round, so a machine whose speed
    drifts during the run (frequency, a neighbour on the host) slows every row of a round alike, and the ratios of one
    run compare rows timed under the same conditions. The order of the turns is shuffled every round (seeded, so a run
    is repeatable): a row runs faster right after one that runs much the same code (its caches warm; two copies of the
    fused call taking turns measured 5-7 us apart out of ~165, the second the faster whichever copy it was), so a
    fixed order would favour whichever row follows its likeness."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for row in rows.values():
        with rk.settings(engine=row.engine):
            row.call()
    sync()
    best = dict.fromkeys(rows, float("inf"))
    order, shuffle = list(rows), random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            row = rows[name]
            with rk.settings(engine=row.engine):
                start = time.thread_time()
                for _ in range(calls):
                    row.call()
                best[name] = min(best[name], (time.thread_time() - start) / calls)
                sync()
    return best


def _layer_inputs(device, bias: bool, shape: dict = SHAPE):
    generator = torch.Generator().manual_seed(0)
    M, K, N, r = shape["M"], shape["K"], shape["N"], shape["r"]

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=generator).to(device).requires_grad_(grad)

    return SimpleNamespace(x=randn(M, K, grad=True), weight=randn(N, K), lora_a=randn(r, K, grad=True),
                           lora_b=randn(N, r, grad=True), bias=randn(N, grad=True) if bias else None,
                           grad_y=randn(M, N))


def _engine_backward(y: torch.Tensor, wrt: list[torch.Tensor], grad_y: torch.Tensor):
    """torch.autograd.grad without its Python wrapper: the autograd engine's run over the graph, as torch.autograd.grad
    calls it once its checks of the arguments have passed. Those checks (~23-31 us on the project's CPU machines for
    1-4 inputs) are paid once per backward call: once per training step, not once per layer."""
    return _engine_run_backward((y,), (grad_y,), False, False, tuple(wrt), False, accumulate_grad=False)


# How a row runs its backward (--backward): torch.autograd.grad, as one call of the op by itself would; or the
# autograd engine alone, as a layer's backward runs within a model's (the wrapper's checks are the step's).
BACKWARDS = {"grad": torch.autograd.grad, "engine": _engine_backward}


def _fwd_bwd(forward, inputs, backward: str = "grad"):
    wrt = [t for t in (inputs.x, inputs.lora_a, inputs.lora_b, inputs.bias) if t is not None]
    run_backward = BACKWARDS[backward]

    def call():
        run_backward(forward(), wrt, inputs.grad_y)

    return call


def _bias_suffix(bias: bool) -> str:
    return " bias" if bias else ""


class _AllocatingFunction(torch.autograd.Function):
    """The fused op's eager autograd function with nothing inside: the same eleven arguments, a forward and a
    backward that only allocate their outputs and save what the op saves. What torch's autograd alone costs a call
    of any op written as a Python autograd function, applied as the op applies its own (the C++ apply)."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, deterministic, key, plan):
        y = x.new_empty(x.shape[0], weight.shape[0])
        shrunk = x.new_empty(x.shape[0], lora_a.shape[0])
        ctx.save_for_backward(x, weight, lora_a, lora_b, shrunk)
        ctx.state = (scale, dropout_p, seed, deterministic, plan)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, _, lora_a, lora_b, _ = ctx.saved_tensors
        return (x.new_empty(x.shape), None, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape),
                *(None,) * 7)


_apply_allocating = super(torch.autograd.Function, _AllocatingFunction).apply


def layer_rows(device, shape: dict = SHAPE, backward: str = "grad") -> dict[str, Timed]:
    rows = {}
    bare = _layer_inputs(device, False, shape)
    rows["autograd floor"] = Timed(_fwd_bwd(lambda: _apply_allocating(
        bare.x, bare.weight, bare.lora_a, bare.lora_b, None, 2.0, 0.0, None, False, (), None), bare, backward))
    for bias in (True, False):
        plain = _layer_inputs(device, bias, shape)
        rows["floor" + _bias_suffix(bias)] = Timed(_fwd_bwd(
            lambda plain=plain: F.linear(plain.x, plain.weight, plain.bias),
            SimpleNamespace(x=plain.x, lora_a=None, lora_b=None, bias=plain.bias, grad_y=plain.grad_y), backward))
        for p in DROPOUTS:
            rows[f"eager p={p:g}{_bias_suffix(bias)}"] = Timed(_fwd_bwd(lambda p=p, plain=plain: eager_lora_linear(
                plain.x, plain.weight, plain.bias, plain.lora_a, plain.lora_b, 2.0, p), plain, backward))
    for engine in ENGINES:
        for p in DROPOUTS:
            for bias in (True, False):
                inputs = _layer_inputs(device, bias, shape)

                def forward(inputs=inputs, p=p):
                    return rk.lora_linear(inputs.x, inputs.weight, inputs.lora_a, inputs.lora_b, 2.0, inputs.bias, p)

                rows[f"fused {engine} p={p:g}{_bias_suffix(bias)}"] = Timed(_fwd_bwd(forward, inputs, backward), engine)
    return rows


def fp8_rows(device, shape: dict = SHAPE, backward: str = "grad") -> dict[str, Timed]:
    from relora_kernels.kernels.passes_fp8 import scaled_mm_support

    rows = {}
    for engine in ENGINES:
        problem = scaled_mm_support(device.type, None, torch.float32) if engine == "cublas" else None
        if problem is not None:
            print(f"host_overhead: fp8 {engine} rows left out: {problem}", file=sys.stderr)
            continue
        for p in DROPOUTS:
            inputs = _layer_inputs(device, True, shape)
            frozen = rk.quantize_fp8_weight(inputs.weight)

            def forward(inputs=inputs, frozen=frozen, p=p):
                return rk.lora_linear_fp8(inputs.x, frozen, inputs.lora_a, inputs.lora_b, 2.0, inputs.bias, p)

            rows[f"fp8 {engine} p={p:g} bias"] = Timed(_fwd_bwd(forward, inputs, backward), engine)
    return rows


def merge_rows(device, shape: dict = SHAPE) -> dict[str, Timed]:
    generator = torch.Generator().manual_seed(0)
    K, N, r = shape["K"], shape["N"], shape["r"]
    weight, lora_a, lora_b = (torch.randn(*s, generator=generator).to(device) for s in ((N, K), (r, K), (N, r)))

    def merge_floor():
        torch.empty_like(lora_a)
        torch.empty_like(lora_b)
        weight.addmm_(lora_b, lora_a, alpha=1e-6)

    return {"merge_floor": Timed(merge_floor),
            "merge_and_reinit_": Timed(lambda: rk.merge_and_reinit_(weight, lora_a, lora_b, 1e-6, seed=1))}


class EagerLoRALinear(nn.Module):
    """The eager baseline of the GPT-2 step: PEFT's LoRA layer in functional form, same parameters as LoRALinear."""

    def __init__(self, layer: rk.LoRALinear):
        super().__init__()
        self.weight, self.bias, self.lora_A, self.lora_B = layer.weight, layer.bias, layer.lora_A, layer.lora_B
        self.scale, self.dropout = layer.scale, layer.dropout

    def forward(self, x):
        return eager_lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale,
                                 self.dropout if self.training else 0.0)


def _gpt2_model(eager: bool, device):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        from model import GPT, LORA_TARGETS, GPTConfig
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=256, block_size=16, n_layer=12, n_head=12, n_embd=96, bias=True)
    model = rk.apply_lora(GPT(config), LORA_TARGETS, r=128, dropout=0.1).to(device)
    if eager:
        for name, module in list(model.named_modules()):
            if isinstance(module, rk.LoRALinear):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, EagerLoRALinear(module))
    return model


def gpt2_rows(device) -> dict[str, Timed]:
    rows = {}
    tokens = torch.randint(256, (1, 17), generator=torch.Generator().manual_seed(0)).to(device)
    for name, eager in (("gpt2 step eager", True), ("gpt2 step fused", False)):
        model = _gpt2_model(eager, device).train()
        assert sum(isinstance(m, rk.LoRALinear) for m in model.modules()) == (0 if eager else 48)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)

        def step(model=model, optimizer=optimizer):
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # AdamW's state, then made the same in both rows: the second moments all 1e-4
        for state in optimizer.state.values():
            state["exp_avg_sq"].fill_(1e-4)
        rows[name] = Timed(step)
    return rows


def ratios(rows: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each fused row against floor and against eager at its dropout, both with its bias or without; merge and the
    GPT-2 step against theirs."""
    out = {}
    for name, seconds in rows.items():
        if name.startswith(("fused ", "fp8 ")):
            p = name.split("p=")[1].split()[0]
            bias = _bias_suffix(name.endswith(" bias"))
            out[name] = {"floor": seconds / rows["floor" + bias], "eager": seconds / rows[f"eager p={p}{bias}"]}
            if name.startswith("fp8 "):
                out[name]["bf16_op"] = seconds / rows["fused " + name.removeprefix("fp8 ")]
    if "merge_and_reinit_" in rows:
        out["merge_and_reinit_"] = {"merge_floor": rows["merge_and_reinit_"] / rows["merge_floor"]}
    if "gpt2 step fused" in rows:
        out["gpt2 step fused"] = {"gpt2_eager": rows["gpt2 step fused"] / rows["gpt2 step eager"]}
    return out


def goals_met(table: dict[str, dict[str, float]]) -> dict[str, bool]:
    """The goals of the bf16 op's rows, the merge and the GPT-2 step (the FP8 rows are reported, with no goal)."""
    return {f"{name} / {against}": value <= GOALS[against] for name, against_values in table.items()
            if not name.startswith("fp8 ") for against, value in against_values.items()}


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The host CPU's model name (Linux's cpuinfo, else what the platform module knows): host time depends on it, and
    two machines of one architecture and core count can differ ~2x in these rows."""
    try:
        for line in cpuinfo.read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def conditions(stubbed: bool, repeats: int, calls: int, shape: dict = SHAPE, gpt2: bool = True,
               backward: str = "grad") -> dict:
    import triton

    return {
        "machine": platform.processor() or platform.machine(), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "threads": 1,
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "launches": "stand-in sm_90 driver, no driver call" if stubbed else "real, on " + torch.cuda.get_device_name(),
        "shape": shape, "dtype": "fp32", "repeats": repeats, "calls": calls,
        "layer backward": "torch.autograd.grad" if backward == "grad" else "the autograd engine alone",
        "command": "python -m benchmarks.host_overhead" + (" --quick" if repeats < 15 else "")
        + ("" if gpt2 else " --no-gpt2")
        + ("" if shape == SHAPE else " --shape " + ",".join(str(shape[d]) for d in "MKNr"))
        + ("" if backward == "grad" else " --backward " + backward),
    }


def markdown(result: dict) -> str:
    lines = ["| row | host time per call (us) | / floor | / eager | / bf16 op | goal met |",
             "|---|---|---|---|---|---|"]
    met = result["goals_met"]
    for name, seconds in result["seconds"].items():
        against = result["ratios"].get(name, {})
        cells = [f"{against[k]:.2f}x" if k in against else "" for k in ("floor", "eager", "bf16_op")]
        if "merge_floor" in against:
            cells[0] = f"{against['merge_floor']:.2f}x merge_floor"
        if "gpt2_eager" in against:
            cells[1] = f"{against['gpt2_eager']:.2f}x"
        flags = [ok for key, ok in met.items() if key.startswith(name + " /")]
        lines.append(f"| {name} | {seconds * 1e6:,.1f} | {cells[0]} | {cells[1]} | {cells[2]} | "
                     f"{('yes' if all(flags) else 'NO') if flags else ''} |")
    conditions_text = ", ".join(f"{k}: {v}" for k, v in result["conditions"].items())
    return "\n".join(lines) + f"\n\nConditions: {conditions_text}\n"


# ATen ops of the eager path that launch nothing on a GPU (metadata, allocation), and those time_model prices as
# GEMMs or passes over memory of their own (the cuBLAS GEMMs, and the adds that read their start value back).
NOT_SMALL_KERNELS = frozenset({"empty", "empty_strided", "new_empty", "permute", "as_strided", "view", "detach",
                               "unsqueeze", "t", "addmm_", "addmm", "_scaled_mm", "add_"})


def small_kernels() -> dict[str, dict[str, int]]:
    """The small ATen kernels (randint, zeros, casts, ...) one planned fwd+bwd dispatches, per engine with and
    without FP8 frozen weights: bf16, p = 0.1, bias, launches stubbed. What time_model.EAGER_SMALL_KERNELS prices."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from benchmarks import time_model

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            name = time_model.SAME_KERNEL.get(name, name)
            if name not in NOT_SMALL_KERNELS:
                self.ops[name] = self.ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    inputs = _layer_inputs(torch.device("cpu"), bias=True)
    x, weight, lora_a, lora_b, bias, grad_y = (t.detach().bfloat16().requires_grad_(t.requires_grad) for t in (
        inputs.x, inputs.weight, inputs.lora_a, inputs.lora_b, inputs.bias, inputs.grad_y))
    counts = {}
    with stubbed_launches():
        for fp8 in (False, True):
            frozen, op = (rk.quantize_fp8_weight(weight), rk.lora_linear_fp8) if fp8 else (weight, rk.lora_linear)
            for engine in ENGINES:
                with rk.settings(engine=engine):
                    for _ in range(2):  # the second call runs the plan
                        with Count() as count:
                            y = op(x, frozen, lora_a, lora_b, 2.0, bias, 0.1)
                            torch.autograd.grad(y, (x, lora_a, lora_b, bias), grad_y)
                counts[f"{'fp8 ' if fp8 else ''}{engine}"] = count.ops
    return counts


def run(repeats: int, calls: int, gpt2: bool = True, shape: dict = SHAPE, backward: str = "grad") -> dict:
    torch.set_num_threads(1)
    stubbed = not torch.cuda.is_available()
    device = torch.device("cpu" if stubbed else "cuda")
    with stubbed_launches() if stubbed else rk.settings(backend="triton"):
        rows = best_per_call(layer_rows(device, shape, backward) | fp8_rows(device, shape, backward)
                             | merge_rows(device, shape), repeats, calls)
        if gpt2:  # a step is ~200 layer calls: fewer rounds and calls
            rows |= best_per_call(gpt2_rows(device), max(1, repeats // 3), max(1, calls // 8))
    table = ratios(rows)
    return {"seconds": rows, "ratios": table, "goals_met": goals_met(table),
            "conditions": conditions(stubbed, repeats, calls, shape, gpt2, backward)}


def _shape(text: str) -> dict:
    """--shape's value: four positive integers M,K,N,r."""
    try:
        sizes = [int(size) for size in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 4 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected four positive integers M,K,N,r, got {text!r}")
    return dict(zip("MKNr", sizes, strict=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write host_overhead.json and host_overhead.md here")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="3 repeats x 10 calls: checks the code, not the goals")
    parser.add_argument("--no-gpt2", dest="gpt2", action="store_false", help="leave out the GPT-2 step")
    parser.add_argument("--shape", type=_shape, default=SHAPE, metavar="M,K,N,r",
                        help="the layer rows' shape (default 64,48,80,16); the smaller, the less of the CPU's own "
                             "matmuls (which a GPU runs) is left in the floor, eager and cuBLAS-composed rows")
    parser.add_argument("--backward", choices=tuple(BACKWARDS), default="grad",
                        help="how the layer rows run their backward: torch.autograd.grad (default), or the autograd "
                             "engine alone, without the wrapper's argument checks, which a model pays once per step")
    parser.add_argument("--small-kernels", action="store_true",
                        help="print the small ATen kernels of one planned fwd+bwd per engine as JSON, time nothing")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("host time is measured with compiled kernels: run without TRITON_INTERPRET=1")
    if args.small_kernels:
        print(json.dumps(small_kernels()))
        return 0
    repeats, calls = (3, 10) if args.quick else (args.repeats, args.calls)
    result = run(repeats, calls, args.gpt2, args.shape, args.backward)
    text = markdown(result)
    print(text)
    if args.out:
        from relora_kernels.utils import atomic_write

        args.out.mkdir(parents=True, exist_ok=True)
        report = json.dumps(result, indent=1) + "\n"
        atomic_write(args.out / "host_overhead.json", lambda tmp: Path(tmp).write_text(report))
        atomic_write(args.out / "host_overhead.md", lambda tmp: Path(tmp).write_text(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

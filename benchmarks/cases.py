"""Benchmark cases: for an (op, provider, mode, shape) build the inputs and return the callable to measure.

Nothing here times, sweeps or writes (harness.py and sweep.py do); the FLOP and byte counts of each op sit next to
the TFLOP/s and GB/s they produce (`metrics`).

lora_linear:  y = x @ W.T + bias + s * dropout_p(x) @ A.T @ B.T; W and bias frozen, gradients for x, A and B.
  floor          F.linear(x, W, bias) alone (cuBLAS): fwd x @ W.T + bias, bwd dx = dy @ W. What nothing beats.
  native_floor   the same two GEMMs from C++ (csrc_bench): no autograd and no Python in the loop.
  eager          PEFT's LoRA forward, the ops users run: F.linear(x, W, bias) + lora_B(lora_A(dropout(x))) * s
                 with torch's dropout (PEFT's nn.Identity when p = 0); autograd does the backward.
  compile        torch.compile(eager, fullgraph=True, dynamic=True): one compilation serves every shape.
  native         csrc_bench: the unfused op from C++, cuBLAS GEMMs with beta = 1 accumulation. Its dropout mask is
                 drawn once when the case is built (outside the timing), so native does no random-number work.
  fused_triton   rk.lora_linear with the engine setting triton: the shrink, then the fused Triton GEMM for y; the two
                 gradient launches, then the fused GEMM for dx (the mask is generated in-kernel, every call).
  fused_cublas   rk.lora_linear with the engine setting cublas: the shrink also writes s * S @ B.T + bias into y,
                 then y.addmm_(x, W.T); the dA launch also writes dx's start, then dx.addmm_(dy, W).
  fused          rk.lora_linear with the engine setting auto: per pass the engine-and-tile table's engine, else
                 policy.predicted_engine's (the automatic choice users get).
  fused_compile  torch.compile(fullgraph=True, dynamic=True) of a function calling rk.lora_linear (engine auto, chosen
                 when the graph is traced).
  fused_fp8_triton, fused_fp8_cublas, fused_fp8
                 rk.lora_linear_fp8 on the engine setting triton / cublas / auto (passes_fp8.fp8_engine per frozen
                 GEMM): both frozen GEMMs on FP8 (e4m3) copies of W, x and dy quantised per token inside the op, the
                 low-rank path in the case's dtype. W's copies (rk.quantize_fp8_weight) are made once when the case
                 is built, outside the timing, as training makes them once per restart. Where this machine has no FP8
                 GEMM for the engine (a GPU below sm_89; a torch whose torch._scaled_mm lacks the row-wise case) the
                 provider is skipped with the reason: nothing else is timed in its place.
  The engine is set by `provider_env(provider)` (the variable set, then restored) around building and measuring a
  fused provider's run; sweep.measure_case and the tests enter it, so no provider's setting leaks into another's.
  The fused providers pass seed=None, as LoRALinear does in training: each call draws its dropout seed on the
  device (one tiny kernel, no host-to-device copy), as eager's torch dropout draws its mask.
Modes: fwd (a forward with autograd recording, as in training), bwd (the backward of a graph built once outside the
timing, run with retain_graph; the native providers call their backward function on saved tensors), fwd+bwd.

lora_launches: each kernel launch of the fused op alone, on the launchers (no autograd), next to the cuBLAS GEMMs and
a copy of x that bound them: where the fused op's time goes. The Triton engine's: shrink, forward_matmul, grad_ab
(both gradient kernels), input_grad; the cuBLAS-composed engine's: shrink_expand (S and y's start), addmm_fwd
(y.addmm_(x, W.T) onto it), grad_ab_start (both gradient kernels, the dA one also writing dx's start), addmm_dx
(dx.addmm_(dy, W)); with W's FP8 copies (made once): the Triton engine's fp8_shrink_quantize (S, x's e4m3 copy and
row scales), fp8_forward_matmul, fp8_grad_ab_quantize (both gradient kernels, then dy's e4m3 copy), fp8_input_grad,
and the cuBLAS-composed engine's FP8 GEMMs fp8_scaled_mm_fwd and fp8_scaled_mm_dx (torch._scaled_mm alone: the FP8
GEMM's own rate), and the forward's in two other modes of torch._scaled_mm, row-wise with fast accumulation
(fp8_scaled_mm_fwd_fast_accum) and per-tensor with unit scales (fp8_scaled_mm_fwd_tensorwise); yardsticks floor_fwd
(F.linear), floor_bwd (dy @ W), copy_x (x.copy_, the memory-bound kernels' yardstick). Each row carries its FLOPs and
the fewest bytes it must move (launch_work), so time / floor and GB/s against copy_gbps read off directly.

merge_and_reinit:  W += s * B @ A;  A <- U(-1/sqrt(K), 1/sqrt(K));  B <- 0   (in place)
  eager          PEFT's merge (delta = B @ A * s, then W += delta) and the re-initialisation as separate ops.
  fused          rk.merge_and_reinit_ (the merge kernel, then the reinit kernel).
  fused_fp8      the restart of an FP8 layer, LoRALinear(frozen_dtype="fp8").merge_and_reinit: fused's two launches,
                 then both FP8 copies of the merged W re-quantised (W by rows, W.T by rows) into the layer's buffers.
  fused_fp8_cpu_master   the same with the master W in (pinned) CPU memory, LoRALinear(master_device="cpu"): W
                 copied to the device and back around it (a PCIe round trip on a GPU; on the CPU a copy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

import csrc_bench
import relora_kernels as rk

OPS = ("lora_linear", "merge_and_reinit", "lora_launches")
FP8_PROVIDERS = ("fused_fp8_triton", "fused_fp8_cublas", "fused_fp8")
LORA_PROVIDERS = ("floor", "native_floor", "eager", "compile", "native", "fused_triton", "fused_cublas", "fused",
                  *FP8_PROVIDERS, "fused_compile")
# The engine setting each fused provider runs; fused_compile's is chosen at tracing, as users get it.
ENGINE_OF = {"fused_triton": "triton", "fused_cublas": "cublas", "fused": "auto", "fused_compile": "auto",
             "fused_fp8_triton": "triton", "fused_fp8_cublas": "cublas", "fused_fp8": "auto"}
FUSED_PROVIDERS = tuple(ENGINE_OF)
# Under the interpreter (smoke) the automatic choice is the rule's cuBLAS engine (fp32), the code fused_cublas runs,
# and the FP8 providers' modes are the bf16 op's (the same autograd, other launches): these run fwd+bwd only there,
# which keeps the CPU smoke runs' time flat.
SMOKE_FWD_BWD_ONLY = ("fused", *FP8_PROVIDERS)


def smoke_skips(case, provider: str) -> bool:
    """Whether the smoke grid leaves out (case, provider)."""
    return provider in SMOKE_FWD_BWD_ONLY and getattr(case, "mode", "fwd+bwd") not in ("fwd+bwd", "launch")
TRITON_LAUNCHES = ("shrink", "forward_matmul", "grad_ab", "input_grad")
CUBLAS_LAUNCHES = ("shrink_expand", "addmm_fwd", "grad_ab_start", "addmm_dx")
# With FP8 frozen weights: the Triton engine's launches, and the cuBLAS-composed engine's two FP8 GEMMs
# (torch._scaled_mm; its Triton launches are the same quantising shrink and gradient launches).
FP8_TRITON_LAUNCHES = ("fp8_shrink_quantize", "fp8_forward_matmul", "fp8_grad_ab_quantize", "fp8_input_grad")
FP8_CUBLAS_GEMMS = ("fp8_scaled_mm_fwd", "fp8_scaled_mm_dx")
# The forward's FP8 GEMM in the two other modes of torch._scaled_mm that could be faster than the engine's (row-wise
# scales, exact fp32 accumulation): row-wise with Hopper's fast accumulation, and cuBLAS's per-tensor FP8 GEMM with
# unit scales (the row and column scales, powers of two, then applied exactly by a pass over the output). Timed, not
# used by the op: which one runs at FP8's rate decides how the cuBLAS-composed FP8 engine should call it.
FP8_GEMM_MODES = {"fp8_scaled_mm_fwd_fast_accum": "rowwise_fast_accum", "fp8_scaled_mm_fwd_tensorwise": "tensorwise"}
FP8_LAUNCHES = (*FP8_TRITON_LAUNCHES, *FP8_CUBLAS_GEMMS, *FP8_GEMM_MODES)
LAUNCH_PROVIDERS = (*TRITON_LAUNCHES, *CUBLAS_LAUNCHES, *FP8_LAUNCHES, "floor_fwd", "floor_bwd", "copy_x")
MERGE_PROVIDERS = ("eager", "fused", "fused_fp8", "fused_fp8_cpu_master")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

SCALE = 2.0  # the LoRA scale s = alpha / r with alpha = 2r
REINIT_SEED = 7


class Skip(Exception):  # noqa: N818 (a skip is not an error)
    """This provider cannot run on this machine; the message is the reason the row records."""


# ----------------------------------------------------------------------------------------------------------------
# Shapes. K = in_features, N = out_features, as nn.Linear.
# ----------------------------------------------------------------------------------------------------------------


def _gpt2_layers(model: str, d: int) -> dict[str, tuple[int, int]]:
    return {f"{model}.qkv": (d, 3 * d), f"{model}.proj": (d, d), f"{model}.fc": (d, 4 * d),
            f"{model}.fc_proj": (4 * d, d)}


LAYERS = {
    **_gpt2_layers("gpt2-124m", 768),
    **_gpt2_layers("gpt2-355m", 1024),
    **_gpt2_layers("gpt2-774m", 1280),
    "llama-7b.qkvo": (4096, 4096),
    "llama-7b.up": (4096, 11008),
    "llama-7b.down": (11008, 4096),
    "llama-8b.up": (4096, 14336),
    "llama-8b.down": (14336, 4096),
}


@dataclass(frozen=True)
class _LayerCase:
    """One layer shape of the fused op; the subclasses say what of it is measured (their OP, the rows' "op")."""

    mode: str
    M: int  # tokens
    K: int
    N: int
    r: int
    p: float
    dtype: str
    layer: str

    OP: ClassVar[str]

    def row(self) -> dict:
        return {"op": self.OP, "mode": self.mode, "layer": self.layer, "M": self.M, "K": self.K, "N": self.N,
                "r": self.r, "p": self.p, "dtype": self.dtype}

    def label(self) -> str:
        return f"{self.layer} {self.what()} {self.M}x{self.K}x{self.N} r={self.r} p={self.p:g} {self.dtype}"

    def what(self) -> str:
        return self.mode


@dataclass(frozen=True)
class LoraCase(_LayerCase):
    """The op timed whole, in one of MODES."""

    OP: ClassVar[str] = "lora_linear"


@dataclass(frozen=True)
class MergeCase:
    K: int
    N: int
    r: int
    dtype: str
    layer: str
    mode: str = "merge+reinit"

    def row(self) -> dict:
        return {"op": "merge_and_reinit", "mode": self.mode, "layer": self.layer, "K": self.K, "N": self.N,
                "r": self.r, "dtype": self.dtype}

    def label(self) -> str:
        return f"{self.layer} merge {self.K}x{self.N} r={self.r} {self.dtype}"


@dataclass(frozen=True)
class LaunchCase(_LayerCase):
    """The op's launches timed one by one (mode "launch")."""

    OP: ClassVar[str] = "lora_launches"

    def what(self) -> str:
        return "launches"


# The README's headline: forward+backward of a Llama-7B-sized square layer at 8192 tokens, r = 16, p = 0.1, bf16.
HEADLINE = LoraCase("fwd+bwd", 8192, 4096, 4096, 16, 0.1, "bf16", "llama-7b.qkvo")
# Interpreter-sized (~1e4 elements per tensor): K and N not multiples of any block, r < 16. fp32 because a bf16
# tl.dot gives garbage under the interpreter.
SMOKE = LoraCase("fwd+bwd", 64, 48, 80, 4, 0.1, "fp32", "tiny")



def lora_grid(grid: str) -> list[LoraCase]:
    """The lora_linear cases of a sweep. default: ~43 cases, each axis varied around the headline case; first: the
    four of the first GPU contact."""
    if grid == "smoke":
        return [dataclasses.replace(SMOKE, mode=mode, p=p) for p in (0.0, 0.1) for mode in MODES]
    if grid == "first":  # the first GPU contact (run_gpu.sh): the headline, a short GPT-2 batch, a Llama-8B MLP
        return [HEADLINE, dataclasses.replace(HEADLINE, p=0.0),
                dataclasses.replace(HEADLINE, M=2048, K=768, N=3072, layer="gpt2-124m.fc"),
                dataclasses.replace(HEADLINE, K=4096, N=14336, layer="llama-8b.up")]
    headline_modes = [dataclasses.replace(HEADLINE, mode=mode) for mode in MODES]
    if grid == "quick":  # the headline first: a sweep runs the quick grid's cases before the rest
        return [HEADLINE, *(c for c in headline_modes if c != HEADLINE)] + [
            dataclasses.replace(HEADLINE, p=0.0),
            dataclasses.replace(HEADLINE, K=768, N=3072, layer="gpt2-124m.fc"),
            dataclasses.replace(HEADLINE, K=4096, N=11008, layer="llama-7b.up"),
        ]
    # Every layer shape at 8192 tokens, r = 16, with and without dropout.
    cases = [dataclasses.replace(HEADLINE, K=k, N=n, p=p, layer=layer)
             for layer, (k, n) in LAYERS.items() for p in (0.0, 0.1)]
    cases += [c for c in headline_modes if c.mode != "fwd+bwd"]  # fwd and bwd apart, at the headline only
    cases += [dataclasses.replace(HEADLINE, r=r) for r in (64, 128)]  # rank
    cases += [dataclasses.replace(HEADLINE, M=m) for m in (2048, 4096, 16384)]  # tokens
    cases += [dataclasses.replace(HEADLINE, dtype="fp16"),  # fp16
              dataclasses.replace(HEADLINE, K=768, N=3072, dtype="fp16", layer="gpt2-124m.fc")]
    return cases


def merge_grid(grid: str) -> list[MergeCase]:
    if grid == "smoke":
        return [MergeCase(SMOKE.K, SMOKE.N, SMOKE.r, SMOKE.dtype, SMOKE.layer)]
    square = MergeCase(HEADLINE.K, HEADLINE.N, HEADLINE.r, HEADLINE.dtype, HEADLINE.layer)
    if grid in ("quick", "first"):
        return [square]
    return ([MergeCase(k, n, 16, "bf16", layer) for layer, (k, n) in LAYERS.items()]
            + [dataclasses.replace(square, r=r) for r in (64, 128)])


def launch_grid(grid: str) -> list[LaunchCase]:
    """The headline shape with and without dropout, and at 2048 tokens (the fewest programs per SM); first: the
    headline shape alone; smoke: the smoke shape with dropout."""
    base = SMOKE if grid == "smoke" else HEADLINE
    head = LaunchCase(**{**dataclasses.asdict(base), "mode": "launch"})
    if grid in ("first", "smoke"):  # smoke: the dropout case alone (p = 0 runs the same launchers, less of them)
        return [head]
    return [head, dataclasses.replace(head, p=0.0), dataclasses.replace(head, M=2048)]


def providers(op: str) -> tuple[str, ...]:
    return {"lora_linear": LORA_PROVIDERS, "merge_and_reinit": MERGE_PROVIDERS, "lora_launches": LAUNCH_PROVIDERS}[op]


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and bytes, and the throughput they give.
# ----------------------------------------------------------------------------------------------------------------


def lora_linear_flops(case: LoraCase, provider: str) -> int:
    """2 x the multiply-adds of the GEMMs the op needs (bias, dropout and elementwise work not counted). The FP8
    providers do the same work (their frozen GEMMs on e4m3 operands, the quantisation of x and dy not counted), so
    their TFLOP/s compare directly with the bf16 op's.

    LoRA   fwd  x @ W.T: 2MNK,  S = x~ @ A.T: 2MKr,  S @ B.T: 2MNr
           bwd  dy @ W: 2MNK,  dS @ A: 2MKr,  dS = dy @ B: 2MNr,  dB = dy.T @ S: 2MNr,  dA = dS.T @ x~: 2MKr
    floor  fwd  x @ W.T: 2MNK;  bwd  dy @ W: 2MNK   (the floor providers do only these)
    """
    M, K, N, r = case.M, case.K, case.N, case.r
    if provider in ("floor", "native_floor"):
        fwd = bwd = 2 * M * N * K
    else:
        fwd = 2 * M * N * K + 2 * M * K * r + 2 * M * N * r
        bwd = 2 * M * N * K + 4 * M * K * r + 4 * M * N * r
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode]


def merge_bytes(case: MergeCase, provider: str = "fused") -> int:
    """Bytes merge+reinit must move: read and write W (N, K), read A (r, K) and B (N, r), write A and B; fused_fp8
    also re-quantises W into both copies: W read once per copy, two (N, K) e4m3 copies (1 byte) and their scales
    (N + K fp32) written."""
    itemsize = DTYPES[case.dtype].itemsize
    moved = (2 * case.N * case.K + 2 * case.r * case.K + 2 * case.N * case.r) * itemsize
    if provider.startswith("fused_fp8"):  # the CPU master's bus round trip is not device memory traffic
        moved += 2 * case.N * case.K * itemsize + 2 * case.N * case.K + 4 * (case.N + case.K)
    return moved


def launch_work(case: LaunchCase, provider: str) -> tuple[int, int]:
    """(FLOPs, fewest bytes moved) of one launch: every tensor it must read or write, once (dA / dB / dbias and
    their atomics, (r, K) + (N, r) + N values, left out: under 1 % at the benchmarked shapes)."""
    M, K, N, r, size = case.M, case.K, case.N, case.r, DTYPES[case.dtype].itemsize
    work = {
        "shrink": (2 * M * K * r, M * K + r * K + M * r),  # x, A -> S
        "forward_matmul": (2 * M * N * K + 2 * M * N * r, M * K + N * K + M * r + N * r + M * N),  # x, W, S, B -> y
        "grad_ab": (4 * M * N * r + 2 * M * K * r, M * N + M * K + N * r + 2 * M * r),  # dy, x, B, S -> dS
        "input_grad": (2 * M * N * K + 2 * M * K * r, M * N + N * K + M * r + r * K + M * K),  # dy, W, dS, A -> dx
        # x, A, B, bias -> S, start (M, N)
        "shrink_expand": (2 * M * K * r + 2 * M * N * r, M * K + r * K + M * r + N * r + N + M * N),
        "addmm_fwd": (2 * M * N * K, M * K + N * K + 2 * M * N),  # x, W, start -> y (start read, y written)
        # dy, x, B, S, A -> dS, dx start (M, K)
        "grad_ab_start": (4 * M * N * r + 4 * M * K * r, M * N + M * K + N * r + 2 * M * r + r * K + M * K),
        "addmm_dx": (2 * M * N * K, M * N + N * K + 2 * M * K),  # dy, W, start -> dx
        "floor_fwd": (2 * M * N * K, M * K + N * K + M * N),
        "floor_bwd": (2 * M * N * K, M * N + N * K + M * K),
        "copy_x": (0, 2 * M * K),
    }.get(provider)
    if work is not None:
        return work[0], work[1] * size
    # FP8: (FLOPs, bytes in the activation dtype, bytes of e4m3 elements and fp32 scales)
    flops, wide, narrow = {
        "fp8_shrink_quantize": (2 * M * K * r, M * K + r * K + M * r, M * K + 4 * M),  # x, A -> S, xq, sx
        # xq, sx, wq, sw, S, B, bias -> y
        "fp8_forward_matmul": (2 * M * N * K + 2 * M * N * r, M * r + N * r + N + M * N, M * K + N * K + 4 * (M + N)),
        # dy, x, B, S -> dS, dyq, sdy
        "fp8_grad_ab_quantize": (4 * M * N * r + 2 * M * K * r, M * N + M * K + N * r + 2 * M * r, M * N + 4 * M),
        # dyq, sdy, wtq, swt, dS, A -> dx
        "fp8_input_grad": (2 * M * N * K + 2 * M * K * r, M * r + r * K + M * K, M * N + N * K + 4 * (M + K)),
        "fp8_scaled_mm_fwd": (2 * M * N * K, M * N, M * K + N * K + 4 * (M + N)),  # xq, sx, wq, sw -> y
        "fp8_scaled_mm_dx": (2 * M * N * K, M * K, M * N + N * K + 4 * (M + K)),  # dyq, sdy, wtq, swt -> dx
        "fp8_scaled_mm_fwd_fast_accum": (2 * M * N * K, M * N, M * K + N * K + 4 * (M + N)),
        "fp8_scaled_mm_fwd_tensorwise": (2 * M * N * K, M * N, M * K + N * K + 8),  # xq, wq, two unit scales -> y
    }[provider]
    return flops, wide * size + narrow


def metrics(case, provider: str, median_ms: float | None) -> dict:
    """The row's work count and throughput: tflops = flops / time for lora_linear, gbps = bytes / time for merge;
    both for a launch."""
    seconds = None if median_ms is None else median_ms * 1e-3
    if isinstance(case, LaunchCase):
        flops, moved = launch_work(case, provider)
        return {"flops": flops, "tflops": None if seconds is None else flops / seconds / 1e12,
                "bytes": moved, "gbps": None if seconds is None else moved / seconds / 1e9}
    if isinstance(case, LoraCase):
        flops = lora_linear_flops(case, provider)
        return {"flops": flops, "tflops": None if median_ms is None else flops / (median_ms * 1e-3) / 1e12}
    moved = merge_bytes(case, provider)
    return {"bytes": moved, "gbps": None if median_ms is None else moved / (median_ms * 1e-3) / 1e9}


# ----------------------------------------------------------------------------------------------------------------
# The providers' functions.
# ----------------------------------------------------------------------------------------------------------------


def eager_lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p):
    """PEFT's LoRA Linear.forward in functional form: the base layer, then lora_B(lora_A(dropout(x))) * scaling."""
    result = F.linear(x, weight, bias)
    x_lora = F.dropout(x, dropout_p) if dropout_p > 0 else x  # PEFT uses nn.Identity for dropout 0
    return result + F.linear(F.linear(x_lora, lora_a), lora_b) * scale


def fused_lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p):
    return rk.lora_linear(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed=None)


def fused_lora_linear_fp8(x, frozen, bias, lora_a, lora_b, scale, dropout_p):
    """fused_lora_linear with W's FP8 copies (rk.quantize_fp8_weight) in W's place."""
    return rk.lora_linear_fp8(x, frozen, lora_a, lora_b, scale, bias, dropout_p, seed=None)


@contextlib.contextmanager
def provider_env(provider: str | None):
    """Within the block the package runs its kernels (the backend setting triton: a fused provider must never time
    the PyTorch fallback) and, for a fused lora_linear provider, its engine (ENGINE_OF); both settings are restored
    when the block ends, also when it raises. Importing `benchmarks` changes nothing."""
    engine = ENGINE_OF.get(provider)
    with rk.settings(backend="triton", **({"engine": engine} if engine else {})):
        yield


# Raised so that the few variants (dtype x dropout on/off x grad mode) never exhaust dynamo's cache and fall back
# to eager silently; one compiled function (dynamic shapes) serves all shapes of a dtype.
_RECOMPILE_LIMIT = 64


@functools.cache
def compiled(fn: Callable) -> Callable:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    # The bwd mode re-runs one graph's backward (retain_graph), which AOTAutograd's donated buffers forbid. Donation
    # only lets the compiled backward reuse saved-activation memory, so it changes compile's peak memory, not time.
    torch._functorch.config.donated_buffer = False
    return torch.compile(fn, fullgraph=True, dynamic=True)


def chosen_engines(case: LoraCase, provider: str = "fused") -> dict:
    """{"engine_fwd", "engine_dx", "tile_fwd", "tile_dx"}: the engine the package takes for the case's forward and
    input-gradient passes under the current engine setting (auto: the table's entry, else policy.predicted_engine),
    as lora_forward and lora_backward key them (the benchmark's layers have a bias), and where that engine is
    Triton the fused GEMM's tile it settled on (tuned, fixed or the table's; None where it is still open, e.g. a
    Hopper tile, which depends on the operands); for an FP8 provider, passes_fp8.fp8_engine's for each frozen GEMM
    (its reduction: K forward, N for dx) and lora_linear.fp8_gemm_tile's tile. Asked after the timed calls."""
    from relora_kernels.kernels import lora_linear, passes_fp8, policy

    dtype = DTYPES[case.dtype]
    if provider in FP8_PROVIDERS:
        engines = {"engine_fwd": passes_fp8.fp8_engine(case.K), "engine_dx": passes_fp8.fp8_engine(case.N)}
        tile = lora_linear.fp8_gemm_tile(case.r, dtype).name
        return {**engines, **{f"tile_{p}": tile if engines[f"engine_{p}"] == "triton" else None for p in ("fwd", "dx")}}
    rank_block = policy.block_rank(case.r)
    launches = {"fwd": policy.GemmLaunch(dtype, rank_block, "forward", True, False, case.M, case.N, case.K),
                "dx": policy.GemmLaunch(dtype, rank_block, "input_grad", False, case.p > 0, case.M, case.K, case.N)}
    row = {}
    for name, launch in launches.items():
        row[f"engine_{name}"] = engine = policy.choose_engine(launch)
        tile = policy.settled_tile(launch) if engine == "triton" else None
        row[f"tile_{name}"] = tile.name if tile is not None else None
    return row


# ----------------------------------------------------------------------------------------------------------------
# Inputs and callables.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LoraInputs:
    x: torch.Tensor  # (M, K), requires grad
    weight: torch.Tensor  # (N, K), frozen
    bias: torch.Tensor  # (N,), frozen
    lora_a: torch.Tensor  # (r, K), requires grad
    lora_b: torch.Tensor  # (N, r), requires grad; non-zero, as after some training
    grad_y: torch.Tensor  # (M, N)


def lora_inputs(case: LoraCase, device: torch.device) -> LoraInputs:
    torch.manual_seed(0)
    like = {"device": device, "dtype": DTYPES[case.dtype]}
    bound = 1 / math.sqrt(case.K)
    return LoraInputs(
        x=torch.randn(case.M, case.K, **like).requires_grad_(),
        weight=torch.randn(case.N, case.K, **like) * bound,
        bias=torch.randn(case.N, **like) * 0.02,
        lora_a=torch.empty(case.r, case.K, **like).uniform_(-bound, bound).requires_grad_(),
        lora_b=(torch.randn(case.N, case.r, **like) * 0.02).requires_grad_(),
        grad_y=torch.randn(case.M, case.N, **like),
    )


def _autograd_callable(forward: Callable, grad_inputs: tuple, grad_y: torch.Tensor, mode: str) -> Callable:
    if mode == "fwd":
        return forward
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(forward(), grad_inputs, grad_y)
    y = forward()  # bwd: the graph is built once, outside the timing, and kept by retain_graph
    return lambda: torch.autograd.grad(y, grad_inputs, grad_y, retain_graph=True)


def fp8_problem(case, device: torch.device) -> str | None:
    """Why this machine cannot run the FP8 op for `case` (None if it can): a GPU without FP8 tensor cores, or, where
    the current engine setting puts a frozen GEMM on the cuBLAS-composed engine (passes_fp8.fp8_engine; a
    LoraCase's reductions K and N, a MergeCase's none), a torch whose torch._scaled_mm lacks the row-wise case into
    the case's dtype on this device."""
    from relora_kernels.kernels import lora_linear, passes_fp8

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if 10 * major + minor < lora_linear.FP8_MIN_ARCH:
            return (f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}: FP8 (e4m3) tensor cores need "
                    f"sm_{lora_linear.FP8_MIN_ARCH} or later")
    if not isinstance(case, LoraCase):
        return None
    if "cublas" in {passes_fp8.fp8_engine(case.K), passes_fp8.fp8_engine(case.N)}:
        return passes_fp8.scaled_mm_support(device.type, device.index, DTYPES[case.dtype])
    return None


def _native_ops(device: torch.device):
    reason = csrc_bench.unavailable_reason(require_cuda=True)
    if reason is not None or device.type != "cuda":
        raise Skip(reason or "the native baseline is benchmarked on CUDA only")
    return csrc_bench.load()  # a build failure here is an error of the row, not a skip


def _native_callable(case: LoraCase, inp: LoraInputs, floor: bool) -> Callable:
    ops = _native_ops(inp.x.device)
    # Detached: the C++ functions are the whole forward and backward, nothing for autograd to record.
    x, weight, bias, lora_a, lora_b = (t.detach() for t in (inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b))
    grad_y = inp.grad_y
    if floor:
        forward = functools.partial(ops.floor_forward, x, weight, bias)
        backward = functools.partial(ops.floor_backward, grad_y, weight)
    else:
        # The mask as 0/1 in x's dtype, drawn here once: outside every timed region.
        mask = (torch.rand_like(x) >= case.p).to(x.dtype) if case.p > 0 else None
        forward = functools.partial(ops.lora_forward, x, weight, bias, lora_a, lora_b, SCALE, mask, case.p)

        def backward(saved):
            _, shrunk, x_dropped = saved
            return ops.lora_backward(grad_y, x, x_dropped, weight, lora_a, lora_b, shrunk, SCALE, mask, case.p,
                                     False)

    if case.mode == "fwd":
        return forward
    if floor:
        return backward if case.mode == "bwd" else lambda: (forward(), backward())
    if case.mode == "bwd":
        saved = forward()
        return lambda: backward(saved)
    return lambda: backward(forward())


def build_lora_linear(provider: str, case: LoraCase, device: torch.device) -> Callable:
    """The callable that runs `case` with `provider` once; raises Skip where the provider cannot run here. A fused
    provider's engine is the environment's: build and call it inside provider_env(provider)."""
    if provider in FP8_PROVIDERS and (problem := fp8_problem(case, device)) is not None:
        raise Skip(problem)
    inp = lora_inputs(case, device)
    if provider in ("native", "native_floor"):
        return _native_callable(case, inp, floor=provider == "native_floor")
    if provider == "floor":
        return _autograd_callable(lambda: F.linear(inp.x, inp.weight, inp.bias), (inp.x,), inp.grad_y, case.mode)
    if provider in FP8_PROVIDERS:
        # W's FP8 copies made once, outside the timing: training makes them once per restart, not per step.
        args = (inp.x, rk.quantize_fp8_weight(inp.weight), inp.bias, inp.lora_a, inp.lora_b, SCALE, case.p)
        return _autograd_callable(lambda: fused_lora_linear_fp8(*args), (inp.x, inp.lora_a, inp.lora_b), inp.grad_y,
                                  case.mode)
    fn = {"eager": eager_lora_linear, "compile": compiled(eager_lora_linear), "fused_triton": fused_lora_linear,
          "fused_cublas": fused_lora_linear, "fused": fused_lora_linear,
          "fused_compile": compiled(fused_lora_linear)}[provider]
    args = (inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b, SCALE, case.p)
    return _autograd_callable(lambda: fn(*args), (inp.x, inp.lora_a, inp.lora_b), inp.grad_y, case.mode)


def fp8_layer_restart(case: MergeCase, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      **layer_options) -> Callable:
    """The restart of an FP8 layer holding W, A, B, as training runs it: LoRALinear(frozen_dtype="fp8",
    **layer_options).merge_and_reinit, i.e. rk.merge_and_reinit_ on W, then W's two FP8 copies re-quantised into the
    layer's buffers. Raises Skip where this machine has no FP8 (the layer would quantise with torch's ops there)."""
    problem = fp8_problem(case, weight.device)
    if problem is not None:
        raise Skip(problem)
    layer = rk.LoRALinear(case.K, case.N, case.r, alpha=SCALE * case.r, bias=False, device=weight.device,
                          dtype=weight.dtype, frozen_dtype="fp8", **layer_options)
    with torch.no_grad():
        for parameter, value in ((layer.weight, weight), (layer.lora_A, lora_a), (layer.lora_B, lora_b)):
            parameter.copy_(value)
    layer.refresh_frozen_weight()
    return functools.partial(layer.merge_and_reinit, seed=REINIT_SEED)


def build_merge(provider: str, case: MergeCase, device: torch.device) -> Callable:
    """merge+reinit in place on fresh W, A, B (the same work every call: B @ A costs the same once B is 0)."""
    torch.manual_seed(0)
    like = {"device": device, "dtype": DTYPES[case.dtype]}
    bound = 1 / math.sqrt(case.K)
    weight = torch.randn(case.N, case.K, **like) * bound
    lora_a = torch.empty(case.r, case.K, **like).uniform_(-bound, bound)
    lora_b = torch.randn(case.N, case.r, **like) * 0.02
    if provider == "fused_fp8":
        return fp8_layer_restart(case, weight, lora_a, lora_b)
    if provider == "fused_fp8_cpu_master":
        return fp8_layer_restart(case, weight, lora_a, lora_b, master_device="cpu")
    if provider == "fused":
        return lambda: rk.merge_and_reinit_(weight, lora_a, lora_b, SCALE, seed=REINIT_SEED)

    @torch.no_grad()
    def eager():
        weight.add_(lora_b @ lora_a * SCALE)  # PEFT: delta_weight = B @ A * scaling; weight.data += delta_weight
        lora_a.uniform_(-bound, bound)
        lora_b.zero_()

    return eager


def build_launch(provider: str, case: LaunchCase, device: torch.device) -> Callable:
    """One launcher of the fused op on realistic inputs (its inputs made once by the other launchers). Raises Skip
    for an FP8 launch where this machine has no FP8 (or, for the cuBLAS FP8 GEMMs, no torch._scaled_mm for it)."""
    from relora_kernels.kernels import lora_linear as launchers
    from relora_kernels.kernels import passes
    from relora_kernels.kernels.launch import eager_launches

    if provider in FP8_LAUNCHES:
        return _build_fp8_launch(provider, case, device)
    inp = lora_inputs(case, device)
    x, weight, bias, lora_a, lora_b, grad_y = (t.detach() for t in (inp.x, inp.weight, inp.bias, inp.lora_a,
                                                                      inp.lora_b, inp.grad_y))
    p, seed = case.p, torch.tensor(REINIT_SEED, device=device) if case.p > 0 else None
    shrunk = launchers.lora_shrink(x, lora_a, p, seed)
    grad_shrunk = launchers.lora_grad_ab(grad_y, x, shrunk, lora_b, SCALE, p, seed, True)[2]
    copy = torch.empty_like(x)
    # The cuBLAS-composed engine's accumulations onto the starts its Triton launches write (each call adds onto the
    # last one's result: the same work every call).
    y_start = (launchers.lora_shrink_expand(x, lora_a, lora_b, SCALE, bias, p, seed)[1]
               if provider == "addmm_fwd" else None)
    dx_start = (launchers.lora_grad_ab_start(grad_y, x, shrunk, lora_a, lora_b, SCALE, p, seed, True)[3]
                if provider == "addmm_dx" else None)
    launch = {
        "shrink": lambda: launchers.lora_shrink(x, lora_a, p, seed),
        "forward_matmul": lambda: passes.lora_forward_matmul(x, weight, shrunk, lora_b, SCALE, bias),
        "grad_ab": lambda: launchers.lora_grad_ab(grad_y, x, shrunk, lora_b, SCALE, p, seed, True),
        "input_grad": lambda: passes.lora_input_grad(grad_y, weight, grad_shrunk, lora_a, p, seed),
        "shrink_expand": lambda: launchers.lora_shrink_expand(x, lora_a, lora_b, SCALE, bias, p, seed),
        "addmm_fwd": lambda: y_start.addmm_(x, weight.T),
        "grad_ab_start": lambda: launchers.lora_grad_ab_start(grad_y, x, shrunk, lora_a, lora_b, SCALE, p, seed, True),
        "addmm_dx": lambda: dx_start.addmm_(grad_y, weight),
        "floor_fwd": lambda: F.linear(x, weight, bias),
        "floor_bwd": lambda: grad_y @ weight,
        "copy_x": lambda: copy.copy_(x),
    }[provider]

    def run():
        # As the op launches them eagerly: outside a triton_op, torch's tracing wrapper would time its own dispatch.
        with eager_launches():
            return launch()

    return run


def _build_fp8_launch(provider: str, case: LaunchCase, device: torch.device) -> Callable:
    from relora_kernels.kernels import lora_linear as launchers
    from relora_kernels.kernels import passes_fp8
    from relora_kernels.kernels.launch import eager_launches

    problem = fp8_problem(case, device)
    if problem is None and (provider in FP8_CUBLAS_GEMMS or provider in FP8_GEMM_MODES):
        problem = passes_fp8.scaled_mm_support(device.type, device.index, DTYPES[case.dtype])
    if problem is not None:
        raise Skip(problem)
    inp = lora_inputs(case, device)
    x, weight, bias, lora_a, lora_b, grad_y = (t.detach() for t in (inp.x, inp.weight, inp.bias, inp.lora_a,
                                                                      inp.lora_b, inp.grad_y))
    p, seed = case.p, torch.tensor(REINIT_SEED, device=device) if case.p > 0 else None
    with eager_launches():  # the inputs each launch reads, made once by the launches before it
        frozen = rk.quantize_fp8_weight(weight)
        shrunk, x_q, x_scale = launchers.lora_shrink_quantize(x, lora_a, p, seed)
        _, _, grad_shrunk, _, grad_y_q, grad_y_scale = launchers.lora_grad_ab_quantize(grad_y, x, shrunk, lora_b,
                                                                                      SCALE, p, seed, True)
    launch = {
        "fp8_shrink_quantize": lambda: launchers.lora_shrink_quantize(x, lora_a, p, seed),
        "fp8_forward_matmul": lambda: launchers.fused_matmul_fp8(x_q, x_scale, frozen.q.T, frozen.scale, shrunk,
                                                                 lora_b.T, SCALE, bias, 0.0, None, x.dtype),
        "fp8_grad_ab_quantize": lambda: launchers.lora_grad_ab_quantize(grad_y, x, shrunk, lora_b, SCALE, p, seed,
                                                                        True),
        "fp8_input_grad": lambda: launchers.fused_matmul_fp8(grad_y_q, grad_y_scale, frozen.q_t.T, frozen.scale_t,
                                                             grad_shrunk, lora_a, 1.0 / (1.0 - p), None, p, seed,
                                                             x.dtype),
        "fp8_scaled_mm_fwd": lambda: passes_fp8.scaled_mm(x_q, x_scale, frozen.q, frozen.scale, x.dtype),
        "fp8_scaled_mm_dx": lambda: passes_fp8.scaled_mm(grad_y_q, grad_y_scale, frozen.q_t, frozen.scale_t,
                                                         x.dtype),
        **{mode_provider: functools.partial(_scaled_mm_in_mode, mode, x_q, x_scale, frozen.q, frozen.scale, x.dtype)
           for mode_provider, mode in FP8_GEMM_MODES.items()},
    }[provider]
    if provider in FP8_GEMM_MODES:
        try:  # a mode this torch or this GPU lacks is a row not measured, with torch's reason
            launch()
        except (RuntimeError, TypeError, NotImplementedError) as error:
            raise Skip(f"torch {torch.__version__}: torch._scaled_mm ({FP8_GEMM_MODES[provider]}): "
                       f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error

    def run():
        with eager_launches():  # as the op launches them eagerly (see build_launch)
            return launch()

    return run


def _scaled_mm_in_mode(mode: str, lhs_q, lhs_scale, rhs_q, rhs_scale, out_dtype) -> torch.Tensor:
    """lhs_q @ rhs_q.T on torch._scaled_mm in one of FP8_GEMM_MODES: row-wise scales with fast accumulation, or unit
    tensor-wise scales (the product left unscaled). Arguments by keyword, as passes_fp8.scaled_mm passes them."""
    if mode == "tensorwise":
        one = lhs_scale.new_ones(())
        out = torch._scaled_mm(lhs_q, rhs_q.T, scale_a=one, scale_b=one, out_dtype=out_dtype, use_fast_accum=False)
    else:
        out = torch._scaled_mm(lhs_q, rhs_q.T, scale_a=lhs_scale[:, None], scale_b=rhs_scale[None, :],
                               out_dtype=out_dtype, use_fast_accum=True)
    return out[0] if isinstance(out, tuple) else out


def build(provider: str, case, device: torch.device) -> Callable:
    if isinstance(case, LoraCase):
        return build_lora_linear(provider, case, device)
    if isinstance(case, LaunchCase):
        return build_launch(provider, case, device)
    return build_merge(provider, case, device)

"""Build every kernel launch for a GPU architecture on a machine without one, and report what each build needs.

    python -m benchmarks.gpu_build                                  # sm_90 (H100/H200), bf16, r = 16, 64, 128, 256
    python -m benchmarks.gpu_build --arch 80 86 89 90 --dtypes bf16 fp16 fp32 --out DIR
    python -m benchmarks.gpu_build --ranks 16 --trace --json build.json   # what the CI test runs (sm_90)

The real launchers (kernels/lora_linear.py, kernels/fused_gemm_tma.py, kernels/merge.py, and the passes of
kernels/passes.py) are called on CPU tensors with Triton's driver replaced by a stand-in that names the target GPU,
and with every launch turned into Triton's `warmup` (compile, never run). Each kernel is therefore built exactly as
the launcher would build it on that GPU (the same constexprs and tiles, the same specialisation of the arguments on
alignment and divisibility by 16), through the installed Triton's own compiler, LLVM and ptxas. For each build the
report gives the shared memory it needs against the architecture's per-block limit, its registers, its stack frame
(register spills) and, on sm_90, whether the GEMMs run on Hopper's wgmma. It catches without a GPU a kernel that does
not compile for the target with this Triton, or a tile that could not launch there; it measures no speed. Exit status
1 when a build fails or a launch would exceed the shared memory.

With --trace it also records each op as torch.compile sees it on that GPU (`trace_for_compile`): the triton_ops
decomposed into their launches, and which tensors Inductor's analysis of each kernel found it writes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from benchmarks import time_model
from relora_kernels import settings as rk_settings
from relora_kernels._validate import MAX_RANK
from relora_kernels.kernels import fused_gemm_tma, lora_linear, merge, passes, policy

# Largest shared memory one block may opt into, per compute capability (CUDA C programming guide, "Technical
# Specifications per Compute Capability"): A100 and Orin 163 KB, consumer Ampere/Ada 99 KB, H100/H200 227 KB.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
# SMs of a representative GPU of each capability (A100, RTX 3090, Orin, RTX 4090, H100 SXM): only grid sizes
# depend on it, never what is compiled.
MULTIPROCESSORS = {80: 108, 86: 82, 87: 16, 89: 128, 90: 132}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# A realistic layer's specialisation (every size and stride divisible by 16), small enough to allocate on a CPU.
TOKENS, IN_FEATURES, OUT_FEATURES = 512, 768, 640
_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK", "GROUP_M", "WARP_SPECIALIZE", "EPILOGUE_SPLIT")
_VARIANT_KEYS = ("HAS_BIAS", "APPLY_DROPOUT", "HAS_BIAS_GRAD", "DETERMINISTIC", "EXPAND", "WRITE_DX", "FP8", "QUANTIZE",
                 "ROW_AMAX", "HAS_AMAX")


class _StandInDriver:
    """The part of Triton's driver that compiling needs: the target, device 0, its stream and its shared memory."""

    def __init__(self, capability: int):
        self.target = GPUTarget("cuda", capability, 32)
        properties = {"max_shared_mem": SHARED_MEMORY_LIMIT[capability],
                      "multiprocessor_count": MULTIPROCESSORS[capability]}
        self.utils = SimpleNamespace(get_device_properties=lambda device: properties)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class _BuildOnly:
    """Stands in for `traceable(kernel)`: `[grid](**kwargs)` compiles the launch with Triton's warmup and records the
    build, instead of running anything."""

    def __init__(self, kernel, record):
        self.kernel, self.record = kernel, record

    def __getitem__(self, grid):
        def build(*args, **kwargs):
            start = time.perf_counter()
            try:
                compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
            except Exception as error:  # a build that fails is a failed row; the other builds go on
                self.record(self.kernel.__name__, kwargs, None, time.perf_counter() - start, "fixed", error)
                return
            self.record(self.kernel.__name__, kwargs, compiled, time.perf_counter() - start, "fixed")

        return build


def _resources(compiled) -> dict:
    """Registers, stack frame and local memory per thread from the cubin (cuobjdump ships with Triton's NVIDIA
    backend). Register spills land in the stack frame (STACK); LOCAL counts only explicit local arrays."""
    cuobjdump = Path(triton.knobs.nvidia.ptxas.path).with_name("cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    registers, stack, local = (int(g) for g in found.groups()) if found else (None, None, None)
    return {"registers": registers, "local_bytes": local, "stack_bytes": stack}


# A tensor-core instruction on e4m3 operands (wgmma on sm_90, mma.sync on sm_89): what an FP8 dot should become,
# rather than a conversion to fp16 and an fp16 multiply.
_FP8_MMA = re.compile(r"\b(?:wgmma\.mma_async|mma\.sync)[\w.]*\.e4m3\.e4m3\b")


def _atomics(ptx: str) -> dict:
    """The kernel's global reductions (fp32 atomics) by width: a vectorised one adds 2 or 4 elements at once. Triton
    3.9 writes a `tl.atomic_add` whose result is unused as `red.global...`, 3.6-3.8 mostly as `atom.global...` with a
    result nobody reads; ptxas makes both the same REDG instruction (sm_90 SASS of the gradient kernels under 3.6-3.9),
    so both count."""
    widths = re.findall(r"\b(?:red|atom)\.global\.[\w.]*?add(\.v[24])?\.f32", ptx)
    return {"vector": sum(bool(w) for w in widths), "scalar": sum(not w for w in widths)}


# Per SM, by compute capability (CUDA C programming guide, "Technical Specifications per Compute Capability"):
# shared memory, threads and resident blocks; every one has 64K 32-bit registers, allocated per warp in units of 256.
SM_SHARED_MEMORY = {80: 167936, 86: 102400, 87: 167936, 89: 102400, 90: 233472}
SM_THREADS = {80: 2048, 86: 1536, 87: 2048, 89: 1536, 90: 2048}
SM_BLOCKS = {80: 32, 86: 16, 87: 32, 89: 24, 90: 32}
_BLOCK_RESERVED_SHARED = 1024  # what the CUDA runtime keeps per resident block


def blocks_per_sm(capability: int, num_warps: int, registers: int | None, shared_bytes: int) -> int | None:
    """How many blocks of this build one SM holds at once (occupancy), the least of its four limits."""
    if registers is None:
        return None
    warp_registers = -(-registers * 32 // 256) * 256
    by_registers = (65536 // warp_registers) // num_warps
    by_shared = SM_SHARED_MEMORY[capability] // (shared_bytes + _BLOCK_RESERVED_SHARED)
    return min(SM_BLOCKS[capability], SM_THREADS[capability] // (32 * num_warps), by_registers, by_shared)


def _estimated_shared(kernel: str, kwargs: dict, num_stages: int, element_size: int) -> int | None:
    """What the launcher estimated for this build when it chose the tile (None: a kernel chosen without one)."""
    config, rank_block = {**kwargs, "num_stages": num_stages}, kwargs.get("BLOCK_R")
    if kernel == "_fused_matmul_kernel":
        tile = policy.GemmTile(kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_K"], kwargs["GROUP_M"], 0,
                               num_stages)
        estimate = lora_linear.fp8_gemm_shared_bytes if kwargs["FP8"] else policy.gemm_shared_bytes
        return estimate(tile, rank_block, element_size)
    if kernel == "_fused_matmul_tma_kernel":
        tile = policy.GemmTile(kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_K"], kwargs["GROUP_M"], 0,
                               num_stages, "tma", kwargs["WARP_SPECIALIZE"], kwargs["EPILOGUE_SPLIT"])
        return policy.gemm_shared_bytes(tile, rank_block, element_size)
    if kernel == "_grad_a_kernel":
        return policy.grad_a_shared_bytes(config, rank_block, element_size, write_dx=kwargs["WRITE_DX"])
    estimates = {"_shrink_kernel": policy.shrink_shared_bytes, "_grad_b_kernel": policy.grad_b_shared_bytes,
                 "_merge_kernel": merge._merge_shared_bytes}
    return estimates[kernel](config, rank_block, element_size) if kernel in estimates else None


# The shapes the benchmarks headline (8192 tokens x 4096 x 4096; a Llama-8B MLP's 14336) besides the small one: grid
# sizes and the shrink's token block depend on them, and what the launcher chooses at them is what a GPU runs.
SHAPES = {"small": (TOKENS, IN_FEATURES, OUT_FEATURES), "headline": (8192, 4096, 4096), "mlp": (16384, 4096, 14336)}


def _drive_launchers(dtype: torch.dtype, rank: int, shape: tuple[int, int, int] = SHAPES["small"]) -> None:
    """Every launcher, in every variant a training step or a ReLoRA restart uses (on CPU tensors: nothing runs; the
    tensors are never read, so they are left uninitialised)."""
    tokens, k, n = shape
    x, weight = torch.empty(tokens, k, dtype=dtype), torch.empty(n, k, dtype=dtype)
    lora_a, lora_b = torch.empty(rank, k, dtype=dtype), torch.empty(n, rank, dtype=dtype)
    bias, grad_y = torch.empty(n, dtype=dtype), torch.empty(tokens, n, dtype=dtype)
    shrunk, seed = torch.empty(tokens, rank, dtype=dtype), torch.tensor(1234)
    for dropout_p in (0.0, 0.1):
        lora_linear.lora_shrink(x, lora_a, dropout_p, seed)
        passes.lora_input_grad(grad_y, weight, shrunk, lora_a, dropout_p, seed)
    for with_bias in (bias, None):
        passes.lora_forward_matmul(x, weight, shrunk, lora_b, 2.0, with_bias)
    lora_linear.lora_grad_ab(grad_y, x, shrunk, lora_b, 2.0, 0.1, seed, need_bias_grad=True)
    lora_linear.lora_grad_ab(grad_y, x, shrunk, lora_b, 2.0, 0.0, None, need_bias_grad=False)
    lora_linear.lora_grad_ab(grad_y, x, shrunk, lora_b, 2.0, 0.0, None, need_bias_grad=False, deterministic=True)
    # The cuBLAS-composed engine's Triton launches (its addmm is cuBLAS's, nothing to build).
    for dropout_p, with_bias in ((0.0, bias), (0.1, None)):
        lora_linear.lora_shrink_expand(x, lora_a, lora_b, 2.0, with_bias, dropout_p, seed)
        lora_linear.lora_grad_ab_start(grad_y, x, shrunk, lora_a, lora_b, 2.0, dropout_p, seed, with_bias is not None)
    merge.merge_lora_weight_(weight, lora_a, lora_b, 2.0)
    merge.reinit_lora_(lora_a, lora_b, 1234)


def _drive_hopper_tiles(dtype: torch.dtype, rank: int) -> None:
    """The Hopper kernel's tiles the policy offers (policy.tma_tiles: sm_90, 16-bit, fitting, building under this
    Triton), which the table may name, in every variant: the forward with and without bias, dx with and without
    dropout."""
    tokens, k, n = SHAPES["small"]
    x, weight, grad_y = torch.empty(tokens, k, dtype=dtype), torch.empty(n, k, dtype=dtype), torch.empty(tokens, n,
                                                                                                         dtype=dtype)
    lora_a, lora_b = torch.empty(rank, k, dtype=dtype), torch.empty(n, rank, dtype=dtype)
    bias, shrunk = torch.empty(n, dtype=dtype), torch.empty(tokens, rank, dtype=dtype)
    rank_block = policy.block_rank(rank)
    for with_bias in (bias, None):
        gemm = policy.GemmLaunch(dtype, rank_block, "forward", with_bias is not None, False, tokens, n, k)
        for tile in policy.tma_tiles(gemm):
            with policy.forced_tile(tile):
                passes.lora_forward_matmul(x, weight, shrunk, lora_b, 2.0, with_bias)
    for dropout_p, seed in ((0.1, torch.tensor(1234)), (0.0, None)):
        gemm = policy.GemmLaunch(dtype, rank_block, "input_grad", False, dropout_p > 0, tokens, k, n)
        for tile in policy.tma_tiles(gemm):
            with policy.forced_tile(tile):
                passes.lora_input_grad(grad_y, weight, shrunk, lora_a, dropout_p, seed)


def _column_major(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(cols, rows, dtype=dtype).T


def _drive_fp8_launchers(dtype: torch.dtype, rank: int, strided: bool = False) -> None:
    """The FP8 launches: the quantising shrink and gradient launches, the row quantisation (W, W.T), and the FP8
    fused GEMM forward (with and without bias) and for dx (with and without dropout), on its default tile; strided:
    x, W, dy and the low-rank operands column-major (the e4m3 operands stay as the quantising launches write them)."""
    tokens, k, n = SHAPES["small"]
    make = _column_major if strided else (lambda rows, cols, dt: torch.empty(rows, cols, dtype=dt))
    x, weight, grad_y = make(tokens, k, dtype), make(n, k, dtype), make(tokens, n, dtype)
    lora_a, lora_b, shrunk = make(rank, k, dtype), make(n, rank, dtype), make(tokens, rank, dtype)
    bias, seed, fp8 = torch.empty(n, dtype=dtype), torch.tensor(1234), torch.float8_e4m3fn
    x_q, grad_y_q = torch.empty(tokens, k, dtype=fp8), torch.empty(tokens, n, dtype=fp8)
    weight_q, weight_t_q = torch.empty(n, k, dtype=fp8), torch.empty(k, n, dtype=fp8)  # W and W.T by rows
    x_scale, grad_y_scale, weight_scale, weight_t_scale = (torch.empty(size) for size in (tokens, tokens, n, k))
    for dropout_p in (0.0, 0.1):
        lora_linear.lora_shrink_quantize(x, lora_a, dropout_p, seed)
    lora_linear.lora_grad_ab_quantize(grad_y, x, shrunk, lora_b, 2.0, 0.1, seed, need_bias_grad=True)
    lora_linear.lora_grad_ab_start_quantize(grad_y, x, shrunk, lora_a, lora_b, 2.0, 0.1, seed, False)
    lora_linear.quantize_rows_fp8(weight)
    lora_linear.quantize_rows_fp8(weight.T)
    for with_bias in (bias, None):
        lora_linear.fused_matmul_fp8(x_q, x_scale, weight_q.T, weight_scale, shrunk, lora_b.T, 2.0, with_bias, 0.0,
                                     None, dtype)
    for dropout_p in (0.0, 0.1):
        lora_linear.fused_matmul_fp8(grad_y_q, grad_y_scale, weight_t_q.T, weight_t_scale, shrunk, lora_a,
                                     1.0 / (1.0 - dropout_p), None, dropout_p, seed if dropout_p else None, dtype)


def _drive_launchers_strided(dtype: torch.dtype, rank: int) -> None:
    """Every launcher once more with every operand column-major, so that every stride the kernels take is a runtime
    argument (a stride of 1 is compiled in as a constant), for the int64 audit of their offsets."""
    tokens, k, n = SHAPES["small"]
    x, weight = _column_major(tokens, k, dtype), _column_major(n, k, dtype)
    lora_a, lora_b = _column_major(rank, k, dtype), _column_major(n, rank, dtype)
    bias, grad_y = torch.empty(2 * n, dtype=dtype)[::2], _column_major(tokens, n, dtype)
    shrunk, seed = _column_major(tokens, rank, dtype), torch.tensor(1234)
    lora_linear.lora_shrink(x, lora_a, 0.1, seed)
    passes.lora_forward_matmul(x, weight, shrunk, lora_b, 2.0, bias)
    passes.lora_input_grad(grad_y, weight, shrunk, lora_a, 0.1, seed)
    for deterministic in (False, True):
        lora_linear.lora_grad_ab(grad_y, x, shrunk, lora_b, 2.0, 0.1, seed, need_bias_grad=True,
                                 deterministic=deterministic)
    lora_linear.lora_shrink_expand(x, lora_a, lora_b, 2.0, bias, 0.1, seed)
    lora_linear.lora_grad_ab_start(grad_y, x, shrunk, lora_a, lora_b, 2.0, 0.1, seed, True)
    merge.merge_lora_weight_(weight, lora_a, lora_b, 2.0)
    merge.reinit_lora_(lora_a, lora_b, 1234)


# ---------------------------------------------------------------------------------------------------------------
# The int64 audit: a pointer offset computed as an i32 product of a program id or loop index with a runtime stride
# wraps once it passes 2**31 (a transposed operand's stride is its row count), reading or writing elsewhere.
# ---------------------------------------------------------------------------------------------------------------

_LOC = re.compile(r"\s+loc\((?:[^()]|\([^()]*\))*\)")
_DEFINITION = re.compile(r"^\s*(%[\w.\-]+)(?::\d+)?\s*=\s*([\w.]+)\b(.*)$")
_VALUE = re.compile(r"%[\w.\-]+")
_STRIDE_ARGUMENT = re.compile(r"(%stride\w*): i(?:32|64)\b")


def int32_pointer_offsets(ttir: str) -> list[str]:
    """The pointer offsets of a kernel's Triton IR that come from an i32 product of an index (a program id, a loop
    induction variable, or a value computed from one) with a runtime stride argument (named stride_*): one line per
    `tt.addptr` reached, naming the product."""
    taint: dict[str, set] = {}  # value -> {"index", "stride"} it is computed from
    wrapped: dict[str, str] = {}  # value -> the i32 product line it is computed from
    found = []
    for raw in ttir.splitlines():
        line = _LOC.sub("", raw)
        if "tt.func" in line:
            taint.update({name: {"stride"} for name in _STRIDE_ARGUMENT.findall(line)})
            continue
        loop = re.search(r"scf\.for (%[\w.\-]+) = (.*?) iter_args|scf\.for (%[\w.\-]+) = (.*)", line)
        if loop:
            variable, bounds = (loop.group(1), loop.group(2)) if loop.group(1) else (loop.group(3), loop.group(4))
            taint[variable] = {"index"}.union(*(taint.get(v, set()) for v in _VALUE.findall(bounds)))
        definition = _DEFINITION.match(line)
        if not definition:
            continue
        result, op, rest = definition.groups()
        operands = _VALUE.findall(rest.rsplit(" : ", 1)[0])
        taint[result] = {"index"} if op == "tt.get_program_id" else set().union(*(taint.get(v, set())
                                                                                 for v in operands))
        source = next((wrapped[v] for v in operands if v in wrapped), None)
        element_i32 = re.search(r":\s*(?:tensor<[\dx]*)?i32>?\s*$", rest)
        if op == "arith.muli" and element_i32 and len(operands) == 2:
            kinds = [taint.get(v, set()) for v in operands]
            if any("index" in a and "stride" in b for a, b in (kinds, kinds[::-1])):
                source = line.strip()
        if source is not None:
            wrapped[result] = source
            if op == "tt.addptr" and operands[1] in wrapped:
                found.append(f"{result} = tt.addptr ... offset from i32 product: {source}")
    return found


def _variant(kwargs: dict) -> str:
    return " ".join(k.lower() for k in _VARIANT_KEYS if kwargs.get(k)) or "-"


def _failed_key(kernel: str, kwargs: dict) -> str:
    """One failed row per kernel, variant and tile (a failed build has no hash to tell its specialisations apart)."""
    options = {k: kwargs.get(k) for k in (*_TILE_KEYS, "num_warps", "num_stages")}
    return f"failed {kernel} {_variant(kwargs)} {sorted(options.items())}"


def _error_text(error: BaseException) -> str:
    """The error's type and its last non-empty line (Triton's compile errors end with the cause), at most 400
    characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:400]


def failed_row(arch: str, dtype_name: str, rank: int, kernel: str, kwargs: dict, path: str,
               error: BaseException) -> dict:
    """A build that did not compile: what was built and the error, no resources."""
    return {"arch": arch, "dtype": dtype_name, "r": rank, "kernel": kernel.lstrip("_"), "variant": _variant(kwargs),
            "tile": {k: kwargs[k] for k in _TILE_KEYS if k in kwargs}, "num_warps": kwargs.get("num_warps"),
            "num_stages": kwargs.get("num_stages"), "paths": [path], "shared_bytes": None,
            "shared_limit": SHARED_MEMORY_LIMIT.get(int(arch.removeprefix("sm_")), 0), "shared_estimate": None,
            "wgmma": False, "fp8_mma": False, "tma": False, "compile_s": None, "atomics": {"vector": 0, "scalar": 0},
            "int32_offsets": [], "registers": None, "local_bytes": None, "stack_bytes": None, "blocks_per_sm": None,
            "error": _error_text(error)}


def build_all(capability: int, dtype_name: str, rank: int, shapes: tuple[str, ...] = (),
              fp8: bool = False) -> list[dict]:
    """Build every launch for one (architecture, dtype, rank), also at the named SHAPES (the fixed tiles), and with
    `fp8` the FP8 launches (sm_89 and later); one row per distinct build, with its resources and its int64 audit."""
    builds: dict[str, dict] = {}
    stage = {"label": None}  # names the pass that reaches a fixed-tile build, where it is not the first one

    def record(kernel, kwargs, compiled, seconds, path, error=None):
        path = stage["label"] if stage["label"] and path == "fixed" else path
        key = compiled.hash if compiled is not None else _failed_key(kernel, kwargs)
        if key in builds:  # Triton's cache returned an earlier build: the same kernel reached another way
            builds[key]["paths"] = sorted(set(builds[key]["paths"]) | {path})
            return
        if compiled is None:
            builds[key] = failed_row(f"sm_{capability}", dtype_name, rank, kernel, kwargs, path, error)
            return
        meta = compiled.metadata
        builds[key] = {
            "arch": f"sm_{capability}", "dtype": dtype_name, "r": rank, "kernel": kernel.lstrip("_"),
            "variant": _variant(kwargs),
            "tile": {k: kwargs[k] for k in _TILE_KEYS if k in kwargs},
            "num_warps": meta.num_warps, "num_stages": meta.num_stages, "paths": [path],
            "shared_bytes": meta.shared, "shared_limit": SHARED_MEMORY_LIMIT[capability],
            "shared_estimate": _estimated_shared(kernel, kwargs, meta.num_stages, DTYPES[dtype_name].itemsize),
            "wgmma": "wgmma.mma_async" in compiled.asm["ptx"], "tma": "cp.async.bulk.tensor" in compiled.asm["ptx"],
            "fp8_mma": bool(_FP8_MMA.search(compiled.asm["ptx"])),
            "compile_s": round(seconds, 2), "error": None,
            "atomics": _atomics(compiled.asm["ptx"]), "int32_offsets": int32_pointer_offsets(compiled.asm["ttir"]),
            **_resources(compiled),
        }
        builds[key]["blocks_per_sm"] = blocks_per_sm(capability, meta.num_warps, builds[key]["registers"],
                                                     meta.shared)

    def build_only(kernel):
        return _BuildOnly(kernel, record)

    with contextlib.ExitStack() as stack:
        for module in (lora_linear, merge, fused_gemm_tma):
            stack.enter_context(mock.patch.object(module, "traceable", build_only))
        # For good: a machine without a GPU has no driver to go back to (main runs each job in a worker process).
        driver.set_active(_StandInDriver(capability))
        dtype = DTYPES[dtype_name]
        # Every tile tuning would time (the candidates that fit), then the fixed tile of RELORA_KERNELS_AUTOTUNE=0.
        stage["label"] = "tuned"
        for tile in policy.fitting(policy.gemm_tiles(), policy.gemm_shared_bytes, policy.block_rank(rank),
                                   dtype)[:policy.TUNED_CANDIDATES]:
            with policy.forced_tile(tile):
                _drive_launchers(dtype, rank)
        stage["label"] = None
        # The fixed tiles at the headline shapes, and with every operand strided.
        with rk_settings(autotune=False):
            _drive_launchers(dtype, rank)
            for name in shapes:
                stage["label"] = name
                _drive_launchers(dtype, rank, SHAPES[name])
            stage["label"] = "strided"
            _drive_launchers_strided(dtype, rank)
            stage["label"] = "hopper"
            _drive_hopper_tiles(dtype, rank)
            if fp8 and capability >= lora_linear.FP8_MIN_ARCH:  # no FP8 before sm_89
                stage["label"] = "fp8"
                _drive_fp8_launchers(dtype, rank)
                stage["label"] = "fp8 strided"
                _drive_fp8_launchers(dtype, rank, strided=True)
    return list(builds.values())


def _op_calls(dtype: torch.dtype, rank: int) -> list[tuple[str, object, tuple]]:
    """(label, function, its tensor arguments) for each op in every variant a training step or a restart calls."""
    from relora_kernels import ops

    x, weight = torch.zeros(TOKENS, IN_FEATURES, dtype=dtype), torch.zeros(OUT_FEATURES, IN_FEATURES, dtype=dtype)
    lora_a, lora_b = torch.zeros(rank, IN_FEATURES, dtype=dtype), torch.zeros(OUT_FEATURES, rank, dtype=dtype)
    bias, grad_y = torch.zeros(OUT_FEATURES, dtype=dtype), torch.zeros(TOKENS, OUT_FEATURES, dtype=dtype)
    shrunk, seed = torch.zeros(TOKENS, rank, dtype=dtype), torch.tensor(1234)

    def backward(dropout_p, need_bias_grad, deterministic):
        return lambda dy, x, w, a, b, s, *seed: ops.lora_backward(dy, x, w, a, b, s, 2.0, dropout_p,
                                                                   seed[0] if seed else None, True, need_bias_grad,
                                                                   deterministic)

    return [
        ("lora_forward p=0.1 bias", lambda x, w, a, b, bias, seed: ops.lora_forward(x, w, a, b, 2.0, bias, 0.1, seed),
         (x, weight, lora_a, lora_b, bias, seed)),
        ("lora_forward p=0", lambda x, w, a, b: ops.lora_forward(x, w, a, b, 2.0, None, 0.0, None),
         (x, weight, lora_a, lora_b)),
        ("lora_backward p=0.1 dbias", backward(0.1, True, False), (grad_y, x, weight, lora_a, lora_b, shrunk, seed)),
        ("lora_backward deterministic", backward(0.0, False, True), (grad_y, x, weight, lora_a, lora_b, shrunk)),
        ("merge_lora_weight_", lambda w, a, b: ops.merge_lora_weight_(w, a, b, 2.0), (weight, lora_a, lora_b)),
        ("reinit_lora_", lambda a, b: ops.reinit_lora_(a, b, 1234), (lora_a, lora_b)),
    ]


def trace_for_compile(capability: int, dtype_name: str, rank: int) -> list[dict]:
    """Each op as torch.compile sees it on that GPU: AOTAutograd's graph of one call, on fake tensors (nothing is
    allocated or run). A triton_op is decomposed there into its kernel launches, which Inductor then schedules with
    the rest of the model; for each launch Inductor analyses the kernel's Triton IR to learn which tensor arguments
    it writes, and copies only those (where the analysis fails it assumes every tensor argument is written: extra
    copies in every step). One row per op call, then the forward and the backward graph of a LoRALinear layer's
    training step (through the autograd wrapper): its launches (kernel, grid per autotune config, tensors written,
    tensor arguments), the ops left opaque (not decomposed), and the other ATen ops in the graph."""
    from torch._functorch.aot_autograd import aot_function, make_boxed_func
    from torch._subclasses.fake_tensor import FakeTensorMode

    driver.set_active(_StandInDriver(capability))  # for good, as in build_all
    rows, graphs = [], {}

    def keep(kind):
        def compiler(graph, example_inputs):
            graphs[kind] = graph
            return make_boxed_func(graph)  # the calling convention AOTAutograd expects of a compiler

        return compiler

    def row(op: str, engine: str, graph) -> dict:
        return {"arch": f"sm_{capability}", "dtype": dtype_name, "r": rank, "engine": engine, "op": op,
                **_graph_launches(graph)}

    for engine in policy.ENGINES:
        with rk_settings(engine=engine):
            for label, function, tensors in _op_calls(DTYPES[dtype_name], rank):
                with FakeTensorMode() as mode:
                    aot_function(function, fw_compiler=keep("forward"))(*(mode.from_tensor(t) for t in tensors))
                rows.append(row(label, engine, graphs["forward"]))
            _trace_layer_step(dtype_name, rank, keep)
            rows += [row(f"LoRALinear p=0.1 {kind}", engine, graphs[kind]) for kind in ("forward", "backward")]
    return rows


def _trace_layer_step(dtype_name: str, rank: int, keep) -> None:
    """A LoRALinear layer's training step through the autograd wrapper, its graphs to keep(kind). CPU fake
    tensors stand for the GPU's (the CPU-only torch cannot make CUDA ones, nor run autograd on them), so the kernels
    are chosen by hand where functional.py would choose them for a CUDA tensor."""
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    import relora_kernels as rk
    from relora_kernels import functional

    with mock.patch.object(functional, "use_triton", lambda device: True), FakeTensorMode():
        layer = rk.LoRALinear(IN_FEATURES, OUT_FEATURES, r=rank, dropout=0.1, dtype=DTYPES[dtype_name])
        names, parameters = zip(*layer.named_parameters(), strict=True)

        def step(x, *parameters):
            return torch.func.functional_call(layer, dict(zip(names, parameters, strict=True)), (x,))

        x = torch.zeros(TOKENS, IN_FEATURES, dtype=DTYPES[dtype_name], requires_grad=True)
        aot_function(step, fw_compiler=keep("forward"), bw_compiler=keep("backward"))(x, *parameters).sum().backward()


# ATen ops that allocate or re-view memory without launching a kernel.
METADATA_OPS = frozenset({"empty", "empty_strided", "new_empty", "view", "_unsafe_view", "reshape", "alias", "t",
                          "transpose", "permute", "expand", "select", "slice", "unsqueeze", "squeeze", "as_strided",
                          "detach", "sym_size"})


def _graph_launches(graph) -> dict:
    """The kernel launches of an AOTAutograd graph, the relora_kernels ops left whole, the other ATen ops, and how
    many times each ATen op that launches a kernel on a GPU appears."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    launches, opaque, aten, kernels = [], [], set(), {}
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            launches.append({
                # torch wraps a kernel launched with num_warps / num_stages as a one-config Autotuner
                "kernel": getattr(kernel, "fn", kernel).__name__.lstrip("_"),
                "grid": [list(grid) for grid in node.kwargs["grid"]],
                "written": sorted(node.kwargs["tensors_to_clone"]),
                "tensor_args": sorted(k for k, v in node.kwargs["kwargs"].items() if isinstance(v, torch.fx.Node)),
            })
        elif str(node.target).startswith("relora_kernels."):
            opaque.append(str(node.target))
        elif str(node.target).startswith("aten."):
            op = str(node.target).split(".")[1]
            op = time_model.SAME_KERNEL.get(op, op)
            aten.add(op)
            if op not in METADATA_OPS:
                kernels[op] = kernels.get(op, 0) + 1
    return {"launches": launches, "opaque": opaque, "aten_ops": sorted(aten), "aten_kernels": kernels}


def problems(rows: list[dict]) -> list[str]:
    """What would fail on the GPU: a launch over the shared-memory limit (it raises OutOfResources), an estimate
    below what Triton allocates (a tile the launcher thinks fits might not, on some other GPU), or a pointer offset
    that wraps at 2**31 (int32_pointer_offsets)."""
    found = []
    for row in rows:
        build = f"{row['arch']} {row['dtype']} r={row['r']} {row['kernel']} {row['variant']} {_tile(row)}"
        if row.get("error"):
            found.append(f"{build}: build failed: {row['error']}")
            continue
        if row["shared_bytes"] > row["shared_limit"]:
            found.append(f"{build}: would not launch, {row['shared_bytes']} B shared > {row['shared_limit']} B")
        if row["shared_estimate"] is not None and row["shared_bytes"] > row["shared_estimate"]:
            found.append(f"{build}: estimate too low, {row['shared_bytes']} B shared > {row['shared_estimate']} B")
        found += [f"{build}: {offset}" for offset in row["int32_offsets"]]
    return found


def _tile(row: dict) -> str:
    blocks = "x".join(str(v) for k, v in row["tile"].items() if k.startswith("BLOCK") and k != "BLOCK_R")
    hopper = (" ws" if row["tile"].get("WARP_SPECIALIZE") else "") + (
        f" e{row['tile']['EPILOGUE_SPLIT']}" if "EPILOGUE_SPLIT" in row["tile"] else "")
    return f"{blocks} w{row['num_warps']} s{row['num_stages']}{hopper}"


def _kib(size: int | None) -> str:
    return "-" if size is None else f"{size / 1024:.0f}"


def markdown(rows: list[dict], environment: dict) -> str:
    lines = [
        "# Kernel builds per GPU architecture (compiled on a CPU machine, never run: no timings)",
        "",
        *(f"- {key}: {value}" for key, value in environment.items()),
        f"- {len(rows)} builds, {sum(bool(row.get('error')) for row in rows)} failed; failed builds, launches over "
        "the shared-memory limit or above their estimate: " + ("; ".join(problems(rows)) or "none"),
        f"- builds with a stack frame (registers spilled to local memory; not an error, a speed cost): "
        f"{sum(bool(row['stack_bytes']) for row in rows)}",
        "",
        "| arch | dtype | r | kernel | variant | tile (MxNxK or block) | path | shared KiB / estimate / limit | regs "
        "| stack B | blocks/SM | wgmma | TMA | atomics vector/scalar |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.get("error"):
            lines.append(f"| {row['arch']} | {row['dtype']} | {row['r']} | {row['kernel']} | {row['variant']} "
                         f"| {_tile(row)} | {'+'.join(row['paths'])} | **build failed**: "
                         f"{row['error'].replace('|', '/')} | | | | | | |")
            continue
        flag = "" if row["shared_bytes"] <= row["shared_limit"] else " **over**"
        lines.append(
            f"| {row['arch']} | {row['dtype']} | {row['r']} | {row['kernel']} | {row['variant']} | {_tile(row)} "
            f"| {'+'.join(row['paths'])} | {row['shared_bytes'] / 1024:.0f} / {_kib(row['shared_estimate'])} / "
            f"{row['shared_limit'] / 1024:.0f}{flag} "
            f"| {row['registers']} | {row['stack_bytes']} | {row['blocks_per_sm']} | {'yes' if row['wgmma'] else 'no'} "
            f"| {'yes' if row['tma'] else 'no'} "
            f"| {row['atomics']['vector']}/{row['atomics']['scalar']} |"
        )
    return "\n".join(lines) + "\n"


def _build_job(job):
    """The job's rows; an error outside any one build (a launcher's own) is the job's one failed row."""
    try:
        return build_all(*job)
    except Exception as error:
        capability, dtype_name, rank = job[:3]
        return [failed_row(f"sm_{capability}", dtype_name, rank, "(launchers)", {}, "job", error)]


def _trace_job(job):
    return trace_for_compile(*job)


def traced_markdown(traced: list[dict]) -> str:
    """The launches torch.compile sees per op, and what Inductor found each kernel writes."""
    lines = ["", "## Each op as torch.compile sees it (AOTAutograd's graph on fake tensors; Inductor's analysis of "
             "what each kernel writes: it copies only those)", "",
             "| arch | dtype | r | engine: op | launches: kernel (grid) writes / of tensor arguments "
             "| left opaque | other ATen ops |", "|---|---|---|---|---|---|---|"]
    for row in traced:
        launches = "; ".join(f"{launch['kernel']} {tuple(launch['grid'][0])} {', '.join(launch['written'])} / "
                             f"{len(launch['tensor_args'])}" for launch in row["launches"])
        lines.append(f"| {row['arch']} | {row['dtype']} | {row['r']} | {row['engine']}: {row['op']} "
                     f"| {launches or '-'} "
                     f"| {', '.join(row['opaque']) or 'none'} | {', '.join(row['aten_ops']) or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(SHARED_MEMORY_LIMIT),
                        help="compute capabilities (90 = H100/H200, 80 = A100, 89 = RTX 4090 / L4 / L40)")
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 128, 256])
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="build processes (default: one per core)")
    parser.add_argument("--out", type=Path, help="folder for gpu_build.md and gpu_build.json (else: table to stdout)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--shapes", nargs="*", default=[], choices=[name for name in SHAPES if name != "small"],
                        help="also build the fixed tiles at these shapes: headline = 8192 tokens x 4096 x 4096, "
                             "mlp = 16384 x 4096 x 14336")
    parser.add_argument("--fp8", action="store_true",
                        help="also the FP8 launches that rk.lora_linear_fp8 and quantize_fp8_weight make (sm_89 "
                             "and later; ignored for older architectures)")
    parser.add_argument("--trace", action="store_true",
                        help="also trace each op as torch.compile sees it (its kernel launches, what each writes)")
    args = parser.parse_args(argv)
    if policy.interpreting():  # the kernels were made interpreted functions when imported: nothing to compile
        parser.error("gpu_build compiles the kernels for a GPU, which Triton's interpreter cannot: run it without "
                     "TRITON_INTERPRET=1")
    bad_ranks = [r for r in args.ranks if not 1 <= r <= MAX_RANK]
    if bad_ranks:
        parser.error(f"--ranks {bad_ranks}: each must be in 1..{MAX_RANK}")

    from .harness import git_commit

    environment = {
        "built on": f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU (Triton's compiler and ptxas only)",
        "python": platform.python_version(), "triton": triton.__version__, "torch": torch.__version__,
        "commit": git_commit(),
        "shapes": ", ".join(f"{name} M={m} K={k} N={n}" for name, (m, k, n) in SHAPES.items()
                            if name == "small" or name in args.shapes), "command": "python -m benchmarks.gpu_build "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    jobs = [(arch, dtype, rank, tuple(args.shapes), args.fp8) for arch in args.arch for dtype in args.dtypes
            for rank in args.ranks]
    start = time.perf_counter()
    # One process per job: Triton keeps the target of device 0 per kernel for the life of a process.
    # (multiprocessing's Pool: concurrent.futures' max_tasks_per_child needs Python 3.11.)
    with multiprocessing.Pool(max(1, min(args.jobs, len(jobs))), maxtasksperchild=1) as pool:
        rows = [row for job_rows in pool.map(_build_job, jobs, chunksize=1) for row in job_rows]
        traced = [row for job_rows in pool.map(_trace_job, [job[:3] for job in jobs] if args.trace else [], chunksize=1)
                  for row in job_rows]
    print(f"{len(rows)} builds for {len(jobs)} (arch, dtype, rank) in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)

    table = markdown(rows, environment) + (traced_markdown(traced) if args.trace else "")
    payload = json.dumps({**environment, "rows": rows, **({"traced": traced} if args.trace else {})}, indent=1)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_build.md").write_text(table)
        (args.out / "gpu_build.json").write_text(payload)
    else:
        print(table)
    if args.json:
        args.json.write_text(payload)
    failures = problems(rows)
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Triton kernels of the ReLoRA restart: merge the low-rank update into W, then re-initialise A and zero B.

    merge   W <- W + s * B @ A        _merge_kernel   (merge_lora_weight_)
    reinit  A <- U(-1/sqrt(K), 1/sqrt(K)), B <- 0      _reinit_kernel  (reinit_lora_)

W (N, K), A (r, K), B (N, r). The merge reads W once and writes it once: each program owns one (BLOCK_N, BLOCK_K)
tile of W, forms s * B_tile @ A_tile in fp32 and rounds W_tile + that once into W's dtype (an eager bf16 merge
rounds B @ A, s * (.), and the sum: three roundings that drift over many restarts). A and B are upcast to fp32
before the dot: every bf16/fp16 value is exact in tf32, so the tensor-core products are exact and only the fp32
sums round. The reinit is a second launch because the merge still reads A; its random stream is Philox keyed by
the seed and counted by A's flat index, the same as reference.reinit_uniform, so any process with the same seed
writes the same A. Both kernels work in place and are therefore not autotuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import random_stream
from .._validate import MAX_RANK
from . import policy
from .launch import (
    LaunchSite,
    aligned_launches_apply,
    cdiv,
    launch_options,
    off_current_device,
    on_tensors_device,
    traceable,
)

_RANDOM_SHIFT = tl.constexpr(random_stream.RANDOM_SHIFT)
_INV_RANDOM_RANGE = tl.constexpr(random_stream.UNIT_SCALE)


@triton.jit
def _merge_kernel(
    w_ptr,  # (N, K) updated in place
    a_ptr,  # (R, K)
    b_ptr,  # (N, R)
    N, K, R,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    scale,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_n.to(tl.int64)
    cols = offs_k.to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K
    mask_r = offs_r < R

    b_tile = tl.load(b_ptr + rows[:, None] * stride_bn + offs_r[None, :] * stride_br,
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    a_tile = tl.load(a_ptr + offs_r[:, None] * stride_ar + cols[None, :] * stride_ak,
                     mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
    # s * B @ A in fp32
    update = tl.dot(b_tile, a_tile, input_precision=DOT_PRECISION) * tl.cast(scale, tl.float32)

    w_ptrs = w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk
    w_mask = mask_n[:, None] & mask_k[None, :]
    w_tile = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
    tl.store(w_ptrs, (w_tile + update).to(w_ptr.dtype.element_ty), mask=w_mask)  # the one rounding


@triton.jit(do_not_specialize=["seed"])
def _reinit_kernel(
    a_ptr,  # (R, K) overwritten with U(-bound, bound)
    b_ptr,  # (N, R) zeroed
    R, K, N,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    seed, bound,
    BLOCK: tl.constexpr,
):
    # Programs [0, blocks of A) write A; the rest zero B.
    pid = tl.program_id(0)
    a_blocks = tl.cdiv(R * K, BLOCK)
    if pid < a_blocks:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        row, col = offs // K, offs % K
        bits = (tl.randint(seed, offs) >> _RANDOM_SHIFT).to(tl.float32)
        u = bits * _INV_RANDOM_RANGE  # exact: a 24-bit integer over 2**24
        value = (u * 2.0 - 1.0) * tl.cast(bound, tl.float32)
        tl.store(a_ptr + row * stride_ar + col * stride_ak, value.to(a_ptr.dtype.element_ty), mask=offs < R * K)
    else:
        offs = (pid - a_blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        row, col = offs // R, offs % R
        zeros = tl.zeros((BLOCK,), dtype=b_ptr.dtype.element_ty)
        tl.store(b_ptr + row * stride_bn + col * stride_br, zeros, mask=offs < N * R)


# A memory-bound stream over W: 64x128 tiles keep enough loads in flight; where the fp32 copies of the A and B tiles
# do not fit the GPU's shared memory (r = 256 in fp32 below an H100), a smaller tile.
_MERGE_CONFIGS = [
    {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 8},
    {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4},
]


def _merge_shared_bytes(config: dict, rank_block: int, element_size: int) -> int:
    """The fp32 copies of the (BLOCK_N, r) and (r, BLOCK_K) tiles whatever W's dtype (`element_size` is not used),
    r counted as at least 32 since the dot pads smaller operands."""
    return 4 * max(rank_block, 32) * (config["BLOCK_N"] + config["BLOCK_K"]) + policy.TRITON_SHARED_OVERHEAD


def _merge_config(rank_block: int, dtype: torch.dtype) -> dict:
    if policy.interpreting():
        return {"BLOCK_N": policy.INTERPRETER_BLOCK, "BLOCK_K": policy.INTERPRETER_BLOCK}
    return policy.fitting(_MERGE_CONFIGS, _merge_shared_bytes, rank_block, dtype)[0]


def _merge_plan(N, K, R, dtype, w_strides, a_strides, b_strides, scale, device):
    cfg = _merge_config(policy.block_rank(R), dtype)
    scalars = dict(
        N=N, K=K, R=R,
        stride_wn=w_strides[0], stride_wk=w_strides[1],
        stride_ar=a_strides[0], stride_ak=a_strides[1],
        stride_bn=b_strides[0], stride_br=b_strides[1],
        scale=float(scale),
        # fp32 weights get full fp32 products; 16-bit factors are exact in tf32 (see the module docstring).
        BLOCK_R=policy.block_rank(R), DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
    )
    return (cdiv(N, cfg["BLOCK_N"]), cdiv(K, cfg["BLOCK_K"])), scalars, launch_options(cfg)


def _reinit_plan(R, K, N, a_strides, b_strides, seed, dtype, device):
    # dtype and device only key the launch: its compiled kernel is of A's and B's dtype on that device (an
    # AlignedLaunch keeps one).
    block = 1024 if not policy.interpreting() else 256
    scalars = dict(R=R, K=K, N=N, stride_ar=a_strides[0], stride_ak=a_strides[1], stride_bn=b_strides[0],
                   stride_br=b_strides[1], seed=seed, bound=K**-0.5 if K else 0.0, BLOCK=block)
    return (cdiv(R * K, block) + cdiv(N * R, block),), scalars, {}


_MERGE = LaunchSite(_merge_kernel, _merge_plan)
_REINIT = LaunchSite(_reinit_kernel, _reinit_plan)


def _merge(weight, lora_a, lora_b, scale, kernel, aligned=False) -> None:
    """`aligned`: every pointer starts on 16 bytes and no launch hook is set (launch.aligned_launches_apply), so the
    launch may take its AlignedLaunch; the key fixes the pointers' dtypes (A's and B's are W's)."""
    (N, K), R = weight.shape, lora_a.shape[0]
    if R > MAX_RANK:
        raise ValueError(f"lora_a has r = {R} rows; the Triton kernels support r <= {MAX_RANK}")
    if weight.numel() == 0:
        return
    launch = _MERGE.bind(kernel, (N, K, R, weight.dtype, weight.stride(), lora_a.stride(), lora_b.stride(), scale,
                                  weight.device.index))
    (launch.aligned if aligned else launch)((weight, lora_a, lora_b))


def _reinit(lora_a, lora_b, seed, kernel, aligned=False) -> None:
    (R, K), N = lora_a.shape, lora_b.shape[0]
    if R * K + N * R == 0:
        return
    launch = _REINIT.bind(kernel, (R, K, N, lora_a.stride(), lora_b.stride(), seed, lora_a.dtype,
                                   lora_a.device.index))
    (launch.aligned if aligned else launch)((lora_a, lora_b))


@on_tensors_device
def merge_lora_weight_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
    """W <- W + s * B @ A in place, fp32 accumulation, one rounding into W's dtype."""
    _merge(weight, lora_a, lora_b, scale, traceable(_merge_kernel))


@on_tensors_device
def reinit_lora_(lora_a: torch.Tensor, lora_b: torch.Tensor, seed: int) -> None:
    """A <- U(-1/sqrt(K), 1/sqrt(K)) keyed by `seed`, B <- 0, in place."""
    _reinit(lora_a, lora_b, seed, traceable(_reinit_kernel))


def merge_and_reinit_eagerly(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                             seed: int) -> None:
    """merge_lora_weight_, then reinit_lora_: for calls outside tracing (functional.py's eager path), which launch
    the kernels themselves, not through tracing's wrapper; on W's device, as on_tensors_device would run them, with
    one alignment test for both launches."""
    if off_current_device(weight):
        with torch.cuda.device(weight.device):
            merge_and_reinit_eagerly(weight, lora_a, lora_b, scale, seed)
            return
    aligned = aligned_launches_apply(weight, lora_a, lora_b)
    _merge(weight, lora_a, lora_b, scale, _merge_kernel, aligned)
    _reinit(lora_a, lora_b, seed, _reinit_kernel, aligned)

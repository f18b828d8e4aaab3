"""Triton kernels of the fused LoRA linear and their launchers.

The math (DESIGN.md section 1; x (M, K), W (N, K), A (r, K), B (N, r), s the scale, p the dropout):

    x~ = dropout_p(x)                          mask m from (seed, m, k), scaled by 1/(1-p)
    S  = x~ @ A.T                              _shrink_kernel            (lora_shrink)
    y  = x @ W.T + bias + s * S @ B.T          _fused_matmul_kernel      (lora_forward_matmul)
    dS = s * dy @ B;  dB = s * dy.T @ S;       _grad_b_kernel            (lora_grad_ab: dy and x are each
    dbias = dy.sum(0)                                                     read once, by programs that split
    dA = dS.T @ x~                             _grad_a_kernel             the tokens and the N / K columns)
    dx = dy @ W + (dS @ A) * m / (1-p)         _fused_matmul_kernel      (lora_input_grad)

The fused GEMM starts its fp32 accumulator from the low-rank term (plus bias) and then runs the ordinary K loop,
so the LoRA branch costs no extra read or write of the (M, N) output. The dropout mask is never stored: every
kernel that needs it regenerates it from Philox keyed by the seed, one draw per four neighbouring elements of a row
of the (M, K) view of x (_keep_mask). `reference.py` reproduces the same stream, so the reference drops the same
elements.

Launchers take 2-D tensors that `functional.py` has already validated (same dtype and device, matching shapes)
and accept any strides. Limits: r <= MAX_RANK (the low-rank tiles live in registers).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from ..reference import DROPOUT_BITS, dropout_threshold

MAX_RANK = 256

# Each Philox word has 32 random bits; the top DROPOUT_BITS of them are compared with round(p * 2**DROPOUT_BITS).
_RANDOM_SHIFT = tl.constexpr(32 - DROPOUT_BITS)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Whether ops.py registers the launchers as triton_ops, which torch.compile traces into, or as opaque custom ops:
# the latter under the interpreter, whose kernels torch cannot trace (torch <= 2.11's wrap_triton even refuses them).
# Fixed at import, as the registration is.
TRACEABLE_LAUNCHES = not _interpreting()


def traceable(kernel):
    """`kernel` in the form every launch uses: wrapped for tracing where the ops are triton_ops, else itself."""
    return torch.library.wrap_triton(kernel) if TRACEABLE_LAUNCHES else kernel


def on_tensors_device(launcher):
    """Run `launcher` with its first tensor's CUDA device current: Triton launches on the current device, which
    need not be the one the tensors are on."""

    @functools.wraps(launcher)
    def launch(first: torch.Tensor, *args, **kwargs):
        guard = torch.cuda.device(first.device) if first.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return launcher(first, *args, **kwargs)

    return launch


def _block_rank(rank: int) -> int:
    """r padded to a power of two >= 16 because tl.dot needs every dimension >= 16; the padding is masked."""
    return max(16, triton.next_power_of_2(rank))


def _fp32_matmul_allows_tf32() -> bool:
    """torch's own setting for fp32 matmuls. `fp32_precision` (torch >= 2.9) reflects the legacy `allow_tf32` and
    `set_float32_matmul_precision` as well, whereas reading `allow_tf32` raises once the new API has been used."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return matmul.allow_tf32 if precision is None else precision == "tf32"


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's own matmul setting (full fp32 unless TF32 was allowed); 16-bit ones ignore it."""
    if dtype == torch.float32 and not _fp32_matmul_allows_tf32():
        return "ieee"
    return "tf32"


@triton.jit
def _keep_mask(seed, rows, col_start, cols, keep_threshold, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Keep-mask of the tile `rows` (int64, BLOCK_ROWS) x [col_start, col_start + BLOCK_COLS) of an (M, cols)
    matrix, col_start a multiple of 4 (same stream as reference.dropout_bits).

    Element (m, k) takes word k % 4 of the Philox draw counted m * cdiv(cols, 4) + k // 4: one draw of ten rounds
    serves four neighbours. (One draw per element cost ~60 instructions per element on sm_90, several times the
    memory time of the shrink and grad kernels.)"""
    groups = col_start // 4 + tl.arange(0, BLOCK_COLS // 4)
    w0, w1, w2, w3 = tl.randint4x(seed, rows[:, None] * tl.cdiv(cols, 4) + groups[None, :])
    # tl.join stacks along a new minor dimension, so element [m, g, i, j] of join(join(w0, w2), join(w1, w3)) is
    # word 2i + j; flattened row-major, column 4g + w holds word w.
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_ROWS, BLOCK_COLS))
    return (words >> _RANDOM_SHIFT).to(tl.int32) >= keep_threshold


# ---------------------------------------------------------------------------------------------------------------
# fwd 1: S = dropout(x) @ A.T
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _shrink_kernel(
    x_ptr,  # (M, K)
    a_ptr,  # (R, K)
    s_ptr,  # (M, R) output
    seed_ptr,  # () int64 dropout seed, read only when APPLY_DROPOUT
    M, K, R,
    stride_xm, stride_xk,
    stride_ar, stride_ak,
    stride_sm, stride_sr,
    keep_threshold, inv_keep,
    APPLY_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)  # M * stride can pass 2**31
    offs_r = tl.arange(0, BLOCK_R)
    if APPLY_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        cols = offs_k.to(tl.int64)
        x_tile = tl.load(
            x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0,
        )
        if APPLY_DROPOUT:
            keep = _keep_mask(seed, rows, k0, K, keep_threshold, BLOCK_M, BLOCK_K)
            x_tile = tl.where(keep, x_tile, tl.zeros_like(x_tile))
        a_tile = tl.load(  # (BLOCK_K, BLOCK_R) tile of A.T
            a_ptr + offs_r[None, :] * stride_ar + cols[:, None] * stride_ak,
            mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0,
        )
        acc = tl.dot(x_tile, a_tile, acc, input_precision=DOT_PRECISION)
    if APPLY_DROPOUT:
        acc = acc * tl.cast(inv_keep, tl.float32)  # the 1/(1-p) of every kept element, applied once
    tl.store(
        s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
        acc.to(s_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_r[None, :] < R),
    )


# ---------------------------------------------------------------------------------------------------------------
# fwd 2 and bwd 2: out = lhs @ rhs + low_scale * mask(low @ up) + bias, the low-rank term as accumulator init
#   forward:  y  = x  @ W.T + s * (S @ B.T) + bias        (lhs = x,  rhs = W.T, low = S,  up = B.T, no mask)
#   backward: dx = dy @ W   + mask(dS @ A) / (1-p)         (lhs = dy, rhs = W,   low = dS, up = A)
# The transposes are strides, never copies.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _fused_matmul_kernel(
    lhs_ptr,  # (M, K)
    rhs_ptr,  # (K, N)
    low_ptr,  # (M, R)
    up_ptr,  # (R, N)
    bias_ptr,  # (N,), read only when HAS_BIAS
    out_ptr,  # (M, N) output
    seed_ptr,  # () int64 dropout seed, read only when APPLY_DROPOUT
    M, N, K, R,
    stride_lm, stride_lk,
    stride_rk, stride_rn,
    stride_wm, stride_wr,
    stride_ur, stride_un,
    stride_om, stride_on,
    stride_bias,
    low_scale, keep_threshold,
    HAS_BIAS: tl.constexpr, APPLY_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-blocks share their rhs column-blocks while those are still in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # Accumulator init: low_scale * (low @ up), masked by dropout, plus bias.
    low_tile = tl.load(
        low_ptr + rows[:, None] * stride_wm + offs_r[None, :] * stride_wr,
        mask=mask_m[:, None] & (offs_r[None, :] < R), other=0.0,
    )
    up_tile = tl.load(
        up_ptr + offs_r[:, None] * stride_ur + cols[None, :] * stride_un,
        mask=(offs_r[:, None] < R) & mask_n[None, :], other=0.0,
    )
    acc = tl.dot(low_tile, up_tile, input_precision=DOT_PRECISION) * tl.cast(low_scale, tl.float32)
    if APPLY_DROPOUT:
        keep = _keep_mask(tl.load(seed_ptr), rows, pid_n * BLOCK_N, N, keep_threshold, BLOCK_M, BLOCK_N)
        acc = tl.where(keep, acc, 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    # The ordinary K loop of lhs @ rhs; the pointer steps in int64, as a transposed operand's stride is M or N.
    lhs_ptrs = lhs_ptr + rows[:, None] * stride_lm + tl.arange(0, BLOCK_K)[None, :] * stride_lk
    rhs_ptrs = rhs_ptr + tl.arange(0, BLOCK_K)[:, None] * stride_rk + cols[None, :] * stride_rn
    lhs_step = tl.cast(stride_lk, tl.int64) * BLOCK_K
    rhs_step = tl.cast(stride_rk, tl.int64) * BLOCK_K
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        lhs_tile = tl.load(lhs_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        rhs_tile = tl.load(rhs_ptrs, mask=(offs_k[:, None] < K) & mask_n[None, :], other=0.0)
        acc = tl.dot(lhs_tile, rhs_tile, acc, input_precision=DOT_PRECISION)
        lhs_ptrs += lhs_step
        rhs_ptrs += rhs_step

    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


# ---------------------------------------------------------------------------------------------------------------
# bwd 1: dS, dB, dA (and dbias) in two launches that read dy and x once each. A program owns a block of tokens and a
# share of the N (or K) chunks, so that short inputs still give the GPU enough programs (one program per token
# block alone would be M / 64: 32 programs for 2048 tokens on an H100's 132 SMs).
#   _grad_b_kernel (token block, N share):  dS_partial = dy @ B over its N share;  dB += s * dy.T @ S;  dbias
#   _grad_a_kernel (token block, K share):  dS = s * sum of the dS partials;       dA += dS.T @ x~
# Reductions over tokens (dB, dA, dbias) and over the N shares (dS) go through _accumulate.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _accumulate(ptrs, value, mask, DETERMINISTIC: tl.constexpr):
    """Add a program's partial into a reduction buffer: its own slice (deterministic) or fp32 atomics."""
    if DETERMINISTIC:
        tl.store(ptrs, value, mask=mask)
    else:
        tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")


@triton.jit
def _token_block(M, R, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, DETERMINISTIC: tl.constexpr):
    """A gradient program's block of tokens (axis 0 of the grid): its partials' slot, its rows (int64: M * stride
    can pass 2**31), their mask, and the rank offsets and mask."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    slot = pid_m.to(tl.int64) if DETERMINISTIC else 0  # slot * stride can pass 2**31
    return slot, offs_m.to(tl.int64), offs_m < M, offs_r, offs_r < R


@triton.jit
def _grad_b_kernel(
    dy_ptr,  # (M, N)
    s_ptr,  # (M, R) the forward's S
    b_ptr,  # (N, R)
    ds_ptr,  # (DS_SLOTS, M, R) fp32 output: dy @ B partials, one slot per N share (DS_SLOTS = 1 with atomics)
    db_ptr,  # (SLOTS, N, R) fp32 output: dB partials, one slot per token block (SLOTS = 1 with atomics)
    dbias_ptr,  # (SLOTS, N) fp32 output: dbias partials, written only when HAS_BIAS_GRAD
    M, N, R,
    stride_dym, stride_dyn,
    stride_sm, stride_sr,
    stride_bn, stride_br,
    stride_ds_slot, stride_ds_m, stride_ds_r,
    stride_db_slot, stride_db_n, stride_db_r,
    stride_dbias_slot,
    scale, chunks_per_share,
    HAS_BIAS_GRAD: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    share = tl.program_id(1)
    slot, rows, mask_m, offs_r, mask_r = _token_block(M, R, BLOCK_M, BLOCK_R, DETERMINISTIC)
    scale = tl.cast(scale, tl.float32)  # float scalars may arrive as fp64 (torch.compile)
    s_tile = tl.load(
        s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
        mask=mask_m[:, None] & mask_r[None, :], other=0.0,
    )

    # dy is read once, feeding dS (reduced here over this share of N) and dB (reduced over tokens).
    n_start = share * chunks_per_share * BLOCK_N
    n_end = min(N, n_start + chunks_per_share * BLOCK_N)
    ds_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        cols = offs_n.to(tl.int64)
        dy_tile = tl.load(
            dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_n[None, :], other=0.0,
        )
        b_tile = tl.load(
            b_ptr + cols[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=mask_n[:, None] & mask_r[None, :], other=0.0,
        )
        # dS += dy @ B   (s applied once, by _grad_a_kernel)
        ds_acc = tl.dot(dy_tile, b_tile, ds_acc, input_precision=DOT_PRECISION)
        # dB += s * dy.T @ S
        db_part = tl.dot(tl.trans(dy_tile), s_tile, input_precision=DOT_PRECISION) * scale
        _accumulate(
            db_ptr + slot * stride_db_slot + cols[:, None] * stride_db_n + offs_r[None, :] * stride_db_r,
            db_part, mask_n[:, None] & mask_r[None, :], DETERMINISTIC,
        )
        if HAS_BIAS_GRAD:
            # dbias += dy.sum(0)
            _accumulate(
                dbias_ptr + slot * stride_dbias_slot + cols,
                tl.sum(dy_tile.to(tl.float32), axis=0), mask_n, DETERMINISTIC,
            )
    ds_slot = share.to(tl.int64) if DETERMINISTIC else 0
    _accumulate(
        ds_ptr + ds_slot * stride_ds_slot + rows[:, None] * stride_ds_m + offs_r[None, :] * stride_ds_r,
        ds_acc, mask_m[:, None] & mask_r[None, :], DETERMINISTIC,
    )


@triton.jit
def _grad_a_kernel(
    x_ptr,  # (M, K)
    ds_partial_ptr,  # (DS_SLOTS, M, R) fp32: _grad_b_kernel's dy @ B partials
    ds_ptr,  # (M, R) output dS, in x's dtype
    da_ptr,  # (SLOTS, R, K) fp32 output: dA partials, one slot per token block (SLOTS = 1 with atomics)
    seed_ptr,  # () int64 dropout seed, read only when APPLY_DROPOUT
    M, K, R, DS_SLOTS,
    stride_xm, stride_xk,
    stride_dsp_slot, stride_dsp_m, stride_dsp_r,
    stride_dsm, stride_dsr,
    stride_da_slot, stride_da_r, stride_da_k,
    scale, keep_threshold, inv_keep, chunks_per_share,
    APPLY_DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    share = tl.program_id(1)
    slot, rows, mask_m, offs_r, mask_r = _token_block(M, R, BLOCK_M, BLOCK_R, DETERMINISTIC)
    mask_mr = mask_m[:, None] & mask_r[None, :]

    # dS = s * (sum of the N shares' partials), in a fixed order.
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    ds_ptrs = ds_partial_ptr + rows[:, None] * stride_dsp_m + offs_r[None, :] * stride_dsp_r
    for ds_slot in range(0, DS_SLOTS):
        ds += tl.load(ds_ptrs + tl.cast(ds_slot, tl.int64) * stride_dsp_slot, mask=mask_mr, other=0.0)
    ds = ds * tl.cast(scale, tl.float32)
    if share == 0:
        tl.store(ds_ptr + rows[:, None] * stride_dsm + offs_r[None, :] * stride_dsr,
                 ds.to(ds_ptr.dtype.element_ty), mask=mask_mr)
    # dS enters dA in the input dtype, as it would in the eager computation.
    ds_t = tl.trans(ds.to(x_ptr.dtype.element_ty))
    if APPLY_DROPOUT:
        seed = tl.load(seed_ptr)

    # x is read once; dA = dS.T @ x~ with the dropout mask regenerated, not loaded.
    k_start = share * chunks_per_share * BLOCK_K
    k_end = min(K, k_start + chunks_per_share * BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        cols = offs_k.to(tl.int64)
        x_tile = tl.load(
            x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        if APPLY_DROPOUT:
            keep = _keep_mask(seed, rows, k0, K, keep_threshold, BLOCK_M, BLOCK_K)
            x_tile = tl.where(keep, x_tile, tl.zeros_like(x_tile))
        # dA += dS.T @ x~
        da_part = tl.dot(ds_t, x_tile, input_precision=DOT_PRECISION)
        if APPLY_DROPOUT:
            da_part = da_part * tl.cast(inv_keep, tl.float32)
        _accumulate(
            da_ptr + slot * stride_da_slot + offs_r[:, None] * stride_da_r + cols[None, :] * stride_da_k,
            da_part, mask_r[:, None] & mask_k[None, :], DETERMINISTIC,
        )


# ---------------------------------------------------------------------------------------------------------------
# Configurations. Under the interpreter, one small tile (it runs one program at a time on the CPU). On a GPU, tiles
# are chosen to fit the device's shared memory (227 KiB per block on an H100, 163 KiB on an A100, 99 KiB on an RTX
# 4090): the low-rank tiles grow with r, so a tile that fits at r = 16 may not at r = 256. The estimates below bound
# what Triton allocates from above (exactly, for the fused GEMM on sm_90; 1.25-2.5x over on sm_8x):
# `python -m benchmarks.gpu_build` compiles every launch for sm_80/86/89/90 without a GPU and checks them (so does
# CI, for sm_90 and sm_80). The fused GEMM takes its tile from the measured per-architecture table (TUNED_TABLE),
# else is autotuned over the tiles that fit (it writes a fresh output, so re-running it is safe); the gradient
# kernels, which accumulate with atomics, the shrink and the merge use the first tile of their list that fits
# (never autotune an atomic or in-place kernel blindly).
# ---------------------------------------------------------------------------------------------------------------

_INTERPRETER_BLOCK = 32

# In order of preference for a fixed tile (RELORA_KERNELS_AUTOTUNE=0); Hopper-sized first, the last fits anywhere
# (r = 256 in fp32 on a 99 KiB GPU). Guesses, not yet measured on a GPU.
_MATMUL_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=2, num_warps=4),
]
# The autotuner tries the first few that fit (each costs a compile and a timing per new shape), the small last-resort
# tiles only where the large ones do not fit.
_AUTOTUNED_TILES = 6
_SHRINK_CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
]
_GRAD_AB_CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},  # fp32 at r = 256, 99-163 KiB
]


# What Triton allocates beside the tiles counted below (barriers, scratch): on sm_90, 1 KiB for the shrink and
# gradient kernels under triton 3.4 and nothing under 3.6 and 3.9 (benchmarks/gpu_build.py). Added to every estimate
# so that each bounds what every supported Triton allocates; the tiles chosen are the same with or without it.
_TRITON_SHARED_OVERHEAD = 1024


def _matmul_shared_bytes(config: triton.Config, rank_block: int, element_size: int) -> int:
    """The fused GEMM's shared memory: the x and W tiles of every pipeline stage, plus the (BLOCK_M, r) and
    (r, BLOCK_N) low-rank tiles of the accumulator init."""
    block_m, block_n, block_k = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    tiles = config.num_stages * (block_m + block_n) * block_k + rank_block * (block_m + block_n)
    return element_size * tiles + _TRITON_SHARED_OVERHEAD


def _shrink_shared_bytes(config: dict, rank_block: int, element_size: int) -> int:
    """The shrink's: the x and A tiles of every stage."""
    tiles = config["num_stages"] * (config["BLOCK_M"] + rank_block) * config["BLOCK_K"]
    return element_size * tiles + _TRITON_SHARED_OVERHEAD


def _grad_b_shared_bytes(config: dict, rank_block: int, element_size: int) -> int:
    """_grad_b_kernel's: the dy and B tiles of every stage, plus three (BLOCK_M, r) tiles (S, dS, layouts)."""
    block_m = config["BLOCK_M"]
    tiles = config["num_stages"] * (block_m + rank_block) * config["BLOCK_N"] + 3 * block_m * rank_block
    return element_size * tiles + _TRITON_SHARED_OVERHEAD


def _grad_a_shared_bytes(config: dict, rank_block: int, element_size: int) -> int:
    """_grad_a_kernel's: the x tiles of every stage, plus three (BLOCK_M, r) tiles (dS, dS.T, layouts)."""
    block_m = config["BLOCK_M"]
    tiles = config["num_stages"] * block_m * config["BLOCK_K"] + 3 * block_m * rank_block
    return element_size * tiles + _TRITON_SHARED_OVERHEAD


def _grad_ab_shared_bytes(config: dict, rank_block: int, element_size: int) -> int:
    """The two gradient kernels share a config: the larger of their needs."""
    return max(_grad_b_shared_bytes(config, rank_block, element_size),
               _grad_a_shared_bytes(config, rank_block, element_size))


@functools.cache
def _device_properties(device: int) -> dict:
    return triton.runtime.driver.active.utils.get_device_properties(device)


def _shared_memory_limit() -> int:
    """Shared memory one block may use on the device Triton launches on (the current one)."""
    return _device_properties(triton.runtime.driver.active.get_current_device())["max_shared_mem"]


# Programs a memory-bound launch should have: enough for several per SM, so that each SM keeps many loads in
# flight. Under the interpreter a small number, so that the tests' tiny inputs still exercise the split paths.
_PROGRAMS_PER_SM = 4
_INTERPRETER_PROGRAMS = 4


def _target_programs() -> int:
    if _interpreting():
        return _INTERPRETER_PROGRAMS
    device = _device_properties(triton.runtime.driver.active.get_current_device())
    return _PROGRAMS_PER_SM * device["multiprocessor_count"]


def _shares(token_blocks: int, chunks: int) -> tuple[int, int]:
    """(shares, chunks per share): split `chunks` column chunks into shares so that token_blocks x shares reaches
    _target_programs(), with no empty share."""
    wanted = max(1, min(chunks, triton.cdiv(_target_programs(), max(token_blocks, 1))))
    per_share = max(1, chunks // wanted)  # rounded down: at least `wanted` shares
    return max(1, triton.cdiv(chunks, per_share)), per_share


def _fitting(configs, shared_bytes, rank_block: int, dtype: torch.dtype) -> list:
    """The configs whose estimated shared memory fits the device, in their order of preference."""
    limit, element_size = _shared_memory_limit(), dtype.itemsize
    fitting = [c for c in configs if shared_bytes(c, rank_block, element_size) <= limit]
    if not fitting:  # the last config of each list fits 99 KiB at r = 256 in fp32: only a tiny GPU gets here
        raise RuntimeError(f"no tile of the LoRA kernels fits this GPU's {limit} bytes of shared memory per block "
                           f"at r <= {rank_block} in {dtype}; use a smaller rank or RELORA_KERNELS_BACKEND=reference")
    return fitting


@functools.cache
def _autotuned_matmul(configs: tuple[triton.Config, ...]):
    """One autotuner per set of fitting tiles (it keeps its own choices per shape)."""
    return triton.autotune(configs=list(configs), key=["M", "N", "K", "R"])(_fused_matmul_kernel)


def _tile_choice() -> str:
    """How the fused GEMM's tile is chosen, from RELORA_KERNELS_AUTOTUNE:
    unset  "table": the measured per-architecture table (tuned_gemm.json), else the autotuner;
    1      "autotune": the autotuner, over the first _AUTOTUNED_TILES fitting tiles, for every new shape;
    0      "fixed": the first fitting tile (the GPU tests: a cold autotune of their ~70 keys would take minutes)."""
    return {"0": "fixed", "1": "autotune"}.get(os.environ.get("RELORA_KERNELS_AUTOTUNE", ""), "table")


# The fused GEMM's tiles measured per GPU architecture by `python -m benchmarks.tune` and kept in the repository:
#   {"sm_90": {"measured": {device, torch, triton, commit, date},
#              "default": {"bf16/r16/forward+bias": tile, ...},          one per (dtype, rank block, variant)
#              "shapes": {"bf16/r16/forward+bias/M8192/N4096/K4096": tile, ...}}}    the tuned shapes
# A variant is the launch (forward: y = x @ W.T ..., input_grad: dx = dy @ W ..., whose W is read transposed) with
# its options (+bias, +dropout).
# A tuned shape takes its own tile, any other shape its (dtype, r, variant)'s default; an architecture or variant
# missing from the table is autotuned. A tile is written "128x128x64 g8 w8 s4" (BLOCK_M x BLOCK_N x BLOCK_K,
# GROUP_M, warps, stages).
TUNED_TABLE = Path(__file__).with_name("tuned_gemm.json")


def _current_arch() -> int:
    """The compute capability Triton compiles for, e.g. 90 on an H100."""
    return triton.runtime.driver.active.get_current_target().arch


@functools.cache
def _tuned_table() -> dict:
    return json.loads(TUNED_TABLE.read_text()) if TUNED_TABLE.exists() else {}


def tile_name(config: triton.Config) -> str:
    tile = config.kwargs
    return (f"{tile['BLOCK_M']}x{tile['BLOCK_N']}x{tile['BLOCK_K']} g{tile['GROUP_M']} w{config.num_warps} "
            f"s{config.num_stages}")


def parse_tile(name: str) -> triton.Config:
    """The inverse of tile_name; a ValueError naming the text if it is not one."""
    try:
        blocks, group, warps, stages = name.split()
        block_m, block_n, block_k = (int(b) for b in blocks.split("x"))
        if (group[0], warps[0], stages[0]) != ("g", "w", "s"):
            raise ValueError
        kwargs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": int(group[1:])}
        return triton.Config(kwargs, num_warps=int(warps[1:]), num_stages=int(stages[1:]))
    except ValueError:
        raise ValueError(f"not a tile name like '128x128x64 g8 w8 s4': {name!r}") from None


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def tuned_keys(dtype: torch.dtype, rank_block: int, kind: str, bias: bool, dropout: bool, M: int, N: int, K: int):
    """(default key, shape key) of a launch in the table: kind "forward" or "input_grad"; the kernel's M (tokens,
    by power-of-two bucket), N (outputs) and K (the reduction), exact."""
    options = ("+bias" if bias else "") + ("+dropout" if dropout else "")
    variant = f"{_DTYPE_NAMES[dtype]}/r{rank_block}/{kind}{options}"
    return variant, f"{variant}/M{triton.next_power_of_2(M)}/N{N}/K{K}"


def _tuned_tile(dtype, rank_block, kind, bias, dropout, M, N, K) -> triton.Config | None:
    """The table's tile for this launch on the current GPU, or None (no entry, or one that does not fit)."""
    entry = _tuned_table().get(f"sm_{_current_arch()}")
    if not entry:
        return None
    default, shape = tuned_keys(dtype, rank_block, kind, bias, dropout, M, N, K)
    name = entry.get("shapes", {}).get(shape) or entry.get("default", {}).get(default)
    if name is None:
        return None
    tile = parse_tile(name)
    fits = _matmul_shared_bytes(tile, rank_block, dtype.itemsize) <= _shared_memory_limit()
    return tile if fits else None


def _shrink_config(rank_block: int, dtype: torch.dtype, tokens: int) -> dict:
    """The first fitting tile, its BLOCK_M halved while the launch would have too few programs. The shrink has no
    reduction across programs; the price of small token blocks is that every program reads all of A (from L2):
    r / BLOCK_M times the bytes of x in all, so BLOCK_M stays >= max(16, r / 2) (at most twice x's traffic)."""
    if _interpreting():
        return {"BLOCK_M": _INTERPRETER_BLOCK, "BLOCK_K": _INTERPRETER_BLOCK}
    config = dict(_fitting(_SHRINK_CONFIGS, _shrink_shared_bytes, rank_block, dtype)[0])
    smallest = max(16, rank_block // 2)
    while config["BLOCK_M"] > smallest and triton.cdiv(tokens, config["BLOCK_M"]) < _target_programs():
        config["BLOCK_M"] //= 2
    return config


def _grad_ab_config(rank_block: int, dtype: torch.dtype) -> dict:
    if _interpreting():
        return {"BLOCK_M": _INTERPRETER_BLOCK, "BLOCK_N": _INTERPRETER_BLOCK, "BLOCK_K": _INTERPRETER_BLOCK}
    return _fitting(_GRAD_AB_CONFIGS, _grad_ab_shared_bytes, rank_block, dtype)[0]


def _dropout_args(dropout_p: float, seed: torch.Tensor | None, fallback: torch.Tensor) -> dict:
    """Kernel arguments of the dropout mask. Without dropout the seed is never read and `fallback` stands in for it;
    placeholders like it are always inputs the kernel does not write, so that torch.compile's analysis of what a
    kernel mutates never sees one buffer both written and passed again."""
    return {
        "seed_ptr": seed if dropout_p > 0.0 else fallback,
        "keep_threshold": dropout_threshold(dropout_p),
        "APPLY_DROPOUT": dropout_p > 0.0,
    }


# ---------------------------------------------------------------------------------------------------------------
# Launchers: same signatures as their twins in reference.py. Every launch goes through `traceable` so that the
# launchers can be registered as torch.library triton_ops (ops.py), which torch.compile traces into.
# The dropout seed is a 0-d int64 tensor on the device (None without dropout) that the kernels load: no host
# sync, and a seed drawn inside a compiled graph or a CUDA graph stays in it.
# ---------------------------------------------------------------------------------------------------------------


@on_tensors_device
def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """S = dropout_p(x) @ A.T, (M, r) in x's dtype. x (M, K), lora_a (r, K)."""
    (M, K), R = x.shape, lora_a.shape[0]
    shrunk = torch.empty((M, R), device=x.device, dtype=x.dtype)
    if M == 0:
        return shrunk
    cfg = _shrink_config(_block_rank(R), x.dtype, M)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    traceable(_shrink_kernel)[grid](
        x, lora_a, shrunk,
        M=M, K=K, R=R,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_ar=lora_a.stride(0), stride_ak=lora_a.stride(1),
        stride_sm=shrunk.stride(0), stride_sr=shrunk.stride(1),
        inv_keep=1.0 / (1.0 - dropout_p),
        BLOCK_R=_block_rank(R), DOT_PRECISION=_dot_precision(x.dtype),
        **_dropout_args(dropout_p, seed, x), **cfg,
    )
    return shrunk


def _fused_matmul(lhs, rhs_t, low, up_t, low_scale, bias, dropout_p, seed, kind):
    """out = lhs @ rhs_t.T + low_scale * mask(low @ up_t.T) + bias, where rhs_t (N, K) and up_t (N, R); kind names
    the launch in the tuned table ("forward" or "input_grad")."""
    (M, K), N, R = lhs.shape, rhs_t.shape[0], low.shape[1]
    out = torch.empty((M, N), device=lhs.device, dtype=lhs.dtype)
    if M == 0 or N == 0:
        return out
    args = dict(
        lhs_ptr=lhs, rhs_ptr=rhs_t, low_ptr=low, up_ptr=up_t, bias_ptr=bias if bias is not None else lhs, out_ptr=out,
        M=M, N=N, K=K, R=R,
        stride_lm=lhs.stride(0), stride_lk=lhs.stride(1),
        stride_rk=rhs_t.stride(1), stride_rn=rhs_t.stride(0),
        stride_wm=low.stride(0), stride_wr=low.stride(1),
        stride_ur=up_t.stride(1), stride_un=up_t.stride(0),
        stride_om=out.stride(0), stride_on=out.stride(1),
        stride_bias=bias.stride(0) if bias is not None else 0,
        low_scale=float(low_scale), HAS_BIAS=bias is not None,
        BLOCK_R=_block_rank(R), DOT_PRECISION=_dot_precision(lhs.dtype), **_dropout_args(dropout_p, seed, lhs),
    )
    if _interpreting():
        block = _INTERPRETER_BLOCK
        grid = (triton.cdiv(M, block) * triton.cdiv(N, block),)
        traceable(_fused_matmul_kernel)[grid](**args, BLOCK_M=block, BLOCK_N=block, BLOCK_K=block, GROUP_M=4)
    else:
        tiles = _fitting(_MATMUL_CONFIGS, _matmul_shared_bytes, args["BLOCK_R"], lhs.dtype)
        choice = _tile_choice()
        tile = tiles[0] if choice == "fixed" else None
        if choice == "table":
            tile = _tuned_tile(lhs.dtype, args["BLOCK_R"], kind, bias is not None, args["APPLY_DROPOUT"], M, N, K)
        if tile is None:
            def grid(cfg):
                return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)

            traceable(_autotuned_matmul(tuple(tiles[:_AUTOTUNED_TILES])))[grid](**args)
        else:
            grid = (triton.cdiv(M, tile.kwargs["BLOCK_M"]) * triton.cdiv(N, tile.kwargs["BLOCK_N"]),)
            traceable(_fused_matmul_kernel)[grid](**args, **tile.kwargs, num_warps=tile.num_warps,
                                                  num_stages=tile.num_stages)
    return out


@on_tensors_device
def lora_forward_matmul(x: torch.Tensor, weight: torch.Tensor, shrunk: torch.Tensor, lora_b: torch.Tensor,
                        scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W.T + bias + s * S @ B.T, (M, N) in x's dtype; the low-rank term seeds the accumulator."""
    return _fused_matmul(x, weight, shrunk, lora_b, scale, bias, 0.0, None, "forward")


@on_tensors_device
def lora_input_grad(grad_y: torch.Tensor, weight: torch.Tensor, grad_shrunk: torch.Tensor, lora_a: torch.Tensor,
                    dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """dx = dy @ W + (dS @ A) * m / (1-p), (M, K) in dy's dtype; the masked low-rank term seeds the accumulator."""
    return _fused_matmul(grad_y, weight.T, grad_shrunk, lora_a.T, 1.0 / (1.0 - dropout_p), None, dropout_p, seed,
                         "input_grad")


@on_tensors_device
def lora_grad_ab(grad_y: torch.Tensor, x: torch.Tensor, shrunk: torch.Tensor, lora_b: torch.Tensor, scale: float,
                 dropout_p: float, seed: torch.Tensor | None, need_bias_grad: bool,
                 deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dA, dB, dS, dbias) from two launches that read dy and x once each, in x's dtype (reduced in fp32, rounded
    once); dbias is an empty (0,) tensor unless `need_bias_grad` (a registered op cannot return None).

    Programs own a block of tokens and a share of the N (then K) chunks. Their partial sums are reduced by fp32
    atomics into zeroed buffers, or, when `deterministic`, written to their own slices and summed in a fixed order
    (bit-identical run to run on one GPU model, at the cost of token_blocks x (N + K) x r x 4 bytes of scratch).
    """
    (M, K), N, R = x.shape, grad_y.shape[1], lora_b.shape[1]
    cfg = _grad_ab_config(_block_rank(R), x.dtype)
    block_m, block_n, block_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    launch = {key: cfg[key] for key in ("num_warps", "num_stages") if key in cfg}
    token_blocks = triton.cdiv(M, block_m)
    n_shares, n_chunks_per_share = _shares(token_blocks, triton.cdiv(N, block_n))
    k_shares, k_chunks_per_share = _shares(token_blocks, triton.cdiv(K, block_k))
    slots = max(token_blocks, 1) if deterministic else 1
    dev = x.device
    grad_a = torch.zeros((slots, R, K), device=dev, dtype=torch.float32)
    grad_b = torch.zeros((slots, N, R), device=dev, dtype=torch.float32)
    grad_bias = torch.zeros((slots, N if need_bias_grad else 0), device=dev, dtype=torch.float32)
    ds_partial = torch.zeros((n_shares if deterministic else 1, M, R), device=dev, dtype=torch.float32)
    grad_shrunk = torch.empty((M, R), device=dev, dtype=x.dtype)
    common = dict(DETERMINISTIC=deterministic, BLOCK_M=block_m, BLOCK_R=_block_rank(R),
                  DOT_PRECISION=_dot_precision(x.dtype), **launch)
    if token_blocks > 0:
        traceable(_grad_b_kernel)[(token_blocks, n_shares)](
            grad_y, shrunk, lora_b, ds_partial, grad_b, grad_bias if need_bias_grad else grad_y,
            M=M, N=N, R=R,
            stride_dym=grad_y.stride(0), stride_dyn=grad_y.stride(1),
            stride_sm=shrunk.stride(0), stride_sr=shrunk.stride(1),
            stride_bn=lora_b.stride(0), stride_br=lora_b.stride(1),
            stride_ds_slot=ds_partial.stride(0), stride_ds_m=ds_partial.stride(1), stride_ds_r=ds_partial.stride(2),
            stride_db_slot=grad_b.stride(0), stride_db_n=grad_b.stride(1), stride_db_r=grad_b.stride(2),
            stride_dbias_slot=grad_bias.stride(0),
            scale=float(scale), chunks_per_share=n_chunks_per_share,
            HAS_BIAS_GRAD=need_bias_grad, BLOCK_N=block_n, **common,
        )
        dropout = _dropout_args(dropout_p, seed, x)
        traceable(_grad_a_kernel)[(token_blocks, k_shares)](
            x, ds_partial, grad_shrunk, grad_a, dropout["seed_ptr"],
            M=M, K=K, R=R, DS_SLOTS=ds_partial.shape[0],
            stride_xm=x.stride(0), stride_xk=x.stride(1),
            stride_dsp_slot=ds_partial.stride(0), stride_dsp_m=ds_partial.stride(1),
            stride_dsp_r=ds_partial.stride(2),
            stride_dsm=grad_shrunk.stride(0), stride_dsr=grad_shrunk.stride(1),
            stride_da_slot=grad_a.stride(0), stride_da_r=grad_a.stride(1), stride_da_k=grad_a.stride(2),
            scale=float(scale), keep_threshold=dropout["keep_threshold"], inv_keep=1.0 / (1.0 - dropout_p),
            chunks_per_share=k_chunks_per_share, APPLY_DROPOUT=dropout["APPLY_DROPOUT"], BLOCK_K=block_k, **common,
        )
    grad_a, grad_b, grad_bias = (_reduce_splits(t, x.dtype) for t in (grad_a, grad_b, grad_bias))
    return grad_a, grad_b, grad_shrunk, grad_bias


def _reduce_splits(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum the per-program partials (a fixed-order torch reduction) and round once into `dtype`."""
    total = partials[0] if partials.shape[0] == 1 else partials.sum(0)
    return total.to(dtype)

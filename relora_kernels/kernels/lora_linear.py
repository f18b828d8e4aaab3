"""Triton kernels of the fused LoRA linear and their launchers.

The math (docs/DESIGN.md section 1; x (M, K), W (N, K), A (r, K), B (N, r), s the scale, p the dropout):

    x~ = dropout_p(x)                          mask m from (seed, m, k), scaled by 1/(1-p)
    S  = x~ @ A.T                              _shrink_kernel            (lora_shrink)
    y  = x @ W.T + bias + s * S @ B.T          _fused_matmul_kernel      (fused_matmul)
    dS = s * dy @ B;  dB = s * dy.T @ S;       _grad_b_kernel            (lora_grad_ab: dy and x are each
    dbias = dy.sum(0)                                                     read once, by programs that split
    dA = dS.T @ x~                             _grad_a_kernel             the tokens and the N / K columns)
    dx = dy @ W + (dS @ A) * m / (1-p)         _fused_matmul_kernel      (fused_matmul)

FP8 frozen GEMMs (docs/DESIGN.md section 2; the rule is reference.quantize_fp8_rows, one power-of-two scale per row):

    xq, sx   = quantize_fp8_rows(x)                           _shrink_kernel, QUANTIZE        (lora_shrink_quantize)
    y        = (xq @ wq.T) * sx sw + s * S @ B.T + bias       _fused_matmul_kernel, FP8       (fused_matmul_fp8)
    dyq, sdy = quantize_fp8_rows(dy)                          _grad_b_kernel, ROW_AMAX, then  (lora_grad_ab_quantize)
                                                              _quantize_rows_kernel, HAS_AMAX
    dx       = (dyq @ wtq.T) * sdy swt + mask(dS @ A) / (1-p) _fused_matmul_kernel, FP8       (fused_matmul_fp8)
    wq, sw   = quantize_fp8_rows(W);  wtq, swt of W.T         _quantize_rows_kernel           (quantize_rows_fp8)

The fused GEMM starts its fp32 accumulator from the low-rank term (plus bias) and then runs the ordinary K loop,
so the LoRA branch costs no extra read or write of the (M, N) output. The dropout mask is never stored: every
kernel that needs it regenerates it from Philox keyed by the seed, one draw per four neighbouring elements of a row
of the (M, K) view of x (jit_helpers.keep_mask). `reference.py` reproduces the same stream, so the reference drops
the same elements.

Launchers take 2-D tensors that `functional.py` has already validated (same dtype and device, matching shapes)
and accept any strides. Limits: r <= `_validate.MAX_RANK` (the low-rank tiles live in registers). The fused GEMM's
launcher takes its tile as given: `passes.py` chooses it (or the Hopper kernel of `fused_gemm_tma.py`) and the
engine of each pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..random_stream import dropout_threshold
from . import policy
from .jit_helpers import grouped_tile, keep_mask
from .launch import (
    TRACEABLE_LAUNCHES,
    LaunchSite,
    cdiv,
    dot_precision,
    launch_options,
    on_tensors_device,
    remember,
    static_ints,
    traceable,
)


@triton.jit
def _load_tile(ptr, rows, cols, stride_rows, stride_cols, mask_rows, mask_cols):
    """The (rows, cols) tile of a strided matrix, zero outside the masks."""
    return tl.load(ptr + rows[:, None] * stride_rows + cols[None, :] * stride_cols,
                   mask=mask_rows[:, None] & mask_cols[None, :], other=0.0)


@triton.jit
def _column_chunk(col_start, col_end, BLOCK: tl.constexpr):
    """(columns in int64, their mask) of the chunk [col_start, col_start + BLOCK), clipped at col_end."""
    offs = col_start + tl.arange(0, BLOCK)
    return offs.to(tl.int64), offs < col_end


# ---------------------------------------------------------------------------------------------------------------
# FP8 (e4m3) row quantisation, bit for bit reference.quantize_fp8_rows:
#   scale = the smallest power of two s >= 2**-63 with amax / s <= 448, from the bits of the row's amax
#   q     = (t * 2**-e) rounded to nearest-even into e4m3, s = 2**e
# Everything is done on the fp32 bits with integer operations: the amax as the integer max of |t|'s bits (the same
# order for non-negative floats, NaN above infinity), the scale from its exponent and mantissa, and the rounding to
# e4m3's 3 mantissa bits, after which the cast to float8e4nv only converts an exactly representable value. Why round
# by hand: Triton's interpreter casts fp32 to float8e4nv wrongly where rounding carries into the exponent (1.962 ->
# 1.0), and a GPU's cvt.rn.satfinite of a representable value is exact, so both agree with the reference this way.
# Multiplying by 2**-e rather than dividing by 2**e: the same correctly rounded value, where Triton's fp32 division
# on a GPU is an approximate one.
# ---------------------------------------------------------------------------------------------------------------

_FP32_ABS_BITS = tl.constexpr(0x7FFFFFFF)
_FP32_INF_BITS = tl.constexpr(0x7F800000)
_FP32_NAN_BITS = tl.constexpr(0x7FC00000)
_FP32_MANTISSA = tl.constexpr(0x7FFFFF)
_FP32_IMPLICIT_BIT = tl.constexpr(0x800000)
_FP32_BIAS = tl.constexpr(127)
_E4M3_MAX_BITS = tl.constexpr(0x43E00000)  # 448.0 = 1.75 * 2**8, e4m3fn's largest finite value
_E4M3_MAX_MANTISSA = tl.constexpr(0x600000)  # amax mantissas above 448's need the next power of two
_E4M3_MAX_EXPONENT = tl.constexpr(8)
_E4M3_MIN_EXPONENT = tl.constexpr(-6)  # the smallest normal; below it the step stays 2**-9
_E4M3_DROPPED_BITS = tl.constexpr(20)  # fp32's 23 mantissa bits less e4m3's 3
_MIN_SCALE_EXPONENT = tl.constexpr(-63)  # reference.FP8_MIN_SCALE_EXPONENT
_E4M3_NAN_BITS = tl.constexpr(0x7F)  # e4m3fn's NaN, what torch's cast of a NaN gives


@triton.jit
def _abs_bits(tile):
    """The int32 bits of |tile| (fp32), every NaN as the one quiet NaN: ordered as the magnitudes are."""
    bits = tile.to(tl.int32, bitcast=True) & _FP32_ABS_BITS
    return tl.where(bits > _FP32_INF_BITS, _FP32_NAN_BITS, bits)


@triton.jit
def _row_amax_bits(tile):
    """(rows,) int32: the bits of each row's largest magnitude (0 for masked-out elements loaded as 0)."""
    return tl.max(_abs_bits(tile.to(tl.float32)), axis=1)


@triton.jit
def _fp8_scale_exponent(amax_bits):
    """e of the row scale 2**e, reference.fp8_scale's rule on the bits of amax (int32, non-negative)."""
    exponent = (amax_bits >> 23) - _FP32_BIAS
    above = ((amax_bits & _FP32_MANTISSA) > _E4M3_MAX_MANTISSA).to(tl.int32)
    return tl.maximum(exponent - _E4M3_MAX_EXPONENT + above, _MIN_SCALE_EXPONENT)


@triton.jit
def _power_of_two(exponent):
    """2.0**exponent in fp32, built from its bits (exponent a normal one, int32)."""
    return ((exponent + _FP32_BIAS) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _round_to_e4m3(value):
    """fp32 `value` (already divided by its scale) clamped to +-448 and rounded to nearest-even onto e4m3's grid,
    still in fp32 (NaN is not, see _quantize_tile); the sign of a zero is kept."""
    bits = value.to(tl.int32, bitcast=True)
    magnitude = tl.minimum(bits & _FP32_ABS_BITS, _E4M3_MAX_BITS)  # ints ordered as floats: the clamp to 448
    sign = bits ^ (bits & _FP32_ABS_BITS)
    exponent = (magnitude >> 23) - _FP32_BIAS
    # The grid's step is 2**(max(exponent, -6) - 3): drop that many low bits of the 24-bit significand, rounding to
    # nearest-even. Below 2**-10 everything rounds to zero, so the shift stops at 25 (an fp32 zero or subnormal,
    # whose significand this counts with the implicit bit, also goes to zero there).
    # The tensor comes first: no module constant on the left inside a call's arguments (tests/test_kernel_source.py).
    normal_exponent = tl.maximum(exponent, _E4M3_MIN_EXPONENT)
    shift = tl.minimum(normal_exponent - exponent + _E4M3_DROPPED_BITS, 25)
    significand = (magnitude & _FP32_MANTISSA) | _FP32_IMPLICIT_BIT
    steps = (significand + (1 << (shift - 1)) - 1 + ((significand >> shift) & 1)) >> shift
    step = _power_of_two(normal_exponent - 3)
    rounded = (steps.to(tl.float32) * step).to(tl.int32, bitcast=True) | sign  # at most 16 steps: exact
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def _quantize_tile(tile, inv_scale):
    """The e4m3 tile of `tile` (any float) scaled by its rows' 2**-e (inv_scale, (rows,) fp32). NaN becomes e4m3's
    NaN 0x7F, from its bits, because the interpreter casts an fp32 NaN to a finite value."""
    value = tile.to(tl.float32) * inv_scale[:, None]
    q = _round_to_e4m3(value).to(tl.float8e4nv)
    return tl.where(value != value, tl.full(q.shape, _E4M3_NAN_BITS, tl.int8).to(tl.float8e4nv, bitcast=True), q)


@triton.jit
def _store_rows_fp8(t_ptr, q_ptr, scale_ptr, amax_bits, rows, mask_m, N, stride_tm, stride_tn, stride_qm, stride_qn,
                    BLOCK_N: tl.constexpr):
    """Rows `rows` of t (.., N) in e4m3 into q, and their scales 2**e into scale_ptr, from the bits of each row's
    amax (the rule of reference.quantize_fp8_rows): one more pass over the rows, the scale applied as an exact
    multiplication by 2**-e."""
    scale_exponent = _fp8_scale_exponent(amax_bits)
    tl.store(scale_ptr + rows, _power_of_two(scale_exponent), mask=mask_m)
    inv_scale = _power_of_two(-scale_exponent)
    for n0 in range(0, N, BLOCK_N):
        cols, mask_n = _column_chunk(n0, N, BLOCK_N)
        tile = _load_tile(t_ptr, rows, cols, stride_tm, stride_tn, mask_m, mask_n)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :] * stride_qn, _quantize_tile(tile, inv_scale),
                 mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------------------------
# fwd 1: S = dropout(x) @ A.T
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _shrink_kernel(
    x_ptr,  # (M, K)
    a_ptr,  # (R, K)
    s_ptr,  # (M, R) output
    seed_ptr,  # () int64 dropout seed, read only when APPLY_DROPOUT
    b_ptr,  # (N, R), read only when EXPAND
    bias_ptr,  # (N,), read only when EXPAND and HAS_BIAS
    out_ptr,  # (M, N) output when EXPAND: scale * S @ B.T + bias, which cuBLAS then accumulates x @ W.T onto
    xq_ptr,  # (M, K) e4m3 output when QUANTIZE: x quantised by rows (of x itself, not of the dropped x~)
    sx_ptr,  # (M,) fp32 output when QUANTIZE: the row scales
    M, K, R, N,
    stride_xm, stride_xk,
    stride_ar, stride_ak,
    stride_sm, stride_sr,
    stride_bn, stride_br,
    stride_bias,
    stride_om, stride_on,
    stride_xqm, stride_xqk,
    scale, keep_threshold, inv_keep,
    APPLY_DROPOUT: tl.constexpr, EXPAND: tl.constexpr, HAS_BIAS: tl.constexpr, QUANTIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)  # M * stride can pass 2**31
    mask_m = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    if APPLY_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    amax_bits = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols, mask_k = _column_chunk(k0, K, BLOCK_K)
        x_tile = _load_tile(x_ptr, rows, cols, stride_xm, stride_xk, mask_m, mask_k)
        if QUANTIZE:
            amax_bits = tl.maximum(amax_bits, _row_amax_bits(x_tile))
        if APPLY_DROPOUT:
            keep = keep_mask(seed, rows, k0, K, keep_threshold, BLOCK_M, BLOCK_K)
            x_tile = tl.where(keep, x_tile, tl.zeros_like(x_tile))
        a_tile = tl.load(  # (BLOCK_K, BLOCK_R) tile of A.T
            a_ptr + offs_r[None, :] * stride_ar + cols[:, None] * stride_ak,
            mask=(offs_r[None, :] < R) & mask_k[:, None], other=0.0,
        )
        acc = tl.dot(x_tile, a_tile, acc, input_precision=DOT_PRECISION)
    if APPLY_DROPOUT:
        acc = acc * tl.cast(inv_keep, tl.float32)  # the 1/(1-p) of every kept element, applied once
    shrunk = acc.to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr, shrunk,
             mask=mask_m[:, None] & (offs_r[None, :] < R))

    if QUANTIZE:
        # The FP8 forward's xq and sx: the row amax came with the first pass; a second pass over the same block of
        # x writes it in e4m3 (a read from L2 where the block is still there: 64 rows of 4096 16-bit values are
        # 512 KiB per program, so not all of it, predicted, not measured).
        _store_rows_fp8(x_ptr, xq_ptr, sx_ptr, amax_bits, rows, mask_m, K, stride_xm, stride_xk, stride_xqm,
                        stride_xqk, BLOCK_K)

    if EXPAND:
        # The cuBLAS-composed engine's start value, from S as stored (in x's dtype, as the fused GEMM reads it).
        for n0 in range(0, N, BLOCK_K):
            out_cols, mask_n = _column_chunk(n0, N, BLOCK_K)
            b_tile = tl.load(  # (BLOCK_R, BLOCK_K) tile of B.T
                b_ptr + offs_r[:, None] * stride_br + out_cols[None, :] * stride_bn,
                mask=(offs_r[:, None] < R) & mask_n[None, :], other=0.0,
            )
            start = tl.dot(shrunk, b_tile, input_precision=DOT_PRECISION) * tl.cast(scale, tl.float32)
            if HAS_BIAS:
                start += tl.load(bias_ptr + out_cols * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + rows[:, None] * stride_om + out_cols[None, :] * stride_on,
                     start.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------------------------
# fwd 2 and bwd 2: out = lhs @ rhs + low_scale * mask(low @ up) + bias, the low-rank term as accumulator init
#   forward:  y  = x  @ W.T + s * (S @ B.T) + bias        (lhs = x,  rhs = W.T, low = S,  up = B.T, no mask)
#   backward: dx = dy @ W   + mask(dS @ A) / (1-p)         (lhs = dy, rhs = W,   low = dS, up = A)
# The transposes are strides, never copies.
# FP8 (frozen W kept as e4m3 copies, docs/DESIGN.md section 2): lhs and rhs are e4m3 quantised by rows of lhs and by
# columns of rhs (rows of W, resp. of W.T), and
#   out = (lhs_q @ rhs_q) * lhs_scale[:, None] * rhs_scale[None, :] + low_scale * mask(low @ up) + bias
# with the low-rank term added after the K loop, in out's dtype operands.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _low_rank_term(
    low_ptr, up_ptr, bias_ptr, seed_ptr,
    rows, cols, offs_r, mask_m, mask_n, col_start, N, R,
    stride_low_m, stride_low_r, stride_ur, stride_un, stride_bias,
    low_scale, keep_threshold,
    HAS_BIAS: tl.constexpr, APPLY_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """low_scale * mask(low @ up) + bias on the output tile rows x cols (columns from col_start), in fp32."""
    low_tile = tl.load(
        low_ptr + rows[:, None] * stride_low_m + offs_r[None, :] * stride_low_r,
        mask=mask_m[:, None] & (offs_r[None, :] < R), other=0.0,
    )
    up_tile = tl.load(
        up_ptr + offs_r[:, None] * stride_ur + cols[None, :] * stride_un,
        mask=(offs_r[:, None] < R) & mask_n[None, :], other=0.0,
    )
    term = tl.dot(low_tile, up_tile, input_precision=DOT_PRECISION) * tl.cast(low_scale, tl.float32)
    if APPLY_DROPOUT:
        keep = keep_mask(tl.load(seed_ptr), rows, col_start, N, keep_threshold, BLOCK_M, BLOCK_N)
        term = tl.where(keep, term, 0.0)
    if HAS_BIAS:
        term += tl.load(bias_ptr + cols * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return term


@triton.jit
def _fused_matmul_kernel(
    lhs_ptr,  # (M, K), e4m3 when FP8
    rhs_ptr,  # (K, N), e4m3 when FP8
    low_ptr,  # (M, R)
    up_ptr,  # (R, N)
    bias_ptr,  # (N,), read only when HAS_BIAS
    out_ptr,  # (M, N) output
    seed_ptr,  # () int64 dropout seed, read only when APPLY_DROPOUT
    lhs_scale_ptr,  # (M,) fp32 row scales of lhs, read only when FP8
    rhs_scale_ptr,  # (N,) fp32 column scales of rhs, read only when FP8
    M, N, K, R,
    stride_lm, stride_lk,
    stride_rk, stride_rn,
    stride_low_m, stride_low_r,
    stride_ur, stride_un,
    stride_om, stride_on,
    stride_bias,
    stride_lhs_scale, stride_rhs_scale,
    low_scale, keep_threshold,
    HAS_BIAS: tl.constexpr, APPLY_DROPOUT: tl.constexpr, FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N

    if FP8:
        # The FP8 GEMM sums lhs_q @ rhs_q from zero and adds the low-rank term after scaling (below). Starting from
        # term / (lhs_scale * rhs_scale) instead would be exact too with power-of-two scales, but overflows fp32
        # where both scales are near their floor of 2**-63 (rows of zeros) while the term is not small.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        # Accumulator init: low_scale * (low @ up), masked by dropout, plus bias.
        acc = _low_rank_term(low_ptr, up_ptr, bias_ptr, seed_ptr, rows, cols, offs_r, mask_m, mask_n,
                             pid_n * BLOCK_N, N, R, stride_low_m, stride_low_r, stride_ur, stride_un, stride_bias,
                             low_scale, keep_threshold, HAS_BIAS, APPLY_DROPOUT, BLOCK_M, BLOCK_N, DOT_PRECISION)

    # The ordinary K loop of lhs @ rhs; the pointer steps in int64, as a transposed operand's stride is M or N.
    lhs_ptrs = lhs_ptr + rows[:, None] * stride_lm + tl.arange(0, BLOCK_K)[None, :] * stride_lk
    rhs_ptrs = rhs_ptr + tl.arange(0, BLOCK_K)[:, None] * stride_rk + cols[None, :] * stride_rn
    lhs_step = tl.cast(stride_lk, tl.int64) * BLOCK_K
    rhs_step = tl.cast(stride_rk, tl.int64) * BLOCK_K
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        lhs_tile = tl.load(lhs_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        rhs_tile = tl.load(rhs_ptrs, mask=(offs_k[:, None] < K) & mask_n[None, :], other=0.0)
        if FP8:
            # On sm_90 an FP8 wgmma sums into an accumulator of fewer bits than fp32 (Triton's default there never
            # leaves it: "fast accumulation"); max_num_imprecise_acc=BLOCK_K adds each K step's sum into the fp32
            # accumulator. 0 (promote always) would make Triton give up wgmma and multiply in fp16 on mma.sync.
            acc = tl.dot(lhs_tile, rhs_tile, acc, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = tl.dot(lhs_tile, rhs_tile, acc, input_precision=DOT_PRECISION)
        lhs_ptrs += lhs_step
        rhs_ptrs += rhs_step

    if FP8:
        # Dequantise: two powers of two, applied one at a time, so exact wherever the result is within fp32's range.
        lhs_scale = tl.load(lhs_scale_ptr + rows * stride_lhs_scale, mask=mask_m, other=1.0)
        rhs_scale = tl.load(rhs_scale_ptr + cols * stride_rhs_scale, mask=mask_n, other=1.0)
        acc = acc * lhs_scale[:, None] * rhs_scale[None, :]
        acc += _low_rank_term(low_ptr, up_ptr, bias_ptr, seed_ptr, rows, cols, offs_r, mask_m, mask_n,
                              pid_n * BLOCK_N, N, R, stride_low_m, stride_low_r, stride_ur, stride_un, stride_bias,
                              low_scale, keep_threshold, HAS_BIAS, APPLY_DROPOUT, BLOCK_M, BLOCK_N, DOT_PRECISION)

    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


# ---------------------------------------------------------------------------------------------------------------
# bwd 1: dS, dB, dA (and dbias) in two launches that read dy and x once each. A program owns a block of tokens and a
# split (a contiguous run) of the N (or K) chunks, so that short inputs still give the GPU enough programs (one
# program per token block alone would be M / 64: 32 programs for 2048 tokens on an H100's 132 SMs).
#   _grad_b_kernel (token block, N split):  dS_partial = dy @ B over its N split;  dB += s * dy.T @ S;  dbias
#   _grad_a_kernel (token block, K split):  dS = s * sum of the dS partials;       dA += dS.T @ x~
# Reductions over tokens (dB, dA, dbias) and over the N splits (dS) go through _accumulate.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _accumulate(ptrs, value, mask, DETERMINISTIC: tl.constexpr):
    """Add a program's partial into a reduction buffer: its own slice (deterministic) or fp32 atomics."""
    if DETERMINISTIC:
        tl.store(ptrs, value, mask=mask)
    else:
        tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")


@triton.jit
def _token_rows_and_ranks(M, R, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """(rows, row mask, ranks, rank mask) of a gradient program: its block of tokens (axis 0 of the grid; rows in
    int64 because M * stride can pass 2**31) and the padded rank offsets."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    return offs_m.to(tl.int64), offs_m < M, offs_r, offs_r < R


@triton.jit
def _split_columns(split, cols, chunks_per_split, BLOCK: tl.constexpr):
    """[start, end) of the columns (of N or K) that split `split` (axis 1 of the grid) reduces over."""
    start = split * chunks_per_split * BLOCK
    return start, min(cols, start + chunks_per_split * BLOCK)


@triton.jit
def _token_block_partial(DETERMINISTIC: tl.constexpr):
    """Which partial-sum slice of a reduction buffer this program adds into: its token block's own (deterministic),
    else the single shared one that the atomics go to. int64, as partial * stride can pass 2**31."""
    return tl.program_id(0).to(tl.int64) if DETERMINISTIC else 0


@triton.jit
def _grad_b_kernel(
    dy_ptr,  # (M, N)
    s_ptr,  # (M, R) the forward's S
    b_ptr,  # (N, R)
    ds_ptr,  # (N splits, M, R) fp32 output: dy @ B partials, one per N split (a single one with atomics)
    db_ptr,  # (token blocks, N, R) fp32 output: dB partials, one per token block (a single one with atomics)
    dbias_ptr,  # (token blocks, N) fp32 output: dbias partials, written only when HAS_BIAS_GRAD
    dy_amax_ptr,  # (M,) int32, zeroed: the bits of each row's amax of dy, by atomic max, only when ROW_AMAX
    M, N, R,
    stride_dym, stride_dyn,
    stride_sm, stride_sr,
    stride_bn, stride_br,
    stride_ds_partial, stride_ds_m, stride_ds_r,
    stride_db_partial, stride_db_n, stride_db_r,
    stride_dbias_partial,
    scale, chunks_per_split,
    HAS_BIAS_GRAD: tl.constexpr, DETERMINISTIC: tl.constexpr, ROW_AMAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(1)
    rows, mask_m, offs_r, mask_r = _token_rows_and_ranks(M, R, BLOCK_M, BLOCK_R)
    partial = _token_block_partial(DETERMINISTIC)
    scale = tl.cast(scale, tl.float32)  # float scalars may arrive as fp64 (torch.compile)
    s_tile = _load_tile(s_ptr, rows, offs_r, stride_sm, stride_sr, mask_m, mask_r)

    # dy is read once, feeding dS (reduced here over this split of N) and dB (reduced over tokens).
    n_start, n_end = _split_columns(split, N, chunks_per_split, BLOCK_N)
    ds_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    amax_bits = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols, mask_n = _column_chunk(n0, n_end, BLOCK_N)
        dy_tile = _load_tile(dy_ptr, rows, cols, stride_dym, stride_dyn, mask_m, mask_n)
        if ROW_AMAX:
            amax_bits = tl.maximum(amax_bits, _row_amax_bits(dy_tile))
        b_tile = _load_tile(b_ptr, cols, offs_r, stride_bn, stride_br, mask_n, mask_r)
        # dS += dy @ B   (s applied once, by _grad_a_kernel)
        ds_acc = tl.dot(dy_tile, b_tile, ds_acc, input_precision=DOT_PRECISION)
        # dB += s * dy.T @ S
        db_part = tl.dot(tl.trans(dy_tile), s_tile, input_precision=DOT_PRECISION) * scale
        _accumulate(
            db_ptr + partial * stride_db_partial + cols[:, None] * stride_db_n + offs_r[None, :] * stride_db_r,
            db_part, mask_n[:, None] & mask_r[None, :], DETERMINISTIC,
        )
        if HAS_BIAS_GRAD:
            # dbias += dy.sum(0)
            _accumulate(
                dbias_ptr + partial * stride_dbias_partial + cols,
                tl.sum(dy_tile.to(tl.float32), axis=0), mask_n, DETERMINISTIC,
            )
    if ROW_AMAX:
        # A program sees its split of each row: the splits meet in one int32 per row. A max of the bits is exact
        # and independent of the order, so this is deterministic in either mode.
        tl.atomic_max(dy_amax_ptr + rows, amax_bits, mask=mask_m, sem="relaxed")
    ds_partial = split.to(tl.int64) if DETERMINISTIC else 0  # each N split its own dS partial
    _accumulate(
        ds_ptr + ds_partial * stride_ds_partial + rows[:, None] * stride_ds_m + offs_r[None, :] * stride_ds_r,
        ds_acc, mask_m[:, None] & mask_r[None, :], DETERMINISTIC,
    )


@triton.jit
def _grad_a_kernel(
    x_ptr,  # (M, K)
    ds_partial_ptr,  # (num_ds_partials, M, R) fp32: _grad_b_kernel's dy @ B partials
    ds_ptr,  # (M, R) output dS, in x's dtype, unless WRITE_DX
    da_ptr,  # (token blocks, R, K) fp32 output: dA partials, one per token block (a single one with atomics)
    seed_ptr,  # () int64 dropout seed, read only when APPLY_DROPOUT
    a_ptr,  # (R, K), read only when WRITE_DX
    dx_ptr,  # (M, K) output when WRITE_DX: mask(dS @ A) / (1-p), which cuBLAS then accumulates dy @ W onto
    M, K, R, num_ds_partials,
    stride_xm, stride_xk,
    stride_dsp_partial, stride_dsp_m, stride_dsp_r,
    stride_dsm, stride_dsr,
    stride_da_partial, stride_da_r, stride_da_k,
    stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    scale, keep_threshold, inv_keep, chunks_per_split,
    APPLY_DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr, WRITE_DX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(1)
    rows, mask_m, offs_r, mask_r = _token_rows_and_ranks(M, R, BLOCK_M, BLOCK_R)
    partial = _token_block_partial(DETERMINISTIC)
    mask_mr = mask_m[:, None] & mask_r[None, :]

    # dS = s * (sum of the N splits' partials), in a fixed order.
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    ds_ptrs = ds_partial_ptr + rows[:, None] * stride_dsp_m + offs_r[None, :] * stride_dsp_r
    for ds_partial in range(0, num_ds_partials):
        ds += tl.load(ds_ptrs + tl.cast(ds_partial, tl.int64) * stride_dsp_partial, mask=mask_mr, other=0.0)
    ds = ds * tl.cast(scale, tl.float32)
    if not WRITE_DX:  # with dx's start written here (the cuBLAS-composed engine) nothing reads dS afterwards
        if split == 0:
            tl.store(ds_ptr + rows[:, None] * stride_dsm + offs_r[None, :] * stride_dsr,
                     ds.to(ds_ptr.dtype.element_ty), mask=mask_mr)
    # dS enters dA (and the dx term) in the input dtype, as it would in the eager computation.
    ds_rounded = ds.to(x_ptr.dtype.element_ty)
    ds_t = tl.trans(ds_rounded)
    if APPLY_DROPOUT:
        seed = tl.load(seed_ptr)

    # x is read once; dA = dS.T @ x~ with the dropout mask regenerated, not loaded.
    k_start, k_end = _split_columns(split, K, chunks_per_split, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols, mask_k = _column_chunk(k0, k_end, BLOCK_K)
        x_tile = _load_tile(x_ptr, rows, cols, stride_xm, stride_xk, mask_m, mask_k)
        if APPLY_DROPOUT:
            keep = keep_mask(seed, rows, k0, K, keep_threshold, BLOCK_M, BLOCK_K)
            x_tile = tl.where(keep, x_tile, tl.zeros_like(x_tile))
        # dA += dS.T @ x~
        da_part = tl.dot(ds_t, x_tile, input_precision=DOT_PRECISION)
        if APPLY_DROPOUT:
            da_part = da_part * tl.cast(inv_keep, tl.float32)
        _accumulate(
            da_ptr + partial * stride_da_partial + offs_r[:, None] * stride_da_r + cols[None, :] * stride_da_k,
            da_part, mask_r[:, None] & mask_k[None, :], DETERMINISTIC,
        )
        if WRITE_DX:
            # dx's start: mask(dS @ A) / (1-p) for this block of tokens and columns, with the mask already made.
            a_tile = _load_tile(a_ptr, offs_r, cols, stride_ar, stride_ak, mask_r, mask_k)
            start = tl.dot(ds_rounded, a_tile, input_precision=DOT_PRECISION)
            if APPLY_DROPOUT:
                start = tl.where(keep, start, 0.0) * tl.cast(inv_keep, tl.float32)
            tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
                     start.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


# ---------------------------------------------------------------------------------------------------------------
# FP8 row quantisation on its own: (q, scale) = quantize_fp8_rows(t), t (M, N) read by blocks of whole rows.
#   W and W.T at a restart (the frozen GEMMs' e4m3 copies); dy in the backward, whose row amax the gradient launch
#   already gathered (HAS_AMAX), so that dy is read once more here, not twice.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _quantize_rows_kernel(
    t_ptr,  # (M, N)
    q_ptr,  # (M, N) e4m3 output
    scale_ptr,  # (M,) fp32 output
    amax_ptr,  # (M,) int32 bits of each row's amax, read only when HAS_AMAX
    M, N,
    stride_tm, stride_tn,
    stride_qm, stride_qn,
    HAS_AMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)  # M * stride can pass 2**31
    mask_m = offs_m < M
    if HAS_AMAX:
        amax_bits = tl.load(amax_ptr + rows, mask=mask_m, other=0)
    else:
        amax_bits = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for n0 in range(0, N, BLOCK_N):
            cols, mask_n = _column_chunk(n0, N, BLOCK_N)
            amax_bits = tl.maximum(amax_bits, _row_amax_bits(
                _load_tile(t_ptr, rows, cols, stride_tm, stride_tn, mask_m, mask_n)))
    _store_rows_fp8(t_ptr, q_ptr, scale_ptr, amax_bits, rows, mask_m, N, stride_tm, stride_tn, stride_qm, stride_qn,
                    BLOCK_N)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration: tiles and grids (policy.py).
# ---------------------------------------------------------------------------------------------------------------


def _column_splits(token_blocks: int, chunks: int) -> tuple[int, int]:
    """(splits, chunks per split): split `chunks` column chunks into contiguous runs, one per program along grid axis
    1, so that token_blocks x splits reaches policy.target_programs(), with no empty split."""
    wanted = max(1, min(chunks, cdiv(policy.target_programs(), max(token_blocks, 1))))
    per_split = max(1, chunks // wanted)  # rounded down: at least `wanted` splits
    return max(1, cdiv(chunks, per_split)), per_split


def _shrink_config(rank_block: int, dtype: torch.dtype, tokens: int) -> dict:
    """The first fitting tile, its BLOCK_M halved while the launch would have too few programs. The shrink has no
    reduction across programs; the price of small token blocks is that every program reads all of A (from L2):
    r / BLOCK_M times the bytes of x in all, so BLOCK_M stays >= max(16, r / 2) (at most twice x's traffic)."""
    if policy.interpreting():
        return {"BLOCK_M": policy.INTERPRETER_BLOCK, "BLOCK_K": policy.INTERPRETER_BLOCK}
    config = dict(policy.fitting(policy.SHRINK_CONFIGS, policy.shrink_shared_bytes, rank_block, dtype)[0])
    smallest = max(16, rank_block // 2)
    while config["BLOCK_M"] > smallest and cdiv(tokens, config["BLOCK_M"]) < policy.target_programs():
        config["BLOCK_M"] //= 2
    return config


# The row quantisation's block: 8192 elements per step (no dot, no shared memory beyond the reduction's), BLOCK_M
# halved while the launch has too few programs (W's 4096 rows are 128 blocks of 32), down to 4 rows.
_QUANTIZE_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 256, "num_warps": 8}
_QUANTIZE_MIN_ROWS = 4


def _quantize_config(rows: int) -> dict:
    if policy.interpreting():
        return {"BLOCK_M": policy.INTERPRETER_BLOCK, "BLOCK_N": policy.INTERPRETER_BLOCK}
    config = dict(_QUANTIZE_CONFIG)
    while config["BLOCK_M"] > _QUANTIZE_MIN_ROWS and cdiv(rows, config["BLOCK_M"]) < policy.target_programs():
        config["BLOCK_M"] //= 2
    return config


def _grad_ab_config(rank_block: int, dtype: torch.dtype, write_dx: bool) -> dict:
    if policy.interpreting():
        block = policy.INTERPRETER_BLOCK
        return {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_K": block}
    estimate = policy.grad_ab_with_dx_shared_bytes if write_dx else policy.grad_ab_shared_bytes
    return policy.fitting(policy.GRAD_AB_CONFIGS, estimate, rank_block, dtype)[0]


# ---------------------------------------------------------------------------------------------------------------
# Launchers: same signatures as their twins in reference.py, except fused_matmul, which takes its tile (its twins
# are the launchers of passes.py that choose the tile). Every launch goes through `traceable` so that the passes can
# be registered as torch.library triton_ops (ops.py), which torch.compile traces into.
# The dropout seed is a 0-d int64 tensor on the device (None without dropout) that the kernels load: no host
# sync, and a seed drawn inside a compiled graph or a CUDA graph stays in it.
# ---------------------------------------------------------------------------------------------------------------


def _shrink_plan(dtype, M, K, R, N, x_strides, a_strides, b_strides, bias_stride, scale, dropout_p, expand, has_bias,
                 quantize, precision, device):
    """The shrink's grid, non-tensor arguments and launch options for its key (see _shrink)."""
    cfg = _shrink_config(policy.block_rank(R), dtype, M)
    out_strides = (N, 1) if expand else (0, 0)  # out is allocated contiguous (M, N)
    scalars = dict(
        M=M, K=K, R=R, N=N,
        stride_xm=x_strides[0], stride_xk=x_strides[1],
        stride_ar=a_strides[0], stride_ak=a_strides[1],
        stride_sm=R, stride_sr=1,  # S is allocated contiguous (M, R)
        stride_bn=b_strides[0], stride_br=b_strides[1],
        stride_bias=bias_stride,
        stride_om=out_strides[0], stride_on=out_strides[1],
        stride_xqm=K if quantize else 0, stride_xqk=1 if quantize else 0,  # xq is allocated contiguous (M, K)
        scale=float(scale), keep_threshold=dropout_threshold(dropout_p), inv_keep=1.0 / (1.0 - dropout_p),
        APPLY_DROPOUT=dropout_p > 0.0, EXPAND=expand, HAS_BIAS=has_bias, QUANTIZE=quantize,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=policy.block_rank(R), DOT_PRECISION=precision,
    )
    return (cdiv(M, cfg["BLOCK_M"]),), scalars, launch_options(cfg)


_SHRINK = LaunchSite(_shrink_kernel, _shrink_plan)


def shrink_launch(x, lora_a, dropout_p, expand=None, quantize=False):
    """The shrink's launch for these operands' key (see _shrink), to be passed back to it as `launch`."""
    (M, K), R = x.shape, lora_a.shape[0]
    lora_b, scale, bias = expand if expand is not None else (x, 0.0, None)
    N = lora_b.shape[0] if expand is not None else 0
    key = (x.dtype, M, K, R, N, x.stride(), lora_a.stride(), lora_b.stride(), 0 if bias is None else bias.stride(0),
           scale, dropout_p, expand is not None, bias is not None, quantize, dot_precision(x.dtype), x.device.index)
    return _SHRINK.bind(traceable(_shrink_kernel), key)


def _shrink(x, lora_a, dropout_p, seed, expand=None, quantize=False, launch=None):
    """S = dropout_p(x) @ A.T; with expand = (lora_b, scale, bias) also out = scale * S @ B.T + bias; with quantize
    also (xq, sx) = reference.quantize_fp8_rows(x). Returns (S, out or None, xq or None, sx or None). `launch`:
    shrink_launch of the same operands' key, if the caller keeps it."""
    if quantize and launch is None:  # a launch bound for quantize was made by a call that passed the check
        _require_fp8_arch()
    (M, K), R = x.shape, lora_a.shape[0]
    shrunk = x.new_empty(M, R)
    lora_b, scale, bias = expand if expand is not None else (x, 0.0, None)
    out = x.new_empty(M, lora_b.shape[0]) if expand is not None else None
    x_q = x.new_empty(M, K, dtype=torch.float8_e4m3fn) if quantize else None
    x_scale = x.new_empty(M, dtype=torch.float32) if quantize else None
    if M == 0:
        return shrunk, out, x_q, x_scale
    launch = launch if launch is not None else shrink_launch(x, lora_a, dropout_p, expand, quantize)
    # Placeholders for what a variant does not read are inputs the kernel never writes (see launch.dropout_args).
    launch((x, lora_a, shrunk, seed if dropout_p > 0.0 else x, lora_b, x if bias is None else bias,
            x if out is None else out, x if x_q is None else x_q, x if x_scale is None else x_scale))
    return shrunk, out, x_q, x_scale


@on_tensors_device
def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """S = dropout_p(x) @ A.T, (M, r) in x's dtype. x (M, K), lora_a (r, K)."""
    return _shrink(x, lora_a, dropout_p, seed)[0]


@on_tensors_device
def lora_shrink_quantize(x: torch.Tensor, lora_a: torch.Tensor, dropout_p: float,
                         seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, xq, sx) in one launch: S = dropout_p(x) @ A.T, (M, r) in x's dtype, and x (M, K) quantised by rows as
    reference.quantize_fp8_rows does it, bit for bit: xq (M, K) float8_e4m3fn contiguous, sx (M,) fp32. The FP8
    forward's first launch; x is read once for S and the row amax, and once more (from L2) to write xq."""
    shrunk, _, x_q, x_scale = _shrink(x, lora_a, dropout_p, seed, quantize=True)
    return shrunk, x_q, x_scale


def _fused_matmul_plan(M, N, K, R, lhs_strides, rhs_strides, low_strides, up_strides, bias_stride, scale_strides,
                      low_scale, dropout_p, has_bias, fp8, tile, dtype, precision, device):
    """The pointer-load fused GEMM's grid, non-tensor arguments and launch options for its key (see fused_matmul)."""
    scalars = dict(
        M=M, N=N, K=K, R=R,
        stride_lm=lhs_strides[0], stride_lk=lhs_strides[1],
        stride_rk=rhs_strides[0], stride_rn=rhs_strides[1],
        stride_low_m=low_strides[0], stride_low_r=low_strides[1],
        stride_ur=up_strides[0], stride_un=up_strides[1],
        stride_om=N, stride_on=1,  # out is allocated contiguous (M, N)
        stride_bias=bias_stride,
        stride_lhs_scale=scale_strides[0], stride_rhs_scale=scale_strides[1],
        low_scale=float(low_scale), keep_threshold=dropout_threshold(dropout_p),
        HAS_BIAS=has_bias, APPLY_DROPOUT=dropout_p > 0.0, FP8=fp8,
        BLOCK_R=policy.block_rank(R), DOT_PRECISION=precision, **tile.constexprs,
    )
    return (cdiv(M, tile.block_m) * cdiv(N, tile.block_n),), scalars, {"num_warps": tile.num_warps,
                                                                        "num_stages": tile.num_stages}


_FUSED_MATMUL = LaunchSite(_fused_matmul_kernel, _fused_matmul_plan)


def fused_matmul_launch(lhs, rhs, low, up, low_scale, bias, dropout_p, tile):
    """The fused GEMM's launch for these operands' key (see fused_matmul), to be passed back to it as `launch`."""
    (M, K), N, R = lhs.shape, rhs.shape[1], low.shape[1]
    key = (M, N, K, R, lhs.stride(), rhs.stride(), low.stride(), up.stride(), 0 if bias is None else bias.stride(0),
           (0, 0), low_scale, dropout_p, bias is not None, False, tile, lhs.dtype, dot_precision(lhs.dtype),
           lhs.device.index)
    return _FUSED_MATMUL.bind(traceable(_fused_matmul_kernel), key)


def fused_matmul(lhs: torch.Tensor, rhs: torch.Tensor, low: torch.Tensor, up: torch.Tensor, low_scale: float,
                 bias: torch.Tensor | None, dropout_p: float, seed: torch.Tensor | None, *, tile: policy.GemmTile,
                 out: torch.Tensor | None = None, launch=None) -> torch.Tensor:
    """out = lhs @ rhs + low_scale * mask(low @ up) + bias, (M, N) in lhs's dtype, by the pointer-load kernel with
    `tile` (one of policy.GEMM_TILES, used as given): lhs (M, K), rhs (K, N), low (M, R), up (R, N), any strides;
    the keep-mask of the (M, N) output drawn from `seed` when dropout_p > 0. Writes into `out` (contiguous (M, N))
    where given, so that timing the tiles allocates it once; `launch`: fused_matmul_launch of the same operands' key,
    if the caller keeps it. Not wrapped by `on_tensors_device`: its callers, the launchers of passes.py, are."""
    M, N = lhs.shape[0], rhs.shape[1]
    out = torch.empty((M, N), device=lhs.device, dtype=lhs.dtype) if out is None else out
    if M == 0 or N == 0:
        return out
    launch = launch if launch is not None else fused_matmul_launch(lhs, rhs, low, up, low_scale, bias, dropout_p, tile)
    _launch_fused_matmul(launch, lhs, rhs, low, up, bias, out, dropout_p, seed)
    return out


def _launch_fused_matmul(launch, lhs, rhs, low, up, bias, out, dropout_p, seed) -> None:
    # Placeholders for what a variant does not read are inputs the kernel never writes (see launch.dropout_args).
    launch((lhs, rhs, low, up, lhs if bias is None else bias, out, seed if dropout_p > 0.0 else lhs, lhs, lhs))


def forward_planned(shrink, gemm, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    bias: torch.Tensor | None, dropout_p: float,
                    seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, S) of the Triton engine's forward by a plan's two launches, for these operands' key (M, N > 0): `shrink`,
    shrink_launch(x, lora_a, dropout_p), then `gemm`, fused_matmul_launch(x, weight.T, S, lora_b.T, s, bias, 0.0,
    tile). The planned call's whole forward in one function: its two allocations and two launches, nothing else
    (each helper call between costs the host ~1-3 us of a training step's call). W and B are handed to the GEMM
    untransposed: a launch reads only an operand's address, which is its transpose's, and holds the transposes'
    strides; so the call makes no view of either (a view costs ~4-5 us, as much as an allocation)."""
    M = x.shape[0]
    shrunk = x.new_empty(M, lora_a.shape[0])
    out = x.new_empty(M, weight.shape[0])
    # The pointer orders of _shrink and _launch_fused_matmul, placeholders as there (see launch.dropout_args).
    shrink((x, lora_a, shrunk, seed if dropout_p > 0.0 else x, x, x, x, x, x))
    gemm((x, weight, shrunk, lora_b, x if bias is None else bias, out, x, x, x))
    return out, shrunk


def input_grad_planned(gemm, grad_y: torch.Tensor, weight: torch.Tensor, grad_shrunk: torch.Tensor,
                       lora_a: torch.Tensor, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """dx = dy @ W + mask(dS @ A) / (1-p), (M, K), by a plan's `gemm`, fused_matmul_launch(dy, weight, dS, lora_a,
    1 / (1-p), None, dropout_p, tile), for these operands' key (M, K > 0): fused_matmul's allocation and launch
    without its generic arguments (the planned backward's dx)."""
    out = grad_y.new_empty(grad_y.shape[0], weight.shape[1])
    # _launch_fused_matmul's pointer order, placeholders as there, without its frame.
    gemm((grad_y, weight, grad_shrunk, lora_a, grad_y, out, seed if dropout_p > 0.0 else grad_y, grad_y, grad_y))
    return out


def forward_composed_planned(shrink, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                             lora_b: torch.Tensor, bias: torch.Tensor | None, dropout_p: float,
                             seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, S) of the cuBLAS-composed engine's forward by a plan's `shrink`, shrink_launch(x, lora_a, dropout_p,
    (lora_b, s, bias)), for these operands' key (M, N > 0): S and y's start s * S @ B.T + bias in one launch, then
    cuBLAS adds x @ W.T; _shrink's allocations and launch without its generic arguments."""
    M = x.shape[0]
    shrunk = x.new_empty(M, lora_a.shape[0])
    out = x.new_empty(M, weight.shape[0])
    # _shrink's pointer order, placeholders as there (see launch.dropout_args).
    shrink((x, lora_a, shrunk, seed if dropout_p > 0.0 else x, lora_b, x if bias is None else bias, out, x, x))
    return out.addmm_(x, weight.T), shrunk


def grad_ab_planned(launches, grad_y: torch.Tensor, x: torch.Tensor, shrunk: torch.Tensor,
                    lora_a: torch.Tensor | None, lora_b: torch.Tensor, scale: float, dropout_p: float,
                    seed: torch.Tensor | None, need_bias_grad: bool, deterministic: bool) -> tuple:
    """(dA, dB, dS or dx's start, dbias or None, (dyq, sdy) or None) by a plan's grad_ab_launches for these operands'
    key, M > 0 (the planned backwards'): dx's start where lora_a is given (the cuBLAS-composed engine), dy quantised
    where the launches include its quantising launch (the FP8 backward), as _grad_ab does. With atomics, _grad_ab's
    allocations and launches without its generic arguments; deterministic (partial sums to add up), _grad_ab."""
    _, grad_b_launch, grad_a_launch, quantize_launch = launches
    if deterministic:
        grad_a, grad_b, grad_shrunk, grad_bias, start, grad_y_quantized = _grad_ab(
            grad_y, x, shrunk, lora_a, lora_b, scale, dropout_p, seed, need_bias_grad, deterministic,
            quantize_grad_y=quantize_launch is not None, launches=launches)
        return grad_a, grad_b, grad_shrunk if start is None else start, grad_bias, grad_y_quantized
    M, K = x.shape
    N, R = lora_b.shape
    # With atomics the zeroed buffers are the sums themselves (one partial each).
    grad_a = x.new_zeros(R, K, dtype=torch.float32)
    grad_b = x.new_zeros(N, R, dtype=torch.float32)
    grad_bias = x.new_zeros(N, dtype=torch.float32) if need_bias_grad else None
    ds_partial = x.new_zeros(1, M, R, dtype=torch.float32)
    grad_y_amax = None if quantize_launch is None else x.new_zeros(M, dtype=torch.int32)
    # _grad_ab's pointer orders, placeholders as there (see launch.dropout_args).
    grad_b_launch((grad_y, shrunk, lora_b, ds_partial, grad_b, grad_y if grad_bias is None else grad_bias,
                   grad_y if grad_y_amax is None else grad_y_amax))
    mask_seed = seed if dropout_p > 0.0 else x
    if lora_a is None:
        second = x.new_empty(M, R)  # dS
        grad_a_launch((x, ds_partial, second, grad_a, mask_seed, x, x))
    else:
        second = x.new_empty(M, K)  # dx's start
        grad_a_launch((x, ds_partial, x, grad_a, mask_seed, lora_a, second))
    if x.dtype != torch.float32:  # rounded once into the inputs' dtype
        grad_a, grad_b = grad_a.to(x.dtype), grad_b.to(x.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(x.dtype)
    if quantize_launch is None:
        return grad_a, grad_b, second, grad_bias, None
    grad_y_q = grad_y.new_empty(M, N, dtype=torch.float8_e4m3fn)
    grad_y_scale = grad_y.new_empty(M, dtype=torch.float32)
    quantize_launch((grad_y, grad_y_q, grad_y_scale, grad_y_amax))  # _quantize_rows's pointer order
    return grad_a, grad_b, second, grad_bias, (grad_y_q, grad_y_scale)


def shrink_quantize_planned(shrink, x: torch.Tensor, lora_a: torch.Tensor, dropout_p: float,
                            seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, xq, sx) of the FP8 forward's first launch by a plan's `shrink`, shrink_launch(x, lora_a, dropout_p,
    quantize=True), for these operands' key (M > 0): _shrink's allocations and launch without its generic
    arguments."""
    M, K = x.shape
    shrunk = x.new_empty(M, lora_a.shape[0])
    x_q = x.new_empty(M, K, dtype=torch.float8_e4m3fn)
    x_scale = x.new_empty(M, dtype=torch.float32)
    # _shrink's pointer order, placeholders as there (see launch.dropout_args).
    shrink((x, lora_a, shrunk, seed if dropout_p > 0.0 else x, x, x, x, x_q, x_scale))
    return shrunk, x_q, x_scale


# Triton's float8e4nv (e4m3fn), in tl.dot and in casts, needs compute capability 8.9 or later (FP8 tensor cores).
FP8_MIN_ARCH = 89


def _require_fp8_arch() -> None:
    """A RuntimeError naming the GPU where it has no FP8 (Triton would fail compiling, less clearly)."""
    if not policy.interpreting() and policy.current_arch() < FP8_MIN_ARCH:
        raise RuntimeError(f"the FP8 launches need a GPU of compute capability 8.9 or later (e4m3 tensor cores); "
                           f"this one is sm_{policy.current_arch()}")


def fp8_gemm_shared_bytes(tile: policy.GemmTile, rank_block: int, element_size: int) -> int:
    """policy.gemm_shared_bytes of the FP8 variant: the pipelined operand tiles at 1 byte (e4m3), the low-rank tiles
    at element_size (out_dtype's)."""
    operands = tile.num_stages * (tile.block_m + tile.block_n) * tile.block_k
    return operands + element_size * rank_block * (tile.block_m + tile.block_n) + policy.TRITON_SHARED_OVERHEAD


def fp8_gemm_tile(rank: int, out_dtype: torch.dtype) -> policy.GemmTile:
    """The FP8 fused GEMM's tile where its caller names none: the interpreter's, else the first of
    policy.gemm_tiles() whose FP8 estimate fits. Counting the 1-byte operands as 1 byte matters on 99 KiB GPUs
    (sm_89): at 2 bytes the first fitting tile was 128x128x32 w4, which spills there (sm_89 build, triton 3.9,
    r = 16), and 128x128x64 w8 fits."""
    if policy.interpreting():
        return policy.INTERPRETER_TILE
    return policy.fitting(policy.gemm_tiles(), fp8_gemm_shared_bytes, policy.block_rank(static_ints(rank)),
                          out_dtype)[0]


def fused_matmul_fp8_launch(lhs_q, lhs_scale, rhs_q, rhs_scale, low, up, low_scale, bias, dropout_p, tile,
                            out_dtype):
    """The FP8 fused GEMM's launch for these operands' key (see fused_matmul_fp8), to be passed back to it as
    `launch`."""
    (M, K), N, R = lhs_q.shape, rhs_q.shape[1], low.shape[1]
    key = (M, N, K, R, lhs_q.stride(), rhs_q.stride(), low.stride(), up.stride(),
           0 if bias is None else bias.stride(0), (lhs_scale.stride(0), rhs_scale.stride(0)), low_scale, dropout_p,
           bias is not None, True, tile, out_dtype, dot_precision(out_dtype), lhs_q.device.index)
    return _FUSED_MATMUL.bind(traceable(_fused_matmul_kernel), key)


@on_tensors_device
def fused_matmul_fp8(lhs_q: torch.Tensor, lhs_scale: torch.Tensor, rhs_q: torch.Tensor, rhs_scale: torch.Tensor,
                     low: torch.Tensor, up: torch.Tensor, low_scale: float, bias: torch.Tensor | None,
                     dropout_p: float, seed: torch.Tensor | None, out_dtype: torch.dtype, *,
                     tile: policy.GemmTile | None = None, out: torch.Tensor | None = None,
                     launch=None) -> torch.Tensor:
    """out = (lhs_q @ rhs_q) * lhs_scale[:, None] * rhs_scale[None, :] + low_scale * mask(low @ up) + bias, (M, N) in
    out_dtype, by the pointer-load kernel's FP8 variant: lhs_q (M, K) and rhs_q (K, N) float8_e4m3fn, rhs_q K-major
    (the transposed view of a tensor quantised by rows, as reference.quantize_fp8_rows gives it), lhs_scale (M,) and
    rhs_scale (N,) fp32 powers of two; low (M, R), up (R, N) and bias (N,) in out_dtype, any strides; the keep-mask of
    the (M, N) output drawn from `seed` when dropout_p > 0. The products of e4m3 values are exact in fp32, the sum
    accumulates in fp32 and the scaling is exact, so the result differs from the float64 GEMM of the dequantised
    operands by fp32 accumulation and one rounding into out_dtype. `tile` None: fp8_gemm_tile. `launch`:
    fused_matmul_fp8_launch of the same operands' key and tile, if the caller keeps it (a launch bound for FP8
    operands was made by a call that passed the architecture check)."""
    if launch is None:
        _require_fp8_arch()
    M, N, R = lhs_q.shape[0], rhs_q.shape[1], low.shape[1]
    out = torch.empty((M, N), device=lhs_q.device, dtype=out_dtype) if out is None else out
    if M == 0 or N == 0:
        return out
    if launch is None:
        tile = fp8_gemm_tile(R, out_dtype) if tile is None else tile
        launch = fused_matmul_fp8_launch(lhs_q, lhs_scale, rhs_q, rhs_scale, low, up, low_scale, bias, dropout_p,
                                         tile, out_dtype)
    _launch_fused_matmul_fp8(launch, lhs_q, lhs_scale, rhs_q, rhs_scale, low, up, bias, out, dropout_p, seed)
    return out


def _launch_fused_matmul_fp8(launch, lhs_q, lhs_scale, rhs_q, rhs_scale, low, up, bias, out, dropout_p, seed) -> None:
    launch((lhs_q, rhs_q, low, up, low if bias is None else bias, out, seed if dropout_p > 0.0 else low, lhs_scale,
            rhs_scale))


def forward_matmul_fp8_planned(x_q: torch.Tensor, x_scale: torch.Tensor, weight_q: torch.Tensor,
                               weight_scale: torch.Tensor, shrunk: torch.Tensor, lora_b: torch.Tensor,
                               bias: torch.Tensor | None, launch) -> torch.Tensor:
    """forward_planned's fused GEMM in FP8: y = deq(xq) @ deq(wq).T + bias + s * S @ B.T, (M, N) in S's dtype, by a
    plan's fused_matmul_fp8_launch(xq, sx, wq.T, sw, S, B.T, s, bias, 0.0, tile, S's dtype) for these operands' key,
    handed W's copy and B untransposed (their addresses are their transposes'): no view of either per call."""
    out = shrunk.new_empty(x_q.shape[0], weight_q.shape[0])
    _launch_fused_matmul_fp8(launch, x_q, x_scale, weight_q, weight_scale, shrunk, lora_b, bias, out, 0.0, None)
    return out


def input_grad_fp8_planned(launch, grad_y_q: torch.Tensor, grad_y_scale: torch.Tensor, weight_t_q: torch.Tensor,
                           weight_t_scale: torch.Tensor, grad_shrunk: torch.Tensor, lora_a: torch.Tensor,
                           dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """input_grad_planned in FP8: dx = deq(dyq) @ deq(W.T's copy).T + mask(dS @ A) / (1-p), (M, K) in dS's dtype,
    by a plan's fused_matmul_fp8_launch(dyq, sdy, W.T's copy transposed, its scales, dS, A, 1 / (1-p), None,
    dropout_p, tile, dS's dtype) for these operands' key (M, K > 0), handed W.T's copy untransposed (its address is
    its transpose's): no view per call, nor fused_matmul_fp8's generic arguments and device guard."""
    out = grad_shrunk.new_empty(grad_y_q.shape[0], weight_t_q.shape[0])
    _launch_fused_matmul_fp8(launch, grad_y_q, grad_y_scale, weight_t_q, weight_t_scale, grad_shrunk, lora_a, None,
                             out, dropout_p, seed)
    return out


def _grad_ab_layout(M, N, K, R, dtype, write_dx, deterministic, device):
    """(config, token blocks, (N splits, N chunks per split), (K splits, K chunks per split), token partials, dS
    partials) of the two gradient launches; cached per key on the compiled path (see _grad_ab)."""
    key = (M, N, K, R, dtype, write_dx, deterministic, device)
    layout = _GRAD_AB_LAYOUTS.get(key) if TRACEABLE_LAUNCHES else None
    if layout is None:
        cfg = _grad_ab_config(policy.block_rank(R), dtype, write_dx=write_dx)
        token_blocks = cdiv(M, cfg["BLOCK_M"])
        n_split = _column_splits(token_blocks, cdiv(N, cfg["BLOCK_N"]))
        k_split = _column_splits(token_blocks, cdiv(K, cfg["BLOCK_K"]))
        # Partial sums: one per token block (dA, dB, dbias) or N split (dS) when deterministic, one with atomics.
        layout = (cfg, token_blocks, n_split, k_split, max(token_blocks, 1) if deterministic else 1,
                  n_split[0] if deterministic else 1)
        if TRACEABLE_LAUNCHES:
            remember(_GRAD_AB_LAYOUTS, key, layout)
    return layout


_GRAD_AB_LAYOUTS: dict[tuple, tuple] = {}


def _grad_b_plan(M, N, K, R, dtype, write_dx, deterministic, device, dy_strides, s_strides, b_strides, scale,
                 need_bias_grad, row_amax, precision):
    cfg, token_blocks, (n_splits, n_chunks_per_split), _, token_partials, ds_partials = _grad_ab_layout(
        M, N, K, R, dtype, write_dx, deterministic, device)
    scalars = dict(
        M=M, N=N, R=R,
        stride_dym=dy_strides[0], stride_dyn=dy_strides[1],
        stride_sm=s_strides[0], stride_sr=s_strides[1],
        stride_bn=b_strides[0], stride_br=b_strides[1],
        stride_ds_partial=M * R, stride_ds_m=R, stride_ds_r=1,  # the buffers are allocated contiguous
        stride_db_partial=N * R, stride_db_n=R, stride_db_r=1,
        stride_dbias_partial=N if need_bias_grad else 0,
        scale=float(scale), chunks_per_split=n_chunks_per_split,
        HAS_BIAS_GRAD=need_bias_grad, DETERMINISTIC=deterministic, ROW_AMAX=row_amax,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=policy.block_rank(R), DOT_PRECISION=precision,
    )
    return (token_blocks, n_splits), scalars, launch_options(cfg)


def _grad_a_plan(M, N, K, R, dtype, write_dx, deterministic, device, x_strides, a_strides, scale, dropout_p,
                 precision):
    cfg, token_blocks, _, (k_splits, k_chunks_per_split), token_partials, ds_partials = _grad_ab_layout(
        M, N, K, R, dtype, write_dx, deterministic, device)
    scalars = dict(
        M=M, K=K, R=R, num_ds_partials=ds_partials,
        stride_xm=x_strides[0], stride_xk=x_strides[1],
        stride_dsp_partial=M * R, stride_dsp_m=R, stride_dsp_r=1,  # the buffers are allocated contiguous
        stride_dsm=R, stride_dsr=1,
        stride_da_partial=R * K, stride_da_r=K, stride_da_k=1,
        stride_ar=a_strides[0], stride_ak=a_strides[1],
        stride_dxm=K if write_dx else x_strides[0], stride_dxk=1 if write_dx else x_strides[1],
        scale=float(scale), keep_threshold=dropout_threshold(dropout_p), inv_keep=1.0 / (1.0 - dropout_p),
        chunks_per_split=k_chunks_per_split, APPLY_DROPOUT=dropout_p > 0.0, DETERMINISTIC=deterministic,
        WRITE_DX=write_dx, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=policy.block_rank(R),
        DOT_PRECISION=precision,
    )
    return (token_blocks, k_splits), scalars, launch_options(cfg)


_GRAD_B = LaunchSite(_grad_b_kernel, _grad_b_plan)
_GRAD_A = LaunchSite(_grad_a_kernel, _grad_a_plan)


def _quantize_plan(M, N, t_strides, dtype, has_amax, device):
    """The row quantisation's grid, non-tensor arguments and launch options for its key (see _quantize_rows)."""
    cfg = _quantize_config(M)
    scalars = dict(M=M, N=N, stride_tm=t_strides[0], stride_tn=t_strides[1],
                   stride_qm=N, stride_qn=1,  # q is allocated contiguous (M, N)
                   HAS_AMAX=has_amax, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
    return (cdiv(M, cfg["BLOCK_M"]),), scalars, launch_options(cfg)


_QUANTIZE = LaunchSite(_quantize_rows_kernel, _quantize_plan)


def quantize_rows_launch(t, has_amax):
    """The row quantisation's launch for t's key (see _quantize_rows), to be passed back to it as `launch`."""
    M, N = t.shape
    return _QUANTIZE.bind(traceable(_quantize_rows_kernel), (M, N, t.stride(), t.dtype, has_amax, t.device.index))


def _quantize_rows(t, amax_bits=None, launch=None):
    """(q, scale) of t (M, N) by rows; amax_bits (M,) int32 where a launch before has gathered the row amax.
    `launch`: quantize_rows_launch of the same key, if the caller keeps it (made by a call that passed the
    architecture check)."""
    if launch is None:
        _require_fp8_arch()
    M, N = t.shape
    q = t.new_empty(M, N, dtype=torch.float8_e4m3fn)
    scale = t.new_empty(M, dtype=torch.float32)
    if M > 0:
        launch = launch if launch is not None else quantize_rows_launch(t, amax_bits is not None)
        launch((t, q, scale, t if amax_bits is None else amax_bits))
    return q, scale


@on_tensors_device
def quantize_rows_fp8(t: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) = reference.quantize_fp8_rows(t, amax), bit for bit, in one launch: t (M, N) fp32/fp16/bf16, any
    strides; q (M, N) float8_e4m3fn contiguous, scale (M,) fp32 powers of two. Each program reads its block of whole
    rows twice (the amax, then the quantisation: the second read from L2 where the block fits), once where `amax`
    (M,) fp32 gives the rows' maxima. For W (the forward's operand) and W.T (the input gradient's) at a restart."""
    if amax is None:
        return _quantize_rows(t)
    # Non-negative floats order as their bits do: the kernel takes the int32 bits an atomic max would have left.
    return _quantize_rows(t, amax.contiguous().view(torch.int32))


def grad_ab_launches(grad_y, x, shrunk, lora_a, lora_b, scale, dropout_p, need_bias_grad, deterministic,
                     quantize_grad_y=False):
    """(layout, dB launch, dA launch, dy's quantising launch or None) of the gradient launches for these operands'
    key (see _grad_ab), to be passed back to it as `launches`; lora_a as there (None unless the dA launch also writes
    dx's start)."""
    (M, K), N, R = static_ints((x.shape, grad_y.shape[1], lora_b.shape[1]))
    write_dx = lora_a is not None
    layout_key = (M, N, K, R, x.dtype, write_dx, deterministic, x.device.index)
    precision = dot_precision(x.dtype)
    a = lora_a if write_dx else x
    return (_grad_ab_layout(*layout_key),
            _GRAD_B.bind(traceable(_grad_b_kernel), (*layout_key, grad_y.stride(), shrunk.stride(), lora_b.stride(),
                                                     scale, need_bias_grad, quantize_grad_y, precision)),
            _GRAD_A.bind(traceable(_grad_a_kernel), (*layout_key, x.stride(), a.stride(), scale, dropout_p,
                                                     precision)),
            quantize_rows_launch(grad_y, True) if quantize_grad_y else None)


def _grad_ab(grad_y, x, shrunk, lora_a, lora_b, scale, dropout_p, seed, need_bias_grad, deterministic,
             quantize_grad_y=False, launches=None):
    """(dA, dB, dS, dbias (None unless need_bias_grad), dx start or None, (dyq, sdy) or None): dx's start
    mask(dS @ A) / (1-p) is written by the dA launch, instead of dS (None then), when lora_a is given (the
    cuBLAS-composed engine); with quantize_grad_y the dy launch also gathers dy's row amax and a third launch writes
    dy in e4m3 (the FP8 input gradient's operand). `launches`: grad_ab_launches of the same operands' key, if the
    caller keeps them (made by a call that passed the architecture check)."""
    if launches is None:
        if quantize_grad_y:
            _require_fp8_arch()
        launches = grad_ab_launches(grad_y, x, shrunk, lora_a, lora_b, scale, dropout_p, need_bias_grad, deterministic,
                                    quantize_grad_y)
    (_, token_blocks, _, _, token_partials, ds_partials), grad_b_launch, grad_a_launch, quantize_launch = launches
    (M, K), N, R = x.shape, grad_y.shape[1], lora_b.shape[1]
    write_dx = lora_a is not None
    # With one partial (atomics) the buffers are the sums themselves: 2-D, nothing left to add up.
    partials = () if token_partials == 1 else (token_partials,)
    grad_a = x.new_zeros(*partials, R, K, dtype=torch.float32)
    grad_b = x.new_zeros(*partials, N, R, dtype=torch.float32)
    # Not allocated when not asked for: the ops return an empty one (_bias_grad_or_empty), the eager path None.
    grad_bias = x.new_zeros(*partials, N, dtype=torch.float32) if need_bias_grad else None
    ds_partial = x.new_zeros(ds_partials, M, R, dtype=torch.float32)
    # dS is written where it is the input gradient's operand, dx's start where the dA launch writes that instead.
    grad_shrunk = None if write_dx else x.new_empty(M, R)
    dx_start = x.new_empty(M, K) if write_dx else None
    grad_y_amax = x.new_zeros(M, dtype=torch.int32) if quantize_grad_y else None
    if token_blocks > 0:
        # Placeholders for what a variant does not read or write are inputs it never writes (see launch.dropout_args).
        grad_b_launch((grad_y, shrunk, lora_b, ds_partial, grad_b, grad_bias if need_bias_grad else grad_y,
                       grad_y if grad_y_amax is None else grad_y_amax))
        a, dx, ds = (lora_a, dx_start, x) if write_dx else (x, x, grad_shrunk)
        grad_a_launch((x, ds_partial, ds, grad_a, seed if dropout_p > 0.0 else x, a, dx))
    if partials:
        grad_a, grad_b = grad_a.sum(0), grad_b.sum(0)
        grad_bias = None if grad_bias is None else grad_bias.sum(0)
    if x.dtype != torch.float32:  # rounded once into the inputs' dtype
        grad_a, grad_b = grad_a.to(x.dtype), grad_b.to(x.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(x.dtype)
    grad_y_q = _quantize_rows(grad_y, grad_y_amax, quantize_launch) if quantize_grad_y else None
    return grad_a, grad_b, grad_shrunk, grad_bias, dx_start, grad_y_q


def _bias_grad_or_empty(grad_bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """What the gradient launchers return for dbias: an empty (0,) tensor where it was not asked for, as a registered
    op cannot return None."""
    return grad_bias if grad_bias is not None else x.new_empty((0,))


@on_tensors_device
def lora_grad_ab(grad_y: torch.Tensor, x: torch.Tensor, shrunk: torch.Tensor, lora_b: torch.Tensor, scale: float,
                 dropout_p: float, seed: torch.Tensor | None, need_bias_grad: bool,
                 deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dA, dB, dS, dbias) from two launches that read dy and x once each, in x's dtype (reduced in fp32, rounded
    once); dbias is an empty (0,) tensor unless `need_bias_grad` (a registered op cannot return None).

    Programs own a block of tokens and a split of the N (then K) chunks. Their partial sums are reduced by fp32
    atomics into zeroed buffers, or, when `deterministic`, written to their own slices and summed in a fixed order
    (bit-identical run to run on one GPU model, at the cost of token_blocks x (N + K) x r x 4 bytes of scratch).
    """
    grad_a, grad_b, grad_shrunk, grad_bias, _, _ = _grad_ab(grad_y, x, shrunk, None, lora_b, scale, dropout_p, seed,
                                                            need_bias_grad, deterministic)
    return grad_a, grad_b, grad_shrunk, _bias_grad_or_empty(grad_bias, x)


@on_tensors_device
def lora_shrink_expand(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                       bias: torch.Tensor | None, dropout_p: float,
                       seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, start): S = dropout_p(x) @ A.T and start = s * S @ B.T + bias, (M, N), in one launch: the cuBLAS-composed
    engine's forward accumulates x @ W.T onto start."""
    return _shrink(x, lora_a, dropout_p, seed, expand=(lora_b, scale, bias))[:2]


@on_tensors_device
def lora_grad_ab_start(grad_y: torch.Tensor, x: torch.Tensor, shrunk: torch.Tensor, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor | None,
                       need_bias_grad: bool, deterministic: bool = False):
    """lora_grad_ab's (dA, dB, dbias), and dx's start mask(dS @ A) / (1-p), (M, K), written by the dA launch: the
    cuBLAS-composed engine's backward accumulates dy @ W onto it."""
    grad_a, grad_b, _, grad_bias, start, _ = _grad_ab(grad_y, x, shrunk, lora_a, lora_b, scale, dropout_p, seed,
                                                      need_bias_grad, deterministic)
    return grad_a, grad_b, _bias_grad_or_empty(grad_bias, x), start


@on_tensors_device
def lora_grad_ab_quantize(grad_y: torch.Tensor, x: torch.Tensor, shrunk: torch.Tensor, lora_b: torch.Tensor,
                          scale: float, dropout_p: float, seed: torch.Tensor | None, need_bias_grad: bool,
                          deterministic: bool = False):
    """lora_grad_ab's (dA, dB, dS, dbias), and (dyq, sdy) = reference.quantize_fp8_rows(dy) bit for bit: dyq (M, N)
    float8_e4m3fn contiguous, sdy (M,) fp32. The dy launch gathers dy's row amax (its programs see a split of each
    row, hence an atomic max per row and split into an (M,) int32 buffer); a third launch reads dy once more and
    writes dyq: one extra read of dy and a write of 1 byte per element beside the gradient launches. The FP8 input
    gradient dx = fused_matmul_fp8(dyq, sdy, W.T's rows quantised, transposed, ..., low=dS, up=A)."""
    grad_a, grad_b, grad_shrunk, grad_bias, _, (grad_y_q, grad_y_scale) = _grad_ab(
        grad_y, x, shrunk, None, lora_b, scale, dropout_p, seed, need_bias_grad, deterministic, quantize_grad_y=True)
    return grad_a, grad_b, grad_shrunk, _bias_grad_or_empty(grad_bias, x), grad_y_q, grad_y_scale


@on_tensors_device
def lora_grad_ab_start_quantize(grad_y: torch.Tensor, x: torch.Tensor, shrunk: torch.Tensor, lora_a: torch.Tensor,
                                lora_b: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor | None,
                                need_bias_grad: bool, deterministic: bool = False):
    """lora_grad_ab_start's (dA, dB, dbias, dx start) and lora_grad_ab_quantize's (dyq, sdy): for an FP8 engine
    that accumulates the scaled dyq @ W onto dx's start itself."""
    grad_a, grad_b, _, grad_bias, start, (grad_y_q, grad_y_scale) = _grad_ab(
        grad_y, x, shrunk, lora_a, lora_b, scale, dropout_p, seed, need_bias_grad, deterministic,
        quantize_grad_y=True)
    return grad_a, grad_b, _bias_grad_or_empty(grad_bias, x), start, grad_y_q, grad_y_scale

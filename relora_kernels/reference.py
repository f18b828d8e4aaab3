"""The package's ops in pure PyTorch: the CPU fallback of the public ops and the tests' oracle (docs/DESIGN.md
section 9 says which test checks which launch against what). Not what the benchmarks call eager: that is PEFT's
forward in torch ops (benchmarks/cases.py, `eager_lora_linear`).

Notation (docs/DESIGN.md section 1, as nn.Linear): x (M, K), weight W (N, K), lora_a A (r, K), lora_b B (N, r),
s the LoRA scale, p the LoRA-branch dropout probability.

    x~ = dropout_p(x)                       mask from (seed, element index), inverted scaling 1/(1-p)
    S  = x~ @ A.T                           lora_shrink
    y  = x @ W.T + bias + s * S @ B.T       lora_forward_matmul
    dS = s * dy @ B;  dB = s * dy.T @ S;  dA = dS.T @ x~;  dbias = dy.sum(0)      lora_grad_ab
    dx = dy @ W + (dS @ A) * m / (1-p)      lora_input_grad

The per-launch steps (lora_shrink, lora_forward_matmul, lora_grad_ab, lora_input_grad) and merge_lora_weight_ /
reinit_lora_ take the arguments of the Triton launchers of the same names. The engine-choosing passes lora_forward and
lora_backward and the cuBLAS engine's launches (lora_shrink_expand, lora_grad_ab_start) have no twin of their own:
they are checked through the whole op, lora_linear, in float64.

The dropout mask is Philox-4x32-10 keyed by the seed, element (m, k) taking word k % 4 of the draw counted
m * ceil(K / 4) + k // 4: the exact stream of Triton's `tl.randint4x` as the kernels use it, so the kernels and
this file drop the same elements.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .random_stream import RANDOM_SHIFT, UNIT_SCALE, WORDS_PER_DRAW, dropout_threshold

_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_MASK32 = 0xFFFFFFFF


def _mul_hi_lo_u32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for a uint32 constant and a tensor of uint32 values held in int64.

    a is split in 16-bit halves so that no partial product overflows int64.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_hi, p_lo = a_hi * b, a_lo * b  # < 2**48 each
    # Multiply / floor-divide rather than tensor shifts (equal for these non-negative values), because Inductor's
    # CPU vectoriser has miscompiled int64 tensor shifts, should this ever be traced outside philox_bits.
    hi = (p_hi + p_lo // 2**16) // 2**16
    lo = (p_lo + (p_hi & 0xFFFF) * 2**16) & _MASK32
    return hi, lo


def philox_4x32(seed: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four uint32 words (in int64) of Philox-4x32-10 for counters (counter_lo, counter_hi, 0, 0), key = seed:
    tl.randint4x's stream."""
    c0 = counters & _MASK32
    c1 = counters // 2**32
    c2 = torch.zeros_like(counters)
    c3 = torch.zeros_like(counters)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo_u32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo_u32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


@torch.library.custom_op("relora_kernels::philox_bits", mutates_args=())
def philox_bits(seed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows, cols) int64: the top RANDOM_BITS bits of the first word of the Philox draw counted m * cols + k
    (tl.randint's stream): the reinit values' stream.

    Like dropout_bits, an opaque op with the seed in a tensor, so torch.compile neither traces the ten Philox
    rounds (Inductor spends minutes on that int64 arithmetic) nor breaks the graph on reading the seed.
    """
    counters = torch.arange(rows * cols, device=seed.device, dtype=torch.int64).view(rows, cols)
    return philox_4x32(int(seed), counters)[0] // 2**RANDOM_SHIFT


@philox_bits.register_fake
def _(seed, rows, cols):
    return torch.empty((rows, cols), dtype=torch.int64, device=seed.device)


@torch.library.custom_op("relora_kernels::dropout_bits", mutates_args=())
def dropout_bits(seed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows, cols) int64: the dropout masks' stream. Element (m, k) gets the top RANDOM_BITS bits of word k % 4 of
    the Philox draw counted m * ceil(cols / 4) + k // 4: one draw serves four neighbours of a row (the kernels'
    jit_helpers.keep_mask), a quarter of the integer work of one draw per element."""
    groups = -(-cols // WORDS_PER_DRAW)
    counters = torch.arange(rows * groups, device=seed.device, dtype=torch.int64).view(rows, groups)
    words = torch.stack(philox_4x32(int(seed), counters), dim=-1).view(rows, WORDS_PER_DRAW * groups)[:, :cols]
    return words // 2**RANDOM_SHIFT


@dropout_bits.register_fake
def _(seed, rows, cols):
    return torch.empty((rows, cols), dtype=torch.int64, device=seed.device)


def _seed_tensor(seed, device) -> torch.Tensor:
    """An int or a 0-d integer tensor, as a 0-d int64 tensor on `device`."""
    return torch.as_tensor(seed, dtype=torch.int64, device=device)


def dropout_mask(seed, rows: int, cols: int, dropout_p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask (rows, cols) from the stream of dropout_bits; seed an int or a 0-d integer tensor."""
    return dropout_bits(_seed_tensor(seed, device), rows, cols) >= dropout_threshold(dropout_p)


def _dropout(x: torch.Tensor, dropout_p: float, seed) -> torch.Tensor:
    """x~ = x * m / (1-p) for a 2-D x; identity for p = 0. seed: an int or a 0-d integer tensor."""
    if dropout_p == 0.0:
        return x
    keep = dropout_mask(seed, x.shape[0], x.shape[1], dropout_p, device=x.device)
    return x * keep / (1.0 - dropout_p)


# ---------------------------------------------------------------------------------------------------------------
# The op as a whole: what lora_linear computes, differentiable by autograd.
# ---------------------------------------------------------------------------------------------------------------


def lora_linear(x, weight, lora_a, lora_b, scale=1.0, bias=None, dropout_p=0.0, seed=0):
    """y = x @ W.T + bias + s * dropout_p(x) @ A.T @ B.T for x of any leading dims, computed in x's dtype.
    seed: an int or a 0-d integer tensor (what the launchers take)."""
    x2 = x.reshape(-1, x.shape[-1])
    shrunk = F.linear(_dropout(x2, dropout_p, seed), lora_a)
    y = F.linear(x2, weight, bias) + scale * F.linear(shrunk, lora_b)
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# The steps, one per kernel launch, on 2-D tensors (the twins of the launchers).
# ---------------------------------------------------------------------------------------------------------------


def lora_shrink(x, lora_a, dropout_p, seed):
    """S = dropout_p(x) @ A.T, (M, r) in x's dtype."""
    return _dropout(x, dropout_p, seed) @ lora_a.T


def lora_forward_matmul(x, weight, shrunk, lora_b, scale, bias):
    """y = x @ W.T + bias + s * S @ B.T, (M, N)."""
    y = x @ weight.T + scale * (shrunk @ lora_b.T)
    return y if bias is None else y + bias


def lora_grad_ab(grad_y, x, shrunk, lora_b, scale, dropout_p, seed, need_bias_grad, deterministic=False):
    """(dA, dB, dS, dbias): dS = s*dy@B, dB = s*dy.T@S, dA = dS.T@x~, dbias = dy.sum(0) (empty (0,) unless asked).

    `deterministic` is accepted for the launcher's signature; everything here is deterministic.
    """
    grad_shrunk = scale * (grad_y @ lora_b)
    grad_b = scale * (grad_y.T @ shrunk)
    grad_a = grad_shrunk.T @ _dropout(x, dropout_p, seed)
    grad_bias = grad_y.sum(0) if need_bias_grad else grad_y.new_empty(0)
    return grad_a, grad_b, grad_shrunk, grad_bias


def lora_input_grad(grad_y, weight, grad_shrunk, lora_a, dropout_p, seed):
    """dx = dy @ W + (dS @ A) * m / (1-p), (M, K)."""
    return grad_y @ weight + _dropout(grad_shrunk @ lora_a, dropout_p, seed)


# ---------------------------------------------------------------------------------------------------------------
# Merge and re-initialise (ReLoRA restarts).
#   merge   W <- W + s * B @ A    accumulated in fp32 (fp64 for fp64 weights), rounded once into W's dtype
#   reinit  A <- U(-1/sqrt(K), 1/sqrt(K)) from Philox keyed by the seed, counted by A's flat index;  B <- 0
# ---------------------------------------------------------------------------------------------------------------


def merged_weight(weight, lora_a, lora_b, scale):
    """W + s * B @ A as a new tensor in W's dtype, accumulated in fp32 (fp64 for fp64) and rounded once."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return (weight.to(acc) + scale * (lora_b.to(acc) @ lora_a.to(acc))).to(weight.dtype)


def reinit_uniform(seed: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """U(-1/sqrt(cols), 1/sqrt(cols)) as fp32 (rows, cols): u = (top 24 bits) / 2**24 exactly, then (2u - 1) * bound.

    The kernel performs the same fp32 operations in the same order, so both give the same bits.
    """
    u = philox_bits(_seed_tensor(seed, device), rows, cols).to(torch.float32) * UNIT_SCALE
    bound = torch.tensor(cols**-0.5, dtype=torch.float32)
    return (u * 2.0 - 1.0) * bound


def merge_lora_weight_(weight, lora_a, lora_b, scale):
    """W <- W + s * B @ A in place (see merged_weight)."""
    with torch.no_grad():
        weight.copy_(merged_weight(weight, lora_a, lora_b, scale))


def reinit_lora_(lora_a, lora_b, seed):
    """A <- U(-1/sqrt(K), 1/sqrt(K)) keyed by `seed` (same seed, same A, on any process); B <- 0. In place."""
    with torch.no_grad():
        lora_a.copy_(reinit_uniform(seed, *lora_a.shape, device=lora_a.device))
        lora_b.zero_()


# ----------------------------------------------------------------------------------------------------------------
# FP8 (e4m3) quantisation of the frozen GEMMs' operands: one scale per row, a power of two
# ----------------------------------------------------------------------------------------------------------------

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value, 1.75 * 2**8
# The smallest scale exponent: a row scale is at least 2**-63, so that the product of two scales (the GEMM's
# dequantisation, row scale x column scale) stays a normal fp32 number. A row whose absolute maximum is below
# 448 * 2**-63 (~4.9e-17; an all-zero row, say) gets this scale and loses its smallest values to e4m3's range.
FP8_MIN_SCALE_EXPONENT = -63
_FP32_MANTISSA_BITS = 23
_FP32_EXPONENT_BIAS = 127
# 448 = (1 + 0x600000 / 2**23) * 2**8: a mantissa above this one needs the next power of two.
_FP8_MAX_MANTISSA = 0x600000
_FP8_MAX_EXPONENT = 8


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The scale of a row whose largest magnitude is `amax` (fp32): the smallest power of two s with amax / s <= 448,
    at least 2**FP8_MIN_SCALE_EXPONENT.

    A power of two because dividing by it is exact: quantising rounds once (the cast to e4m3), and dequantising
    (multiplying a GEMM's fp32 accumulator by two such scales) rounds never. Computed from the bits of amax with
    integer operations only, so that a kernel computing it the same way gets the same scale bit for bit (a log2 or a
    division could round differently in different libraries).
    """
    if amax.dtype != torch.float32:
        raise TypeError(f"amax must be float32, got {amax.dtype}")
    bits = amax.contiguous().view(torch.int32)
    exponent = ((bits >> _FP32_MANTISSA_BITS) & 0xFF) - _FP32_EXPONENT_BIAS
    mantissa = bits & ((1 << _FP32_MANTISSA_BITS) - 1)
    scale_exponent = exponent - _FP8_MAX_EXPONENT + (mantissa > _FP8_MAX_MANTISSA).to(torch.int32)
    scale_exponent = scale_exponent.clamp_min(FP8_MIN_SCALE_EXPONENT)
    return ((scale_exponent + _FP32_EXPONENT_BIAS) << _FP32_MANTISSA_BITS).view(torch.float32)


def quantize_fp8_rows(t: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) for a 2-D tensor t: q (rows, cols) e4m3fn, contiguous, and scale (rows,) fp32, such that
    t[i, j] ~ q[i, j] * scale[i]. Each row is divided by its own `fp8_scale` and rounded to nearest (ties to even)
    into e4m3; the clamp to +-448 only catches what rounding of the scale could not (never, with these scales),
    because e4m3fn has no infinity and an out-of-range cast would give NaN. NaN stays NaN.

    W (N, K) quantised by rows is the forward's operand (a scale per output feature), W.T (K, N) by rows the input
    gradient's (a scale per input feature); x (M, K) and dy (M, N) by rows, a scale per token.

    amax: (rows,) fp32, each row's largest magnitude over a larger tensor that t's rows are columns of (default:
    t's own). A shard holding some of W's rows quantises its block of W.T with the whole W's column maxima, so
    that its block is bit for bit that of W.T quantised whole.
    """
    if t.dim() != 2:
        raise ValueError(f"t must be 2-D, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor, got {t.dtype}")
    wide = t.float()
    if amax is None:
        amax = wide.abs().amax(dim=1) if t.shape[1] > 0 else wide.new_zeros(t.shape[0])
    elif amax.shape != (t.shape[0],) or amax.dtype != torch.float32:
        raise ValueError(f"amax must be fp32 of shape ({t.shape[0]},), got {amax.dtype} {tuple(amax.shape)}")
    scale = fp8_scale(amax)
    q = (wide / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.contiguous(), scale


def dequantize_fp8_rows(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """q * scale[:, None] in `dtype`: exact in float64 (and in fp32, the scales being powers of two)."""
    return q.to(dtype) * scale.to(dtype)[:, None]


# ----------------------------------------------------------------------------------------------------------------
# The op with an FP8 frozen weight: both frozen GEMMs on quantised operands, the low-rank path as lora_linear's
#
#   forward   y  = deq(xq, sx) @ deq(wq, sw).T + bias + s * S @ B.T      xq, sx = quantize_fp8_rows(x)
#   backward  dx = deq(dyq, sdy) @ deq(wtq, swt).T + (dS @ A) * m / (1-p)   dyq, sdy = quantize_fp8_rows(dy)
#             dS, dB, dA, dbias from the unquantised dy and x, as lora_grad_ab
#
# W is quantised twice, by rows of W (wq, sw: a scale per output feature) and by rows of W.T (wtq, swt: a scale per
# input feature), because each FP8 GEMM wants both operands K-major with one scale per row of each.
# ----------------------------------------------------------------------------------------------------------------


class FP8Weight(NamedTuple):
    """A frozen weight W (N, K) quantised for both frozen GEMMs (quantize_fp8_weight): derived data, rebuilt from W
    whenever W changes."""

    q: torch.Tensor  # (N, K) e4m3fn, W by rows: the forward's operand
    scale: torch.Tensor  # (N,) fp32, powers of two
    q_t: torch.Tensor  # (K, N) e4m3fn, W.T by rows: the input gradient's operand
    scale_t: torch.Tensor  # (K,) fp32, powers of two


def quantize_fp8_weight(weight: torch.Tensor, column_amax: torch.Tensor | None = None) -> FP8Weight:
    """Both FP8 copies of a 2-D frozen weight W (N, K) and their row scales (quantize_fp8_rows of W and of W.T).
    column_amax (K,) fp32: W.T's row maxima to scale by (quantize_fp8_rows' amax), for W a block of rows of a larger
    weight; default W's own."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(f"weight must be a 2-D floating-point tensor, got {getattr(weight, 'shape', weight)!r}")
    with torch.no_grad():
        q, scale = quantize_fp8_rows(weight)
        q_t, scale_t = quantize_fp8_rows(weight.T, column_amax)
    return FP8Weight(q, scale, q_t, scale_t)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fp8_matmul(lhs_q, lhs_scale, rhs_q, rhs_scale, out_dtype):
    """deq(lhs) @ deq(rhs).T = (lhs_q @ rhs_q.T) * lhs_scale[:, None] * rhs_scale[None, :], (M, N) in out_dtype:
    lhs_q (M, K) and rhs_q (N, K) e4m3fn, the scales fp32. Accumulated in fp32 (fp64 for an fp64 out_dtype) and
    rounded once: the twin of torch._scaled_mm with row-wise scales (kernels/passes_fp8.scaled_mm)."""
    acc = _accumulation_dtype(out_dtype)
    return (dequantize_fp8_rows(lhs_q, lhs_scale, acc) @ dequantize_fp8_rows(rhs_q, rhs_scale, acc).T).to(out_dtype)


def lora_forward_fp8(x, weight_q, weight_scale, lora_a, lora_b, scale, bias, dropout_p, seed):
    """(y, S) on 2-D x: y = deq(xq) @ deq(wq).T + bias + s * S @ B.T, S = dropout_p(x) @ A.T in x's dtype. The frozen
    product and the sum are accumulated in fp32 (fp64 for fp64 x) and rounded once into x's dtype."""
    acc = _accumulation_dtype(x.dtype)
    x_q, x_scale = quantize_fp8_rows(x)
    shrunk = lora_shrink(x, lora_a, dropout_p, seed)
    y = fp8_matmul(x_q, x_scale, weight_q, weight_scale, acc) + scale * (shrunk.to(acc) @ lora_b.to(acc).T)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), shrunk


def lora_backward_fp8(grad_y, x, weight_t_q, weight_t_scale, lora_a, lora_b, shrunk, scale, dropout_p, seed,
                      need_input_grad, need_bias_grad, deterministic=False):
    """(dx, dA, dB, dbias) on 2-D tensors, the arguments of kernels/passes_fp8.lora_backward_fp8: dA, dB, dbias as
    lora_grad_ab from the unquantised dy; dx = deq(dyq) @ deq(wtq).T + (dS @ A) * m / (1-p), accumulated in fp32
    (fp64 for fp64) and rounded once; dx an empty (0, K) tensor unless `need_input_grad`."""
    grad_a, grad_b, grad_shrunk, grad_bias = lora_grad_ab(grad_y, x, shrunk, lora_b, scale, dropout_p, seed,
                                                          need_bias_grad, deterministic)
    if not need_input_grad:
        return x.new_empty((0, x.shape[1])), grad_a, grad_b, grad_bias
    acc = _accumulation_dtype(x.dtype)
    grad_y_q, grad_y_scale = quantize_fp8_rows(grad_y)
    low_rank = _dropout(grad_shrunk.to(acc) @ lora_a.to(acc), dropout_p, seed)
    grad_x = fp8_matmul(grad_y_q, grad_y_scale, weight_t_q, weight_t_scale, acc) + low_rank
    return grad_x.to(x.dtype), grad_a, grad_b, grad_bias


class LoRALinearFP8Function(torch.autograd.Function):
    """The reference's autograd of the FP8 op on 2-D x: the backward quantises dy, which autograd through the
    forward's dequantised product would not."""

    @staticmethod
    def forward(ctx, x, weight_q, weight_scale, weight_t_q, weight_t_scale, lora_a, lora_b, bias, scale, dropout_p,
                seed):
        y, shrunk = lora_forward_fp8(x, weight_q, weight_scale, lora_a, lora_b, scale, bias, dropout_p, seed)
        ctx.save_for_backward(x, weight_t_q, weight_t_scale, lora_a, lora_b, shrunk)
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight_t_q, weight_t_scale, lora_a, lora_b, shrunk = ctx.saved_tensors
        need_x, _, _, _, _, need_a, need_b, need_bias = ctx.needs_input_grad[:8]
        grad_x, grad_a, grad_b, grad_bias = lora_backward_fp8(
            grad_y, x, weight_t_q, weight_t_scale, lora_a, lora_b, shrunk, ctx.scale, ctx.dropout_p, ctx.seed,
            need_x, need_bias)
        # The FP8 copies, their scales, scale, dropout_p and seed: no gradient (the copies are derived from a frozen W).
        return (grad_x if need_x else None, None, None, None, None, grad_a if need_a else None,
                grad_b if need_b else None, grad_bias if need_bias else None, None, None, None)


def lora_linear_fp8(x, frozen: FP8Weight, lora_a, lora_b, scale=1.0, bias=None, dropout_p=0.0, seed=0):
    """lora_linear with the frozen weight given as its FP8 copies (quantize_fp8_weight), x of any leading dims;
    differentiable in x, lora_a, lora_b and bias. seed: an int or a 0-d integer tensor."""
    x2 = x.reshape(-1, x.shape[-1])
    y = LoRALinearFP8Function.apply(x2, frozen.q, frozen.scale, frozen.q_t, frozen.scale_t, lora_a, lora_b, bias,
                                    scale, dropout_p, seed)
    return y.reshape(*x.shape[:-1], frozen.q.shape[0])

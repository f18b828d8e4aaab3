"""The two passes of the LoRA linear with an FP8 (e4m3) frozen weight, each frozen GEMM on its engine (fp8_engine).

    lora_forward_fp8    (y, S)     lora_shrink_quantize: S, xq, sx;
                                   Triton: y = fused_matmul_fp8(xq, wq) + s * S @ B.T + bias, one launch;
                                   cuBLAS-composed: y = scaled_mm(xq, wq); y += s * S @ B.T + bias (addmm, in place)
    lora_backward_fp8   (dx, dA, dB, dbias)
                                   dA, dB, dbias from the gradient launches on the unquantised dy and x, which also
                                   write dyq, sdy; dx = dyq @ wtq (FP8, scaled) + mask(dS @ A) / (1-p), by
                                   fused_matmul_fp8 (Triton) or scaled_mm and an addmm or add (cuBLAS-composed)

xq, sx = quantize_fp8_rows(x) and dyq, sdy = quantize_fp8_rows(dy) (reference.py's rule, one scale per token, bit for
bit, written by the launches that read x and dy anyway); W's copies wq (N, K) and wtq (K, N) are made once per change
of W by the caller (quantize_fp8_weight). The low-rank path stays in the activation dtype with fp32 accumulation
(docs/DESIGN.md section 1).

torch._scaled_mm cannot accumulate onto a start value as addmm can, so on the cuBLAS-composed engine the low-rank term
goes the other way: cuBLAS's addmm accumulates the rank-r product onto the FP8 GEMM's output, one extra read and
write of the (M, N) output (bias rides along as one more rank, a column of ones in S). The input gradient does the
same without dropout; with dropout the mask applies to dS @ A, which a GEMM cannot, so the dA launch writes
mask(dS @ A) / (1-p) (lora_grad_ab_start_quantize) and one add combines it with the FP8 GEMM's output: one more
(M, K) write and read than without dropout. The Triton FP8 GEMM adds the term, masked, in its epilogue.
"""

from __future__ import annotations

import functools

import torch

from .. import reference
from . import lora_linear, policy
from .launch import aligned_launches_apply, off_current_device, on_tensors_device
from .passes import (
    UNPLANNED,
    UNPLANNED_FORWARD,
    BackwardPlan,
    ForwardPlan,
    full_pass,
    unplanned_call,
    with_aligned_twin,
)


def scaled_mm(lhs_q: torch.Tensor, lhs_scale: torch.Tensor, rhs_q: torch.Tensor, rhs_scale: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """(lhs_q @ rhs_q.T) * lhs_scale[:, None] * rhs_scale[None, :] in out_dtype, on torch._scaled_mm with row-wise
    scales: lhs_q (M, K) and rhs_q (N, K) e4m3fn, row-major (rhs_q.T is then the column-major second operand FP8
    GEMMs want), the scales fp32. Accumulates in fp32 and rounds once (use_fast_accum off: Hopper's fast
    accumulation keeps fewer bits). reference.fp8_matmul is its twin.

    The package's one call of torch._scaled_mm, a private op whose signature has moved between torch versions: the
    arguments go by keyword (so a reordered schema cannot swap them), and a version that returns (out, amax) gives
    out. scaled_mm_support says whether this torch runs it on a device at all.
    """
    out = torch._scaled_mm(lhs_q, rhs_q.T, scale_a=lhs_scale[:, None], scale_b=rhs_scale[None, :],
                           out_dtype=out_dtype, use_fast_accum=False)
    return out[0] if isinstance(out, tuple) else out


@functools.cache
def scaled_mm_support(device_type: str, device_index: int | None, out_dtype: torch.dtype) -> str | None:
    """None where torch._scaled_mm runs with row-wise scales into `out_dtype` on this device, else why not (torch's
    error, with torch's version): probed once per (device, dtype) on a 16 x 16 x 16 problem, the smallest shape
    cuBLAS's FP8 GEMM takes."""
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    ones = torch.ones(16, 16, device=device).to(reference.FP8_DTYPE)
    scales = torch.ones(16, device=device)
    try:
        out = scaled_mm(ones, scales, ones, scales, out_dtype)
    except (RuntimeError, TypeError, NotImplementedError) as error:
        return f"torch {torch.__version__}: torch._scaled_mm with row-wise scales into {out_dtype} on {device}: " \
               f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
    if not bool((out.float() == 16.0).all()):
        return f"torch {torch.__version__}: torch._scaled_mm with row-wise scales into {out_dtype} on {device} " \
               f"computed a wrong product"
    return None


def fp8_engine(reduction: int) -> str:
    """The engine of an FP8 frozen GEMM reducing over `reduction` (K forward, N for dx): the engine setting where it
    is not auto, else policy.predicted_engine's rule on the reduction alone: the Triton fused GEMM saves the composed
    engine's extra write and read of the output, which weighs less than its predicted efficiency gap once the
    reduction is long. Its dtype clause (fp32 to cuBLAS) does not apply: the frozen GEMM is e4m3 whatever x's dtype.
    No tuned-table entries for FP8 yet: the rule is a prediction for FP8 as for bf16, unmeasured."""
    setting = policy.engine_setting()
    if setting != "auto":
        return setting
    return "cublas" if reduction >= policy.CUBLAS_MIN_REDUCTION else "triton"


def _add_low_rank_(out: torch.Tensor, low: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """out += low @ up (+ bias), in place in one addmm: one read and one write of out. Bias rides as one more rank
    (a column of ones in low, bias as a row of up), costing an (M, r+1) and an (r+1, N) copy, small beside out."""
    if bias is not None:
        low = torch.cat((low, low.new_ones(low.shape[0], 1)), dim=1)
        up = torch.cat((up, bias[None, :]), dim=0)
    return out.addmm_(low, up)


@on_tensors_device
def lora_forward_fp8(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor, lora_a: torch.Tensor,
                     lora_b: torch.Tensor, scale: float, bias: torch.Tensor | None, dropout_p: float,
                     seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, S): y = deq(xq) @ deq(wq).T + bias + s * S @ B.T in x's dtype, S = dropout_p(x) @ A.T kept for backward."""
    shrunk, x_q, x_scale = lora_linear.lora_shrink_quantize(x, lora_a, dropout_p, seed)
    if fp8_engine(x.shape[1]) == "triton":
        # the FP8 GEMM's accumulator, scaled, then s * S @ B.T + bias, in one launch
        return lora_linear.fused_matmul_fp8(x_q, x_scale, weight_q.T, weight_scale, shrunk, lora_b.T, scale, bias,
                                            0.0, None, x.dtype), shrunk
    y = scaled_mm(x_q, x_scale, weight_q, weight_scale, x.dtype)
    # y += s * S @ B.T + bias (s folded into B's copy: an (r, N) product, rounded once in x's dtype)
    return _add_low_rank_(y, shrunk, lora_b.T * scale, bias), shrunk


@on_tensors_device
def lora_backward_fp8(grad_y: torch.Tensor, x: torch.Tensor, weight_t_q: torch.Tensor, weight_t_scale: torch.Tensor,
                      lora_a: torch.Tensor, lora_b: torch.Tensor, shrunk: torch.Tensor, scale: float,
                      dropout_p: float, seed: torch.Tensor | None, need_input_grad: bool, need_bias_grad: bool,
                      deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, dbias); dx is an empty (0, K) tensor unless `need_input_grad`, dbias an empty (0,) one unless
    `need_bias_grad`. dS = s * dy @ B, dB = s * dy.T @ S, dA = dS.T @ x~, dbias = dy.sum(0) from the unquantised dy;
    dx = deq(dyq) @ deq(wtq).T + mask(dS @ A) / (1-p)."""
    if need_input_grad and fp8_engine(grad_y.shape[1]) == "triton":
        grad_a, grad_b, grad_shrunk, grad_bias, grad_y_q, grad_y_scale = lora_linear.lora_grad_ab_quantize(
            grad_y, x, shrunk, lora_b, scale, dropout_p, seed, need_bias_grad, deterministic)
        # dx = dy @ W (FP8) + mask(dS @ A) / (1-p): the mask of the (M, K) output, as the bf16 input gradient's
        grad_x = lora_linear.fused_matmul_fp8(grad_y_q, grad_y_scale, weight_t_q.T, weight_t_scale, grad_shrunk,
                                              lora_a, 1.0 / (1.0 - dropout_p), None, dropout_p, seed, x.dtype)
        return grad_x, grad_a, grad_b, grad_bias
    if need_input_grad and dropout_p > 0.0:
        grad_a, grad_b, grad_bias, start, grad_y_q, grad_y_scale = lora_linear.lora_grad_ab_start_quantize(
            grad_y, x, shrunk, lora_a, lora_b, scale, dropout_p, seed, need_bias_grad, deterministic)
        # dx = dy @ W (FP8) + mask(dS @ A) / (1-p)
        return start.add_(scaled_mm(grad_y_q, grad_y_scale, weight_t_q, weight_t_scale, x.dtype)), grad_a, grad_b, \
            grad_bias
    if not need_input_grad:
        grad_a, grad_b, _, grad_bias = lora_linear.lora_grad_ab(grad_y, x, shrunk, lora_b, scale, dropout_p, seed,
                                                                need_bias_grad, deterministic)
        return x.new_empty((0, x.shape[1])), grad_a, grad_b, grad_bias
    grad_a, grad_b, grad_shrunk, grad_bias, grad_y_q, grad_y_scale = lora_linear.lora_grad_ab_quantize(
        grad_y, x, shrunk, lora_b, scale, dropout_p, seed, need_bias_grad, deterministic)
    # dx = dy @ W (FP8) + dS @ A
    grad_x = _add_low_rank_(scaled_mm(grad_y_q, grad_y_scale, weight_t_q, weight_t_scale, x.dtype), grad_shrunk,
                            lora_a, None)
    return grad_x, grad_a, grad_b, grad_bias


# ----------------------------------------------------------------------------------------------------------------
# The eager path: each pass's launches planned once per key, as passes.py plans the bf16 op's (docs/DESIGN.md
# section 8)
# ----------------------------------------------------------------------------------------------------------------
# functional.py calls these outside tracing. The first call of a key runs the pass as above; its plan keeps the
# frozen GEMMs' engine, the FP8 GEMM's tile and every launch bound (lora_linear's *_launch functions), so later calls
# of the key go straight to allocating and launching. Nothing here is timed: the engine and the tile are settled by
# the key's first call. A key holds everything they and the launches depend on: shapes, strides, dtype, device, the
# scalars, the flags, matmul precision, and the settings and table in force; an empty input is never planned. The
# plans are passes.py's: `cublas` where the frozen GEMM runs on torch._scaled_mm, `gemm` the FP8 fused GEMM's launch
# (fused_matmul_fp8_launch), `grad_ab` quantising dy where dx is wanted.


_forward_plans: dict[tuple, ForwardPlan] = {}


def forward_key(x, frozen, lora_a, lora_b, bias, scale: float, dropout_p: float) -> tuple:
    """passes.forward_key of the FP8 op: the frozen weight's copies (an FP8Weight) in place of W, each tensor's
    type, shape, strides, dtype and device. Everything functional.py's checks of the FP8 op read is in it (the
    device's FP8 support and torch._scaled_mm's with it), so a key that has a plan belongs to calls they passed."""
    q, q_scale, q_t, q_t_scale = frozen
    return (type(x), x.shape, x.stride(), x.dtype, x.device, type(frozen),
            type(q), q.shape, q.stride(), q.dtype, q.device, type(q_scale), q_scale.shape, q_scale.stride(),
            q_scale.dtype, q_scale.device, type(q_t), q_t.shape, q_t.stride(), q_t.dtype, q_t.device,
            type(q_t_scale), q_t_scale.shape, q_t_scale.stride(), q_t_scale.dtype, q_t_scale.device,
            type(lora_a), lora_a.shape, lora_a.stride(), lora_a.dtype, lora_a.device,
            type(lora_b), lora_b.shape, lora_b.stride(), lora_b.dtype, lora_b.device,
            None if bias is None else (type(bias), bias.shape, bias.stride(), bias.dtype, bias.device),
            scale, dropout_p, *policy.choices_generation(x.dtype))


def planned_forward(key: tuple) -> ForwardPlan | None:
    """The plan of `key` if it launches by itself, else None (functional.py's look-up before its checks)."""
    plan = _forward_plans.get(key)
    return plan if plan is not None and plan.shrink is not None else None


@with_aligned_twin
def _forward_plan(x, weight_q, weight_scale, lora_a, lora_b, scale, bias, dropout_p, shrunk):
    (M, K), N = x.shape, weight_q.shape[0]
    if M == 0 or N == 0:
        return UNPLANNED_FORWARD
    shrink = lora_linear.shrink_launch(x, lora_a, dropout_p, quantize=True)
    if fp8_engine(K) == "cublas":
        return ForwardPlan(True, shrink, None, None)
    tile = lora_linear.fp8_gemm_tile(lora_a.shape[0], x.dtype)
    # xq and sx as lora_shrink_quantize allocates them: only their layout enters the key
    x_q, x_scale = x.new_empty((M, K), dtype=reference.FP8_DTYPE), x.new_empty((M,), dtype=torch.float32)
    return ForwardPlan(False, shrink, lora_linear.fused_matmul_fp8_launch(
        x_q, x_scale, weight_q.T, weight_scale, shrunk, lora_b.T, scale, bias, 0.0, tile, x.dtype), tile)


@with_aligned_twin
def _backward_plan(grad_y, x, weight_t_q, weight_t_scale, lora_a, lora_b, shrunk, scale, dropout_p, need_input_grad,
                   need_bias_grad, deterministic):
    M, N = x.shape[0], grad_y.shape[1]
    if M == 0 or N == 0:
        return UNPLANNED
    if not need_input_grad:
        return BackwardPlan(False, lora_linear.grad_ab_launches(grad_y, x, shrunk, None, lora_b, scale, dropout_p,
                                                                need_bias_grad, deterministic), None, None)
    if fp8_engine(N) == "cublas":
        # with dropout the dA launch also writes dx's start (lora_grad_ab_start_quantize)
        start_a = lora_a if dropout_p > 0.0 else None
        return BackwardPlan(True, lora_linear.grad_ab_launches(grad_y, x, shrunk, start_a, lora_b, scale, dropout_p,
                                                               need_bias_grad, deterministic, quantize_grad_y=True),
                            None, None)
    tile = lora_linear.fp8_gemm_tile(lora_a.shape[0], x.dtype)
    # dyq, sdy and dS as lora_grad_ab_quantize allocates them: only their layout enters the key
    grad_y_q, grad_y_scale = grad_y.new_empty((M, N), dtype=reference.FP8_DTYPE), grad_y.new_empty(
        (M,), dtype=torch.float32)
    grad_shrunk = shrunk.new_empty(shrunk.shape)
    return BackwardPlan(False, lora_linear.grad_ab_launches(
        grad_y, x, shrunk, None, lora_b, scale, dropout_p, need_bias_grad, deterministic, quantize_grad_y=True),
        lora_linear.fused_matmul_fp8_launch(grad_y_q, grad_y_scale, weight_t_q.T, weight_t_scale, grad_shrunk, lora_a,
                                            1.0 / (1.0 - dropout_p), None, dropout_p, tile, x.dtype), tile)


def eager_forward_fp8(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, scale: float, bias: torch.Tensor | None, dropout_p: float,
                      seed: torch.Tensor | None, key: tuple,
                      plan: ForwardPlan | None = None) -> tuple[torch.Tensor, torch.Tensor, ForwardPlan | None]:
    """lora_forward_fp8, for calls outside tracing (functional.py's eager path), through the plan of `key`
    (forward_key of the call's operands as the caller gave them), as passes.eager_forward: `plan` where the caller
    has looked it up. Returns (y, S, the key's plan or None), the plan for eager_backward_fp8's `forward_plan`. On
    x's device, as on_tensors_device would run it."""
    if off_current_device(x):
        with torch.cuda.device(x.device):
            return eager_forward_fp8(x, weight_q, weight_scale, lora_a, lora_b, scale, bias, dropout_p, seed, key,
                                     plan)
    if plan is None:
        plan = _forward_plans.get(key)
        if plan is None or plan.shrink is None:
            y, shrunk = unplanned_call(_forward_plans, key, plan, lora_forward_fp8, (
                x, weight_q, weight_scale, lora_a, lora_b, scale, bias, dropout_p, seed),
                lambda y_shrunk: _forward_plan(x, weight_q, weight_scale, lora_a, lora_b, scale, bias, dropout_p,
                                               y_shrunk[1]))
            return y, shrunk, _forward_plans.get(key)
    launches = plan.aligned if aligned_launches_apply(x, weight_q, weight_scale, lora_a, lora_b, bias, seed) else plan
    shrunk, x_q, x_scale = lora_linear.shrink_quantize_planned(launches.shrink, x, lora_a, dropout_p, seed)
    if launches.cublas:
        y = scaled_mm(x_q, x_scale, weight_q, weight_scale, x.dtype)
        return _add_low_rank_(y, shrunk, lora_b.T * scale, bias), shrunk, plan
    return lora_linear.forward_matmul_fp8_planned(x_q, x_scale, weight_q, weight_scale, shrunk, lora_b, bias,
                                                  launches.gemm), shrunk, plan


def eager_backward_fp8(grad_y: torch.Tensor, x: torch.Tensor, weight_t_q: torch.Tensor, weight_t_scale: torch.Tensor,
                       lora_a: torch.Tensor, lora_b: torch.Tensor, shrunk: torch.Tensor, scale: float,
                       dropout_p: float, seed: torch.Tensor | None, need_input_grad: bool, need_bias_grad: bool,
                       deterministic: bool, forward_plan: ForwardPlan | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """lora_backward_fp8, for calls outside tracing (functional.py's eager path), through its plan among
    `forward_plan`'s backward plans, as passes.eager_backward: forward_plan is what eager_forward_fp8 returned for
    x, lora_a, lora_b (the same tensors, saved) and S (its own); the key adds what only the backward knows, W.T's
    copy among it. Without a forward plan the pass runs in full. On dy's device, as on_tensors_device would run it."""
    args = (grad_y, x, weight_t_q, weight_t_scale, lora_a, lora_b, shrunk, scale, dropout_p, seed, need_input_grad,
            need_bias_grad, deterministic)
    if off_current_device(grad_y):
        with torch.cuda.device(grad_y.device):
            return eager_backward_fp8(*args, forward_plan)
    if forward_plan is None:
        return full_pass(lora_backward_fp8, args)
    plans = forward_plan.backward_plans
    key = (grad_y.stride(), grad_y.dtype, weight_t_q.stride(), weight_t_scale.stride(), need_input_grad,
           need_bias_grad, deterministic, *policy.choices_generation(x.dtype))
    plan = plans.get(key)
    if plan is None or plan is UNPLANNED:
        return unplanned_call(plans, key, plan, lora_backward_fp8, args, lambda _: _backward_plan(
            grad_y, x, weight_t_q, weight_t_scale, lora_a, lora_b, shrunk, scale, dropout_p, need_input_grad,
            need_bias_grad, deterministic))
    # shrunk is the forward's own allocation
    if aligned_launches_apply(grad_y, x, weight_t_q, weight_t_scale, lora_a, lora_b, seed):
        plan = plan.aligned
    # The gradient launches write dS, or, cuBLAS-composed with dropout, dx's start mask(dS @ A) / (1-p) instead
    # (`second`), and quantise dy where dx is asked for.
    start_a = lora_a if need_input_grad and plan.cublas and dropout_p > 0.0 else None
    grad_a, grad_b, second, grad_bias, grad_y_quantized = lora_linear.grad_ab_planned(
        plan.grad_ab, grad_y, x, shrunk, start_a, lora_b, scale, dropout_p, seed, need_bias_grad, deterministic)
    if not need_input_grad:
        return x.new_empty((0, x.shape[1])), grad_a, grad_b, grad_bias
    grad_y_q, grad_y_scale = grad_y_quantized
    if start_a is not None:
        # dx = dy @ W (FP8) + mask(dS @ A) / (1-p)
        return second.add_(scaled_mm(grad_y_q, grad_y_scale, weight_t_q, weight_t_scale, x.dtype)), grad_a, grad_b, \
            grad_bias
    if plan.cublas:
        # dx = dy @ W (FP8) + dS @ A
        grad_x = _add_low_rank_(scaled_mm(grad_y_q, grad_y_scale, weight_t_q, weight_t_scale, x.dtype), second,
                                lora_a, None)
    else:
        # dx = dy @ W (FP8) + mask(dS @ A) / (1-p), the mask of the (M, K) output
        grad_x = lora_linear.input_grad_fp8_planned(plan.gemm, grad_y_q, grad_y_scale, weight_t_q, weight_t_scale,
                                                    second, lora_a, dropout_p, seed)
    return grad_x, grad_a, grad_b, grad_bias

"""The two passes of the fused LoRA linear, each on the engine policy.py chooses for it, and the fused GEMM's tile.

    lora_forward    (y, S)              triton: lora_shrink, then the fused GEMM (lora_forward_matmul)
                                        cublas: lora_shrink_expand writes s * S @ B.T + bias into y, then addmm
    lora_backward   (dx, dA, dB, dbias) triton: lora_grad_ab, then the fused GEMM for dx (lora_input_grad)
                                        cublas: lora_grad_ab_start writes dx's low-rank term, then addmm

The fused GEMM runs on the tile policy.gemm_tile chooses (from the table, the tuner or the first fitting tile): the
pointer-load kernel of `lora_linear.py`, or on sm_90 the Hopper kernel of `fused_gemm_tma.py` where the tile is one
of its own and the operands allow TMA. This is the one module that imports both kernel files; ops.py registers
lora_forward and lora_backward as torch.library ops and functional.py calls them eagerly.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.fake_tensor import is_fake  # also sees through AOT tracing's functional tensors

from . import fused_gemm_tma, lora_linear, policy
from .launch import aligned_launches_apply, off_current_device, on_tensors_device, remember, static_ints


def _is_fake(*tensors: torch.Tensor) -> bool:
    """Whether the launch is being traced (torch.compile runs the launchers on fake tensors), or captured into a CUDA
    graph: then nothing can be timed."""
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return capturing or any(is_fake(t) for t in tensors)


def _forward_gemm(x, weight, rank: int, bias) -> policy.GemmLaunch:
    (M, K), N, rank = static_ints((x.shape, weight.shape[0], rank))
    return policy.GemmLaunch(x.dtype, policy.block_rank(rank), "forward", bias is not None, False, M, N, K)


def _input_grad_gemm(grad_y, weight, rank: int, dropout_p: float) -> policy.GemmLaunch:
    M, (N, K), rank = static_ints((grad_y.shape[0], weight.shape, rank))
    return policy.GemmLaunch(grad_y.dtype, policy.block_rank(rank), "input_grad", False, dropout_p > 0.0, M, K, N)


def _fused_matmul(lhs, rhs, low, up, low_scale, bias, dropout_p, seed, gemm):
    """out = lhs @ rhs + low_scale * mask(low @ up) + bias: lhs (M, K), rhs (K, N), low (M, R), up (R, N), any
    strides; `gemm` is the pass as the table knows it (_forward_gemm or _input_grad_gemm of the same operands). The
    pointer-load kernel, or fused_gemm_tma's where the tile chosen is a Hopper one."""
    out = None

    def launch(tile: policy.GemmTile) -> torch.Tensor:
        nonlocal out
        if tile.kernel == "tma":
            return fused_gemm_tma.fused_matmul_tma(lhs, rhs, low, up, low_scale, bias, dropout_p, seed, tile=tile)
        out = lora_linear.fused_matmul(lhs, rhs, low, up, low_scale, bias, dropout_p, seed, tile=tile, out=out)
        return out

    def time_tile(tile: policy.GemmTile) -> float:
        return triton.testing.do_bench(lambda: launch(tile), warmup=5, rep=20, return_mode="median")

    # Whether the operands allow TMA, and whether the launch can be timed, are asked only where they matter.
    tile = policy.gemm_tile(gemm, time_tile, tma_ok=lambda: fused_gemm_tma.tma_eligible(lhs, rhs),
                            timeable=lambda: not _is_fake(lhs))
    return launch(tile)


@on_tensors_device
def lora_forward_matmul(x: torch.Tensor, weight: torch.Tensor, shrunk: torch.Tensor, lora_b: torch.Tensor,
                        scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W.T + bias + s * S @ B.T, (M, N) in x's dtype; the low-rank term seeds the accumulator."""
    return _fused_matmul(x, weight.T, shrunk, lora_b.T, scale, bias, 0.0, None,
                         _forward_gemm(x, weight, lora_b.shape[1], bias))


@on_tensors_device
def lora_input_grad(grad_y: torch.Tensor, weight: torch.Tensor, grad_shrunk: torch.Tensor, lora_a: torch.Tensor,
                    dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """dx = dy @ W + (dS @ A) * m / (1-p), (M, K) in dy's dtype; the masked low-rank term seeds the accumulator."""
    return _fused_matmul(grad_y, weight, grad_shrunk, lora_a, 1.0 / (1.0 - dropout_p), None, dropout_p, seed,
                         _input_grad_gemm(grad_y, weight, lora_a.shape[0], dropout_p))


@on_tensors_device
def lora_forward(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                 bias: torch.Tensor | None, dropout_p: float,
                 seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, S): y = x @ W.T + bias + s * dropout_p(x) @ A.T @ B.T and S = dropout_p(x) @ A.T, kept for backward.
    triton: the shrink, then the fused GEMM; cublas: the shrink also writes s * S @ B.T + bias into y, then cuBLAS
    adds x @ W.T."""
    gemm = _forward_gemm(x, weight, lora_a.shape[0], bias)
    if policy.choose_engine(gemm) == "cublas":
        shrunk, y = lora_linear.lora_shrink_expand(x, lora_a, lora_b, scale, bias, dropout_p, seed)
        return y.addmm_(x, weight.T), shrunk
    shrunk = lora_linear.lora_shrink(x, lora_a, dropout_p, seed)
    return _fused_matmul(x, weight.T, shrunk, lora_b.T, scale, bias, 0.0, None, gemm), shrunk


@on_tensors_device
def lora_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                  lora_b: torch.Tensor, shrunk: torch.Tensor, scale: float, dropout_p: float,
                  seed: torch.Tensor | None, need_input_grad: bool, need_bias_grad: bool,
                  deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, dbias); dx is an empty (0, K) tensor unless `need_input_grad`, dbias an empty (0,) one unless
    `need_bias_grad`. dS, dB, dbias and dA from lora_grad_ab's two launches; dx = dy @ W + mask(dS @ A) / (1-p):
    triton, the fused GEMM; cublas, the dA launch also writes the low-rank term into dx, then cuBLAS adds dy @ W."""
    gemm = _input_grad_gemm(grad_y, weight, lora_a.shape[0], dropout_p)
    if need_input_grad and policy.choose_engine(gemm) == "cublas":
        grad_a, grad_b, grad_bias, grad_x = lora_linear.lora_grad_ab_start(grad_y, x, shrunk, lora_a, lora_b, scale,
                                                                           dropout_p, seed, need_bias_grad,
                                                                           deterministic)
        return grad_x.addmm_(grad_y, weight), grad_a, grad_b, grad_bias
    grad_a, grad_b, grad_shrunk, grad_bias = lora_linear.lora_grad_ab(grad_y, x, shrunk, lora_b, scale, dropout_p,
                                                                      seed, need_bias_grad, deterministic)
    if need_input_grad:
        grad_x = _fused_matmul(grad_y, weight, grad_shrunk, lora_a, 1.0 / (1.0 - dropout_p), None, dropout_p, seed,
                               gemm)
    else:
        grad_x = x.new_empty((0, x.shape[1]))
    return grad_x, grad_a, grad_b, grad_bias


# ----------------------------------------------------------------------------------------------------------------
# The eager path: each pass's launches planned once per key (docs/DESIGN.md section 8)
# ----------------------------------------------------------------------------------------------------------------
# functional.py calls these outside tracing. The first call of a key runs the pass as above, which chooses the engine
# and the tile (timing tiles if it must); once both are settled, the pass's plan keeps them with the launches they
# imply (lora_linear's *_launch functions: grid, arguments and compiled kernels), so later calls of the key go
# straight to allocating and launching. A key holds everything the choices and the launches depend on: shapes,
# strides, dtype, device, the scalars, matmul precision, and the settings and table in force.


class ForwardPlan(NamedTuple):
    """A forward pass's plan; passes_fp8.py's plans are of the same form (with its FP8 launches). One whose shrink is
    None runs the pass in full on every call (UNPLANNED_FORWARD: an empty input, or a Hopper tile, granted per
    call); it still keeps its backward's plans."""
    cublas: bool  # the frozen GEMM on cuBLAS
    shrink: object  # lora_linear.shrink_launch (with the expand of the cuBLAS-composed engine)
    gemm: object  # lora_linear.fused_matmul_launch on the Triton engine, else None
    tile: policy.GemmTile | None
    # The plans of this forward's backward, by what only the backward knows (eager_backward's key): the forward's
    # own key is not rebuilt and hashed again by every backward.
    backward_plans: dict | None = None
    aligned: ForwardPlan | None = None  # the same plan with each launch's AlignedLaunch (with_aligned_twin)


class BackwardPlan(NamedTuple):
    """A backward pass's plan; passes_fp8.py's plans are of the same form (with its FP8 launches)."""
    cublas: bool  # dy @ W on cuBLAS, with need_input_grad
    grad_ab: tuple  # lora_linear.grad_ab_launches
    gemm: object  # the input gradient's fused_matmul_launch on the Triton engine with need_input_grad, else None
    tile: policy.GemmTile | None
    aligned: BackwardPlan | None = None  # the same plan with each launch's AlignedLaunch (with_aligned_twin)


def with_aligned_twin(make_plan):
    """A plan maker whose ForwardPlan or BackwardPlan comes with its twin for calls whose inputs are all 16-byte
    aligned (the common case, tested once per call by launch.aligned_launches_apply): the same launches, each as its
    AlignedLaunch, which skips working out each pointer's specialisation. What the pass allocates is aligned, and
    the plan's key fixes every operand's dtype (x's; the checks of functional.py give every input x's dtype). A
    ForwardPlan's twin shares its backward plans."""

    @functools.wraps(make_plan)
    def make(*args):
        plan = make_plan(*args)
        if plan is None or plan is UNPLANNED:
            return plan
        if isinstance(plan, ForwardPlan):
            if plan.shrink is None:  # UNPLANNED_FORWARD: nothing to launch
                return plan._replace(backward_plans={})
            plan = plan._replace(backward_plans={})
            twin = plan._replace(shrink=plan.shrink.aligned, gemm=plan.gemm and plan.gemm.aligned)
        else:
            layout, grad_b, grad_a, quantize = plan.grad_ab
            twin = plan._replace(grad_ab=(layout, grad_b.aligned, grad_a.aligned, quantize and quantize.aligned),
                                 gemm=plan.gemm and plan.gemm.aligned)
        return plan._replace(aligned=twin)

    return make


# A key whose pass is never planned (an empty input; a Hopper tile, asked per call): the pass runs as above. A forward
# key is given UNPLANNED_FORWARD, a ForwardPlan that launches nothing itself but keeps its backward's plans.
UNPLANNED = "unplanned"
UNPLANNED_FORWARD = ForwardPlan(False, None, None, None)
_forward_plans: dict[tuple, ForwardPlan] = {}


def forward_key(x, weight, lora_a, lora_b, bias, scale: float, dropout_p: float) -> tuple:
    """The key of an eager forward call's plan: every operand's type, shape, strides, dtype and device (x as the
    caller gave it, before any flattening), the scalars, and the choices in force (matmul precision, settings, the
    table). Everything functional.py's argument checks and backend choice read is in it, so a key that has a plan
    belongs to calls those checks passed: functional.py's eager path looks the plan up first and skips them."""
    return (type(x), x.shape, x.stride(), x.dtype, x.device,
            type(weight), weight.shape, weight.stride(), weight.dtype, weight.device,
            type(lora_a), lora_a.shape, lora_a.stride(), lora_a.dtype, lora_a.device,
            type(lora_b), lora_b.shape, lora_b.stride(), lora_b.dtype, lora_b.device,
            None if bias is None else (type(bias), bias.shape, bias.stride(), bias.dtype, bias.device),
            scale, dropout_p, *policy.choices_generation(x.dtype))


def planned_forward(key: tuple) -> ForwardPlan | None:
    """The plan of `key` if it launches by itself, else None (functional.py's look-up before its checks)."""
    plan = _forward_plans.get(key)
    return plan if plan is not None and plan.shrink is not None else None



@with_aligned_twin
def _forward_plan(x, weight, lora_a, lora_b, scale, bias, dropout_p, shrunk):
    M = x.shape[0]
    if M == 0 or weight.shape[0] == 0:
        return UNPLANNED_FORWARD
    gemm = _forward_gemm(x, weight, lora_a.shape[0], bias)
    if policy.choose_engine(gemm) == "cublas":
        return ForwardPlan(True, lora_linear.shrink_launch(x, lora_a, dropout_p, (lora_b, scale, bias)), None, None)
    tile = policy.settled_tile(gemm)
    if tile is None:
        return UNPLANNED_FORWARD if _hopper_tile_possible(gemm) else None
    return ForwardPlan(False, lora_linear.shrink_launch(x, lora_a, dropout_p),
                       lora_linear.fused_matmul_launch(x, weight.T, shrunk, lora_b.T, scale, bias, 0.0, tile), tile)


@with_aligned_twin
def _backward_plan(grad_y, x, weight, lora_a, lora_b, shrunk, scale, dropout_p, need_input_grad, need_bias_grad,
                   deterministic):
    M, K = x.shape
    if M == 0 or grad_y.shape[1] == 0:
        return UNPLANNED
    gemm = _input_grad_gemm(grad_y, weight, lora_a.shape[0], dropout_p)
    if need_input_grad and policy.choose_engine(gemm) == "cublas":
        return BackwardPlan(True, lora_linear.grad_ab_launches(grad_y, x, shrunk, lora_a, lora_b, scale, dropout_p,
                                                               need_bias_grad, deterministic), None, None)
    grad_ab = lora_linear.grad_ab_launches(grad_y, x, shrunk, None, lora_b, scale, dropout_p, need_bias_grad,
                                           deterministic)
    if not need_input_grad:
        return BackwardPlan(False, grad_ab, None, None)
    tile = policy.settled_tile(gemm)
    if tile is None:
        return UNPLANNED if _hopper_tile_possible(gemm) else None
    grad_shrunk = shrunk.new_empty(shrunk.shape)  # as _grad_ab allocates it: only its layout enters the key
    return BackwardPlan(False, grad_ab, lora_linear.fused_matmul_launch(
        grad_y, weight, grad_shrunk, lora_a, 1.0 / (1.0 - dropout_p), None, dropout_p, tile), tile)


def _hopper_tile_possible(gemm: policy.GemmLaunch) -> bool:
    """Whether the table gives the launch a Hopper tile, which gemm_tile grants per call (by the operands' layout):
    such a pass is never planned."""
    entry = None if policy.interpreting() else policy.table_entry(gemm)
    return bool(entry and entry.get("tile") and policy.parse_tile(entry["tile"]).kernel == "tma")


def unplanned_call(plans: dict, key: tuple, plan, full_pass, args: tuple, make_plan):
    """A call of a key that has no plan to run (`plan` None: not yet made; UNPLANNED or UNPLANNED_FORWARD: never
    made): `full_pass(*args)` without tracing's wrapper, then, where `plan` is None, `make_plan(result)` kept as the
    key's plan, unless it too is None (a choice not yet settled, such as a tuning still to finish: asked again next
    call). The eager passes of this module and of passes_fp8.py share it: a planned call is served from `plans[key]`
    by its caller."""
    with set_wrap_triton_enabled(False):
        result = full_pass(*args)
        if plan is None:
            made = make_plan(result)
            if made is not None:
                remember(plans, key, made)
    return result


def full_pass(pass_, args: tuple):
    """`pass_(*args)` without tracing's wrapper and without a plan: the backward of a forward that has none (a choice
    not yet settled when it ran)."""
    with set_wrap_triton_enabled(False):
        return pass_(*args)


def eager_forward(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                  bias: torch.Tensor | None, dropout_p: float, seed: torch.Tensor | None, key: tuple,
                  plan: ForwardPlan | None = None) -> tuple[torch.Tensor, torch.Tensor, ForwardPlan | None]:
    """lora_forward, for calls outside tracing (functional.py's eager path), through the plan of `key` (forward_key
    of the call's operands as the caller gave them, x before any flattening): `plan`, where the caller has looked it
    up (planned_forward), else found here. Returns (y, S, the key's plan), the plan, which holds its backward's, for
    the backward of the same call (eager_backward's `forward_plan`); None where the key has no plan yet. On x's
    device, as on_tensors_device would run it."""
    if off_current_device(x):
        with torch.cuda.device(x.device):
            return eager_forward(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, key, plan)
    if plan is None:
        plan = _forward_plans.get(key)
        if plan is None or plan.shrink is None:
            y, shrunk = unplanned_call(_forward_plans, key, plan, lora_forward, (
                x, weight, lora_a, lora_b, scale, bias, dropout_p, seed), lambda y_shrunk: _forward_plan(
                    x, weight, lora_a, lora_b, scale, bias, dropout_p, y_shrunk[1]))
            return y, shrunk, _forward_plans.get(key)
    launches = plan.aligned if aligned_launches_apply(x, weight, lora_a, lora_b, bias, seed) else plan
    if launches.cublas:
        return (*lora_linear.forward_composed_planned(launches.shrink, x, weight, lora_a, lora_b, bias, dropout_p,
                                                      seed), plan)
    return (*lora_linear.forward_planned(launches.shrink, launches.gemm, x, weight, lora_a, lora_b, bias, dropout_p,
                                         seed), plan)


def eager_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, shrunk: torch.Tensor, scale: float, dropout_p: float,
                   seed: torch.Tensor | None, need_input_grad: bool, need_bias_grad: bool, deterministic: bool,
                   forward_plan: ForwardPlan | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """lora_backward, for calls outside tracing (functional.py's eager path), through its plan among `forward_plan`'s
    backward plans: forward_plan is what eager_forward returned for x, weight, lora_a, lora_b (the same tensors,
    saved) and S (its own), which fixes their layout; the key adds what only the backward knows. Without a forward
    plan the pass runs in full. On dy's device, as on_tensors_device would run it."""
    args = (grad_y, x, weight, lora_a, lora_b, shrunk, scale, dropout_p, seed, need_input_grad, need_bias_grad,
            deterministic)
    if off_current_device(grad_y):
        with torch.cuda.device(grad_y.device):
            return eager_backward(*args, forward_plan)
    if forward_plan is None:
        return full_pass(lora_backward, args)
    plans = forward_plan.backward_plans
    key = (grad_y.stride(), grad_y.dtype, need_input_grad, need_bias_grad, deterministic,
           *policy.choices_generation(x.dtype))
    plan = plans.get(key)
    if plan is None or plan is UNPLANNED:
        return unplanned_call(plans, key, plan, lora_backward, args, lambda _: _backward_plan(
            grad_y, x, weight, lora_a, lora_b, shrunk, scale, dropout_p, need_input_grad, need_bias_grad,
            deterministic))
    if aligned_launches_apply(grad_y, x, weight, lora_a, lora_b, seed):  # shrunk is the forward's own allocation
        plan = plan.aligned
    # The gradient launches write dS, or, cuBLAS-composed, dx's start mask(dS @ A) / (1-p) instead: `second`.
    grad_a, grad_b, second, grad_bias, _ = lora_linear.grad_ab_planned(
        plan.grad_ab, grad_y, x, shrunk, lora_a if plan.cublas else None, lora_b, scale, dropout_p, seed,
        need_bias_grad, deterministic)
    if plan.cublas:
        return second.addmm_(grad_y, weight), grad_a, grad_b, grad_bias
    if need_input_grad:
        grad_x = lora_linear.input_grad_planned(plan.gemm, grad_y, weight, second, lora_a, dropout_p, seed)
    else:
        grad_x = x.new_empty((0, x.shape[1]))
    return grad_x, grad_a, grad_b, grad_bias

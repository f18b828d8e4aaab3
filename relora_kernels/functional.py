"""The differentiable fused LoRA linear: `lora_linear`, backed by the Triton kernels or the reference.

    forward   S = dropout_p(x) @ A.T;  y = x @ W.T + bias + s * S @ B.T            (2 launches)
    backward  dS, dB, dA, dbias (2 launches);  dx = dy @ W + mask(dS @ A)/(1-p)     (3 launches)

(the Triton engine's launches; the cuBLAS-composed engine replaces each fused GEMM by a cuBLAS addmm onto a start
value written by the launch before it: kernels/policy.py).

Only S (M, r) is kept for the backward besides the inputs: the dropout mask is regenerated from the seed, which
travels as a 0-d int64 tensor on x's device (drawn there when the caller gives none), so neither the op nor
torch.compile ever reads it on the host. Under torch.compile the kernels are called through their torch.library ops
(ops.py); eagerly the autograd function calls the same launchers itself, without the ops' dispatch (docs/DESIGN.md
section 8).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
from torch._library.triton import set_wrap_triton_enabled

from . import reference
from ._backend import deterministic, use_triton
from ._validate import (
    MAX_RANK,
    check_dropout_p,
    check_float_tensor,
    check_kernel_dtype,
    check_lora_linear_args,
    check_lora_linear_fp8_args,
    check_lora_shapes,
    check_same_dtype_and_device,
    check_scalar,
    check_seed,
    is_dtensor,
)
from .reference import FP8Weight

# Seeds drawn for seed=None stay below 2**31 so the kernels see one integer type (no recompilation).
_DRAWN_SEED_LIMIT = 2**31


def _ops():
    # Imported on first use so that the reference path never needs triton.
    from . import ops

    return ops


def _kernels():
    """The kernel modules the eager paths call (passes, passes_fp8, merge), imported on first use so that the reference
    path never needs triton, then a global's read: an import statement costs microseconds of host time on every call
    it is in."""
    global _kernel_modules
    if _kernel_modules is None:
        from .kernels import merge, passes, passes_fp8

        _kernel_modules = SimpleNamespace(passes=passes, passes_fp8=passes_fp8, merge=merge)
    return _kernel_modules


_kernel_modules = None


def _eager(x: torch.Tensor) -> bool:
    """Whether this call runs eagerly on plain tensors: then the autograd function calls the launchers itself
    (no torch.library dispatch, no wrap_triton), which costs the host a fraction of the registered ops' dispatch.
    Under torch.compile (or any tracing: fake and functional tensors are Tensor subclasses, as are DTensors) the
    registered ops run, which is what the compiler sees and captures whole; so do meta tensors, which only the ops'
    fake implementations can take."""
    return not torch.compiler.is_compiling() and type(x) in _PLAIN_TENSOR_TYPES and not x.is_meta


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _input_grads(ctx, grad_y, x, grad_x, grad_a, grad_b, grad_bias, no_grads=(None,) * 4):
    """backward's return: the gradients asked for, in forward's argument order (x, weight, lora_a, lora_b, bias, then
    the arguments in `no_grads`). dW = dy.T @ x only if the caller unfroze W (a full-rank phase); LoRA training keeps
    W frozen. scale, dropout_p and deterministic are Python scalars, seed an integer tensor, the plan's key and the
    plan Python objects: no gradient."""
    need_x, need_weight, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
    return (grad_x if need_x else None, grad_y.T @ x if need_weight else None, grad_a if need_a else None,
            grad_b if need_b else None, grad_bias if need_bias else None, *no_grads)


class EagerLoRALinearFunction(torch.autograd.Function):
    """Autograd of the kernel path on 2-D plain tensors outside tracing: the passes' eager plans (kernels/passes.py),
    one output y. `key` is the call's plan key (passes.forward_key), `plan` its plan where the caller found one. S is
    saved with the inputs, so that backward frees it (a graph kept alive by y after backward, as a training loop's
    loss is until the next step's, holds no (M, r) tensor per layer) and saved-tensor hooks (offloading,
    checkpointing) see it; the scalars, the seed and the forward's plan (which keeps its backward's plans) are kept on
    ctx in one tuple."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, deterministic, key, plan):
        y, shrunk, plan = _kernel_modules.passes.eager_forward(x, weight, lora_a, lora_b, scale, bias, dropout_p,
                                                               seed, key, plan)
        ctx.save_for_backward(x, weight, lora_a, lora_b, shrunk)
        ctx.state = (scale, dropout_p, seed, deterministic, plan)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_a, lora_b, shrunk = ctx.saved_tensors
        scale, dropout_p, seed, deterministic, plan = ctx.state
        grad_x, grad_a, grad_b, grad_bias = _kernel_modules.passes.eager_backward(
            grad_y, x, weight, lora_a, lora_b, shrunk, scale, dropout_p, seed, ctx.needs_input_grad[0],
            ctx.needs_input_grad[4], deterministic, plan)
        return _input_grads(ctx, grad_y, x, grad_x, grad_a, grad_b, grad_bias, (None,) * 6)


class LoRALinearFunction(torch.autograd.Function):
    """Autograd of the kernel path on 2-D x under tracing (torch.compile, functorch transforms, tensor subclasses):
    the torch.library ops, which the compiler sees whole; returns (y, S), S non-differentiable, kept for backward."""

    @staticmethod
    def forward(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, deterministic):
        if _eager(x):  # a functorch transform over plain tensors
            with set_wrap_triton_enabled(False):
                return _kernels().passes.lora_forward(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed)
        return _ops().lora_forward(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, deterministic = inputs
        _, shrunk = output
        ctx.mark_non_differentiable(shrunk)
        ctx.save_for_backward(x, weight, lora_a, lora_b, shrunk, seed)
        ctx.scale, ctx.dropout_p, ctx.deterministic = scale, dropout_p, deterministic

    @staticmethod
    def backward(ctx, grad_y, _grad_shrunk):
        x, weight, lora_a, lora_b, shrunk, seed = ctx.saved_tensors
        # dS = s * dy @ B;  dB = s * dy.T @ S;  dA = dS.T @ x~;  dbias = dy.sum(0);  dx = dy @ W + (dS @ A) * m / (1-p)
        args = (grad_y, x, weight, lora_a, lora_b, shrunk, ctx.scale, ctx.dropout_p, seed, ctx.needs_input_grad[0],
                ctx.needs_input_grad[4], ctx.deterministic)
        if _eager(grad_y):
            with set_wrap_triton_enabled(False):
                grad_x, grad_a, grad_b, grad_bias = _kernels().passes.lora_backward(*args)
        else:
            grad_x, grad_a, grad_b, grad_bias = _ops().lora_backward(*args)
        return _input_grads(ctx, grad_y, x, grad_x, grad_a, grad_b, grad_bias)


# Function.apply binds its arguments to forward's signature through inspect on every call (~10 us), only to fill in
# defaults, which EagerLoRALinearFunction has none of; with every argument given positionally and no functorch
# transform active, it then calls this, the C++ apply.
_apply_eagerly = super(torch.autograd.Function, EagerLoRALinearFunction).apply


def draw_seed() -> int:
    """A seed from torch's default generator (so torch.manual_seed reproduces it), below 2**31."""
    return int(torch.randint(_DRAWN_SEED_LIMIT, ()).item())


def _dropout_seed(seed, dropout_p: float, device: torch.device) -> torch.Tensor | None:
    """The dropout seed as a 0-d int64 tensor on `device`; None without dropout (the seed is then never read).

    seed=None draws one on the device from its default generator: no host sync, and inside a compiled graph it
    stays a graph op (Inductor then draws it with its own generator, as it does for torch's dropout).
    """
    if dropout_p == 0.0:
        return None
    if seed is None:
        return torch.randint(_DRAWN_SEED_LIMIT, (), dtype=torch.int64, device=device)
    # A fill kernel with the seed as its argument: torch.tensor(seed, device=...) would copy from the host and
    # synchronise the stream on every call.
    return torch.full((), seed, dtype=torch.int64, device=device)


# One C call answering for every device type (torch >= 2.4); older torch asks per device type below.
_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_inputs(*tensors):
    """Cast every floating tensor to the autocast dtype when autocast is on for x's device type."""
    if not _any_autocast_enabled():  # the common call: no autocast anywhere
        return tensors
    x = tensors[0]
    # Autocast has no meta device type (is_autocast_enabled("meta") raises): meta tensors, which only infer
    # shapes, are never cast.
    if not isinstance(x, torch.Tensor) or x.device.type == "meta" or not torch.is_autocast_enabled(x.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def lora_linear(x, weight, lora_a, lora_b, scale=1.0, bias=None, dropout_p=0.0, seed=None):
    """y = x @ weight.T + bias + scale * dropout_p(x) @ lora_a.T @ lora_b.T.

    Args:
        x: (..., K) input, any leading dims (none or several), any strides; M = 0 rows is valid.
        weight: (N, K) frozen weight. lora_a: (r, K). lora_b: (N, r). bias: (N,) or None.
        scale: the LoRA scale s (alpha / r). dropout_p: LoRA-branch dropout probability in [0, 1).
        seed: int keying the dropout mask; the mask depends only on (seed, element index), so the same seed gives
            the same mask on any backend. None draws one from the default generator of x's device (only when
            dropout_p > 0), so torch.manual_seed makes runs reproducible.

    Returns (..., N) in x's dtype. All tensors must share one dtype (float32, float16 or bfloat16) and one device;
    the computation runs in that dtype with fp32 accumulation. Under autocast (torch.autocast on x's device type)
    every floating input is first cast to the autocast dtype, as F.linear would be, so the output is in that dtype
    and each input's gradient comes back in the input's own dtype (e.g. fp32 parameters, bf16 compute).
    Differentiable in x, lora_a, lora_b and bias (and in weight, with a plain matmul, if it requires grad).
    """
    planned = _planned_call(_kernel_modules and _kernel_modules.passes, x, weight, lora_a, lora_b, bias, scale,
                            dropout_p)
    if planned is not None:  # a call like one already checked and planned: straight to its plan
        if seed is not None:
            check_seed(seed)
        seed = None if dropout_p == 0.0 else _dropout_seed(seed, dropout_p, x.device)  # no call where it is None
        return _lora_linear_eagerly(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, *planned)

    x, weight, lora_a, lora_b, bias = _autocast_inputs(x, weight, lora_a, lora_b, bias)
    check_lora_linear_args(x, weight, lora_a, lora_b, bias)
    scale = check_scalar("scale", scale)
    dropout_p = check_dropout_p(dropout_p)
    if seed is not None:
        check_seed(seed)  # also when p = 0, so a bad seed never passes unnoticed
    device = x.device
    # Drawn only when used, so p = 0 leaves torch's generator untouched.
    seed = _dropout_seed(seed, dropout_p, device)

    if not use_triton(device):
        return reference.lora_linear(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed)

    check_kernel_dtype("x", x)  # one dtype for all, checked above
    rank = lora_a.shape[0]
    if rank > MAX_RANK:
        raise ValueError(f"lora_a has r = {rank} rows; the Triton kernels support r <= {MAX_RANK}")
    if _eager(x) and not torch._C._are_functorch_transforms_active():
        key = _kernels().passes.forward_key(x, weight, lora_a, lora_b, bias, scale, dropout_p)
        return _lora_linear_eagerly(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, key, None)
    out_features, in_features = weight.shape
    flat = x if x.dim() == 2 else x.reshape(-1, in_features)
    y, _ = LoRALinearFunction.apply(flat, weight, lora_a, lora_b, bias, scale, dropout_p, seed, deterministic())
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


def _planned_call(passes, x, *args) -> tuple | None:
    """(key, plan) where an eager call of lora_linear (or lora_linear_fp8, `passes` passes_fp8) can skip its checks:
    its key (`passes.forward_key(x, *args)`) has a plan that launches by itself. The key holds everything the checks
    read, so the checks passed on a call of that key when the plan was made, and would pass again. Else None: no
    kernels loaded yet, scalars that are not floats (the checks convert them), autocast (which casts first),
    tracing or a functorch transform (the ops' path), or anything the key cannot be made of (the checks name it)."""
    # Compiling first: torch.compile reads it as a constant and traces nothing else here.
    if (torch.compiler.is_compiling() or passes is None or type(args[-1]) is not float or type(args[-2]) is not float
            or _any_autocast_enabled() or torch._C._are_functorch_transforms_active()):
        return None
    try:
        key = passes.forward_key(x, *args)
    except (AttributeError, TypeError, ValueError):  # an argument of the wrong kind: the checks name it
        return None
    plan = passes.planned_forward(key)
    return None if plan is None else (key, plan)


def _lora_linear_eagerly(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, key, plan):
    """lora_linear's checked call on plain tensors outside tracing: EagerLoRALinearFunction on x's (M, K) view."""
    out_features, in_features = weight.shape
    flat = x if x.dim() == 2 else x.reshape(-1, in_features)
    y = _apply_eagerly(flat, weight, lora_a, lora_b, bias, scale, dropout_p, seed, deterministic(), key, plan)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


class LoRALinearFP8Function(torch.autograd.Function):
    """Autograd of the FP8 op on 2-D x (kernels/passes_fp8.py); returns (y, S) as LoRALinearFunction does. Saves x,
    the FP8 copy of W.T and its scales, A, B, S and the seed: the forward's copy of W is not needed again."""

    @staticmethod
    def forward(x, weight_q, weight_scale, weight_t_q, weight_t_scale, lora_a, lora_b, bias, scale, dropout_p, seed,
                deterministic):
        if _eager(x):
            with set_wrap_triton_enabled(False):
                return _kernels().passes_fp8.lora_forward_fp8(x, weight_q, weight_scale, lora_a, lora_b, scale, bias,
                                                      dropout_p, seed)
        return _ops().lora_forward_fp8(x, weight_q, weight_scale, lora_a, lora_b, scale, bias, dropout_p, seed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, _, weight_t_q, weight_t_scale, lora_a, lora_b, _, scale, dropout_p, seed, deterministic = inputs
        _, shrunk = output
        ctx.mark_non_differentiable(shrunk)
        ctx.save_for_backward(x, weight_t_q, weight_t_scale, lora_a, lora_b, shrunk, seed)
        ctx.scale, ctx.dropout_p, ctx.deterministic = scale, dropout_p, deterministic

    @staticmethod
    def backward(ctx, grad_y, _grad_shrunk):
        x, weight_t_q, weight_t_scale, lora_a, lora_b, shrunk, seed = ctx.saved_tensors
        need_x, need_a, need_b, need_bias = (ctx.needs_input_grad[i] for i in (0, 5, 6, 7))
        # dS = s * dy @ B;  dB = s * dy.T @ S;  dA = dS.T @ x~;  dbias = dy.sum(0);
        # dx = deq(dyq) @ deq(wtq).T + (dS @ A) * m / (1-p)
        args = (grad_y, x, weight_t_q, weight_t_scale, lora_a, lora_b, shrunk, ctx.scale, ctx.dropout_p, seed, need_x,
                need_bias, ctx.deterministic)
        if _eager(grad_y):
            with set_wrap_triton_enabled(False):
                grad_x, grad_a, grad_b, grad_bias = _kernels().passes_fp8.lora_backward_fp8(*args)
        else:
            grad_x, grad_a, grad_b, grad_bias = _ops().lora_backward_fp8(*args)
        # The FP8 copies and their scales are derived from a frozen W: no gradient. scale, dropout_p and
        # deterministic are Python scalars, seed an integer tensor: none either.
        return (grad_x if need_x else None, None, None, None, None, grad_a if need_a else None,
                grad_b if need_b else None, grad_bias if need_bias else None, None, None, None, None)


class EagerLoRALinearFP8Function(torch.autograd.Function):
    """Autograd of the FP8 op on 2-D plain tensors outside tracing, as EagerLoRALinearFunction is the bf16 op's: the
    FP8 passes' eager plans (kernels/passes_fp8.py), one output y, S saved with the inputs as there."""

    @staticmethod
    def forward(ctx, x, weight_q, weight_scale, weight_t_q, weight_t_scale, lora_a, lora_b, bias, scale, dropout_p,
                seed, deterministic, key, plan):
        y, shrunk, plan = _kernel_modules.passes_fp8.eager_forward_fp8(x, weight_q, weight_scale, lora_a, lora_b,
                                                                       scale, bias, dropout_p, seed, key, plan)
        ctx.save_for_backward(x, weight_t_q, weight_t_scale, lora_a, lora_b, shrunk)
        ctx.state = (scale, dropout_p, seed, deterministic, plan)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight_t_q, weight_t_scale, lora_a, lora_b, shrunk = ctx.saved_tensors
        need_x, need_a, need_b, need_bias = (ctx.needs_input_grad[i] for i in (0, 5, 6, 7))
        scale, dropout_p, seed, deterministic, plan = ctx.state
        grad_x, grad_a, grad_b, grad_bias = _kernel_modules.passes_fp8.eager_backward_fp8(
            grad_y, x, weight_t_q, weight_t_scale, lora_a, lora_b, shrunk, scale, dropout_p, seed, need_x, need_bias,
            deterministic, plan)
        # The FP8 copies and their scales are derived from a frozen W: no gradient. scale, dropout_p and
        # deterministic are Python scalars, seed an integer tensor, the key and the plan Python objects: none either.
        return (grad_x if need_x else None, None, None, None, None, grad_a if need_a else None,
                grad_b if need_b else None, grad_bias if need_bias else None, None, None, None, None, None, None)


# The C++ apply, as _apply_eagerly.
_apply_fp8_eagerly = super(torch.autograd.Function, EagerLoRALinearFP8Function).apply


# FP8 tensor cores: Ada (sm_89) and Hopper (sm_90) onwards.
FP8_MIN_CAPABILITY = (8, 9)


@functools.cache
def _fp8_gpu_problem(device_index: int) -> str | None:
    """Why the FP8 op cannot run on this CUDA device (None if it can): asked once per device."""
    capability = torch.cuda.get_device_capability(device_index)
    if capability < FP8_MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device_index)} (cuda:{device_index}) has compute capability "
                f"{capability[0]}.{capability[1]}: FP8 tensor cores need {FP8_MIN_CAPABILITY[0]}."
                f"{FP8_MIN_CAPABILITY[1]} or higher (Ada, Hopper); keep the frozen weight in its own dtype there")
    return None


def _check_fp8_kernel_path(x, frozen) -> None:
    """What the FP8 kernel path needs beyond the shared checks: FP8 tensor cores, and where a frozen GEMM runs on the
    cuBLAS-composed engine, the shapes cuBLAS's FP8 GEMM takes and a torch._scaled_mm that runs for x's device and
    dtype."""
    check_kernel_dtype("x", x)
    if torch.compiler.is_compiling():
        return  # the device and torch were checked when the graph's first call ran eagerly, or torch's op says why
    if x.device.type == "cuda":
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        problem = _fp8_gpu_problem(index)
        if problem is not None:
            raise RuntimeError(problem)
    n, k = frozen.q.shape
    fp8_engine = _kernels().passes_fp8.fp8_engine
    engines = {fp8_engine(k), fp8_engine(n)}  # forward's reduction K, dx's N
    if "cublas" not in engines:
        return  # the Triton FP8 launches alone: no torch._scaled_mm
    if x.device.type == "cuda":
        if n % 16 or k % 16:
            raise ValueError(f"the FP8 frozen weight needs in_features and out_features divisible by 16 on CUDA "
                             f"(cuBLAS's FP8 GEMM), got weight ({n}, {k})")
    problem = _kernels().passes_fp8.scaled_mm_support(x.device.type, x.device.index, x.dtype)
    if problem is not None:
        raise RuntimeError(f"the FP8 frozen weight cannot run here: {problem}")


def lora_linear_fp8(x, frozen, lora_a, lora_b, scale=1.0, bias=None, dropout_p=0.0, seed=None):
    """lora_linear with the frozen weight as FP8 (e4m3) copies: y = x @ W.T + bias + scale * dropout_p(x) @ A.T @ B.T
    where both frozen GEMMs (x @ W.T forward, dy @ W for dx) run on FP8 operands with one power-of-two scale per row.

    Args:
        x: (..., K) input, any leading dims and strides; quantised per token (row) inside the op.
        frozen: `quantize_fp8_weight(weight)` of the frozen weight (N, K): its copies by rows of W and of W.T with
            their scales. Make it again whenever W changes (LoRALinear(frozen_dtype="fp8") does that itself).
        lora_a (r, K), lora_b (N, r), bias (N,) or None, scale, dropout_p, seed: as lora_linear.

    Returns (..., N) in x's dtype; x, lora_a, lora_b and bias share one dtype and device (frozen's tensors on that
    device). The low-rank path is lora_linear's (activation dtype, fp32 accumulation, the same dropout mask for the
    same seed); the frozen products accumulate in fp32 and differ from lora_linear's by the e4m3 rounding of x, dy
    and W (relative 2**-4 per operand at most). Autocast casts x, lora_a, lora_b and bias as lora_linear does.
    Differentiable in x, lora_a, lora_b and bias. On the kernels each frozen GEMM runs on the engine setting's engine
    (auto: the Triton FP8 GEMM for a reduction below policy.CUBLAS_MIN_REDUCTION, else torch._scaled_mm composed with
    the Triton launches); a CUDA GPU below compute capability 8.9 raises.
    """
    planned = _planned_call(_kernel_modules and _kernel_modules.passes_fp8, x, frozen, lora_a, lora_b, bias, scale,
                            dropout_p)
    if planned is not None:  # a call like one already checked and planned: straight to its plan
        if seed is not None:
            check_seed(seed)
        seed = None if dropout_p == 0.0 else _dropout_seed(seed, dropout_p, x.device)  # no call where it is None
        return _lora_linear_fp8_eagerly(x, frozen, lora_a, lora_b, bias, scale, dropout_p, seed, *planned)

    x, lora_a, lora_b, bias = _autocast_inputs(x, lora_a, lora_b, bias)
    check_lora_linear_fp8_args(x, frozen, lora_a, lora_b, bias)
    scale = check_scalar("scale", scale)
    dropout_p = check_dropout_p(dropout_p)
    if seed is not None:
        check_seed(seed)
    seed = _dropout_seed(seed, dropout_p, x.device)

    if not use_triton(x.device):
        return reference.lora_linear_fp8(x, frozen, lora_a, lora_b, scale, bias, dropout_p, seed)

    _check_fp8_kernel_path(x, frozen)
    rank = lora_a.shape[0]
    if rank > MAX_RANK:
        raise ValueError(f"lora_a has r = {rank} rows; the Triton kernels support r <= {MAX_RANK}")
    if _eager(x) and not torch._C._are_functorch_transforms_active():
        key = _kernels().passes_fp8.forward_key(x, frozen, lora_a, lora_b, bias, scale, dropout_p)
        return _lora_linear_fp8_eagerly(x, frozen, lora_a, lora_b, bias, scale, dropout_p, seed, key, None)
    out_features, in_features = frozen.q.shape
    flat = x if x.dim() == 2 else x.reshape(-1, in_features)
    y, _ = LoRALinearFP8Function.apply(flat, frozen.q, frozen.scale, frozen.q_t, frozen.scale_t, lora_a, lora_b, bias,
                                       scale, dropout_p, seed, deterministic())
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


def _lora_linear_fp8_eagerly(x, frozen, lora_a, lora_b, bias, scale, dropout_p, seed, key, plan):
    """lora_linear_fp8's checked call on plain tensors outside tracing: EagerLoRALinearFP8Function on x's (M, K)
    view."""
    out_features, in_features = frozen.q.shape
    flat = x if x.dim() == 2 else x.reshape(-1, in_features)
    y = _apply_fp8_eagerly(flat, frozen.q, frozen.scale, frozen.q_t, frozen.scale_t, lora_a, lora_b, bias, scale,
                           dropout_p, seed, deterministic(), key, plan)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


def quantize_fp8_weight(weight, column_amax=None):
    """reference.quantize_fp8_weight(weight, column_amax), bit for bit: the FP8 copies of a frozen weight W (N, K) by
    rows of W and of W.T with their row scales, by the quantising launch (one per copy) where the kernels run for W's
    device; by the reference's torch ops elsewhere, and on a CUDA GPU without FP8 (whose FP8 op refuses by name at
    its forward, so that moving such a layer there is not what fails). For a refresh of the copies after W changes.
    column_amax (K,) fp32 on W's device: the maxima W.T's rows are scaled by where W is a block of rows of a larger
    weight (an FSDP2 shard: distributed.quantize_fp8_weight_shard); default W's own."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(f"weight must be a 2-D floating-point tensor, got {getattr(weight, 'shape', weight)!r}")
    if column_amax is not None and (not isinstance(column_amax, torch.Tensor) or column_amax.dtype != torch.float32
                                    or column_amax.shape != (weight.shape[1],)
                                    or column_amax.device != weight.device):
        raise ValueError(f"column_amax must be fp32 of shape ({weight.shape[1]},) on {weight.device}, got "
                         f"{getattr(column_amax, 'dtype', type(column_amax))} "
                         f"{tuple(getattr(column_amax, 'shape', ()))}")
    if not use_triton(weight.device) or (weight.device.type == "cuda" and _fp8_gpu_problem(
            weight.device.index if weight.device.index is not None else torch.cuda.current_device())):
        return reference.quantize_fp8_weight(weight, column_amax)
    from .kernels import lora_linear as kernels  # imported on first use, as passes

    with torch.no_grad():
        return FP8Weight(*kernels.quantize_rows_fp8(weight), *kernels.quantize_rows_fp8(weight.T, column_amax))


def merge_and_reinit_(weight, lora_a, lora_b, scale, *, seed):
    """ReLoRA restart, in place: W <- W + scale * B @ A (fp32 accumulation, one rounding), then
    A <- U(-1/sqrt(K), 1/sqrt(K)) from a random stream keyed by `seed`, and B <- 0. Returns None.

    The layer's function is unchanged (B = 0 after), and the same seed gives the same A on any process, so DDP
    ranks stay identical with no broadcast. weight (N, K), lora_a (r, K), lora_b (N, r), one dtype and device.
    Plain tensors only: FSDP2-sharded (DTensor) parameters restart through LoRALinear.merge_and_reinit or ReLoRA.
    """
    if not _merge_args_pass(weight, lora_a, lora_b):
        if any(map(is_dtensor, (weight, lora_a, lora_b))):
            raise TypeError("merge_and_reinit_ takes plain tensors, got DTensors (FSDP2-sharded parameters): "
                            "restart the layer with LoRALinear.merge_and_reinit or ReLoRA.step, which merge each "
                            "shard locally")
        check_float_tensor("weight", weight, ndim=2)
        check_float_tensor("lora_a", lora_a, ndim=2)
        check_float_tensor("lora_b", lora_b, ndim=2)
        check_same_dtype_and_device(weight=weight, lora_a=lora_a, lora_b=lora_b)
        check_lora_shapes(weight, lora_a, lora_b)
    scale = check_scalar("scale", scale)
    seed = check_seed(seed)
    if not use_triton(weight.device):
        with torch.no_grad():  # in-place torch ops on parameters
            reference.merge_lora_weight_(weight, lora_a, lora_b, scale)
            reference.reinit_lora_(lora_a, lora_b, seed)
        return
    check_kernel_dtype("weight", weight)
    # The kernels write through pointers: no autograd to keep out of it.
    if _eager(weight):
        _kernels().merge.merge_and_reinit_eagerly(weight, lora_a, lora_b, scale, seed)
    else:
        ops = _ops()
        with torch.no_grad():  # the registered ops mutate parameters that require grad
            ops.merge_lora_weight_(weight, lora_a, lora_b, scale)
            ops.reinit_lora_(lora_a, lora_b, seed)


def _merge_args_pass(weight, lora_a, lora_b) -> bool:
    """Whether merge_and_reinit_'s tensor checks would pass, computed without their per-argument calls (as
    _validate's check of lora_linear's arguments); anything unexpected answers False and the full checks run."""
    try:
        (n, k), (r, k_a), (n_b, r_b) = weight.shape, lora_a.shape, lora_b.shape
        dtype, device = weight.dtype, weight.device
        return (type(weight) in _PLAIN_TENSOR_TYPES and type(lora_a) in _PLAIN_TENSOR_TYPES
                and type(lora_b) in _PLAIN_TENSOR_TYPES and dtype.is_floating_point and k_a == k and n_b == n
                and r_b == r and r >= 1 and lora_a.dtype == dtype and lora_b.dtype == dtype
                and lora_a.device == device and lora_b.device == device)
    except (AttributeError, TypeError, ValueError):
        return False

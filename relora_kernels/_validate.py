"""Argument checks shared by the public ops: clear ValueError/TypeError naming the argument and what it saw."""

from __future__ import annotations

import math
import numbers
import sys

import torch

from .reference import FP8_DTYPE, FP8Weight

SEED_LIMIT = 2**63


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def is_dtensor(t) -> bool:
    """True for a torch.distributed DTensor (e.g. a parameter sharded by FSDP2's fully_shard)."""
    # A DTensor exists only once torch.distributed.tensor has been imported, so looking it up in sys.modules keeps
    # that import (about a second) out of this package's own import.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def check_float_tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16 or bfloat16; float64 on the "
                        f"reference), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {t.dim()}-D ({_describe(t)})")


# What the Triton kernels compute in; float64 runs on the PyTorch reference only.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The largest rank the kernels take: their low-rank tiles live in registers and shared memory.
MAX_RANK = 256


def check_kernel_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: the Triton kernels compute in float32, float16 or bfloat16, got {t.dtype}; "
                        f"float64 runs on the PyTorch reference (RELORA_KERNELS_BACKEND=reference)")


def check_same_dtype_and_device(**tensors: torch.Tensor | None) -> None:
    present = [(name, t) for name, t in tensors.items() if t is not None]
    dtype, device = present[0][1].dtype, present[0][1].device
    if all(t.dtype == dtype and t.device == device for _, t in present):
        return  # the good path formats nothing
    seen = ", ".join(f"{name}: {t.dtype} on {t.device}" for name, t in present)
    if any(t.dtype != dtype for _, t in present):
        raise TypeError(f"all tensors must share one dtype; got {seen}")
    raise ValueError(f"all tensors must be on one device; got {seen}")


def check_scalar(name: str, value) -> float:
    if type(value) is float and -math.inf < value < math.inf:  # the common call, before the general checks
        return value
    symbolic = isinstance(value, torch.SymFloat)  # traced by torch.compile(dynamic=True): checked by its guards
    if isinstance(value, bool) or not (symbolic or isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not -math.inf < value < math.inf:  # comparisons rather than math.isfinite, which torch.compile cannot trace
        raise ValueError(f"{name} must be finite, got {value}")
    return value if symbolic else float(value)


def check_probability(name: str, value) -> float:
    """A real number in [0, 1) (a dropout probability)."""
    if type(value) is float and 0.0 <= value < 1.0:  # the common call, before the general checks
        return value
    p = check_scalar(name, value)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return p


def check_dropout_p(dropout_p) -> float:
    return check_probability("dropout_p", dropout_p)


def check_fraction(name: str, value) -> float:
    """A real number in [0, 1] (NaN fails the comparison, so it lands here too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a real number in [0, 1], got {value!r}")
    return float(value)


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_seed(seed) -> int:
    if type(seed) is int and 0 <= seed < SEED_LIMIT:  # the common call, before the general checks
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return int(seed)


def _lora_linear_args_pass(x, weight, lora_a, lora_b, bias) -> bool:
    """Whether check_lora_linear_args would pass, computed without its per-argument calls: the good path of every
    layer call. Anything unexpected answers False, and the full checks then say what is wrong."""
    try:
        (n, k), (r, k_a), (n_b, r_b) = weight.shape, lora_a.shape, lora_b.shape
        dtype, device = x.dtype, x.device
        good = (type(x) in _TENSOR_TYPES and type(weight) in _TENSOR_TYPES and type(lora_a) in _TENSOR_TYPES
                and type(lora_b) in _TENSOR_TYPES and dtype.is_floating_point and x.dim() >= 1 and x.shape[-1] == k
                and k_a == k and n_b == n and r_b == r and r >= 1
                and weight.dtype == dtype and lora_a.dtype == dtype and lora_b.dtype == dtype
                and weight.device == device and lora_a.device == device and lora_b.device == device)
        if bias is None or not good:
            return good
        return (type(bias) in _TENSOR_TYPES and bias.dim() == 1 and bias.shape[0] == n and bias.dtype == dtype
                and bias.device == device)
    except (AttributeError, TypeError, ValueError):  # not a tensor, or not 2-D: the full checks name it
        return False


# Exactly these types take the fast check; subclasses (DTensor, fake and functional tensors) the full one.
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def check_lora_linear_args(x, weight, lora_a, lora_b, bias) -> None:
    """Shapes per docs/DESIGN.md section 1: x (..., K), weight (N, K), lora_a (r, K), lora_b (N, r), bias (N,)."""
    if _lora_linear_args_pass(x, weight, lora_a, lora_b, bias):
        return
    _check_activation_and_factors(x, lora_a, lora_b, bias, weight=weight)
    check_lora_shapes(weight, lora_a, lora_b)
    _check_in_out_features(x, bias, "weight", weight)


def _lora_linear_fp8_args_pass(x, frozen, lora_a, lora_b, bias) -> bool:
    """Whether check_lora_linear_fp8_args would pass, as _lora_linear_args_pass for the unquantised op: the layer's
    good path in one expression; anything unexpected answers False and the full checks name what is wrong."""
    try:
        q, scale, q_t, scale_t = frozen
        (n, k), (r, k_a), (n_b, r_b) = q.shape, lora_a.shape, lora_b.shape
        dtype, device = x.dtype, x.device
        good = (type(frozen) is FP8Weight and all(type(t) in _TENSOR_TYPES for t in (x, q, scale, q_t, scale_t,
                                                                                     lora_a, lora_b))
                and q.dtype == FP8_DTYPE and q_t.dtype == FP8_DTYPE and scale.dtype == torch.float32
                and scale_t.dtype == torch.float32 and q_t.shape == (k, n) and scale.shape == (n,)
                and scale_t.shape == (k,) and dtype.is_floating_point and x.dim() >= 1 and x.shape[-1] == k
                and k_a == k and n_b == n and r_b == r and r >= 1 and lora_a.dtype == dtype and lora_b.dtype == dtype
                and all(t.device == device for t in (q, scale, q_t, scale_t, lora_a, lora_b)))
        if bias is None or not good:
            return good
        return (type(bias) in _TENSOR_TYPES and bias.dim() == 1 and bias.shape[0] == n and bias.dtype == dtype
                and bias.device == device)
    except (AttributeError, TypeError, ValueError):  # not a 4-field weight, not a tensor, not 2-D: named below
        return False


def check_lora_linear_fp8_args(x, frozen, lora_a, lora_b, bias) -> None:
    """check_lora_linear_args with the frozen weight as its FP8 copies: x, lora_a, lora_b and bias share one dtype
    and device, frozen's tensors are on that device (check_fp8_weight)."""
    if _lora_linear_fp8_args_pass(x, frozen, lora_a, lora_b, bias):
        return
    _check_activation_and_factors(x, lora_a, lora_b, bias)
    check_fp8_weight(frozen, x)
    check_lora_shapes(frozen.q, lora_a, lora_b)
    _check_in_out_features(x, bias, "frozen.q", frozen.q)


def _check_activation_and_factors(x, lora_a, lora_b, bias, **weight) -> None:
    """x (..., K), the factors and bias float tensors of one dtype and device; `weight` (name=W), where given, too."""
    check_float_tensor("x", x)
    for name, tensor in weight.items():
        check_float_tensor(name, tensor, ndim=2)
    check_float_tensor("lora_a", lora_a, ndim=2)
    check_float_tensor("lora_b", lora_b, ndim=2)
    if bias is not None:
        check_float_tensor("bias", bias, ndim=1)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., in_features), got a 0-d tensor")
    check_same_dtype_and_device(x=x, **weight, lora_a=lora_a, lora_b=lora_b, bias=bias)


def _check_in_out_features(x, bias, name: str, weight) -> None:
    """x's last dim is weight's in_features K and bias has its out_features N (weight (N, K), called `name`)."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dim ({x.shape[-1]}) must equal {name}'s in_features; x {tuple(x.shape)}, "
                         f"{name} {(n, k)}")
    if bias is not None and bias.shape[0] != n:
        raise ValueError(f"bias must have out_features = {n} elements to match {name} {(n, k)}, "
                         f"got shape {tuple(bias.shape)}")


def check_lora_shapes(weight, lora_a, lora_b) -> None:
    """weight (N, K), lora_a (r, K) with r >= 1, lora_b (N, r); all already known to be 2-D."""
    (n, k), r = weight.shape, lora_a.shape[0]
    if r < 1:
        raise ValueError(f"lora_a must have r >= 1 rows, got shape {tuple(lora_a.shape)}")
    if lora_a.shape[1] != k:
        raise ValueError(f"lora_a must be (r, {k}) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (n, r):
        raise ValueError(f"lora_b must be (out_features, r) = ({n}, {r}) to match weight {tuple(weight.shape)} and "
                         f"lora_a {tuple(lora_a.shape)}, got {tuple(lora_b.shape)}")


FROZEN_DTYPES = (None, "fp8")


def check_frozen_dtype(frozen_dtype) -> str | None:
    """None (W's own dtype) or "fp8" (e4m3 copies of W for both frozen GEMMs)."""
    if frozen_dtype not in FROZEN_DTYPES or isinstance(frozen_dtype, bool):
        raise ValueError(f"frozen_dtype must be None (the weight's own dtype) or 'fp8', got {frozen_dtype!r}")
    return frozen_dtype


def check_fp8_weight(frozen, x) -> None:
    """frozen: reference.FP8Weight of a (N, K) weight, on x's device: q (N, K) and q_t (K, N) float8_e4m3fn,
    scale (N,) and scale_t (K,) float32."""
    if not isinstance(frozen, FP8Weight):
        raise TypeError(f"frozen must be an FP8Weight (relora_kernels.quantize_fp8_weight(weight)), "
                        f"got {type(frozen).__name__}")
    for name in ("q", "scale", "q_t", "scale_t"):
        if not isinstance(getattr(frozen, name), torch.Tensor):
            raise TypeError(f"frozen.{name} must be a torch.Tensor, got {type(getattr(frozen, name)).__name__}")
    for name in ("q", "q_t"):
        t = getattr(frozen, name)
        if t.dtype != FP8_DTYPE or t.dim() != 2:
            raise TypeError(f"frozen.{name} must be a 2-D {FP8_DTYPE} tensor, got {_describe(t)}")
    (n, k) = frozen.q.shape
    expected = {"q_t": (k, n), "scale": (n,), "scale_t": (k,)}
    for name, shape in expected.items():
        t = getattr(frozen, name)
        if tuple(t.shape) != shape:
            raise ValueError(f"frozen.{name} must have shape {shape} to match frozen.q {(n, k)}, got {_describe(t)}")
    for name in ("scale", "scale_t"):
        if getattr(frozen, name).dtype != torch.float32:
            raise TypeError(f"frozen.{name} must be float32, got {_describe(getattr(frozen, name))}")
    for name in ("q", "scale", "q_t", "scale_t"):
        if getattr(frozen, name).device != x.device:
            raise ValueError(f"frozen.{name} must be on x's device {x.device}, got {_describe(getattr(frozen, name))}")

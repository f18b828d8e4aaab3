"""lora_linear_fp8 on both engines (the Triton launches through the interpreter; on the cuBLAS-composed engine
torch._scaled_mm on the CPU) against the float64 reference on the same quantised operands, and against the
unquantised op within the error e4m3 allows.

Bounds: on the quantised operands, Higham's a priori bound (helpers.rounding_bound) of the fp32 accumulations (the
frozen GEMM's K terms, the rank-r terms, the bias) plus DTYPE_ROUNDINGS roundings into the output dtype, each of at
most half an ulp of the magnitude |products| sums to (the FP8 GEMM's output, S or dS, s * B or the masked start, the
final sum; 4 on every path, 5 allowed); against the unquantised op, each quantised operand is off by at most 2**-4
of itself plus 2**-10 of its row scale (helpers.fp8_quantisation_error), so |xq wq - x w| <= ex @ (|w| + ew).T +
|x| @ ew.T, plus both computations' rounding bounds.
"""

from __future__ import annotations

import types

import pytest
import torch
from helpers import assert_within_bound, count_launches, fp8_quantisation_error, make_inputs, rounding_bound

import relora_kernels as rk
from relora_kernels import reference
from relora_kernels.kernels.passes_fp8 import scaled_mm_support

_PROBLEM = scaled_mm_support("cpu", None, torch.float32)
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"no FP8 GEMM on the CPU here: {_PROBLEM}")

GRAD_NAMES = ("x", "lora_a", "lora_b", "bias")
# (leading dims of x, K, N, r, scale). The interpreter's blocks are 32 wide.
SHAPES = {
    "M prime, K and N not multiples of any block, r < 16": ((37,), 45, 51, 5, 0.5),
    "3-D x, r = 8": ((3, 7), 40, 36, 8, 0.25),
}


DTYPE_ROUNDINGS = 5


def path_bound(dtype, fp32_terms: int, magnitude: torch.Tensor) -> torch.Tensor:
    """fp32 accumulation of `fp32_terms` products, then DTYPE_ROUNDINGS roundings into `dtype`, bounded a priori."""
    return rounding_bound(torch.float32, fp32_terms, magnitude) + rounding_bound(dtype, DTYPE_ROUNDINGS, magnitude)


@pytest.fixture
def fp8_kernels(monkeypatch, engine):
    """Force the kernels (the interpreter on CPU) on each engine in turn, block the op's reference fallback so a test
    proves the kernels ran, and count the two FP8 passes where the eager op reaches them, planned or not."""
    from relora_kernels import functional
    from relora_kernels.kernels import passes_fp8

    rk.configure(backend="triton")

    def forbidden(*args, **kwargs):
        raise AssertionError("the reference op ran where the Triton kernels were forced")

    monkeypatch.setattr(functional, "reference", types.SimpleNamespace(lora_linear_fp8=forbidden))
    return count_launches(monkeypatch, passes_fp8, ("eager_forward_fp8", "eager_backward_fp8"))


@pytest.fixture
def frozen_gemms(monkeypatch):
    """Count the FP8 frozen GEMMs by engine: torch._scaled_mm (cuBLAS-composed) and the Triton fused GEMM (its
    launch, which a planned call makes without fused_matmul_fp8's generic arguments)."""
    from relora_kernels.kernels import lora_linear, passes_fp8

    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # the op's probe (once per dtype) is no GEMM of it
        passes_fp8.scaled_mm_support("cpu", None, dtype)
    calls = count_launches(monkeypatch, passes_fp8, ("scaled_mm",))
    return count_launches(monkeypatch, lora_linear, {"_launch_fused_matmul_fp8": "fused_matmul_fp8"}, calls)


def run(fn, frozen, inputs, scale, dropout_p, seed, grad_out, dtype=None):
    """y and the gradients of x, lora_a, lora_b, bias of fn(x, frozen, ...) on fresh leaves (cast to `dtype`)."""
    leaves = {name: inputs[name].detach().to(dtype or inputs[name].dtype).requires_grad_()
              for name in GRAD_NAMES if inputs.get(name) is not None}
    y = fn(leaves["x"], frozen, leaves["lora_a"], leaves["lora_b"], scale, leaves.get("bias"), dropout_p, seed)
    y.backward(grad_out.to(y.device, y.dtype))  # grad_out may be built on the CPU (the same values on any device)
    return y.detach(), {name: t.grad for name, t in leaves.items()}


def grad_output(inputs, n, seed=1):
    lead = inputs["x"].shape[:-1]
    return torch.randn(*lead, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def bounds_on_quantised_operands(inputs, frozen, scale, dropout_p, seed, grad_out, dtype):
    """The rounding bound of y and every gradient against the float64 reference on the same quantised operands."""
    x = inputs["x"].reshape(-1, inputs["x"].shape[-1])
    dy = grad_out.reshape(-1, grad_out.shape[-1]).to(x.device, dtype)
    (n, k), r, m = frozen.q.shape, inputs["lora_a"].shape[0], x.shape[0]
    x_q, x_scale = reference.quantize_fp8_rows(x)
    dy_q, dy_scale = reference.quantize_fp8_rows(dy)
    a, b = inputs["lora_a"].double().abs(), inputs["lora_b"].double().abs()
    dropped = reference._dropout(x.double(), dropout_p, seed).abs()
    grad_dy = dy.double().abs()
    grad_shrunk = abs(scale) * grad_dy @ b  # |dS|
    shrunk = dropped @ a.T  # |S|
    w_q, w_t_q = (reference.dequantize_fp8_rows(q, s).abs() for q, s in ((frozen.q, frozen.scale),
                                                                         (frozen.q_t, frozen.scale_t)))
    y_mag = reference.dequantize_fp8_rows(x_q, x_scale).abs() @ w_q.T + abs(scale) * shrunk @ b.T
    if inputs.get("bias") is not None:
        y_mag = y_mag + inputs["bias"].double().abs()
    keep_scale = reference._dropout(torch.ones(m, k, dtype=torch.float64, device=x.device), dropout_p, seed)  # m/(1-p)
    dx_mag = reference.dequantize_fp8_rows(dy_q, dy_scale).abs() @ w_t_q.T + (grad_shrunk @ a) * keep_scale
    bounds = {  # the fp32 terms: the frozen GEMM's reduction, then r + 1 low-rank terms (bias) and the sum
        "y": path_bound(dtype, k + r + 2, y_mag),
        "x": path_bound(dtype, n + r + 2, dx_mag),
        "lora_a": path_bound(dtype, n + m, grad_shrunk.T @ dropped),  # dS reduces N, dA the M tokens
        "lora_b": path_bound(dtype, k + m, abs(scale) * grad_dy.T @ shrunk),  # S reduces K, dB the M tokens
        "bias": path_bound(dtype, m, grad_dy.sum(0)),
    }
    return bounds


def check_against_float64_reference(inputs, scale, dropout_p, seed, dtype):
    n = inputs["weight"].shape[0]
    frozen = rk.quantize_fp8_weight(inputs["weight"])
    grad_out = grad_output(inputs, n)
    y, grads = run(rk.lora_linear_fp8, frozen, inputs, scale, dropout_p, seed, grad_out)
    # The same quantised operands: x and dy in float64 hold the same values, so they quantise identically.
    y64, grads64 = run(reference.lora_linear_fp8, frozen, inputs, scale, dropout_p, seed, grad_out.to(dtype),
                       dtype=torch.float64)
    bounds = bounds_on_quantised_operands(inputs, frozen, scale, dropout_p, seed, grad_out, dtype)
    assert y.dtype == dtype
    assert_within_bound("y", y.reshape(-1, n), y64.reshape(-1, n), bounds["y"])
    assert set(grads) == set(grads64)
    for name, grad in grads.items():
        assert grad.dtype == dtype, name
        want = grads64[name]
        if name == "x":
            grad, want = grad.reshape(-1, grad.shape[-1]), want.reshape(-1, want.shape[-1])
        assert_within_bound(f"d{name}", grad, want, bounds[name])


# Each shape with and without bias, each dtype with and without bias: half the product, per engine (CI time).
CASES = [(shape, bias, dtype) for shape, dtypes in zip(SHAPES, ((torch.float32, torch.float16),
                                                                (torch.float16, torch.float32)), strict=True)
         for bias, dtype in zip((True, False), dtypes, strict=True)]


@pytest.mark.parametrize(("shape", "bias", "dtype"), CASES,
                         ids=[f"{shape}-{'bias' if bias else 'no-bias'}-{dtype}" for shape, bias, dtype in CASES])
def test_fp8_op_matches_float64_reference_on_quantised_operands(shape, bias, dtype, fp8_kernels, frozen_gemms,
                                                                  engine):
    lead, k, n, r, scale = SHAPES[shape]
    check_against_float64_reference(make_inputs(lead, k, n, r, dtype, bias=bias), scale, 0.0, 0, dtype)
    assert fp8_kernels == {"eager_forward_fp8": 1, "eager_backward_fp8": 1}
    # both frozen GEMMs (y, dx) on the engine set, none on the other
    assert frozen_gemms == ({"scaled_mm": 2} if engine == "cublas" else {"fused_matmul_fp8": 2})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fp8_op_with_dropout_matches_float64_reference(dtype, fp8_kernels):
    # On the cuBLAS-composed engine dx takes another route with dropout (the dA launch writes the masked low-rank
    # start); on the Triton engine the fused GEMM applies the mask: each is checked.
    lead, k, n, r, scale = SHAPES["M prime, K and N not multiples of any block, r < 16"]
    check_against_float64_reference(make_inputs(lead, k, n, r, dtype), scale, 0.3, 1234, dtype)
    assert fp8_kernels == {"eager_forward_fp8": 1, "eager_backward_fp8": 1}


def test_strided_operands(fp8_kernels):
    # x a strided slice, W a transposed view (quantised into contiguous copies), lora_a and lora_b slices, dy a
    # transposed view.
    base = make_inputs((29,), 2 * 40, 36, 2 * 6, torch.float32)
    inputs = {
        "x": base["x"][:, ::2],
        "weight": base["weight"][:, :40].T.contiguous().T,
        "lora_a": base["lora_a"][::2, 1::2],
        "lora_b": base["lora_b"][:, ::2],
        "bias": base["bias"],
    }
    assert not any(t.is_contiguous() for name, t in inputs.items() if name != "bias")
    frozen = rk.quantize_fp8_weight(inputs["weight"])
    contiguous = rk.quantize_fp8_weight(inputs["weight"].contiguous())
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(frozen, contiguous, strict=True))
    check_against_float64_reference(inputs, 0.7, 0.2, 99, torch.float32)
    leaves = {name: inputs[name].detach().clone().requires_grad_() for name in GRAD_NAMES}
    y = rk.lora_linear_fp8(leaves["x"], frozen, leaves["lora_a"], leaves["lora_b"], 0.7, leaves["bias"])
    grad_out = torch.randn(36, 29).T  # a transposed view
    y.backward(grad_out)
    want = {name: inputs[name].detach().clone().requires_grad_() for name in GRAD_NAMES}
    reference.lora_linear_fp8(want["x"], frozen, want["lora_a"], want["lora_b"], 0.7, want["bias"]).backward(
        grad_out.contiguous())
    for name in GRAD_NAMES:  # one fp32 computation each, rounded differently: a few ulps of the reference's
        torch.testing.assert_close(leaves[name].grad, want[name].grad, msg=lambda m, n=name: f"d{n}: {m}")


def test_close_to_the_unquantised_op_within_e4m3_error(fp8_kernels):
    # The same seed drops the same elements in both ops; only the frozen GEMMs differ, by the e4m3 rounding.
    dtype, scale, p, seed = torch.float32, 0.5, 0.25, 7
    inputs = make_inputs((37,), 45, 51, 5, dtype)
    x, w = inputs["x"], inputs["weight"]
    frozen = rk.quantize_fp8_weight(w)
    grad_out = grad_output(inputs, 51)
    y8, grads8 = run(rk.lora_linear_fp8, frozen, inputs, scale, p, seed, grad_out)
    y, grads = run(lambda x, _, *rest: rk.lora_linear(x, w, *rest), None, inputs, scale, p, seed, grad_out)
    _, x_scale = reference.quantize_fp8_rows(x)
    dy = grad_out.to(dtype)
    _, dy_scale = reference.quantize_fp8_rows(dy)
    ex, ew = fp8_quantisation_error(x, x_scale), fp8_quantisation_error(w, frozen.scale)
    edy, ewt = fp8_quantisation_error(dy, dy_scale), fp8_quantisation_error(w.T, frozen.scale_t)
    x64, w64, dy64 = x.double().abs(), w.double().abs(), dy.double().abs()
    # Both ops' rounding, bounded generously by 2x the larger magnitude's rounding bound.
    y_rounding = 2 * rounding_bound(dtype, 45 + 5 + 4, (x64 + ex) @ (w64 + ew).T + (y.double().abs() + 1))
    dx_rounding = 2 * rounding_bound(dtype, 51 + 5 + 4, (dy64 + edy) @ (w64.T + ewt).T + grads["x"].double().abs() + 1)
    assert_within_bound("y", y8, y, ex @ (w64 + ew).T + x64 @ ew.T + y_rounding)
    assert_within_bound("dx", grads8["x"], grads["x"], edy @ (w64.T + ewt).T + dy64 @ ewt.T + dx_rounding)
    # dA, dB, dbias come from the unquantised dy and x, as the unquantised op's: the same launches.
    for name in ("lora_a", "lora_b", "bias"):
        torch.testing.assert_close(grads8[name], grads[name], msg=lambda m, n=name: f"d{n}: {m}")
    # and the FP8 error is there at all (the test would pass an op that ignored the copies otherwise)
    assert not torch.equal(y8, y)


def test_empty_batch(fp8_kernels):
    inputs = make_inputs((0,), 24, 32, 4, torch.float32)
    y, grads = run(rk.lora_linear_fp8, rk.quantize_fp8_weight(inputs["weight"]), inputs, 1.0, 0.1, 3,
                   torch.ones(0, 32))
    assert y.shape == (0, 32)
    assert grads["x"].shape == (0, 24)
    for name in ("lora_a", "lora_b", "bias"):
        assert torch.equal(grads[name], torch.zeros_like(inputs[name])), name


def test_deterministic_mode_is_bit_identical_run_to_run(fp8_kernels):
    rk.configure(deterministic=True)
    inputs = make_inputs((37,), 45, 51, 5, torch.float32)
    frozen = rk.quantize_fp8_weight(inputs["weight"])
    first = run(rk.lora_linear_fp8, frozen, inputs, 0.5, 0.2, 5, grad_output(inputs, 51))
    second = run(rk.lora_linear_fp8, frozen, inputs, 0.5, 0.2, 5, grad_output(inputs, 51))
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][name], second[1][name]) for name in GRAD_NAMES)
    check_against_float64_reference(inputs, 0.5, 0.2, 5, torch.float32)  # the partials' path, still right


def test_autocast_casts_the_activation_side_and_not_the_copies():
    # Under CPU autocast (bf16, the reference backend: the CPU default) x, A, B and bias are cast as lora_linear
    # casts them; the FP8 copies stay as they are; fp32 parameters get fp32 gradients.
    inputs = make_inputs((7,), 32, 16, 4, torch.float32)
    frozen = rk.quantize_fp8_weight(inputs["weight"])
    leaves = {name: inputs[name].clone().requires_grad_() for name in GRAD_NAMES}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rk.lora_linear_fp8(leaves["x"], frozen, leaves["lora_a"], leaves["lora_b"], 0.5, leaves["bias"])
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(leaves[name].grad.dtype == torch.float32 for name in GRAD_NAMES)
    assert frozen.q.dtype == reference.FP8_DTYPE


def test_reference_backend_in_bfloat16():
    # The CPU fallback (backend reference) in bf16: the same quantised operands, bf16 rounding.
    rk.configure(backend="reference")
    check_against_float64_reference(make_inputs((37,), 45, 51, 5, torch.bfloat16), 0.5, 0.3, 11, torch.bfloat16)


def test_engine_auto_chooses_by_each_gemms_reduction():
    # auto: the Triton FP8 GEMM below policy.CUBLAS_MIN_REDUCTION, cuBLAS's from it on, whatever x's dtype; a
    # setting other than auto is used as it is.
    from relora_kernels.kernels import policy
    from relora_kernels.kernels.passes_fp8 import fp8_engine

    rk.configure(engine="auto")
    assert fp8_engine(policy.CUBLAS_MIN_REDUCTION - 1) == "triton"
    assert fp8_engine(policy.CUBLAS_MIN_REDUCTION) == "cublas"
    rk.configure(engine="triton")
    assert fp8_engine(10 * policy.CUBLAS_MIN_REDUCTION) == "triton"
    rk.configure(engine="cublas")
    assert fp8_engine(16) == "cublas"


def test_engine_auto_runs_each_gemm_on_its_engine(monkeypatch, fp8_kernels, frozen_gemms):
    # K below the threshold and N at it: the forward on the Triton GEMM, dx (reducing N) on torch._scaled_mm.
    from relora_kernels.kernels import policy

    monkeypatch.setattr(policy, "CUBLAS_MIN_REDUCTION", 32)
    rk.configure(engine="auto")
    inputs = make_inputs((5,), 16, 32, 2, torch.float32)
    run(rk.lora_linear_fp8, rk.quantize_fp8_weight(inputs["weight"]), inputs, 1.0, 0.0, None,
        grad_output(inputs, 32))
    assert frozen_gemms == {"fused_matmul_fp8": 1, "scaled_mm": 1}


def test_a_gpu_without_fp8_tensor_cores_is_refused_by_name(monkeypatch):
    from relora_kernels import functional

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA A100-SXM4-80GB")
    functional._fp8_gpu_problem.cache_clear()
    try:
        problem = functional._fp8_gpu_problem(0)
        assert "NVIDIA A100-SXM4-80GB" in problem and "compute capability 8.0" in problem and "8.9" in problem
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
        functional._fp8_gpu_problem.cache_clear()
        assert functional._fp8_gpu_problem(0) is None
    finally:
        functional._fp8_gpu_problem.cache_clear()


@pytest.mark.parametrize(("change", "error", "words"), [
    (lambda f: "not an FP8Weight", TypeError, "frozen must be an FP8Weight"),
    (lambda f: f._replace(q=f.q.float()), TypeError, "frozen.q must be"),
    (lambda f: f._replace(scale=f.scale[:-1]), ValueError, "frozen.scale must have shape"),
    (lambda f: f._replace(q_t=f.q), ValueError, "frozen.q_t must have shape"),
    (lambda f: f._replace(scale_t=f.scale_t.double()), TypeError, "frozen.scale_t must be float32"),
])
def test_bad_frozen_weight_is_refused_by_name(change, error, words):
    inputs = make_inputs((5,), 24, 16, 2, torch.float32)
    frozen = change(rk.quantize_fp8_weight(inputs["weight"]))
    with pytest.raises(error, match=words):
        rk.lora_linear_fp8(inputs["x"], frozen, inputs["lora_a"], inputs["lora_b"])


def test_mismatched_activation_is_refused_by_name():
    inputs = make_inputs((5,), 24, 16, 2, torch.float32)
    frozen = rk.quantize_fp8_weight(inputs["weight"])
    with pytest.raises(ValueError, match="x's last dim"):
        rk.lora_linear_fp8(inputs["x"][:, :20], frozen, inputs["lora_a"], inputs["lora_b"])
    with pytest.raises(TypeError, match="one dtype"):
        rk.lora_linear_fp8(inputs["x"].half(), frozen, inputs["lora_a"], inputs["lora_b"])


def test_the_checks_good_path_passes_only_what_the_full_checks_pass():
    # The one-expression good path (_validate._lora_linear_fp8_args_pass) must answer False wherever the full checks
    # raise, so every bad call still gets its error naming the argument; and True on good calls, or it saves nothing.
    from relora_kernels import _validate

    inputs = make_inputs((5,), 24, 16, 2, torch.float32)
    x, lora_a, lora_b, bias = (inputs[k] for k in ("x", "lora_a", "lora_b", "bias"))
    frozen = rk.quantize_fp8_weight(inputs["weight"])
    meta = torch.empty(16, device="meta")
    calls = {
        "good": (x, frozen, lora_a, lora_b, bias), "good, 3-D x, no bias": (x[None], frozen, lora_a, lora_b, None),
        "plain tuple": (x, tuple(frozen), lora_a, lora_b, bias), "q 1-D": (x, frozen._replace(q=frozen.q[0]),
                                                                            lora_a, lora_b, bias),
        "q float": (x, frozen._replace(q=frozen.q.float()), lora_a, lora_b, bias),
        "scale short": (x, frozen._replace(scale=frozen.scale[:-1]), lora_a, lora_b, bias),
        "scale on meta": (x, frozen._replace(scale=meta), lora_a, lora_b, bias),
        "q_t untransposed": (x, frozen._replace(q_t=frozen.q), lora_a, lora_b, bias),
        "scale_t float64": (x, frozen._replace(scale_t=frozen.scale_t.double()), lora_a, lora_b, bias),
        "x narrow": (x[:, :20], frozen, lora_a, lora_b, bias), "x half": (x.half(), frozen, lora_a, lora_b, bias),
        "x 0-d": (x[0, 0], frozen, lora_a, lora_b, bias), "x int": (x.int(), frozen, lora_a, lora_b, bias),
        "lora_a K": (x, frozen, lora_a[:, :20], lora_b, bias), "lora_b r": (x, frozen, lora_a, lora_b[:, :1], bias),
        "lora_a no rows": (x, frozen, lora_a[:0], lora_b[:, :0], bias),
        "lora_b half": (x, frozen, lora_a, lora_b.half(), bias), "bias short": (x, frozen, lora_a, lora_b, bias[:-1]),
        "bias half": (x, frozen, lora_a, lora_b, bias.half()), "bias 2-D": (x, frozen, lora_a, lora_b, bias[None]),
        "lora_a list": (x, frozen, lora_a.tolist(), lora_b, bias),
    }
    for name, args in calls.items():
        try:
            _validate.check_lora_linear_fp8_args(*args)
            passes_in_full = True
        except (TypeError, ValueError):
            passes_in_full = False
        assert _validate._lora_linear_fp8_args_pass(*args) == passes_in_full == name.startswith("good"), name


def op_cases():
    inputs = make_inputs((37,), 40, 24, 5, torch.float32)  # M prime, r < 16
    x, lora_a, lora_b, bias = (inputs[k] for k in ("x", "lora_a", "lora_b", "bias"))
    frozen = rk.quantize_fp8_weight(inputs["weight"])
    seed = torch.tensor(5)
    shrunk = reference.lora_shrink(x, lora_a, 0.0, None)
    backward = (torch.randn(37, 24), x, frozen.q_t, frozen.scale_t, lora_a, lora_b, shrunk, 0.5)
    return {  # (op, its arguments, the engine setting)
        "forward, dropout, bias, triton": ("lora_forward_fp8", (x, frozen.q, frozen.scale, lora_a, lora_b, 0.5, bias,
                                                                0.2, seed), "triton"),
        "forward, cublas": ("lora_forward_fp8", (x, frozen.q, frozen.scale, lora_a, lora_b, 0.5, None, 0.0, None),
                            "cublas"),
        "backward, dropout, bias, triton": ("lora_backward_fp8", (*backward, 0.2, seed, True, True, False),
                                            "triton"),
        "backward, dropout, bias, cublas": ("lora_backward_fp8", (*backward, 0.2, seed, True, True, False),
                                            "cublas"),
        "backward, deterministic, cublas": ("lora_backward_fp8", (*backward, 0.0, None, True, False, True),
                                            "cublas"),
        "backward, no dx": ("lora_backward_fp8", (*backward, 0.0, None, False, False, False), "auto"),
    }


@pytest.mark.parametrize("case", list(op_cases()))
def test_fp8_ops_pass_opcheck(case):
    from relora_kernels import ops

    name, args, engine = op_cases()[case]
    rk.configure(engine=engine)
    # test_schema is left out: it compares the inputs before and after with float ops torch lacks for float8_e4m3fn.
    torch.library.opcheck(getattr(ops, name), args,
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_scaled_mm_matches_its_twin(dtype):
    # The shim around torch._scaled_mm (row-wise scales) against reference.fp8_matmul in float64: fp32 accumulation
    # of K exact products, one rounding into the dtype. bf16 included: only the Triton launches are untestable in
    # bf16 on the CPU, not this GEMM.
    from relora_kernels.kernels.passes_fp8 import scaled_mm

    if (problem := scaled_mm_support("cpu", None, dtype)) is not None:
        pytest.skip(problem)
    g = torch.Generator().manual_seed(0)
    lhs = torch.randn(37, 45, generator=g) * torch.logspace(-3, 3, 37)[:, None]  # rows over many scales
    rhs = torch.randn(51, 45, generator=g)
    (lhs_q, lhs_scale), (rhs_q, rhs_scale) = reference.quantize_fp8_rows(lhs), reference.quantize_fp8_rows(rhs)
    got = scaled_mm(lhs_q, lhs_scale, rhs_q, rhs_scale, dtype)
    want = reference.fp8_matmul(lhs_q, lhs_scale, rhs_q, rhs_scale, torch.float64)
    magnitude = reference.dequantize_fp8_rows(lhs_q, lhs_scale).abs() @ reference.dequantize_fp8_rows(
        rhs_q, rhs_scale).abs().T
    assert got.dtype == dtype
    assert_within_bound("scaled_mm", got, want, rounding_bound(torch.float32, 45, magnitude)
                        + rounding_bound(dtype, 1, magnitude))

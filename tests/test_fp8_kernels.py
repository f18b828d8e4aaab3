"""The FP8 (e4m3) launches of kernels/lora_linear.py through the interpreter, at the launcher level.

- fused_matmul_fp8 against float64 on the dequantised operands (only fp32 accumulation and the final rounding may
  err: the products of two e4m3 values are exact in fp32 and the power-of-two scales dequantise exactly), and against
  the float64 GEMM of the un-quantised operands within e4m3's own error.
- The quantising launches (the shrink's, the gradient launch's, quantize_rows_fp8) bit for bit against
  reference.quantize_fp8_rows, the one quantisation rule.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_within_bound, rounding_bound

from relora_kernels import reference
from relora_kernels.kernels import lora_linear
from relora_kernels.reference import FP8_DTYPE, dequantize_fp8_rows, quantize_fp8_rows

# e4m3: 3 mantissa bits, so a normal value rounds with a relative error of at most 2**-4; below the smallest normal
# (2**-6) the step is 2**-9 and the error at most half of it.
E4M3_RELATIVE_ERROR = 2.0**-4
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10


def rand(*shape, dtype=torch.float64, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed + 7 * sum(shape))
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)


def column_slice(t: torch.Tensor) -> torch.Tensor:
    """t as the left columns of a wider tensor: row stride > columns, unit column stride."""
    wide = torch.zeros(t.shape[0], t.shape[1] + 5, dtype=t.dtype)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


def quantisation_error(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The largest |dequantised - t| quantize_fp8_rows may leave per element, in float64."""
    return torch.maximum(t.double().abs() * E4M3_RELATIVE_ERROR,
                         E4M3_SUBNORMAL_HALF_STEP * scale.double()[:, None].expand_as(t))


# ---------------------------------------------------------------------------------------------------------------
# The FP8 fused GEMM
# ---------------------------------------------------------------------------------------------------------------


def gemm_case(M, K, N, R, out_dtype, gemm_pass, bias, strided):
    """The operands of one FP8 GEMM as the passes give them, plus the float64 originals.

    forward:    lhs = x (M, K), rhs = W.T from W (N, K) quantised by rows, low = S, up = B.T, low_scale = s
    input_grad: lhs = dy (M, K: here K = out_features), rhs = W from W.T quantised by rows, low = dS, up = A,
                low_scale = 1/(1-p); the output (M, N: N = in_features) dropped by the (M, N) mask."""
    lhs = rand(M, K, seed=1)
    weight = rand(N, K, std=K**-0.5, seed=2) if gemm_pass == "forward" else rand(K, N, std=N**-0.5, seed=2)
    low, up = rand(M, R, dtype=out_dtype, seed=3), rand(R, N, dtype=out_dtype, std=R**-0.5, seed=4)
    lhs_q, lhs_scale = quantize_fp8_rows(lhs)
    if gemm_pass == "forward":
        weight_q, rhs_scale = quantize_fp8_rows(weight)  # (N, K) by rows: a scale per output column
        rhs_q, rhs = weight_q.T, weight.T
    else:
        weight_t_q, rhs_scale = quantize_fp8_rows(weight.T)  # W.T (N, K) by rows
        rhs_q, rhs = weight_t_q.T, weight
    bias_t = rand(2 * N if strided else N, dtype=out_dtype, seed=5)[:: 2 if strided else 1] if bias else None
    if strided:  # lhs_q a slice of a wider buffer, low column-major, up a column slice, bias every other element
        lhs_q = column_slice(lhs_q)
        low = low.T.contiguous().T
        up = column_slice(up)
    return dict(lhs=lhs, rhs=rhs, lhs_q=lhs_q, lhs_scale=lhs_scale, rhs_q=rhs_q, rhs_scale=rhs_scale, low=low, up=up,
                bias=bias_t)


def run_fp8_gemm(case, low_scale, dropout_p, seed, out_dtype):
    return lora_linear.fused_matmul_fp8(case["lhs_q"], case["lhs_scale"], case["rhs_q"], case["rhs_scale"],
                                        case["low"], case["up"], low_scale, case["bias"], dropout_p, seed, out_dtype)


def reference_out(case, gemm_pass, low_scale, dropout_p, seed, lhs, rhs):
    """The launch's float64 twin on operands lhs (M, K), rhs (K, N): reference.lora_forward_matmul (rhs = W.T,
    up = B.T, low_scale = s) or reference.lora_input_grad (rhs = W, up = A, low_scale = 1/(1-p))."""
    low, up = case["low"].double(), case["up"].double()
    if gemm_pass == "forward":
        bias = None if case["bias"] is None else case["bias"].double()
        return reference.lora_forward_matmul(lhs, rhs.T, low, up.T, low_scale, bias)
    assert low_scale == 1.0 / (1.0 - dropout_p) and case["bias"] is None
    return reference.lora_input_grad(lhs, rhs, low, up, dropout_p, seed)


def magnitude(case, low_scale, lhs, rhs):
    """sum of |terms| of each output element, float64 (for rounding_bound)."""
    mag = lhs.abs() @ rhs.abs() + abs(low_scale) * case["low"].double().abs() @ case["up"].double().abs()
    return mag if case["bias"] is None else mag + case["bias"].double().abs()


GEMM_CASES = [
    # M prime, K and N no multiple of the 32-blocks, r < 16
    pytest.param(37, 72, 45, 5, torch.float32, "forward", True, False, 0.0, id="fp32-forward-bias"),
    pytest.param(53, 40, 70, 8, torch.float16, "forward", False, True, 0.0, id="fp16-forward-strided"),
    pytest.param(41, 70, 66, 17, torch.float32, "input_grad", False, True, 0.25, id="fp32-input-grad-dropout-r17"),
    pytest.param(29, 33, 50, 3, torch.float16, "input_grad", False, False, 0.1, id="fp16-input-grad-dropout"),
]


@pytest.mark.parametrize("M, K, N, R, out_dtype, gemm_pass, bias, strided, dropout_p", GEMM_CASES)
def test_fp8_gemm_matches_float64_on_the_dequantised_operands(M, K, N, R, out_dtype, gemm_pass, bias, strided,
                                                              dropout_p):
    case = gemm_case(M, K, N, R, out_dtype, gemm_pass, bias, strided)
    low_scale = 1.0 / (1.0 - dropout_p) if gemm_pass == "input_grad" else 0.75  # 1/(1-p), or s
    seed = torch.tensor(1234) if dropout_p > 0 else None
    got = run_fp8_gemm(case, low_scale, dropout_p, seed, out_dtype)
    assert got.dtype == out_dtype and got.shape == (M, N) and got.is_contiguous()

    lhs = dequantize_fp8_rows(case["lhs_q"], case["lhs_scale"])
    rhs = dequantize_fp8_rows(case["rhs_q"].T, case["rhs_scale"]).T
    exact = reference_out(case, gemm_pass, low_scale, dropout_p, 1234, lhs, rhs)
    mag = magnitude(case, low_scale, lhs, rhs)
    # fp32 accumulation of K + R exact products and the additions of the low-rank term and bias (K + R + 3 terms),
    # then one rounding into out_dtype, half an ulp of a value within 0.1 % of the magnitude.
    bound = rounding_bound(torch.float32, K + R + 3, mag) + torch.finfo(out_dtype).eps / 2 * mag * 1.001
    assert_within_bound("out", got, exact, bound)


@pytest.mark.parametrize("M, K, N, R, out_dtype, gemm_pass, bias, strided, dropout_p", GEMM_CASES[:3])
def test_fp8_gemm_is_within_e4m3_error_of_the_unquantised_gemm(M, K, N, R, out_dtype, gemm_pass, bias, strided,
                                                               dropout_p):
    case = gemm_case(M, K, N, R, out_dtype, gemm_pass, bias, strided)
    low_scale = 1.0 / (1.0 - dropout_p) if gemm_pass == "input_grad" else 0.75
    seed = torch.tensor(99) if dropout_p > 0 else None
    got = run_fp8_gemm(case, low_scale, dropout_p, seed, out_dtype)

    lhs, rhs = case["lhs"], case["rhs"]
    exact = reference_out(case, gemm_pass, low_scale, dropout_p, 99, lhs, rhs)
    # |a'b' - ab| <= |a| e_b + e_a |b| + e_a e_b per product, e the quantisation error of each operand element.
    lhs_error = quantisation_error(lhs, case["lhs_scale"])
    rhs_error = quantisation_error(rhs.T, case["rhs_scale"]).T
    quantised = lhs.abs() @ rhs_error + lhs_error @ rhs.abs() + lhs_error @ rhs_error
    mag = magnitude(case, low_scale, lhs.abs() + lhs_error, rhs.abs() + rhs_error)
    bound = quantised + rounding_bound(torch.float32, K + R + 3, mag) + torch.finfo(out_dtype).eps / 2 * mag * 1.001
    assert_within_bound("out", got, exact, bound)
    # The bound is e4m3's, not a loose one: it is ~2 * 2**-4 of the operands' |products|, and the error reached
    # is a sizeable part of it (a kernel that skipped the scales or the low-rank term would be far outside).
    err = (got.double() - exact).abs()
    assert (bound <= 2.2 * E4M3_RELATIVE_ERROR * mag).all()
    assert err.max() > 0.02 * bound.max(), "the quantisation error should be visible"


def test_fp8_gemm_rows_of_zeros_and_large_low_rank_term():
    # lhs row 0 and rhs column 0 all zero: both scales at their floor 2**-63, where starting the accumulator at
    # term / (lhs_scale * rhs_scale) would overflow; the term alone must come out.
    case = gemm_case(33, 40, 34, 4, torch.float32, "forward", True, False)
    lhs, rhs_t = case["lhs"].clone(), case["rhs"].T.clone()
    lhs[0], rhs_t[0] = 0.0, 0.0
    case["lhs_q"], case["lhs_scale"] = quantize_fp8_rows(lhs)
    rhs_q, case["rhs_scale"] = quantize_fp8_rows(rhs_t)
    case["rhs_q"] = rhs_q.T
    case["low"] = case["low"] * 1e3
    assert case["lhs_scale"][0] == 2.0**-63 and case["rhs_scale"][0] == 2.0**-63
    got = run_fp8_gemm(case, 0.75, 0.0, None, torch.float32)
    lhs_dq = dequantize_fp8_rows(case["lhs_q"], case["lhs_scale"])
    rhs_dq = dequantize_fp8_rows(case["rhs_q"].T, case["rhs_scale"]).T
    exact = reference_out(case, "forward", 0.75, 0.0, None, lhs_dq, rhs_dq)
    mag = magnitude(case, 0.75, lhs_dq, rhs_dq)
    assert_within_bound("out", got, exact, rounding_bound(torch.float32, 40 + 4 + 3, mag) * 2)


def test_fp8_gemm_empty_and_given_out():
    case = gemm_case(0, 40, 34, 4, torch.float32, "forward", False, False)
    assert run_fp8_gemm(case, 1.0, 0.0, None, torch.float32).shape == (0, 34)
    case = gemm_case(20, 40, 34, 4, torch.float16, "forward", False, False)
    out = torch.full((20, 34), float("nan"), dtype=torch.float16)
    got = lora_linear.fused_matmul_fp8(case["lhs_q"], case["lhs_scale"], case["rhs_q"], case["rhs_scale"],
                                       case["low"], case["up"], 1.0, None, 0.0, None, torch.float16, out=out)
    assert got is out and torch.isfinite(out).all()  # every element written


# ---------------------------------------------------------------------------------------------------------------
# The quantising launches: bit for bit the reference rule
# ---------------------------------------------------------------------------------------------------------------

# Rows whose scale is 1 (amax 448) and whose other values lie exactly halfway between two e4m3 neighbours: ties go
# to the even one, also where that carries into the next binade (1.9375 -> 2, 15 * 2**-10 -> 2**-6, the smallest
# normal) and among the subnormals (step 2**-9); and values whose rounding carries into the exponent (1.962 -> 2,
# 124.47 -> 128), which a plain fp32 -> e4m3 cast in the interpreter gets wrong.
TIES = [1.0625, 1.1875, 17.0, 19.0, 272.0, 304.0, 1.9375, 2.0**-10, 3 * 2.0**-10, 5 * 2.0**-10, 15 * 2.0**-10,
        1.962, 124.47, 7 * 2.0**-11, 0.0]


def awkward_rows(M, K, dtype, seed=0):
    """(M, K) with rows over many magnitudes (as wide as the dtype allows), a row of zeros, a row of -0.0 and small
    negatives that round to -0, and rows of ties (both signs)."""
    g = torch.Generator().manual_seed(seed)
    decades = (-25, 35) if dtype == torch.float32 else (-4, 4)
    t = torch.randn(M, K, generator=g) * torch.logspace(*decades, M)[:, None]
    t[1] = 0.0
    t[2] = -0.0
    t[2, ::3] = -(2.0**-12)
    ties = torch.tensor(TIES * (K // len(TIES) + 1))[: K - 1]
    t[3, 0], t[3, 1:] = 448.0, ties
    t[4, 0], t[4, 1:] = -448.0, -ties
    t[5] = t[3] * 2.0**-5  # the same ties at scale 2**-5
    return t.to(dtype)


def assert_quantised_like_the_reference(t, got_q, got_scale):
    want_q, want_scale = quantize_fp8_rows(t)
    assert got_q.dtype == FP8_DTYPE and got_q.shape == t.shape and got_q.is_contiguous()
    assert got_scale.dtype == torch.float32 and got_scale.shape == (t.shape[0],)
    scale_bad = got_scale.view(torch.int32) != want_scale.view(torch.int32)
    assert not scale_bad.any(), (f"{int(scale_bad.sum())} scales differ, first rows {scale_bad.nonzero()[:5].tolist()}"
                                 f": {got_scale[scale_bad][:5].tolist()} vs {want_scale[scale_bad][:5].tolist()}")
    bad = got_q.view(torch.uint8) != want_q.view(torch.uint8)
    if bad.any():
        where = bad.nonzero()[:5]
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} e4m3 values differ; first at {where.tolist()}: "
                             f"input {[t[i, j].item() for i, j in where]}, got {got_q[bad][:5].float().tolist()}, "
                             f"want {want_q[bad][:5].float().tolist()}")


@pytest.mark.parametrize(
    "M, K, R, dtype, dropout_p, strided",
    [
        pytest.param(71, 45, 5, torch.float32, 0.0, False, id="fp32"),  # M prime, K no multiple of 32, r < 16
        pytest.param(37, 70, 16, torch.float16, 0.2, False, id="fp16-dropout"),
        pytest.param(41, 33, 3, torch.float32, 0.1, True, id="fp32-column-major-dropout"),
    ],
)
def test_shrink_quantises_x_like_the_reference(M, K, R, dtype, dropout_p, strided):
    x = awkward_rows(M, K, dtype)
    if strided:
        x = x.T.contiguous().T
    lora_a = rand(R, K, dtype=dtype, std=K**-0.5)
    seed = torch.tensor(77) if dropout_p > 0 else None
    shrunk, x_q, x_scale = lora_linear.lora_shrink_quantize(x, lora_a, dropout_p, seed)
    # xq quantises x itself (the frozen GEMM's operand), not the dropped x~ of the LoRA branch.
    assert_quantised_like_the_reference(x, x_q, x_scale)
    assert torch.equal(shrunk, lora_linear.lora_shrink(x, lora_a, dropout_p, seed)), "S changed"


def test_shrink_quantise_no_tokens():
    shrunk, x_q, x_scale = lora_linear.lora_shrink_quantize(torch.ones(0, 40), torch.ones(4, 40), 0.0, None)
    assert shrunk.shape == (0, 4) and x_q.shape == (0, 40) and x_scale.shape == (0,)


@pytest.mark.parametrize(
    "M, N, dtype, layout",
    [
        pytest.param(70, 45, torch.float32, "contiguous", id="fp32"),  # more rows than one block, N ragged
        pytest.param(37, 130, torch.float16, "column-major", id="fp16-column-major"),  # 5 column blocks per row
        pytest.param(33, 40, torch.float32, "sliced", id="fp32-every-other-column"),
    ],
)
def test_quantize_rows_like_the_reference(M, N, dtype, layout):
    t = awkward_rows(M, N if layout != "sliced" else 2 * N, dtype, seed=3)
    t[6, 4] = float("inf")  # an infinite value: scale 2**120, clamped to 448
    t[7, :3] = -float("inf")
    if layout == "column-major":
        t = t.T.contiguous().T
    elif layout == "sliced":
        t = t[:, ::2]
    q, scale = lora_linear.quantize_rows_fp8(t)
    assert_quantised_like_the_reference(t, q, scale)


def test_quantize_rows_nan_stays_nan():
    t = rand(35, 40, dtype=torch.float32)
    t[3, 5] = float("nan")
    q, scale = lora_linear.quantize_rows_fp8(t)
    want_q, want_scale = quantize_fp8_rows(t)
    assert torch.equal(q.float().isnan(), want_q.float().isnan())
    keep = torch.ones(35, dtype=torch.bool)
    keep[3] = False  # the NaN row's scale follows the NaN's bits; the other rows are exact
    assert_quantised_like_the_reference(t[keep], q[keep], scale[keep])


def test_quantize_rows_empty():
    q, scale = lora_linear.quantize_rows_fp8(torch.ones(0, 5))
    assert q.shape == (0, 5) and scale.shape == (0,)
    q, scale = lora_linear.quantize_rows_fp8(torch.ones(3, 0))
    assert q.shape == (3, 0) and torch.equal(scale, torch.full((3,), 2.0**-63))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize(
    "M, N, K, R, dtype, strided",
    [
        pytest.param(37, 150, 40, 5, torch.float32, False, id="fp32"),  # 5 N chunks: a row is split over programs
        pytest.param(45, 100, 33, 16, torch.float16, True, id="fp16-column-major-dy"),
    ],
)
def test_gradient_launch_quantises_dy_like_the_reference(M, N, K, R, dtype, strided, deterministic):
    grad_y = awkward_rows(M, N, dtype, seed=5)
    if strided:
        grad_y = grad_y.T.contiguous().T
    x, shrunk = rand(M, K, dtype=dtype, seed=6), rand(M, R, dtype=dtype, seed=7)
    lora_b = rand(N, R, dtype=dtype, std=R**-0.5, seed=8)
    args = (grad_y, x, shrunk, lora_b, 0.5, 0.1, torch.tensor(5), True, deterministic)
    layout = lora_linear._grad_ab_layout(M, N, K, R, dtype, False, deterministic, None)
    assert layout[2][0] > 1, "each row of dy should be split over programs"

    *grads, grad_y_q, grad_y_scale = lora_linear.lora_grad_ab_quantize(*args)
    assert_quantised_like_the_reference(grad_y, grad_y_q, grad_y_scale)
    # The gradients are the plain launch's, bit for bit where the reductions are (deterministic).
    plain = lora_linear.lora_grad_ab(*args)
    for name, got, want in zip(("dA", "dB", "dS", "dbias"), grads, plain, strict=True):
        if deterministic or name == "dS":
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0 if dtype == torch.float32 else 1e-3)


def test_gradient_launch_with_dx_start_quantises_dy():
    M, N, K, R = 37, 70, 40, 5
    grad_y, x = awkward_rows(M, N, torch.float32, seed=9), rand(M, K, seed=10, dtype=torch.float32)
    shrunk, lora_a = rand(M, R, dtype=torch.float32, seed=11), rand(R, K, dtype=torch.float32, seed=12)
    lora_b = rand(N, R, dtype=torch.float32, seed=13)
    args = (grad_y, x, shrunk, lora_a, lora_b, 0.5, 0.0, None, False, True)
    *grads, grad_y_q, grad_y_scale = lora_linear.lora_grad_ab_start_quantize(*args)
    assert_quantised_like_the_reference(grad_y, grad_y_q, grad_y_scale)
    for got, want in zip(grads, lora_linear.lora_grad_ab_start(*args), strict=True):
        assert torch.equal(got, want)


def test_fp8_launches_refuse_a_gpu_without_fp8(monkeypatch):
    from relora_kernels.kernels import policy

    monkeypatch.setattr(policy, "interpreting", lambda: False)
    monkeypatch.setattr(policy, "current_arch", lambda: 80)
    t = torch.ones(4, 8)
    for launch in (lambda: lora_linear.quantize_rows_fp8(t),
                   lambda: lora_linear.lora_shrink_quantize(t, torch.ones(2, 8), 0.0, None),
                   lambda: lora_linear.fused_matmul_fp8(t, t[:, 0], t.T, t[:, 0], t, t, 1.0, None, 0.0, None,
                                                        torch.float32)):
        with pytest.raises(RuntimeError, match="compute capability 8.9 or later.*sm_80"):
            launch()

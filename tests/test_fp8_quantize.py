"""The FP8 quantisation rule of reference.py, the one every FP8 path (kernels, cuBLAS-composed engine, layer copies)
is checked against: power-of-two row scales, the smallest that keep a row within e4m3's +-448, and a rounding
error within e4m3's half ulp."""

import math

import pytest
import torch

from relora_kernels.reference import (
    FP8_DTYPE,
    FP8_MAX,
    FP8_MIN_SCALE_EXPONENT,
    dequantize_fp8_rows,
    fp8_scale,
    quantize_fp8_rows,
)

E4M3_MANTISSA_BITS = 3
E4M3_MIN_NORMAL = 2.0**-6
E4M3_SUBNORMAL_STEP = 2.0**-9


def rows_over_many_magnitudes(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(96, 37, generator=g) * torch.logspace(-25, 35, 96)[:, None]
    t[5] = 0.0
    t[7, :] = FP8_MAX  # exactly the largest e4m3 value: scale 1
    t[8, 0] = -448.0001  # just above: scale 2
    return t


def test_scales_are_the_smallest_powers_of_two_that_fit():
    t = rows_over_many_magnitudes()
    _, scale = quantize_fp8_rows(t)
    amax = t.abs().amax(dim=1).double()
    for a, s in zip(amax.tolist(), scale.double().tolist(), strict=True):
        mantissa, exponent = math.frexp(s)
        assert mantissa == 0.5, s  # a power of two
        assert a / s <= FP8_MAX
        if exponent - 1 > FP8_MIN_SCALE_EXPONENT:
            assert a / (s / 2) > FP8_MAX  # half of it would not fit
        else:
            assert s == 2.0**FP8_MIN_SCALE_EXPONENT
    assert scale[7] == 1.0 and scale[8] == 2.0


@pytest.mark.parametrize("transpose", [False, True], ids=["contiguous", "strided"])
def test_rounding_error_is_within_half_an_e4m3_ulp(transpose):
    t = rows_over_many_magnitudes(1)
    if transpose:  # a non-contiguous operand (a transposed view) quantises the same as its contiguous copy
        t = t.t().contiguous().t()
    q, scale = quantize_fp8_rows(t)
    assert q.dtype == FP8_DTYPE and q.is_contiguous() and scale.dtype == torch.float32
    scaled = t.double() / scale.double()[:, None]
    error = (q.double() - scaled).abs()
    # Half an ulp of e4m3: 2**-4 relative for normal values, half the subnormal step below the smallest normal.
    bound = torch.where(scaled.abs() >= E4M3_MIN_NORMAL, scaled.abs() * 2.0 ** -(E4M3_MANTISSA_BITS + 1),
                        torch.full_like(scaled, E4M3_SUBNORMAL_STEP / 2))
    assert (error <= bound).all()
    assert torch.equal(dequantize_fp8_rows(q, scale), q.double() * scale.double()[:, None])


def test_scale_from_bits_matches_the_float_rule():
    g = torch.Generator().manual_seed(2)
    amax = torch.rand(10_000, generator=g) * torch.logspace(-15, 35, 10_000)
    amax = torch.cat([amax, torch.tensor([0.0, FP8_MAX, 224.0, 896.0, 1.0])])
    expected = [max(2.0 ** math.ceil(math.log2(a / FP8_MAX)) if a > 0 else 0.0, 2.0**FP8_MIN_SCALE_EXPONENT)
                for a in amax.double().tolist()]
    assert fp8_scale(amax).double().tolist() == expected


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8_rows(torch.ones(3))
    with pytest.raises(TypeError, match="floating"):
        quantize_fp8_rows(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="amax"):
        fp8_scale(torch.ones(2, dtype=torch.float64))

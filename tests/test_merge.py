"""merge_and_reinit_: the Triton merge and reinit kernels (interpreter on CPU) against the reference and exact math."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_within_bound, count_launches, make_inputs, rounding_bound

import relora_kernels as rk
from relora_kernels import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # the merge's dot runs in fp32, so bf16 works interpreted

# (N, K, r): named for what they exercise; the interpreter's merge tiles are 32 x 32.
SHAPES = {
    "N, K not multiples of the tile, r < 16": (45, 70, 5),
    "r = 1": (33, 40, 1),
    "r just over 16": (40, 33, 17),
}


@pytest.fixture
def merge_kernel_calls(monkeypatch, triton_backend):
    """Count the merge and reinit launches (made eagerly by functional.py, through merge.merge_and_reinit_eagerly)
    and block the reference twins, so the kernels are what a test checks."""
    from relora_kernels import ops  # noqa: F401 (registers the launchers, as the originals, before they are wrapped)
    from relora_kernels.kernels import merge

    calls = count_launches(monkeypatch, merge, ("_merge", "_reinit"))
    for name in ("merge_lora_weight_", "reinit_lora_"):
        monkeypatch.setattr(reference, name, lambda *a, **k: pytest.fail("the reference merge ran"))
    return calls


def factors(n, k, r, dtype, scale_b=1.0):
    inputs = make_inputs((1,), k, n, r, torch.float32, bias=False)
    return (inputs["weight"].to(dtype), inputs["lora_a"].to(dtype), (inputs["lora_b"] * scale_b).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_merge_and_reinit_leaves_the_layer_output_unchanged(shape, dtype, merge_kernel_calls):
    n, k, r = SHAPES[shape]
    weight, lora_a, lora_b = factors(n, k, r, dtype)
    x = torch.randn(9, k, dtype=torch.float64)
    scale = 1.5
    before = reference.lora_linear(x, weight.double(), lora_a.double(), lora_b.double(), scale)

    rk.merge_and_reinit_(weight, lora_a, lora_b, scale, seed=3)

    assert merge_kernel_calls == {"_merge": 1, "_reinit": 1}
    assert torch.equal(lora_b, torch.zeros_like(lora_b))
    after = reference.lora_linear(x, weight.double(), lora_a.double(), lora_b.double(), scale)
    # The only change is the one rounding of the merged W: at most half an ulp per element, |W| * eps / 2,
    # plus fp32 accumulation in the kernel (r + 1 terms).
    eps = torch.finfo(dtype).eps
    per_element = weight.double().abs() * eps / 2 + (r + 1) * torch.finfo(torch.float32).eps * weight.double().abs()
    bound = x.abs() @ per_element.T + 1e-12
    assert ((after - before).abs() <= bound).all(), f"max excess {((after - before).abs() - bound).max():.3g}"


def check_merge_rounds_once(dtype, device="cpu"):
    """The fused merge equals round-once-of-exact on >= 99% of elements; the eager merge does not."""
    # B @ A of the same size as W, so every rounding of the eager path lands on the result.
    weight, lora_a, lora_b = (t.to(device) for t in factors(64, 96, 8, dtype, scale_b=8.0))
    scale = 0.75
    exact = (weight.double() + scale * (lora_b.double() @ lora_a.double())).to(dtype)  # round once of exact
    eager = weight + scale * (lora_b @ lora_a)  # rounds B @ A, s * (.), and the sum
    ours = weight.clone()
    rk.merge_and_reinit_(ours, lora_a.clone(), lora_b.clone(), scale, seed=0)
    assert ours.dtype == exact.dtype == eager.dtype and ours.device == exact.device == eager.device
    if ours.is_meta:  # the GPU tests' dry run: no values to compare
        return
    ours_match = (ours == exact).double().mean().item()
    eager_match = (eager == exact).double().mean().item()
    assert ours_match >= 0.99, f"fused merge matches round-once-of-exact on {ours_match:.1%}"
    assert eager_match < 0.99, f"eager matches on {eager_match:.1%}: the test could not tell the two apart"


def test_merge_rounds_once_where_eager_rounds_three_times(merge_kernel_calls):
    # fp16 only here: the interpreter casts fp32 -> bf16 by truncation instead of round-to-nearest-even (an
    # interpreter limit, like its bf16 tl.dot), so the bf16 case runs on a GPU (tests/test_gpu.py).
    check_merge_rounds_once(torch.float16)


def test_merge_matches_the_reference_in_fp32(merge_kernel_calls):
    weight, lora_a, lora_b = factors(45, 70, 5, torch.float32)
    exact = reference.merged_weight(weight.double(), lora_a.double(), lora_b.double(), 0.5)
    # W + s * B @ A: r products, the sum with W and the final rounding.
    bound = rounding_bound(torch.float32, 5 + 2, weight.abs() + 0.5 * lora_b.double().abs() @ lora_a.double().abs())
    rk.merge_and_reinit_(weight, lora_a, lora_b, 0.5, seed=1)
    assert_within_bound("W", weight, exact, bound)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reinit_is_keyed_by_the_seed_and_equals_the_reference(dtype, merge_kernel_calls):
    n, k, r = 40, 300, 6
    draws = {}
    for run, seed in (("first", 11), ("again", 11), ("other", 12)):
        weight, lora_a, lora_b = factors(n, k, r, dtype)
        rk.merge_and_reinit_(weight, lora_a, lora_b, 1.0, seed=seed)
        draws[run] = lora_a
    assert torch.equal(draws["first"], draws["again"])
    assert not torch.equal(draws["first"], draws["other"])
    # Kernel and reference twin give the same bits: a CPU fallback run and a GPU run reinit identically.
    expected = reference.reinit_uniform(11, r, k)
    if dtype == torch.bfloat16:
        # The interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even, checked in test_gpu.py):
        # the same fp32 draw, rounded differently, is within one bf16 ulp.
        torch.testing.assert_close(draws["first"].float(), expected, rtol=2 * torch.finfo(dtype).eps, atol=0.0)
    else:
        assert torch.equal(draws["first"], expected.to(dtype))
    # U(-1/sqrt(K), 1/sqrt(K)): inside the bound, mean 0 and variance bound**2 / 3 (1800 samples: 5 sigma checks).
    a = draws["first"].double()
    bound = k**-0.5
    assert a.abs().max() <= bound * (1 + torch.finfo(dtype).eps)
    assert abs(a.mean().item()) < 5 * bound / (3 * a.numel()) ** 0.5
    assert abs(a.var().item() / (bound**2 / 3) - 1) < 0.1


def test_reference_merge_and_reinit_is_the_same_restart():
    weight, lora_a, lora_b = factors(20, 30, 4, torch.float32)
    expected_weight = reference.merged_weight(weight, lora_a, lora_b, 2.0)
    rk.merge_and_reinit_(weight, lora_a, lora_b, 2.0, seed=9)  # auto backend on CPU: the reference
    assert torch.equal(weight, expected_weight)
    assert torch.equal(lora_a, reference.reinit_uniform(9, 4, 30))
    assert torch.equal(lora_b, torch.zeros_like(lora_b))


@pytest.mark.parametrize(
    "change, error, text",
    [
        ({"lora_a": torch.randn(3, 7)}, ValueError, "lora_a must be (r, 8)"),
        ({"lora_b": torch.randn(6, 2)}, ValueError, "lora_b must be (out_features, r) = (6, 3)"),
        ({"weight": torch.randn(6, 8, dtype=torch.float16)}, TypeError, "one dtype"),
        ({"weight": torch.ones(6, 8, dtype=torch.int32)}, TypeError, "weight must be a floating-point tensor"),
        ({"seed": -3}, ValueError, "seed must be in [0, 2**63)"),
        ({"scale": "1"}, TypeError, "scale must be a real number"),
    ],
)
def test_bad_input(change, error, text, triton_backend):
    kwargs = {"weight": torch.randn(6, 8), "lora_a": torch.randn(3, 8), "lora_b": torch.randn(6, 3), "scale": 1.0,
              "seed": 0, **change}
    with pytest.raises(error) as info:
        rk.merge_and_reinit_(**kwargs)
    assert text in str(info.value)


def test_seed_is_required():
    with pytest.raises(TypeError):
        rk.merge_and_reinit_(torch.randn(6, 8), torch.randn(3, 8), torch.randn(6, 3), 1.0)

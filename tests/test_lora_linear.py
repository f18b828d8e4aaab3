"""lora_linear: the Triton kernels (through the interpreter on CPU) against the float64 reference.

Every test here that uses `kernel_calls` forces RELORA_KERNELS_BACKEND=triton and blocks the reference fallback,
so what is checked is the kernels' output.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import assert_within_bound, assert_within_torch_error, make_inputs, rounding_bound

import relora_kernels as rk
from relora_kernels import reference

GRAD_NAMES = ("x", "lora_a", "lora_b", "bias")

# (leading dims of x, K, N, r, scale), each named for what it exercises. The interpreter's blocks are 32 wide.
SHAPES = {
    "M prime, K and N not multiples of any block, r < 16": ((37,), 45, 51, 5, 0.5),
    "r = 1": ((23,), 40, 33, 1, 2.0),
    "r just over 16 (two rank blocks of padding)": ((31,), 64, 48, 17, 1.0),
    "3-D x, r = 8": ((3, 7), 40, 36, 8, 0.25),
    "everything a multiple of the block": ((64,), 64, 32, 16, 1.0),
}


def run(fn, inputs, scale, dropout_p, seed, grad_out, dtype=None):
    """Forward and backward of `fn` on fresh leaves (cast to `dtype`); returns y and the gradients by name."""
    leaves = {}
    for name, t in inputs.items():
        if t is None:
            continue
        t = t.detach().to(dtype or t.dtype)
        leaves[name] = t.requires_grad_(name != "weight")
    y = fn(leaves["x"], leaves["weight"], leaves["lora_a"], leaves["lora_b"], scale, leaves.get("bias"),
           dropout_p, seed)
    y.backward(grad_out.to(y.device, y.dtype))  # grad_out may be built on the CPU (the same values on any device)
    return y.detach(), {name: t.grad for name, t in leaves.items() if name != "weight"}


def check_against_reference(inputs, scale, dropout_p, seed, dtype):
    """Kernel output and gradients vs the float64 reference, bounded by PyTorch's own error in `dtype`."""
    lead, n = inputs["x"].shape[:-1], inputs["weight"].shape[0]
    grad_out = torch.randn(*lead, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, grads = run(rk.lora_linear, inputs, scale, dropout_p, seed, grad_out)
    y64, grads64 = run(reference.lora_linear, inputs, scale, dropout_p, seed, grad_out, dtype=torch.float64)
    y_torch, grads_torch = run(reference.lora_linear, inputs, scale, dropout_p, seed, grad_out)
    assert y.dtype == dtype
    assert_within_torch_error("y", y, y64, y_torch)
    assert set(grads) == set(grads64)
    for name in grads:
        assert grads[name].dtype == dtype
        assert_within_torch_error(f"d{name}", grads[name], grads64[name], grads_torch[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_kernels_match_float64_reference(shape, bias, dtype, kernel_calls):
    lead, k, n, r, scale = SHAPES[shape]
    inputs = make_inputs(lead, k, n, r, dtype, bias=bias)
    check_against_reference(inputs, scale, 0.0, 0, dtype)
    assert kernel_calls == {"lora_forward": 1, "lora_backward": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", ["M prime, K and N not multiples of any block, r < 16", "3-D x, r = 8"])
def test_kernels_match_reference_with_dropout(shape, dtype, kernel_calls):
    # The reference draws the same Philox mask, so kernel and reference drop exactly the same elements.
    lead, k, n, r, scale = SHAPES[shape]
    check_against_reference(make_inputs(lead, k, n, r, dtype), scale, 0.3, 1234, dtype)
    assert kernel_calls == {"lora_forward": 1, "lora_backward": 1}


def test_non_contiguous_inputs(kernel_calls):
    # x a strided slice, weight a transposed view, lora_a and lora_b column slices: strides, not copies.
    base = make_inputs((29,), 2 * 40, 36, 2 * 6, torch.float32)
    inputs = {
        "x": base["x"][:, ::2],
        "weight": base["weight"][:, :40].T.contiguous().T,
        "lora_a": base["lora_a"][::2, 1::2],
        "lora_b": base["lora_b"][:, ::2],
        "bias": base["bias"],
    }
    assert not any(t.is_contiguous() for name, t in inputs.items() if name != "bias")
    check_against_reference(inputs, 0.7, 0.2, 99, torch.float32)


def test_empty_batch(kernel_calls):
    inputs = make_inputs((0,), 24, 20, 4, torch.float32)
    y, grads = run(rk.lora_linear, inputs, 1.0, 0.1, 3, torch.ones(0, 20))
    assert y.shape == (0, 20)
    assert grads["x"].shape == (0, 24)
    for name in ("lora_a", "lora_b", "bias"):
        assert torch.equal(grads[name], torch.zeros_like(inputs[name])), name


def test_weight_gradient_when_unfrozen(kernel_calls):
    inputs = make_inputs((13,), 24, 20, 4, torch.float32)
    w = inputs["weight"].clone().requires_grad_()
    rk.lora_linear(inputs["x"], w, inputs["lora_a"], inputs["lora_b"]).sum().backward()
    w64 = inputs["weight"].double().requires_grad_()
    x64, a64, b64 = (inputs[name].double() for name in ("x", "lora_a", "lora_b"))
    reference.lora_linear(x64, w64, a64, b64).sum().backward()
    # dW = dy.T @ x with dy = 1: a sum of 13 products per element (plus its rounding).
    magnitude = torch.ones(20, 13, dtype=torch.float64) @ x64.abs()
    assert_within_bound("dW", w.grad, w64.grad, rounding_bound(torch.float32, 13 + 1, magnitude))


# ---------------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------------


def test_dropout_same_seed_same_result_and_different_seed_differs(kernel_calls):
    inputs = make_inputs((19,), 40, 24, 4, torch.float32)
    grad_out = torch.randn(19, 24)
    y1, g1 = run(rk.lora_linear, inputs, 1.0, 0.5, 42, grad_out)
    y2, g2 = run(rk.lora_linear, inputs, 1.0, 0.5, 42, grad_out)
    y3, _ = run(rk.lora_linear, inputs, 1.0, 0.5, 43, grad_out)
    assert torch.equal(y1, y2)
    assert all(torch.equal(g1[name], g2[name]) for name in g1)
    assert not torch.equal(y1, y3)


def test_seed_none_follows_torch_manual_seed(kernel_calls):
    inputs = make_inputs((11,), 40, 24, 4, torch.float32)
    args = (inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"])
    torch.manual_seed(5)
    first = rk.lora_linear(*args, dropout_p=0.5)
    second = rk.lora_linear(*args, dropout_p=0.5)
    torch.manual_seed(5)
    again = rk.lora_linear(*args, dropout_p=0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_zero_dropout_ignores_the_seed_and_equals_no_dropout(kernel_calls):
    inputs = make_inputs((17,), 40, 24, 4, torch.float32)
    args = (inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"], 1.5, inputs["bias"])
    no_dropout = rk.lora_linear(*args)
    assert torch.equal(rk.lora_linear(*args, dropout_p=0.0, seed=7), no_dropout)
    assert torch.equal(rk.lora_linear(*args, dropout_p=0.0, seed=8), no_dropout)


def test_dropout_mask_keeps_the_right_fraction():
    keep = reference.dropout_mask(seed=3, rows=200, cols=300, dropout_p=0.3)
    # 60000 Bernoulli(0.7) draws: the standard error of the mean is 0.0019, so 0.01 is over 5 sigma.
    assert abs(keep.double().mean().item() - 0.7) < 0.01


def test_dropout_mask_neighbours_sharing_a_draw_are_independent():
    # Columns 4g..4g+3 take the four words of one Philox draw: each word, and each pair of words, must behave like
    # independent Bernoulli(0.5) draws. 400 x 400 elements: 40000 per word, 40000 per pair of columns j, j + 1.
    keep = reference.dropout_mask(seed=11, rows=400, cols=400, dropout_p=0.5).double().view(400, 100, 4)
    per_word = keep.mean(dim=(0, 1))
    assert ((per_word - 0.5).abs() < 5 * 0.5 / 200).all(), per_word  # 5 sigma, sigma = 0.5 / sqrt(40000)
    both = (keep[..., :-1] * keep[..., 1:]).mean(dim=(0, 1))  # within a draw: words (0, 1), (1, 2), (2, 3)
    across = (keep[:, :-1, 3] * keep[:, 1:, 0]).mean()  # word 3 of one draw, word 0 of the next
    sigma = (0.25 * 0.75 / 40000) ** 0.5
    assert ((both - 0.25).abs() < 5 * sigma).all() and abs(across - 0.25) < 5 * sigma, (both, across)


def test_dropout_mean_over_seeds_approaches_no_dropout(kernel_calls):
    # Inverted dropout is unbiased: E[y_p] = y_0. With W = 0 and no bias, y is the LoRA term alone.
    inputs = make_inputs((8,), 32, 16, 4, torch.float32, bias=False)
    weight = torch.zeros_like(inputs["weight"])
    args = (inputs["x"], weight, inputs["lora_a"], inputs["lora_b"], 1.0)
    y0 = rk.lora_linear(*args).double()
    samples = torch.stack([rk.lora_linear(*args, dropout_p=0.5, seed=s).double() for s in range(64)])
    # The squared error of the mean of n samples is var / n on average; allow 3x that (and it must not be 0).
    mean_sq_err = ((samples.mean(0) - y0) ** 2).mean()
    expected = samples.var(0).mean() / len(samples)
    assert 0 < mean_sq_err < 3 * expected
    # ...and a single sample is far off, so the test could tell a biased or absent mask from a good one.
    assert ((samples[0] - y0) ** 2).mean() > 10 * expected


def test_dropout_gradients_match_finite_differences_of_the_op(kernel_calls):
    # With the seed fixed, y is linear in each of x, A, B and bias separately, so a central difference along a
    # direction v is exact up to rounding: <grad, v> = <(f(t + v) - f(t - v)) / 2, dy>.
    inputs = make_inputs((21,), 40, 24, 5, torch.float32)
    grad_out = torch.randn(21, 24, generator=torch.Generator().manual_seed(2))
    scale, p, seed = 0.8, 0.25, 77
    _, grads = run(rk.lora_linear, inputs, scale, p, seed, grad_out)
    for name in GRAD_NAMES:
        direction = torch.randn(inputs[name].shape, generator=torch.Generator().manual_seed(3))
        values = []
        for sign in (1.0, -1.0):
            shifted = dict(inputs, **{name: inputs[name] + sign * direction})
            y = rk.lora_linear(shifted["x"], shifted["weight"], shifted["lora_a"], shifted["lora_b"], scale,
                               shifted["bias"], p, seed)
            values.append((y.double() * grad_out.double()).sum())
        finite_difference = (values[0] - values[1]) / 2
        analytic = (grads[name].double() * direction.double()).sum()
        assert abs(analytic - finite_difference) <= 1e-4 * max(1.0, abs(finite_difference)), name


# ---------------------------------------------------------------------------------------------------------------
# Determinism and the reference's own gradients
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("switch", ["env", "torch"])
def test_deterministic_mode_is_bit_identical(switch, monkeypatch, kernel_calls):
    if switch == "env":
        rk.configure(deterministic=True)
    else:
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    inputs = make_inputs((71,), 40, 36, 6, torch.float32)  # 71 tokens: three token blocks of partials
    grad_out = torch.randn(71, 36)
    first = run(rk.lora_linear, inputs, 1.0, 0.1, 5, grad_out)
    second = run(rk.lora_linear, inputs, 1.0, 0.1, 5, grad_out)
    assert torch.equal(first[0], second[0])
    for name in GRAD_NAMES:
        assert torch.equal(first[1][name], second[1][name]), name
    # And both reductions compute the op: each against float64, within twice torch's own fp32 error.
    exact = run(reference.lora_linear, inputs, 1.0, 0.1, 5, grad_out.double(), dtype=torch.float64)
    torch_twin = run(reference.lora_linear, inputs, 1.0, 0.1, 5, grad_out)
    rk.configure(deterministic=False)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    atomic = run(rk.lora_linear, inputs, 1.0, 0.1, 5, grad_out)
    for mode, (_, grads) in (("deterministic", first), ("atomic", atomic)):
        for name in GRAD_NAMES:
            assert_within_torch_error(f"{mode} d{name}", grads[name], exact[1][name], torch_twin[1][name])


def test_reference_gradcheck_float64():
    inputs = make_inputs((2, 5), 7, 6, 3, torch.float64)
    leaves = [inputs[name].clone().requires_grad_() for name in GRAD_NAMES]

    def op(x, lora_a, lora_b, bias):
        return reference.lora_linear(x, inputs["weight"], lora_a, lora_b, 0.7, bias, 0.3, 11)

    assert torch.autograd.gradcheck(op, leaves)


@pytest.mark.parametrize("rank", [16, 100])  # in fp32 on an H100 two different tiles: 64x128 and 64x64
def test_gpu_launch_branch_with_a_fixed_tile(rank, monkeypatch):
    # The fused-GEMM launch a GPU takes with RELORA_KERNELS_AUTOTUNE=0 (the first tile that fits an H100's shared
    # memory, launch options), run through the interpreter, which otherwise uses its own small tile: checks that
    # branch's selection, grid and arguments.
    from relora_kernels.kernels import passes, policy

    monkeypatch.setattr(policy, "interpreting", lambda: False)
    monkeypatch.setattr(policy, "shared_memory_limit", lambda: H100_SHARED_MEMORY)
    monkeypatch.setattr(policy, "current_arch", lambda: 90)  # the table is looked up first (empty here)
    rk.configure(autotune=False)
    # M, N past one 128 tile and not multiples of it, K not a multiple of 64: several programs, masked edges.
    x, weight, lora_a, lora_b, bias = make_inputs((150,), 70, 139, rank, torch.float32).values()
    shrunk, grad_y, seed = x @ lora_a.T, torch.randn(150, 139), torch.tensor(5)
    grad_shrunk = grad_y @ lora_b

    def both(module, dtype):
        args = [t.to(dtype) for t in (x, weight, shrunk, lora_b, bias, grad_y, grad_shrunk, lora_a)]
        x_, weight_, shrunk_, lora_b_, bias_, grad_y_, grad_shrunk_, lora_a_ = args
        return (module.lora_forward_matmul(x_, weight_, shrunk_, lora_b_, 0.5, bias_),
                module.lora_input_grad(grad_y_, weight_, grad_shrunk_, lora_a_, 0.3, seed))

    for name, got, exact, same_dtype in zip(("y", "dx"), both(passes, torch.float32),
                                            both(reference, torch.float64), both(reference, torch.float32),
                                            strict=True):
        assert_within_torch_error(name, got, exact, same_dtype)


H100_SHARED_MEMORY, A100_SHARED_MEMORY, RTX4090_SHARED_MEMORY = 232448, 166912, 101376


@pytest.mark.parametrize("limit", [H100_SHARED_MEMORY, A100_SHARED_MEMORY, RTX4090_SHARED_MEMORY])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_tiles_are_chosen_to_fit_the_gpu_shared_memory(limit, dtype, monkeypatch):
    # Every kernel has a tile at every rank up to MAX_RANK on every GPU of 99 KiB or more, and the selection keeps
    # exactly the tiles whose estimate fits, in their order of preference. (That the estimates bound what Triton
    # really allocates is checked by benchmarks/test_gpu_build.py, which compiles for sm_80-sm_90.)
    from relora_kernels._validate import MAX_RANK
    from relora_kernels.kernels import merge, policy

    monkeypatch.setattr(policy, "shared_memory_limit", lambda: limit)
    lists = [(policy.GEMM_TILES, policy.gemm_shared_bytes),
             (policy.SHRINK_CONFIGS, policy.shrink_shared_bytes),
             (policy.GRAD_AB_CONFIGS, policy.grad_ab_shared_bytes),
             (policy.GRAD_AB_CONFIGS, policy.grad_ab_with_dx_shared_bytes),
             (merge._MERGE_CONFIGS, merge._merge_shared_bytes)]
    for rank_block in (16, 32, 64, 128, MAX_RANK):
        for configs, shared_bytes in lists:
            chosen = policy.fitting(configs, shared_bytes, rank_block, dtype)
            expected = [c for c in configs if shared_bytes(c, rank_block, dtype.itemsize) <= limit]
            assert chosen == expected and chosen, (configs, rank_block)
    # On an H100 in bf16 the preferred Hopper-sized tiles stay in at the common ranks.
    if limit == H100_SHARED_MEMORY and dtype == torch.bfloat16:
        for rank_block in (16, 64):
            assert policy.fitting(policy.GEMM_TILES, policy.gemm_shared_bytes, rank_block,
                                  dtype)[:3] == policy.GEMM_TILES[:3]


def test_no_tile_fits_names_the_limit_and_the_way_out(monkeypatch):
    from relora_kernels.kernels import policy

    monkeypatch.setattr(policy, "shared_memory_limit", lambda: 16 * 1024)
    with pytest.raises(RuntimeError, match=r"16384 bytes of shared memory.*r <= 256.*RELORA_KERNELS_BACKEND"):
        policy.fitting(policy.GEMM_TILES, policy.gemm_shared_bytes, 256, torch.float32)


@pytest.mark.parametrize("token_blocks", [1, 3, 32, 128, 4096])
@pytest.mark.parametrize("chunks", [0, 1, 5, 64, 172])
def test_gradient_shares_cover_every_chunk_once_and_fill_the_gpu(token_blocks, chunks, monkeypatch):
    # An H100's 132 SMs x 4: 528 programs wanted. Shares split the N (or K) chunks of each token block: every chunk
    # in exactly one share, no empty share, and enough programs where there are chunks enough.
    from relora_kernels.kernels import lora_linear as kernels
    from relora_kernels.kernels import policy

    monkeypatch.setattr(policy, "target_programs", lambda: 528)
    shares, per_share = kernels._column_splits(token_blocks, chunks)
    assert shares >= 1 and per_share >= 1
    assert shares * per_share >= chunks and (shares - 1) * per_share < max(chunks, 1)
    assert token_blocks * shares >= min(528, token_blocks * chunks)


def test_shrink_blocks_shrink_until_the_gpu_has_programs_enough(monkeypatch):
    from relora_kernels.kernels import lora_linear as kernels
    from relora_kernels.kernels import policy

    monkeypatch.setattr(policy, "interpreting", lambda: False)
    monkeypatch.setattr(policy, "shared_memory_limit", lambda: H100_SHARED_MEMORY)
    monkeypatch.setattr(policy, "target_programs", lambda: 528)
    first = policy.SHRINK_CONFIGS[0]
    assert kernels._shrink_config(16, torch.bfloat16, 1 << 16) == first  # 1024 programs of 64 tokens
    assert kernels._shrink_config(16, torch.bfloat16, 8192)["BLOCK_M"] == 16  # 512 programs: as many as can be
    assert kernels._shrink_config(16, torch.bfloat16, 20000)["BLOCK_M"] == 32  # 625 programs
    assert {k: v for k, v in kernels._shrink_config(16, torch.bfloat16, 8192).items() if k != "BLOCK_M"} == {
        k: v for k, v in first.items() if k != "BLOCK_M"}
    # At r = 128 each program reads 128 x K of A: no smaller than 64 tokens (A's traffic at most twice x's).
    assert kernels._shrink_config(128, torch.bfloat16, 2048)["BLOCK_M"] == 64
    assert kernels._shrink_config(64, torch.bfloat16, 2048)["BLOCK_M"] == 32


def test_tile_names_round_trip_and_bad_ones_are_named():
    from relora_kernels.kernels import policy

    for tile in policy.GEMM_TILES:
        assert policy.parse_tile(tile.name) == tile
    for bad in ("128x128 g8 w8 s4", "128x128x64 w8 g8 s4", "big"):
        with pytest.raises(ValueError, match="not a tile name"):
            policy.parse_tile(bad)


def test_shipped_tuned_table_is_well_formed():
    # What benchmarks/tune.py writes: per architecture, where it was measured, engine-and-tile entries per variant
    # (default) and per shape, valid tiles.
    from relora_kernels.kernels import policy

    table = json.loads(policy.TUNED_TABLE.read_text())
    for arch, entry in table.items():
        assert re.fullmatch(r"sm_\d+", arch) and {"device", "triton", "commit"} <= set(entry["measured"]), arch
        for key, choice in {**entry["default"], **entry["shapes"]}.items():
            assert re.fullmatch(r"(bf16|fp16|fp32)/r\d+/(forward(\+bias)?|input_grad(\+dropout)?)(/M\d+/N\d+/K\d+)?",
                                key), key
            assert choice["engine"] in policy.ENGINES, (key, choice)
            if "tile" in choice:
                policy.parse_tile(choice["tile"])

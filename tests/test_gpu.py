"""The same checks on a CUDA GPU at realistic shapes, in bf16 and fp16 (marker `gpu`; skipped without CUDA).

Run with `pytest -m gpu`. The error bound is the one the CPU tests use: 2x PyTorch's own error in the same dtype
(cuBLAS, on the same GPU) against the float64 reference, plus a small per-dtype slack. Inputs are random, never
zero, and the launchers' outputs are poisoned (NaN-filled when allocated), so an element a kernel leaves unwritten
fails the comparison instead of passing on whatever the allocator held. dA, dB and dbias are reduced into zeroed
buffers (the atomics need zeros): a contribution missing there is an O(1) error on random data, which the bound
catches. The in-place merge and reinit start from random W, A and B and are compared everywhere.

Without CUDA, `RELORA_TESTS_GPU_DRY_RUN=1` runs every test here as a dry run (helpers.GPU_DRY_RUN): DEVICE is
"meta", each op's launch its fake, the policy answers as on an H100 (sm_90, its shared memory) and torch.cuda's
synchronisation and memory counters do nothing. The harness runs whole at the real shapes, so a tensor it puts on
the wrong device, a gradient of the wrong shape or dtype, or a tile or table choice the GPU would make differently
fails in CI; values (and the memory test's peaks, the tuner's count) are checked on the GPU only.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    GPU_DRY_RUN,
    assert_bitwise_equal,
    assert_within_bound,
    assert_within_torch_error,
    make_inputs,
    rounding_bound,
    values_unknown,
)
from test_lora_linear import GRAD_NAMES, check_against_reference, run

import relora_kernels as rk
from relora_kernels.kernels import lora_linear as kernels
from relora_kernels.kernels import policy

gpu = pytest.mark.gpu
HAS_CUDA = torch.cuda.is_available()
DEVICE = "meta" if GPU_DRY_RUN else "cuda"
H100_SHARED_MEMORY, H100_MULTIPROCESSORS = 232448, 132
DTYPES = [torch.bfloat16, torch.float16]

# (tokens, K, N): GPT-2 124M attention/MLP projections and a Llama-7B-sized square layer.
REALISTIC = [(4096, 768, 768), (4096, 768, 3072), (4096, 3072, 768), (4096, 4096, 4096)]


def _poisoned(out: torch.Tensor) -> torch.Tensor:
    return out.fill_(float("nan")) if out.is_floating_point() else out


class _PoisonedTorch:
    """torch as the launchers see it, except that torch.empty fills a floating-point tensor with NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return _poisoned(torch.empty(*args, **kwargs))


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every output a launcher allocates starts NaN: torch.empty as the launchers see it, and Tensor.new_empty, the
    form the planned passes allocate with (for the whole test: no correct code reads memory it has not written)."""
    monkeypatch.setattr(kernels, "torch", _PoisonedTorch())
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *args, **kwargs: _poisoned(
        new_empty(self, *args, **kwargs)))


def _cdiv_rounding_down(a, b):
    """The launchers' cdiv, except that it rounds down: a launch then lacks its last program."""
    return max(1, a // b)


@pytest.fixture(autouse=True)
def fixed_tiles():
    """No test tunes the Triton engine's tile unless it says so (test_tuned_fused_gemm_matches_reference): each tile
    has its own test, and tuning every shape of the others cold would take minutes of compiling and timing."""
    rk.configure(autotune=False)


@pytest.fixture(autouse=True)
def stand_in_gpu(request, monkeypatch):
    """The dry run's stand-in for the GPU (see the module docstring), for the tests marked gpu."""
    if not GPU_DRY_RUN or request.node.get_closest_marker("gpu") is None:
        return
    from relora_kernels import functional

    use_triton = functional.use_triton
    monkeypatch.setattr(functional, "use_triton", lambda device: device.type == "meta" or use_triton(device))
    monkeypatch.setattr(policy, "interpreting", lambda: False)
    monkeypatch.setattr(policy, "current_arch", lambda: 90)
    monkeypatch.setattr(policy, "shared_memory_limit", lambda: H100_SHARED_MEMORY)
    monkeypatch.setattr(policy, "multiprocessor_count", lambda: H100_MULTIPROCESSORS)
    for name, value in (("synchronize", None), ("reset_peak_memory_stats", None), ("memory_allocated", 0),
                        ("max_memory_allocated", 0), ("set_sync_debug_mode", None)):
        monkeypatch.setattr(torch.cuda, name, lambda *args, _value=value, **kwargs: _value)
    # Draws on the host (a gradient built on the CPU, then moved) stay on the host but are not drawn: no value is
    # compared, and drawing GPU-sized tensors would take most of the run.
    randn = torch.randn

    def host_randn(*size, generator=None, device=None, **kwargs):
        if torch.device(device or torch.get_default_device()).type != "cpu":
            return randn(*size, generator=generator, device=device, **kwargs)
        return torch.empty(*size, device=device, **kwargs)

    monkeypatch.setattr(torch, "randn", host_randn)


def _assert_random(inputs):
    for name, tensor in inputs.items():
        if tensor is not None and not values_unknown(tensor):
            assert tensor.double().std() > 0, f"{name} is constant: it would hide wrong indexing"


def test_poisoned_outputs_expose_an_element_left_unwritten(poisoned_outputs, monkeypatch, triton_backend):
    # On any device (the interpreter on a CPU): the shrink of 50 tokens passes, then, launched one program short,
    # leaves its last rows NaN and fails the same check.
    device = "cuda" if HAS_CUDA else "cpu"
    inputs = make_inputs((50,), 40, 24, 4, torch.float32, device=device)
    x, lora_a = inputs["x"], inputs["lora_a"]
    exact, same_dtype = x.double() @ lora_a.double().T, x @ lora_a.T
    assert_within_torch_error("S", kernels.lora_shrink(x, lora_a, 0.0, None), exact, same_dtype)
    monkeypatch.setattr(kernels, "cdiv", _cdiv_rounding_down)
    shrunk = kernels.lora_shrink(x, lora_a, 0.0, None)
    assert torch.isnan(shrunk[-2:]).all()
    with pytest.raises(AssertionError, match="S \\(torch.float32\\)"):
        assert_within_torch_error("S", shrunk, exact, same_dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("shape", REALISTIC, ids=lambda s: "x".join(map(str, s)))
def test_realistic_shapes_match_float64_reference(shape, rank, dropout_p, dtype, kernel_calls, poisoned_outputs):
    tokens, k, n = shape
    inputs = make_inputs((tokens,), k, n, rank, dtype, device=DEVICE)
    _assert_random(inputs)
    check_against_reference(inputs, 2.0, dropout_p, 2024, dtype)
    assert kernel_calls == {"lora_forward": 1, "lora_backward": 1}


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_planned_call_matches_float64_reference(dtype, kernel_calls, poisoned_outputs):
    # The second call of a key runs its plan (kernels/passes.py): each compiled launcher started by kernels/launch.py
    # itself (its AlignedLaunch), not by Triton's own launch as the first call; poisoned, an output it left unwritten
    # fails.
    inputs = make_inputs((2048,), 768, 3072, 16, dtype, device=DEVICE)
    for _ in range(2):
        check_against_reference(inputs, 2.0, 0.1, 2025, dtype)
    assert kernel_calls == {"lora_forward": 2, "lora_backward": 2}


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", [1, 17, 128, 256])
def test_odd_ranks_and_3d_input(rank, dtype, kernel_calls, poisoned_outputs):
    # r = 1 and r < 16 are padded to 16, r = 17 to 32; 3-D x with a prime token count (2 x 1021).
    inputs = make_inputs((2, 1021), 1000, 1500, rank, dtype, device=DEVICE)
    check_against_reference(inputs, 0.5, 0.1, 7, dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_mode_is_bit_identical_on_gpu(dtype, monkeypatch, kernel_calls, poisoned_outputs):
    # On a GPU the default fp32 atomics are order-dependent; the deterministic mode must not be.
    rk.configure(deterministic=True)
    inputs = make_inputs((8192,), 1024, 1024, 16, dtype, device=DEVICE)
    grad_out = torch.randn(8192, 1024, device=DEVICE)
    first = run(rk.lora_linear, inputs, 1.0, 0.1, 5, grad_out)
    second = run(rk.lora_linear, inputs, 1.0, 0.1, 5, grad_out)
    assert_bitwise_equal("y", first[0], second[0])
    for name in GRAD_NAMES:
        assert_bitwise_equal(f"d{name}", first[1][name], second[1][name])


@gpu
def test_dropout_needs_no_extra_activation_memory(kernel_calls):
    # With p > 0 the mask is regenerated in the backward, never stored: the saved activations are the same.
    inputs = make_inputs((8192,), 4096, 4096, 16, torch.bfloat16, device=DEVICE)
    peaks = {}
    for p in (0.0, 0.1):
        x = inputs["x"].clone().requires_grad_()
        lora_a = inputs["lora_a"].clone().requires_grad_()
        lora_b = inputs["lora_b"].clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y = rk.lora_linear(x, inputs["weight"], lora_a, lora_b, 1.0, None, p, 1)
        y.backward(torch.ones_like(y))
        torch.cuda.synchronize()
        peaks[p] = torch.cuda.max_memory_allocated() - base
        del x, lora_a, lora_b, y
    # All that p > 0 may add is the 0-d seed tensor the backward reads (one 512-byte block of the caching
    # allocator); a stored mask would be 32 MiB even as bool.
    assert peaks[0.1] - peaks[0.0] <= 512, peaks


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_rounds_once_on_gpu(dtype, triton_backend):
    from test_merge import check_merge_rounds_once

    check_merge_rounds_once(dtype, device=DEVICE)


@gpu
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float32], ids=str)
def test_merge_and_reinit_at_4096_on_gpu(dtype, triton_backend):
    from relora_kernels import reference

    weight, lora_a, lora_b = (t.to(DEVICE, dtype) for t in (torch.randn(4096, 4096) / 64, torch.randn(16, 4096) / 64,
                                                           torch.randn(4096, 16) / 4))
    expected = reference.merged_weight(weight, lora_a, lora_b, 2.0)
    exact = reference.merged_weight(*(t.double() for t in (weight, lora_a, lora_b)), 2.0)
    # 16 products, the sum with W and the final rounding (fp32 products are not exact).
    bound = rounding_bound(torch.float32, 16 + 2, weight.double().abs() + 2.0 * lora_b.double().abs() @
                           lora_a.double().abs())
    rk.merge_and_reinit_(weight, lora_a, lora_b, 2.0, seed=4)
    if dtype == torch.float32:
        assert_within_bound("W", weight, exact, bound)
    else:
        # Both round once from fp32 sums of the same terms in another order: almost always equal. Where the sum
        # nearly cancels, fp32's rounding of the terms is large against the result (a first GPU run saw 6 of 16.8M
        # bf16 elements 0.07 apart relatively), so each element is held to the float64 value: the fp32 bound, then
        # one rounding into the dtype (half an ulp of the value, or half the subnormal step near zero).
        assert values_unknown(weight, expected) or (weight == expected).double().mean() > 0.999
        info = torch.finfo(dtype)
        rounded = bound + info.eps / 2 * (exact.abs() + bound) + info.smallest_normal * info.eps / 2
        assert_within_bound("W", weight, exact, rounded)
    assert_bitwise_equal("A", lora_a, reference.reinit_uniform(4, 16, 4096, device=DEVICE).to(dtype))
    assert values_unknown(lora_b) or not lora_b.any()


@gpu
def test_compiled_model_on_the_triton_ops_in_bf16(reference_blocked):
    # The registered triton_ops under torch.compile(fullgraph=True): one graph, the same results as eager (bf16).
    from test_compile import lora_model, output_and_grads
    from torch._dynamo.testing import CompileCounterWithBackend

    from relora_kernels import ops

    assert ops.REGISTRATION == ("custom_op" if GPU_DRY_RUN else "triton_op")  # the interpreter's: opaque ops
    torch._dynamo.reset()
    model = lora_model(0.1).to(DEVICE)
    # The dry run: AOTAutograd without Inductor (which generates no code for meta tensors), and no autocast (meta
    # tensors have none), so the outputs keep the inputs' float32.
    counter = CompileCounterWithBackend("aot_eager" if GPU_DRY_RUN else "inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(4, 512, 24, device=DEVICE)
    with torch._inductor.config.patch(fallback_random=True), torch.autocast("cuda", dtype=torch.bfloat16,
                                                                            enabled=not GPU_DRY_RUN):
        want_y, want_grads = output_and_grads(model, model, x)
        got_y, got_grads = output_and_grads(compiled, model, x)
    assert counter.frame_count == 1 and got_y.dtype == (torch.float32 if GPU_DRY_RUN else torch.bfloat16)
    torch.testing.assert_close(got_y, want_y)  # bf16 defaults: rtol 1.6e-2, atol 1e-5
    for name, grad in got_grads.items():
        assert grad.dtype == want_grads[name].dtype
        torch.testing.assert_close(grad, want_grads[name], rtol=1.6e-2, atol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


@gpu
@pytest.mark.parametrize("case", ["lora_forward, dropout, bias", "lora_backward, dropout, bias",
                                  "lora_backward, deterministic", "merge_lora_weight_", "reinit_lora_"])
def test_triton_ops_pass_opcheck_on_gpu(case, engine):
    from test_compile import op_cases

    from relora_kernels import ops

    name, args = op_cases()[case]
    args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(ops, name), args)


@gpu
@pytest.mark.parametrize("rank", [16, 128])
@pytest.mark.parametrize("tile", policy.GEMM_TILES, ids=lambda tile: tile.name)
def test_every_fused_gemm_tile_is_correct(tile, rank, monkeypatch, kernel_calls, engine, poisoned_outputs):
    # Tuning may pick any tile that fits this GPU's shared memory for some shape: each one, forced, against the
    # float64 reference (bf16, dropout on, M and N not multiples of any tile). A tile that does not fit at this rank
    # must be left out by the selection (its launch would raise OutOfResources).
    if engine == "cublas":
        pytest.skip("the tiles are the Triton engine's")
    if tile not in policy.gemm_tiles():
        # Found wrong on this architecture (policy.WRONG_TILES): never chosen, so not run (it can take the CUDA
        # context down). Running it again, under a newer Triton, is `python -m benchmarks.isolate_fault`'s job.
        pytest.skip(f"{tile.name} is left out on sm_{policy.current_arch()} (policy.WRONG_TILES)")
    rank_block = policy.block_rank(rank)
    if policy.gemm_shared_bytes(tile, rank_block, torch.bfloat16.itemsize) > policy.shared_memory_limit():
        assert tile not in policy.fitting(policy.gemm_tiles(), policy.gemm_shared_bytes, rank_block, torch.bfloat16)
        return
    inputs = make_inputs((1000,), 1024, 1500, rank, torch.bfloat16, device=DEVICE)
    with policy.forced_tile(tile):
        check_against_reference(inputs, 2.0, 0.1, 11, torch.bfloat16)


@gpu
def test_tuned_fused_gemm_matches_reference(monkeypatch, kernel_calls, poisoned_outputs):
    # The default: each launch key's tile tuned once (its candidates timed on these inputs), then launched.
    rk.configure(autotune=True)
    monkeypatch.setattr(policy, "TUNER", policy.TileTuner())
    inputs = make_inputs((2048,), 1024, 1536, 16, torch.bfloat16, device=DEVICE)
    check_against_reference(inputs, 2.0, 0.1, 12, torch.bfloat16)
    if not GPU_DRY_RUN:  # the dry run launches nothing, so nothing is timed
        assert policy.TUNER.tunings == (2 if policy.engine_setting() == "triton" else 0)


@gpu
def test_tuning_at_shapes_off_the_blocks_matches_reference(monkeypatch, kernel_calls, poisoned_outputs):
    # What a training run does by default: tune each key's tile on its first call, here at a token count, K and N off
    # every block (r = 1, padded). On an H200 under triton 3.6 this took the CUDA context down while a tile now in
    # policy.WRONG_TILES was among the candidates timed.
    rk.configure(autotune=True)
    monkeypatch.setattr(policy, "TUNER", policy.TileTuner())
    inputs = make_inputs((2, 1021), 1000, 1500, 1, torch.float16, device=DEVICE)
    check_against_reference(inputs, 0.5, 0.1, 7, torch.float16)
    if not GPU_DRY_RUN:
        assert policy.TUNER.tunings == (2 if policy.engine_setting() == "triton" else 0)


@gpu
def test_table_entries_run_and_are_correct(monkeypatch, kernel_calls, poisoned_outputs):
    # The table path on the GPU: a table naming, for this GPU's architecture, the cuBLAS-composed engine for the
    # forward and the Triton engine with the small 64x64 tile for dx; both passes against the float64 reference.
    rk.configure(engine="auto")  # auto: the table decides
    forward = policy.GemmLaunch(torch.bfloat16, 16, "forward", True, False, 1000, 1500, 1024)
    input_grad = policy.GemmLaunch(torch.bfloat16, 16, "input_grad", False, True, 1000, 1024, 1500)
    table = {f"sm_{policy.current_arch()}": {"default": {forward.variant: {"engine": "cublas"},
                                                         input_grad.variant: {"engine": "triton",
                                                                              "tile": "64x64x64 g8 w4 s4"}},
                                             "shapes": {}}}
    monkeypatch.setattr(policy, "tuned_table", lambda: table)
    assert policy.choose_engine(forward) == "cublas" and policy.choose_engine(input_grad) == "triton"
    assert policy.gemm_tile(input_grad, None).name == "64x64x64 g8 w4 s4"
    inputs = make_inputs((1000,), 1024, 1500, 16, torch.bfloat16, device=DEVICE)
    check_against_reference(inputs, 2.0, 0.1, 13, torch.bfloat16)


@gpu
def test_a_training_step_makes_no_host_device_sync():
    # The hot path of LoRALinear training (forward, backward with dropout and a bias gradient, an SGD step; and the
    # op with an int seed) under CUDA's sync check: a copy to or from the host or a stream synchronisation raises.
    # Each runs once first, outside the check, so that compiling and any tile choice stay out of it.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        rk.LoRALinear(1024, 2048, r=16, dropout=0.1, device=DEVICE, dtype=torch.bfloat16),
        torch.nn.GELU(),
        rk.LoRALinear(2048, 1024, r=16, dropout=0.1, device=DEVICE, dtype=torch.bfloat16),
    ).train()
    for layer in (model[0], model[2]):
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, foreach=True)
    x = torch.randn(4, 512, 1024, device=DEVICE, dtype=torch.bfloat16)

    def step():
        model(x).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def int_seed_op():  # an int seed becomes a device tensor by a fill kernel, not a host copy
        layer = model[0]
        y = rk.lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.scale, layer.bias, 0.1, seed=1234)
        y.float().square().mean().backward()
        optimizer.zero_grad(set_to_none=True)

    step()
    int_seed_op()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        int_seed_op()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(values_unknown(p) or torch.isfinite(p).all() for p in params)

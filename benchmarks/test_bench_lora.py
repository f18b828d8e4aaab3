"""The benchmark cases as tests: every provider of each op builds and runs (timed on a GPU, once on a CPU), and the
providers compute the same function, so a benchmark never times something other than the op.

GPU: the headline case (8192 x 4096 -> 4096, r = 16, bf16). CPU: the interpreter-sized smoke case.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import csrc_bench
import relora_kernels as rk
from relora_kernels import reference

from . import cases, sweep
from .conftest import HAS_CUDA

LORA_CASE = cases.HEADLINE if HAS_CUDA else cases.SMOKE
MERGE_CASE = cases.merge_grid("quick" if HAS_CUDA else "smoke")[0]


def _build(provider, case, device):
    try:
        return cases.build(provider, case, device)
    except cases.Skip as skip:
        pytest.skip(str(skip))


# On a CPU (smoke) as the smoke sweep plans them: the automatic choice at fwd+bwd only (cases.smoke_skips).
LORA_RUNS = [(provider, mode) for provider in cases.LORA_PROVIDERS for mode in cases.MODES
             if HAS_CUDA or not cases.smoke_skips(dataclasses.replace(LORA_CASE, mode=mode), provider)]


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize(("provider", "mode"), LORA_RUNS)
def test_lora_linear(provider, mode, p, device, run_case):
    case = dataclasses.replace(LORA_CASE, mode=mode, p=p)
    with cases.provider_env(provider):  # as the sweep runs it: the provider's engine while it is built and run
        fn = _build(provider, case, device)  # bwd mode runs the forward here
        fn()  # compiles / autotunes outside the measurement (a graph break under fullgraph=True raises)
        run_case(fn)


@pytest.mark.parametrize("provider", cases.LAUNCH_PROVIDERS)
def test_lora_launch(provider, device, run_case):
    run_case(_build(provider, cases.launch_grid("quick" if HAS_CUDA else "smoke")[0], device))


def test_the_tensorwise_fp8_gemm_scaled_after_is_the_engines_rowwise_product(device):
    # fp8_scaled_mm_fwd_tensorwise times cuBLAS's per-tensor FP8 GEMM with unit scales, the row and column scales left
    # to a pass over the output: that pass multiplies by powers of two, exact, so the two ways give one product up to
    # their own roundings. Each is an fp32 sum of exact e4m3 products (error <= K * 2**-24 * |xq| @ |wq|.T, scaled),
    # rounded once into the output dtype (<= u * |value|); two of them apart by at most twice that. A scale applied
    # twice or not at all is off by a factor of 2**k instead.
    from relora_kernels.kernels import passes_fp8

    case = cases.launch_grid("quick" if HAS_CUDA else "smoke")[0]
    dtype = cases.DTYPES[case.dtype]
    problem = cases.fp8_problem(case, device) or passes_fp8.scaled_mm_support(device.type, device.index, dtype)
    if problem is not None:
        pytest.skip(problem)
    generator = torch.Generator().manual_seed(0)
    # Rows of very different sizes, so that the scales differ by many powers of two.
    x = (torch.randn(case.M, case.K, generator=generator) * 2.0 ** torch.randint(-6, 7, (case.M, 1),
                                                                                 generator=generator)).to(device)
    weight = (torch.randn(case.N, case.K, generator=generator) * 2.0 ** torch.randint(-6, 7, (case.N, 1),
                                                                                      generator=generator)).to(device)
    x_q, x_scale = reference.quantize_fp8_rows(x)
    w_q, w_scale = reference.quantize_fp8_rows(weight)
    rowwise = passes_fp8.scaled_mm(x_q, x_scale, w_q, w_scale, dtype).double()
    unscaled = cases._scaled_mm_in_mode("tensorwise", x_q, x_scale, w_q, w_scale, dtype).double()
    scaled_after = unscaled * x_scale.double()[:, None] * w_scale.double()[None, :]
    exact = reference.dequantize_fp8_rows(x_q, x_scale) @ reference.dequantize_fp8_rows(w_q, w_scale).T
    magnitude = reference.dequantize_fp8_rows(x_q, x_scale).abs() @ reference.dequantize_fp8_rows(w_q, w_scale).abs().T
    one_way = torch.finfo(dtype).eps / 2 * exact.abs() + case.K * 2.0 ** -24 * magnitude * (1 + torch.finfo(dtype).eps)
    assert (scaled_after - rowwise).abs().le(2 * one_way).all()
    assert (rowwise - exact).abs().le(one_way).all()  # the engine's product itself, as the bound assumes


@pytest.mark.parametrize("provider", [*cases.TRITON_LAUNCHES, *cases.CUBLAS_LAUNCHES])
def test_each_launch_row_times_the_launch_not_the_tracing_wrapper(provider, device, monkeypatch):
    # Outside a triton_op, torch.library.wrap_triton dispatches every launch through its higher-order op (~380 us
    # of host time each): a per-launch row must launch as the op does eagerly, with the wrapper off.
    from torch._library.triton import is_wrap_triton_enabled

    from relora_kernels.kernels import lora_linear

    fn = _build(provider, cases.launch_grid("quick" if HAS_CUDA else "smoke")[0], device)
    seen, traceable = [], lora_linear.traceable
    monkeypatch.setattr(lora_linear, "traceable", lambda kernel: seen.append(is_wrap_triton_enabled()) or
                        traceable(kernel))
    fn()
    assert seen == [False] * len(seen) and (seen or provider.startswith("addmm")), seen


@pytest.mark.parametrize("provider", cases.MERGE_PROVIDERS)
def test_merge_and_reinit(provider, device, run_case):
    run_case(_build(provider, MERGE_CASE, device))


@pytest.mark.parametrize("provider", ["eager", "compile", *(p for p in cases.FUSED_PROVIDERS
                                                              if p not in cases.FP8_PROVIDERS)])
def test_providers_compute_lora_linear(provider, device):
    # p = 0: no dropout mask to agree on; compared in float64-accumulated reference terms at the case's dtype.
    case = dataclasses.replace(LORA_CASE, p=0.0, M=min(LORA_CASE.M, 256))
    inp = cases.lora_inputs(case, device)
    fn = {"eager": cases.eager_lora_linear, "compile": cases.compiled(cases.eager_lora_linear),
          "fused_compile": cases.compiled(cases.fused_lora_linear)}.get(provider, cases.fused_lora_linear)
    with cases.provider_env(provider):
        y = fn(inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b, cases.SCALE, 0.0)
        grads = torch.autograd.grad(y, (inp.x, inp.lora_a, inp.lora_b), inp.grad_y)
    wide = [t.detach().double().requires_grad_() for t in (inp.x, inp.weight, inp.lora_a, inp.lora_b, inp.bias)]
    x, weight, lora_a, lora_b, bias = wide
    y_ref = reference.lora_linear(x, weight, lora_a, lora_b, cases.SCALE, bias)
    grads_ref = torch.autograd.grad(y_ref, (x, lora_a, lora_b), inp.grad_y.double())
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[inp.x.dtype]
    for name, got, want in zip(("y", "dx", "dA", "dB"), (y, *grads), (y_ref, *grads_ref), strict=True):
        scale = want.abs().max().item() or 1.0
        assert (got.double() - want).abs().max().item() <= tol * scale, f"{provider}: {name} differs"


@pytest.mark.parametrize("provider", cases.FP8_PROVIDERS)
def test_fp8_providers_compute_the_fp8_op_on_their_engines(provider, device, monkeypatch):
    # Each frozen GEMM on the provider's engine: torch._scaled_mm (cublas) or the Triton FP8 GEMM, counted.
    from relora_kernels.kernels import lora_linear, passes_fp8

    case = dataclasses.replace(LORA_CASE, p=0.0, M=min(LORA_CASE.M, 256))
    with cases.provider_env(provider):
        problem, engines = cases.fp8_problem(case, device), cases.chosen_engines(case, provider)
    if problem is not None:
        pytest.skip(problem)
    want = {"fused_fp8_triton": ("triton", "triton"), "fused_fp8_cublas": ("cublas", "cublas")}.get(
        provider, (engines["engine_fwd"], engines["engine_dx"]))
    assert (engines["engine_fwd"], engines["engine_dx"]) == want
    inp = cases.lora_inputs(case, device)
    passes_fp8.scaled_mm_support(inp.x.device.type, inp.x.device.index, inp.x.dtype)  # the op's probe: no GEMM of it
    calls = {"cublas": 0, "triton": 0}
    for module, name, engine in ((passes_fp8, "scaled_mm", "cublas"), (lora_linear, "fused_matmul_fp8", "triton")):
        monkeypatch.setattr(module, name, functools.partial(_counted, calls, engine, getattr(module, name)))

    # Against the float64 reference of the same quantised operands (reference.lora_linear_fp8: x and dy quantised
    # from their float64 copies give the same e4m3 values), p = 0. Bound, elementwise: a priori, n u32 of the
    # magnitude |products| sum to (the chain of fp32 accumulations is at most n = M + K + N + r terms long), plus 5
    # roundings into the case's dtype; the magnitudes are the reference's outputs on |inputs| (every product then
    # adds with one sign), which bound the sums of |products| along each chain.
    with cases.provider_env(provider):
        frozen = rk.quantize_fp8_weight(inp.weight)
        y = cases.fused_lora_linear_fp8(inp.x, frozen, inp.bias, inp.lora_a, inp.lora_b, cases.SCALE, 0.0)
        grads = torch.autograd.grad(y, (inp.x, inp.lora_a, inp.lora_b), inp.grad_y)
    assert calls == {engine: want.count(engine) for engine in ("cublas", "triton")}, calls
    frozen64 = reference.FP8Weight(*frozen)

    def reference_run(sign):
        leaves = [sign(t.detach().double()).requires_grad_() for t in (inp.x, inp.lora_a, inp.lora_b, inp.bias)]
        x, lora_a, lora_b, bias = leaves
        y64 = reference.lora_linear_fp8(x, frozen64 if sign is _same else _abs_weight(frozen64), lora_a, lora_b,
                                        cases.SCALE, bias, 0.0)
        return (y64, *torch.autograd.grad(y64, (x, lora_a, lora_b), sign(inp.grad_y.double())))

    wants, magnitudes = reference_run(_same), reference_run(torch.abs)
    n = case.M + case.K + case.N + case.r
    eps32, eps = torch.finfo(torch.float32).eps / 2, torch.finfo(inp.x.dtype).eps / 2
    for name, got, want, magnitude in zip(("y", "dx", "dA", "dB"), (y, *grads), wants, magnitudes, strict=True):
        bound = (n * eps32 + 5 * eps) * magnitude.detach()
        error = (got.double() - want.detach()).abs()
        bad = error > bound
        assert not bad.any(), (f"{provider}: {name} off at {int(bad.sum())} of {bad.numel()} elements, first "
                               f"{bad.nonzero()[:3].tolist()}, max error {error.max():.3g}, bound there "
                               f"{bound[bad].min():.3g}")


def _same(t):
    return t


def _counted(calls, engine, fn, *args, **kwargs):
    calls[engine] += 1
    return fn(*args, **kwargs)


def _abs_weight(frozen):
    """|W|'s copies: the same scales, the codes' magnitudes (e4m3 is sign and magnitude: the sign bit cleared, with
    integer ops that every device has for uint8)."""
    def magnitude(q):
        return (q.view(torch.uint8) & 0x7F).view(q.dtype)

    return reference.FP8Weight(magnitude(frozen.q), frozen.scale, magnitude(frozen.q_t), frozen.scale_t)


@pytest.mark.parametrize("layer_options", [{}, {"master_device": "cpu"}], ids=["fused_fp8", "fused_fp8_cpu_master"])
def test_the_fp8_restart_merges_and_requantises_the_layers_copies(device, layer_options):
    case = MERGE_CASE
    with cases.provider_env(None):
        torch.manual_seed(0)
        like = {"device": device, "dtype": cases.DTYPES[case.dtype]}
        weight, lora_a = torch.randn(case.N, case.K, **like), torch.randn(case.r, case.K, **like)
        lora_b = torch.randn(case.N, case.r, **like)
        try:
            restart = cases.fp8_layer_restart(case, weight, lora_a, lora_b, **layer_options)
        except cases.Skip as skip:
            pytest.skip(str(skip))
        layer = restart.func.__self__
        stale = layer.frozen_weight_fp8().q.clone()
        restart()
    # W + s B @ A: the merge kernel and the reference both accumulate r products in fp32 and round once into W's
    # dtype; apart by at most r u32 of |W| + s |B| @ |A| and one rounding (an ulp) each way.
    merged = reference.merged_weight(weight, lora_a, lora_b, cases.SCALE).double()
    magnitude = weight.double().abs() + cases.SCALE * lora_b.double().abs() @ lora_a.double().abs()
    bound = case.r * torch.finfo(torch.float32).eps / 2 * magnitude + torch.finfo(weight.dtype).eps * merged.abs()
    assert ((layer.weight.detach().double() - merged).abs() <= bound).all()
    assert not layer.lora_B.any() and not torch.equal(layer.frozen_weight_fp8().q, stale)
    assert layer.weight.device.type == torch.device(layer_options.get("master_device", device)).type
    for got, want in zip(layer.frozen_weight_fp8(), reference.quantize_fp8_weight(layer.weight.detach()), strict=True):
        assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                           want.view(torch.uint8) if want.dtype == torch.float8_e4m3fn else want)


@pytest.mark.parametrize("provider", ["fused_triton", "fused_cublas", "fused"])
def test_each_fused_provider_runs_its_engine_and_restores_the_setting(provider, device, monkeypatch):
    from relora_kernels.kernels import passes, policy

    # A key's first call chooses the engine of each pass (later ones run the plan it made): start with no plans.
    monkeypatch.setattr(passes, "_forward_plans", {})

    rk.configure(engine="triton" if provider == "fused_cublas" else "cublas")  # overridden within the provider
    before = policy.engine_setting()
    chosen, choose = [], policy.choose_engine
    monkeypatch.setattr(policy, "choose_engine", lambda launch: chosen.append((launch.gemm_pass, choose(launch))) or
                        chosen[-1][1])
    case = dataclasses.replace(LORA_CASE, mode="fwd+bwd", M=min(LORA_CASE.M, 256))
    with cases.provider_env(provider):
        want = [(name, engine) for name, engine in cases.chosen_engines(case).items() if name.startswith("engine_")]
        chosen.clear()
        _build(provider, case, device)()
        row = cases.chosen_engines(case)
    # The row names the tile a Triton pass settled on (the interpreter's here), and none for a cuBLAS pass.
    for name in ("fwd", "dx"):
        assert (row[f"tile_{name}"] is not None) == (row[f"engine_{name}"] == "triton"), row
    chosen = list(dict.fromkeys(chosen))  # the plan of a pass asks again what its first call was answered
    assert policy.engine_setting() == before  # restored
    engines = {"fused_triton": {"triton"}, "fused_cublas": {"cublas"}}.get(provider)
    assert [kind for kind, _ in chosen] == ["forward", "input_grad"]
    if engines:
        assert {engine for _, engine in chosen} == engines
    else:  # auto: what the table or the rule picks, as the row's engine_fwd / engine_dx record it
        assert [engine for _, engine in chosen] == [engine for _, engine in want]
    with pytest.raises(RuntimeError), cases.provider_env(provider):
        raise RuntimeError("a failing run")
    assert policy.engine_setting() == before  # restored after an error too
    with cases.provider_env("eager"):  # not a fused provider: untouched
        assert policy.engine_setting() == before


def test_each_torch_version_builds_the_native_baseline_apart():
    # Two torch versions with one CUDA tag share torch's build folder (keyed by Python and CUDA): the build's name
    # keeps them apart, and a name is a C identifier (torch defines TORCH_EXTENSION_NAME from it).
    versions = ("2.12.1+cu130", "2.14.1+cu130", "2.13.0+cpu", "2.13.0", "2.15.0.dev20261201+cu132")
    names = {csrc_bench.extension_name(version) for version in versions}
    assert len(names) == len(versions) and all(name.isidentifier() for name in names), names
    assert csrc_bench.extension_name() == csrc_bench.extension_name(torch.__version__)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_native_matches_reference(p):
    # The C++ baseline's math, on the CPU when there is no GPU (ATen ops run on any device).
    reason = csrc_bench.unavailable_reason(require_cuda=False)
    if reason:
        pytest.skip(reason)
    ops = csrc_bench.load(require_cuda=False)
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    torch.manual_seed(0)
    M, K, N, r, s = 37, 29, 23, 5, 0.7  # odd sizes, r < 16
    x, weight, lora_a, lora_b = (torch.randn(*shape, dtype=torch.float64, device=device)
                                 for shape in ((M, K), (N, K), (r, K), (N, r)))
    bias, grad_y = torch.randn(N, dtype=torch.float64, device=device), torch.randn(M, N, dtype=torch.float64,
                                                                                   device=device)
    mask = (torch.rand(M, K, device=device) >= p).double() if p > 0 else None
    y, shrunk, x_dropped = ops.lora_forward(x, weight, bias, lora_a, lora_b, s, mask, p)
    dx, da, db, dbias = ops.lora_backward(grad_y, x, x_dropped, weight, lora_a, lora_b, shrunk, s, mask, p, True)

    leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b, bias)]
    x_tilde = leaves[0] if mask is None else leaves[0] * mask / (1 - p)
    y_ref = leaves[0] @ weight.T + leaves[3] + s * (x_tilde @ leaves[1].T) @ leaves[2].T
    grads = torch.autograd.grad(y_ref, leaves, grad_y)
    for name, got, want in zip(("y", "dx", "dA", "dB", "dbias"), (y, dx, da, db, dbias), (y_ref, *grads),
                               strict=True):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"native {name}: {m}")
    floor_y = ops.floor_forward(x, weight, bias)
    torch.testing.assert_close(floor_y, x @ weight.T + bias)
    torch.testing.assert_close(ops.floor_backward(grad_y, weight), grad_y @ weight)


@pytest.mark.parametrize("argv, message", [
    (["--providers", "fused,bogus"], "bogus not in"),
    (["--modes", "sideways"], "sideways not in"),
    (["--smoke", "--quick"], "not allowed with"),
])
def test_sweep_rejects_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_sweep_lists_the_default_grid(capsys):
    assert sweep.main(["--list", "--ops", "lora_linear", "--shapes", "llama-7b.qkvo", "--providers", "fused"]) == 0
    out = capsys.readouterr().out
    assert "fused          llama-7b.qkvo fwd+bwd 8192x4096x4096 r=16 p=0.1 bf16" in out

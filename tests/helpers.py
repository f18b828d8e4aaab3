"""Shared test helpers: the dtype-derived error bound and input builders."""

from __future__ import annotations

import os

import torch

# The GPU tests' dry run (RELORA_TESTS_GPU_DRY_RUN=1 on a machine without CUDA): tests/test_gpu.py's harness runs
# on meta tensors standing in for CUDA ones, each op's launch replaced by its fake (shapes and dtypes only), the
# policy answering as on an H100. Everything but the values runs: inputs, references, gradients, tile and engine
# choices, and any tensor the harness makes on another device fails as it would on the GPU. Comparisons of values
# (meta tensors have none) check shapes, dtypes and devices only.
GPU_DRY_RUN = os.environ.get("RELORA_TESTS_GPU_DRY_RUN") == "1" and not torch.cuda.is_available()


def values_unknown(*tensors: torch.Tensor) -> bool:
    """True for meta tensors (the dry run): a comparison then checks that all are on one device and stops."""
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    assert len(devices) == 1, f"tensors on different devices: {sorted(map(str, devices))}"
    return next(iter(devices)).type == "meta"


def assert_bitwise_equal(name: str, got: torch.Tensor, want: torch.Tensor):
    """torch.equal, with what it means reported; on meta tensors (the dry run) shape, dtype and device only."""
    assert (got.shape, got.dtype) == (want.shape, want.dtype), f"{name}: {got.shape} {got.dtype} vs {want.shape} " \
        f"{want.dtype}"
    if not values_unknown(got, want):
        assert torch.equal(got, want), f"{name}: not bit-identical"

# Small per-dtype absolute slack on top of the 2x-PyTorch rule (flash-attention's tolerance rule).
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_within_torch_error(name: str, got: torch.Tensor, exact: torch.Tensor, torch_same_dtype: torch.Tensor):
    """|got - exact| <= 2 * max|torch_same_dtype - exact| + ATOL[dtype], everywhere.

    `exact` is the float64 reference; `torch_same_dtype` is PyTorch's own computation in got's dtype, so the bound
    follows the dtype rather than a hand-picked number. A failure reports where and by how much.
    """
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(exact.shape)}"
    assert got.dtype == torch_same_dtype.dtype, f"{name}: dtype {got.dtype} != {torch_same_dtype.dtype}"
    if values_unknown(got, exact, torch_same_dtype):
        return
    err = (got.double() - exact).abs()
    torch_err = (torch_same_dtype.double() - exact).abs()
    bound = 2 * torch_err.max().item() + ATOL[got.dtype] if exact.numel() else 0.0
    bad = err > bound
    if bad.any() or not torch.isfinite(got).all():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name} ({got.dtype}): {int(bad.sum())} of {err.numel()} elements exceed the bound {bound:.3g} "
            f"(2 x torch's max error {torch_err.max().item():.3g} + {ATOL[got.dtype]:g}); first at {idx}; "
            f"max error {err.max().item():.3g}, mean {err.mean().item():.3g}"
        )


def rounding_bound(dtype: torch.dtype, terms: int, magnitude: torch.Tensor) -> torch.Tensor:
    """Higham's a priori bound on the rounding error of a sum of `terms` products computed in `dtype`, whatever the
    order of summation or the CPU: gamma_n * sum|products|, gamma_n = n u / (1 - n u), u the unit roundoff.
    `magnitude` is the float64 sum of the products' absolute values (e.g. |a| @ |b|)."""
    u = torch.finfo(dtype).eps / 2
    return terms * u / (1 - terms * u) * magnitude.double()


def assert_within_bound(name: str, got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor):
    """|got - want| <= bound everywhere (bound from rounding_bound); a failure says where and by how much."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if values_unknown(got, want, bound):
        return
    err = (got.double() - want.double()).abs()
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        raise AssertionError(f"{name}: {int(bad.sum())} of {err.numel()} elements exceed their rounding bound; "
                             f"first at {bad.nonzero()[:5].tolist()}; worst excess {(err - bound).max().item():.3g}")


def linear_magnitude(x, weight, lora_a, lora_b, scale, bias=None) -> torch.Tensor:
    """sum|products| of y = x @ W.T + bias + s * (x @ A.T) @ B.T, element by element, in float64 (for
    rounding_bound with K + r + 2 terms: the two reductions and the additions)."""
    x, weight, lora_a, lora_b = (t.detach().double().abs() for t in (x, weight, lora_a, lora_b))
    magnitude = x @ weight.T + abs(scale) * (x @ lora_a.T) @ lora_b.T
    return magnitude if bias is None else magnitude + bias.detach().double().abs()


def make_inputs(lead, k, n, r, dtype, device="cpu", bias=True, seed=0):
    """x (*lead, k), weight (n, k), lora_a (r, k), lora_b (n, r), bias (n,) with O(1) outputs.

    lora_b is random (not the zero init) so the low-rank path contributes to every output and gradient.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        if torch.device(device).type == "meta":  # the GPU tests' dry run: shapes without values, nothing drawn
            return torch.empty(*shape, device=device, dtype=dtype)
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(device=device, dtype=dtype)

    return {
        "x": rand(*lead, k),
        "weight": rand(n, k, std=k**-0.5),
        "lora_a": rand(r, k, std=k**-0.5),
        "lora_b": rand(n, r, std=r**-0.5),
        "bias": rand(n) if bias else None,
    }


def count_launches(monkeypatch, module, names, calls: dict | None = None) -> dict:
    """Wrap the launchers `names` of `module` so that each call is counted in the returned dict (`calls`, to count
    into one shared with other wrapped launchers). `names` may map an attribute to the name it is counted under."""
    calls = {} if calls is None else calls
    for attribute, name in (names.items() if isinstance(names, dict) else zip(names, names, strict=True)):
        launcher = getattr(module, attribute)

        def counted(*args, _launcher=launcher, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(module, attribute, counted)
    return calls


# e4m3's rounding: half an ulp is 2**-4 of a normal value's power of two (3 mantissa bits), and below the smallest
# normal (2**-6) the subnormal step is 2**-9, so an absolute 2**-10; both times the row's scale.
E4M3_HALF_ULP = 2.0**-4
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10


def fp8_quantisation_error(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A bound on |deq(quantize_fp8_rows(t)) - t| element by element, in float64: 2**-4 |t| + 2**-10 * the row's
    scale (the larger of the normal and the subnormal rounding error, summed for simplicity)."""
    return E4M3_HALF_ULP * t.detach().double().abs() + E4M3_SUBNORMAL_HALF_STEP * scale.double()[:, None]


def finish_gloo_worker(results: dict, path, rank: int) -> None:
    """End a torchrun worker of the FSDP tests: rank 0 writes `results` to `path` as JSON, every rank waits for it,
    then leaves without interpreter shutdown. DTensor's caches keep the mesh, hence gloo's threads, alive past
    destroy_process_group, and one of them freeing a finished collective during shutdown aborts the process (pytorch
    issue #190489); the results are written and closed by then."""
    import json
    import sys

    import torch.distributed as dist

    if rank == 0:
        path.write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

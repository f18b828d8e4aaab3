"""The eager path's plans (kernels/passes.py): a key's first call runs the passes in full and plans them; later calls
run the plan. Both must give the float64 reference's result, the plan must really be taken, and a change of
settings must not reuse a plan made under other ones."""

from __future__ import annotations

import weakref

import pytest
import torch
from helpers import assert_within_bound, linear_magnitude, make_inputs, rounding_bound

import relora_kernels as rk
from relora_kernels import reference
from relora_kernels.kernels import passes

M, K, N, R = 37, 40, 36, 5  # odd: partial blocks everywhere


def _fwd_bwd(inputs, dropout_p, seed):
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in inputs.items() if t is not None}
    y = rk.lora_linear(leaves["x"], leaves["weight"].detach(), leaves["lora_a"], leaves["lora_b"], 0.5,
                       leaves.get("bias"), dropout_p, seed)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    y.backward(grad_y)
    return y.detach(), {name: t.grad for name, t in leaves.items() if name != "weight"}, grad_y


def _check_against_reference(inputs, dropout_p, seed, y, grads, grad_y):
    leaves = {name: t.detach().double().requires_grad_(name != "weight") for name, t in inputs.items()
              if t is not None}
    exact = reference.lora_linear(leaves["x"], leaves["weight"], leaves["lora_a"], leaves["lora_b"], 0.5,
                                  leaves.get("bias"), dropout_p, torch.tensor(seed))
    exact.backward(grad_y.double())
    # Each output sums products along a chain of at most M + N + K + r + 2 roundings (the reductions, S and dS rounded
    # to fp32, the additions): Higham's bound on the sum of the products' magnitudes, element by element.
    terms = M + N + K + R + 2
    x, w, a, b = (inputs[name].double().abs() for name in ("x", "weight", "lora_a", "lora_b"))
    dy, keep = grad_y.double().abs(), 1 / (1 - dropout_p)
    magnitudes = {
        "y": linear_magnitude(inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"], 0.5,
                              inputs["bias"]) * keep,
        "x": dy @ w + 0.5 * (dy @ b) @ a * keep,
        "lora_a": 0.5 * (dy @ b).T @ x * keep,
        "lora_b": 0.5 * dy.T @ (x @ a.T) * keep,
        "bias": dy.sum(0),
    }
    assert_within_bound("y", y, exact, rounding_bound(torch.float32, terms, magnitudes["y"]))
    for name, grad in grads.items():
        assert_within_bound(f"d{name}", grad, leaves[name].grad, rounding_bound(torch.float32, terms,
                                                                                 magnitudes[name]))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("dropout_p, bias", [(0.0, True), (0.25, False)], ids=["p0-bias", "p0.25-no-bias"])
def test_a_planned_call_runs_the_plan_and_matches_the_reference(triton_backend, engine, dropout_p, bias,
                                                                  deterministic, monkeypatch):
    rk.configure(deterministic=deterministic)  # the planned backward's two ways of adding up dA, dB, dbias
    monkeypatch.setattr(passes, "_forward_plans", {})
    inputs = make_inputs((M,), K, N, R, torch.float32, bias=bias)
    first = _fwd_bwd(inputs, dropout_p, seed=11)
    (plan,) = passes._forward_plans.values()  # the backward's plans are kept by its forward's
    assert len(plan.backward_plans) == 1, "the first call planned nothing"

    # The second call must not run the unplanned passes: make them fail.
    def unplanned(*args, **kwargs):
        raise AssertionError("a planned key ran the passes in full")

    monkeypatch.setattr(passes, "lora_forward", unplanned)
    monkeypatch.setattr(passes, "lora_backward", unplanned)
    second = _fwd_bwd(inputs, dropout_p, seed=11)
    for got in (first, second):
        _check_against_reference(inputs, dropout_p, 11, *got)
    # Same kernels, same inputs, same seed: the plan reproduces the full passes bit for bit.
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


def test_a_change_of_settings_is_not_served_by_an_old_plan(triton_backend, monkeypatch):
    inputs = make_inputs((M,), K, N, R, torch.float32)
    rk.configure(engine="triton")
    _fwd_bwd(inputs, 0.0, seed=1)
    _fwd_bwd(inputs, 0.0, seed=1)  # planned on the Triton engine
    engines = []
    real = passes.lora_linear._shrink

    def spy(x, lora_a, dropout_p, seed, expand=None, launch=None):
        engines.append("cublas" if expand is not None else "triton")
        return real(x, lora_a, dropout_p, seed, expand, launch)

    def spy_planned(name, engine):  # a planned forward does not go through _shrink
        real_planned = getattr(passes.lora_linear, name)

        def planned(*args):
            engines.append(engine)
            return real_planned(*args)

        monkeypatch.setattr(passes.lora_linear, name, planned)

    monkeypatch.setattr(passes.lora_linear, "_shrink", spy)
    spy_planned("forward_planned", "triton")
    spy_planned("forward_composed_planned", "cublas")
    rk.configure(engine="cublas")
    _fwd_bwd(inputs, 0.0, seed=1)
    _fwd_bwd(inputs, 0.0, seed=1)
    assert engines == ["cublas", "cublas"], engines


def test_a_planned_call_skips_the_checks_yet_refuses_what_they_refuse(triton_backend, monkeypatch):
    """functional.py looks a call's plan up before its argument checks, and a plan's key holds everything they read:
    a call of a planned key must not run them, and every call they would refuse must still be refused, by name."""
    from relora_kernels import functional

    monkeypatch.setattr(passes, "_forward_plans", {})
    inputs = make_inputs((3, 7), K, N, R, torch.float32)  # 3-D x: the key is x's as given, before flattening
    x, weight, lora_a, lora_b, bias = (inputs[name] for name in ("x", "weight", "lora_a", "lora_b", "bias"))
    # The key's first call: checked, planned. scale 1.0 and dropout_p 0.0, which True and False equal and hash alike.
    want = rk.lora_linear(x, weight, lora_a, lora_b, 1.0, bias, 0.0, 3)
    checks = []
    real_check = functional.check_lora_linear_args
    monkeypatch.setattr(functional, "check_lora_linear_args", lambda *args: checks.append(1) or real_check(*args))
    got = rk.lora_linear(x, weight, lora_a, lora_b, 1.0, bias, 0.0, 3)
    assert checks == [], "a planned call ran the argument checks"
    assert torch.equal(got, want)

    refused = {
        "scale": (dict(scale=True), TypeError),  # the key must not take True for 1.0
        "dropout_p": (dict(dropout_p=False), TypeError),
        "seed": (dict(seed="3"), TypeError),
        "lora_b": (dict(lora_b=lora_b.double()), TypeError),
        "bias": (dict(bias=bias[:-1]), ValueError),
        "weight": (dict(weight=weight.tolist()), TypeError),
        "x": (dict(x=x.to("meta")), ValueError),
    }
    good = dict(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, scale=1.0, bias=bias, dropout_p=0.0, seed=3)
    for name, (change, error) in refused.items():
        with pytest.raises(error, match=name):
            rk.lora_linear(**{**good, **change})
    assert len(checks) == len(refused) - 1  # the bad seed is refused before the checks of the tensors


def test_settings_changed_and_restored_find_their_plans_again(triton_backend, monkeypatch):
    """Plans are keyed by the settings' values (their generation is the number of those values): a block under other
    settings plans its own calls, and after it the first settings' plan serves again, with nothing run in full."""
    from relora_kernels import _settings

    monkeypatch.setattr(passes, "_forward_plans", {})
    inputs = make_inputs((M,), K, N, R, torch.float32)
    rk.configure(engine="triton")
    triton_generation = _settings.generation
    _fwd_bwd(inputs, 0.0, seed=1)  # planned on the Triton engine
    with rk.settings(engine="cublas"):
        assert _settings.generation != triton_generation
        _fwd_bwd(inputs, 0.0, seed=1)  # planned on the cuBLAS-composed engine
    assert _settings.generation == triton_generation
    assert sorted(plan.cublas for plan in passes._forward_plans.values()) == [False, True]

    def unplanned(*args, **kwargs):
        raise AssertionError("restored settings ran the passes in full: their plan was not found")

    monkeypatch.setattr(passes, "lora_forward", unplanned)
    monkeypatch.setattr(passes, "lora_backward", unplanned)
    for _ in range(2):  # the Triton engine's plan again, and the cuBLAS-composed one's after a second toggle
        _fwd_bwd(inputs, 0.0, seed=1)
        with rk.settings(engine="cublas"):
            _fwd_bwd(inputs, 0.0, seed=1)


def _saved_by_the_eager_function(op, *args):
    """Weak references to what `op(*args)`'s autograd node saves (seen through saved-tensor hooks, as offloading and
    checkpointing see it), and its output, whose graph the caller keeps alive."""
    saved = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = op(*args)
    return saved, y


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-op", "fp8-op"])
def test_backward_frees_s_while_the_graph_lives_on(triton_backend, fp8):
    """S, the (M, r) intermediate the backward reads, is saved as torch saves its own: saved-tensor hooks see it, and
    the backward frees it even though y, and so the graph, lives on (as a training loop's loss does until the next
    step's forward has run: a graph holding S would keep one per layer through that forward)."""
    if fp8:
        from test_fp8_op import _PROBLEM
        if _PROBLEM is not None:
            pytest.skip(f"no FP8 GEMM on the CPU here: {_PROBLEM}")
    inputs = make_inputs((M,), K, N, R, torch.float32, bias=True)
    x, weight, lora_a, lora_b, bias = (inputs[name] for name in ("x", "weight", "lora_a", "lora_b", "bias"))
    for t in (x, lora_a, lora_b, bias):
        t.requires_grad_(True)
    frozen = rk.quantize_fp8_weight(weight) if fp8 else weight
    op = rk.lora_linear_fp8 if fp8 else rk.lora_linear
    for call in range(2):  # the first call runs the passes in full, the second its plan
        saved, y = _saved_by_the_eager_function(op, x, frozen, lora_a, lora_b, 0.5, bias, 0.1, 3)
        assert any(s() is not None and s().shape == (M, R) for s in saved), f"call {call}: S was not saved"
        y.backward(torch.ones_like(y))
        kept = [s().shape for s in saved if s() is not None and s().shape == (M, R)]
        assert not kept, f"call {call}: the graph still holds S after backward"


def test_a_retained_graph_runs_backward_again_and_a_freed_one_refuses(triton_backend):
    """S saved for backward as torch saves its own tensors: with retain_graph the second backward finds it and adds
    the same gradients again, bit for bit (deterministic sums: on a GPU the default atomics need not add up in the
    same order twice); after a backward without it, a third is refused as torch refuses it."""
    rk.configure(deterministic=True)
    inputs = make_inputs((M,), K, N, R, torch.float32, bias=True)
    leaves = {name: t.detach().requires_grad_(name != "weight") for name, t in inputs.items()}
    grad_y = torch.randn((M, N), generator=torch.Generator().manual_seed(5))
    for call in range(2):  # the first call runs the passes in full, the second its plan
        for leaf in leaves.values():
            leaf.grad = None
        y = rk.lora_linear(leaves["x"], leaves["weight"], leaves["lora_a"], leaves["lora_b"], 0.5, leaves["bias"],
                           0.25, 7)
        y.backward(grad_y, retain_graph=True)
        once = {name: leaf.grad.clone() for name, leaf in leaves.items() if leaf.grad is not None}
        y.backward(grad_y)
        for name, grad in once.items():  # g + g is exact in floating point
            assert torch.equal(leaves[name].grad, 2 * grad), (call, name)
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            y.backward(grad_y)

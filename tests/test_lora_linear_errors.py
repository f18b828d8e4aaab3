"""Bad input gets a clear ValueError/TypeError naming the argument; the backend switch never falls back silently."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import make_inputs

import relora_kernels as rk
from relora_kernels import _backend
from relora_kernels import _settings as rk_settings


def good_args():
    inputs = make_inputs((5,), 8, 6, 2, torch.float32)
    return dict(x=inputs["x"], weight=inputs["weight"], lora_a=inputs["lora_a"], lora_b=inputs["lora_b"],
                bias=inputs["bias"])


# name -> (changes to the good arguments, expected error type, text the message must contain)
BAD_INPUTS = {
    "K of x differs": ({"x": torch.randn(5, 9)}, ValueError, "x's last dim (9)"),
    "K of lora_a differs": ({"lora_a": torch.randn(2, 7)}, ValueError, "lora_a must be (r, 8)"),
    "N of lora_b differs": ({"lora_b": torch.randn(7, 2)}, ValueError, "lora_b must be (out_features, r) = (6, 2)"),
    "r of lora_b differs": ({"lora_b": torch.randn(6, 3)}, ValueError, "got (6, 3)"),
    "bias length": ({"bias": torch.randn(5)}, ValueError, "bias must have out_features = 6"),
    "bias 2-D": ({"bias": torch.randn(1, 6)}, ValueError, "bias must be 1-D"),
    "mixed dtypes": ({"lora_b": torch.randn(6, 2, dtype=torch.float16)}, TypeError, "lora_b: torch.float16"),
    "integer x": ({"x": torch.ones(5, 8, dtype=torch.int64)}, TypeError, "x must be a floating-point tensor"),
    "integer weight": ({"weight": torch.ones(6, 8, dtype=torch.int32)}, TypeError, "weight must be a floating"),
    "x not a tensor": ({"x": [[1.0] * 8]}, TypeError, "x must be a torch.Tensor, got list"),
    "0-d x": ({"x": torch.tensor(1.0)}, ValueError, "x must have at least one dimension"),
    "r = 0": ({"lora_a": torch.randn(0, 8), "lora_b": torch.randn(6, 0)}, ValueError, "r >= 1"),
    "weight not 2-D": ({"weight": torch.randn(6, 8, 1)}, ValueError, "weight must be 2-D, got 3-D"),
    "weight 1-D": ({"weight": torch.randn(8)}, ValueError, "weight must be 2-D, got 1-D"),
    "lora_a 1-D": ({"lora_a": torch.randn(8)}, ValueError, "lora_a must be 2-D"),
}

BAD_SCALARS = {
    "p negative": ({"dropout_p": -0.1}, ValueError, "dropout_p must be in [0, 1)"),
    "p one": ({"dropout_p": 1.0}, ValueError, "dropout_p must be in [0, 1)"),
    "p not a number": ({"dropout_p": "0.1"}, TypeError, "dropout_p must be a real number"),
    "scale nan": ({"scale": float("nan")}, ValueError, "scale must be finite"),
    "scale tensor-like string": ({"scale": "2"}, TypeError, "scale must be a real number"),
    "seed negative": ({"seed": -1}, ValueError, "seed must be in [0, 2**63)"),
    "seed float": ({"seed": 1.5}, TypeError, "seed must be an int or None"),
}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", list(BAD_INPUTS) + list(BAD_SCALARS))
def test_bad_input_raises_clear_error(case, backend, monkeypatch):
    rk.configure(backend=backend)
    changes, error, text = {**BAD_INPUTS, **BAD_SCALARS}[case]
    kwargs = {**good_args(), **changes}
    with pytest.raises(error) as info:
        rk.lora_linear(**kwargs)
    assert text in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_tensors_on_different_devices():
    kwargs = good_args()
    kwargs["weight"] = kwargs["weight"].cuda()
    with pytest.raises(ValueError, match="one device"):
        rk.lora_linear(**kwargs)


def test_tensors_on_different_devices_meta():
    # The meta device stands in for a second device on a CPU-only machine.
    kwargs = good_args()
    kwargs["lora_b"] = kwargs["lora_b"].to("meta")
    with pytest.raises(ValueError, match=r"all tensors must be on one device; .*lora_b: torch.float32 on meta"):
        rk.lora_linear(**kwargs)


def test_rank_above_kernel_limit(triton_backend):
    inputs = make_inputs((3,), 8, 6, 257, torch.float32)
    with pytest.raises(ValueError, match="r <= 256"):
        rk.lora_linear(inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"])


def test_forcing_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    rk.configure(backend="triton")
    monkeypatch.setattr(_backend, "cpu_kernels_allowed", lambda: False)  # as without TRITON_INTERPRET=1
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rk.lora_linear(**good_args())


@pytest.mark.parametrize("variable, value", [("RELORA_KERNELS_BACKEND", "cuda"), ("RELORA_KERNELS_ENGINE", "cutlass"),
                                             ("RELORA_KERNELS_AUTOTUNE", "maybe"),
                                             ("RELORA_KERNELS_DETERMINISTIC", "2")])
def test_invalid_environment_variable_names_it(variable, value):
    with pytest.raises(ValueError, match=f"{variable} must be one of .*got '{value}'"):
        rk_settings.from_environment({variable: value})
    with pytest.raises(ValueError, match="backend must be one of auto, triton, reference; got 'cuda'"):
        rk.configure(backend="cuda")


@pytest.mark.slow
def test_invalid_environment_variable_fails_the_import():
    # The variables are read once, when the package is imported: a bad one stops the import with its name.
    env = {**os.environ, "RELORA_KERNELS_DETERMINISTIC": "sometimes"}
    done = subprocess.run([sys.executable, "-c", "import relora_kernels"], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "RELORA_KERNELS_DETERMINISTIC must be one of" in done.stderr


def test_auto_backend_uses_reference_on_cpu(monkeypatch):
    rk.configure(backend="auto")
    from relora_kernels import functional

    def no_kernels():
        raise AssertionError("auto picked the kernels for a CPU tensor")

    monkeypatch.setattr(functional, "_ops", no_kernels)
    assert rk.lora_linear(**good_args()).shape == (5, 6)

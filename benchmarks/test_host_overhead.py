"""The host-overhead benchmark runs end to end (compiled kernels, stand-in driver) and reports every row and ratio.
Its figures are not asserted here: the goals are checked by reading its report, on a quiet machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from relora_kernels.kernels.passes_fp8 import scaled_mm_support

pytestmark = pytest.mark.slow  # the benchmark runs in a subprocess
ROOT = Path(__file__).resolve().parents[1]


def test_host_overhead_benchmark_runs_and_reports_every_row(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.host_overhead", "--quick", "--shape", "32,16,48,8",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "host_overhead.json").read_text())
    fused = [f"fused {e} p={p}{b}" for e in ("triton", "cublas") for p in ("0", "0.1") for b in (" bias", "")]
    # The FP8 op on the Triton engine always; on cuBLAS where this torch's _scaled_mm runs on the CPU (torch 2.13).
    fp8_engines = ("triton",) + (("cublas",) if scaled_mm_support("cpu", None, torch.float32) is None else ())
    fp8 = [f"fp8 {e} p={p} bias" for e in fp8_engines for p in ("0", "0.1")]
    baselines = [f"{row}{b}" for row in ("floor", "eager p=0", "eager p=0.1") for b in (" bias", "")]
    assert set(result["seconds"]) == {*baselines, *fused, *fp8, "autograd floor", "merge_floor", "merge_and_reinit_",
                                      "gpt2 step eager", "gpt2 step fused"}
    assert all(seconds > 0 for seconds in result["seconds"].values())
    assert set(result["ratios"]) == {*fused, *fp8, "merge_and_reinit_", "gpt2 step fused"}
    assert all(set(result["ratios"][name]) == {"floor", "eager", "bf16_op"} for name in fp8)
    assert not any(key.startswith("fp8 ") for key in result["goals_met"])  # reported, no goal of their own
    assert "stand-in sm_90" in result["conditions"]["launches"] or "real" in result["conditions"]["launches"]
    assert result["conditions"]["shape"] == {"M": 32, "K": 16, "N": 48, "r": 8}
    assert result["conditions"]["command"].endswith("--quick --shape 32,16,48,8")
    assert (tmp_path / "host_overhead.md").read_text().startswith("| row |")


def test_host_overhead_refuses_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.host_overhead", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "without TRITON_INTERPRET=1" in done.stderr


@pytest.mark.parametrize("text", ["64,48,80", "64,48,80,16,1", "64,0,80,16", "64,48,x,16", ""])
def test_host_overhead_refuses_a_shape_that_is_not_four_positive_integers(text):
    done = subprocess.run([sys.executable, "-m", "benchmarks.host_overhead", "--quick", "--shape", text], cwd=ROOT,
                          env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "four positive integers M,K,N,r" in done.stderr


def test_the_engine_backward_gives_what_torch_autograd_grad_gives():
    """--backward engine times the same backward as the default, less torch.autograd.grad's argument checks."""
    from benchmarks.host_overhead import BACKWARDS

    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator, dtype=torch.float64)
                       for shape in ((5, 3), (4, 3), (4,)))
    wrt = [x.requires_grad_(), bias.requires_grad_()]
    grad_y = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    by_grad, by_engine = (BACKWARDS[name](torch.nn.functional.linear(x, weight, bias), wrt, grad_y)
                          for name in ("grad", "engine"))
    assert len(by_grad) == len(by_engine) == 2
    for got, want in zip(by_engine, by_grad, strict=True):
        assert torch.equal(got, want)  # the same graph run by the same engine
    # and both are dx = dy @ W, dbias = dy.sum(0): float64 sums of 4 and 5 terms, each rounding bounded by n * eps
    eps = torch.finfo(torch.float64).eps
    assert torch.all((by_engine[0] - grad_y @ weight).abs() <= 4 * eps * (grad_y.abs() @ weight.abs()))
    assert torch.all((by_engine[1] - grad_y.sum(0)).abs() <= 5 * eps * grad_y.abs().sum(0))
    assert x.grad is None and bias.grad is None  # like torch.autograd.grad: nothing accumulated into .grad


def test_the_conditions_name_the_layer_rows_backward():
    from benchmarks.host_overhead import SHAPE, conditions

    engine = conditions(True, 15, 40, SHAPE, False, "engine")
    assert engine["layer backward"] == "the autograd engine alone"
    assert engine["command"] == "python -m benchmarks.host_overhead --no-gpt2 --backward engine"
    assert conditions(True, 15, 40)["command"] == "python -m benchmarks.host_overhead"


def test_the_conditions_name_the_cpu_model(tmp_path):
    from benchmarks.host_overhead import conditions, cpu_model

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 9654 96-Core Processor"
    cpuinfo.write_text("processor\t: 0\nmodel name\t:\n")  # no name given: the platform's answer instead
    assert cpu_model(cpuinfo) == cpu_model(tmp_path / "missing") != ""
    assert conditions(True, 15, 40)["cpu"] == cpu_model()

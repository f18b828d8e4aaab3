"""The launch path without Triton's per-call binding (kernels/launch.py) and the settings that steer the kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_inputs

import relora_kernels as rk
from relora_kernels import reference
from relora_kernels.kernels import launch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cached_launch_passes_what_triton_passes_and_follows_a_changed_specialisation():
    # Compiled for sm_90 against a stand-in driver (no GPU needed): the launcher call made from launch.py's cache is
    # the one Triton's own launch makes, and an operand 4 bytes off 16-byte alignment, or with its unit stride on
    # the other axis, gets the kernel Triton compiles for it, not the cached one; so does one that a planned eager
    # call passes.
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "launch_check.py")], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for case in ("aligned", "misaligned", "column_major"):
        assert results[case]["same_launcher"] and results[case]["same_grid"] and results[case]["same_args"], results
    assert results["distinct_kernels"] and results["cache_entries"] == 3, results
    plan = results["plan"]
    assert plan["launches"] == [2, 2, 2] and plan["planned_same_kernels"] and plan["misaligned_other_shrink"], plan
    # A planned eager fwd+bwd passes each compiled launcher what the unplanned first call (Triton's own launches)
    # passed: lora_linear's 5 launches (shrink, GEMM; the two gradient launches, GEMM), lora_linear_fp8's 6 (and
    # dy's quantising launch).
    assert results["planned lora_linear"] == {"launches": 5, "same_launches": True}, results
    assert results["planned lora_linear_fp8"] == {"launches": 6, "same_launches": True}, results
    # The planned call's aligned launches (no per-pointer specialisation worked out) start the kernel of the
    # operands' dtype and alignment: fp16 and bf16 after fp32 at the same shapes, a 4-bytes-off dy after aligned ones.
    assert results["aligned launches"] == {
        "planned_are_their_own": [True, True], "no_kernel_shared_across_dtypes": True,
        "misaligned_dy_same": [True, True], "misaligned_dy_other": [True, True],
        "fp32_again_same": True}, results
    # The eager restart's aligned launches (merge, reinit) likewise: a kernel per dtype, another for an A 4 bytes off.
    assert results["restart launches"] == {
        "launches": [2] * 6, "same_twice": [True] * 3, "no_kernel_shared_across_dtypes": True,
        "misaligned_a_other": [True, True], "fp32_again_same": True}, results
    # With a launch hook set (a profiler's) every launch of a planned call goes through Triton's own launch, which
    # hands the hook to the launcher; without one, none is passed.
    assert results["launch hooks"] == {"hooked": [True] * 5, "unhooked": [False] * 5}, results
    assert results["aligned_launch_refuses_misaligned"], results


@pytest.mark.parametrize("engine", ["triton", "cublas"])
def test_changed_alignment_and_stride_after_a_cached_call_stay_exact(engine):
    # The same layer called with x aligned, then 4 bytes off, then column-major: every call is checked against the
    # float64 reference within the fp32 rounding bound of its own (whatever plan the earlier calls cached).
    rk.configure(backend="triton", engine=engine)
    inputs = make_inputs((24,), 40, 36, 4, torch.float32)
    buffer = torch.randn(24 * 40 + 4, generator=torch.Generator().manual_seed(3))
    xs = {"aligned": buffer[: 24 * 40].view(24, 40), "misaligned": buffer[1: 24 * 40 + 1].view(24, 40),
          "column_major": buffer[: 24 * 40].view(40, 24).T}
    args = (inputs["weight"], inputs["lora_a"], inputs["lora_b"], 0.5, inputs["bias"], 0.0)
    for name, x in xs.items():
        y = rk.lora_linear(x, *args)
        exact = reference.lora_linear(x.double(), *(a.double() if isinstance(a, torch.Tensor) else a for a in args))
        # fp32 with fp32 accumulation over K + r terms: a bound of (K + r) units of rounding of the largest term sum
        bound = (40 + 4) * torch.finfo(torch.float32).eps * (x.double().abs() @ inputs["weight"].double().abs().T +
                                                              1).max().item()
        assert (y.double() - exact).abs().max().item() <= bound, name


def test_settings_are_one_validated_object_and_the_block_restores_them():
    before = rk.current_settings()
    with rk.settings(engine="cublas", deterministic=True) as inside:
        assert rk.current_settings() is inside and (inside.engine, inside.deterministic) == ("cublas", True)
        with pytest.raises(TypeError, match="unknown setting"):
            with rk.settings(engin="triton"):
                pass
    assert rk.current_settings() == before


def test_the_engine_choice_follows_a_change_of_settings():
    from relora_kernels.kernels import policy

    gemm = policy.GemmLaunch(torch.float16, 16, "forward", False, False, 64, 64, 64)
    with rk.settings(engine="triton"):
        assert policy.choose_engine(gemm) == "triton"
        with rk.settings(engine="cublas"):
            assert policy.choose_engine(gemm) == "cublas"  # the cached choice does not outlive the setting
        assert policy.choose_engine(gemm) == "triton"


def test_integer_helpers_match_their_definitions():
    for a in range(0, 70):
        for b in (1, 3, 16, 64):
            assert launch.cdiv(a, b) == -(-a // b) == (a + b - 1) // b
    assert [launch.next_power_of_2(n) for n in (0, 1, 2, 3, 16, 17, 255, 256)] == [1, 1, 2, 4, 16, 32, 256, 256]

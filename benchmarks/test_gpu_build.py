"""benchmarks/gpu_build.py: every kernel launch compiles for a real GPU with the installed Triton, and fits it.

Runs the tool in a subprocess (it needs Triton without the interpreter, which this test process has switched on) for
r = 16 and 64 on an H100 (sm_90, wgmma), also at the headline shapes (8192 x 4096 x 4096, 16384 x 4096 x 14336) and
with every operand strided, and for the largest low-rank tiles (r = 256) on an A100 (sm_80, mma, 163 KiB of shared
memory per block).
"""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import time_model
from relora_kernels.kernels import policy

pytestmark = pytest.mark.slow  # the builds run in a subprocess
ROOT = Path(__file__).resolve().parent.parent
GEMM_KERNELS = {"fused_matmul_kernel", "shrink_kernel", "grad_b_kernel", "grad_a_kernel", "merge_kernel"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_build") / "builds.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    options = {"90": ["--ranks", "16", "64", "--shapes", "headline", "mlp", "--trace", "--fp8"],
               "80": ["--ranks", "256", "--fp8"]}
    runs = [
        subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_build", "--arch", arch, "--jobs", "1",
                          "--json", str(out.with_suffix(f".{arch}.json")), *arch_options],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for arch, arch_options in options.items()
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=900)
        assert run.returncode == 0, f"{run.args}: exit {run.returncode}\n{stderr[-4000:]}"
    return {arch: json.loads(out.with_suffix(f".{arch}.json").read_text()) for arch in ("90", "80")}


@pytest.fixture(scope="module")
def builds(reports):
    return [row for report in reports.values() for row in report["rows"]]


def test_every_kernel_is_built_for_each_architecture(builds):
    for arch in ("sm_90", "sm_80"):
        kernels = {row["kernel"] for row in builds if row["arch"] == arch}
        hopper = {"fused_matmul_tma_kernel", "quantize_rows_kernel"} if arch == "sm_90" else set()
        assert kernels == GEMM_KERNELS | {"reinit_kernel"} | hopper, arch
        variants = {kernel: {row["variant"] for row in builds if row["arch"] == arch and row["kernel"] == kernel
                             and not set(row["paths"]) <= FP8_PATHS}
                    for kernel in ("grad_b_kernel", "grad_a_kernel", "shrink_kernel")}
        assert variants["grad_b_kernel"] == {"has_bias_grad", "-", "deterministic", "has_bias_grad deterministic"}
        assert variants["grad_a_kernel"] == {"apply_dropout", "-", "deterministic", "apply_dropout deterministic",
                                             "write_dx", "apply_dropout write_dx"}, variants  # write_dx: cuBLAS engine
        assert variants["shrink_kernel"] == {"-", "apply_dropout", "has_bias expand", "apply_dropout expand",
                                             "has_bias apply_dropout expand"}, variants  # the last: strided
        # Every kernel also built with every operand strided (each stride a runtime argument): the int64 audit's case.
        strided = {row["kernel"] for row in builds if row["arch"] == arch and "strided" in row["paths"]}
        assert strided == GEMM_KERNELS | {"reinit_kernel"}, arch


FP8_PATHS = {"fp8", "fp8 strided"}
# Builds that spill under one Triton only, in bytes of stack: triton 3.8's sm_90 build of the FP8 shrink with dropout
# at r = 64 keeps 8 bytes on the stack (at r = 16 none, nor under triton 3.7 and 3.9; benchmarks.gpu_build,
# 2026-12-05). A speed cost (a local store and load per program), not an error; any other spill fails.
KNOWN_SPILLS = {((3, 8), "shrink_kernel", "apply_dropout quantize", 64): 8}


def test_fp8_launches_build_for_hopper_on_fp8_tensor_cores(builds):
    # sm_90 only (FP8 tensor cores start at sm_89; the CI builds sm_90 and sm_80): every FP8 launch, plain and
    # strided, at r = 16 and 64; the FP8 GEMM on e4m3 wgmma (not converted to fp16), nothing spilled.
    fp8 = [row for row in builds if set(row["paths"]) & FP8_PATHS]
    assert {row["arch"] for row in fp8} == {"sm_90"} and {row["r"] for row in fp8} == {16, 64}
    variants = {(row["kernel"], row["variant"]) for row in fp8}
    assert {("shrink_kernel", "quantize"), ("shrink_kernel", "apply_dropout quantize"),
            ("grad_b_kernel", "has_bias_grad row_amax"), ("grad_b_kernel", "row_amax"),
            ("quantize_rows_kernel", "-"), ("quantize_rows_kernel", "has_amax"),
            ("fused_matmul_kernel", "has_bias fp8"), ("fused_matmul_kernel", "fp8"),
            ("fused_matmul_kernel", "apply_dropout fp8")} <= variants, variants
    for row in fp8:
        known = KNOWN_SPILLS.get((policy.TRITON_VERSION, row["kernel"], row["variant"], row["r"]), 0)
        assert row["stack_bytes"] <= known, row
        if "fp8" in row["variant"].split():
            assert row["wgmma"] and row["fp8_mma"], row


def test_hopper_kernel_reads_through_tma_and_multiplies_on_wgmma(builds):
    # Every Hopper tile that fits, forward and dx, at r = 16 and 64: TMA copies and wgmma; the first candidate (the
    # preferred tile, warp-specialised) without spills.
    hopper = [row for row in builds if row["kernel"] == "fused_matmul_tma_kernel"]
    assert {row["r"] for row in hopper} == {16, 64} and len(hopper) >= 20
    for row in hopper:
        assert row["tma"] and row["wgmma"], row
        first = row["tile"]["WARP_SPECIALIZE"] and (row["tile"]["BLOCK_N"], row["num_stages"]) == (128, 4)
        if first:
            assert row["stack_bytes"] == 0 and row["num_warps"] == 12, row  # warp-specialised: 3 warpgroups


def test_no_pointer_offset_wraps_at_2_to_the_31(builds):
    # An i32 product of a program id or loop index with a runtime stride, as a pointer offset, wraps at 2**31: the
    # deterministic slots (slot * N * r) and a transposed x (k * M) did, before they were made int64.
    for row in builds:
        assert row["int32_offsets"] == [], row


def test_headline_shapes_build_with_what_hopper_needs(builds):
    # At the headline shapes on sm_90: the GEMMs on wgmma, the default tiles without spills, the gradient
    # reductions as vector atomics (a scalar one only for dbias, (N,) per token block), occupancy reported.
    headline = [row for row in builds if row["arch"] == "sm_90" and {"headline", "mlp"} & set(row["paths"])]
    assert {row["r"] for row in headline} == {16, 64}
    assert {row["kernel"] for row in headline} == GEMM_KERNELS | {"reinit_kernel"}
    for row in headline:
        assert row["stack_bytes"] == 0, row
        assert row["blocks_per_sm"] >= 1, row
        if row["kernel"] == "fused_matmul_kernel":
            assert row["wgmma"], row
        if row["kernel"] in ("grad_a_kernel", "grad_b_kernel") and "deterministic" not in row["variant"]:
            assert row["atomics"]["vector"] >= 2, row
            assert row["atomics"]["scalar"] <= ("has_bias_grad" in row["variant"]), row


def test_launches_fit_shared_memory_and_estimates_bound_it(builds):
    for row in builds:
        assert row["shared_bytes"] <= row["shared_limit"], row
        if row["kernel"] not in ("reinit_kernel", "quantize_rows_kernel"):  # no shared memory to speak of
            assert row["shared_bytes"] <= row["shared_estimate"], row


def test_hopper_builds_run_the_gemms_on_wgmma(builds):
    # Hopper's tensor-core instruction: a change that pushed a GEMM back to the older mma path would show here.
    # (A warpgroup's wgmma covers 64 rows: the last-resort 32-row tile cannot use it, nor can grad_a_kernel's one
    # product dS.T @ x~, whose rows are the r < 64 ranks; it is memory-bound.)
    for row in builds:
        rows = row["r"] if row["kernel"] == "grad_a_kernel" else row["tile"].get("BLOCK_M", 64)
        if row["arch"] == "sm_90" and row["kernel"] in GEMM_KERNELS and rows >= 64:
            assert row["wgmma"], row


def test_tuned_candidates_and_fixed_paths_are_both_built(builds):
    matmul = [row for row in builds if row["kernel"] == "fused_matmul_kernel" and row["arch"] == "sm_90"]
    assert any("fixed" in row["paths"] for row in matmul)
    for rank in (16, 64):
        tuned = {(tuple(row["tile"].items()), row["num_stages"], row["num_warps"]) for row in matmul
                 if "tuned" in row["paths"] and row["r"] == rank}
        assert len(tuned) == 6, rank  # policy.TUNED_CANDIDATES, all fitting on an H100 at r <= 64


def test_hopper_fixed_tiles_do_not_spill(builds):
    # The fixed tiles at r = 16 on an H100 (RELORA_KERNELS_AUTOTUNE=0, the GPU tests) keep everything in registers.
    # One Philox draw per dropout element once gave the dropout GEMM 255 registers and a 2.5 KB stack frame.
    for row in builds:
        if row["arch"] == "sm_90" and {"fixed", "headline", "mlp", "strided"} & set(row["paths"]):
            assert row["stack_bytes"] == 0 or row["kernel"] == "fused_matmul_tma_kernel", row


# What each kernel writes (its output pointers), which Inductor's analysis of the kernel must find: were the analysis
# to fail, Inductor would assume every tensor argument written and copy the inputs (x, W, ...) in every step.
WRITTEN = {"shrink_kernel": ["s_ptr"], "fused_matmul_kernel": ["out_ptr"], "grad_a_kernel": ["da_ptr", "ds_ptr"],
           "merge_kernel": ["w_ptr"], "reinit_kernel": ["a_ptr", "b_ptr"]}
# Per engine, each op's launches; the cuBLAS-composed engine's passes end in an ATen addmm, the Triton engine's in none.
LAUNCHES = {
    "triton": {"lora_forward": ["shrink_kernel", "fused_matmul_kernel"],
               "lora_backward": ["grad_b_kernel", "grad_a_kernel", "fused_matmul_kernel"]},
    "cublas": {"lora_forward": ["shrink_kernel"], "lora_backward": ["grad_b_kernel", "grad_a_kernel"]},
}
RESTART_LAUNCHES = {"merge_lora_weight_": ["merge_kernel"], "reinit_lora_": ["reinit_kernel"]}
ATEN_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_mm"}


def _op(label: str) -> str:
    """The op a traced row stands for: "lora_backward deterministic" -> "lora_backward", and a LoRALinear layer's
    "LoRALinear p=0.1 forward" -> "lora_forward"."""
    words = label.split()
    return f"lora_{words[-1]}" if words[0] == "LoRALinear" else words[0]


def test_compile_sees_every_op_as_its_kernels_and_what_they_write(reports):
    traced = reports["90"]["traced"]
    for engine, launches in LAUNCHES.items():
        rows = [row for row in traced if row["engine"] == engine]
        assert {_op(row["op"]) for row in rows} == set(launches) | set(RESTART_LAUNCHES)
        for row in rows:
            op = _op(row["op"])
            assert row["opaque"] == [], row  # decomposed: Inductor schedules the kernels themselves
            assert [launch["kernel"] for launch in row["launches"]] == {**launches, **RESTART_LAUNCHES}[op], row
            gemms = ATEN_GEMMS & set(row["aten_ops"])
            assert gemms == ({"addmm"} if engine == "cublas" and op in launches else set()), row
            for launch in row["launches"]:
                written = WRITTEN.get(launch["kernel"])
                if launch["kernel"] == "grad_b_kernel":  # dbias only when asked (the layer's bias is trained)
                    written = ["db_ptr", "ds_ptr"] + ([] if "deterministic" in row["op"] else ["dbias_ptr"])
                    written.sort()
                if engine == "cublas" and launch["kernel"] == "shrink_kernel":
                    written = ["out_ptr", "s_ptr"]  # and the start value of y
                if engine == "cublas" and launch["kernel"] == "grad_a_kernel":
                    written = ["da_ptr", "dx_ptr"]  # the start value of dx instead of dS
                assert launch["written"] == written, (engine, row["op"], launch)
                assert set(written) < set(launch["tensor_args"]) or launch["kernel"] == "reinit_kernel", launch


def test_the_time_model_prices_every_launch_of_a_training_step(reports):
    # PERF_NOTES' time model (benchmarks/time_model.py) once left eight small kernels a step unpriced: a kernel the
    # op launches and the model does not list fails here.
    traced = reports["90"]["traced"]
    for engine in time_model.TRITON_KERNELS:
        step = [row for row in traced if row["engine"] == engine and row["op"].startswith("LoRALinear")
                and row["r"] == 16]
        assert [row["op"].split()[-1] for row in step] == ["forward", "backward"], step
        kernels = [launch["kernel"] for row in step for launch in row["launches"]]
        assert kernels == list(time_model.TRITON_KERNELS[engine])
        aten = collections.Counter()
        for row in step:
            aten.update(row["aten_kernels"])
        gemms = {op: aten.pop(op) for op in ATEN_GEMMS & set(aten)}
        assert sum(gemms.values()) == time_model.CUBLAS_GEMMS[engine], gemms
        assert dict(aten) == time_model.TRACED_SMALL_KERNELS


def test_a_failed_build_is_a_failed_row_and_the_others_go_on(monkeypatch, tmp_path):
    # In-process, nothing compiled: a kernel whose build raises (as triton 3.6's warp-specialisation pass did) is
    # recorded with its error by the build-only launch, a job that fails outside any build is one failed row, and
    # main writes the table with every row and exits 1.
    from benchmarks import gpu_build

    class Failing:
        __name__ = "_fused_matmul_tma_kernel"

        def warmup(self, *args, **kwargs):
            raise RuntimeError("PassManager::run failed\n")

    recorded = []
    launch = gpu_build._BuildOnly(Failing(), lambda *args: recorded.append(args))
    tile = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "WARP_SPECIALIZE": True, "EPILOGUE_SPLIT": 4}
    launch[(1,)](APPLY_DROPOUT=True, num_warps=4, num_stages=3, **tile)  # returns: the launcher goes on
    ((kernel, kwargs, compiled, _, path, error),) = recorded
    assert (kernel, compiled, path) == ("_fused_matmul_tma_kernel", None, "fixed")
    assert str(error) == "PassManager::run failed\n"
    failed = gpu_build.failed_row("sm_90", "bf16", 16, kernel, kwargs, path, error)
    assert failed["error"] == "RuntimeError: PassManager::run failed" and failed["variant"] == "apply_dropout"

    def job_fails(*job):
        raise ValueError("no such launcher")

    monkeypatch.setattr(gpu_build, "build_all", job_fails)
    (job_row,) = gpu_build._build_job((90, "fp16", 64, ()))
    assert (job_row["r"], job_row["dtype"], job_row["error"]) == (64, "fp16", "ValueError: no such launcher")

    monkeypatch.setattr(gpu_build, "_build_job", lambda job: [failed, job_row])
    monkeypatch.setattr(gpu_build.multiprocessing, "Pool", _SerialPool)
    monkeypatch.setattr(gpu_build.policy, "interpreting", lambda: False)
    assert gpu_build.main(["--arch", "90", "--ranks", "16", "--jobs", "1", "--out", str(tmp_path)]) == 1
    table = (tmp_path / "gpu_build.md").read_text()
    assert "2 builds, 2 failed" in table
    assert "| sm_90 | bf16 | 16 | fused_matmul_tma_kernel | apply_dropout | 128x256x64 w4 s3 ws e4 | fixed | **build " \
           "failed**: RuntimeError: PassManager::run failed |" in table
    assert [row["error"] for row in json.loads((tmp_path / "gpu_build.json").read_text())["rows"]] == [
        failed["error"], job_row["error"]]


def test_global_fp32_sums_count_in_either_spelling_tritons_write():
    # PTX lines as triton 3.9 (red) and triton 3.6-3.8 (atom, its result unused) write a tl.atomic_add into four fp32
    # slots at once and into one; a max (an FP8 row's amax) and a 16-bit add are no fp32 sums. In process, no build.
    from benchmarks import gpu_build

    ptx = "\n".join([
        "\t@%p15 red.global.gpu.relaxed.add.v4.f32 [ %rd86 + 0 ], { %r94, %r95, %r96, %r97 };",
        "\t@%p19 atom.global.gpu.relaxed.add.v4.f32 { %r227, %r228, %r229, %r230 }, [ %rd100 + 0 ], "
        "{ %r231, %r232, %r233, %r234 };",
        "\t@%p13 red.global.gpu.relaxed.add.f32 [ %rd68 + 0 ], %r109;",
        "\t@%p17 atom.global.gpu.relaxed.add.f32 %r143, [ %rd64 + 0 ], %r144;",
        "\t@%p2 atom.global.gpu.relaxed.max.s32 %r1, [ %rd5 + 0 ], %r2;",
        "\t@%p3 red.global.add.noftz.bf16 [ %rd6 + 0 ], %rs1;",
    ])
    assert gpu_build._atomics(ptx) == {"vector": 2, "scalar": 2}


class _SerialPool:
    """multiprocessing.Pool's interface, in this process (so that the test's replacements apply)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, function, jobs, chunksize=1):
        return [function(job) for job in jobs]

"""benchmarks/tune.py: the choice of tiles from timings, the table it writes, and that the launcher finds it.

The timings here are invented (choose) or absent (the smoke run through the interpreter): tuning itself needs a GPU.
"""

from __future__ import annotations

import json

import pytest
import torch

import relora_kernels as rk
from relora_kernels.kernels import lora_linear as kernels
from relora_kernels.kernels import passes, policy

from . import tune

H100_SHARED_MEMORY = 232448


def _launch(variant="forward+bias", n_out=4096, k_in=4096):
    return {"dtype": "bf16", "r": 16, "kind": variant.split("+")[0], "variant": variant, "M": 8192, "N_out": n_out,
            "K_in": k_in}


def test_each_shape_gets_its_fastest_choice_and_the_default_the_smallest_mean_slowdown():
    cublas = tune.CUBLAS
    results = [
        {"launch": _launch(), "times": {cublas: 0.95, "A": 1.0, "B": 1.1, "C": 0.9}},  # C timed on one shape only
        {"launch": _launch(n_out=11008), "times": {cublas: 1.5, "A": 2.0, "B": 1.0}},
        {"launch": _launch("input_grad+dropout"), "times": {cublas: 0.5, "A": 1.0, "B": 3.0}},
    ]
    defaults, shapes = tune.choose(results)
    assert [shapes[tune.keys(r["launch"])[1]] for r in results] == [
        {"engine": "triton", "tile": "C"}, {"engine": "triton", "tile": "B"}, {"engine": "cublas", "tile": "A"}]
    # forward+bias: cuBLAS slows down by (0.95/0.9 + 1.5/1.0) / 2 = 1.28, A by (1.0/0.9 + 2.0) / 2 = 1.56, B by
    # (1.1/0.9 + 1) / 2 = 1.11; C lacks a shape.
    assert defaults == {"bf16/r16/forward+bias": {"engine": "triton", "tile": "B"},
                        "bf16/r16/input_grad+dropout": {"engine": "cublas", "tile": "A"}}


def test_plan_covers_every_layer_both_launches_and_their_variants_once():
    launches = tune.plan(["bf16"], [16, 64], 8192, smoke=False)
    shape_keys = [tune.keys(launch)[1] for launch in launches]
    assert len(set(shape_keys)) == len(shape_keys)
    assert {launch["variant"] for launch in launches} == {"forward", "forward+bias", "input_grad",
                                                          "input_grad+dropout"}
    assert "bf16/r16/input_grad+dropout/M8192/N4096/K11008" in shape_keys  # llama-7b.up's dx = dy @ W


def test_the_package_finds_what_tune_writes(monkeypatch):
    # The same pass, keyed by tune.keys and looked up by the package: the written engine and tile are what run.
    launch = {"dtype": "fp32", "r": 4, "kind": "input_grad", "variant": "input_grad+dropout", "M": 64, "N_out": 48,
              "K_in": 80}
    entry = {"engine": "triton", "tile": "32x32x32 g8 w4 s2"}
    monkeypatch.setattr(policy, "tuned_table",
                        lambda: {"sm_90": {"default": {}, "shapes": {tune.keys(launch)[1]: entry}}})
    monkeypatch.setattr(policy, "current_arch", lambda: 90)
    monkeypatch.setattr(policy, "interpreting", lambda: False)
    monkeypatch.setattr(policy, "shared_memory_limit", lambda: H100_SHARED_MEMORY)
    monkeypatch.setattr(policy, "target_programs", lambda: 528)
    rk.configure(autotune=True)
    launched = []
    monkeypatch.setattr(kernels, "traceable", lambda kernel: _Recorder(kernel, launched))
    tune.build(launch, torch.device("cpu"))()
    (kwargs,) = [kwargs for kernel, kwargs in launched if kernel is kernels._fused_matmul_kernel]
    assert (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_K"], kwargs["num_stages"]) == (32, 32, 32, 2)
    # (M, N, K) of dx = dy @ W: N is x's K_in, the reduction dy's N_out.
    assert (kwargs["M"], kwargs["N"], kwargs["K"]) == (64, 80, 48)


class _Recorder:
    def __init__(self, kernel, launched):
        self.kernel, self.launched = kernel, launched

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append((self.kernel, kwargs))


def test_smoke_run_writes_an_untimed_table_under_its_own_key(tmp_path):
    assert tune.main(["--smoke", "--out", str(tmp_path)]) == 0
    table = json.loads((tmp_path / "tuned_gemm.json").read_text())
    assert set(table) - set(json.loads(policy.TUNED_TABLE.read_text())) == {"smoke"}
    smoke = table["smoke"]
    assert smoke["measured"]["tokens"] == 64 and smoke["measured"]["launches_tuned"] == 4
    for entry in {**smoke["default"], **smoke["shapes"]}.values():
        assert entry["engine"] in policy.ENGINES
        policy.parse_tile(entry["tile"])
    assert "nothing timed" in (tmp_path / "tune.md").read_text()


def test_tune_needs_a_gpu_or_smoke(capsys):
    if torch.cuda.is_available():
        pytest.skip("there is a GPU")
    with pytest.raises(SystemExit):
        tune.main(["--out", "/tmp/never"])
    assert "no CUDA device" in capsys.readouterr().err


def _hopper(monkeypatch, arch=90):
    monkeypatch.setattr(policy, "current_arch", lambda: arch)
    monkeypatch.setattr(policy, "shared_memory_limit", lambda: H100_SHARED_MEMORY)


@pytest.mark.parametrize("kind", ["forward", "input_grad"])
def test_hopper_tiles_are_timed_on_sm90_where_the_operands_are_tma_eligible(monkeypatch, kind):
    _hopper(monkeypatch)
    launch = _launch("forward+bias" if kind == "forward" else "input_grad+dropout")
    lhs = torch.empty(64, launch["K_in"] if kind == "forward" else launch["N_out"], dtype=torch.bfloat16)
    weight = torch.empty(launch["N_out"], launch["K_in"], dtype=torch.bfloat16)
    rhs_t = weight if kind == "forward" else weight.T  # dx = dy @ W reads W.T through its transpose
    tiles = tune.tiles_to_time(launch, (lhs, rhs_t), smoke=False)
    pointer = policy.fitting(policy.gemm_tiles(), policy.gemm_shared_bytes, 16, torch.bfloat16)
    hopper = policy.tma_tiles(tune.gemm_launch(launch))
    assert hopper and all(tile.kernel == "tma" for tile in hopper)
    assert tiles == pointer + hopper
    # Not eligible (a view 2 bytes off the 16-byte alignment): the pointer tiles only.
    assert tune.tiles_to_time(launch, (lhs[:, 1:], rhs_t), smoke=False) == pointer


def test_no_hopper_tiles_before_sm90_or_in_fp32(monkeypatch):
    _hopper(monkeypatch, arch=80)
    operands = (torch.empty(64, 4096, dtype=torch.bfloat16), torch.empty(4096, 4096, dtype=torch.bfloat16))
    assert all(tile.kernel == "pointer" for tile in tune.tiles_to_time(_launch(), operands, smoke=False))
    _hopper(monkeypatch, arch=90)
    fp32 = {**_launch(), "dtype": "fp32"}
    operands = tuple(t.float() for t in operands)
    assert all(tile.kernel == "pointer" for tile in tune.tiles_to_time(fp32, operands, smoke=False))


def test_smoke_times_the_interpreter_hopper_tile_through_the_hopper_kernel(monkeypatch):
    from relora_kernels.kernels import fused_gemm_tma

    (launch, *_) = tune.plan([], [], 0, smoke=True)
    launched = []
    real = fused_gemm_tma.traceable
    monkeypatch.setattr(fused_gemm_tma, "traceable", lambda kernel: launched.append(kernel) or real(kernel))
    times, errors = tune.time_choices(launch, torch.device("cpu"), smoke=True)
    assert list(times) == [tune.CUBLAS, *(t.name for t in policy.GEMM_TILES[-2:]), policy.INTERPRETER_TMA_TILE.name]
    assert set(times.values()) == {None} and errors == {}
    assert launched == [fused_gemm_tma._fused_matmul_tma_kernel]  # the Hopper tile ran the Hopper kernel, once


def test_a_tile_that_fails_to_build_is_a_failed_row_and_tuning_goes_on(monkeypatch, tmp_path):
    # One tile's compile error (as triton 3.6 raised for some warp-specialised Hopper builds) is recorded with its
    # error; the other choices are still run, the table and tune.md are written, and the exit status is 1.
    failing = policy.GEMM_TILES[-1]
    real = passes._fused_matmul

    def fused_matmul(*args, **kwargs):
        if policy._forced_tiles and policy._forced_tiles[-1] == failing:
            raise RuntimeError("PassManager::run failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(passes, "_fused_matmul", fused_matmul)
    plan = tune.plan
    monkeypatch.setattr(tune, "plan", lambda *args, **kwargs: plan(*args, **kwargs)[-1:])  # one dx pass: short
    assert tune.main(["--smoke", "--out", str(tmp_path)]) == 1
    table = json.loads((tmp_path / "tuned_gemm.json").read_text())["smoke"]
    assert table["measured"]["launches_tuned"] == table["measured"]["launches_planned"] == 1
    (entry,) = table["shapes"].values()
    assert entry == {"engine": "cublas", "tile": policy.GEMM_TILES[-2].name}  # smoke: the first tile that built
    report = (tmp_path / "tune.md").read_text()
    (launch,) = tune.plan([], [], 0, smoke=True)
    _, operands = tune.build(launch, torch.device("cpu"), with_operands=True)
    ran = 1 + len(tune.tiles_to_time(launch, operands, smoke=True)) - 1  # the cuBLAS engine, every tile but one
    assert f"| {launch['M']} x {launch['N_out']} x {launch['K_in']} | {ran} |" in report
    assert "Failed choices (1)" in report and f"| {failing.name} | RuntimeError: PassManager::run failed |" in report

"""benchmarks/tune.py: the choice of tiles from timings, the table it writes, and that the launcher finds it.

The timings here are invented (choose) or absent (the smoke run through the interpreter): tuning itself needs a GPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from relora_kernels.kernels import lora_linear as kernels

from . import tune

H100_SHARED_MEMORY = 232448


def _launch(variant="forward+bias", n_out=4096, k_in=4096):
    return {"dtype": "bf16", "r": 16, "kind": variant.split("+")[0], "variant": variant, "M": 8192, "N_out": n_out,
            "K_in": k_in}


def test_each_shape_gets_its_fastest_tile_and_the_default_the_smallest_mean_slowdown():
    results = [
        {"launch": _launch(), "times": {"A": 1.0, "B": 1.1, "C": 0.9}},  # C timed on one shape only
        {"launch": _launch(n_out=11008), "times": {"A": 2.0, "B": 1.0}},
        {"launch": _launch("input_grad+dropout"), "times": {"A": 1.0, "B": 3.0}},
    ]
    defaults, shapes = tune.choose(results)
    assert [shapes[tune.keys(r["launch"])[1]] for r in results] == ["C", "B", "A"]
    # forward+bias: A slows down by (1.0/0.9 + 2.0/1.0) / 2 = 1.56, B by (1.1/0.9 + 1) / 2 = 1.11; C lacks a shape.
    assert defaults == {"bf16/r16/forward+bias": "B", "bf16/r16/input_grad+dropout": "A"}


def test_plan_covers_every_layer_both_launches_and_their_variants_once():
    launches = tune.plan(["bf16"], [16, 64], 8192, smoke=False)
    shape_keys = [tune.keys(launch)[1] for launch in launches]
    assert len(set(shape_keys)) == len(shape_keys)
    assert {launch["variant"] for launch in launches} == {"forward", "forward+bias", "input_grad",
                                                          "input_grad+dropout"}
    assert "bf16/r16/input_grad+dropout/M8192/N4096/K11008" in shape_keys  # llama-7b.up's dx = dy @ W


def test_the_launcher_finds_what_tune_writes(monkeypatch):
    # The same launch, keyed by tune.keys and looked up by the launcher: the written tile is what would run.
    launch = {"dtype": "fp32", "r": 4, "kind": "input_grad", "variant": "input_grad+dropout", "M": 64, "N_out": 48,
              "K_in": 80}
    monkeypatch.setattr(kernels, "_tuned_table",
                        lambda: {"sm_90": {"default": {}, "shapes": {tune.keys(launch)[1]: "32x32x32 g8 w4 s2"}}})
    monkeypatch.setattr(kernels, "_current_arch", lambda: 90)
    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    monkeypatch.setattr(kernels, "_shared_memory_limit", lambda: H100_SHARED_MEMORY)
    monkeypatch.delenv("RELORA_KERNELS_AUTOTUNE", raising=False)
    launched = []
    monkeypatch.setattr(kernels, "traceable", lambda kernel: _Recorder(launched))
    tune.build(launch, torch.device("cpu"))()
    (kwargs,) = launched
    assert (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_K"], kwargs["num_stages"]) == (32, 32, 32, 2)


class _Recorder:
    def __init__(self, launched):
        self.launched = launched

    def __getitem__(self, grid):
        return lambda **kwargs: self.launched.append(kwargs)


def test_smoke_run_writes_an_untimed_table_under_its_own_key(tmp_path):
    assert tune.main(["--smoke", "--out", str(tmp_path)]) == 0
    table = json.loads((tmp_path / "tuned_gemm.json").read_text())
    assert set(table) - set(json.loads(kernels.TUNED_TABLE.read_text())) == {"smoke"}
    smoke = table["smoke"]
    assert smoke["measured"]["tokens"] == 64 and smoke["measured"]["launches_tuned"] == 4
    for name in {**smoke["default"], **smoke["shapes"]}.values():
        kernels.parse_tile(name)
    assert "nothing timed" in (tmp_path / "tune.md").read_text()


def test_tune_needs_a_gpu_or_smoke(capsys):
    if torch.cuda.is_available():
        pytest.skip("there is a GPU")
    with pytest.raises(SystemExit):
        tune.main(["--out", "/tmp/never"])
    assert "no CUDA device" in capsys.readouterr().err

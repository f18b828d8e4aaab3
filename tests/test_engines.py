"""The two engines of the frozen GEMMs and the choice between them (kernels/policy.py): RELORA_KERNELS_ENGINE, the
engine-and-tile table (hit, bucket, miss -> the analytic rule), and tuning at most once per launch key."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import make_inputs

import relora_kernels as rk
from relora_kernels import _settings as rk_settings
from relora_kernels.kernels import lora_linear, passes, policy

H100_SHARED_MEMORY = 232448


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_each_engine_runs_its_own_launches(dropout_p, engine, monkeypatch, kernel_calls):
    # cublas: no fused GEMM launch, an addmm_ for y and one for dx onto the Triton launches' start values; triton:
    # the fused GEMM for each and no addmm_.
    fused, addmm = [], []
    monkeypatch.setattr(passes, "_fused_matmul", lambda *args, _run=passes._fused_matmul: fused.append(1) or
                        _run(*args))
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, *args, _run=torch.Tensor.addmm_: addmm.append(1) or
                        _run(self, *args))
    inputs = make_inputs((21,), 40, 24, 5, torch.float32)
    leaves = {name: t.clone().requires_grad_(name != "weight") for name, t in inputs.items()}
    y = rk.lora_linear(leaves["x"], leaves["weight"], leaves["lora_a"], leaves["lora_b"], 0.5, leaves["bias"],
                       dropout_p, 3)
    y.sum().backward()
    assert (len(fused), len(addmm)) == ((0, 2) if engine == "cublas" else (2, 0))
    assert kernel_calls == {"lora_forward": 1, "lora_backward": 1}


def test_engine_setting_is_checked_and_names_the_variable():
    for value, expected in (("", "auto"), ("auto", "auto"), ("Triton", "triton"), (" cublas ", "cublas")):
        assert rk_settings.from_environment({"RELORA_KERNELS_ENGINE": value}).engine == expected
    with pytest.raises(ValueError, match=r"RELORA_KERNELS_ENGINE must be one of auto, triton, cublas; got 'cutlass'"):
        rk_settings.from_environment({"RELORA_KERNELS_ENGINE": "cutlass"})
    with pytest.raises(ValueError, match="engine must be one of auto, triton, cublas; got 'cutlass'"):
        rk.configure(engine="cutlass")
    assert rk.current_settings().engine == "auto"  # nothing changed by the refused value


def launch(M=8192, N=4096, K=4096, dtype=torch.bfloat16, kind="forward", bias=True, dropout=False):
    return policy.GemmLaunch(dtype, 16, kind, bias, dropout, M, N, K)


@pytest.fixture
def on_h100(monkeypatch):
    """The policy as it runs on an H100 (sm_90), with a table the test sets."""
    monkeypatch.setattr(policy, "interpreting", lambda: False)
    monkeypatch.setattr(policy, "current_arch", lambda: 90)
    monkeypatch.setattr(policy, "shared_memory_limit", lambda: H100_SHARED_MEMORY)

    def set_table(default=None, shapes=None):
        table = {"sm_90": {"measured": {}, "default": default or {}, "shapes": shapes or {}}}
        monkeypatch.setattr(policy, "tuned_table", lambda: table)

    set_table()
    return set_table


def test_the_rule_picks_cublas_for_long_reductions_and_fp32():
    assert policy.predicted_engine(launch(K=4096)) == "cublas"  # the headline
    assert policy.predicted_engine(launch(M=2048, N=768, K=768)) == "triton"  # GPT-2 124M's attention width
    assert policy.predicted_engine(launch(M=2048, N=768, K=3072)) == "cublas"  # its MLP down-projection
    assert policy.predicted_engine(launch(N=768, K=768, dtype=torch.float32)) == "cublas"
    assert policy.predicted_engine(launch(K=policy.CUBLAS_MIN_REDUCTION - 1)) == "triton"


def test_table_hit_bucket_and_miss(on_h100, monkeypatch):
    headline = launch()
    on_h100(shapes={headline.shape_key: {"engine": "triton", "tile": "128x256x64 g8 w8 s3"}},
            default={launch(N=768, K=768).variant: {"engine": "cublas"}})
    assert policy.choose_engine(headline) == "triton"  # the shape's entry, over the rule's cublas
    assert policy.choose_engine(launch(M=5000)) == "triton"  # same power-of-two bucket (8192): same entry
    assert launch(M=5000).shape_key == headline.shape_key
    assert policy.choose_engine(launch(M=2048, N=768, K=768)) == "cublas"  # the variant's default, over "triton"
    assert policy.choose_engine(launch(M=2048, N=768, K=768, kind="input_grad")) == "triton"  # miss: the rule
    assert policy.gemm_tile(headline, None).name == "128x256x64 g8 w8 s3"
    rk.configure(engine="cublas")  # the override wins over the table
    assert policy.choose_engine(headline) == "cublas"


def test_tile_choice_fixed_forced_and_a_table_tile_that_does_not_fit(on_h100, monkeypatch):
    headline = launch()
    first = policy.fitting(policy.gemm_tiles(), policy.gemm_shared_bytes, 16, torch.bfloat16)[0]
    rk.configure(autotune=False)
    assert policy.gemm_tile(headline, None) == first
    with policy.forced_tile(policy.GEMM_TILES[-1]):
        assert policy.gemm_tile(headline, None) == policy.GEMM_TILES[-1]
    rk.configure(autotune=True)
    on_h100(shapes={headline.shape_key: {"engine": "triton", "tile": "256x256x128 g8 w8 s4"}})  # ~400 KiB
    assert policy.gemm_tile(headline, None) == first  # not launched: untimed, the first fitting tile


@pytest.mark.parametrize("autotune", [False, True])
def test_the_table_tile_comes_before_the_fixed_and_the_tuned_tile(autotune, on_h100, monkeypatch):
    # The table's tile first whatever the autotune setting says (off only stops tuning): the GPU script runs with
    # RELORA_KERNELS_AUTOTUNE=0, and a table it could not reach would leave its tuned tiles untested there.
    headline = launch(kind="input_grad", bias=False, dropout=True)
    rk.configure(autotune=autotune)
    table_tile = "64x64x64 g8 w4 s4"
    assert policy.fitting(policy.gemm_tiles(), policy.gemm_shared_bytes, 16, torch.bfloat16)[0].name != table_tile
    on_h100(default={headline.variant: {"engine": "triton", "tile": table_tile}})
    assert policy.gemm_tile(headline, lambda tile: pytest.fail("timed a tile the table names")).name == table_tile
    on_h100(shapes={headline.shape_key: {"engine": "cublas", "tile": "128x128x64 g8 w4 s4"}})
    assert policy.gemm_tile(headline, None).name == "128x128x64 g8 w4 s4"


def test_a_tile_found_wrong_is_never_chosen_on_its_architecture(on_h100, monkeypatch):
    # policy.WRONG_TILES: on sm_90 no fixed, tuned, table or FP8 choice may fall on a tile a GPU run found computing
    # wrong results; on another architecture it is still a candidate.
    monkeypatch.setattr(policy, "TUNER", policy.TileTuner())
    (wrong,) = policy.WRONG_TILES[90]
    assert wrong in {tile.name for tile in policy.GEMM_TILES}
    timed = []
    chosen = policy.gemm_tile(launch(M=2042, N=1500, K=1000), lambda tile: timed.append(tile.name) or 1.0)
    assert timed and wrong not in timed and chosen.name != wrong
    headline = launch()
    on_h100(shapes={headline.shape_key: {"engine": "triton", "tile": wrong}})
    assert policy.gemm_tile(headline, None).name != wrong
    for rank in (16, 256):
        for dtype in (torch.bfloat16, torch.float32):
            names = [t.name for t in policy.fitting(policy.gemm_tiles(), policy.gemm_shared_bytes, rank, dtype)]
            assert wrong not in names and names
    assert lora_linear.fp8_gemm_tile(16, torch.bfloat16).name != wrong
    monkeypatch.setattr(policy, "current_arch", lambda: 80)
    assert wrong in {tile.name for tile in policy.gemm_tiles()}


def test_varying_batch_sizes_tune_at_most_once_per_bucket(on_h100, monkeypatch):
    # 50 random token counts between 1000 and 9000: buckets 1024 .. 16384, so at most 5 tunings, each timing the
    # candidates once; later calls of a bucket take its tuned tile without timing anything.
    monkeypatch.setattr(policy, "TUNER", policy.TileTuner())
    timed = []

    def time_tile(tile):
        timed.append(tile)
        return float(tile.block_m * tile.block_n)  # the smallest tile "wins"

    rng = random.Random(0)
    chosen = {policy.gemm_tile(launch(M=rng.randint(1000, 9000)), time_tile) for _ in range(50)}
    buckets = {launch(M=m).m_bucket for m in range(1000, 9001)}
    assert policy.TUNER.tunings <= len(buckets) == 5
    assert len(timed) == policy.TUNER.tunings * policy.TUNED_CANDIDATES
    candidates = policy.fitting(policy.gemm_tiles(), policy.gemm_shared_bytes, 16, torch.bfloat16)
    assert chosen == {min(candidates[:policy.TUNED_CANDIDATES], key=lambda t: t.block_m * t.block_n)}
    # A launch that cannot be timed (traced, or captured into a CUDA graph) never tunes.
    before = policy.TUNER.tunings
    policy.gemm_tile(launch(M=100), None)
    assert policy.TUNER.tunings == before


@pytest.mark.parametrize("version", [(3, 6), (3, 7), (3, 9)])
def test_hopper_tiles_offered_are_those_the_running_triton_builds(version, on_h100, monkeypatch):
    # Under triton 3.6 (torch 2.11's) sm_90 builds of the warp-specialised 128x256 tile, and of any warp-specialised
    # tile with dropout, fail in Triton's warp-specialisation pass: they are no candidates there; from 3.7 on they are.
    # benchmarks.gpu_build builds exactly tma_tiles' offer under each version in CI.
    monkeypatch.setattr(policy, "TRITON_VERSION", version)
    forward, dx_dropout = launch(), launch(kind="input_grad", bias=False, dropout=True)
    ws = {tile.name for tile in policy.TMA_TILES if tile.warp_specialize}
    assert ws == {"128x128x64 g8 w4 s4 tma ws e1", "128x256x64 g8 w4 s3 tma ws e4"}
    offered = {gemm.variant: {tile.name for tile in policy.tma_tiles(gemm)} for gemm in (forward, dx_dropout)}
    every = {tile.name for tile in policy.TMA_TILES}
    if version >= (3, 7):
        assert offered == {forward.variant: every, dx_dropout.variant: every}
    else:
        assert offered == {forward.variant: every - {"128x256x64 g8 w4 s3 tma ws e4"}, dx_dropout.variant: every - ws}
    on_h100(default={dx_dropout.variant: {"engine": "triton", "tile": "128x128x64 g8 w4 s4 tma ws e1"}})
    chosen = policy.gemm_tile(dx_dropout, None, tma_ok=True)
    assert chosen.warp_specialize == (version >= (3, 7))  # a table naming a tile this Triton cannot build: unused

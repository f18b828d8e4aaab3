"""kernels/fused_gemm_tma.py: the persistent tensor-descriptor GEMM through the interpreter against float64.

The interpreter runs the descriptors (zero-filled past the edges) and the persistent tile loop; warp specialisation
and TMA itself only exist in the sm_90 build (benchmarks/gpu_build.py, checked by benchmarks/test_gpu_build.py).
"""

from __future__ import annotations

import contextvars
from pathlib import Path

import pytest
import torch
import triton
from helpers import assert_within_torch_error

import relora_kernels as rk
from relora_kernels import reference
from relora_kernels.kernels import fused_gemm_tma, policy

ROOT = Path(__file__).resolve().parent.parent
TILE = policy.INTERPRETER_TMA_TILE  # 32x32x32, GROUP_M 2, the epilogue in two 16-column slices


def rand(*shape, dtype, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)


def column_major(t: torch.Tensor) -> torch.Tensor:
    return t.T.contiguous().T


def forward_case(M, K, N, R, dtype, bias, strided=None):
    """x (M, K), W (N, K), S (M, R), B (N, R), scale 0.5 (the launch takes rhs = W.T, up = B.T). strided="sliced":
    x and S column-major, B a column slice (pointer-loaded low-rank tiles), bias every other element;
    "column-major": x, S and B column-major (descriptors of their transposes)."""
    x, w = rand(M, K, dtype=dtype), rand(N, K, dtype=dtype, std=K**-0.5)
    s, b = rand(M, R, dtype=dtype), rand(N, 2 * R if strided == "sliced" else R, dtype=dtype, std=R**-0.5)
    bias_t = rand(2 * N if strided else N, dtype=dtype)[:: 2 if strided else 1] if bias else None
    if strided:
        x, s = column_major(x), column_major(s)
        b = b[:, ::2] if strided == "sliced" else column_major(b)
    return x, w, s, b, 0.5, bias_t


def check_forward(args):
    x, w, s, b, scale, bias = args
    got = fused_gemm_tma.fused_matmul_tma(x, w.T, s, b.T, scale, bias, 0.0, None, tile=TILE)
    exact = reference.lora_forward_matmul(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    assert_within_torch_error("out", got, exact, reference.lora_forward_matmul(*args))


@pytest.mark.parametrize(
    "M, K, N, R, dtype, bias",
    [
        (70, 72, 88, 5, torch.float32, True),  # r < 16: pointer-loaded low-rank tiles
        (70, 72, 88, 16, torch.float16, False),  # low and up_t TMA-eligible: descriptor-loaded
        (45, 40, 50, 17, torch.float16, True),  # r = 17: two rank blocks of padding
    ],
    ids=["fp32-r5-bias", "fp16-r16", "fp16-r17-bias"],
)
def test_forward_matches_float64(M, K, N, R, dtype, bias):
    # M, N, K all ragged against the 32-blocks (K = 72: a last k-step of 8).
    check_forward(forward_case(M, K, N, R, dtype, bias))


@pytest.mark.parametrize("strided", ["sliced", "column-major"])
def test_forward_strided_operands(strided):
    x, w, s, b, scale, bias = args = forward_case(52, 48, 40, 8, torch.float32, True, strided=strided)
    assert x.stride(0) == 1 and s.stride(0) == 1 and bias.stride(0) == 2
    # Descriptor layouts: x and S through their transposes; B a slice is not eligible, B column-major is.
    assert fused_gemm_tma._tma_layout(x) is False and fused_gemm_tma._tma_layout(s) is False
    assert fused_gemm_tma._tma_layout(b) is (None if strided == "sliced" else False)
    check_forward(args)


@pytest.mark.parametrize("dtype, R", [(torch.float32, 16), (torch.float16, 17)], ids=["fp32-r16", "fp16-r17"])
def test_input_grad_with_dropout_matches_float64(dtype, R):
    # dx = dy @ W + mask(dS @ A) / (1-p): rhs = W and up = A, read through descriptors of their transposes.
    M, K_in, N_out, p = 45, 72, 56, 0.3
    dy, w = rand(M, N_out, dtype=dtype), rand(N_out, K_in, dtype=dtype, std=N_out**-0.5)
    ds, a = rand(M, R, dtype=dtype), rand(R, K_in, dtype=dtype, std=K_in**-0.5)
    seed = torch.tensor(1234)
    got = fused_gemm_tma.fused_matmul_tma(dy, w, ds, a, 1.0 / (1.0 - p), None, p, seed, tile=TILE)
    exact = reference.lora_input_grad(dy.double(), w.double(), ds.double(), a.double(), p, seed)
    assert_within_torch_error("dx", got, exact, reference.lora_input_grad(dy, w, ds, a, p, seed))
    # The mask is really applied: without it the result is far off.
    unmasked = reference.lora_input_grad(dy.double(), w.double(), ds.double(), a.double() / (1 - p), 0.0, None)
    assert (got.double() - unmasked).abs().max() > 0.1


def test_persistent_loop_writes_every_tile_once(monkeypatch):
    # 5 x 4 = 20 output tiles (the last row group holds one row block) on 3 programs: uneven, several tiles each.
    # The output starts as NaN, so a tile no program visits stays NaN; one visited twice would still be correct,
    # so the grid is recorded too.
    monkeypatch.setattr(policy, "INTERPRETER_PROGRAMS", 3)
    real_empty, grids = torch.empty, []
    monkeypatch.setattr(fused_gemm_tma.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    real_traceable = fused_gemm_tma.traceable

    def recording(kernel):
        launch = real_traceable(kernel)

        class Grid:
            def __getitem__(self, grid):
                grids.append(grid)
                return launch[grid]

        return Grid()

    monkeypatch.setattr(fused_gemm_tma, "traceable", recording)
    args = forward_case(150, 40, 100, 8, torch.float32, True)
    check_forward(args)  # finite everywhere and within the bound
    tiles = triton.cdiv(150, 32) * triton.cdiv(100, 32)
    assert tiles == 20 and grids == [(3,)]


def test_grouped_order_visits_each_tile_once():
    # The tile -> (row block, column block) map of the persistent loop, replayed on the host for ragged groups.
    for num_pid_m, num_pid_n, group in ((5, 4, 2), (7, 3, 8), (1, 6, 4)):
        seen = []
        for tile_id in range(num_pid_m * num_pid_n):
            first = (tile_id // (group * num_pid_n)) * group
            size = min(num_pid_m - first, group)
            seen.append((first + (tile_id % (group * num_pid_n)) % size, (tile_id % (group * num_pid_n)) // size))
        assert sorted(seen) == [(m, n) for m in range(num_pid_m) for n in range(num_pid_n)]


def test_empty_output():
    out = fused_gemm_tma.fused_matmul_tma(torch.empty(0, 16), torch.empty(16, 8), torch.empty(0, 4),
                                          torch.empty(4, 8), 1.0, None, 0.0, None, tile=TILE)
    assert out.shape == (0, 8)


def test_tma_eligible():
    x16 = torch.empty(64, 72, dtype=torch.float16)  # row stride 144 B
    w16 = torch.empty(40, 72, dtype=torch.float16)
    assert fused_gemm_tma.tma_eligible(x16, w16)
    assert fused_gemm_tma.tma_eligible(column_major(x16), w16.T.contiguous().T)  # column-major: via the transpose
    assert fused_gemm_tma.tma_eligible(x16, torch.empty(72, 40, dtype=torch.float16).T)  # dx's W.T
    assert fused_gemm_tma.tma_eligible(x16[:, :64], w16[::2])  # slices keeping 16-byte strides and base
    assert not fused_gemm_tma.tma_eligible(x16[:, 1:], w16)  # base 2 bytes off
    assert not fused_gemm_tma.tma_eligible(x16, w16[:, 1:])
    assert not fused_gemm_tma.tma_eligible(torch.empty(64, 45, dtype=torch.float16), w16)  # row stride 90 B
    assert not fused_gemm_tma.tma_eligible(x16[:, ::2], w16)  # no unit stride
    x32 = torch.empty(64, 72)
    assert fused_gemm_tma.tma_eligible(x32[:, 4:], x32)  # 16 bytes off: aligned
    assert not fused_gemm_tma.tma_eligible(x32[:, 2:], x32)
    assert not fused_gemm_tma.tma_eligible(x32.double(), x32.double())
    assert not fused_gemm_tma.tma_eligible(torch.empty(64, 1).expand(64, 8), x32)  # stride 0 of a broadcast
    with pytest.raises(ValueError, match="TMA-eligible"):
        fused_gemm_tma.fused_matmul_tma(x16[:, 1:], w16[:, 1:].T, torch.empty(64, 4, dtype=torch.float16),
                                        torch.empty(4, 40, dtype=torch.float16), 1.0, None, 0.0, None, tile=TILE)


def test_warp_specialisation_only_with_descriptor_low_rank_tiles(monkeypatch):
    # Pointer-loaded low-rank tiles would not build with warp specialisation: the launcher turns it off for them.
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda **kwargs: launched.append(kwargs)

    monkeypatch.setattr(fused_gemm_tma, "traceable", lambda kernel: Recorder())
    tile = policy.TMA_TILES[0]
    assert tile.warp_specialize
    x, w = torch.empty(8, 64, dtype=torch.bfloat16), torch.empty(8, 64, dtype=torch.bfloat16)
    for rank, expected in ((16, True), (5, False)):
        low, up = torch.empty(8, rank, dtype=torch.bfloat16), torch.empty(8, rank, dtype=torch.bfloat16)
        fused_gemm_tma.fused_matmul_tma(x, w.T, low, up.T, 1.0, None, 0.0, None, tile=tile)
        assert launched[-1]["WARP_SPECIALIZE"] is expected and launched[-1]["LOW_TMA"] is expected


def test_scratch_allocator_set_once_per_context_and_never_over_a_users():
    from triton.runtime import _allocation

    def in_fresh_context():  # a new thread's view: Triton's allocator ContextVar at its default
        assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
        fused_gemm_tma._use_scratch_allocator()
        assert _allocation._allocator.get() is fused_gemm_tma._scratch

        def users(size, alignment, stream):
            raise AssertionError("not called here")

        triton.set_allocator(users)
        fused_gemm_tma._use_scratch_allocator()
        assert _allocation._allocator.get() is users

    contextvars.Context().run(in_fresh_context)


def test_tiles_estimates_and_names():
    names = [tile.name for tile in policy.TMA_TILES]
    assert names[:2] == ["128x128x64 g8 w4 s4 tma ws e1", "128x256x64 g8 w4 s3 tma ws e4"]
    assert len(set(names)) == len(names) and all(policy.parse_tile(name).name == name for name in names)
    # r = 16 in bf16, warp-specialised 128x128x64 s4: 4 stages of 128x64 + 128x64 tiles, two copies of the
    # low-rank tiles, a consumer's 64x128 conversion buffer, barriers.
    expected = (4 * 256 * 64 + 2 * 16 * 256 + 64 * 128) * 2 + 2048
    assert policy.gemm_shared_bytes(policy.TMA_TILES[0], 16, 2) == expected


def test_the_engine_runs_a_hopper_tile_where_the_table_names_it_and_the_operands_allow(monkeypatch):
    # On sm_90 a table entry naming a Hopper tile sends the fused GEMM to this kernel; operands TMA cannot read (x
    # with an odd base address) take the pointer-load kernel's candidates instead, never the Hopper tile.
    from relora_kernels.kernels import passes

    monkeypatch.setattr(policy, "interpreting", lambda: False)
    monkeypatch.setattr(policy, "current_arch", lambda: 90)
    monkeypatch.setattr(policy, "shared_memory_limit", lambda: 232448)
    rk.configure(autotune=True)
    hopper = policy.TMA_TILES[2]
    launch = policy.GemmLaunch(torch.float16, 16, "forward", False, False, 64, 48, 64)
    monkeypatch.setattr(policy, "tuned_table", lambda: {"sm_90": {"shapes": {launch.shape_key: {
        "engine": "triton", "tile": hopper.name}}}})
    ran = []
    monkeypatch.setattr(fused_gemm_tma, "fused_matmul_tma", lambda *args, tile: ran.append(tile) or "tma")
    x, w = rand(64, 64, dtype=torch.float16), rand(48, 64, dtype=torch.float16)
    s, b = rand(64, 16, dtype=torch.float16), rand(48, 16, dtype=torch.float16)
    assert passes._fused_matmul(x, w.T, s, b.T, 1.0, None, 0.0, None, launch) == "tma" and ran == [hopper]
    odd = rand(64, 65, dtype=torch.float16)[:, 1:]
    assert not fused_gemm_tma.tma_eligible(odd, w)
    assert policy.gemm_tile(launch, None, tma_ok=False).kernel == "pointer"

"""How each launch is configured: its tiles, their shared memory, and which engine runs the frozen GEMMs.

Two engines compute the same op, with the same dropout masks, seeds and saved tensors (x, S and the seed):
    triton   the fused GEMM: one Triton launch per pass computes the frozen GEMM and adds the low-rank term
    cublas   one Triton launch writes the low-rank term (plus bias) into the output buffer, then cuBLAS accumulates
             the frozen GEMM onto it (torch's addmm with beta = 1): one more write and read of the output
The engine setting (relora_kernels.settings: auto|triton|cublas; RELORA_KERNELS_ENGINE seeds it). auto takes the
engine-and-tile table's entry for the launch (TUNED_TABLE, written by `python -m benchmarks.tune` on a GPU), else the
analytic rule `predicted_engine`; the choice is cached per launch key and settings generation (the number of the
settings' values: equal settings, equal choices).

The Triton engine's GEMM tile: the table's, else the first fitting tile (the autotune setting off,
RELORA_KERNELS_AUTOTUNE=0), else tuned once per launch key (the default). A key counts tokens by power-of-two
bucket, never the exact M, so a varying batch size never re-tunes; a launch that cannot be timed (traced on fake
tensors, or inside a CUDA-graph capture) takes the bucket's tuned tile if there is one, else the first fitting tile.
Gradient, shrink and merge kernels, which accumulate with atomics or write in place, always take the first tile of
their list that fits.

Why a tuner and a table of the package's own rather than `triton.autotune`: autotune times every config on the first
call of each new key, and the fused GEMM's first call may come where nothing can run or be timed: inside a CUDA-graph
capture (where a benchmark's synchronisation is not allowed), or while torch.compile traces the op on fake tensors,
which have no data (AOT tracing runs the launcher as the op's fake implementation). There the tile must follow from
the shapes alone (`gemm_tile` with `timeable` false: the bucket's tuned tile, else the first fitting one). Autotune
keys on exact argument values, so every new token count would be timed again; GemmLaunch.m_bucket keys by its
power-of-two bucket. One choice also spans what autotune cannot: the engine (a Triton kernel or cuBLAS's addmm) and
which of two kernels runs the tile (the pointer-load one or, on sm_90, fused_gemm_tma's). And a committed table
(tuned_gemm.json, written by benchmarks.tune with the conditions it was measured under; empty until a GPU has filled
it) makes the choices reproducible from run to run and reviewable in a diff, where autotune's are timed on the
machine that runs them and can differ from one run to the next.

Tiles are chosen to fit the device's shared memory (227 KiB per block on an H100, 163 KiB on an A100, 99 KiB on an
RTX 4090): the low-rank tiles grow with r. The estimates bound what Triton allocates from above; `python -m
benchmarks.gpu_build` compiles every launch for sm_80-sm_90 without a GPU and checks them (CI does, for sm_90 and
sm_80). Under the interpreter every kernel runs one small tile (it executes one program at a time on the CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import triton

# Whether Triton runs kernels through its CPU interpreter: the package's one reader of the setting, in _backend. A
# module-level name here, which the kernel modules call as policy.interpreting() and tests may replace.
from .. import _settings as settings
from .._backend import interpreting
from .launch import dot_precision, next_power_of_2, remember

ENGINES = ("triton", "cublas")
ENGINE_SETTINGS = settings.ENGINES


def engine_setting() -> str:
    return settings.current().engine


@functools.cache
def block_rank(rank: int) -> int:
    """r padded to a power of two >= 16 because tl.dot needs every dimension >= 16; the padding is masked."""
    return max(16, next_power_of_2(rank))


# ---------------------------------------------------------------------------------------------------------------
# Tiles and their shared memory
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GemmTile:
    """A tile of the fused GEMM, written "128x128x64 g8 w8 s4" (BLOCK_M x BLOCK_N x BLOCK_K, GROUP_M, warps,
    stages) for the pointer-load kernel, with " tma", " ws" (warp-specialised) and " e2" (the epilogue in 2 column
    slices) for the Hopper kernel of fused_gemm_tma.py."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    kernel: str = "pointer"  # or "tma"
    warp_specialize: bool = False
    epilogue_split: int = 1

    @property
    def name(self) -> str:
        name = (f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.num_warps} "
                f"s{self.num_stages}")
        if self.kernel == "tma":
            name += " tma" + (" ws" if self.warp_specialize else "") + f" e{self.epilogue_split}"
        return name

    @functools.cached_property
    def constexprs(self) -> dict:
        blocks = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "GROUP_M": self.group_m}
        if self.kernel == "tma":
            blocks |= {"WARP_SPECIALIZE": self.warp_specialize, "EPILOGUE_SPLIT": self.epilogue_split}
        return blocks

    @functools.cached_property
    def launch_options(self) -> dict:
        return {**self.constexprs, "num_warps": self.num_warps, "num_stages": self.num_stages}


def parse_tile(name: str) -> GemmTile:
    """The inverse of GemmTile.name; a ValueError naming the text if it is not one."""
    try:
        blocks, group, warps, stages, *hopper = name.split()
        block_m, block_n, block_k = (int(b) for b in blocks.split("x"))
        if (group[0], warps[0], stages[0]) != ("g", "w", "s"):
            raise ValueError
        tile = GemmTile(block_m, block_n, block_k, int(group[1:]), int(warps[1:]), int(stages[1:]))
        if not hopper:
            return tile
        if hopper[0] != "tma" or hopper[-1][0] != "e" or hopper[1:-1] not in ([], ["ws"]):
            raise ValueError
        return dataclasses.replace(tile, kernel="tma", warp_specialize=hopper[1:-1] == ["ws"],
                                   epilogue_split=int(hopper[-1][1:]))
    except (ValueError, IndexError):
        raise ValueError(f"not a tile name like '128x128x64 g8 w8 s4' or '128x128x64 g8 w4 s4 tma ws e1': "
                         f"{name!r}") from None


INTERPRETER_BLOCK = 32
INTERPRETER_TILE = GemmTile(INTERPRETER_BLOCK, INTERPRETER_BLOCK, INTERPRETER_BLOCK, 4, 4, 1)
# The Hopper kernel's under the interpreter: GROUP_M 2 and two epilogue slices, so that small tests cover both.
INTERPRETER_TMA_TILE = GemmTile(32, 32, 32, 2, 4, 2, kernel="tma", warp_specialize=True, epilogue_split=2)

# In order of preference for a fixed tile; Hopper-sized first, the last fits anywhere (r = 256 in fp32 on a 99 KiB
# GPU). What a GPU measures replaces the order through the table.
GEMM_TILES = [parse_tile(name) for name in (
    "128x128x64 g8 w8 s4", "128x256x64 g8 w8 s3", "256x128x64 g8 w8 s3", "128x128x64 g8 w4 s4", "64x128x64 g8 w4 s4",
    "128x128x32 g8 w4 s4", "64x64x64 g8 w4 s4", "32x32x32 g8 w4 s2",
)]
# Tiles of GEMM_TILES that a GPU run found computing wrong results, left out on that architecture (gemm_tiles). sm_90:
# on an H200 under triton 3.6, 128x128x32 w4 s4 was off by a relative 0.55 in the forward at 2042 x 1000 -> 1500
# (r = 1) and 1.2 in dx at 1000 tokens, 1024 -> 1500 (r = 128), where every other tile was within 2.1e-4, and the
# tuning that timed it at those shapes took the CUDA context down with an illegal memory access
# (benchmarks/results/h200_2026-12-04). Not yet run under another Triton, so left out whatever the version.
WRONG_TILES = {90: frozenset({"128x128x32 g8 w4 s4"})}
_gemm_tiles: dict[int, list[GemmTile]] = {}


def gemm_tiles() -> list[GemmTile]:
    """GEMM_TILES less the WRONG_TILES of this GPU's architecture: the pointer-load kernel's tiles that may run here,
    in the same order (one list per architecture, so that `fitting` caches it)."""
    arch = current_arch()
    tiles = _gemm_tiles.get(arch)
    if tiles is None:
        wrong = WRONG_TILES.get(arch, frozenset())
        tiles = _gemm_tiles[arch] = [tile for tile in GEMM_TILES if tile.name not in wrong]
    return tiles


# The Hopper kernel's candidates (sm_90, 16-bit operands that pass fused_gemm_tma.tma_eligible), in order of
# preference. Warp-specialised tiles ask for 4 warps because Triton's warp specialisation acts only there (at 8 it
# is ignored); 128x128x64 w4 s3 is the tile two blocks of fit on one SM; each epilogue split is the fewest that
# builds without spills (docs/DESIGN.md section 10). They run only where the table names them, never chosen by
# tuning at run time, so that a tile no GPU has run cannot take a training run's CUDA context down.
TMA_TILES = [parse_tile(name) for name in (
    "128x128x64 g8 w4 s4 tma ws e1", "128x256x64 g8 w4 s3 tma ws e4", "128x128x64 g8 w4 s3 tma e4",
    "128x64x64 g8 w4 s4 tma e2", "128x128x64 g8 w8 s4 tma e2", "128x256x64 g8 w8 s3 tma e4", "64x64x32 g8 w4 s3 tma e2",
)]
# Tuning times the first few that fit (each a compile and a timing per launch key); the small last-resort tiles
# only where the large ones do not fit.
TUNED_CANDIDATES = 6
SHRINK_CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},  # fp32 at r = 256 on 99 KiB
]
GRAD_AB_CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},  # fp32 at r = 256, 99-163 KiB
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},  # and writing dx's start
]

# What Triton allocates beside the tiles counted below (barriers, scratch), which differs between the supported
# Tritons: added to every estimate so that each bounds all of them.
TRITON_SHARED_OVERHEAD = 1024


def gemm_shared_bytes(tile: GemmTile, rank_block: int, element_size: int) -> int:
    """The fused GEMM's shared memory: the x and W tiles of every pipeline stage (the TMA destinations), plus the
    (BLOCK_M, r) and (r, BLOCK_N) low-rank tiles. A warp-specialised tile holds the low-rank tiles twice (the producer
    copies them for this tile and the next), one consumer warpgroup's (BLOCK_M / 2, BLOCK_N) slice for the
    epilogue's layout conversion, and twice the barrier allowance."""
    low_rank = rank_block * (tile.block_m + tile.block_n)
    tiles = tile.num_stages * (tile.block_m + tile.block_n) * tile.block_k
    if tile.warp_specialize:
        return element_size * (tiles + 2 * low_rank + tile.block_m // 2 * tile.block_n) + 2 * TRITON_SHARED_OVERHEAD
    return element_size * (tiles + low_rank) + TRITON_SHARED_OVERHEAD


def shrink_shared_bytes(config: dict, rank_block: int, element_size: int) -> int:
    """The shrink's (also when it expands: the B tiles of its second loop are not pipelined): the x and A tiles of
    every stage."""
    tiles = config["num_stages"] * (config["BLOCK_M"] + rank_block) * config["BLOCK_K"]
    return element_size * tiles + TRITON_SHARED_OVERHEAD


def grad_b_shared_bytes(config: dict, rank_block: int, element_size: int) -> int:
    """_grad_b_kernel's: the dy and B tiles of every stage, plus three (BLOCK_M, r) tiles (S, dS, layouts)."""
    block_m = config["BLOCK_M"]
    tiles = config["num_stages"] * (block_m + rank_block) * config["BLOCK_N"] + 3 * block_m * rank_block
    return element_size * tiles + TRITON_SHARED_OVERHEAD


def grad_a_shared_bytes(config: dict, rank_block: int, element_size: int, write_dx: bool = False) -> int:
    """_grad_a_kernel's: the x tiles of every stage, plus three (BLOCK_M, r) tiles (dS, dS.T, layouts); writing dx's
    start (the cuBLAS-composed engine), also the (r, BLOCK_K) A tiles of every stage and one more for the layout."""
    block_m, block_k, stages = config["BLOCK_M"], config["BLOCK_K"], config["num_stages"]
    tiles = stages * block_m * block_k + 3 * block_m * rank_block + (stages + 1) * rank_block * block_k * write_dx
    return element_size * tiles + TRITON_SHARED_OVERHEAD


def grad_ab_shared_bytes(config: dict, rank_block: int, element_size: int, write_dx: bool = False) -> int:
    """The two gradient kernels share a config: the larger of their needs."""
    return max(grad_b_shared_bytes(config, rank_block, element_size),
               grad_a_shared_bytes(config, rank_block, element_size, write_dx))


def grad_ab_with_dx_shared_bytes(config: dict, rank_block: int, element_size: int) -> int:
    return grad_ab_shared_bytes(config, rank_block, element_size, write_dx=True)


# ---------------------------------------------------------------------------------------------------------------
# The device
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _device_properties(device: int) -> dict:
    return triton.runtime.driver.active.utils.get_device_properties(device)


def shared_memory_limit() -> int:
    """Shared memory one block may use on the device Triton launches on (the current one)."""
    return _device_properties(triton.runtime.driver.active.get_current_device())["max_shared_mem"]


def current_arch() -> int:
    """The compute capability Triton compiles for, e.g. 90 on an H100 (cached per driver and device: asking the
    driver costs microseconds)."""
    active = triton.runtime.driver.active
    key = (id(active), active.get_current_device())
    arch = _arch_cache.get(key)
    if arch is None:
        arch = _arch_cache[key] = active.get_current_target().arch
    return arch


_arch_cache: dict[tuple, int] = {}


# Programs a memory-bound launch should have: enough for several per SM, so that each SM keeps many loads in
# flight. Under the interpreter a small number, so that the tests' tiny inputs still exercise the split paths.
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4


def multiprocessor_count() -> int:
    return _device_properties(triton.runtime.driver.active.get_current_device())["multiprocessor_count"]


def target_programs() -> int:
    return INTERPRETER_PROGRAMS if interpreting() else PROGRAMS_PER_SM * multiprocessor_count()


def fitting(configs: list, shared_bytes: Callable, rank_block: int, dtype: torch.dtype) -> list:
    """The configs whose estimated shared memory fits the device, in their order of preference."""
    limit = shared_memory_limit()
    key = (id(configs), shared_bytes, rank_block, dtype, limit)
    found = _fitting_cache.get(key)
    if found is None or found[0] is not configs:  # the same list, not another one at a reused address
        found = _fitting_cache[key] = (configs, _fitting(configs, shared_bytes, rank_block, dtype, limit))
    return found[1]


# (configs, estimate, rank block, dtype, the device's limit) -> (configs, the fitting ones), as launches ask often.
_fitting_cache: dict[tuple, tuple] = {}


def _fitting(configs: list, shared_bytes: Callable, rank_block: int, dtype: torch.dtype, limit: int) -> list:
    element_size = dtype.itemsize
    fits = [c for c in configs if shared_bytes(c, rank_block, element_size) <= limit]
    if not fits:  # the last config of each list fits 99 KiB at r = 256 in fp32: only a tiny GPU gets here
        raise RuntimeError(f"no tile of the LoRA kernels fits this GPU's {limit} bytes of shared memory per block "
                           f"at r <= {rank_block} in {dtype}; use a smaller rank or RELORA_KERNELS_BACKEND=reference")
    return fits


# ---------------------------------------------------------------------------------------------------------------
# Launch keys and the engine-and-tile table
# ---------------------------------------------------------------------------------------------------------------

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class GemmLaunch(NamedTuple):
    """One frozen-GEMM pass as the table knows it: `gemm_pass` "forward" (y = x @ W.T ...) or "input_grad"
    (dx = dy @ W ..., whose W is read transposed), its options, and its shape: M tokens (by power-of-two bucket), N
    outputs, K the reduction. A named tuple: two are made per training step of every layer, and a frozen dataclass
    costs several times as much to make."""

    dtype: torch.dtype
    rank_block: int
    gemm_pass: str
    bias: bool
    dropout: bool
    M: int
    N: int
    K: int

    @property
    def variant(self) -> str:
        options = ("+bias" if self.bias else "") + ("+dropout" if self.dropout else "")
        return f"{DTYPE_NAMES[self.dtype]}/r{self.rank_block}/{self.gemm_pass}{options}"

    @property
    def m_bucket(self) -> int:
        return next_power_of_2(max(self.M, 1))

    @property
    def shape_key(self) -> str:
        return f"{self.variant}/M{self.m_bucket}/N{self.N}/K{self.K}"


# {"sm_90": {"measured": {device, torch, triton, commit, date, ...},
#            "default": {"bf16/r16/forward+bias": {"engine": "triton", "tile": "128x128x64 g8 w8 s4"}, ...},
#            "shapes": {"bf16/r16/forward+bias/M8192/N4096/K4096": {"engine": "cublas"}, ...}}}
# A shape entry is used for its launches, a default entry for its variant's other shapes; "tile" is what the Triton
# engine runs there (also when the entry's engine is cuBLAS and RELORA_KERNELS_ENGINE=triton forces it), optional.
TUNED_TABLE = Path(__file__).with_name("tuned_gemm.json")


@functools.cache
def tuned_table() -> dict:
    return json.loads(TUNED_TABLE.read_text()) if TUNED_TABLE.exists() else {}


def table_entry(launch: GemmLaunch) -> dict | None:
    """The table's entry for `launch` on the current GPU: its shape's, else its variant's default, else None."""
    entry = tuned_table().get(f"sm_{current_arch()}")
    if not entry:
        return None
    return entry.get("shapes", {}).get(launch.shape_key) or entry.get("default", {}).get(launch.variant)


# The analytic rule (docs/DESIGN.md section 3): a Triton GEMM at ~80 % of cuBLAS's efficiency loses 0.25 x the
# GEMM's time, while the cuBLAS-composed engine pays one write and one read of the (M, N) output: cuBLAS wins once
# 0.25 * 2MNK / F > 2MN * bytes / BW, i.e. K > 8 F / BW for 16-bit types. fp32 matmuls: cuBLAS's.
CUBLAS_MIN_REDUCTION = 1536


def predicted_engine(launch: GemmLaunch) -> str:
    if launch.dtype == torch.float32 or launch.K >= CUBLAS_MIN_REDUCTION:
        return "cublas"
    return "triton"


def choose_engine(launch: GemmLaunch) -> str:
    """The engine for `launch`: the engine setting if not auto, else the table's entry, else predicted_engine.
    Cached per (launch, settings generation, architecture, table) so that the common call costs one lookup."""
    key = (launch, settings.generation, interpreting() or current_arch(), id(tuned_table()))
    engine = _engine_cache.get(key)
    if engine is None:
        setting = engine_setting()
        if setting != "auto":
            engine = setting
        else:
            entry = table_entry(launch) if not interpreting() else None
            engine = entry["engine"] if entry else predicted_engine(launch)
        remember(_engine_cache, key, engine)
    return engine


_engine_cache: dict[tuple, str] = {}


# ---------------------------------------------------------------------------------------------------------------
# The Triton engine's GEMM tile
# ---------------------------------------------------------------------------------------------------------------


class TileTuner:
    """Times the candidate tiles of a launch key once and keeps the fastest (per process)."""

    def __init__(self):
        self.tiles: dict[tuple, GemmTile] = {}
        self.tunings = 0  # how many keys were timed

    def tile(self, key: tuple, candidates: list[GemmTile], time_tile: Callable[[GemmTile], float] | None,
             timeable: Callable[[], bool] = lambda: True) -> GemmTile:
        """The key's tuned tile; where the launch cannot be timed (`time_tile` None, or `timeable()` false, asked
        only when the key has no tile yet) the first candidate unless the key was tuned before."""
        tile = self.tiles.get(key)
        if tile is not None:
            return tile
        if time_tile is None or not timeable():
            return candidates[0]
        times = [time_tile(tile) for tile in candidates]
        self.tiles[key] = candidates[times.index(min(times))]
        self.tunings += 1
        return self.tiles[key]


TUNER = TileTuner()
_forced_tiles: list[GemmTile] = []


@contextlib.contextmanager
def forced_tile(tile: GemmTile):
    """Every fused-GEMM launch inside takes `tile` (benchmarks.tune times each tile, gpu_build builds each)."""
    _forced_tiles.append(tile)
    try:
        yield
    finally:
        _forced_tiles.pop()


def tile_choice() -> str:
    """How the Triton engine's tile is chosen where the table names none, from the autotune setting: off, "fixed",
    the first fitting tile (the GPU tests: tuning each of their shapes cold would take minutes), else "tune" (tuned
    per key). The table's tile comes first either way."""
    return "tune" if settings.current().autotune else "fixed"


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


TRITON_VERSION = _version(triton.__version__)
# Triton 3.6 fails two kinds of warp-specialised build of the Hopper kernel in its NVGPUWarpSpecialization pass
# ("PassManager::run failed"; sm_90 builds by benchmarks.gpu_build, bf16, r = 16 and 64): the 128x256 tile in every
# variant, and any tile whose epilogue draws the dropout mask (dx with dropout). Triton 3.7, 3.8 and 3.9 build them
# all (the same builds, 2026-12-05); older Tritons are treated as 3.6.
FULL_WARP_SPECIALIZATION_TRITON = (3, 7)


def builds_under_this_triton(tile: GemmTile, launch: GemmLaunch) -> bool:
    """Whether the running Triton compiles `tile` for `launch`'s variant (see FULL_WARP_SPECIALIZATION_TRITON)."""
    if not tile.warp_specialize or TRITON_VERSION >= FULL_WARP_SPECIALIZATION_TRITON:
        return True
    return tile.block_n < 256 and not launch.dropout


def tma_tiles(launch: GemmLaunch) -> list[GemmTile]:
    """The Hopper kernel's candidates that fit and that the running Triton builds, on sm_90 and later for 16-bit
    operands (in fp32 its builds spill and have no wgmma: the pointer-load kernel's)."""
    if current_arch() < 90 or launch.dtype == torch.float32:
        return []
    limit = shared_memory_limit()
    return [tile for tile in TMA_TILES if gemm_shared_bytes(tile, launch.rank_block, launch.dtype.itemsize) <= limit
            and builds_under_this_triton(tile, launch)]


def gemm_tile(launch: GemmLaunch, time_tile: Callable[[GemmTile], float] | None,
              tma_ok: bool | Callable[[], bool] = False, timeable: Callable[[], bool] = lambda: True) -> GemmTile:
    """The Triton engine's tile for `launch` (see the module docstring); `time_tile` times one tile, or is None
    where the launch cannot be timed; `tma_ok` (a bool, or a function asked only where a Hopper tile is at stake):
    the operands can be read through TMA descriptors, so a table's Hopper tile may run; `timeable()` says whether
    this launch can be timed (asked only where a key still needs tuning). A choice that depends on neither the
    operands nor the timing any more is cached per (launch, settings generation, architecture, table, shared
    memory)."""
    if _forced_tiles:
        return _forced_tiles[-1]
    if interpreting():
        return INTERPRETER_TILE
    key = (launch, settings.generation, current_arch(), id(tuned_table()), shared_memory_limit())
    tile = _tile_cache.get(key)
    if tile is not None:
        return tile
    tile, final = _choose_tile(launch, time_tile, tma_ok, timeable)
    if final:
        remember(_tile_cache, key, tile)
    return tile


_tile_cache: dict[tuple, GemmTile] = {}


def settled_tile(launch: GemmLaunch) -> GemmTile | None:
    """The tile gemm_tile gives `launch` for good (cached, asking neither the operands nor a timing), else None: no
    tile is forced, and the choice is not a Hopper tile (which depends on the operands' layout) nor a tuning not yet
    done. What a pass may keep in its plan (passes.py)."""
    if _forced_tiles:
        return None
    if interpreting():
        return INTERPRETER_TILE
    return _tile_cache.get((launch, settings.generation, current_arch(), id(tuned_table()), shared_memory_limit()))


def choices_generation(dtype: torch.dtype) -> tuple:
    """What a launch's plan depends on beyond its own key, for operands of `dtype`: the settings' generation, the
    table read, a forced tile, and the dot's precision (launch.dot_precision: torch's fp32 matmul setting). A plan made
    under other choices is not used (passes.py keys its plans with this), and one call makes the whole tuple."""
    return settings.generation, id(tuned_table()), bool(_forced_tiles), dot_precision(dtype)


def _choose_tile(launch, time_tile, tma_ok, timeable) -> tuple[GemmTile, bool]:
    """(tile, whether the choice is final for the launch's key)."""
    candidates = fitting(gemm_tiles(), gemm_shared_bytes, launch.rank_block, launch.dtype)
    entry = table_entry(launch)
    if entry and entry.get("tile"):  # the Triton engine's tile, also where the entry's engine is cuBLAS
        tile = parse_tile(entry["tile"])
        wrong_here = tile.name in WRONG_TILES.get(current_arch(), ())
        usable = (tile.kernel == "pointer" and not wrong_here) or (
            tile in tma_tiles(launch) and (tma_ok() if callable(tma_ok) else tma_ok))
        if usable and gemm_shared_bytes(tile, launch.rank_block, launch.dtype.itemsize) <= shared_memory_limit():
            return tile, tile.kernel == "pointer"  # a Hopper tile depends on the operands' layout: asked each time
    if tile_choice() == "fixed":  # after the table: the autotune setting off only stops tuning
        return candidates[0], True
    key = (current_arch(), launch.shape_key)
    tile = TUNER.tile(key, candidates[:TUNED_CANDIDATES], time_tile, timeable)
    return tile, key in TUNER.tiles

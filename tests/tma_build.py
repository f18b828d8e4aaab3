"""Build the TMA fused GEMM (kernels/fused_gemm_tma.py) for sm_90 on a machine without a GPU, and report each build.

    python tests/tma_build.py [--dtype bf16] [--rank 16] [--json FILE] [--tiles 0 1 ...] [--no-ws-variants]

Uses benchmarks/gpu_build.py's stand-in driver (Triton compiles for the named GPU; nothing runs) and its readers of
the cubin. For every candidate tile, with and without warp specialisation, the forward launch (rhs_t = W, bias) and
the input-gradient launch (rhs_t = W.T, column-major, dropout): whether the big operands are TMA copies
(`cp.async.bulk.tensor` in the PTX), whether the GEMM is wgmma, registers, stack frame (spills), the shared memory
Triton allocates against the estimate, and the blocks per SM the registers and shared memory allow against what the
launcher assumes for its persistent grid (a tile whose estimate exceeds the limit at this r is left out, as
fitting_tma_tiles leaves it out). Exit status 1 when a build fails, lacks TMA or wgmma, allocates more
shared memory than its estimate, or holds fewer blocks per SM than the launcher assumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime import driver  # noqa: E402

from benchmarks import gpu_build  # noqa: E402  (sets TRITON_INTERPRET=0 before triton is imported)
from relora_kernels.kernels import fused_gemm_tma, lora_linear  # noqa: E402

ARCH = 90


def build(dtype: torch.dtype, rank: int, tile_indices, warp_specialize_variants, split=None) -> list[dict]:
    driver.set_active(gpu_build._StandInDriver(ARCH))
    rows: list[dict] = []
    current: dict = {}

    def record(kernel, kwargs, compiled, seconds, path):
        meta, ptx = compiled.metadata, compiled.asm["ptx"]
        resources = gpu_build._resources(compiled)
        tile = current["tile"]
        rank_block = kwargs["BLOCK_R"]
        rows.append({
            "variant": current["variant"], "tile": fused_gemm_tma.tile_name(tile),
            "warp_specialize": kwargs["WARP_SPECIALIZE"],
            "tma": "cp.async.bulk.tensor" in ptx, "wgmma": "wgmma.mma_async" in ptx, "setmaxnreg": "setmaxnreg" in ptx,
            "num_warps": meta.num_warps, "shared_bytes": meta.shared,
            "shared_estimate": fused_gemm_tma.tma_shared_bytes(tile, rank_block, dtype.itemsize),
            "global_scratch": meta.global_scratch_size,
            **resources,
            "blocks_per_sm": gpu_build.blocks_per_sm(ARCH, meta.num_warps, resources["registers"], meta.shared),
            "assumed_blocks_per_sm": fused_gemm_tma.blocks_per_sm(tile, rank_block, dtype.itemsize),
            "int32_offsets": gpu_build.int32_pointer_offsets(compiled.asm["ttir"]),
            "compile_s": round(seconds, 1),
        })

    tokens, k, n = gpu_build.SHAPES["small"]
    x, weight = torch.empty(tokens, k, dtype=dtype), torch.empty(n, k, dtype=dtype)
    lora_a, lora_b = torch.empty(rank, k, dtype=dtype), torch.empty(n, rank, dtype=dtype)
    bias, grad_y = torch.empty(n, dtype=dtype), torch.empty(tokens, n, dtype=dtype)
    shrunk, seed = torch.empty(tokens, rank, dtype=dtype), torch.tensor(1234)
    launches = {
        "forward +bias": lambda tile: fused_gemm_tma.fused_matmul_tma(x, weight, shrunk, lora_b, 2.0, bias, 0.0, None,
                                                                      tile=tile),
        "input_grad +dropout": lambda tile: fused_gemm_tma.fused_matmul_tma(grad_y, weight.T, shrunk, lora_a.T,
                                                                            1 / 0.9, None, 0.1, seed, tile=tile),
    }
    with mock.patch.object(fused_gemm_tma, "traceable", lambda kernel: gpu_build._BuildOnly(kernel, record)):
        for index in tile_indices:
            for warp_specialize in warp_specialize_variants:
                tile = fused_gemm_tma.TMA_TILES[index]
                if warp_specialize is None:
                    warp_specialize = tile.kwargs["WARP_SPECIALIZE"]
                kwargs = {**tile.kwargs, "WARP_SPECIALIZE": warp_specialize}
                if split is not None:
                    kwargs["EPILOGUE_SPLIT"] = split
                tile = triton.Config(kwargs, num_warps=tile.num_warps, num_stages=tile.num_stages)
                estimate = fused_gemm_tma.tma_shared_bytes(tile, lora_linear._block_rank(rank), dtype.itemsize)
                if estimate > lora_linear._shared_memory_limit():  # fitting_tma_tiles leaves it out at this r
                    print(f"{fused_gemm_tma.tile_name(tile)}: not a candidate at r = {rank} ({estimate} B estimated)",
                          file=sys.stderr)
                    continue
                for variant, launch in launches.items():
                    current.update(tile=tile, variant=variant)
                    start = len(rows)
                    try:
                        launch(tile)
                    except Exception as error:  # a build that fails is a finding, reported with the others
                        rows.append({"variant": variant, "tile": fused_gemm_tma.tile_name(tile),
                                     "warp_specialize": warp_specialize, "error": f"{type(error).__name__}: "
                                     + str(error).strip().splitlines()[-1][:300]})
                    assert len(rows) == start + 1
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def problems(rows: list[dict]) -> list[str]:
    found = []
    for row in rows:
        name = f"{row['variant']} {row['tile']} ws={row['warp_specialize']}"
        if "error" in row:
            found.append(f"{name}: build failed: {row['error']}")
            continue
        for check in ("tma", "wgmma"):
            if not row[check]:
                found.append(f"{name}: no {check}")
        if row["shared_bytes"] > row["shared_estimate"]:
            found.append(f"{name}: {row['shared_bytes']} B shared > estimate {row['shared_estimate']} B")
        if row["blocks_per_sm"] < row["assumed_blocks_per_sm"]:
            found.append(f"{name}: {row['blocks_per_sm']} blocks per SM < the {row['assumed_blocks_per_sm']} the "
                         "persistent grid assumes")
        found += [f"{name}: {offset}" for offset in row["int32_offsets"]]
    return found


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | tile | ws | TMA | wgmma | setmaxnreg | warps | regs | stack B | shared KiB / estimate "
             "| blocks/SM (assumed) | scratch B |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | {row['tile']} | {row['warp_specialize']} | build failed: "
                         f"{row['error']} |||||||||")
            continue
        yes = {True: "yes", False: "no"}
        lines.append(
            f"| {row['variant']} | {row['tile']} | {yes[row['warp_specialize']]} | {yes[row['tma']]} "
            f"| {yes[row['wgmma']]} | {yes[row['setmaxnreg']]} | {row['num_warps']} | {row['registers']} "
            f"| {row['stack_bytes']} | {row['shared_bytes'] / 1024:.1f} / {row['shared_estimate'] / 1024:.1f} "
            f"| {row['blocks_per_sm']} ({row['assumed_blocks_per_sm']}) | {row['global_scratch']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16", choices=list(gpu_build.DTYPES))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tiles", type=int, nargs="+", default=list(range(len(fused_gemm_tma.TMA_TILES))),
                        help="indices into TMA_TILES")
    parser.add_argument("--ws", nargs="+", default=["as-tile"], choices=["as-tile", "on", "off"],
                        help="warp specialisation: as each tile asks, and/or forced on or off")
    parser.add_argument("--split", type=int, choices=[1, 2, 4], help="override every tile's EPILOGUE_SPLIT")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    variants = [{"as-tile": None, "on": True, "off": False}[ws] for ws in args.ws]
    rows = build(gpu_build.DTYPES[args.dtype], args.rank, args.tiles, variants, args.split)
    print(f"{len(rows)} builds in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    failures = problems(rows)
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

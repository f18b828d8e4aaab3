"""Measure the fused GEMM's tiles on this GPU and write the per-architecture table the launcher reads.

    python -m benchmarks.tune --out "$OUT"              # GPU: tuned_gemm.json + tune.md into $OUT
    python -m benchmarks.tune --dtypes bf16 fp16 --ranks 16 64 128 --tokens 8192 --budget-s 400
    python -m benchmarks.tune --smoke --out /tmp/t      # CPU: the plumbing on one tiny shape, nothing timed

Launches: the fused GEMM as the op makes it, for every layer shape of cases.LAYERS at --tokens tokens, per dtype
and rank: `forward` (y = x @ W.T + s * S @ B.T, with and without bias) and `input_grad` (dx = dy @ W + ..., W read
transposed, with and without dropout). Every tile that fits the GPU's shared memory is timed with
triton.testing.do_bench (CUDA events, L2 flushed, median). A launch's fastest tile is its shape's entry; each
(dtype, rank, variant) gets as default the tile with the smallest mean slowdown over its shapes (time / that shape's
best): what untuned shapes run. The table written is the package's (relora_kernels/kernels/tuned_gemm.json) with
this GPU's architecture replaced, plus where it was measured; copy it there to use it. tune.md lists per launch the
best tile, its time and how much faster it is than the first fitting tile (what RELORA_KERNELS_AUTOTUNE=0 runs).
--smoke runs each candidate once through the interpreter and times nothing: its table (key "smoke") is not a
measurement and is never an architecture's entry.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from relora_kernels.kernels import lora_linear as kernels

from . import cases, harness

WARMUP_MS, REP_MS = 10, 40  # per tile: many tiles x launches, each a steady GEMM of ~0.1-2 ms
KINDS = {"forward": ("forward+bias", "forward"), "input_grad": ("input_grad+dropout", "input_grad")}


def plan(dtypes, ranks, tokens: int, smoke: bool) -> list[dict]:
    """The launches to tune, one per distinct (dtype, r, variant, N_out, K_in): layers of one size are tuned once."""
    layers = {"tiny": (cases.SMOKE.K, cases.SMOKE.N)} if smoke else cases.LAYERS
    if smoke:
        dtypes, ranks, tokens = ["fp32"], [cases.SMOKE.r], cases.SMOKE.M
    launches = {}
    for K, N in layers.values():
        for dtype in dtypes:
            for r in ranks:
                for kind, variants in KINDS.items():
                    n_out, k_in = (N, K) if kind == "forward" else (K, N)
                    for variant in variants:
                        launches[(dtype, r, variant, n_out, k_in)] = {
                            "dtype": dtype, "r": r, "kind": kind, "variant": variant, "M": tokens, "N_out": n_out,
                            "K_in": k_in}
    return list(launches.values())


def keys(launch: dict) -> tuple[str, str]:
    """(default key, shape key) of the launch in the table, as the launcher looks them up."""
    return kernels.tuned_keys(cases.DTYPES[launch["dtype"]], kernels._block_rank(launch["r"]), launch["kind"],
                              "+bias" in launch["variant"], "+dropout" in launch["variant"], launch["M"],
                              launch["N_out"], launch["K_in"])


def build(launch: dict, device: torch.device):
    """The launcher call of `launch` on fresh inputs with the op's strides (dy @ W reads W (K_in, N_out) transposed)."""
    torch.manual_seed(0)
    like = {"device": device, "dtype": cases.DTYPES[launch["dtype"]]}
    M, n_out, k_in, r = launch["M"], launch["N_out"], launch["K_in"], launch["r"]
    lhs, low = torch.randn(M, k_in, **like), torch.randn(M, r, **like) * 0.1
    if launch["kind"] == "input_grad":
        weight, lora_a = torch.randn(k_in, n_out, **like) / k_in**0.5, torch.randn(r, n_out, **like) * 0.1
        p = 0.1 if "+dropout" in launch["variant"] else 0.0
        seed = torch.tensor(1, device=device) if p else None
        return lambda: kernels.lora_input_grad(lhs, weight, low, lora_a, p, seed)
    weight, lora_b = torch.randn(n_out, k_in, **like) / k_in**0.5, torch.randn(n_out, r, **like) * 0.1
    bias = torch.randn(n_out, **like) if "+bias" in launch["variant"] else None
    return lambda: kernels.lora_forward_matmul(lhs, weight, low, lora_b, 2.0, bias)


def time_tiles(launch: dict, device: torch.device, smoke: bool) -> dict[str, float | None]:
    """{tile name: median ms} over every tile that fits (smoke: the two smallest tiles, each run once through the
    interpreter, which ignores tiles: None, not timed)."""
    if smoke:
        tiles = kernels._MATMUL_CONFIGS[-2:]
    else:
        tiles = kernels._fitting(kernels._MATMUL_CONFIGS, kernels._matmul_shared_bytes,
                                 kernels._block_rank(launch["r"]), cases.DTYPES[launch["dtype"]])
    fn, times = build(launch, device), {}
    for tile in tiles:
        with _forced(tile):
            if smoke:
                fn()
                times[kernels.tile_name(tile)] = None
                continue
            from triton.testing import do_bench

            fn()  # compile outside the timing
            times[kernels.tile_name(tile)] = do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    return times


@contextlib.contextmanager
def _forced(tile):
    """Within the block, the launcher's fixed path runs `tile` (RELORA_KERNELS_AUTOTUNE=0 over a one-tile list)."""
    with mock.patch.object(kernels, "_MATMUL_CONFIGS", [tile]), \
            mock.patch.dict(os.environ, {"RELORA_KERNELS_AUTOTUNE": "0"}):
        yield


def choose(results: list[dict]) -> tuple[dict[str, str], dict[str, str]]:
    """(defaults, shapes) from timed results [{launch, times}]: each shape's fastest tile; per default key, the tile
    with the smallest mean slowdown (time / the shape's best) over the shapes that timed it. Untimed results (smoke)
    give their first tile."""
    shapes, slowdowns = {}, {}
    for result in results:
        default, shape = keys(result["launch"])
        timed = {tile: ms for tile, ms in result["times"].items() if ms is not None}
        if not timed:
            shapes[shape] = next(iter(result["times"]))
            slowdowns.setdefault(default, {}).setdefault(shapes[shape], []).append(1.0)
            continue
        best = min(timed.values())
        shapes[shape] = min(timed, key=timed.get)
        for tile, ms in timed.items():
            slowdowns.setdefault(default, {}).setdefault(tile, []).append(ms / best)
    defaults = {}
    for default, per_tile in slowdowns.items():
        shapes_seen = max(len(v) for v in per_tile.values())
        complete = {tile: v for tile, v in per_tile.items() if len(v) == shapes_seen}  # timed on every shape
        defaults[default] = min(complete, key=lambda tile: sum(complete[tile]) / shapes_seen)
    return defaults, shapes


def markdown(results: list[dict], environment: dict, smoke: bool) -> str:
    lines = ["# Fused GEMM tiles measured per launch" + (" (smoke: nothing timed)" if smoke else ""), "",
             *(f"- {key}: {value}" for key, value in environment.items()), "",
             "| launch | M x N_out x K_in | tiles | best tile | best ms | TFLOP/s | first fitting tile ms "
             "| best vs it |",
             "|---|---|---|---|---|---|---|---|"]
    for result in results:
        launch, times = result["launch"], result["times"]
        timed = {tile: ms for tile, ms in times.items() if ms is not None}
        best = min(timed, key=timed.get) if timed else None
        first = next(iter(times))
        flops = 2 * launch["M"] * launch["N_out"] * (launch["K_in"] + launch["r"])
        row = [f"{launch['dtype']} r={launch['r']} {launch['variant']}",
               f"{launch['M']} x {launch['N_out']} x {launch['K_in']}", len(times), best or "—"]
        if best:
            row += [f"{timed[best]:.4g}", f"{flops / (timed[best] * 1e-3) / 1e12:.0f}", f"{timed[first]:.4g}",
                    f"{timed[first] / timed[best]:.3f}x"]
        else:
            row += ["—"] * 4
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for tuned_gemm.json and tune.md")
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--tokens", type=int, default=cases.HEADLINE.M, help="M of every launch (default %(default)s)")
    parser.add_argument("--budget-s", type=float, help="start no new launch after this many seconds")
    parser.add_argument("--smoke", action="store_true", help="CPU: one tiny shape through the interpreter, untimed")
    args = parser.parse_args(argv)
    bad = [r for r in args.ranks if not 1 <= r <= kernels.MAX_RANK]
    if bad or args.tokens < 1:
        parser.error(f"--ranks must be in 1..{kernels.MAX_RANK} (got {bad}) and --tokens >= 1 (got {args.tokens})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device: tiles are chosen by timing on a GPU; use --smoke for the CPU plumbing run")

    launches = plan(args.dtypes, args.ranks, args.tokens, args.smoke)
    environment = {**{k: v for k, v in harness.environment(device, args.smoke).items() if k != "memory"},
                   "command": "python -m benchmarks.tune " + " ".join(argv if argv is not None else sys.argv[1:])}
    start, results = time.perf_counter(), []
    progress = harness.Progress(len(launches), "tune", "launch")
    for launch in launches:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            progress.note(f"time budget spent: {len(launches) - len(results)} launches not tuned")
            break
        results.append({"launch": launch, "times": time_tiles(launch, device, args.smoke)})
        progress.completed(f"{keys(launch)[1]}: {len(results[-1]['times'])} tiles")
    progress.close()

    defaults, shapes = choose(results)
    table = json.loads(kernels.TUNED_TABLE.read_text()) if kernels.TUNED_TABLE.exists() else {}
    arch = "smoke" if args.smoke else f"sm_{kernels._current_arch()}"
    table[arch] = {"measured": {k: environment[k] for k in ("device", "torch", "triton", "cuda", "commit", "date")}
                   | {"tokens": launches[0]["M"], "launches_tuned": len(results), "launches_planned": len(launches)},
                   "default": defaults, "shapes": shapes}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tuned_gemm.json").write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    (args.out / "tune.md").write_text(markdown(results, environment, args.smoke))
    print(f"{arch}: {len(results)} of {len(launches)} launches tuned in {time.perf_counter() - start:.0f} s; "
          f"{len(defaults)} defaults; wrote {args.out / 'tuned_gemm.json'} and tune.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure both engines of each frozen-GEMM pass and the Triton engine's tiles on this GPU; write the table of
engines and tiles the package reads.

    python -m benchmarks.tune --out DIR                 # GPU: tuned_gemm.json + tune.md into DIR
    python -m benchmarks.tune --dtypes bf16 fp16 --ranks 16 64 128 --tokens 8192 --budget-s 400
    TRITON_INTERPRET=1 python -m benchmarks.tune --smoke --out /tmp/t   # CPU: the plumbing on one tiny shape

Passes: for every layer shape of cases.LAYERS at --tokens tokens, per dtype and rank, the `forward` pass (y = x @ W.T
+ s * S @ B.T, with and without bias) and the `input_grad` pass (the backward with dx = dy @ W + ..., with and without
dropout), each run whole as the op runs it: on the cuBLAS-composed engine, and on the Triton engine with every tile
that fits the GPU's shared memory (the pointer-load tiles, and on sm_90 the Hopper kernel's, policy.tma_tiles, where
the pass's big operands pass fused_gemm_tma.tma_eligible), timed with triton.testing.do_bench (CUDA events, L2
flushed, median). A pass's fastest choice is its shape's entry (its engine, and the Triton engine's fastest tile for
when that engine is forced); each (dtype, rank, variant) gets as default the choice with the smallest mean slowdown
over its shapes (time / that shape's best): what untuned shapes run. The table written is the package's
(relora_kernels/kernels/tuned_gemm.json) with this GPU's architecture replaced, plus where it was measured; copy it
there to use it. tune.md lists per pass the best choice, its time, and how it compares with the cuBLAS-composed
engine and the first fitting tile (what RELORA_KERNELS_AUTOTUNE=0 runs). --smoke runs each choice once through the
interpreter (the two smallest pointer tiles and policy.INTERPRETER_TMA_TILE) and times nothing: its table (key
"smoke") is not a measurement and is never an architecture's entry.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from relora_kernels._validate import MAX_RANK
from relora_kernels.kernels import passes, policy
from relora_kernels.kernels.fused_gemm_tma import tma_eligible

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


CUBLAS = "cublas"  # the choice that is the cuBLAS-composed engine; every other choice is a Triton tile's name


def gemm_launch(launch: dict) -> policy.GemmLaunch:
    """The pass as the package's table keys it: the forward's GEMM is (M, N_out, K_in), dx's (M, K_in, N_out)."""
    n, k = (launch["N_out"], launch["K_in"]) if launch["kind"] == "forward" else (launch["K_in"], launch["N_out"])
    return policy.GemmLaunch(cases.DTYPES[launch["dtype"]], policy.block_rank(launch["r"]), launch["kind"],
                             "+bias" in launch["variant"], "+dropout" in launch["variant"], launch["M"], n, k)


def keys(launch: dict) -> tuple[str, str]:
    """(default key, shape key) of the pass in the table, as the package looks them up."""
    gemm = gemm_launch(launch)
    return gemm.variant, gemm.shape_key


def build(launch: dict, device: torch.device, with_operands: bool = False):
    """The pass of `launch` on fresh inputs, as the op runs it (the forward, or the backward that computes dx); with
    `with_operands` also (lhs, rhs_t), the fused GEMM's big operands (x and W; dy and W.T), for tma_eligible."""
    torch.manual_seed(0)
    like = {"device": device, "dtype": cases.DTYPES[launch["dtype"]]}
    M, n_out, k_in, r = launch["M"], launch["N_out"], launch["K_in"], launch["r"]
    x, weight = torch.randn(M, k_in, **like), torch.randn(n_out, k_in, **like) / k_in**0.5
    lora_a, lora_b = torch.randn(r, k_in, **like) * 0.1, torch.randn(n_out, r, **like) * 0.1
    if launch["kind"] == "input_grad":
        grad_y, shrunk = torch.randn(M, n_out, **like), torch.randn(M, r, **like) * 0.1
        p = 0.1 if "+dropout" in launch["variant"] else 0.0
        seed = torch.tensor(1, device=device) if p else None

        def fn():
            return passes.lora_backward(grad_y, x, weight, lora_a, lora_b, shrunk, 2.0, p, seed, True, False)

        operands = (grad_y, weight.T)  # dx = dy @ W: rhs_t = W.T, read through its transpose
    else:
        bias = torch.randn(n_out, **like) if "+bias" in launch["variant"] else None

        def fn():
            return passes.lora_forward(x, weight, lora_a, lora_b, 2.0, bias, 0.0, None)

        operands = (x, weight)
    return (fn, operands) if with_operands else fn


@contextlib.contextmanager
def _choice(choice: str):
    """Within the block the pass runs on `choice`: the cuBLAS-composed engine, or the Triton engine with that tile."""
    if choice == CUBLAS:
        with cases.provider_env("fused_cublas"):
            yield
        return
    tile = policy.parse_tile(choice)
    with cases.provider_env("fused_triton"), policy.forced_tile(tile):
        yield


def tiles_to_time(launch: dict, operands: tuple, smoke: bool) -> list[policy.GemmTile]:
    """The Triton engine's tiles timed for `launch`: every pointer-load tile that fits, then the Hopper kernel's that
    fit (policy.tma_tiles: sm_90, 16 bits) where the pass's big operands (lhs, rhs_t) are TMA-eligible. Smoke: the
    two smallest pointer tiles and the interpreter's Hopper tile (where eligible), each run once, nothing timed."""
    hopper_ok = tma_eligible(*operands)
    if smoke:
        return policy.GEMM_TILES[-2:] + ([policy.INTERPRETER_TMA_TILE] if hopper_ok else [])
    pointer = policy.fitting(policy.gemm_tiles(), policy.gemm_shared_bytes, policy.block_rank(launch["r"]),
                             cases.DTYPES[launch["dtype"]])
    return pointer + (policy.tma_tiles(gemm_launch(launch)) if hopper_ok else [])


def time_choices(launch: dict, device: torch.device, smoke: bool) -> tuple[dict[str, float | None], dict[str, str]]:
    """({choice: median ms}, {choice: error}): the cuBLAS-composed engine, then every Triton tile of tiles_to_time,
    each run once through the interpreter under --smoke, which times nothing (None). A choice that fails (a tile
    that does not compile) is left out of the times with its error, and the others go on."""
    fn, operands = build(launch, device, with_operands=True)
    tiles, times, errors = tiles_to_time(launch, operands, smoke), {}, {}
    for choice in [CUBLAS] + [tile.name for tile in tiles]:
        try:
            with _choice(choice):
                fn()  # compile outside the timing
                if smoke:
                    times[choice] = None
                    continue
                from triton.testing import do_bench

                times[choice] = do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
        except Exception as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            errors[choice] = f"{type(error).__name__}: {lines[-1] if lines else ''}"[:400]
    return times, errors


def _best(times: dict[str, float | None], among) -> str | None:
    timed = {choice: ms for choice, ms in times.items() if ms is not None and choice in among}
    return min(timed, key=timed.get) if timed else next((c for c in times if c in among), None)


def _entry(best_choice: str, best_tile: str | None) -> dict:
    """A table entry; without a tile (every tile of the pass failed) the Triton engine keeps its own choice."""
    return {"engine": "cublas" if best_choice == CUBLAS else "triton", **({"tile": best_tile} if best_tile else {})}


def choose(results: list[dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(defaults, shapes) from timed results [{launch, times}]: each shape's fastest choice (and fastest tile); per
    default key, the choice (and the tile) with the smallest mean slowdown (time / the shape's best) over the shapes
    that timed it. Untimed results (smoke) give the cuBLAS engine and their first tile."""
    shapes, slowdowns = {}, {}
    for result in results:
        default, shape = keys(result["launch"])
        times = result["times"]
        if not times:  # every choice failed: nothing to choose from
            continue
        tiles = [choice for choice in times if choice != CUBLAS]
        shapes[shape] = _entry(_best(times, times), _best(times, tiles))
        timed = {choice: ms for choice, ms in times.items() if ms is not None}
        best = min(timed.values()) if timed else None
        for choice in times:
            slowdown = 1.0 if best is None else (timed[choice] / best if choice in timed else None)
            if slowdown is not None:
                slowdowns.setdefault(default, {}).setdefault(choice, []).append(slowdown)
    defaults = {}
    for default, per_choice in slowdowns.items():
        shapes_seen = max(len(v) for v in per_choice.values())
        mean = {choice: sum(v) / shapes_seen for choice, v in per_choice.items() if len(v) == shapes_seen}
        best_tile = min((c for c in mean if c != CUBLAS), key=mean.get, default=None)
        best_choice = min(mean, key=mean.get)
        defaults[default] = _entry(best_choice, best_tile) if best_tile else {"engine": "cublas"}
    return defaults, shapes


def _ms(timed: dict[str, float], choice: str | None) -> str:
    return f"{timed[choice]:.4g}" if choice in timed else "—"


def markdown(results: list[dict], environment: dict, smoke: bool) -> str:
    lines = ["# Both engines and the Triton tiles measured per pass" + (" (smoke: nothing timed)" if smoke else ""),
             "", *(f"- {key}: {value}" for key, value in environment.items()), "",
             "| pass | M x N_out x K_in | choices | best | best ms | TFLOP/s | cuBLAS-composed ms "
             "| first fitting tile ms | best vs cuBLAS-composed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        launch, times = result["launch"], result["times"]
        timed = {choice: ms for choice, ms in times.items() if ms is not None}
        best = min(timed, key=timed.get) if timed else None
        first = next((choice for choice in times if choice != CUBLAS), None)
        flops = 2 * launch["M"] * launch["N_out"] * (launch["K_in"] + launch["r"])
        row = [f"{launch['dtype']} r={launch['r']} {launch['variant']}",
               f"{launch['M']} x {launch['N_out']} x {launch['K_in']}", len(times), best or "—"]
        if best:
            row += [f"{timed[best]:.4g}", f"{flops / (timed[best] * 1e-3) / 1e12:.0f}", _ms(timed, CUBLAS),
                    _ms(timed, first),
                    f"{timed[CUBLAS] / timed[best]:.3f}x" if CUBLAS in timed else "—"]
        else:
            row += ["—"] * 5
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    failed = [(result["launch"], choice, error) for result in results
              for choice, error in result.get("errors", {}).items()]
    if failed:
        lines += ["", f"## Failed choices ({len(failed)}): not timed, not in the table", "",
                  "| pass | M x N_out x K_in | choice | error |", "|---|---|---|---|"]
        lines += [f"| {launch['dtype']} r={launch['r']} {launch['variant']} | {launch['M']} x {launch['N_out']} x "
                  f"{launch['K_in']} | {choice} | {error.replace('|', '/')} |" for launch, choice, error in failed]
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
    bad = [r for r in args.ranks if not 1 <= r <= MAX_RANK]
    if bad or args.tokens < 1:
        parser.error(f"--ranks must be in 1..{MAX_RANK} (got {bad}) and --tokens >= 1 (got {args.tokens})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device: tiles are chosen by timing on a GPU; use --smoke for the CPU plumbing run")
    harness.require_interpreter_without_gpu(parser)

    launches = plan(args.dtypes, args.ranks, args.tokens, args.smoke)
    environment = {**{k: v for k, v in harness.environment(device, args.smoke).items() if k != "memory"},
                   "command": "python -m benchmarks.tune " + " ".join(argv if argv is not None else sys.argv[1:])}
    start, results = time.perf_counter(), []
    progress = harness.Progress(len(launches), "tune", "launch")
    for launch in launches:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            progress.note(f"time budget spent: {len(launches) - len(results)} launches not tuned")
            break
        times, errors = time_choices(launch, device, args.smoke)
        results.append({"launch": launch, "times": times, "errors": errors})
        progress.completed(f"{keys(launch)[1]}: {len(times)} choices" + (f", {len(errors)} failed" if errors else ""))
    progress.close()

    defaults, shapes = choose(results)
    table = json.loads(policy.TUNED_TABLE.read_text()) if policy.TUNED_TABLE.exists() else {}
    arch = "smoke" if args.smoke else f"sm_{policy.current_arch()}"
    table[arch] = {"measured": {k: environment[k] for k in ("device", "torch", "triton", "cuda", "commit", "date")}
                   | {"tokens": launches[0]["M"], "launches_tuned": len(results), "launches_planned": len(launches)},
                   "default": defaults, "shapes": shapes}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tuned_gemm.json").write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    (args.out / "tune.md").write_text(markdown(results, environment, args.smoke))
    failed = sum(len(result["errors"]) for result in results)
    print(f"{arch}: {len(results)} of {len(launches)} launches tuned in {time.perf_counter() - start:.0f} s; "
          f"{len(defaults)} defaults; {failed} failed choices; wrote {args.out / 'tuned_gemm.json'} and tune.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""A result file (sweep.py's JSON) -> markdown tables, PNG plots, the README headline and the goal checks.

    python -m benchmarks.report benchmarks/results/h100.json             # h100.md, h100_speedup.png,
                                                                         # h100_vs_floor.png; prints the goals
    python -m benchmarks.report benchmarks/results/h100.json --headline  # print the README headline snippet

A smoke file (CPU interpreter, "smoke": true) gets a markdown listing of what ran, but no plots and no headline:
it holds no timings, and interpreter timings would not be performance numbers anyway.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from . import time_model
from .cases import (
    CUBLAS_LAUNCHES,
    FP8_CUBLAS_GEMMS,
    FP8_GEMM_MODES,
    FP8_PROVIDERS,
    FP8_TRITON_LAUNCHES,
    HEADLINE,
    LAUNCH_PROVIDERS,
    LORA_PROVIDERS,
    TRITON_LAUNCHES,
)

# The performance goals for the automatic choice (`fused`); each engine's provider is checked against the same two.
SPEEDUP_GOAL = 1.40  # fused fwd+bwd vs eager at the headline case (p = 0.1)
FLOOR_GOAL = 1.10  # fused fwd+bwd time / floor time at the headline case
# The fused op's providers side by side: each engine, then the automatic choice, with time / floor and vs eager.
ENGINE_PROVIDERS = ("fused_triton", "fused_cublas", "fused")
# fused merge+reinit GB/s / device-to-device copy GB/s at the headline layer: its two launches' fixed costs cap it
# at 72-80 % with no host cost at all (time_model.merge_copy_fraction), so the goal sits inside that range.
COPY_GOAL = 0.75
# The FP8 frozen weight's goals for the automatic choice (`fused_fp8`; each FP8 engine's provider is checked against the
# same two): fwd+bwd vs eager bf16 and vs this package's bf16 op (`fused`) at the headline case (p = 0.1), and never
# slower than the bf16 op at any case where both ran.
FP8_SPEEDUP_GOAL = 2.00
FP8_OWN_GOAL = 1.40
# Each FP8 provider's engine in time_model (fused_fp8: the engine the row records, where both passes ran on one).
_FP8_MODEL_ENGINE = {"fused_fp8_triton": "fp8_triton", "fused_fp8_cublas": "fp8_cublas"}
REQUIRED = ("device", "torch", "triton", "commit", "date", "copy_gbps", "rows")
COMMAND = "bash benchmarks/run_gpu.sh"


class SmokeResults(ValueError):
    """The file is a smoke run: no timings to report."""


def load(path: Path) -> dict:
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    missing = [key for key in REQUIRED if key not in results] if isinstance(results, dict) else list(REQUIRED)
    if missing:
        raise ValueError(f"{path} is not a sweep result file: missing {', '.join(missing)}")
    return results


def conditions(results: dict) -> str:
    return (f"{results['device']}, torch {results['torch']}, triton {results['triton']}, "
            f"commit {results['commit'][:12]}, {results['date']}")


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value).replace("|", "/")


def _row_case(row: dict) -> str:
    shape = " ".join(f"{k}={row[k]}" for k in ("mode", "M", "K", "N", "r", "p", "dtype") if row.get(k) is not None)
    return f"{row.get('layer') or row.get('model')} {shape}"


def _ms(row: dict | None) -> float | None:
    return row["median_ms"] if row and row.get("status") == "ok" else None


def _cell(row: dict | None):
    """A table cell for one provider's row: its median ms, else what happened (a smoke row that ran: 'ran')."""
    if row is None:
        return None
    if row.get("status") != "ok":
        return row["status"]
    return "ran" if row["median_ms"] is None else row["median_ms"]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator


# ----------------------------------------------------------------------------------------------------------------
# Grouping rows by case.
# ----------------------------------------------------------------------------------------------------------------

_LORA_KEY = ("layer", "mode", "M", "K", "N", "r", "p", "dtype")


def lora_groups(results: dict) -> dict[tuple, dict[str, dict]]:
    """{(layer, mode, M, K, N, r, p, dtype): {provider: row}} for op lora_linear, in file order."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in results["rows"]:
        if row["op"] == "lora_linear":
            groups.setdefault(tuple(row[k] for k in _LORA_KEY), {})[row["provider"]] = row
    return groups


def _is_headline(key: tuple, mode: str = "fwd+bwd") -> bool:
    layer, case_mode, M, K, N, r, p, dtype = key
    return (case_mode, M, K, N, r, p, dtype) == (mode, HEADLINE.M, HEADLINE.K, HEADLINE.N, HEADLINE.r, HEADLINE.p,
                                                  HEADLINE.dtype)


def _case_name(key: tuple) -> str:
    layer, mode, M, K, N, r, p, dtype = key
    return f"{layer} {mode} {M}x{K}x{N} r={r} p={p:g} {dtype}"


# ----------------------------------------------------------------------------------------------------------------
# Goals.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Goal:
    name: str
    met: bool | None  # None: not measured in this file
    detail: str

    def line(self) -> str:
        verdict = {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[self.met]
        return f"{verdict:12s} {self.name}: {self.detail}"


def goals(results: dict) -> list[Goal]:
    groups = lora_groups(results)
    headline = next((providers for key, providers in groups.items() if _is_headline(key)), {})
    eager, floor = (_ms(headline.get(p)) for p in ("eager", "floor"))
    case = f"fwd+bwd {HEADLINE.M}x{HEADLINE.K}x{HEADLINE.N} r={HEADLINE.r} p={HEADLINE.p:g} {HEADLINE.dtype}"
    found = []
    for provider in ENGINE_PROVIDERS[::-1]:  # the automatic choice's goals first, then each engine's
        fused = _ms(headline.get(provider))
        speedup, of_floor = _ratio(eager, fused), _ratio(fused, floor)
        found.append(Goal(f"{provider} >= {SPEEDUP_GOAL:.2f}x eager ({case})",
                          None if speedup is None else speedup >= SPEEDUP_GOAL,
                          "not measured" if speedup is None else
                          f"{speedup:.2f}x (eager {eager:.3f}, {provider} {fused:.3f} ms)"))
        found.append(Goal(f"{provider} <= {FLOOR_GOAL:.2f}x floor ({case})",
                          None if of_floor is None else of_floor <= FLOOR_GOAL,
                          "not measured" if of_floor is None else f"{of_floor:.2f}x (floor {floor:.3f} ms)"))

    # fused never slower than eager, and ahead of compile and native, wherever both ran; a fused failure where a
    # rival ran counts against it.
    for rivals, name in ((("eager",), "fused never slower than eager at any shape"),
                         (("compile", "native"), "fused ahead of compile and native at every shape")):
        compared, behind = 0, []
        for key, providers in groups.items():
            for rival in rivals:
                rival_ms, fused_ms = _ms(providers.get(rival)), _ms(providers.get("fused"))
                if rival_ms is None:
                    continue
                compared += 1
                if fused_ms is None or fused_ms > rival_ms or (rival != "eager" and fused_ms == rival_ms):
                    behind.append(f"{_case_name(key)} vs {rival} ({_fmt(fused_ms)} vs {rival_ms:.3g} ms)")
        found.append(Goal(name, None if not compared else not behind,
                          "not measured" if not compared else f"{compared - len(behind)}/{compared} comparisons won"
                          + ("; behind at " + "; ".join(behind) if behind else "")))

    found += _fp8_goals(groups, headline, eager, case)

    copy = results["copy_gbps"]
    merges = {(r["K"], r["N"], r["r"], r["dtype"]): r for r in results["rows"]
              if r["op"] == "merge_and_reinit" and r["provider"] == "fused" and r.get("status") == "ok"}
    square = merges.get((HEADLINE.K, HEADLINE.N, HEADLINE.r, HEADLINE.dtype))
    fraction = _ratio(square["gbps"] if square else None, copy)
    lowest = min(merges.values(), key=lambda r: r["gbps"], default=None) if copy else None
    found.append(Goal(f"merge+reinit >= {COPY_GOAL:.0%} of copy bandwidth ({HEADLINE.K}x{HEADLINE.N} "
                      f"r={HEADLINE.r} {HEADLINE.dtype})", None if fraction is None else fraction >= COPY_GOAL,
                      "not measured" if fraction is None else
                      f"{fraction:.0%} ({square['gbps']:.0f} of {copy:.0f} GB/s); lowest over all layers "
                      f"{lowest['gbps'] / copy:.0%} at {lowest['K']}x{lowest['N']} r={lowest['r']}"))
    return found


def _fp8_goals(groups: dict, headline: dict, eager: float | None, case: str) -> list[Goal]:
    found = []
    own = _ms(headline.get("fused"))
    for provider in FP8_PROVIDERS[::-1]:  # the automatic choice's goals first, then each engine's
        fp8 = _ms(headline.get(provider))
        for rival, name, rival_ms, goal in (("eager", "eager", eager, FP8_SPEEDUP_GOAL),
                                            ("the bf16 op (fused)", "fused", own, FP8_OWN_GOAL)):
            speedup = _ratio(rival_ms, fp8)
            found.append(Goal(f"{provider} >= {goal:.2f}x {rival} ({case})",
                              None if speedup is None else speedup >= goal,
                              "not measured" if speedup is None else
                              f"{speedup:.2f}x ({name} {rival_ms:.3f}, {provider} {fp8:.3f} ms)"))
    compared, behind = 0, []
    for key, providers in groups.items():
        own_ms, fp8 = _ms(providers.get("fused")), providers.get("fused_fp8")
        if own_ms is None or fp8 is None or fp8.get("status") == "skipped":  # skipped: no FP8 on this machine
            continue
        compared += 1
        fp8_ms = _ms(fp8)
        if fp8_ms is None or fp8_ms > own_ms:  # an FP8 failure where the bf16 op ran counts against it
            behind.append(f"{_case_name(key)} ({_fmt(fp8_ms)} vs {own_ms:.3g} ms)")
    found.append(Goal("fused_fp8 never slower than the bf16 op (fused) at any shape", None if not compared else
                      not behind, "not measured" if not compared else f"{compared - len(behind)}/{compared} "
                      "comparisons won" + ("; behind at " + "; ".join(behind) if behind else "")))
    return found


def fp8_prediction(key: tuple, provider: str, row: dict | None) -> dict | None:
    """time_model's prediction for an FP8 provider's fwd+bwd row (an H200's rates, bf16-sized activations):
    {"ms", "vs_eager", "vs_bf16"} as Bounds; None where the model has none (another mode, fp32 activations, or
    fused_fp8 with its two frozen GEMMs on different engines: the model prices one engine for both)."""
    layer, mode, M, K, N, r, p, dtype = key
    if mode != "fwd+bwd" or dtype not in ("bf16", "fp16"):
        return None
    engine = _FP8_MODEL_ENGINE.get(provider)
    if provider == "fused_fp8" and row and row.get("engine_fwd") and row.get("engine_fwd") == row.get("engine_dx"):
        engine = f"fp8_{row['engine_fwd']}"
    if engine is None:
        return None
    ratios = time_model.fp8_ratios(M, K, N, r, dropout=p > 0)
    return {what: ratios[f"{engine}_{what}"] for what in ("ms", "vs_eager", "vs_bf16")}


def _fp8_section(groups: dict) -> list[str]:
    rows = []
    for key, providers in groups.items():
        eager, own = _ms(providers.get("eager")), _ms(providers.get("fused"))
        for provider in (q for q in FP8_PROVIDERS if q in providers):
            row = providers[provider]
            fp8 = _ms(row)
            predicted = fp8_prediction(key, provider, row)
            engines = f"{row['engine_fwd']}/{row['engine_dx']}" if "engine_fwd" in row else None
            rows.append([*key[:3], f"{key[3]}->{key[4]}", *key[5:], provider, engines, _cell(row),
                         predicted["ms"].span(3) if predicted else None,
                         _ratio(eager, fp8), predicted["vs_eager"].span(2) if predicted else None,
                         _ratio(own, fp8), predicted["vs_bf16"].span(2) if predicted else None])
    if not rows:
        return []
    lines = ["", "## lora_linear with an FP8 frozen weight: measured, beside the time model's prediction", "",
             "rk.lora_linear_fp8: both frozen GEMMs on e4m3 copies of W (made once, outside the timing), x and dy "
             "quantised per token in the op; fused_fp8_triton / fused_fp8_cublas force each engine, fused_fp8 is the "
             "automatic choice (its engine per frozen GEMM in `engines`). `vs eager`: eager bf16's time over its; "
             "`vs bf16 op`: the bf16 op's (`fused`, the automatic choice) over its. Columns marked PREDICTED are "
             "benchmarks/time_model.py's (an H200's rates, optimistic-pessimistic; PERF_NOTES.md, \"FP8 frozen "
             "weights: predicted time\"), not measurements, for fwd+bwd with 2-byte activations and one engine on "
             f"both GEMMs. Goals: fused_fp8 >= {FP8_SPEEDUP_GOAL:.1f}x eager and >= {FP8_OWN_GOAL:.1f}x the bf16 op "
             "at the headline, never slower than the bf16 op.", ""]
    return lines + _table(["layer", "mode", "M", "K->N", "r", "p", "dtype", "provider", "engines (fwd/dx)", "ms",
                           "PREDICTED ms", "vs eager", "PREDICTED vs eager", "vs bf16 op", "PREDICTED vs bf16 op"],
                          rows)


# ----------------------------------------------------------------------------------------------------------------
# Markdown.
# ----------------------------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def markdown(results: dict) -> str:
    smoke = results.get("smoke", False)
    lines = [f"# Benchmark results: {results['device']}", ""]
    if smoke:
        lines += ["**Smoke run (CPU, Triton interpreter): nothing was timed. Not performance numbers.**", ""]
    lines += [f"- torch {results['torch']}, triton {results['triton']}, CUDA {results.get('cuda')}, "
              f"commit `{results['commit']}`, {results['date']}",
              f"- timing: {results.get('timing')}", f"- memory: {results.get('memory')}",
              f"- device-to-device copy bandwidth (bytes read + written): {_fmt(results['copy_gbps'], 4)} GB/s",
              f"- produced by `{COMMAND}` (sweep: `python -m benchmarks.sweep`)"]
    if results.get("resumed"):
        lines += [f"- resumed (same device, versions and commit) on {', '.join(results['resumed'])}"]
    if results.get("not_run"):
        lines += [f"- **incomplete: {results['not_run']} of {results['planned']} planned runs were not run** (a time "
                  "budget or an interruption); `python -m benchmarks.sweep --resume <this json>` runs them"]
    lines += ["", "## Goals", ""]
    lines += [f"- {goal.line()}" for goal in goals(results)]

    groups = lora_groups(results)
    present = [p for p in LORA_PROVIDERS if any(p in providers for providers in groups.values())]
    if groups:
        lines += ["", "## lora_linear: median ms", "",
                  "y = x @ W.T + bias + s * dropout(x) @ A.T @ B.T, K -> N; gradients for x, A, B. "
                  "TFLOP/s counts the GEMM FLOPs of the op (cases.lora_linear_flops). p20/p80 are in the JSON. "
                  "fused_triton and fused_cublas are the two engines (RELORA_KERNELS_ENGINE=triton / cublas), fused "
                  "the automatic choice (auto), whose engine per pass the `fused's engines` column names; "
                  "`/ floor`: time over the floor's, `vs eager`: eager's time over its (the speedup).", ""]
        engines = [q for q in ENGINE_PROVIDERS if q in present]
        table = []
        for key, providers in groups.items():
            layer, mode, M, K, N, r, p, dtype = key
            eager, floor = (_ms(providers.get(q)) for q in ("eager", "floor"))
            ratios = [value for q in engines
                      for value in (_ratio(_ms(providers.get(q)), floor), _ratio(eager, _ms(providers.get(q))))]
            auto = providers.get("fused", {})
            chosen = f"{auto['engine_fwd']}/{auto['engine_dx']}" if "engine_fwd" in auto else None
            tflops = auto.get("tflops")
            table.append([layer, mode, M, f"{K}->{N}", r, p, dtype, *(_cell(providers.get(q)) for q in present),
                          *ratios, chosen, tflops])
        lines += _table(["layer", "mode", "M", "K->N", "r", "p", "dtype", *present,
                         *(f"{q} {what}" for q in engines for what in ("/ floor", "vs eager")),
                         "fused's engines (fwd/dx)", "fused TFLOP/s"], table)
        lines += ["", "## lora_linear: peak memory beyond the inputs (MiB)", ""]
        memory = [[*key[:3], f"{key[3]}->{key[4]}", *key[5:],
                   *(providers[q]["peak_mem_mb"] if q in providers else None for q in present)]
                  for key, providers in groups.items()]
        lines += _table(["layer", "mode", "M", "K->N", "r", "p", "dtype", *present], memory)
        tiles = [[*key[:3], f"{key[3]}->{key[4]}", *key[5:], q, row.get("tile_fwd"), row.get("tile_dx")]
                 for key, providers in groups.items() for q, row in providers.items()
                 if row.get("tile_fwd") or row.get("tile_dx")]
        if tiles:
            lines += ["", "## lora_linear: the Triton engine's tiles", "",
                      "The fused GEMM's tile each fused row's Triton passes settled on (tuned per launch key, the "
                      "table's, or the FP8 GEMM's fixed one); none where that pass ran on cuBLAS.", ""]
            lines += _table(["layer", "mode", "M", "K->N", "r", "p", "dtype", "provider", "tile fwd", "tile dx"],
                            tiles)
        lines += _fp8_section(groups)

    lines += _launch_section(results)

    merges: dict[tuple, dict[str, dict]] = {}
    for row in results["rows"]:
        if row["op"] == "merge_and_reinit":
            merges.setdefault((row["layer"], row["K"], row["N"], row["r"], row["dtype"]), {})[row["provider"]] = row
    if merges:
        lines += ["", "## merge_and_reinit", "",
                  "GB/s counts the bytes the op must move: W read and written, A and B read and written, and for "
                  "fused_fp8 (an FP8 layer's restart: the merge, then W's two e4m3 copies re-quantised) W read once "
                  "per copy and the copies and their scales written (cases.merge_bytes); copy = a large "
                  "device-to-device copy, bytes read + written. `fp8 / bf16 restart`: fused_fp8's time over fused's; "
                  "`cpu master ms`: fused_fp8 with the master W in pinned CPU memory (its PCIe round trip included).",
                  ""]
        table = []
        for (layer, K, N, r, dtype), providers in merges.items():
            gbps = {q: providers[q].get("gbps") if q in providers else None for q in ("eager", "fused", "fused_fp8")}
            table.append([layer, f"{K}->{N}", r, dtype, *(_cell(providers.get(q)) for q in ("eager", "fused",
                                                                                          "fused_fp8")),
                          gbps["eager"], gbps["fused"], gbps["fused_fp8"], _ratio(gbps["fused"], results["copy_gbps"]),
                          _ratio(_ms(providers.get("fused_fp8")), _ms(providers.get("fused"))),
                          _cell(providers.get("fused_fp8_cpu_master"))])
        lines += _table(["layer", "K->N", "r", "dtype", "eager ms", "fused ms", "fused_fp8 ms", "eager GB/s",
                         "fused GB/s", "fused_fp8 GB/s", "fused / copy", "fp8 / bf16 restart", "cpu master ms"],
                        table)

    pretrain = [row for row in results["rows"] if row["op"] == "pretrain"]
    if pretrain:
        lines += ["", "## pretrain: one training step end to end (benchmarks/e2e.py)", ""]
        lines += _table(["config", "model", "tokens/step", "r", "p", "dtype", "step ms", "p20-p80 ms", "tokens/s",
                         "peak MiB (all)"],
                        [[r["provider"], r["model"], r["M"], r["r"], r["p"], r["dtype"], r["median_ms"],
                          None if r["p20_ms"] is None else f"{r['p20_ms']:.3g}-{r['p80_ms']:.3g}",
                          r["tokens_per_s"], r["peak_mem_mb"]] for r in pretrain])

    problems = [row for row in results["rows"] if row.get("status") != "ok"]
    if problems:
        lines += ["", "## Not measured", ""]
        lines += _table(["op", "provider", "case", "status", "reason"],
                        [[r["op"], r["provider"], _row_case(r), r["status"], r.get("reason")] for r in problems])
    return "\n".join(lines) + "\n"


# A GEMM launch is held against cuBLAS's GEMM of the same shape; a memory-bound one against a copy of x.
# An FP8 GEMM's yardstick is the bf16 GEMM of its shape (the cuBLAS FP8 GEMM's ratio is its rate over bf16's), the
# Triton FP8 GEMM's the cuBLAS FP8 one.
_LAUNCH_YARDSTICK = {"forward_matmul": "floor_fwd", "input_grad": "floor_bwd", "addmm_fwd": "floor_fwd",
                     "addmm_dx": "floor_bwd", "shrink": "copy_x", "grad_ab": "copy_x", "shrink_expand": "copy_x",
                     "grad_ab_start": "copy_x", "fp8_shrink_quantize": "copy_x", "fp8_grad_ab_quantize": "copy_x",
                     "fp8_forward_matmul": "fp8_scaled_mm_fwd", "fp8_input_grad": "fp8_scaled_mm_dx",
                     "fp8_scaled_mm_fwd": "floor_fwd", "fp8_scaled_mm_dx": "floor_bwd",
                     **dict.fromkeys(FP8_GEMM_MODES, "fp8_scaled_mm_fwd")}
_MEMORY_BOUND = ("shrink", "grad_ab", "shrink_expand", "grad_ab_start", "fp8_shrink_quantize", "fp8_grad_ab_quantize")
_ENGINE_OF_LAUNCH = {**dict.fromkeys(TRITON_LAUNCHES, "triton"), **dict.fromkeys(CUBLAS_LAUNCHES, "cublas"),
                     **dict.fromkeys(FP8_TRITON_LAUNCHES, "fp8_triton"),
                     **dict.fromkeys((*FP8_CUBLAS_GEMMS, *FP8_GEMM_MODES), "fp8_cublas")}


def _launch_section(results: dict) -> list[str]:
    groups: dict[tuple, dict[str, dict]] = {}
    for row in results["rows"]:
        if row["op"] == "lora_launches":
            key = tuple(row[k] for k in ("layer", "M", "K", "N", "r", "p", "dtype"))
            groups.setdefault(key, {})[row["provider"]] = row
    if not groups:
        return []
    lines = ["", "## lora_launches: where the fused op's time goes", "",
             "Each launch alone, on the launchers (no autograd), per engine: the Triton engine's shrink, "
             "forward_matmul, grad_ab, input_grad; the cuBLAS-composed engine's shrink_expand, addmm_fwd, "
             "grad_ab_start, addmm_dx; with FP8 frozen weights the Triton engine's fp8_shrink_quantize, "
             "fp8_forward_matmul, fp8_grad_ab_quantize, fp8_input_grad and the cuBLAS-composed engine's FP8 GEMMs "
             "fp8_scaled_mm_fwd / _dx, beside the forward's FP8 GEMM in torch._scaled_mm's other modes "
             "(fp8_scaled_mm_fwd_fast_accum: row-wise, fast accumulation; fp8_scaled_mm_fwd_tensorwise: unit "
             "per-tensor scales, the scaling left to a pass over the output). `vs yardstick`: a GEMM launch's time "
             "over cuBLAS's GEMM of the same shape (floor_fwd / floor_bwd; a Triton FP8 GEMM's over the cuBLAS FP8 "
             "GEMM's, whose own ratio is its time over the bf16 GEMM's; the other modes' over the engine's "
             "fp8_scaled_mm_fwd), a memory-bound launch's GB/s (the fewest bytes it must move, cases.launch_work) "
             "over copy_x's.", ""]
    table, totals = [], []
    for (layer, M, K, N, r, p, dtype), providers in groups.items():
        floor = [_ms(providers.get(q)) for q in ("floor_fwd", "floor_bwd")]
        sums = []
        for launches in (TRITON_LAUNCHES, CUBLAS_LAUNCHES, FP8_TRITON_LAUNCHES):
            times = [_ms(providers.get(q)) for q in launches]
            sums.append(None if None in times or None in floor else sum(times) / sum(floor))
        totals.append([layer, M, f"{K}->{N}", r, p, dtype, *sums])
        for provider in (q for q in LAUNCH_PROVIDERS if q in providers):
            row, yardstick = providers[provider], providers.get(_LAUNCH_YARDSTICK.get(provider, ""))
            if provider in _MEMORY_BOUND:
                versus = _ratio(row.get("gbps"), yardstick and yardstick.get("gbps"))
            else:
                versus = _ratio(_ms(row), _ms(yardstick))
            table.append([layer, M, f"{K}->{N}", r, p, dtype, _ENGINE_OF_LAUNCH.get(provider, "yardstick"), provider,
                          _cell(row), row.get("tflops"), row.get("gbps"), versus])
    lines += _table(["layer", "M", "K->N", "r", "p", "dtype", "engine", "launch", "ms", "TFLOP/s", "GB/s",
                     "vs yardstick"], table)
    lines += ["", "Each engine's launches summed, over floor_fwd + floor_bwd (its fwd+bwd without autograd or the "
              "dropout seed's draw, over the floor's two GEMMs):", ""]
    return lines + _table(["layer", "M", "K->N", "r", "p", "dtype", "triton launches / floor",
                           "cublas launches / floor", "fp8 triton launches / floor"], totals)


def headline(results: dict) -> str:
    """The README's headline snippet: the headline case per provider, with the machine and the command."""
    if results.get("smoke"):
        raise SmokeResults("this is a smoke run (CPU interpreter, nothing timed): no headline can come from it")
    groups = lora_groups(results)
    by_mode = {mode: next((p for key, p in groups.items() if _is_headline(key, mode)), {})
               for mode in ("fwd", "bwd", "fwd+bwd")}
    both = by_mode["fwd+bwd"]
    if not any(_ms(row) for row in both.values()):
        raise ValueError("the file has no timed headline case (fwd+bwd 8192x4096x4096 r=16 p=0.1 bf16)")
    eager, floor = _ms(both.get("eager")), _ms(both.get("floor"))
    rows = []
    for provider in LORA_PROVIDERS:
        if provider not in both:
            continue
        total = _ms(both[provider])
        rows.append([f"`{provider}`", *(_ms(by_mode[m].get(provider)) for m in ("fwd", "bwd")), total,
                     _ratio(eager, total), _ratio(total, floor), both[provider]["peak_mem_mb"]])
    lines = [f"One LoRA linear layer, {HEADLINE.M} tokens x {HEADLINE.K} -> {HEADLINE.N}, r = {HEADLINE.r}, "
             f"dropout {HEADLINE.p}, {HEADLINE.dtype}; median ms over CUDA-event timings with the L2 cache flushed. "
             f"Measured on {conditions(results)} with `{COMMAND}`.", ""]
    lines += _table(["provider", "fwd ms", "bwd ms", "fwd+bwd ms", "speedup vs eager", "time / floor",
                     "peak MiB beyond inputs (fwd+bwd)"], rows)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Plots.
# ----------------------------------------------------------------------------------------------------------------


def plots(results: dict, stem: Path) -> list[Path]:
    """<stem>_speedup.png (eager time / provider time) and <stem>_vs_floor.png (provider time / floor time), one
    group of bars per fwd+bwd case."""
    if results.get("smoke"):
        raise SmokeResults("a smoke run has no timings to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {key: providers for key, providers in lora_groups(results).items() if key[1] == "fwd+bwd"}
    written = []
    for suffix, reference, invert, ylabel, goal in (
        ("speedup", "eager", True, "speedup vs eager (eager ms / provider ms)", SPEEDUP_GOAL),
        ("vs_floor", "floor", False, "time / floor (provider ms / floor ms)", FLOOR_GOAL),
    ):
        shown = [p for p in LORA_PROVIDERS if p != reference and any(_ms(g.get(p)) for g in groups.values())]
        if not groups or not shown:
            continue
        fig, ax = plt.subplots(figsize=(max(8.0, 0.45 * len(groups)), 5.5))  # ~0.45 inch per case
        width = 0.8 / len(shown)
        for i, provider in enumerate(shown):
            values = []
            for providers in groups.values():
                ratio = _ratio(_ms(providers.get(reference)), _ms(providers.get(provider)))
                values.append(float("nan") if ratio is None else (ratio if invert else 1 / ratio))
            ax.bar([x + i * width for x in range(len(groups))], values, width, label=provider)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(goal, color="tab:red", linestyle="--", linewidth=0.8, label=f"goal {goal:.2f}x (fused, headline)")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
        ax.set_xticklabels([f"{k[0]} {k[2]}x{k[3]}x{k[4]}\nr={k[5]} p={k[6]:g} {k[7]}" for k in groups],
                           rotation=90, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(f"lora_linear fwd+bwd, M x K x N\n{conditions(results)}", fontsize=9)
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{suffix}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a result file written by python -m benchmarks.sweep")
    parser.add_argument("--headline", action="store_true", help="print the README headline snippet and exit")
    args = parser.parse_args(argv)
    try:
        results = load(args.results)
        if args.headline:
            print(headline(results), end="")
            return 0
        stem = args.results.with_suffix("")
        markdown_path = stem.with_suffix(".md")
        markdown_path.write_text(markdown(results))
        print(f"wrote {markdown_path}")
        if results.get("smoke"):
            print("smoke run: no plots, no goals (nothing was timed)")
            return 0
        for path in plots(results, stem):
            print(f"wrote {path}")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if results.get("not_run"):
        print(f"incomplete: {results['not_run']} of {results['planned']} planned runs not run")
    print(f"goals ({conditions(results)}):")
    for goal in goals(results):
        print("  " + goal.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark sweep: every (case, provider) of a grid, measured by the harness, written to one JSON file.

    python -m benchmarks.sweep                        # default grid on a GPU -> benchmarks/results/<gpu>.json
    python -m benchmarks.sweep --quick                # the headline case and a few more
    python -m benchmarks.sweep --first                # the first GPU contact's selection (run_gpu.sh)
    TRITON_INTERPRET=1 python -m benchmarks.sweep --smoke --out /tmp/x   # CPU / CI: tiny shapes, interpreted, untimed
    python -m benchmarks.sweep --list                 # print the planned cases and exit
    python -m benchmarks.sweep --ops lora_linear --providers eager,fused --shapes llama-7b --modes fwd+bwd
    python -m benchmarks.sweep --budget-s 420                 # start no run after 420 s; the file says what is left
    python -m benchmarks.sweep --resume benchmarks/results/h100.json   # the runs that file lacks, added to its rows

Ops: lora_linear, merge_and_reinit and lora_launches (cases.py), pretrain (e2e.py). --shapes keeps cases whose layer
(or model) name contains one of the given substrings (e.g. gpt2-124m, llama-7b.up, qkv); --modes filters lora_linear
only. A provider that cannot run here (native without CUDA) gives a row with status "skipped" and its reason; one
that fails (a compile error, an OOM) a row with status "error"; the sweep goes on either way (--strict: exit 1 on
errors).

--first (what benchmarks/run_gpu.sh runs in the few minutes a lent GPU gives): floor, eager, compile and the fused op
on each engine (fused_triton, fused_cublas) and on the automatic choice (fused), then the same three with an FP8
frozen weight (fused_fp8_triton, fused_fp8_cublas, fused_fp8), at the headline case with p = 0.1 and 0, at 2048
tokens of GPT-2 124M's fc (768 -> 3072) and at a Llama-8B MLP layer (8192 x 4096 -> 14336), fwd+bwd, bf16;
merge+reinit at 4096 x 4096 against the copy bandwidth, also an FP8 layer's restart (fused_fp8); the end-to-end step
(full_eager, lora_eager, relora_fused); then the headline's launch breakdown (both engines' launches). With --smoke
the same providers run on the smoke grid's tiny shapes (fwd+bwd only).

Runs go in order of importance: the quick grid's cases (the headline first), the end-to-end step, then the rest of
the grid. The result file is rewritten after every run, so a run cut short (a time limit, a crash, Ctrl-C) keeps
what it measured; `planned` and `not_run` in the file say how complete it is, and --resume finishes it later (same
device, versions and commit, or it refuses).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import cases, e2e, harness

ALL_OPS = (*cases.OPS, "pretrain")
ALL_PROVIDERS = tuple(dict.fromkeys(cases.LORA_PROVIDERS + cases.MERGE_PROVIDERS + cases.LAUNCH_PROVIDERS
                                    + e2e.CONFIGS))
# The providers of the first GPU contact, per op: lora_linear's floor, eager, compile and the fused op on both engines
# and the automatic choice, in bf16 and with an FP8 frozen weight; merge's (the bf16 restart and the FP8 layer's), the
# end-to-end step without torch.compile (a whole-model compile would cost a minute of a lent GPU's few), every launch
# of the breakdown (both engines').
FIRST_PROVIDERS = ("floor", "eager", "compile", "fused_triton", "fused_cublas", "fused", *cases.FP8_PROVIDERS,
                   *cases.MERGE_PROVIDERS, "full_eager", "lora_eager", "relora_fused", *cases.LAUNCH_PROVIDERS)
NO_MEASUREMENT = {"median_ms": None, "p20_ms": None, "p80_ms": None, "peak_mem_mb": None}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _choices(allowed):
    """argparse type: a comma-separated subset of `allowed`, with a message naming the bad item and the choices."""

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(item.strip() for item in text.split(",") if item.strip())
        bad = [item for item in items if item not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{', '.join(bad) or repr(text)} not in {', '.join(allowed)}")
        return items

    return parse


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not seconds >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return seconds


def _substrings(text: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected comma-separated layer name fragments, e.g. llama-7b,gpt2-124m.fc")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    grid = parser.add_mutually_exclusive_group()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, each callable run once, nothing timed")
    grid.add_argument("--quick", action="store_true", help="the headline case and a few shapes (~1 min on a GPU)")
    grid.add_argument("--first", action="store_true",
                      help="the first GPU contact's selection (run_gpu.sh); with --smoke, on the smoke shapes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result folder (default: %(default)s)")
    parser.add_argument("--name", help="result file stem (default: the GPU's short name, e.g. h100; cpu-smoke)")
    parser.add_argument("--ops", type=_choices(ALL_OPS), default=ALL_OPS, help=f"subset of {','.join(ALL_OPS)}")
    parser.add_argument("--providers", type=_choices(ALL_PROVIDERS), default=ALL_PROVIDERS,
                        help=f"subset of {','.join(ALL_PROVIDERS)}")
    parser.add_argument("--modes", type=_choices(cases.MODES), default=cases.MODES,
                        help=f"lora_linear modes, subset of {','.join(cases.MODES)}")
    parser.add_argument("--dtypes", type=_choices(tuple(cases.DTYPES)), default=tuple(cases.DTYPES),
                        help=f"subset of {','.join(cases.DTYPES)}")
    parser.add_argument("--shapes", type=_substrings, help="keep layers whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="print the planned (case, provider) pairs and exit")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any row is an error")
    parser.add_argument("--budget-s", type=_seconds, help="start no new run after this many seconds")
    parser.add_argument("--resume", type=Path, metavar="FILE",
                        help="a result file of an earlier run: keep its ok and skipped rows, run only what it lacks")
    args = parser.parse_args(argv)
    if args.smoke and args.quick:
        parser.error("argument --quick: not allowed with argument --smoke (--smoke --first runs the first "
                     "contact's providers on the smoke shapes)")
    args.grid = "smoke" if args.smoke else "quick" if args.quick else "first" if args.first else "default"
    if args.first:
        args.providers = tuple(p for p in args.providers if p in FIRST_PROVIDERS)
        args.modes = tuple(m for m in args.modes if m == "fwd+bwd")
        if not args.providers or not args.modes:
            parser.error("--first runs fwd+bwd with the providers " + ",".join(FIRST_PROVIDERS)
                         + ": --providers / --modes leave none of them")
    if not args.smoke and not args.list and not torch.cuda.is_available():
        parser.error("no CUDA device: timings need a GPU (the CPU runs Triton only through its interpreter); "
                     "use --smoke for the CPU smoke run")
    if not args.list:
        harness.require_interpreter_without_gpu(parser)
    return args


def plan(args) -> list[tuple[object, str]]:
    """The (case, provider) pairs of the chosen grid that pass the filters, most important first: the quick grid's
    lora_linear and merge cases (--first: its lora_linear and merge cases), the end-to-end configurations (case
    e2e.PretrainCase), then the rest of the grid; --first puts its torch.compile runs after all its others."""
    grids = {"lora_linear": cases.lora_grid, "merge_and_reinit": cases.merge_grid, "lora_launches": cases.launch_grid}
    first, rest = [], []
    for op in (op for op in cases.OPS if op in args.ops):
        grid = grids[op](args.grid)
        # The default grid holds the quick grid's cases: those go first, in the quick grid's order.
        if args.grid == "default":
            quick = [case for case in grids[op]("quick") if case in grid]
        else:  # --first puts the launch breakdown after the end-to-end step
            quick = [] if args.first and op == "lora_launches" else grid
        for case in quick + [case for case in grid if case not in quick]:
            if isinstance(case, cases.LoraCase) and case.mode not in args.modes:
                continue
            if case.dtype not in args.dtypes or not _shape_selected(case.layer, args.shapes):
                continue
            pairs = [(case, provider) for provider in cases.providers(op) if provider in args.providers
                     and not (args.smoke and op == "lora_linear" and cases.smoke_skips(case, provider))]
            (first if case in quick else rest).extend(pairs)
    pretrain = e2e.case(args.smoke)
    if "pretrain" in args.ops and _shape_selected(pretrain.model, args.shapes):
        first += [(pretrain, config) for config in e2e.CONFIGS if config in args.providers]
    if args.first:
        # torch.compile's runs after every other: on an H200 the headline's compile took 71 s of a 75 s sweep, and
        # the fused providers it came before went unmeasured.
        first = [pair for pair in first if pair[1] != "compile"] + [pair for pair in first if pair[1] == "compile"]
    return first + rest


def _shape_selected(name: str, shapes) -> bool:
    return shapes is None or any(fragment in name for fragment in shapes)


def run_key(row: dict) -> tuple:
    """What names a run in a result file: the provider and the case's fields, not the measurements."""
    fields = ("op", "provider", "mode", "layer", "model", "M", "K", "N", "r", "p", "dtype")
    if row["op"] == "pretrain":  # its M, r, p and dtype follow from the model and the machine
        fields = ("op", "provider", "mode", "model")
    return tuple(row.get(field) for field in fields)


def _planned_key(case, provider: str) -> tuple:
    return run_key({**case.row(), "provider": provider})


# The conditions a resumed file must share with this run: rows measured under others would not compare.
RESUME_MUST_MATCH = ("device", "smoke", "torch", "triton", "cuda", "commit")


def resumed_results(path: Path, env: dict) -> dict:
    """The earlier result file at `path`, checked to come from the same device, versions and commit as `env`."""
    try:
        earlier = json.loads(path.read_text())
        rows = earlier["rows"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        sys.exit(f"--resume {path}: not a readable result file ({type(error).__name__}: {error})")
    for field in RESUME_MUST_MATCH:
        if earlier.get(field) != env[field]:
            sys.exit(f"--resume {path}: its {field} is {earlier.get(field)!r}, this run's is {env[field]!r}; "
                     "rows measured under different conditions are not mixed in one file")
    return {**earlier, "rows": [row for row in rows if row.get("status") in ("ok", "skipped")]}


def measure_case(case, provider: str, device: torch.device, smoke: bool) -> dict:
    if isinstance(case, e2e.PretrainCase):
        with cases.provider_env(None):
            return e2e.run_config(provider, device, smoke)
    row = {**case.row(), "provider": provider}
    fn = None
    try:
        # The kernels, and a fused lora_linear provider's engine, for its build and every timed call.
        fused = isinstance(case, cases.LoraCase) and provider in cases.FUSED_PROVIDERS
        with cases.provider_env(provider if fused else None):
            fn = cases.build(provider, case, device)
            measured = harness.measure(fn, device, smoke)
            engines = cases.chosen_engines(case, provider) if fused else {}
        return {**row, **measured, **cases.metrics(case, provider, measured["median_ms"]), **engines, "status": "ok"}
    except cases.Skip as skip:
        return {**row, **NO_MEASUREMENT, "status": "skipped", "reason": str(skip)}
    except Exception as error:  # a compile failure or an OOM is a result of the run, not the end of the sweep
        return {**row, **NO_MEASUREMENT, "status": "error", "reason": harness.error_reason(error)}
    finally:
        del fn
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _run_line(row: dict, provider: str, case) -> str:
    """One completed run: status, provider, case, and its median where it was timed (never in smoke)."""
    timed = f" {row['median_ms']:.4g} ms" if row.get("median_ms") is not None else ""
    reason = f": {row['reason']}" if row["status"] != "ok" else ""
    return f"{row['status']}: {provider} {case.label()}{timed}{reason}"


def main(argv=None) -> int:
    args = parse_args(argv)
    pairs = plan(args)
    if args.list:
        for case, provider in pairs:
            print(f"{provider:14s} {case.label()}")
        print(f"{len(pairs)} runs ({args.grid} grid)")
        return 0
    if not pairs:
        sys.exit("nothing to run: the filters exclude every case (see --list)")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    env = harness.environment(device, args.smoke)
    earlier = resumed_results(args.resume, env) if args.resume else {"rows": [], "copy_gbps": None}
    if args.resume:
        env = {**env, "date": earlier["date"], "resumed": [*earlier.get("resumed", []), env["date"]]}
    rows = earlier["rows"]
    done = {run_key(row) for row in rows}
    todo = [(case, provider) for case, provider in pairs if _planned_key(case, provider) not in done]
    copy_gbps = earlier["copy_gbps"]
    if copy_gbps is None and any(isinstance(case, cases.MergeCase) for case, _ in todo):
        copy_gbps = harness.copy_bandwidth_gbps(device, args.smoke)
    order = {key: index for index, key in enumerate(_planned_key(case, provider) for case, provider in pairs)}

    name = args.name or ("cpu-smoke" if args.smoke else harness.device_slug(env["device"]))
    path = args.out / f"{name}.json"

    def save(not_run: int) -> None:
        rows.sort(key=lambda row: order.get(run_key(row), len(order)))  # plan order; rows the plan lacks last
        harness.write_results(path, {**env, "planned": len(pairs), "not_run": not_run}, copy_gbps, rows)

    if args.resume:
        print(f"resuming {args.resume}: {len(pairs) - len(todo)} of {len(pairs)} planned runs already there")
    progress = harness.Progress(len(todo), f"sweep ({args.grid})", "run")
    for index, (case, provider) in enumerate(todo):
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            progress.note(f"time budget of {args.budget_s:g} s spent: {len(todo) - index} runs not started "
                          f"(finish them with --resume {path})")
            break
        progress.starting(f"{provider} {case.label()}")
        row = measure_case(case, provider, device, args.smoke)
        progress.completed(_run_line(row, provider, case), problem=row["status"] != "ok")
        rows.append(row)
        save(not_run=len(todo) - index - 1)
    progress.close()
    measured = {run_key(row) for row in rows}
    not_run = sum(_planned_key(case, provider) not in measured for case, provider in pairs)
    save(not_run)

    counts = {status: sum(row["status"] == status for row in rows) for status in ("ok", "skipped", "error")}
    print(f"wrote {path}: {len(rows)} rows ({', '.join(f'{n} {s}' for s, n in counts.items())}"
          f"{f', {not_run} planned runs not run' if not_run else ''}) in {time.perf_counter() - start:.0f} s"
          + (" -- smoke run: nothing timed" if args.smoke else ""))
    return 1 if args.strict and counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())

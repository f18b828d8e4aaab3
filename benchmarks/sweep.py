"""The benchmark sweep: every (case, provider) of a grid, measured by the harness, written to one JSON file.

    python -m benchmarks.sweep                        # default grid on a GPU -> benchmarks/results/<gpu>.json
    python -m benchmarks.sweep --quick                # the headline case and a few more
    python -m benchmarks.sweep --smoke --out /tmp/x   # CPU / CI: tiny shapes through the Triton interpreter, untimed
    python -m benchmarks.sweep --list                 # print the planned cases and exit
    python -m benchmarks.sweep --ops lora_linear --providers eager,fused --shapes llama-7b --modes fwd+bwd

Ops: lora_linear and merge_and_reinit (cases.py), pretrain (e2e.py). --shapes keeps cases whose layer (or model)
name contains one of the given substrings (e.g. gpt2-124m, llama-7b.up, qkv); --modes filters lora_linear only.
A provider that cannot run here (native without CUDA) gives a row with status "skipped" and its reason; one that
fails (a compile error, an OOM) a row with status "error"; the sweep goes on either way (--strict: exit 1 on errors).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import cases, e2e, harness

ALL_OPS = (*cases.OPS, "pretrain")
ALL_PROVIDERS = tuple(dict.fromkeys(cases.LORA_PROVIDERS + cases.MERGE_PROVIDERS + e2e.CONFIGS))
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


def _substrings(text: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected comma-separated layer name fragments, e.g. llama-7b,gpt2-124m.fc")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--smoke", action="store_true", help="tiny shapes, each callable run once, nothing timed")
    grid.add_argument("--quick", action="store_true", help="the headline case and a few shapes (~1 min on a GPU)")
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
    args = parser.parse_args(argv)
    args.grid = "smoke" if args.smoke else "quick" if args.quick else "default"
    if not args.smoke and not args.list and not torch.cuda.is_available():
        parser.error("no CUDA device: timings need a GPU (the CPU runs Triton only through its interpreter); "
                     "use --smoke for the CPU smoke run")
    return args


def plan(args) -> list[tuple[object, str]]:
    """The (case, provider) pairs of the chosen grid that pass the filters, in run order."""
    pairs = []
    grids = {"lora_linear": cases.lora_grid, "merge_and_reinit": cases.merge_grid}
    for op in (op for op in cases.OPS if op in args.ops):
        for case in grids[op](args.grid):
            if isinstance(case, cases.LoraCase) and case.mode not in args.modes:
                continue
            if case.dtype not in args.dtypes or not _shape_selected(case.layer, args.shapes):
                continue
            pairs += [(case, provider) for provider in cases.providers(op) if provider in args.providers]
    return pairs


def _shape_selected(name: str, shapes) -> bool:
    return shapes is None or any(fragment in name for fragment in shapes)


def measure_case(case, provider: str, device: torch.device, smoke: bool) -> dict:
    row = {**case.row(), "provider": provider}
    fn = None
    try:
        fn = cases.build(provider, case, device)
        measured = harness.measure(fn, device, smoke)
        return {**row, **measured, **cases.metrics(case, provider, measured["median_ms"]), "status": "ok"}
    except cases.Skip as skip:
        return {**row, **NO_MEASUREMENT, "status": "skipped", "reason": str(skip)}
    except Exception as error:  # a compile failure or an OOM is a result of the run, not the end of the sweep
        return {**row, **NO_MEASUREMENT, "status": "error", "reason": harness.error_reason(error)}
    finally:
        del fn
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    pairs = plan(args)
    run_e2e = "pretrain" in args.ops and (args.shapes is None or _shape_selected(e2e.MODEL, args.shapes))
    e2e_configs = tuple(c for c in e2e.CONFIGS if c in args.providers) if run_e2e else ()
    if args.list:
        for case, provider in pairs:
            print(f"{provider:14s} {case.label()}")
        for config in e2e_configs:
            print(f"{config:14s} pretrain {'smoke-tiny' if args.smoke else e2e.MODEL}")
        print(f"{len(pairs) + len(e2e_configs)} runs ({args.grid} grid)")
        return 0
    if not pairs and not e2e_configs:
        sys.exit("nothing to run: the filters exclude every case (see --list)")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    env = harness.environment(device, args.smoke)
    measure_copy = any(isinstance(case, cases.MergeCase) for case, _ in pairs)
    copy_gbps = harness.copy_bandwidth_gbps(device, args.smoke) if measure_copy else None
    rows = []
    progress = tqdm(pairs, desc=f"sweep ({args.grid})", unit="run", mininterval=1.0)
    for case, provider in progress:
        progress.set_postfix_str(f"{provider} {case.label()}")
        row = measure_case(case, provider, device, args.smoke)
        if row["status"] != "ok":
            tqdm.write(f"{row['status']}: {provider} {case.label()}: {row['reason']}")
        rows.append(row)
    if e2e_configs:
        print(f"end-to-end training step: {', '.join(e2e_configs)}")
        rows += e2e.run(device, args.smoke, e2e_configs)

    name = args.name or ("cpu-smoke" if args.smoke else harness.device_slug(env["device"]))
    path = harness.write_results(args.out / f"{name}.json", env, copy_gbps, rows)
    counts = {status: sum(row["status"] == status for row in rows) for status in ("ok", "skipped", "error")}
    print(f"wrote {path}: {len(rows)} rows ({', '.join(f'{n} {s}' for s, n in counts.items())}) "
          f"in {time.perf_counter() - start:.0f} s" + (" -- smoke run: nothing timed" if args.smoke else ""))
    return 1 if args.strict and counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())

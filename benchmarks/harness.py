"""Timing, peak memory, the environment record and result files: everything a benchmark case does not decide.

A case is a zero-argument callable that runs the op once on inputs it already holds (see cases.py). `measure`
turns it into numbers:
- time: triton.testing.do_bench (CUDA events, a warm-up, the L2 cache flushed before every run by writing a
  256 MB buffer), median and 20th / 80th percentiles in ms;
- peak memory: one separate, un-timed call after torch.cuda.reset_peak_memory_stats, reported as
  max_memory_allocated minus what was allocated just before the call, i.e. the memory the call itself needs on
  top of its inputs (and, for a backward, on top of the graph built by the forward);
- smoke mode (CPU, the Triton interpreter): the callable runs once, nothing is timed, every number is None.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from relora_kernels.utils import atomic_write

QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80
WARMUP_MS = 25  # do_bench's warm-up budget per case
REP_MS = 100  # do_bench's measuring budget per case
COPY_BYTES = 1 << 30  # 1 GiB read + 1 GiB written by the device-to-device copy that sets the bandwidth reference

MEMORY_NOTE = ("peak_mem_mb: torch.cuda.max_memory_allocated during one un-timed call after reset_peak_memory_stats, "
               "minus the memory allocated just before it (inputs and, for bwd, the forward's graph excluded); "
               "for op=pretrain the whole training step's peak including model, gradients and optimizer state")
TIMING_NOTE = (f"triton.testing.do_bench: CUDA events, warm-up {WARMUP_MS} ms, {REP_MS} ms of runs, L2 flushed "
               "before each run; median_ms with p20_ms / p80_ms")


def measure(fn, device: torch.device, smoke: bool) -> dict:
    """{median_ms, p20_ms, p80_ms, peak_mem_mb} of fn(); all None in smoke mode, where fn runs exactly once."""
    if smoke:
        fn()
        return {"median_ms": None, "p20_ms": None, "p80_ms": None, "peak_mem_mb": None}
    fn()  # first call: compiles, autotunes, allocates caches; kept out of both the memory figure and the timing
    peak = peak_memory_mb(fn, device)
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, quantiles=list(QUANTILES))
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "peak_mem_mb": peak}


def peak_memory_mb(fn, device: torch.device) -> float:
    """MiB that one call of fn allocates at its peak beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def copy_bandwidth_gbps(device: torch.device, smoke: bool) -> float | None:
    """Achieved GB/s (1e9 bytes/s) of a large device-to-device dst.copy_(src): bytes read plus bytes written."""
    if smoke:
        return None
    from triton.testing import do_bench

    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    median_ms = do_bench(lambda: dst.copy_(src), warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    return 2 * COPY_BYTES / (median_ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}), Triton interpreter"


def device_slug(name: str) -> str:
    """A short file name for a GPU: 'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA A100-SXM4-80GB' -> 'a100'."""
    vendor = {"nvidia", "geforce", "tesla", "amd", "radeon", "instinct"}
    packaging = re.compile(r"\d+gb|hbm\d*e?|pcie|sxm\d*|nvl|mig.*", re.IGNORECASE)
    words = [w for w in re.split(r"[\s\-_/()]+", name.lower()) if w and w not in vendor and not packaging.fullmatch(w)]
    slug = re.sub(r"[^a-z0-9.]+", "-", "-".join(words)).strip("-")
    return slug or "gpu"


def git_commit() -> str:
    """HEAD of the checkout being measured, '-dirty' if it has changes; $RELORA_BENCH_COMMIT where there is no git."""
    if os.environ.get("RELORA_BENCH_COMMIT"):
        return os.environ["RELORA_BENCH_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        # Result files rewritten by this very run do not make the measured code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!benchmarks/results"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device, smoke: bool) -> dict:
    """The conditions every row of one run shares (the top-level keys of a result file, before `rows`)."""
    import triton

    return {
        "device": device_name(device),
        "smoke": smoke,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timing": "none: smoke run, every callable ran once" if smoke else TIMING_NOTE,
        "memory": MEMORY_NOTE,
    }


def require_interpreter_without_gpu(parser: argparse.ArgumentParser) -> None:
    """Without CUDA the kernels run only through Triton's interpreter, which triton reads when it first compiles them:
    it must be on before the run starts (importing `benchmarks` changes no environment variable)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("no CUDA device: a CPU smoke run needs Triton's interpreter, switched on before the run starts: "
                     f"TRITON_INTERPRET=1 python -m {parser.prog.removeprefix('python -m ')} --smoke ...")


def write_results(path: Path, env: dict, copy_gbps: float | None, rows: list[dict]) -> Path:
    """Write the result file whole or not at all: a kill mid-write leaves the previous version in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({**env, "copy_gbps": copy_gbps, "rows": rows}, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def error_reason(error: BaseException) -> str:
    """One line, at most 300 characters, naming the exception: what a failed row records."""
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


class Progress:
    """Progress over `total` items: tqdm's bar on a terminal; anywhere else (a log file, a pipe, a remote command's
    captured output) one plain line per completed item, since the bar's carriage-return frames would pile up there
    by the thousand."""

    def __init__(self, total: int, desc: str, unit: str, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.plain = not (hasattr(self.stream, "isatty") and self.stream.isatty())
        self.total, self.desc, self.done, self.start = total, desc, 0, time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit=unit, mininterval=1.0, file=self.stream, disable=self.plain)

    def starting(self, text: str) -> None:
        """What runs next: the bar's postfix (a plain log gets the line when it completes)."""
        self.bar.set_postfix_str(text)

    def completed(self, text: str, problem: bool = False) -> None:
        """One item done: `text` says which and how it went; on a terminal it is printed only for a `problem`."""
        self.done += 1
        if self.plain:
            print(f"{self.desc} [{self.done}/{self.total}] {text} ({time.perf_counter() - self.start:.0f} s)",
                  file=self.stream, flush=True)
            return
        if problem:
            self.bar.write(text, file=self.stream)
        self.bar.update(1)

    def note(self, text: str) -> None:
        """A message between items, on its own line either way."""
        if self.plain:
            print(text, file=self.stream, flush=True)
        else:
            self.bar.write(text, file=self.stream)

    def close(self) -> None:
        self.bar.close()


# The limits of a run_gpu.sh output folder, so that it can be copied back whole from a machine that returns only
# so much: at most MAX_FILES files, each under MAX_FILE_MIB MiB, named in these characters (run_gpu.sh's options
# --max-files and --max-file-mib; these are their defaults).
MAX_FILES = 8
MAX_FILE_MIB = 16
FILE_NAME = re.compile(r"[A-Za-z0-9._-]+")
RUN_FILES = ("run_gpu.log", "run_gpu.json", "pytest_gpu.txt", "gpu_build.md")
# The file a part writes, not expected where run_gpu.json records the part as skipped (--skip).
PART_FILES = {"tests": "pytest_gpu.txt", "build": "gpu_build.md"}
_PYTEST_SUMMARY = re.compile(r"\b(passed|failed|errors?|skipped|deselected|no tests ran)\b.* in \d")


def check_outputs(folder: Path, max_files: int = MAX_FILES, max_file_mib: float = MAX_FILE_MIB) -> list[str]:
    """What is wrong with a run_gpu.sh folder (empty: nothing): more than `max_files` files, one of `max_file_mib`
    MiB or more, badly named or in a subfolder; a missing part (run_gpu.sh's files, the sweep's JSON and its report);
    a JSON file that does not parse; a test summary without pytest's final line."""
    max_bytes = int(max_file_mib * 2**20)
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: no such folder"]
    entries = sorted(folder.iterdir())
    problems = [f"{e.name}: a folder (run_gpu.sh writes files only)" for e in entries if not e.is_file()]
    files = [e for e in entries if e.is_file()]
    if len(files) > max_files:
        problems.append(f"{len(files)} files, more than the {max_files} allowed: " + ", ".join(f.name for f in files))
    problems += [f"{f.name}: {f.stat().st_size} bytes, over {max_bytes}" for f in files
                 if f.stat().st_size >= max_bytes]
    problems += [f"{f.name!r}: not a plain file name (letters, digits, '.', '_', '-')" for f in files
                 if not FILE_NAME.fullmatch(f.name)]
    names = {f.name for f in files}
    skipped = {PART_FILES.get(part) for part in _skipped_parts(folder / "run_gpu.json")}
    problems += [f"{name}: missing" for name in RUN_FILES if name not in names and name not in skipped]
    results = [f for f in files if f.suffix == ".json" and f.name != "run_gpu.json"]
    if len(results) != 1:
        problems.append(f"expected one sweep result file (<gpu>.json), found {[f.name for f in results]}")
    for path in (f for f in files if f.suffix == ".json"):
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            problems.append(f"{path.name}: not JSON ({error})")
            continue
        key = "parts" if path.name == "run_gpu.json" else "rows"
        if not isinstance(content, dict) or not isinstance(content.get(key), list) or not content[key]:
            problems.append(f"{path.name}: no {key!r}, or none in it")
    problems += [f"{r.with_suffix('.md').name}: missing (the report of {r.name})" for r in results
                 if r.with_suffix(".md").name not in names]
    summary = folder / "pytest_gpu.txt"
    lines = summary.read_text(errors="replace").strip().splitlines() if summary.is_file() else []
    if summary.is_file() and not (lines and _PYTEST_SUMMARY.search(lines[-1])):
        problems.append(f"pytest_gpu.txt: its last line is not pytest's summary: {lines[-1:]}")
    return problems


def _skipped_parts(run_record: Path) -> set[str]:
    try:
        parts = json.loads(run_record.read_text())["parts"]
        return {part["part"] for part in parts if part.get("skipped")}
    except (OSError, ValueError, KeyError, TypeError):  # check_outputs names what is wrong with the file
        return set()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.harness")
    parser.add_argument("--check-outputs", type=Path, metavar="DIR", required=True,
                        help="check a benchmarks/run_gpu.sh folder: complete, and within the limits below")
    parser.add_argument("--max-files", type=int, default=MAX_FILES, help="at most this many files (%(default)s)")
    parser.add_argument("--max-file-mib", type=float, default=MAX_FILE_MIB,
                        help="each file under this many MiB (%(default)s)")
    args = parser.parse_args(argv)
    if args.max_files < 1 or args.max_file_mib <= 0:
        parser.error(f"--max-files must be >= 1 and --max-file-mib > 0; got {args.max_files}, {args.max_file_mib}")
    problems = check_outputs(args.check_outputs, args.max_files, args.max_file_mib)
    for problem in problems:
        print(f"{args.check_outputs}: {problem}", file=sys.stderr)
    files = sorted(f.name for f in args.check_outputs.iterdir()) if args.check_outputs.is_dir() else []
    print(f"{args.check_outputs}: {len(files)} files ({', '.join(files)}): "
          + (f"{len(problems)} problems" if problems else "complete and within the limits"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

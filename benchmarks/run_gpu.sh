#!/usr/bin/env bash
# Record GPU results: the GPU tests, the benchmark sweep (lora_linear, merge_and_reinit, end-to-end pretrain step)
# and its report, all written flat into one folder.
#
#   bash benchmarks/run_gpu.sh [DIR] [sweep options...]     e.g. bash benchmarks/run_gpu.sh "$OUT" --quick
#
# DIR defaults to $OUT, else benchmarks/results/. It receives 8 files: <gpu>.json, <gpu>.md, <gpu>_speedup.png,
# <gpu>_vs_floor.png, pytest_gpu.txt (summary of `pytest tests -m gpu`), sweep.log, gpu_build.md and gpu_build.json
# (the kernel builds for this GPU). <gpu> is the short device
# name (h100 for "NVIDIA H100 80GB HBM3"). Where the checkout has no .git, set RELORA_BENCH_COMMIT to the commit.
# Where one command may run at most 10 minutes (the device tool), split it and give each call a budget:
#   RUN_BUDGET_S=560 GPU_TESTS=only bash benchmarks/run_gpu.sh "$OUT"                 the tests
#   RUN_BUDGET_S=560 GPU_TESTS=skip bash benchmarks/run_gpu.sh "$OUT"                 the sweep, most important first
#   RUN_BUDGET_S=560 GPU_TESTS=skip bash benchmarks/run_gpu.sh "$OUT" --resume F      the runs file F still lacks
# RUN_BUDGET_S: the seconds this command may take. The tests are stopped (SIGINT: pytest still writes its summary)
# and the sweep starts no new run once it would overrun, leaving SWEEP_MARGIN_S (default 120: the longest single
# run, a torch.compile, plus the report) for what is under way. The sweep's JSON is rewritten after every run.
set -uo pipefail
cd "$(dirname "$0")/.."
# The interpreter that holds torch: $PYTHON, else python3 (some GPU images have no plain `python`).
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
out="${1:-${OUT:-benchmarks/results}}"
shift $(($# > 0 ? 1 : 0))
mkdir -p "$out"
"$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'run_gpu.sh needs a CUDA GPU')" || exit 1
name=$("$py" -c "import torch; from benchmarks.harness import device_name, device_slug
print(device_slug(device_name(torch.device('cuda'))))")
start=$SECONDS
# Seconds left of RUN_BUDGET_S after a margin ($1), at least 1.
left() { local s=$((RUN_BUDGET_S - (SECONDS - start) - ${1:-0})); echo $((s > 1 ? s : 1)); }

# 0. Every kernel launch the run makes (each dtype, r up to 256, autotuned tiles and fixed ones), compiled on all
#    cores into Triton's cache, with their resources in gpu_build.md/.json. Without it the autotuner compiles its
#    tiles one after another inside the first calls: minutes on a fresh machine.
capability=$("$py" -c "import torch; major, minor = torch.cuda.get_device_capability(); print(10 * major + minor)")
if "$py" -m benchmarks.gpu_build --arch "$capability" --dtypes bf16 fp16 fp32 --ranks 16 32 64 128 256 \
        --out "$out" > "$out/gpu_build.log" 2>&1; then
    echo "kernels built for sm_$capability in $((SECONDS - start)) s (gpu_build.md)"
else
    echo "gpu_build for sm_$capability failed or found a problem (not fatal here): $(tail -n 3 "$out/gpu_build.log")"
fi
rm -f "$out/gpu_build.log"

# 1. The GPU tests (realistic shapes, bf16). A failure is recorded; the benchmarks still run.
tests_rc=0
if [ "${GPU_TESTS:-run}" != skip ]; then
    # A fixed GEMM tile: autotuning each of the tests' shape/dtype keys from cold would take minutes; the tests
    # check every tile, and the autotuned path once, explicitly.
    limit=()
    [ -n "${RUN_BUDGET_S:-}" ] && limit=(timeout -s INT -k 30 "$(left 45)")
    RELORA_KERNELS_AUTOTUNE=0 "${limit[@]}" "$py" -m pytest tests -m gpu -q -rfEs > "$out/pytest_gpu.txt" 2>&1
    tests_rc=$?
    echo "pytest tests -m gpu (exit $tests_rc): $(tail -n 1 "$out/pytest_gpu.txt")"
    [ "${GPU_TESTS:-run}" = only ] && exit "$tests_rc"
fi

# 2. The sweep, then the markdown table, the plots and the goal checks.
budget=()
[ -n "${RUN_BUDGET_S:-}" ] && budget=(--budget-s "$(left "${SWEEP_MARGIN_S:-120}")")
"$py" -m benchmarks.sweep --out "$out" --name "$name" "${budget[@]}" "$@" 2>&1 | tee "$out/sweep.log"
sweep_rc=${PIPESTATUS[0]}
"$py" -m benchmarks.report "$out/$name.json" 2>&1 | tee -a "$out/sweep.log"
report_rc=${PIPESTATUS[0]}

echo "run_gpu.sh: $((SECONDS - start)) s; exit codes: tests $tests_rc, sweep $sweep_rc, report $report_rc"
[ "$tests_rc" -eq 0 ] && [ "$sweep_rc" -eq 0 ] && [ "$report_rc" -eq 0 ]

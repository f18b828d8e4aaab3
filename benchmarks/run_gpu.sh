#!/usr/bin/env bash
# The first GPU contact in one command: the evidence that matters most, most important first, into one folder.
#
#   RELORA_BENCH_COMMIT=<commit> bash benchmarks/run_gpu.sh "$OUT"   GPU: ends within RUN_BUDGET_S (500 s) + ~15 s
#   RUN_GPU_SMOKE=1 bash benchmarks/run_gpu.sh DIR                    CPU (CI): the same parts on tiny shapes through
#                                                                     the Triton interpreter; nothing is timed
#
# Parts, each writing its files before the next starts (run_gpu.json is rewritten after every part with its seconds
# and exit code, so a run cut short says how far it got):
#   1 build    the kernels for this GPU's architecture, only what the run launches (bf16 and fp16, r = 16, 64, 128),
#              one process per (dtype, rank), into Triton's cache: the sweep's autotuner then times its tiles but
#              compiles none, and the tests find most of theirs built. gpu_build.md: their resources.
#   2 sweep    `python -m benchmarks.sweep --first` without the launch breakdown: floor / eager / compile and the fused op
#              on each engine and the automatic choice (fused_triton / fused_cublas / fused) at the
#              headline (8192x4096x4096 r=16 bf16, p = 0.1 and 0), GPT-2 124M fc at 2048 tokens, Llama-8B MLP;
#              merge+reinit vs a measured copy; one GPT-2 124M training step. <gpu>.json is rewritten after every
#              run; then the report: <gpu>.md, <gpu>_speedup.png, <gpu>_vs_floor.png.
#   3 tests    pytest tests/test_gpu.py (bf16 and fp16 against float64, poisoned outputs, a training step under
#              torch.cuda.set_sync_debug_mode("error")) with RELORA_KERNELS_AUTOTUNE=0: fixed tiles, so no test
#              autotunes; on pytest-xdist's 8 workers where it is installed (compiles run in parallel), each test
#              limited to 120 s where pytest-timeout is. pytest_gpu.txt.
#   4 rest     the sweep resumed (--resume <gpu>.json): the headline's launch breakdown (both engines') and any run part 2 left; the
#              report again.
#   5 check    the folder against what the device tool returns: at most 8 files, each under 16 MiB, plain names;
#              the JSON files parse; the test summary is there.
# Files (8 on a GPU): <gpu>.json, <gpu>.md, <gpu>_speedup.png, <gpu>_vs_floor.png, pytest_gpu.txt, gpu_build.md,
# run_gpu.log (everything printed), run_gpu.json. <gpu> is the short device name (h200 for "NVIDIA H200").
# RUN_BUDGET_S (default 500; smoke: none): the sweep starts no run, and the tests are stopped (SIGINT: pytest still
# writes its summary), where they would leave the later parts too little of it. Where the checkout has no .git (the
# device tool's copy), RELORA_BENCH_COMMIT names the commit measured.
set -uo pipefail
cd "$(dirname "$0")/.."
# The interpreter that holds torch: $PYTHON, else python3 (some GPU images have no plain `python`).
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out" || exit 1
smoke="${RUN_GPU_SMOKE:-0}"
exec > >(tee -a "$out/run_gpu.log") 2>&1
tee_pid=$!
start=$SECONDS

if [ "$smoke" = 1 ]; then
    export TRITON_INTERPRET=1
    budget="${RUN_BUDGET_S:-}"
else
    "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'run_gpu.sh needs a CUDA GPU')" || exit 1
    budget="${RUN_BUDGET_S:-500}"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv || true
fi
read -r name capability commit < <("$py" -c "
import torch
from benchmarks.harness import device_name, device_slug, git_commit
cuda = torch.cuda.is_available() and '$smoke' != 1
major, minor = torch.cuda.get_device_capability() if cuda else (9, 0)
print(device_slug(device_name(torch.device('cuda'))) if cuda else 'cpu-smoke', 10 * major + minor, git_commit())")
[ -n "${commit:-}" ] || { echo "run_gpu.sh: cannot import torch and benchmarks.harness with $py"; exit 1; }
[ "$commit" = unknown ] && echo "warning: no .git and no RELORA_BENCH_COMMIT: the results will name commit 'unknown'"
echo "run_gpu.sh: $name, sm_$capability, commit $commit, smoke=$smoke, budget ${budget:-none} s"

# Seconds left of the budget after keeping $1 for later parts, at least 1 (without a budget: an hour).
left() {
    [ -z "$budget" ] && { echo 3600; return; }
    local s=$((budget - (SECONDS - start) - ${1:-0}))
    echo $((s > 1 ? s : 1))
}
parts=()
# record NAME SECONDS RC: add the part to run_gpu.json, rewritten whole (a kill mid-write leaves the last one).
record() {
    parts+=("{\"part\": \"$1\", \"seconds\": $2, \"exit_code\": $3}")
    local IFS=,
    printf '{"device": "%s", "commit": "%s", "smoke": %s, "budget_s": %s, "parts": [%s]}\n' "$name" "$commit" \
        "$([ "$smoke" = 1 ] && echo true || echo false)" "${budget:-null}" "${parts[*]}" > "$out/run_gpu.json.partial"
    mv "$out/run_gpu.json.partial" "$out/run_gpu.json"
    echo "== part $1: $2 s, exit code $3 (run_gpu.sh at $((SECONDS - start)) s)"
}
# Reserves (s) kept for what follows a part: the tests' share, and the longest single sweep run (a torch.compile).
tests_reserve=140
run_reserve=60

# 1. Kernel builds.
t=$SECONDS
if [ "$smoke" = 1 ]; then builds=(--dtypes bf16 --ranks 16 --jobs 1); else builds=(--dtypes bf16 fp16 --ranks 16 64 128); fi
build_dir=$(mktemp -d)
timeout -k 10 "$(left $((tests_reserve + 2 * run_reserve)))" \
    env TRITON_INTERPRET=0 "$py" -m benchmarks.gpu_build --arch "$capability" "${builds[@]}" --out "$build_dir" > "$build_dir/log" 2>&1
build_rc=$?
tail -n 3 "$build_dir/log"
if ! cp "$build_dir/gpu_build.md" "$out/" 2>/dev/null; then
    # The kernels then compile as they are first launched; the file says why there is no table.
    { echo "# gpu_build: no table (exit code $build_rc; 124: stopped by its time limit)"; echo '```'
      tail -n 20 "$build_dir/log"; echo '```'; } > "$out/gpu_build.md"
fi
rm -rf "$build_dir"
record build $((SECONDS - t)) $build_rc

# 2. The headline comparison, then its report.
t=$SECONDS
json="$out/$name.json"
sweep=(--first --strict --out "$out" --name "$name")
[ "$smoke" = 1 ] && sweep+=(--smoke)
timeout -s INT -k 10 "$(left $((tests_reserve + 30)))" "$py" -m benchmarks.sweep "${sweep[@]}" \
    --ops lora_linear,merge_and_reinit,pretrain --budget-s "$(left $((tests_reserve + run_reserve + 30)))"
sweep_rc=$?
"$py" -m benchmarks.report "$json"
report_rc=$?
record sweep $((SECONDS - t)) $((sweep_rc || report_rc))

# 3. The GPU tests.
t=$SECONDS
test_options=()
# A test stuck for 120 s fails alone instead of taking the part's whole time: under xdist its worker ends (thread
# method, which also ends a test stuck in a kernel) and is replaced; in one process the signal method fails it.
if [ "$smoke" != 1 ] && "$py" -c "import xdist" 2>/dev/null; then
    test_options=(-n 8) method=thread
else
    method=signal
fi
[ "$smoke" != 1 ] && "$py" -c "import pytest_timeout" 2>/dev/null && test_options+=(--timeout 120 --timeout-method "$method")
RELORA_KERNELS_AUTOTUNE=0 timeout -s INT -k 20 "$(left 45)" \
    "$py" -m pytest tests/test_gpu.py -q -rfEs --durations=15 -p no:cacheprovider "${test_options[@]}" \
    > "$out/pytest_gpu.txt" 2>&1
tests_rc=$?
echo "pytest tests/test_gpu.py: $(tail -n 1 "$out/pytest_gpu.txt")"
record tests $((SECONDS - t)) $tests_rc

# 4. The rest of the sweep: the launch breakdown and whatever part 2 did not reach.
t=$SECONDS
resume=()
[ -f "$json" ] && resume=(--resume "$json")
timeout -s INT -k 10 "$(left 20)" "$py" -m benchmarks.sweep "${sweep[@]}" "${resume[@]}" --budget-s "$(left 40)"
rest_rc=$?
"$py" -m benchmarks.report "$json"
report_rc=$?
# The headline table last but for the check: the device tool's reply carries the end of the output.
[ "$smoke" != 1 ] && { "$py" -m benchmarks.report "$json" --headline || true; }
record rest $((SECONDS - t)) $((rest_rc || report_rc))

# 5. What comes back from the device tool (at most 8 files: a result file's half-written twin, left by a kill, would
#    push out a real one).
t=$SECONDS
rm -f "$out"/*.partial
"$py" -m benchmarks.harness --check-outputs "$out"
check_rc=$?
record check $((SECONDS - t)) $check_rc

echo "run_gpu.sh: $((SECONDS - start)) s; exit codes: build $build_rc, sweep $sweep_rc, tests $tests_rc," \
    "rest $rest_rc, check $check_rc"
rc=$((build_rc || sweep_rc || tests_rc || rest_rc || check_rc))
exec >&- 2>&-
wait "$tee_pid"  # run_gpu.log whole before the command returns
exit "$rc"

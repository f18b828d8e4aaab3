#!/usr/bin/env bash
# The first GPU run in one command: the evidence that matters most, most important first, into one folder.
#
#   bash benchmarks/run_gpu.sh [options] [DIR]          GPU: DIR (default benchmarks/results), ends within the budget
#   bash benchmarks/run_gpu.sh --smoke [options] DIR    CPU (CI): the same parts on tiny shapes through the Triton
#                                                       interpreter; nothing is timed
# Options (each also read from the environment variable named, for callers that pass only a command line's env):
#   --smoke             RUN_GPU_SMOKE=1: the CPU run above
#   --budget-s S        RUN_BUDGET_S (default 500; smoke: none): the parts end within S s plus ~15 s: the sweep
#                       starts no run, and the tests are stopped (SIGINT: pytest still writes its summary), where they
#                       would leave the later parts too little of it
#   --max-files N       RUN_MAX_FILES (default 8): the folder must end with at most N files (part 5 checks it; a GPU
#                       run writes 8)
#   --max-file-mib M    RUN_MAX_FILE_MIB (default 16): each file under M MiB
#   --skip P[,P]        RUN_SKIP: parts not run (recorded as skipped; their budget goes to the others), e.g. a
#                       second run that needs only the sweep and the tests: --skip host
# PYTHON: the interpreter that holds torch (default python3: some GPU images have no plain `python`). Where the
# checkout has no .git, RELORA_BENCH_COMMIT names the commit measured.
#
# Parts, each writing its files before the next starts (run_gpu.json is rewritten after every part with its seconds
# and exit code, so a run cut short says how far it got). A part is a function part_<name> run by run_part, which
# times it and records it; PARTS lists them in order and RESERVE_S the seconds each keeps from the budget for itself
# (what the parts before it may not use), so a new part is a function, an entry in PARTS and one in RESERVE_S.
#   build   the kernels for this GPU's architecture, only what the run launches (bf16 and fp16, r = 16, 64, 128,
#           with the FP8 launches from sm_89 on; smoke: bf16 r = 16 only, test_gpu_build.py builds the FP8 ones),
#           one process per (dtype, rank), into Triton's cache: the sweep's autotuner then times its tiles but
#           compiles none, and the tests find most of theirs built. gpu_build.md: their resources (a failed build is
#           a row with its error).
#   sweep   `python -m benchmarks.sweep --first` without the launch breakdown: floor / eager / compile and the fused
#           op on each engine and the automatic choice (fused_triton / fused_cublas / fused), then the same with an
#           FP8 frozen weight (fused_fp8_triton / fused_fp8_cublas / fused_fp8; skipped rows below sm_89), at the
#           headline (8192x4096x4096 r=16 bf16, p = 0.1 and 0), GPT-2 124M fc at 2048 tokens, Llama-8B MLP;
#           merge+reinit vs a measured copy, and an FP8 layer's restart (merge + both FP8 copies re-quantised); one
#           GPT-2 124M training step. <gpu>.json is rewritten after every run; then the report: <gpu>.md (with the
#           FP8 table: measured against eager and the bf16 op, beside the time model's prediction, and the FP8
#           goals), <gpu>_speedup.png, <gpu>_vs_floor.png.
#   tests   pytest tests/test_gpu.py and tests/test_fp8_gpu.py (bf16 and fp16 against float64, the FP8 op against
#           its float64 reference, poisoned outputs, a training step under
#           torch.cuda.set_sync_debug_mode("error")) with RELORA_KERNELS_AUTOTUNE=0: no test autotunes; on
#           pytest-xdist's 8 workers where it is installed (compiles run in parallel), each test limited to 120 s
#           where pytest-timeout is. Smoke: the same tests as a dry run on meta stand-ins (tests/helpers.py,
#           GPU_DRY_RUN). pytest_gpu.txt.
#   host    the host time of one call (python -m benchmarks.host_overhead: fwd+bwd of the fused op on both engines
#           against F.linear and eager LoRA, merge_and_reinit_, a GPT-2 step; real launches, this machine's CPU),
#           and tests/test_cuda_graphs.py: torch.compile(mode="reduce-overhead") captures the kernels in a CUDA
#           graph, equal to eager. Both print into run_gpu.log. Smoke: the benchmark on the stand-in sm_90 driver
#           (--quick, no GPT-2 step); the CUDA-graph test needs a GPU.
#   rest    the sweep resumed (--resume <gpu>.json): first the headline's launch breakdown (both engines'), then any
#           run the sweep part left; the report again.
#   check   the folder: at most --max-files files, each under --max-file-mib MiB, plain names; the JSON files
#           parse; the test summary is there.
# Files (8 on a GPU): <gpu>.json, <gpu>.md, <gpu>_speedup.png, <gpu>_vs_floor.png, pytest_gpu.txt, gpu_build.md,
# run_gpu.log (everything printed), run_gpu.json. <gpu> is the short device name (h200 for "NVIDIA H200").
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
smoke="${RUN_GPU_SMOKE:-0}"
budget="${RUN_BUDGET_S:-}"
max_files="${RUN_MAX_FILES:-8}"
max_file_mib="${RUN_MAX_FILE_MIB:-16}"
skip="${RUN_SKIP:-}"
out=""
usage="usage: bash benchmarks/run_gpu.sh [--smoke] [--budget-s S] [--max-files N] [--max-file-mib M] [--skip P[,P]] [DIR]"
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) smoke=1 ;;
        --budget-s) budget="${2:?$usage}"; shift ;;
        --max-files) max_files="${2:?$usage}"; shift ;;
        --max-file-mib) max_file_mib="${2:?$usage}"; shift ;;
        --skip) skip="${2:?$usage}"; shift ;;
        -h|--help) echo "$usage"; exit 0 ;;
        -*) echo "run_gpu.sh: unknown option $1; $usage" >&2; exit 2 ;;
        *) [ -z "$out" ] || { echo "run_gpu.sh: one folder only; $usage" >&2; exit 2; }; out="$1" ;;
    esac
    shift
done
[[ -z "$budget" || "$budget" =~ ^[1-9][0-9]*$ ]] || { echo "run_gpu.sh: --budget-s must be a whole number > 0" >&2; exit 2; }
[[ "$max_files" =~ ^[1-9][0-9]*$ ]] || { echo "run_gpu.sh: --max-files must be a whole number > 0" >&2; exit 2; }
[[ "$max_file_mib" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "run_gpu.sh: --max-file-mib must be a number > 0" >&2; exit 2; }

PARTS=(build sweep tests host rest check)
# Seconds of the budget each part keeps for itself: the tests' share, the resumed sweep's, the check's. The build
# and the sweep take what the later parts leave (the sweep also keeps room for its longest single run, a
# torch.compile, RUN_RESERVE_S).
declare -A RESERVE_S=([build]=0 [sweep]=0 [tests]=140 [host]=45 [rest]=25 [check]=5)
RUN_RESERVE_S=60
declare -A SKIPPED=()
for part in ${skip//,/ }; do
    [ -n "${RESERVE_S[$part]+set}" ] || { echo "run_gpu.sh: --skip: no part '$part' (parts: ${PARTS[*]})" >&2; exit 2; }
    [ "$part" = check ] && { echo "run_gpu.sh: --skip: the check always runs" >&2; exit 2; }
    SKIPPED[$part]=1 RESERVE_S[$part]=0
done

export PYTHONUNBUFFERED=1
out="${out:-benchmarks/results}"
mkdir -p "$out" || exit 1
exec > >(tee -a "$out/run_gpu.log") 2>&1
tee_pid=$!
start=$SECONDS

if [ "$smoke" = 1 ]; then
    export TRITON_INTERPRET=1
else
    "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'run_gpu.sh needs a CUDA GPU')" || exit 1
    budget="${budget:-500}"
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
echo "run_gpu.sh: $name, sm_$capability, commit $commit, smoke=$smoke, budget ${budget:-none} s," \
    "at most $max_files files of < $max_file_mib MiB"


# Seconds the parts after the current one keep (RESERVE_S), plus $1.
later() {
    local sum=${1:-0} after=0 part
    for part in "${PARTS[@]}"; do
        [ "$after" = 1 ] && sum=$((sum + RESERVE_S[$part]))
        [ "$part" = "$current" ] && after=1
    done
    echo "$sum"
}
# Seconds left of the budget after keeping $1 for later, at least 1 (without a budget: an hour).
left() {
    [ -z "$budget" ] && { echo 3600; return; }
    local s=$((budget - (SECONDS - start) - ${1:-0}))
    echo $((s > 1 ? s : 1))
}
records=() codes=()
# record NAME SECONDS RC: add the part to run_gpu.json, rewritten whole (a kill mid-write leaves the last one).
record() {
    records+=("{\"part\": \"$1\", \"seconds\": $2, \"exit_code\": $3}")
    codes+=("$1 $3")
    local IFS=,
    printf '{"device": "%s", "commit": "%s", "smoke": %s, "budget_s": %s, "parts": [%s]}\n' "$name" "$commit" \
        "$([ "$smoke" = 1 ] && echo true || echo false)" "${budget:-null}" "${records[*]}" > "$out/run_gpu.json.partial"
    mv "$out/run_gpu.json.partial" "$out/run_gpu.json"
    echo "== part $1: $2 s, exit code $3 (run_gpu.sh at $((SECONDS - start)) s)"
}
run_part() {
    current=$1
    local t=$SECONDS
    if [ -n "${SKIPPED[$1]+set}" ]; then
        echo "== part $1: skipped (--skip)"
        records+=("{\"part\": \"$1\", \"skipped\": true}")
        return 0
    fi
    "part_$1"
    record "$1" $((SECONDS - t)) $?
}

json="$out/$name.json"
sweep=(--first --strict --out "$out" --name "$name")
[ "$smoke" = 1 ] && sweep+=(--smoke)

part_build() {
    local builds build_dir rc
    if [ "$smoke" = 1 ]; then builds=(--dtypes bf16 --ranks 16 --jobs 1); else builds=(--dtypes bf16 fp16 --ranks 16 64 128 --jobs 6 --fp8); fi
    build_dir=$(mktemp -d)
    timeout -k 10 "$(left "$(later $((RUN_RESERVE_S + 30)))")" \
        env TRITON_INTERPRET=0 "$py" -m benchmarks.gpu_build --arch "$capability" "${builds[@]}" --out "$build_dir" \
        > "$build_dir/log" 2>&1
    rc=$?
    tail -n 3 "$build_dir/log"
    if ! cp "$build_dir/gpu_build.md" "$out/" 2>/dev/null; then
        # The kernels then compile as they are first launched; the file says why there is no table.
        { echo "# gpu_build: no table (exit code $rc; 124: stopped by its time limit)"; echo '```'
          tail -n 20 "$build_dir/log"; echo '```'; } > "$out/gpu_build.md"
    fi
    rm -rf "$build_dir"
    return $rc
}

part_sweep() {
    local rc
    timeout -s INT -k 10 "$(left "$(later)")" "$py" -m benchmarks.sweep "${sweep[@]}" \
        --ops lora_linear,merge_and_reinit,pretrain --budget-s "$(left "$(later $RUN_RESERVE_S)")"
    rc=$?
    "$py" -m benchmarks.report "$json" || return 1
    return $rc
}

part_tests() {
    local options=() method=signal rc
    # A test stuck for 120 s fails alone instead of taking the part's whole time: under xdist its worker ends
    # (thread method, which also ends a test stuck in a kernel) and is replaced; in one process the signal method.
    if [ "$smoke" = 1 ]; then
        export RELORA_TESTS_GPU_DRY_RUN=1
    else
        "$py" -c "import xdist" 2>/dev/null && options=(-n 8) method=thread
        "$py" -c "import pytest_timeout" 2>/dev/null && options+=(--timeout 120 --timeout-method "$method")
    fi
    RELORA_KERNELS_AUTOTUNE=0 timeout -s INT -k 20 "$(left "$(later 15)")" \
        "$py" -m pytest tests/test_gpu.py tests/test_fp8_gpu.py -q -rfEs --durations=15 -p no:cacheprovider \
        "${options[@]}" \
        > "$out/pytest_gpu.txt" 2>&1
    rc=$?
    unset RELORA_TESTS_GPU_DRY_RUN
    echo "pytest tests/test_gpu.py tests/test_fp8_gpu.py: $(tail -n 1 "$out/pytest_gpu.txt")"
    return $rc
}

part_host() {
    local rc=0 host_dir
    host_dir=$(mktemp -d)
    if [ "$smoke" = 1 ]; then
        TRITON_INTERPRET=0 "$py" -m benchmarks.host_overhead --quick --no-gpt2 --out "$host_dir" || rc=1
    else
        timeout -k 10 "$(left "$(later 20)")" "$py" -m benchmarks.host_overhead --out "$host_dir" || rc=1
        timeout -s INT -k 10 "$(left "$(later)")" "$py" -m pytest tests/test_cuda_graphs.py -q -rfEs \
            -p no:cacheprovider || rc=1
    fi
    rm -rf "$host_dir"
    return $rc
}

part_rest() {
    local resume=() rc rest_rc
    # The launch breakdown first: where the fused op's time over the floor goes is what the headline leaves open
    # (the first H200 run's rest part spent its budget on a torch.compile and never reached it).
    [ -f "$json" ] && resume=(--resume "$json")
    timeout -s INT -k 10 "$(left "$(later 15)")" "$py" -m benchmarks.sweep "${sweep[@]}" "${resume[@]}" \
        --ops lora_launches --budget-s "$(left "$(later 35)")"
    rc=$?
    [ -f "$json" ] && resume=(--resume "$json")
    timeout -s INT -k 10 "$(left "$(later 15)")" "$py" -m benchmarks.sweep "${sweep[@]}" "${resume[@]}" \
        --budget-s "$(left "$(later 35)")"
    rest_rc=$?
    [ "$rc" = 0 ] && rc=$rest_rc
    "$py" -m benchmarks.report "$json" || return 1
    # The headline table last but for the check: whoever reads the end of the output sees it.
    [ "$smoke" != 1 ] && { "$py" -m benchmarks.report "$json" --headline || true; }
    return $rc
}

part_check() {
    # A result file's half-written twin, left by a kill, would count against the files allowed.
    rm -f "$out"/*.partial
    "$py" -m benchmarks.harness --check-outputs "$out" --max-files "$max_files" --max-file-mib "$max_file_mib"
}

for part in "${PARTS[@]}"; do
    run_part "$part"
done

rc=0
for code in "${codes[@]}"; do
    [ "${code#* }" = 0 ] || rc=1
done
echo "run_gpu.sh: $((SECONDS - start)) s; exit codes: ${codes[*]}"
exec >&- 2>&-
wait "$tee_pid"  # run_gpu.log whole before the command returns
exit "$rc"

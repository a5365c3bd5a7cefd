#!/usr/bin/env bash
# Where the GPU path stands, on one CUDA GPU in under eight minutes (README, "GPUs"):
#
#     bash tests/gpu_check.sh OUT
#
# The plan, in seconds on one H100 or H200. GPU times are estimated from each phase's FLOPs (counted by
# tests/benchmark.py's flop counter) at the rates the H200 report of the GPU issues measured for DiT-B/2 at
# batch 128 (fm/plain: 16.7 TFLOP an update, 0.098 s in bf16, 0.168 s in fp32 with TF32), with IEEE fp32
# target passes at a fifth of the TF32 rate, plus about 10 s to start a process and 1-3 s to build each entry.
#   0-      the suite's CPU tests (-m "not cuda"), in the background on up to 12 cores; the GPU is not touched.
#   A 0-140 the step cost, with the GPU to itself: the six updates of tests/benchmark.py (DiT-B/2 at 32x32x3,
#           batch 128, blocks of 1 warm-up + 3 timed updates, R E1 R E2 R ...) under --bf16 with each target
#           policy (exact fp32, tf32, bf16) and in fp32 with TF32: about 1.2 PFLOP of updates a setting,
#           8-16 s of GPU, about 35 s with the builds; 4 settings.
#   B -330  the extras: the compiled FM step in bf16 (about 100 s, nearly all Inductor's compilation), sCD
#           with guidance at sCM's ImageNet-latents size, --batch-gpu 128 (DiT-B/2 at 32x32x4, fp32 with TF32,
#           40 TFLOP an update: its peak memory against 80 GB; about 25 s), and DiT-XL/2 at batch 64 in bf16
#           (fm, sCT, DE-CM, Direct: 44-133 TFLOP an update, about 2 PFLOP in all; about 55 s).
#   C -440  the CUDA part of the suite (-m cuda: tests/test_cuda.py and the cuda cases of test_precision.py and
#           test_accumulation.py; small kernels, about 90 s) and beside it every method's digits preset on the
#           GPU under the default policy (DIGITS_STEPS, default 1500; the chains nine at a time, launch-bound:
#           the longest, the FM teacher and DE-CM's student, about 60 s; stopped after DIGITS_BUDGET, default
#           100 s); then the oracle target error of each policy on the GPU (about 10 s).
#   D -460  the report: OUT/report.md (GPU, date, versions, every phase with its exit code and, where it failed,
#           the last line it wrote to stderr; the suite; the step-cost tables; the digits table; and per method
#           the decision table of the three target policies).
# Each phase has a time limit and the phases after DEADLINE (default 440 s) are skipped and reported as such,
# so the check ends within eight minutes even where an estimate is wrong. The exit code is 0 only if every
# phase that ran passed.
#
# GPU_CHECK_SMOKE=1 runs the same phases at toy sizes on the CPU (a few minutes on 2 cores): a check of this
# script.
set -u

# phase NAME LIMIT LOG CMD...: run CMD for at most LIMIT seconds, stdout appended to LOG, stderr to its own file
# OUT/NAME.err; one row of OUT/phases.md: the exit code, when it ended, and, if it failed, the last line of its
# stderr (a traceback's last line names the error). Phases that would start after DEADLINE are skipped.
phase() {
    local name=$1 limit=$2 log=$3 rc err
    err="$OUT/$(echo "$name" | tr -c 'A-Za-z0-9\n' '-').err"
    shift 3
    if [ "$(elapsed)" -ge "${DEADLINE:-440}" ]; then
        echo "| $name | skipped | $(elapsed) s | the time budget (DEADLINE=${DEADLINE:-440} s) |" >> "$OUT/phases.md"
        echo "skipped (the time budget): $name"
        return 0
    fi
    timeout "$limit" "$@" >> "$log" 2> "$err"
    rc=$?
    local why=""
    [ "$rc" = 124 ] && why="stopped after $limit s"
    [ "$rc" != 0 ] && [ "$rc" != 124 ] && why=$(grep -v '^\s*$' "$err" | tail -n 1 | tr '|' '/' | cut -c1-300)
    echo "| $name | $rc | $(elapsed) s | $why |" >> "$OUT/phases.md"
    echo "$name: exit $rc after $(elapsed) s"
    [ "$rc" = 0 ] || failures=$((failures + 1))
    return "$rc"
}
elapsed() { echo $(( $(date +%s) - start )); }
start=$(date +%s)
failures=0
[ "${BASH_SOURCE[0]}" != "$0" ] && return 0               # sourced (tests/test_infra.py): the functions only

OUT=${1:?usage: bash tests/gpu_check.sh OUT}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
CORES=$(python -c "import os; print(len(os.sched_getaffinity(0)))")   # before OMP_NUM_THREADS=1 (nproc heeds it)
# cuBLAS reads its workspace setting at a process's first cuBLAS call; --deterministic needs it fixed
export OMP_NUM_THREADS=1 PYTHONPATH=. CUBLAS_WORKSPACE_CONFIG=:4096:8
echo "| phase | exit | ended at | why it failed |" > "$OUT/phases.md"
echo "|---|---|---|---|" >> "$OUT/phases.md"

POLICIES=("--bf16" "--bf16 --target-precision tf32" "--bf16 --target-precision bf16" "")
NAMES=(bf16-exact bf16-tf32 bf16-bf16 fp32-tf32)
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then                       # the plumbing, on the CPU
    DEVICE=cpu; STEPS=${DIGITS_STEPS:-2}; BUDGET=${DIGITS_BUDGET:-200}; JOBS=2; SUITE_JOBS=2; DEADLINE=${DEADLINE:-1200}
    BENCH=(--model DiT-T/2 --size 8 --batch 4 --repeats 1 --warmup 1 --only fm/plain scm/diffusion scm/sct gcm/cu-fd-l2)
    DIGITS_EXTRA="--eval-samples 32 --batch-size 16 --n 4 --threads 1"
    CPU_TESTS=(tests/test_samplers.py)
    CUDA_TESTS=(tests/test_cuda.py)
    EXTRAS=("--compile --only fm/plain" "--only scm/diffusion scm/scd-cfg --channels 4")
    EXTRA_NAMES=("compiled FM" "sCD with guidance, 4 channels")
else
    DEVICE=cuda; STEPS=${DIGITS_STEPS:-1500}; BUDGET=${DIGITS_BUDGET:-100}; JOBS=9
    SUITE_JOBS=$(( CORES > 16 ? 12 : (CORES > 4 ? CORES - 4 : 1) ))
    BENCH=(--model DiT-B/2 --size 32 --batch 128 --repeats 3 --warmup 1
           --only fm/plain scm/diffusion scm/sct scm/scd gcm/cu-fd-l2 decm/cd+fm direct/default)
    DIGITS_EXTRA="--threads 1"
    CPU_TESTS=(-m "not cuda")
    CUDA_TESTS=(-m cuda)
    EXTRAS=("--bf16 --compile --warmup 2 --only fm/plain"
            "--only scm/diffusion scm/scd-cfg --model DiT-B/2 --size 32 --channels 4 --batch 128"
            "--bf16 --only fm/plain scm/diffusion scm/sct decm/cd+fm direct/default --model DiT-XL/2 --size 32 --channels 4 --batch 64")
    EXTRA_NAMES=("compiled FM, bf16" "sCD with guidance at the latents preset, --batch-gpu 128" "DiT-XL/2, bf16")
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "error: PyTorch sees no CUDA GPU here (GPU_CHECK_SMOKE=1 checks this script on a CPU)" >&2; exit 2; }
fi

# the suite's CPU tests, in the background
python -m pytest -q -p no:cacheprovider -rs -n "$SUITE_JOBS" --junitxml "$OUT/suite-cpu.xml" "${CPU_TESTS[@]}" \
    > "$OUT/suite-cpu.log" 2>&1 &
cpu_suite=$!

# A. the step cost of each policy, with the GPU to itself
for i in "${!POLICIES[@]}"; do
    # shellcheck disable=SC2086
    phase "step cost, ${NAMES[$i]}" 90 "$OUT/step-cost.log" python tests/benchmark.py --skip toy digits \
        --device "$DEVICE" "${BENCH[@]}" ${POLICIES[$i]} --json "$OUT/step-cost-${NAMES[$i]}.json"
done
# B. the extras
for i in "${!EXTRAS[@]}"; do
    # shellcheck disable=SC2086
    phase "step cost, ${EXTRA_NAMES[$i]}" 150 "$OUT/step-cost.log" python tests/benchmark.py --skip toy digits \
        --device "$DEVICE" "${BENCH[@]}" ${EXTRAS[$i]} --json "$OUT/step-cost-extra-$i.json"
done
# C. the CUDA part of the suite, the digits presets beside it, then the oracle errors of the policies
python tests/benchmark.py --skip step-cost toy --digits-steps "$STEPS" --digits-budget "$BUDGET" \
    --digits-jobs "$JOBS" --digits-flags "--device $DEVICE $DIGITS_EXTRA" --keep-runs "$OUT/runs" \
    --digits-data "$OUT/digits-data" --json "$OUT/digits.json" --figure "$OUT/digits-samples.png" \
    > "$OUT/digits.log" 2> "$OUT/digits.log.err" &
digits=$!
phase "the suite's CUDA part" 120 "$OUT/suite-cuda.log" python -m pytest -q -p no:cacheprovider -rs -n 4 \
    --junitxml "$OUT/suite-cuda.xml" "${CUDA_TESTS[@]}"
wait "$digits"
rc=$?
echo "| digits presets at $STEPS steps (stopped after $BUDGET s if not done) | $rc | $(elapsed) s | $( [ $rc != 0 ] && tail -n 1 "$OUT/digits.log.err" | tr '|' '/') |" >> "$OUT/phases.md"
[ "$rc" = 0 ] || failures=$((failures + 1))
phase "oracle target errors per policy" 60 "$OUT/policies.log" python tests/benchmark.py --policy-errors \
    --device "$DEVICE" --json "$OUT/policy-errors.json"
timeout $(( ${DEADLINE:-440} + 20 > $(elapsed) ? ${DEADLINE:-440} + 20 - $(elapsed) : 1 )) tail --pid="$cpu_suite" -f /dev/null
if kill -0 "$cpu_suite" 2> /dev/null; then
    kill "$cpu_suite"
    echo "| the suite's CPU tests | stopped | $(elapsed) s | still running at the time budget |" >> "$OUT/phases.md"
    failures=$((failures + 1))
else
    wait "$cpu_suite"
    rc=$?
    echo "| the suite's CPU tests | $rc | $(elapsed) s | $( [ $rc != 0 ] && grep -E '^(FAILED|ERROR)' "$OUT/suite-cpu.log" | head -n 3 | tr '\n|' '; ') |" >> "$OUT/phases.md"
    [ "$rc" = 0 ] || failures=$((failures + 1))
fi

# D. the report
{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "$(python -c "import torch; print(f'{torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU (smoke run)\"}, PyTorch {torch.__version__}, CUDA {torch.version.cuda}')"); $CORES CPU cores; $(elapsed) s in all."
    echo
    echo "## Phases"
    echo
    cat "$OUT/phases.md"
    echo
    echo "## The suite"
    echo
    echo '```'
    for log in "$OUT/suite-cpu.log" "$OUT/suite-cuda.log"; do
        grep -v "Warning\|warner(" "$log" 2> /dev/null | tail -n 12
    done
    echo '```'
    echo
    echo "## Step cost"
    echo
    grep -v "^$" "$OUT/step-cost.log" | sed 's/^Training-step cost/\nTraining-step cost/'
    echo
    echo "## Digits at $STEPS steps, default policy"
    echo
    sed -n '/^Sample quality on digits/,$p' "$OUT/digits.log"
    grep -h "error\|Error" "$OUT"/runs/logs/*.log 2>/dev/null | tail -n 20
    echo
    echo "## The target policies, per method"
    echo
    python tests/benchmark.py --policy-report "$OUT" 2>&1
} > "$OUT/report.md"
echo "wrote $OUT/report.md after $(elapsed) s; $failures phase(s) failed"
exit $(( failures != 0 ))

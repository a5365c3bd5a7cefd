#!/usr/bin/env bash
# Where the GPU path stands, on one CUDA GPU in about eight minutes (README, "GPUs"):
#
#     bash tests/gpu_check.sh OUT
#
# 1. At once, in the background: every method's digits preset on the GPU at DIGITS_STEPS steps (default 15000,
#    ten times the presets' 1500), the chains of runs nine at a time (tests/benchmark.py --digits-jobs): does
#    each method reach its digits goal, and do the papers' few-step claims show, when the budget is not the
#    limit? Runs still going after DIGITS_BUDGET seconds (default 300) are stopped and reported as such.
# 2. Meanwhile the whole suite with many workers (the CPU tests and the CUDA part: tests/test_cuda.py and the
#    cuda cases of test_precision.py and test_accumulation.py); junit XML and log in OUT.
# 3. Then, with the GPU to itself, the step-cost table (tests/benchmark.py: DiT-B/2 at 32x32, batch 128) in bf16
#    with the exact and the faster target policy, and in fp32 with TF32; and while the time lasts (EXTRA_UNTIL
#    seconds, default 420): the compiled FM step, sCM's latents preset at --batch-gpu 128, DiT-XL/2 rows.
# OUT gets report.md (the summary: GPU, date, versions, the suite's result, the tables), the logs, the
# benchmark's JSON, the digits samples (digits-samples.png, digits-samples-cfg.png) and the runs.
#
# GPU_CHECK_SMOKE=1 runs the same steps at toy sizes on the CPU (a few minutes): a check of this script.
set -u
OUT=${1:?usage: bash tests/gpu_check.sh OUT}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
start=$(date +%s)
CORES=$(python -c "import os; print(len(os.sched_getaffinity(0)))")   # before OMP_NUM_THREADS=1 (nproc heeds it)
export OMP_NUM_THREADS=1 PYTHONPATH=.
elapsed() { echo $(( $(date +%s) - start )); }

if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then                       # the plumbing, on the CPU
    DEVICE=cpu; STEPS=${DIGITS_STEPS:-2}; BUDGET=${DIGITS_BUDGET:-300}; JOBS=2
    BENCH=(--model DiT-T/2 --size 8 --batch 4 --repeats 1 --warmup 1 --only fm/plain scm/sct gcm/cu-fd-l2)
    DIGITS_EXTRA="--eval-samples 32 --batch-size 16 --n 4 --threads 1"
    TESTS=(tests/test_cuda.py tests/test_samplers.py -n 2)
    PRECISIONS=("--bf16" "--bf16 --target-precision bf16")
else
    DEVICE=cuda; STEPS=${DIGITS_STEPS:-15000}; BUDGET=${DIGITS_BUDGET:-300}; JOBS=9
    BENCH=(--model DiT-B/2 --size 32 --batch 128 --repeats 4 --warmup 2
           --only fm/plain scm/sct scm/scd gcm/cu-fd-l2 decm/cd+fm direct/default)
    DIGITS_EXTRA="--threads 1"
    TESTS=(-n "$(( CORES > 12 ? 12 : CORES ))")
    PRECISIONS=("--bf16" "--bf16 --target-precision bf16" "")
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "error: PyTorch sees no CUDA GPU here (GPU_CHECK_SMOKE=1 checks this script on a CPU)" >&2; exit 2; }
fi

# 1. the digits presets, in the background
python tests/benchmark.py --skip step-cost toy --digits-steps "$STEPS" --digits-budget "$BUDGET" \
    --digits-jobs "$JOBS" --digits-flags "--device $DEVICE $DIGITS_EXTRA" --keep-runs "$OUT/runs" \
    --digits-data "$OUT/digits-data" --json "$OUT/digits.json" --figure "$OUT/digits-samples.png" \
    > "$OUT/digits.log" 2>&1 &
digits=$!

# 2. the suite, meanwhile
python -m pytest -q -p no:cacheprovider -rs --junitxml "$OUT/suite.xml" "${TESTS[@]}" > "$OUT/suite.log" 2>&1
suite=$?
echo "suite done after $(elapsed) s (exit $suite)"
wait "$digits"
digits_rc=$?
echo "digits done after $(elapsed) s (exit $digits_rc)"

# 3. the step cost, with the GPU to itself
: > "$OUT/step-cost.log"
for i in "${!PRECISIONS[@]}"; do
    # shellcheck disable=SC2086
    python tests/benchmark.py --skip toy digits --device "$DEVICE" "${BENCH[@]}" ${PRECISIONS[$i]} \
        --json "$OUT/step-cost-$i.json" >> "$OUT/step-cost.log" 2> "$OUT/step-cost-$i.err"
    echo "step cost ${PRECISIONS[$i]:-(fp32, TF32)} done after $(elapsed) s (exit $?)"
done
# then, while the eight minutes last: the compiled flow-matching step (its share of the bf16 peak), sCM's
# ImageNet-latents preset at --batch-gpu 128 (guided sCD, DiT-B/2 on 32x32x4, fp32 with TF32: its peak memory
# against 80 GB), and the papers' largest model (DiT-XL/2 on 32x32x4 latents, batch 64, bf16)
EXTRAS=("--bf16 --compile --only fm/plain"
        "--only scm/scd-cfg --model DiT-B/2 --size 32 --channels 4 --batch 128"
        "--bf16 --only fm/plain scm/sct decm/cd+fm direct/default --model DiT-XL/2 --size 32 --channels 4 --batch 64")
[ "${GPU_CHECK_SMOKE:-0}" = 1 ] && EXTRAS=("--compile --only fm/plain" "--only scm/scd-cfg --channels 4")
for i in "${!EXTRAS[@]}"; do
    if [ "$(elapsed)" -gt "${EXTRA_UNTIL:-420}" ]; then
        echo "skipped (the time budget): ${EXTRAS[$i]}" | tee -a "$OUT/step-cost.log"
        continue
    fi
    # shellcheck disable=SC2086
    python tests/benchmark.py --skip toy digits --device "$DEVICE" "${BENCH[@]}" ${EXTRAS[$i]} \
        --json "$OUT/step-cost-extra-$i.json" >> "$OUT/step-cost.log" 2> "$OUT/step-cost-extra-$i.err"
    echo "step cost ${EXTRAS[$i]} done after $(elapsed) s (exit $?)"
done

# the report
{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "$(python -c "import torch; print(f'{torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU (smoke run)\"}, PyTorch {torch.__version__}, CUDA {torch.version.cuda}')"); $CORES CPU cores; $(elapsed) s in all."
    echo
    echo "## The suite"
    echo
    echo '```'
    grep -v "Warning\|warner(" "$OUT/suite.log" | tail -n 25
    echo '```'
    echo
    echo "## Step cost"
    echo
    grep -v "^$" "$OUT/step-cost.log" | sed 's/^Training-step cost/\nTraining-step cost/'
    echo
    echo "## Digits at $STEPS steps (exit $digits_rc$([ "$digits_rc" = 124 ] && echo ": stopped after $BUDGET s"))"
    echo
    sed -n '/^Sample quality on digits/,$p' "$OUT/digits.log"
    grep -h "error\|Error" "$OUT"/runs/logs/*.log 2>/dev/null | tail -n 20
} > "$OUT/report.md"
echo "wrote $OUT/report.md after $(elapsed) s"
exit $(( suite != 0 ))

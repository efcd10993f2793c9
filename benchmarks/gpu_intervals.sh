#!/usr/bin/env bash
# Issue 5's runs at a given interval on the GPU machine: each method in its own process against one baseline process
# of its model, within a time budget, the results packed into one archive (the machine returns only a few files):
#
#   SPECS="gpt2-124m:checkfreq:700 vit-b16:sync-deepspeed:632" TAG=gpu-search23 BUDGET_S=540 bash benchmarks/gpu_intervals.sh
#
# A spec is model:method:interval; a run holds three checkpoints (2 x interval + 20 iterations), its model's baseline
# BASELINE_STEPS iterations (400). Needs .whl/ (scripts/device_wheels.sh). Results: $OUT/intervals.tar.gz
# (results/*.json, matrix-<tag>.json, the call's log); publish by copying results/*.json to docs/benchmarks/results/
# and running python -m benchmarks.report.
set -uo pipefail
cd "$(dirname "$0")/.."
ARCHIVE=intervals.tar.gz BUDGET_S=${BUDGET_S:-540}
source benchmarks/gpu_call.sh
for spec in ${SPECS:?model:method:interval ...}; do
    IFS=: read -r model method every <<< "$spec"
    left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt "${MIN_RUN_S:-60}" ]; then echo "== skip $spec ($left s left)"; continue; fi
    echo "== $model $method every $every ($left s left)"
    # the matrix skips a run its estimate (start-up plus iterations at the rate seen so far) does not fit
    timeout $((left - 5)) $PY -m benchmarks.matrix --out "$WORK/results" --tag "${TAG:?a matrix tag}" --deadline "$DEADLINE" \
        --first-run-estimate "${FIRST_RUN_S:-60}" --timeout $((left - 10)) --models "$model" --methods "$method" \
        --every-n-steps "$every" --steps $((2 * every + 20)) --baseline-steps "${BASELINE_STEPS:-400}" \
        --warmup "${WARMUP:-5}" ${MATRIX_ARGS:-}
    pack
done
$PY - "$WORK/results" <<'PYEOF'
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/*.json")):
    d = json.load(open(path))
    if "method" in d:
        in_run = d.get("overhead_in_run")
        print(d["model"], d["method"], "every", d.get("every_n_steps"), d.get("status"), f"{d.get('overhead') or 0:.4f}x",
              f"in its run {in_run:.4f}x" if in_run is not None else "", "stall", d.get("stall_ms_median"), d.get("error") or "")
PYEOF
echo "== done in $(( $(date +%s) - START )) s"

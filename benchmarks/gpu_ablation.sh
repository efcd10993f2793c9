#!/usr/bin/env bash
# Paired engine ablations on the GPU machine, one model after another within a time budget, the results packed into
# one archive (the machine returns only a few files per call):
#
#   MODELS="gpt2-124m resnet50" VARIANTS=none,bubbles,bubbles+late ROUNDS=16 BUDGET_S=520 bash benchmarks/gpu_ablation.sh
#
# Needs .whl/ (scripts/device_wheels.sh). Results: $OUT/ablation.tar.gz (results/*.json, one log per model, the
# call's log); publish with python -m benchmarks.report after copying results/*.json to docs/benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
ARCHIVE=ablation.tar.gz BUDGET_S=${BUDGET_S:-520}
source benchmarks/gpu_call.sh
for model in ${MODELS:-gpt2-124m resnet50}; do
    left=$((DEADLINE - $(date +%s)))
    # a model's run takes 45-90 s on an H100 at 16 rounds of two policies
    if [ "$left" -lt "${MIN_RUN_S:-70}" ]; then echo "== skip $model ($left s left)"; continue; fi
    echo "== ablation $model ($left s left)"
    timeout $((left - 5)) $PY -m benchmarks.ablation --model "$model" --gpus "${GPUS:-1}" --rounds "${ROUNDS:-16}" \
        --variants "${VARIANTS:-none,bubbles}" ${ABLATION_ARGS:-} --out "$WORK/results" > "$WORK/$model.log" 2>&1
    echo "   exit $?"
    pack
done
$PY - "$WORK/results" <<'PYEOF'
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/ablation__*.json")):
    d = json.load(open(path))
    print(d["model"], d["variant"], f"{d['iter_ms_median']:.1f} ms", f"{d['overhead']:.4f}x", d.get("overhead_ci95"),
          "stall", d.get("stall_ms_median"), "behind", d.get("gpu_behind_share"))
PYEOF
echo "== done in $(( $(date +%s) - START )) s"

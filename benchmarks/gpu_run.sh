#!/usr/bin/env bash
# The benchmark run for the GPU machine (no network; torch, lightning, transformers, torchvision in its image):
# installs the wheels carried in .whl/ (deepspeed and its small dependencies; torchsnapshot with importlib-metadata,
# zipp, lazy-importer, aiofiles and nest-asyncio, which some images lack), then runs, by
# priority, as much as fits in BENCH_TOTAL_S seconds (default 540, i.e. a 10-minute window with room to spare):
#
#   1. issue 3: benchmarks.ablation (none, naive, eager, bubbles interleaved in one run) on GPT-2 124M and 355M,
#      one GPU; GPT-2 355M and 774M on 2 and 4 GPUs where present; restart times of oteacheck on 124M;
#   2. issue 5 on GPT-2 124M: sync-torch-save, sync-deepspeed, checkfreq, dcp-async, lightning-async, torchsnapshot
#      (every iteration, measuring stopped after BENCH_RUN_S seconds, so a multi-second save still fits);
#   3. restart times of the other methods on GPT-2 124M;
#   4. the other models (BERT-large QA, ViT-B/16, ResNet-50): paired ablations, none, oteacheck, the comparison;
#   5. GPT-2 355M comparison; 6. each method's shortest interval within 5%.
#
# Results: $OUT/results/*.json, a report in $OUT/benchmarks.md and $OUT/plots/, the log in $OUT/gpu_run.log
# (with BENCH_PACK=1, results and plots in one archive, $OUT/bench-out.tar.gz).
# To publish: copy $OUT/results/*.json to docs/benchmarks/results/ and run python -m benchmarks.report.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
TOTAL=${BENCH_TOTAL_S:-540}
DEADLINE=$((START + TOTAL))
RUN_S=${BENCH_RUN_S:-20}
OUT=${OUT:-$PWD/bench-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT/results"
exec > >(tee -a "$OUT/gpu_run.log") 2>&1

source benchmarks/gpu_env.sh

echo "== preflight"
$PY - <<'EOF'
import importlib, inspect, shutil
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU")
for name in ("lightning", "deepspeed", "transformers", "torchvision", "torchdata", "xxhash", "torchsnapshot", "matplotlib",
             "torchsnapshot.snapshot"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name} {getattr(mod, '__version__', '?')}")
    except Exception as err:
        print(f"  {name} NOT importable: {type(err).__name__}: {err}")
try:
    from oteacheck_lightning import OTeaCheckpointIO
    params = inspect.signature(OTeaCheckpointIO).parameters
    print("  OTeaCheckpointIO(schedule=, staging_mib=):", "yes" if {"schedule", "staging_mib"} <= set(params) else "NO (ablations will fail)")
except Exception as err:
    print("  oteacheck_lightning NOT importable:", err)
free = shutil.disk_usage("/dev/shm").free / 2**30
print(f"  /dev/shm free: {free:.1f} GiB")
EOF
GPUS=$($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)

TAG=gpu-$(date -u +%Y%m%d-%H%M%S)
matrix() {
    local left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 30 ]; then echo "== out of time, skipping: $*"; return; fi
    echo "== matrix ($left s left): $*"
    # BENCH_EXTRA_ARGS: e.g. "--smoke" to try this script's flow on a CPU machine
    $PY -m benchmarks.matrix --out "$OUT/results" --tag "$TAG" --deadline "$DEADLINE" --first-run-estimate 35 "$@" ${BENCH_EXTRA_ARGS:-}
}

ablation() {
    local left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 120 ]; then echo "== out of time, skipping ablation: $*"; return; fi
    echo "== ablation ($left s left): $*"
    timeout "$left" $PY -m benchmarks.ablation --out "$OUT/results" "$@"
}

# 1. issue 3: the engine and its ablations against no checkpointing, interleaved in one run per model (paired)
ablation --model gpt2-124m --gpus 1 --variants none,naive,eager,bubbles
ablation --model gpt2-355m --gpus 1 --variants none,naive,eager,bubbles
if [ "$GPUS" -ge 2 ]; then
    ablation --model gpt2-355m --gpus 2 --variants none,naive,bubbles
    ablation --model gpt2-774m --gpus 2 --variants none,naive,bubbles
fi
if [ "$GPUS" -ge 4 ]; then
    ablation --model gpt2-355m --gpus 4 --variants none,naive,bubbles
    ablation --model gpt2-774m --gpus 4 --variants none,naive,bubbles
fi
matrix --models gpt2-124m --methods none,oteacheck --recovery oteacheck
# 2. issue 5 on GPT-2 124M, cheapest and most informative first
matrix --models gpt2-124m --methods checkfreq,dcp-async,sync-deepspeed,sync-torch-save,lightning-async,torchsnapshot \
    --run-seconds "$RUN_S" --steps 40 --warmup 5
# 3. restart times of the other methods (reruns them with --recovery under a tag of their own)
matrix --models gpt2-124m --methods sync-deepspeed,checkfreq,dcp-async,sync-torch-save --steps 10 --warmup 3 \
    --run-seconds 10 --recovery all --no-baselines --tag "$TAG-recovery" --out "$OUT/results/recovery"
# 4. the other models: OTeaCheck against no checkpointing paired in one run (the engine's 2% target), then the
# matrix rows with the other methods
for model in resnet50 vit-b16 bert-large-qa; do
    ablation --model $model --gpus 1 --rounds 30 --variants none,naive,bubbles
done
# a warm-up long enough for the first snapshots of a multi-GB state (slots created and page-locked) to pass
for model in bert-large-qa vit-b16 resnet50; do
    matrix --models $model --methods none,oteacheck --steps 40 --warmup 12 --run-seconds "$RUN_S"
done
for model in bert-large-qa vit-b16 resnet50; do
    matrix --models $model --methods checkfreq,dcp-async,sync-deepspeed,sync-torch-save,lightning-async,torchsnapshot \
        --steps 40 --warmup 5 --run-seconds "$RUN_S"
done
# 5. GPT-2 355M comparison
matrix --models gpt2-355m --methods checkfreq,dcp-async,sync-deepspeed,sync-torch-save,lightning-async,torchsnapshot \
    --run-seconds "$RUN_S" --steps 40 --warmup 5
# 6. shortest interval within 5% (reuses the every-iteration results of this tag)
matrix --models gpt2-124m,gpt2-355m --methods oteacheck,checkfreq,dcp-async,sync-deepspeed,sync-torch-save,lightning-async,torchsnapshot \
    --search-5pct --run-seconds 40 --steps 40 --warmup 5

echo "== report"
$PY -m benchmarks.report --results "$OUT/results" "$OUT/results/recovery" --markdown "$OUT/benchmarks.md" --plots "$OUT/plots" || true
echo "== done in $(( $(date +%s) - START )) s; results in $OUT/results"
# BENCH_PACK=1: one archive instead of many files (a machine that sends back only a few files per call)
if [ "${BENCH_PACK:-0}" = 1 ]; then
    packed=()
    for name in results plots benchmarks.md; do [ -e "$OUT/$name" ] && packed+=("$name"); done
    # the loose files go only once the archive holds them
    if tar -C "$OUT" -czf "$OUT/bench-out.tar.gz" "${packed[@]}"; then
        rm -rf "$OUT/results" "$OUT/plots"
        echo "== packed ${packed[*]} into $OUT/bench-out.tar.gz"
    else
        echo "!! packing failed: results left in $OUT/results"
    fi
fi

# Sourced by the GPU machine's packed calls (gpu_ablation.sh, gpu_intervals.sh), from the repository root, with
# ARCHIVE (the archive's name) and BUDGET_S set: the call's deadline ($DEADLINE), a work folder ($WORK) packed into
# $OUT/$ARCHIVE by `pack` and on exit (the machine returns only a few files per call), the call's log, the wheels and
# environment (gpu_env.sh), and what software and host it ran on.
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
OUT=${OUT:-$PWD/bench-out}
WORK=$(mktemp -d)
PY=${PYTHON:-python3}
mkdir -p "$WORK/results" "$OUT"
exec > >(tee -a "$WORK/call.log") 2>&1
pack() { tar -C "$WORK" -czf "$OUT/$ARCHIVE" .; }
trap pack EXIT
source benchmarks/gpu_env.sh
export OTEACHECK_COMMIT=${OTEACHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
$PY -c 'import torch, deepspeed, lightning; print(torch.__version__, deepspeed.__version__, lightning.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
lscpu | grep -E "Model name|^CPU\(s\)"

# Sourced by the GPU machine's benchmark scripts (gpu_run.sh, and gpu_call.sh for the packed calls), from the
# repository root, with $PY set: installs the wheels carried in .whl/ (scripts/device_wheels.sh) into /tmp/site, puts
# them and the sources on PYTHONPATH, and moves the snapshot slots to disk where /dev/shm is too small.
echo "== installing wheels from .whl/ into /tmp/site"
$PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || echo "!! wheel install failed"
export PYTHONPATH=/tmp/site:$PWD/src:$PWD
export TOKENIZERS_PARALLELISM=false
SHM_FREE_GIB=$($PY -c 'import shutil; print(int(shutil.disk_usage("/dev/shm").free / 2**30))' 2>/dev/null || echo 0)
if [ "${SHM_FREE_GIB:-0}" -lt 20 ]; then
    # the snapshot slots of GPT-2 355M take about 3 x 4.3 GB; a container's /dev/shm is often 64 MB
    mkdir -p /tmp/bench-shm
    export BENCH_SHM_ROOT=/tmp/bench-shm
    echo "!! /dev/shm has only ${SHM_FREE_GIB} GiB free: snapshot slots go to $BENCH_SHM_ROOT (disk-backed; results say so)"
fi

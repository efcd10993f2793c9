#!/usr/bin/env bash
# Builds .whl/: the wheels a bare GPU machine (Python 3.12, torch, lightning, transformers, torchvision; no network)
# lacks for the benchmarks: deepspeed (built here, it ships only a source archive) and its small dependencies,
# torchdata, xxhash, and torchsnapshot with what it imports. benchmarks/gpu_run.sh and gpu_ablation.sh install them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
cd .whl
# binary wheels for the GPU machine's Python, whatever this machine runs
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    hjson pydantic annotated-types typing-inspection torchdata xxhash importlib_metadata zipp aiofiles nest-asyncio \
    torchsnapshot lazy-importer
# pydantic pins its core; fetch the version it names
core=$(unzip -p pydantic-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p' | head -1)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 "pydantic-core==$core"
$PY -m pip wheel -q --no-deps "deepspeed==${DEEPSPEED_VERSION:-0.19.8}" -w .
ls -1

#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the real HDFS tests and the 2-process kill/resume tests (tests/gpu skips
# itself without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# Creates .venv and installs the package with its test extras (CPU is enough: DeepSpeed runs on its CPU accelerator).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev,bench]'

#!/usr/bin/env bash
# The demo: a 2-process CPU training run with OTeaCheck is killed with SIGKILL and resumed with ckpt_path="last".
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
exec .venv/bin/python examples/demo_kill_and_resume.py "$@"

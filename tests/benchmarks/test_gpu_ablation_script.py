"""benchmarks/gpu_ablation.sh, the GPU machine's ablation call, run on CPU with the ablation's smoke model: it must
pack every model's results and logs into the one archive the machine sends back, also for a model it skips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def test_the_ablation_call_packs_results_and_logs_and_skips_what_its_budget_does_not_hold(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, MODELS="gpt2-124m", VARIANTS="none,bubbles",
               ROUNDS="1", ABLATION_ARGS="--smoke --warmup 4", BUDGET_S="200", OTEACHECK_MEMORY_DIR=str(tmp_path / "shm"))
    done = subprocess.run(["bash", "benchmarks/gpu_ablation.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with tarfile.open(tmp_path / "out" / "ablation.tar.gz") as archive:
        names = set(archive.getnames())
        results = [json.load(archive.extractfile(n)) for n in names if n.startswith("./results/ablation__")]
    assert {"./call.log", "./gpt2-124m.log"} <= names
    assert sorted(r["variant"] for r in results) == ["bubbles", "none"]
    assert all(r["versions"].get("oteacheck_commit") for r in results)
    assert "gpt2-124m bubbles" in done.stdout  # the summary printed at the end

    env.update(MODELS="gpt2-124m resnet50", BUDGET_S="60")  # less than a model's run: both are skipped
    done = subprocess.run(["bash", "benchmarks/gpu_ablation.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "== skip gpt2-124m" in done.stdout and "== skip resnet50" in done.stdout

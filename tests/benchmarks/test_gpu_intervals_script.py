"""benchmarks/gpu_intervals.sh, the GPU machine's call for issue 5's runs at an interval, run on CPU with the smoke
models: each method against a short baseline process of its model, everything packed into the one archive the
machine sends back, and a spec its budget does not hold skipped."""

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


def test_the_interval_call_runs_a_method_against_a_short_baseline_and_packs_the_results(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, TAG="t", BUDGET_S="240",
               SPECS="gpt2-124m:sync-torch-save:3", BASELINE_STEPS="6", WARMUP="1",
               MATRIX_ARGS="--smoke", OTEACHECK_MEMORY_DIR=str(tmp_path / "shm"))
    done = subprocess.run(["bash", "benchmarks/gpu_intervals.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with tarfile.open(tmp_path / "out" / "intervals.tar.gz") as archive:
        names = set(archive.getnames())
        results = {(d["method"], d["every_n_steps"]): d for d in
                   (json.load(archive.extractfile(n)) for n in names if n.startswith("./results/gpt2-124m__"))}
    assert "./call.log" in names and "./results/matrix-t.json" in names
    assert set(results) == {("none-deepspeed", 1), ("sync-torch-save", 3)}
    assert "--steps 6 " in results[("none-deepspeed", 1)]["command"]
    assert "--steps 26 " in results[("sync-torch-save", 3)]["command"]
    assert all(d["status"] == "ok" and d["tag"] == "t" and d["versions"].get("oteacheck_commit") for d in results.values())
    assert results[("sync-torch-save", 3)]["checkpoints"] >= 3
    assert "gpt2-124m sync-torch-save every 3 ok" in done.stdout  # the summary printed at the end

    env.update(SPECS="gpt2-124m:sync-deepspeed:5", BUDGET_S="30")  # less than a run needs: skipped
    done = subprocess.run(["bash", "benchmarks/gpu_intervals.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "== skip gpt2-124m:sync-deepspeed:5" in done.stdout

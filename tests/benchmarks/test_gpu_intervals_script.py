"""benchmarks/gpu_intervals.sh, the GPU machine's call for issue 5's runs at an interval, run on CPU as a dry run of
the matrix (the set-up and the archive it shares with gpu_ablation.sh are tested with real runs in
test_gpu_ablation_script.py): each spec becomes one matrix invocation with its interval, three checkpoints' worth
of iterations and a short baseline, and a spec its budget does not hold is skipped."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_each_spec_runs_its_method_at_its_interval_against_a_short_baseline(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, TAG="t", BUDGET_S="240",
               SPECS="gpt2-124m:sync-torch-save:3 vit-b16:checkfreq:700", BASELINE_STEPS="6",
               MATRIX_ARGS="--smoke --dry-run")
    done = subprocess.run(["bash", "benchmarks/gpu_intervals.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = [line for line in done.stdout.splitlines() if "benchmarks.run" in line]
    assert len(runs) == 4, done.stdout[-3000:]
    expected = [("gpt2-124m", "none-deepspeed", 1, 6), ("gpt2-124m", "sync-torch-save", 3, 26),
                ("vit-b16", "none-deepspeed", 1, 6), ("vit-b16", "checkfreq", 700, 1420)]
    for line, (model, method, every, steps) in zip(runs, expected):
        assert f"--model {model} --method {method} " in line
        assert f"--steps {steps} " in line and f"--every-n-steps {every} " in line and "--tag t " in line
    with tarfile.open(tmp_path / "out" / "intervals.tar.gz") as archive:
        assert "./call.log" in archive.getnames()

    env.update(BUDGET_S="30")  # less than a run needs: skipped
    done = subprocess.run(["bash", "benchmarks/gpu_intervals.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "== skip gpt2-124m:sync-torch-save:3" in done.stdout

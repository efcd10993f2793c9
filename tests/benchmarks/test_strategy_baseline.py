"""The two no-checkpointing baselines alternating in one process, on CPU (tiny model): every strategy of the
order trains, in order, and gets its iteration times; no timing assertions (two shared CPU cores measure nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def test_both_strategies_train_alternately_in_one_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "baseline.json"
    cmd = [sys.executable, "-m", "benchmarks.strategy_baseline", "--smoke", "--model", "gpt2-124m",
           "--order", "ds,ot,ds-async,ot-sync", "--steps", "6", "--warmup", "2", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["command"].startswith("python -m benchmarks.strategy_baseline")
    assert [r["strategy"] for r in result["rows"]] == ["ds", "ot", "ds-async", "ot-sync"]
    for row in result["rows"]:
        assert row["iterations"] == 6 - 2 - 1  # iterations between the batch starts after the warm-up
        assert 0 < row["iter_ms_p10"] <= row["iter_ms_median"] <= row["iter_ms_p90"]

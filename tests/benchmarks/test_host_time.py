"""The host-time tool on CPU: every training-thread and sealer piece is timed in a real run (no timing assertions)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def test_every_piece_of_a_snapshot_is_timed_per_iteration(tmp_path):
    out = tmp_path / "host.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "benchmarks.host_time", "--smoke", "--steps", "6", "--warmup", "3", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    rows = {r["piece"]: r for r in got["rows"]}
    # one capture, one dump, one preparation, one seal and one fence per iteration; several phase events
    for piece in ("capture", "collect", "acquire", "engine.start", "lightning-dump", "prepare", "seal", "store-rng", "to-json", "write", "fence"):
        assert piece in rows, f"{piece} was not timed: {sorted(rows)}"
        assert 0.5 <= rows[piece]["calls_per_iteration"] <= 1.5, rows[piece]
    assert rows["on-phase"]["calls_per_iteration"] >= 4
    assert "issue-window" not in rows  # CUDA only
    for r in rows.values():
        assert r["wall_ms_median"] > 0 and r["cpu_ms_median"] >= 0 and r["cpu_ms_per_iteration"] >= 0
        assert 0 <= r["self_cpu_ms_per_iteration"] <= r["cpu_ms_per_iteration"] + 1e-9
    # the capture calls timed pieces (collect, acquire, engine.start): its own time leaves theirs out
    nested = sum(rows[p]["cpu_ms_per_iteration"] for p in ("collect", "acquire", "engine.start"))
    capture = rows["capture"]
    assert capture["self_cpu_ms_per_iteration"] == pytest.approx(capture["cpu_ms_per_iteration"] - nested, abs=0.05)
    assert got["iteration_ms"] > 0 and got["command"].startswith("python -m benchmarks.host_time --smoke")
    assert "capture" in proc.stdout  # the table

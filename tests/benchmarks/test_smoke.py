"""The benchmark harness end to end on CPU: a smoke matrix (tiny models, a few iterations, real processes,
Lightning, DeepSpeed ZeRO-2 on its CPU accelerator), then the report. Checks that every result has its fields
with sane values; no timing assertions (two shared CPU cores measure nothing)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
FIELDS = ("card", "gpus", "model", "method", "every_n_steps", "iter_ms_median", "iter_ms_p90", "overhead",
          "stall_ms_median", "checkpoints_per_hour", "extra_gpu_mib", "host_rss_mib", "durable_s",
          "recovery_s_memory", "recovery_s_disk", "work_lost_steps", "versions", "command")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "benchmarks.matrix", "--smoke", "--models", "gpt2-124m",
           "--methods", "none,oteacheck,sync-torch-save", "--steps", "4", "--warmup", "1",
           "--persist-every-n-steps", "2", "--recovery", "oteacheck", "--out", str(out), "--budget-s", "170",
           "--tag", "smoke-test", "--no-baselines",  # saves a process: sync-torch-save falls back to `none`
           "--paired-block", "0"]  # against the baseline's process here; pairing has its own test
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {}
    for path in out.glob("*__n*.json"):
        data = json.loads(path.read_text())
        results[data["method"]] = data
    return out, results


def test_every_method_ran_with_its_baselines(smoke_results):
    out, results = smoke_results
    assert set(results) == {"none", "oteacheck", "sync-torch-save"}, (
        (out / "matrix-log.jsonl").read_text() if (out / "matrix-log.jsonl").exists() else "no log")
    for method, r in results.items():
        assert r["status"] == "ok", f"{method}: {r.get('error')}\n{r.get('log_tail', '')}"


def test_fields_are_present_and_sane(smoke_results):
    _, results = smoke_results
    for method, r in results.items():
        missing = [f for f in FIELDS if f not in r]
        assert not missing, f"{method} lacks {missing}"
        assert r["model"] == "gpt2-124m" and r["gpus"] == 1 and r["every_n_steps"] == 1 and r["smoke"] is True
        assert r["tag"] == "smoke-test"
        assert r["steps_measured"] == 4 and len(r["iter_ms"]) == 4
        assert all(t > 0 and math.isfinite(t) for t in r["iter_ms"])
        assert 0 < r["iter_ms_median"] <= r["iter_ms_p90"]
        assert r["overhead"] > 0 and r["overhead_median"] > 0
        assert r["host_rss_mib"] > 0
        # where the start-up went, cut at the child's marks: the pieces add up to the whole
        phases = r["start_phases_s"]
        assert set(phases) == {"python", "imports", "build", "fit"} and min(phases.values()) >= 0, phases
        assert sum(phases.values()) == pytest.approx(r["start_s"], abs=0.01)
        assert r["extra_gpu_mib"] is None  # CPU: no GPU memory to compare
        assert r["command"].startswith("python -m benchmarks.run ") and f"--method {method}" in r["command"]
        assert {"torch", "lightning", "deepspeed", "cuda", "python"} <= set(r["versions"])
        assert r["versions"]["deepspeed"] and r["versions"]["lightning"]
    assert results["none"]["overhead"] == pytest.approx(1.0)
    assert results["none"]["checkpoints"] == 0 and results["none"]["stall_ms_median"] is None
    assert results["oteacheck"]["baseline_method"] == "none"
    # its own baseline (Lightning's DeepSpeedStrategy) was not run: compared with `none`, and the result says so
    assert results["sync-torch-save"]["baseline_method"] == "none-deepspeed"
    assert any("compared with none" in n for n in results["sync-torch-save"]["notes"])


def test_checkpoint_metrics(smoke_results):
    _, results = smoke_results
    for method in ("oteacheck", "sync-torch-save"):
        r = results[method]
        assert r["checkpoints"] >= 3, method  # a checkpoint every measured iteration (the first may seal late)
        assert r["stall_ms_median"] is not None and r["stall_ms_median"] >= 0
        assert r["checkpoints_per_hour"] > 0
        assert r["durable_s"] is not None and r["durable_s"] >= 0, method
    assert results["sync-torch-save"]["recovery_s_disk"] is None  # not asked for in this matrix


def test_recovery_from_memory_and_disk(smoke_results):
    _, results = smoke_results
    r = results["oteacheck"]
    assert r["recovery_s_memory"] > 0 and r["recovery_s_disk"] > 0 and r["start_s"] > 0
    failed = r["failed_at_step"]
    memory, disk = r["recovered_step"]["memory"], r["recovered_step"]["disk"]
    assert memory["source"].startswith("memory:") and not disk["source"].startswith("memory:")
    # the snapshot of the last step was still unsealed when the process died
    assert failed - memory["step"] in (0, 1) and r["work_lost_steps"] == failed - memory["step"]
    assert disk["step"] <= memory["step"] and disk["step"] % 2 == 0
    assert r["work_lost_steps_disk"] == failed - disk["step"]


def test_report_renders_tables_and_plots(smoke_results, tmp_path):
    out, _ = smoke_results
    md, plots = tmp_path / "benchmarks.md", tmp_path / "benchmarks"
    env = _env()
    subprocess.run([sys.executable, "-m", "benchmarks.report", "--results", str(out), "--markdown", str(md),
                    "--plots", str(plots)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    assert "No measured numbers yet" in md.read_text()  # smoke results are never reported as measurements
    subprocess.run([sys.executable, "-m", "benchmarks.report", "--results", str(out), "--markdown", str(md),
                    "--plots", str(plots), "--include-smoke"], cwd=ROOT, env=env, check=True, capture_output=True,
                   timeout=120)
    text = md.read_text()
    assert "| gpt2-124m | 1 | `oteacheck` | 1 |" in text and "`sync-torch-save`" in text
    pytest.importorskip("matplotlib")
    assert (plots / "overhead.png").stat().st_size > 0 and (plots / "recovery.png").stat().st_size > 0


def test_a_tier_with_nothing_on_it_at_the_failure_is_not_a_recovery(tmp_path):
    # persisting every 1000 steps, nothing reached the disk before the simulated failure: the restart from disk is a
    # fresh start, and its time must not be reported as a recovery time
    cmd = [sys.executable, "-m", "benchmarks.run", "--smoke", "--model", "gpt2-124m", "--method", "oteacheck",
           "--steps", "3", "--warmup", "1", "--persist-every-n-steps", "1000", "--recovery", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("gpt2-124m__oteacheck__*.json")
    r = json.loads(path.read_text())
    assert r["recovery_s_memory"] > 0 and r["recovered_step"]["memory"]["step"] is not None
    assert r["recovered_step"]["disk"]["step"] is None and r["recovery_s_disk"] is None
    assert "work_lost_steps_disk" not in r
    assert any("recovery from disk not measured" in note for note in r["notes"])


def test_a_paired_run_alternates_snapshot_blocks_and_pairs_each_with_the_block_before(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.run", "--smoke", "--model", "gpt2-124m", "--method", "oteacheck",
           "--steps", "12", "--warmup", "1", "--persist-every-n-steps", "0", "--paired-block", "3", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("gpt2-124m__oteacheck__*.json")
    r = json.loads(path.read_text())
    assert r["status"] == "ok", r.get("error")
    # 12 measured iterations after the slots' warm-up: none, snapshot, none, snapshot blocks of 3
    assert r["paired"]["block"] == 3 and r["paired"]["pairs"] == 2 and len(r["overhead_pairs"]) == 2
    assert r["overhead_paired"] == pytest.approx(sorted(r["overhead_pairs"])[0] / 2 + sorted(r["overhead_pairs"])[1] / 2)
    low, high = r["overhead_ci95"]
    assert 0 < low <= r["overhead_paired"] <= high
    # snapshots only in the snapshot blocks: the gate turned them off in between
    assert 2 <= r["checkpoints"] <= 8
    assert r["iter_ms_median"] > 0 and r["paired_none_iter_ms_median"] > 0 and r["checkpoints_per_hour"] > 0


def test_pairing_a_method_it_cannot_pair_is_refused_with_what_to_change(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.run", "--smoke", "--model", "gpt2-124m", "--method", "sync-torch-save",
           "--steps", "12", "--paired-block", "3", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and "--paired-block is for the OTeaCheck methods" in proc.stderr


def test_a_run_killed_at_its_timeout_is_reported_as_timed_out_not_by_its_last_log_line(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.run", "--smoke", "--model", "gpt2-124m", "--method", "none",
           "--steps", "400", "--timeout", "3", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    (result,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert result["status"] == "error", proc.stdout[-2000:]
    assert result["error"].startswith("timed out after 3 s"), result["error"]

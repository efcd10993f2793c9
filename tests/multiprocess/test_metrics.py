"""The engine's metrics reach Lightning's loggers at the trainer's logging cadence, and the progress bar shows the
sealed step and the stall (a real single-process training run on CPU)."""

import csv
import json
import re

import pytest

from tests.support import harness

pytestmark = pytest.mark.multiprocess


def test_metrics_go_to_the_logger_every_log_every_n_steps_and_to_the_progress_bar(tmp_path):
    env = harness.environment(f"metrics-{tmp_path.name}", tmp_path / "shm")
    proc = harness.run(tmp_path / "root", tmp_path / "out", env, devices=1, max_steps=12, persist_every=4,
                       csv_log_every=3)
    with open(tmp_path / "out" / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("oteacheck/sealed_step")]
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 12]
    for r in rows:
        step = int(r["step"])
        # the snapshot of a step is sealed during the next iteration, and a step's capture (right before these
        # metrics) waits until at most one earlier snapshot is unsealed: the step before's, fenced in this iteration,
        # whose seal may still run on a busy machine. So the last sealed step is one or two behind
        assert step - 2 <= float(r["oteacheck/sealed_step"]) <= step - 1
        assert float(r["oteacheck/stall_ms"]) >= 0 and float(r["oteacheck/copy_gbps"]) >= 0
        assert float(r["oteacheck/skipped_snapshots"]) == 0
        # the calls that queued the copies, and the training thread's time in them
        assert float(r["oteacheck/issues"]) >= 1 and float(r["oteacheck/issue_ms"]) > 0
        assert any(k.startswith("oteacheck/mib_") and r[k] for k in r)  # bytes per phase
    # persisted every 4 steps: by step 12 the tier has written step 8 at least
    assert float(rows[-1]["oteacheck/tier0_persisted_step"]) >= 8
    shown = proc.stdout + proc.stderr  # the progress bar
    # TQDM writes "name=value", Rich "name: value"
    assert re.search(r"ckpt_step[=:] ?\d", shown) and re.search(r"stall_ms[=:] ?\d", shown)


def test_a_refused_persist_request_keeps_the_sealed_snapshot_and_training_goes_on(tmp_path):
    # the persister is told of each sealed snapshot after its seal; if that fails (injected: once, at step 4), the
    # snapshot stays the newest in memory, training goes on, and the next due step is persisted (before, the sealed
    # slot was abandoned and the run stopped)
    env = harness.environment(f"request-{tmp_path.name}", tmp_path / "shm")
    proc = harness.run(tmp_path / "root", tmp_path / "out", env, devices=1, max_steps=12, persist_every=4,
                       csv_log_every=3, fault="persist-request-fails:4")
    with open(tmp_path / "out" / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("oteacheck/sealed_step")]
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 12]
    assert [float(r["oteacheck/persist_request_errors"]) for r in rows] == [0, 1, 1, 1]
    assert float(rows[-1]["oteacheck/sealed_step"]) >= 11
    assert float(rows[-1]["oteacheck/tier0_persisted_step"]) >= 8
    assert "could not hand the snapshot of step 4 to the persister" in proc.stderr


def test_waiting_for_a_lagging_seal_is_counted_in_the_stall(tmp_path):
    # the sealer of step 5 stalls for 1.5 s (injected): the training thread waits for it before the gradient
    # collectives two iterations later; the wait is part of the stall of the snapshot that iteration ends with, and
    # of the running total
    env = harness.environment(f"seal-wait-{tmp_path.name}", tmp_path / "shm")
    harness.run(tmp_path / "root", tmp_path / "out", env, devices=1, max_steps=10, persist_every=0, csv_log_every=1,
                fault="seal-stalls:5:1.5")
    with open(tmp_path / "out" / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("oteacheck/sealed_step")]
    totals = {int(r["step"]): float(r["oteacheck/seal_wait_total_ms"]) for r in rows}
    assert totals[5] < 500 < 1000 < totals[10], totals
    for r in rows:
        parts = float(r["oteacheck/fence_ms"]) + float(r["oteacheck/capture_ms"]) + float(r["oteacheck/seal_wait_ms"])
        assert float(r["oteacheck/stall_ms"]) == pytest.approx(parts)
    # the snapshot that carries the wait, where a log caught it as the newest sealed (the logs are per step, seals
    # are not): step 7, as no other one waited
    assert all(float(r["oteacheck/seal_wait_ms"]) < 500 for r in rows if float(r["oteacheck/sealed_step"]) != 7)


def test_an_optimizer_that_never_announces_its_update_costs_three_snapshots_not_a_wrong_one(tmp_path):
    # the strategy believes the base optimizer is hooked, but no BEFORE_UPDATE comes (injected): the snapshots whose
    # copies may have run into the update are dropped, never sealed, and after three of them the fence goes back
    # to BEFORE_STEP; every snapshot sealed equals the state after its step
    env = harness.environment(f"no-update-{tmp_path.name}", tmp_path / "shm")
    proc = harness.run(tmp_path / "root", tmp_path / "out", env, devices=1, max_steps=12, persist_every=0,
                       check_snapshots=True, fault="update-hook-silent")
    assert "step pre-hook never ran" in proc.stderr
    check = json.loads((tmp_path / "out" / "snapshot-check-rank0.json").read_text())
    assert check["mismatched"] == 0 and check["fenced_at_update"] == 0
    assert check["missing"] == 3 and check["checked"] >= 6, check  # the ones after the three dropped are sealed


def test_updates_deepspeed_skips_at_the_start_keep_their_snapshots_and_the_late_fence(tmp_path):
    # DeepSpeed skips the first five updates as overflows (injected through its real overflow path), as fp16
    # training does while its loss scale settles: no BEFORE_UPDATE comes in them, but DeepSpeed counts them as
    # skipped, so the state did not change and their snapshots are good. Before that count was read, these steps
    # looked like a silent hook: snapshots were dropped, and after three the fence went back to BEFORE_STEP for the fit.
    env = harness.environment(f"overflow-{tmp_path.name}", tmp_path / "shm")
    proc = harness.run(tmp_path / "root", tmp_path / "out", env, devices=1, max_steps=12, persist_every=0,
                       check_snapshots=True, fault="first-updates-overflow:5")
    assert "step pre-hook never ran" not in proc.stderr
    check = json.loads((tmp_path / "out" / "snapshot-check-rank0.json").read_text())
    assert check["mismatched"] == 0 and check["missing"] == 0 and check["checked"] >= 10, check
    # the steps after the skipped ones are fenced at the update again
    assert check["fenced_at_update"] >= check["checked"] - 5, check

"""benchmarks.host_contention: its ratio arithmetic on made-up rows, and one real --smoke run on the CPU."""

from __future__ import annotations

import json

import pytest

from benchmarks import host_contention


def test_each_condition_is_compared_to_idle_in_the_same_round():
    rows = [
        {"round": 0, "work": "python", "condition": "idle", "wall_ms": 10.0},
        {"round": 0, "work": "python", "condition": "d2h", "wall_ms": 12.0},
        {"round": 0, "work": "memcpy", "condition": "idle", "wall_ms": 4.0},
        {"round": 0, "work": "memcpy", "condition": "d2h", "wall_ms": 6.0},
        {"round": 1, "work": "python", "condition": "idle", "wall_ms": 20.0},  # a slow round: its idle is slow too
        {"round": 1, "work": "python", "condition": "d2h", "wall_ms": 22.0},
        {"round": 2, "work": "python", "condition": "d2h", "wall_ms": 99.0},  # no idle in that round: left out
    ]
    out = host_contention.ratios_to_idle(rows, "wall_ms")
    assert out["python"]["d2h"]["ratios"] == [pytest.approx(1.2), pytest.approx(1.1)]
    assert out["python"]["d2h"]["median"] == pytest.approx(1.15)
    assert out["python"]["d2h"]["ci95"][0] >= 1.1 and out["python"]["d2h"]["ci95"][1] <= 1.2
    assert out["memcpy"]["d2h"] == {"ratios": [pytest.approx(1.5)], "median": pytest.approx(1.5), "ci95": None}
    assert "idle" not in out["python"]


def test_a_piece_its_copies_did_not_cover_is_timed_again_with_a_longer_queue_that_is_kept():
    work = host_contention.HostWork(None, memcpy_mib=1)
    work.python_n = 1000
    asked = []

    def under(condition, kind, factor):
        asked.append((condition, kind, factor))
        return lambda: condition == "idle" or factor >= 10  # copies queued for < 10x the work end before it

    factors = {}
    rows = host_contention.run_round([("idle", "python"), ("d2h", "python")], work, under, factors)
    assert [a[2] for a in asked] == [3.0, 3.0, 6.0, 12.0]
    assert [(r["condition"], r["covered"], r["retries"], r["queue_factor"]) for r in rows] == [
        ("idle", True, 0, 3.0), ("d2h", True, 2, 12.0)]
    asked.clear()
    host_contention.run_round([("d2h", "python")], work, under, factors)  # the next round starts where this one ended
    assert asked == [("d2h", "python", 12.0)]
    # a piece never covered is recorded as such, after the last retry, and the ratios leave it out
    never = host_contention.run_round([("d2d", "python")], work, lambda c, k, f: (lambda: False), factors)
    assert never[0]["covered"] is False and never[0]["retries"] == host_contention.MAX_RETRIES
    rows = [{"round": 0, "work": "python", "condition": "idle", "wall_ms": 10.0},
            {"round": 0, "work": "python", "condition": "d2d", "wall_ms": 11.0, "covered": False}]
    assert host_contention.ratios_to_idle(rows, "wall_ms") == {}


def test_smoke_run_times_every_work_under_every_condition_and_writes_a_result(tmp_path):
    result = host_contention.main(["--smoke", "--rounds", "3", "--work-ms", "5", "--out", str(tmp_path)])
    written = json.loads(next(tmp_path.glob("host_contention__*.json")).read_text())
    assert written["wall_ratio"] == json.loads(json.dumps(result["wall_ratio"]))
    # one warm-up round left out, then every (condition, work) once per round
    assert len(written["rows"]) == 3 * len(host_contention.SMOKE_CONDITIONS) * 2
    assert {(r["condition"], r["work"]) for r in written["rows"]} == {
        (c, w) for c in host_contention.SMOKE_CONDITIONS for w in ("python", "memcpy")}
    for work in ("python", "memcpy"):
        summary = written["wall_ratio"][work]["host-copy"]
        assert len(summary["ratios"]) == 3 and all(r > 0 for r in summary["ratios"])
        assert summary["ci95"][0] <= summary["median"] <= summary["ci95"][1]
    assert written["covered_fraction"] == 1.0
    assert written["command"].endswith("--smoke --rounds 3 --work-ms 5 --out " + str(tmp_path))


def test_the_report_shows_gpu_runs_and_leaves_out_smoke_runs(tmp_path):
    from benchmarks import report

    host_contention.main(["--smoke", "--rounds", "2", "--work-ms", "5", "--out", str(tmp_path)])
    assert report.load_contention([tmp_path]) == []  # a CPU smoke run measures nothing
    measured = {
        "kind": "host_contention", "smoke": False, "run": "20261206T020000Z", "card": "NVIDIA H200",
        "host_cpu": "Xeon", "cpus": 16, "rounds": 15, "command": "python -m benchmarks.host_contention --out r",
        "copy_gbps": {"d2h": 54.6, "d2d": 1500.0}, "covered_fraction": 1.0, "idle_ms_median": {"python": 40.2},
        "versions": {"torch": "2.11.0"},
        "wall_ratio": {"python": {"d2h": {"median": 1.25, "ci95": [1.2, 1.3]}, "d2d": {"median": 1.01, "ci95": None}}},
    }
    (tmp_path / "host_contention__g1__20261206T020000Z.json").write_text(json.dumps(measured))
    loaded = report.load_contention([tmp_path])
    assert [r["run"] for r in loaded] == ["20261206T020000Z"]
    text = "\n".join(report.contention_section(loaded))
    assert "| work | idle ms | `d2d` | `d2h` |" in text
    assert "| python | 40.2 | 1.010x | 1.250x [1.200, 1.300] |" in text
    assert "d2d 1500, d2h 55" in text and "torch 2.11.0" in text
    assert "lower bounds" in text  # this run predates the retries: its uncovered pieces were in the ratios
    measured.update(retries=4, run="20261206T030000Z")
    (tmp_path / "host_contention__g1__20261206T030000Z.json").write_text(json.dumps(measured))
    newer = "\n".join(report.contention_section(report.load_contention([tmp_path])[1:]))
    assert "4 pieces retried with longer queues" in newer and "lower bounds" not in newer

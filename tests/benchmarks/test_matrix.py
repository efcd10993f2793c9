"""The matrix's bookkeeping without training: ratios to the right baseline, and the search for the shortest
interval within 5% (runs replaced by recorded answers)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from benchmarks import matrix as matrix_mod
from benchmarks.run import result_name


def _result(out: Path, tag: str, method: str, every: int, mean: float, checkpoints: int, steps: int = 10) -> None:
    data = {"tag": tag, "model": "m", "method": method, "gpus": 1, "every_n_steps": every, "every_n_steps_requested": every,
            "status": "ok", "iter_ms_mean": mean, "iter_ms_median": mean, "steps_measured": steps,
            "checkpoints": checkpoints, "peak_gpu_mib": 1000.0 + (0 if method.startswith("none") else 64),
            "baseline_method": "none" if method in ("none", "oteacheck") else "none-deepspeed", "notes": []}
    (out / result_name("m", method, 1, every)).write_text(json.dumps(data))


def _matrix(out: Path, tag: str, budget: float | None = None) -> matrix_mod.Matrix:
    argv = ["--models", "m", "--methods", "sync-torch-save", "--out", str(out), "--tag", tag, "--steps", "10"]
    if budget is not None:
        argv += ["--budget-s", str(budget)]
    return matrix_mod.Matrix(matrix_mod.parser().parse_args(argv))


def test_ratios_use_the_baseline_of_the_same_strategy(tmp_path):
    _result(tmp_path, "t", "none", 1, 90.0, 0)
    _result(tmp_path, "t", "none-deepspeed", 1, 100.0, 0)
    _result(tmp_path, "t", "oteacheck", 1, 91.8, 10)
    _result(tmp_path, "t", "sync-torch-save", 1, 300.0, 10)
    other = tmp_path / "elsewhere"
    other.mkdir()
    _result(other, "other-tag", "none-deepspeed", 1, 1.0, 0)  # another matrix run: never a baseline here
    (tmp_path / "old-run.json").write_text((other / result_name("m", "none-deepspeed", 1, 1)).read_text())
    _matrix(tmp_path, "t").fill()
    got = {p.name.split("__")[1]: json.loads(p.read_text()) for p in tmp_path.glob("m__*.json")}
    assert got["oteacheck"]["overhead"] == pytest.approx(1.02)
    assert got["sync-torch-save"]["overhead"] == pytest.approx(3.0)
    assert got["sync-torch-save"]["cost_ms_per_checkpoint"] == pytest.approx(200.0)
    assert got["sync-torch-save"]["extra_gpu_mib"] == pytest.approx(64.0)


def test_a_paired_overhead_is_the_rows_overhead_and_the_other_process_ratio_is_kept(tmp_path):
    _result(tmp_path, "t", "none", 1, 90.0, 0)
    _result(tmp_path, "t", "oteacheck", 1, 108.0, 10)  # its process ran 20% slower than the baseline's
    path = tmp_path / result_name("m", "oteacheck", 1, 1)
    data = json.loads(path.read_text())
    data.update(overhead_paired=1.03, overhead_ci95=[1.01, 1.05], paired={"block": 3, "pairs": 20}, cost_ms_per_checkpoint=2.7)
    path.write_text(json.dumps(data))
    _matrix(tmp_path, "t").fill()
    got = json.loads(path.read_text())
    assert got["overhead"] == got["overhead_median"] == pytest.approx(1.03)
    assert got["overhead_separate"] == pytest.approx(1.2)
    assert got["cost_ms_per_checkpoint"] == pytest.approx(2.7)  # the paired one, not (108 - 90) ms


def test_a_paired_block_too_long_for_the_steps_fails_at_setup(tmp_path):
    argv = ["--models", "gpt2-124m", "--methods", "oteacheck", "--out", str(tmp_path), "--steps", "4", "--paired-block", "3"]
    with pytest.raises(SystemExit, match="paired-block 3 with --steps 4"):
        matrix_mod.Matrix(matrix_mod.parser().parse_args(argv)).plan()


def test_an_unknown_model_fails_at_setup_with_the_names_to_choose_from(tmp_path):
    # not once per run: each run would start a process (20 s on a GPU machine) before saying so
    argv = ["--models", "gpt2-124m,bert-large", "--methods", "oteacheck", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"unknown models \['bert-large'\]; choose from .*bert-large-qa"):
        matrix_mod.Matrix(matrix_mod.parser().parse_args(argv)).plan()


def test_search_runs_the_computed_interval_and_widens_it_once(tmp_path, monkeypatch):
    _result(tmp_path, "t", "none-deepspeed", 1, 100.0, 0)
    _result(tmp_path, "t", "sync-torch-save", 1, 300.0, 10)
    m = _matrix(tmp_path, "t")
    asked = []

    def fake_run(model, method, gpus, every, steps=None):
        asked.append((every, steps))
        # 200 ms per checkpoint, as measured; a little more in the longer run, so the first guess misses
        _result(tmp_path, "t", method, every, 100.0 + 240.0 / every, steps // every, steps)
        return json.loads((tmp_path / result_name(model, method, gpus, every)).read_text())

    monkeypatch.setattr(m, "run", fake_run)
    m.fill()
    m.search()
    assert asked[0] == (40, 120)  # 200 ms / (5% of 100 ms)
    assert asked[1][0] == 48  # 6% measured at 40: widened to 40 * 6 / 5
    assert len(asked) == 2


@pytest.mark.parametrize("cost_ms, second", [(100.0, 20), (160.0, None), (30.0, None)])
def test_search_narrows_once_where_the_run_used_little_of_the_budget(tmp_path, monkeypatch, cost_ms, second):
    # the every-iteration run said 200 ms a checkpoint (interval 40); the runs at an interval measure cost_ms
    _result(tmp_path, "t", "none-deepspeed", 1, 100.0, 0)
    _result(tmp_path, "t", "sync-torch-save", 1, 300.0, 10)
    m = _matrix(tmp_path, "t")
    asked = []

    def fake_run(model, method, gpus, every, steps=None):
        asked.append(every)
        _result(tmp_path, "t", method, every, 100.0 + cost_ms / every, steps // every, steps)
        return json.loads((tmp_path / result_name(model, method, gpus, every)).read_text())

    monkeypatch.setattr(m, "run", fake_run)
    m.fill()
    m.search()
    # 100 ms at 40 uses half the budget: once more at 20. 160 ms uses 80%: kept. 30 ms (0.75%) is within the
    # noise between processes: kept
    assert asked == [40] + ([second] if second else [])


def test_search_estimates_when_the_run_does_not_fit(tmp_path, monkeypatch):
    _result(tmp_path, "t", "none-deepspeed", 1, 100.0, 0)
    _result(tmp_path, "t", "sync-torch-save", 1, 300.0, 10)
    m = _matrix(tmp_path, "t", budget=1.0)
    monkeypatch.setattr(m, "run", lambda *a, **k: pytest.fail("no time for a run"))
    m.fill()
    time.sleep(0.01)
    m.search()
    est = json.loads((tmp_path / result_name("m", "sync-torch-save", 1, 40)).read_text())
    assert est["status"] == "estimated" and est["overhead"] == pytest.approx(1.05)
    assert est["iter_ms_median"] is None and "not measured" in est["notes"][0]


def test_oteacheck_runs_warm_up_past_the_creation_of_their_snapshot_slots():
    from benchmarks.run import effective_warmup, parser

    def warmup(*argv):
        return effective_warmup(parser().parse_args(["--model", "m", "--out", "o", *argv]))

    # 5 slots with a persist tier, each created at a snapshot: 6 snapshots and the first iteration, which takes none
    assert warmup("--method", "oteacheck", "--warmup", "5") == 7
    assert warmup("--method", "oteacheck", "--warmup", "5", "--persist-every-n-steps", "0") == 5
    assert warmup("--method", "oteacheck", "--warmup", "5", "--every-n-steps", "10") == 61
    assert warmup("--method", "oteacheck", "--warmup", "100") == 100
    # methods without slots keep the warm-up they were given
    assert warmup("--method", "none", "--warmup", "5") == 5
    assert warmup("--method", "sync-torch-save", "--warmup", "5") == 5


def test_a_slow_warm_up_is_cut_short_but_never_into_the_slots_creation():
    from types import SimpleNamespace

    from benchmarks.measure import IterationTimer

    def warmup_after(iterations, **kwargs):
        timer = IterationTimer(12, 40, max_seconds=1.0, **kwargs)
        timer.started -= 10.0  # the time slot is long spent: every warm-up iteration was slow
        for step in range(iterations):
            timer.on_train_batch_start(SimpleNamespace(global_step=step), None, None, step)
        return timer.warmup

    assert warmup_after(8) == 2  # cut at the earliest point allowed by default
    assert warmup_after(8, min_warmup=7) == 7  # e.g. OTeaCheck's slots: the first seven iterations stay warm-up
    assert warmup_after(5, min_warmup=7) == 12  # not reached yet: nothing cut


def test_baselines_run_their_own_number_of_iterations_and_the_budget_scales_with_iterations(tmp_path, capsys):
    argv = ["--models", "gpt2-124m", "--methods", "sync-torch-save", "--every-n-steps", "1400", "--steps", "2820",
            "--baseline-steps", "400", "--out", str(tmp_path), "--tag", "t", "--dry-run"]
    m = matrix_mod.Matrix(matrix_mod.parser().parse_args(argv))
    m.main()
    commands = [line for line in capsys.readouterr().out.splitlines() if "benchmarks.run" in line]
    assert len(commands) == 2
    assert "--method none-deepspeed" in commands[0] and "--steps 400 " in commands[0]
    assert "--method sync-torch-save" in commands[1] and "--steps 2820 " in commands[1]
    # a 400-iteration baseline took 105 s: 45 s of start-up, 0.15 s an iteration
    m.durations.append(("gpt2-124m", 105.0, 400))
    assert m.estimate("gpt2-124m", False, 2820) == pytest.approx(45 + 0.15 * 2820)
    assert m.estimate("gpt2-124m", False, 400) == pytest.approx(105.0)


def test_a_later_matrix_of_the_same_tag_and_folder_estimates_from_the_runs_logged_before(tmp_path):
    # benchmarks/gpu_intervals.sh runs one matrix per spec: the second knows the first one's runs
    log = tmp_path / "matrix-log.jsonl"
    log.write_text("\n".join(json.dumps(e) for e in (
        {"tag": "t", "model": "gpt2-355m", "method": "none-deepspeed", "status": "ok", "seconds": 85.0, "iterations": 100, "recovery": False},
        {"tag": "t", "model": "gpt2-355m", "method": "torchsnapshot", "status": "ok", "seconds": 200.0, "iterations": 722, "recovery": False},
        {"tag": "other", "model": "gpt2-355m", "method": "dcp-async", "status": "ok", "seconds": 9.0, "iterations": 700, "recovery": False},
        {"tag": "t", "model": "gpt2-355m", "method": "checkfreq", "status": "skipped", "reason": "time budget"},
    )) + '\n{"tag": "t", "model": "gpt2-355m", "meth')  # cut short by a timeout
    argv = ["--models", "gpt2-355m", "--methods", "dcp-async", "--out", str(tmp_path), "--tag", "t", "--first-run-estimate", "60"]
    m = matrix_mod.Matrix(matrix_mod.parser().parse_args(argv))
    assert m.durations == [("gpt2-355m", 85.0, 100), ("gpt2-355m", 200.0, 722)]
    assert m.estimate("gpt2-355m", False, 680) > 169  # the run that was started with 169 s left, and cut off

"""The cost of checkpoints at an interval against the run's own quiet iterations (benchmarks/in_run.py)."""

import pytest

from benchmarks.in_run import in_run_of, in_run_overhead


def run_at_interval(scale: float = 1.0) -> tuple[list[float], list[int]]:
    # 290 iterations of 10 ms from step 5 on; checkpoints taken at steps 100 and 200 cost 400 ms in the iteration
    # that takes them and 5 ms more in each of the 8 after it (background work)
    steps = list(range(5, 295))
    times = []
    for s in steps:
        t = 10.0
        if s + 1 in (100, 200):
            t += 400
        elif any(0 < s + 1 - c <= 8 for c in (100, 200)):
            t += 5
        times.append(t * scale)
    return times, steps


def test_the_cost_is_what_the_checkpoints_added_to_the_runs_own_quiet_iterations():
    times, steps = run_at_interval()
    ratio, quiet = in_run_overhead(times, steps, [100, 200], tail=10)
    assert quiet == 10.0
    assert ratio == pytest.approx((290 * 10 + 2 * (400 + 8 * 5)) / (290 * 10))


def test_a_process_that_runs_slower_throughout_costs_the_same():
    # what the ratio to a baseline in another process cannot tell apart from a checkpoint's cost
    assert in_run_overhead(*run_at_interval(1.12), [100, 200], 10)[0] == pytest.approx(
        in_run_overhead(*run_at_interval(), [100, 200], 10)[0])


def test_a_tail_shorter_than_the_background_work_misses_part_of_it():
    times, steps = run_at_interval()
    assert in_run_overhead(times, steps, [100, 200], tail=3)[0] < in_run_overhead(times, steps, [100, 200], tail=10)[0]


def test_a_result_without_recorded_checkpoint_steps_takes_the_multiples_of_its_interval():
    times, steps = run_at_interval()
    result = {"iter_ms": times, "every_n_steps": 100, "warmup": 5, "durable_s_p90": 0.0}
    got = in_run_of(result)
    assert got["quiet_tail"] == 10 + 0  # no durable write: 10 iterations after each checkpoint
    assert got["overhead_in_run"] == pytest.approx(in_run_overhead(times, steps, [100, 200], 10)[0])
    assert got["cost_ms_per_checkpoint_in_run"] == pytest.approx(400 + 8 * 5)
    assert in_run_of({**result, "checkpoint_steps": [100, 200], "measured_first_step": 5}) == got
    # an interval chosen as it went (CheckFreq's): only with its checkpoints' steps on record
    assert in_run_of({**result, "every_n_steps_history": [100]}) is None
    assert in_run_of({**result, "every_n_steps_history": [100], "checkpoint_steps": [100, 200]}) == got


def test_runs_without_quiet_iterations_have_no_in_run_cost():
    times, steps = run_at_interval()
    assert in_run_of({"iter_ms": times, "every_n_steps": 1, "warmup": 5}) is None  # every iteration
    assert in_run_of({"iter_ms": times, "every_n_steps": 100, "warmup": 5, "overhead_paired": 1.01}) is None
    assert in_run_overhead(times, steps, list(range(10, 295, 12)), tail=10) is None  # hardly a quiet one

"""The bubble scheduler: what it issues at which event, within which budget; the fence takes the rest."""

import pytest

from oteacheck_lightning.bubbles import Phase, PhaseEvent
from oteacheck_lightning.plan import Partition, Piece
from oteacheck_lightning.scheduler import BLOCK_PHASES, DEFAULT_HOST_SHARE, BubbleScheduler, SchedulePolicy


def parts(n, size):
    return [Partition(i, (Piece(i, 0, i * size, size),), packed=False) for i in range(n)]


def ev(phase, bucket=None):
    return PhaseEvent(phase, 1, 0, bucket)


ITERATION = [ev(Phase.ITERATION_START), ev(Phase.FORWARD_START), ev(Phase.FORWARD_END), ev(Phase.BUCKET_REDUCED, 0),
             ev(Phase.BUCKET_REDUCED, 1), ev(Phase.BACKWARD_END)]


def run_iteration(scheduler):
    issued = {}
    for e in ITERATION:
        got = scheduler.on_event(e)
        issued[(e.phase, e.bucket)] = got
    return issued, scheduler.fence()


@pytest.mark.parametrize("policy", ["naive", "eager"])
def test_naive_and_eager_issue_everything_at_iteration_start(policy):
    s = BubbleScheduler(policy)
    s.learn({(Phase.FORWARD_START, None): 10.0}, 1.0)  # budgets are ignored by these policies
    s.begin(parts(5, 10))
    issued, rest = run_iteration(s)
    assert len(issued[(Phase.ITERATION_START, None)]) == 5 and rest == []
    assert s.bytes_by_phase == {"iteration_start": 50}


def test_before_any_measurement_bubbles_leaves_everything_to_the_fence():
    s = BubbleScheduler()
    s.begin(parts(4, 10))
    issued, rest = run_iteration(s)
    assert all(got == [] for got in issued.values()) and len(rest) == 4


def test_a_window_counts_at_its_shortest_recent_length():
    # a window stretched by a wait for the copies it was given must not earn a larger budget
    s = BubbleScheduler(safety=1.0, history=3, last_takes_rest=False)
    for forward_ms in (100.0, 400.0, 400.0):
        s.learn({(Phase.FORWARD_START, None): forward_ms}, 1.0)
    s.begin(parts(10, 50))
    assert len(s.on_event(ev(Phase.FORWARD_START))) == 2  # 100 ms, not 400
    s.fence()
    s.begin([])  # an iteration with no copies in flight: its stretch is not a wait for them
    s.on_event(ev(Phase.FORWARD_START))
    s.fence()
    s.learn({(Phase.FORWARD_START, None): 400.0}, 1.0)  # the 100 ms measurement has left the history
    assert s.sync_windows == frozenset()
    s.begin(parts(10, 50))
    assert len(s.on_event(ev(Phase.FORWARD_START))) == 8


def test_budgets_follow_windows_and_bandwidth_and_the_rest_goes_to_the_fence():
    s = BubbleScheduler(safety=1.0, last_takes_rest=False)
    # 1 byte per ms; windows of 100 ms (forward) and 50 ms (each bucket gap)
    s.learn({(Phase.ITERATION_START, None): 0.0, (Phase.FORWARD_START, None): 100.0, (Phase.FORWARD_END, None): 0.0,
             (Phase.BUCKET_REDUCED, 0): 50.0, (Phase.BUCKET_REDUCED, 1): 50.0, (Phase.BACKWARD_END, None): 0.0}, 1.0)
    s.begin(parts(10, 30))
    issued, rest = run_iteration(s)
    assert len(issued[(Phase.FORWARD_START, None)]) == 3  # 90 of 100 bytes
    # the copy engine is free from 90 ms: the first bucket window (100..150 ms) takes 50 bytes -> one partition
    assert len(issued[(Phase.BUCKET_REDUCED, 0)]) == 1
    assert len(issued[(Phase.BUCKET_REDUCED, 1)]) == 1
    assert len(rest) == 5
    assert sum(s.bytes_by_phase.values()) == 300 and s.fence_bytes == 150
    assert not s.armed


def test_backlog_from_an_earlier_window_shrinks_the_next_budget():
    s = BubbleScheduler(safety=1.0)
    s.learn({(Phase.FORWARD_START, None): 100.0, (Phase.FORWARD_END, None): 40.0}, 1.0)
    s.begin([Partition(0, (Piece(0, 0, 0, 100),), False), Partition(1, (Piece(0, 0, 100, 40),), False)])
    assert len(s.on_event(ev(Phase.FORWARD_START))) == 1  # busy until 100 ms
    assert len(s.on_event(ev(Phase.FORWARD_END))) == 1  # 100..140 ms is free: 40 bytes fit


def test_avoid_allreduce_keeps_the_backward_windows_empty():
    s = BubbleScheduler(avoid_allreduce=True, safety=1.0)
    s.learn({(Phase.FORWARD_START, None): 10.0, (Phase.FORWARD_END, None): 1000.0, (Phase.BUCKET_REDUCED, 0): 1000.0,
             (Phase.BUCKET_REDUCED, 1): 1000.0, (Phase.BACKWARD_END, None): 1000.0}, 1.0)
    s.begin(parts(10, 5))
    issued, rest = run_iteration(s)
    assert len(issued[(Phase.FORWARD_START, None)]) == 2
    assert issued[(Phase.FORWARD_END, None)] == issued[(Phase.BUCKET_REDUCED, 0)] == issued[(Phase.BUCKET_REDUCED, 1)] == []
    assert len(issued[(Phase.BACKWARD_END, None)]) == 8 and rest == []


def test_one_snapshot_at_a_time():
    s = BubbleScheduler()
    s.begin(parts(1, 1))
    with pytest.raises(RuntimeError, match="fence"):
        s.begin(parts(1, 1))
    s.fence()
    assert s.on_event(ev(Phase.FORWARD_START)) == []  # nothing armed


def test_bad_policy_and_safety_are_refused():
    with pytest.raises(ValueError):
        BubbleScheduler("sometimes")
    with pytest.raises(ValueError):
        BubbleScheduler(SchedulePolicy.BUBBLES, safety=0)


def test_front_load_issues_early_what_the_later_windows_cannot_hold():
    windows = {(Phase.ITERATION_START, None): 0.0, (Phase.FORWARD_START, None): 100.0, (Phase.FORWARD_END, None): 50.0,
               (Phase.BUCKET_REDUCED, 0): 50.0, (Phase.BUCKET_REDUCED, 1): 0.0, (Phase.BACKWARD_END, None): 0.0}
    plain = BubbleScheduler(safety=1.0, last_takes_rest=False)
    eager_enough = BubbleScheduler(safety=1.0, front_load=True, last_takes_rest=False)
    for s in (plain, eager_enough):
        s.learn(windows, 1.0)  # 1 byte per ms: the iteration holds 200 bytes of copies, the snapshot is 300
        s.begin(parts(10, 30))
    issued, rest = run_iteration(plain)
    assert len(rest) == 5  # what the windows could not hold waits for the fence
    issued, rest = run_iteration(eager_enough)
    # the 100 bytes the windows will not hold go out at once, in the first window; the forward takes its own 100
    assert len(issued[(Phase.ITERATION_START, None)]) == 3 and len(issued[(Phase.FORWARD_START, None)]) == 3
    assert rest == [] and eager_enough.fence_bytes == 0
    assert sum(eager_enough.bytes_by_phase.values()) == 300


def test_front_load_changes_nothing_when_the_windows_hold_the_snapshot():
    windows = {(Phase.FORWARD_START, None): 100.0, (Phase.FORWARD_END, None): 100.0}
    results = []
    for front_load in (False, True):
        s = BubbleScheduler(safety=1.0, front_load=front_load)
        s.learn(windows, 1.0)
        s.begin(parts(5, 30))
        results.append((run_iteration(s), dict(s.bytes_by_phase)))
    assert results[0][1] == results[1][1] == {"forward_start": 90, "forward_end": 60}


FINE_WINDOWS = {(Phase.ITERATION_START, None): 10.0, (Phase.FORWARD_START, None): 10.0, (Phase.FORWARD_END, None): 10.0,
                (Phase.BUCKET_REDUCED, 0): 10.0, (Phase.BUCKET_REDUCED, 1): 10.0, (Phase.BACKWARD_END, None): 10.0}


def test_without_a_measured_issue_cost_every_window_issues():
    s = BubbleScheduler(safety=1.0)
    s.learn(FINE_WINDOWS, 1.0)
    s.begin(parts(6, 10))
    issued, rest = run_iteration(s)
    assert s.groups == 6 and all(len(got) == 1 for got in issued.values()) and rest == []


def test_windows_join_into_as_many_groups_as_the_host_share_pays_for():
    # a 60 ms iteration, 0.01 ms per issue call, 0.05% of the iteration for issuing: three issue points
    s = BubbleScheduler(safety=1.0, host_share=0.0005)
    s.learn(FINE_WINDOWS, 1.0, issue_ms=0.01)
    s.begin(parts(6, 10))
    issued, rest = run_iteration(s)
    assert s.groups == 3
    # each group of two 10 ms windows takes 20 bytes at its first window; the second window issues nothing
    assert [len(issued[(e.phase, e.bucket)]) for e in ITERATION] == [2, 0, 2, 0, 2, 0] and rest == []
    assert s.bytes_by_phase == {"iteration_start": 20, "forward_end": 20, "bucket_reduced": 20}


def test_an_expensive_issue_call_makes_one_group_of_the_whole_iteration():
    s = BubbleScheduler(safety=1.0)
    s.learn(FINE_WINDOWS, 1.0, issue_ms=5.0)  # more than the host share of the whole iteration
    s.begin(parts(6, 10))
    issued, rest = run_iteration(s)
    assert s.groups == 1 and len(issued[(Phase.ITERATION_START, None)]) == 6 and rest == []


def test_a_group_never_spans_a_window_closed_to_copies():
    s = BubbleScheduler(safety=1.0, avoid_allreduce=True, last_takes_rest=False)
    s.learn(FINE_WINDOWS, 1.0, issue_ms=5.0)
    s.begin(parts(6, 10))
    issued, rest = run_iteration(s)
    # ITERATION_START and FORWARD_START form one group; FORWARD_END and the bucket windows take nothing;
    # BACKWARD_END opens a group of its own
    assert s.groups == 2
    assert len(issued[(Phase.ITERATION_START, None)]) == 2 and issued[(Phase.FORWARD_START, None)] == []
    assert issued[(Phase.FORWARD_END, None)] == issued[(Phase.BUCKET_REDUCED, 0)] == issued[(Phase.BUCKET_REDUCED, 1)] == []
    assert len(issued[(Phase.BACKWARD_END, None)]) == 1 and len(rest) == 3


def test_host_share_none_keeps_one_issue_per_window_and_bad_shares_are_refused():
    s = BubbleScheduler(host_share=None)
    s.learn(FINE_WINDOWS, 1.0, issue_ms=5.0)
    s.begin(parts(6, 10))
    assert s.groups == 6
    for bad in (0, 1, 2.0):
        with pytest.raises(ValueError, match="host_share"):
            BubbleScheduler(host_share=bad)


def test_groups_are_derived_again_when_the_windows_or_the_issue_cost_change():
    s = BubbleScheduler(safety=1.0, host_share=0.0005)
    s.learn(FINE_WINDOWS, 1.0, issue_ms=0.01)
    s.begin(parts(6, 10))
    assert s.groups == 3
    s.fence()
    s.learn({}, 1.0, issue_ms=0.01)  # nothing new: the same groups
    s.begin(parts(6, 10))
    assert s.groups == 3
    s.fence()
    s.learn({}, 1.0, issue_ms=0.03)  # three times the cost per call: one issue point
    s.begin(parts(6, 10))
    assert s.groups == 1
    s.fence()
    s.learn({}, 1.0, issue_ms=0.01)
    s.learn({key: 3 * ms for key, ms in FINE_WINDOWS.items()}, 1.0)  # the shortest recent length stays
    s.begin(parts(6, 10))
    assert s.groups == 3
    s.fence()
    # the iteration got longer everywhere: 0.05% of it pays for more calls
    longer = {key: 4 * ms for key, ms in FINE_WINDOWS.items()}
    for _ in range(8):
        s.learn(longer, 1.0)
    s.begin(parts(6, 10))
    assert s.groups == 6


BLOCK_WINDOWS = {(Phase.ITERATION_START, None): 10.0, (Phase.FORWARD_BLOCK, 0): 10.0, (Phase.FORWARD_BLOCK, 1): 10.0,
                 (Phase.FORWARD_END, None): 10.0, (Phase.BACKWARD_END, None): 10.0}


@pytest.mark.parametrize("with_block_events", [True, False])
def test_windows_whose_events_are_left_out_still_count_in_the_budgets(with_block_events):
    # two issue points (a 30 ms group from ITERATION_START over both blocks, a 20 ms group from FORWARD_END); the
    # strategy leaves block events out when no group starts at a block, and the second budget must not change
    s = BubbleScheduler(safety=1.0, host_share=0.002, last_takes_rest=False)
    s.learn(BLOCK_WINDOWS, 1.0, issue_ms=0.05)
    s.begin(parts(6, 10))
    assert s.groups == 2 and s.issue_blocks == frozenset()
    events = [PhaseEvent(phase, 1, 0, block=key) if phase is Phase.FORWARD_BLOCK else ev(phase) for phase, key in BLOCK_WINDOWS]
    issued = [len(s.on_event(e)) for e in events if with_block_events or e.phase is not Phase.FORWARD_BLOCK]
    assert [n for n in issued if n] == [3, 2] and len(s.fence()) == 1


def test_an_issue_point_at_a_block_needs_the_block_events():
    s = BubbleScheduler(safety=1.0, host_share=None)  # one issue point per window
    s.learn(BLOCK_WINDOWS, 1.0, issue_ms=0.05)
    s.begin(parts(6, 10))
    assert s.groups == 5 and s.issue_blocks == {key for key in BLOCK_WINDOWS if key[0] in BLOCK_PHASES}
    # one issue point, opened late at the second block: its event is the only block event needed
    s = BubbleScheduler(safety=1.0, issue_late=True)
    s.learn(BLOCK_WINDOWS, 1.0, issue_ms=5.0)
    s.begin(parts(2, 10))  # 21 ms from the second block's window on
    assert s.groups == 1 and s.issue_blocks == {(Phase.FORWARD_BLOCK, 1)}


@pytest.mark.parametrize("groups", [1, 6])
def test_the_last_issue_point_takes_what_its_budget_does_not_hold(groups):
    # the fence could only issue the rest later: one issue point for the whole iteration (an expensive issue call)
    # issues the whole snapshot at once, and with one point per window the last window takes what is left
    s = BubbleScheduler(safety=1.0, host_share=None if groups == 6 else DEFAULT_HOST_SHARE)
    s.learn(FINE_WINDOWS, 1.0, issue_ms=5.0)  # 60 bytes of windows
    s.begin(parts(10, 10))
    issued, rest = run_iteration(s)
    assert s.groups == groups and rest == [] and s.fence_bytes == 0
    last = (Phase.ITERATION_START, None) if groups == 1 else (Phase.BACKWARD_END, None)
    assert len(issued[last]) == (10 if groups == 1 else 5)


def test_the_last_group_takes_nothing_closed_to_copies():
    s = BubbleScheduler(safety=1.0, avoid_allreduce=True, host_share=None)
    windows = {(Phase.FORWARD_START, None): 10.0, (Phase.FORWARD_END, None): 10.0, (Phase.BUCKET_REDUCED, 0): 10.0}
    s.learn(windows, 1.0)
    s.begin(parts(5, 10))
    got = [len(s.on_event(ev(phase, key))) for phase, key in windows]
    assert got == [5, 0, 0]  # FORWARD_START is the last window open to copies


def test_a_window_that_waited_for_the_copies_in_flight_is_closed_to_copies():
    # BERT's forward reads a GPU tensor (its attention mask) early: with the snapshot queued at iteration start it
    # waits behind every byte of it. The window that stretched with copies in flight takes none from then on, and
    # what is issued before it is only what is done by its start
    windows = {(Phase.ITERATION_START, None): 10.0, (Phase.FORWARD_START, None): 20.0, (Phase.FORWARD_END, None): 60.0,
               (Phase.BACKWARD_END, None): 10.0}
    s = BubbleScheduler(safety=1.0, host_share=None)
    s.learn(windows, 1.0)
    s.begin(parts(10, 10))
    issued = {e.phase: s.on_event(e) for e in (ev(p) for p, _ in windows)}
    s.fence()
    assert sum(p.span for p in issued[Phase.ITERATION_START]) == 10 and s.sync_windows == frozenset()
    # measured with copies in flight: forward waited for them (20 -> 50 ms with 20 ms of copies in it); forward's
    # end moved by less than half its copies' time, backward's end by half of the 10 ms still in flight but less than
    # 5% of the iteration (a host pause near the end of the copies looks like that)
    s.learn({**windows, (Phase.FORWARD_START, None): 50.0, (Phase.FORWARD_END, None): 65.0,
             (Phase.BACKWARD_END, None): 15.0}, 1.0)
    assert s.sync_windows == {(Phase.FORWARD_START, None)}
    s.begin(parts(10, 10))
    issued = {e.phase: s.on_event(e) for e in (ev(p) for p, _ in windows)}
    s.fence()
    assert issued[Phase.FORWARD_START] == []
    # done by forward's start: iteration start's 10 ms hold 10 bytes, nothing more
    assert sum(p.span for p in issued[Phase.ITERATION_START]) == 10
    assert sum(p.span for p in issued[Phase.FORWARD_END]) == 60
    # a pause with no copies in flight is not a wait for them
    s2 = BubbleScheduler(safety=1.0, host_share=None)
    s2.learn(windows, 1.0)
    s2.begin([])
    for p, _ in windows:
        s2.on_event(ev(p))
    s2.fence()
    s2.learn({**windows, (Phase.FORWARD_START, None): 50.0}, 1.0)
    assert s2.sync_windows == frozenset()


def test_issue_late_opens_at_the_latest_window_from_which_the_rest_of_the_iteration_holds_the_snapshot():
    # 20 bytes at 1 byte/ms need 21 ms: the last three 10 ms windows hold them, the first three take nothing
    s = BubbleScheduler(safety=1.0, issue_late=True)
    s.learn(FINE_WINDOWS, 1.0, issue_ms=5.0)  # one issue point
    s.begin(parts(2, 10))
    issued, rest = run_iteration(s)
    assert s.groups == 1 and rest == []
    assert [len(issued[(e.phase, e.bucket)]) for e in ITERATION] == [0, 0, 0, 2, 0, 0]
    assert s.bytes_by_phase == {"bucket_reduced": 20}


def test_issue_late_counts_only_windows_open_to_copies_and_changes_nothing_when_all_are_needed():
    # the all-reduce windows do not count: 10 bytes need 11 ms, FORWARD_START's and BACKWARD_END's windows (with
    # them, the last two bucket windows would do)
    s = BubbleScheduler(safety=1.0, issue_late=True, avoid_allreduce=True, host_share=None)
    s.learn(FINE_WINDOWS, 1.0, issue_ms=5.0)
    s.begin(parts(2, 5))
    issued, rest = run_iteration(s)
    assert [len(issued[(e.phase, e.bucket)]) for e in ITERATION] == [0, 2, 0, 0, 0, 0] and rest == []
    # a snapshot larger than the iteration's windows opens at the first window, as without issue_late
    for late in (True, False):
        s = BubbleScheduler(safety=1.0, issue_late=late)
        s.learn(FINE_WINDOWS, 1.0, issue_ms=5.0)
        s.begin(parts(10, 10))
        issued, rest = run_iteration(s)
        assert len(issued[(Phase.ITERATION_START, None)]) == 10 and rest == []


def test_issue_late_follows_the_snapshot_size_and_the_bandwidth():
    s = BubbleScheduler(safety=0.5, issue_late=True)
    s.learn(FINE_WINDOWS, 2.0, issue_ms=5.0)  # 1 byte per ms with the safety factor
    s.begin(parts(1, 5))  # 6 ms: the last window
    issued, _ = run_iteration(s)
    assert len(issued[(Phase.BACKWARD_END, None)]) == 1
    s.begin(parts(4, 10))  # 41 ms: from FORWARD_START on
    issued, _ = run_iteration(s)
    assert len(issued[(Phase.FORWARD_START, None)]) == 4

"""The snapshot engine on its CPU path (worker thread): the same plan and scheduler as on a GPU, real copies."""

import contextlib
import time

import pytest
import torch

from oteacheck_lightning.bubbles import Phase, PhaseEvent
from oteacheck_lightning.engine import RETIME_EVERY, SnapshotEngine
from oteacheck_lightning.format import load_tensors, plan_layout
from oteacheck_lightning.plan import MiB

ITERATION = [Phase.ITERATION_START, Phase.FORWARD_START, Phase.FORWARD_END, Phase.BACKWARD_END]


def state(seed):
    g = torch.Generator().manual_seed(seed)
    return [
        ("fp32/0", torch.randn(700_000, generator=g)),
        ("optim/fp32/0/exp_avg", torch.randn(700_000, generator=g)),
        ("frozen/emb", torch.randn(33, 7, generator=g)),
        ("buffer/bn.running_mean", torch.randn(16, generator=g)),
        ("state/loops", torch.arange(5)),
    ]


@contextlib.contextmanager
def cpu_engine(policy="bubbles", seed=0, **options):
    """A CPU engine (1 MiB ring) and the tensors of ``state(seed)`` laid out: ``(engine, named, records, size)``."""
    engine = SnapshotEngine(torch.device("cpu"), policy, staging_bytes=1 * MiB, **options)
    named = state(seed)
    records, size = plan_layout(named)
    try:
        yield engine, named, records, size
    finally:
        engine.close()


def start(engine, buffer, records, named, boundary=None):
    """Begins a snapshot of ``named`` into ``buffer`` (no boundary tensors unless given)."""
    engine.start(buffer, records, [t for _, t in named], boundary or [False] * len(named))


@pytest.mark.parametrize("policy", ["bubbles", "eager", "naive"])
def test_snapshot_equals_the_state_at_the_step_boundary_while_training_goes_on(policy):
    with cpu_engine(policy, seed=0, bucket_elements=100_000) as (engine, named, records, size):
        for step in range(3):  # later steps run with learned budgets
            expected = {n: t.clone() for n, t in named}
            buffer = torch.zeros(size, dtype=torch.uint8)
            start(engine, buffer, records, named, [n.startswith(("buffer/", "state/")) for n, _ in named])
            # the next forward pass changes the buffers and the small state right away
            named[3][1].add_(1.0)
            named[4][1].mul_(2)
            for phase in ITERATION:
                engine.on_event(PhaseEvent(phase, step + 1, 0))
            ticket = engine.fence()
            ticket.wait()
            assert ticket.done()
            # the optimizer step after the fence changes everything else
            for _, t in named[:3]:
                t.mul_(0.5)
            snapshot = load_tensors(type("M", (), {"tensors": records})(), buffer)
            for n, t in expected.items():
                assert torch.equal(snapshot[n], t), f"{n} of step {step} is not the state after that step"
            stats = engine.stats
            # the accounting adds up: every planned byte went out in some phase or at the fence
            assert sum(stats.bytes_by_phase.values()) == stats.planned_bytes
            assert stats.fence_bytes == stats.bytes_by_phase.get("before_step", 0)
            assert stats.boundary_bytes == records[3].nbytes + records[4].nbytes
            assert ticket.stall_ms() >= 0


def test_a_failing_copy_surfaces_at_the_fence():
    with cpu_engine(seed=1) as (engine, named, records, size):
        start(engine, torch.zeros(size // 2, dtype=torch.uint8), records, named)
        with pytest.raises(RuntimeError, match="copying a snapshot failed"):
            engine.fence()


def test_coalesce_joins_only_continuing_direct_copies():
    from oteacheck_lightning.copier import coalesce
    from oteacheck_lightning.plan import Partition, Piece

    parts = [Partition(0, (Piece(0, 0, 100, 10),), False), Partition(1, (Piece(0, 10, 110, 10),), False),
             Partition(2, (Piece(1, 0, 120, 10),), False),  # another tensor
             Partition(3, (Piece(2, 0, 130, 4), Piece(3, 0, 134, 4)), True),  # packed: goes through the ring
             Partition(4, (Piece(1, 20, 140, 10),), False)]  # a gap in the source
    joined = coalesce(parts)
    assert [p.pieces for p in joined] == [(Piece(0, 0, 100, 20),), parts[2].pieces, parts[3].pieces, parts[4].pieces]
    assert sum(p.nbytes for p in joined) == sum(p.nbytes for p in parts)


def test_policy_switches_between_snapshots_only_and_block_windows_can_be_ignored():
    with cpu_engine(seed=1) as (engine, named, records, size):
        engine.set_policy("eager")
        engine.pace_by_blocks = False
        start(engine, torch.zeros(size, dtype=torch.uint8), records, named)
        with pytest.raises(RuntimeError, match="between fence and start"):
            engine.set_policy("naive")
        engine.on_event(PhaseEvent(Phase.FORWARD_BLOCK, 1, 0, block=0))  # ignored: no window, nothing issued
        assert engine.scheduler.bytes_by_phase == {}
        engine.on_event(PhaseEvent(Phase.ITERATION_START, 1, 0))
        assert engine.scheduler.bytes_by_phase == {"iteration_start": engine.stats.planned_bytes}
        engine.fence().wait()
        engine.set_policy("naive")
        assert engine.policy.value == engine.scheduler.policy.value == "naive"


@pytest.mark.parametrize("policy", ["bubbles", "eager", "naive"])
def test_issue_calls_are_counted_and_timed_and_only_bubbles_times_windows(policy):
    with cpu_engine(policy, seed=2, bucket_elements=100_000) as (engine, named, records, size):
        marked = []
        mark = engine.copier.mark
        engine.copier.mark = lambda key: (marked.append(key), mark(key))
        for step in range(RETIME_EVERY + 2):
            marked.clear()
            start(engine, torch.zeros(size, dtype=torch.uint8), records, named)
            for phase in ITERATION:
                engine.on_event(PhaseEvent(phase, step + 1, 0))
            engine.fence().wait()
            s = engine.stats
            # one call per issue point that got partitions, plus the fence's if it had any left
            issue_points = sum(1 for phase, nbytes in s.bytes_by_phase.items() if nbytes)
            assert s.issues == issue_points >= 1 and s.issue_ms > 0
            if policy != "bubbles":
                assert marked == []
            elif step % RETIME_EVERY == 0:  # nothing measured yet, or time to measure again: every window is timed
                assert len(marked) == len(ITERATION)
            else:
                # windows timed, budgets known: only the issue points are marked (their marks gate the copies)
                assert engine.scheduler.has_budgets and engine._issue_cost > 0 and s.groups >= 1
                in_windows = sum(1 for phase in s.bytes_by_phase if phase != "before_step")
                assert len(marked) == in_windows


def test_boundary_views_are_made_once_per_slot_and_dropped_before_it_is_unmapped():
    with cpu_engine("eager", seed=3) as (engine, named, records, size):
        boundary = [n.startswith(("buffer/", "state/")) for n, _ in named]
        slots = [torch.zeros(size, dtype=torch.uint8) for _ in range(2)]
        for step in range(4):  # two snapshots into each of two slots
            buffer = slots[step % 2]
            start(engine, buffer, records, named, boundary)
            engine.on_event(PhaseEvent(Phase.ITERATION_START, step + 1, 0))
            engine.fence().wait()
            snapshot = load_tensors(type("M", (), {"tensors": records})(), buffer)
            assert all(torch.equal(snapshot[n], t) for n, t in named)
            named[3][1].add_(1.0)  # the buffer changes between snapshots: each one holds its own value
        views = {ptr: entry[1] for ptr, entry in engine._boundary_views.items()}
        assert set(views) == {s.data_ptr() for s in slots}
        start(engine, slots[0], records, named, boundary)
        assert engine._boundary_views[slots[0].data_ptr()][1] is views[slots[0].data_ptr()]  # reused, not remade
        engine.fence().wait()
        # a different layout (a buffer of another shape) gets views of its own
        named[3] = ("buffer/bn.running_mean", torch.randn(4, 8))
        records2, size2 = plan_layout(named)
        assert size2 <= size
        start(engine, slots[0], records2, named, boundary)
        assert engine._boundary_views[slots[0].data_ptr()][1] is not views[slots[0].data_ptr()]
        engine.fence().wait()
        engine.forget(slots[0])
        assert set(engine._boundary_views) == {slots[1].data_ptr()}


def test_switching_policies_plans_again_only_when_the_plan_kind_changes():
    # a plan costs milliseconds on a large model: the ablation switches policies every few iterations, and
    # planning again at every switch (or every set_policy call) was counted as the engine's cost
    with cpu_engine(seed=4, bucket_elements=100_000) as (engine, named, records, _):
        ahead = [0, 1, 2]
        bucket_plan = engine.plan(records, ahead)
        engine.set_policy("bubbles")
        assert engine.plan(records, ahead) is bucket_plan
        engine.set_policy("eager")  # the same bucket partitions
        assert engine.plan(records, ahead) is bucket_plan
        engine.set_policy("naive")  # one partition per tensor
        per_tensor = engine.plan(records, ahead)
        assert per_tensor is not bucket_plan and len(per_tensor) == len(ahead)
        engine.set_policy("bubbles")
        again = engine.plan(records, ahead)
        assert again == bucket_plan


def test_measured_windows_are_handed_to_the_scheduler_once():
    with cpu_engine(seed=5) as (engine, named, records, size):
        start(engine, torch.zeros(size, dtype=torch.uint8), records, named)
        for phase in ITERATION:
            engine.on_event(PhaseEvent(phase, 1, 0))
        engine.fence().wait()
        windows = engine.copier.window_ms()
        assert [key[0] for key in windows] == ITERATION
        assert engine.copier.window_ms() == {}  # consumed: learning it again would count one measurement twice


@pytest.mark.parametrize("policy", ["bubbles", "eager", "naive"])
def test_all_block_events_are_wanted_only_to_time_the_windows(policy):
    with cpu_engine(policy, seed=6) as (engine, named, records, size):
        iteration = [(Phase.ITERATION_START, None), (Phase.FORWARD_BLOCK, 0), (Phase.FORWARD_BLOCK, 1), (Phase.FORWARD_END, None)]
        wanted = []
        for step in range(RETIME_EVERY + 1):
            start(engine, torch.zeros(size, dtype=torch.uint8), records, named)
            wanted.append(engine.block_windows())
            for phase, block in iteration:
                engine.on_event(PhaseEvent(phase, step + 1, 0, block=block))
            engine.fence().wait()
            assert engine.block_windows() == frozenset()  # nothing armed
        if policy == "bubbles":
            # all of them (None) to time the windows, at the first snapshot and again RETIME_EVERY later; in between
            # none, as the one issue point (the cost of an issue call on the CPU path dwarfs this short test's
            # iteration) is ITERATION_START
            assert wanted == [None] + [frozenset()] * (RETIME_EVERY - 1) + [None]
        else:
            assert wanted == [frozenset()] * (RETIME_EVERY + 1)


def test_the_copier_threads_time_counts_in_the_cost_of_an_issue():
    # on a GPU an issuer thread makes the copy calls; in a loop bound by the host its time is iteration time (through
    # the GIL), so the scheduler must afford fewer issue points when that thread is busy, not only when the training
    # thread is
    from oteacheck_lightning.copier import ThreadCopier

    class BusyIssuer(ThreadCopier):
        def __init__(self, busy_ms):
            super().__init__()
            self.busy_ms = busy_ms

        def thread_ms(self):
            return self.busy_ms

        def issue(self, partitions):
            # copies nothing: the training thread's share of an issue call is then microseconds, whatever the load of
            # the machine (a real copy made it 0.2-0.4 ms here through the GIL, which alone cut the issue points)
            pass

    groups = {}
    for busy_ms in (0.0, 1000.0):
        with cpu_engine(seed=7, bucket_elements=100_000) as (engine, named, records, size):
            engine.copier.close()
            engine.copier = BusyIssuer(busy_ms)
            for step in range(4):
                start(engine, torch.zeros(size, dtype=torch.uint8), records, named)
                for phase in ITERATION:
                    engine.on_event(PhaseEvent(phase, step + 1, 0))
                    time.sleep(0.03)  # windows of 30 ms: 0.3% of the iteration pays for several cheap issue calls
                engine.fence().wait()
                assert engine.stats.issuer_ms == busy_ms
            groups[busy_ms] = engine.stats.groups
    assert groups[1000.0] == 1 < groups[0.0]

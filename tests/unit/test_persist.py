import logging
import threading

import pytest
import torch

from oteacheck_lightning.format import Manifest, byte_view, plan_layout
from oteacheck_lightning.persist import Persister, PersistSchedule
from oteacheck_lightning.slots import SlotPool
from oteacheck_lightning.tiers import FsspecTier


def snapshot(pool, step, value=None):
    tensors = [("w", torch.full((1000,), float(step if value is None else value)))]
    records, size = plan_layout(tensors)
    slot = pool.acquire(size)
    assert slot is not None
    byte_view(slot.buffer, records[0]).copy_(tensors[0][1])
    pool.seal(slot, Manifest(step=step, rank=0, world_size=1, data_bytes=size, tensors=records, state={}))


class BlockingTier(FsspecTier):
    """A real local tier whose writes wait until released."""

    def __init__(self, url):
        super().__init__(url)
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, manifest, data):
        self.entered.set()
        assert self.release.wait(30)
        super().write(manifest, data)


class FlakyTier(FsspecTier):
    """A real local tier that fails while ``down`` is set (a storage outage)."""

    def __init__(self, url):
        super().__init__(url)
        self.down = True

    def write(self, manifest, data):
        if self.down:
            raise OSError(28, "No space left on device")
        super().write(manifest, data)


@pytest.fixture
def pool(tmp_path):
    p = SlotPool(tmp_path / "shm", 3)
    yield p
    p.close(remove=True)


def test_persisted_checkpoint_is_checksummed_and_retained(tmp_path, pool):
    tier = FsspecTier(str(tmp_path / "disk"))
    persister = Persister(pool, [(tier, PersistSchedule(every_n_steps=1, keep_last=2))])
    for step in range(1, 6):
        snapshot(pool, step)
        persister.request(step)
        assert persister.drain(30)
    persister.close(drain=True)
    assert tier.committed_steps(0) == [4, 5]
    loaded = tier.read(5, 0)
    assert loaded.manifest.verified
    assert float(loaded.buffer[: 4].view(torch.float32)[0]) == 5.0


def test_training_never_waits_for_a_slow_tier(tmp_path, pool):
    # invariant 5: while the tier is stuck, snapshots keep being sealed and requests return at once
    tier = BlockingTier(str(tmp_path / "disk"))
    persister = Persister(pool, [(tier, PersistSchedule(every_n_steps=1))])
    snapshot(pool, 1)
    persister.request(1)
    assert tier.entered.wait(10)
    for step in range(2, 8):
        snapshot(pool, step)  # never blocks: the pinned slot is skipped by acquire()
        persister.request(step)
    assert pool.newest().step == 7
    assert persister.stats()[tier.name].skipped >= 4  # collapsed requests
    tier.release.set()
    assert persister.drain(30)
    persister.close(drain=True)
    # it wrote the slot it had pinned, then the newest one
    assert tier.committed_steps(0)[-1] == 7


def test_a_failing_tier_warns_once_keeps_a_metric_and_recovers(tmp_path, pool, caplog):
    # invariant 9
    tier = FlakyTier(str(tmp_path / "disk"))
    persister = Persister(pool, [(tier, PersistSchedule(every_n_steps=1))], retries=1, backoff_seconds=0.01)
    with caplog.at_level(logging.WARNING):
        for step in (1, 2, 3):
            snapshot(pool, step)
            persister.request(step)
            assert persister.drain(30)
    stats = persister.stats()[tier.name]
    assert not stats.healthy and stats.failures >= 3 and "No space left" in stats.last_error
    assert sum("persisting to" in r.message for r in caplog.records) == 1
    assert tier.committed_steps(0) == []  # nothing partial is visible
    tier.down = False
    snapshot(pool, 4)
    persister.request(4)
    assert persister.drain(30)
    persister.close(drain=True)
    assert stats.healthy and stats.persisted_step == 4
    assert tier.committed_steps(0) == [4]


def test_schedules_are_validated():
    with pytest.raises(ValueError, match="every_n_steps or every_n_seconds"):
        PersistSchedule(every_n_steps=None, every_n_seconds=None)
    with pytest.raises(ValueError, match="keep_last"):
        PersistSchedule(keep_last=0)
    assert PersistSchedule(every_n_steps=None, every_n_seconds=1.0).is_due(3, 1.5)
    assert not PersistSchedule(every_n_steps=10).is_due(3, 1e9)
    # paced in steps (several ranks): the step schedule still counts, the time one only once agreed
    both = PersistSchedule(every_n_steps=10, every_n_seconds=1.0)
    assert both.is_due(20, None) and not both.is_due(6, None) and both.is_due(6, None, 3) and not both.is_due(7, None, 3)


def test_with_several_ranks_a_time_schedule_fires_only_at_the_agreed_step_interval(tmp_path, pool):
    tier = FsspecTier(str(tmp_path / "disk"))
    # world size 1 here: the commit needs this rank only, so a step persisted is a step committed
    persister = Persister(pool, [(tier, PersistSchedule(every_n_steps=None, every_n_seconds=1.0, keep_last=None))], paced=True)
    for step in range(1, 61):
        if step == 10:
            persister.pace(from_step=20, seconds_per_step=0.1, step_multiple=2)  # 1 s: 10 steps, a multiple of 2
        if step == 35:
            persister.pace(from_step=45, seconds_per_step=0.04, step_multiple=2)  # 1 s: 25 steps, rounded to 24
        snapshot(pool, step)
        persister.request(step)  # no waiting: by this rank's clock nothing would be due this fast
        assert persister.drain(30)
    persister.close(drain=True)
    # nothing before the first agreement applied, every 10 steps until the second applied, then every 24
    assert tier.committed_steps(0) == [20, 30, 40, 48]
    assert persister.stats()[tier.name].paced_every_n_steps == 24  # the metric shows what the seconds became


def test_the_ranks_agree_on_their_pace_at_the_same_steps_with_the_slowest_ranks_seconds(monkeypatch):
    from oteacheck_lightning import pace

    clock = iter(float(i) for i in range(1000))  # one second per call: each mark reads the clock once
    monkeypatch.setattr(pace.time, "perf_counter", lambda: next(clock))
    pacer, asked = pace.PersistPace(), []

    def largest(local):
        asked.append(local)
        return 2 * local  # a slower peer

    pacer.start(100)
    agreed = {step: pacer.on_step(step, largest) for step in range(100, 100 + pace.PACE_FIRST + pace.PACE_EVERY + 1)}
    first, again = 100 + pace.PACE_FIRST, 100 + pace.PACE_FIRST + pace.PACE_EVERY
    assert {s for s, a in agreed.items() if a is not None} == {first, again}
    # measured between the mark at step 105 and step 115 (1 s on this clock), doubled by the slower peer
    assert asked[0] == pytest.approx(1.0 / (pace.PACE_FIRST - pace.PACE_FROM))
    assert agreed[first] == (first + pace.PACE_AHEAD, pytest.approx(2 * asked[0]))

import os
import stat

import pytest
import torch

from oteacheck_lightning.format import Manifest
from oteacheck_lightning.slots import SlotPool, SlotState
from oteacheck_lightning.tiers import MemoryTier


def seal(pool, step, nbytes=8192):
    slot = pool.acquire(nbytes)
    assert slot is not None
    slot.buffer[:8] = step
    pool.seal(slot, Manifest(step=step, rank=0, world_size=1, data_bytes=nbytes, tensors=[], state={}))
    return slot


@pytest.fixture
def pool(tmp_path):
    p = SlotPool(tmp_path / "job" / "rank-00000", 3)
    yield p
    p.close(remove=True)


def test_shared_memory_is_owner_only(pool):
    slot = seal(pool, 1)
    assert stat.S_IMODE(os.stat(pool.directory).st_mode) == 0o700
    for path in (slot.data_path, slot.manifest_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_newest_sealed_is_never_handed_out(pool):
    # invariant 3: fill and seal many times; the newest sealed slot is never the one being filled
    for step in range(1, 20):
        newest = pool.newest()
        slot = pool.acquire(4096)
        assert slot is not None and slot is not newest
        pool.seal(slot, Manifest(step=step, rank=0, world_size=1, data_bytes=4096, tensors=[], state={}))
        assert pool.newest() is slot


def test_a_snapshot_other_ranks_may_hold_as_their_newest_is_kept(tmp_path):
    # four slots, one pinned by a persister: filling the next snapshot must take the oldest free one, never the step
    # every rank is known to hold (1 here), even when it is the oldest sealed and not the newest
    pool = SlotPool(tmp_path / "r", 4)
    old = seal(pool, 0)
    assert pool.pin_newest() is old
    held, newer = seal(pool, 1), seal(pool, 2)
    slot = pool.acquire(4096, keep_from_step=1)
    assert slot is not None and slot not in (old, held, newer)
    pool.seal(slot, Manifest(step=3, rank=0, world_size=1, data_bytes=4096, tensors=[], state={}))
    # now only the pinned slot and steps >= 1 are left: skipped, not the held step overwritten
    assert pool.acquire(4096, keep_from_step=1) is None
    assert held.state is SlotState.SEALED and held.step == 1
    assert pool.acquire(4096, keep_from_step=2) is held  # once every rank holds 2, step 1 may go


def test_pinned_slot_is_never_overwritten(pool):
    first = seal(pool, 1)
    pinned = pool.pin_newest()
    assert pinned is first
    for step in range(2, 10):
        slot = seal(pool, step)
        assert slot is not pinned
    assert pinned.state is SlotState.SEALED and pinned.step == 1
    assert int(pinned.buffer[0]) == 1
    pool.unpin(pinned)


def test_when_every_slot_is_protected_the_snapshot_is_skipped_not_blocked(tmp_path):
    pool = SlotPool(tmp_path / "r", 2)
    seal(pool, 1)
    pinned = pool.pin_newest()
    seal(pool, 2)  # the other slot
    assert pool.acquire(4096) is None  # newest (2) and pinned (1) are protected
    assert pool.skipped == 1
    pool.unpin(pinned)
    assert pool.acquire(4096) is not None
    pool.close(remove=True)


def test_a_slot_being_refilled_is_invisible(pool):
    # invariant 1: reusing a slot removes its manifest before any byte changes
    for step in (1, 2, 3):
        seal(pool, step)
    tier = MemoryTier(pool.directory)
    assert tier.committed_steps(0) == [1, 2, 3]
    filling = pool.acquire(4096)
    assert filling.step == -1
    assert tier.committed_steps(0) == [2, 3]
    assert not filling.manifest_path.exists()


def test_a_restarted_process_finds_the_snapshots_and_drops_an_abandoned_timeline(tmp_path):
    directory = tmp_path / "rank-00000"
    pool = SlotPool(directory, 3)
    for step in (5, 6, 7):
        seal(pool, step)
    pool.close(remove=False)  # a crash: shared memory stays
    restarted = SlotPool(directory, 3)
    assert restarted.newest().step == 7
    loaded = MemoryTier(directory).read(6, 0)
    assert loaded.manifest.step == 6
    restarted.invalidate_after(5)  # resumed from an older step: 6 and 7 must never be resumed from again
    assert MemoryTier(directory).committed_steps(0) == [5]
    assert restarted.newest().step == 5
    restarted.close(remove=True)
    assert not directory.exists()


def test_fewer_than_two_slots_is_a_configuration_error(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        SlotPool(tmp_path / "r", 1)


def test_slot_grows_when_the_state_grows(pool):
    slot = pool.acquire(4096)
    slot.ensure_capacity(1 << 20)
    assert slot.buffer.numel() >= 1 << 20
    slot.buffer[-1] = 7
    assert int(torch.tensor(slot.buffer[-1])) == 7

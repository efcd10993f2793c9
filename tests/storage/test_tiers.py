"""Persistent tiers on real stores (local disk, a real HDFS through ``hdfs://`` and ``webhdfs://``, fsspec's
``memory://``): the global commit, retention, integrity and the persister's behaviour when the NameNode dies.

No mocks: faults wrap a real tier (the NameNode is really killed, the bytes are really flipped on HDFS) and the
tests assert the invariants (nothing torn is visible, the previous checkpoint is used, training never waits)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import urllib.parse
import uuid

import pytest
import torch

from oteacheck_lightning.format import CheckpointFormatError, Manifest, byte_view, plan_layout, with_checksums
from oteacheck_lightning.io import OTeaCheckpointIO
from oteacheck_lightning.persist import Persister, PersistSchedule
from oteacheck_lightning.recovery import StrandedCheckpointError, TiersUnreachableError, abandoned_after, newest_held, recover
from oteacheck_lightning.slots import SlotPool
from oteacheck_lightning.tiers import FsspecTier, Holdings, MemoryTier, Origin
from oteacheck_lightning.tiers.fsspec_tier import COMMIT_MARKER

# hdfs-native gives up on a dead NameNode after ~0.3 s instead of Hadoop's default ~3 minutes of failover retries
FAST_FAIL = {
    "dfs.client.failover.max.attempts": "1",
    "dfs.client.failover.sleep.base.millis": "100",
    "dfs.client.failover.sleep.max.millis": "200",
}


def webhdfs_url(cluster, hdfs_url: str) -> str:
    return f"webhdfs://{cluster.user}@{cluster.host}:{cluster.http_port}{urllib.parse.urlparse(hdfs_url).path}"


@pytest.fixture(params=["local", "hdfs", "webhdfs", "memory"])
def tier_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "tier")
    if request.param == "memory":
        return f"memory://oteacheck-{uuid.uuid4().hex}"
    cluster = request.getfixturevalue("hdfs_cluster")
    root = request.getfixturevalue("hdfs_root")
    return root if request.param == "hdfs" else webhdfs_url(cluster, root)


def rank_checkpoint(step: int, rank: int, world_size: int = 2, numel: int = 3000) -> tuple[Manifest, memoryview]:
    g = torch.Generator().manual_seed(step * 100 + rank)
    tensors = [("weight", torch.randn(numel, generator=g)), ("exp_avg", torch.randn(numel // 3, generator=g))]
    records, size = plan_layout(tensors)
    buffer = torch.zeros(size, dtype=torch.uint8)
    for record, (_, t) in zip(records, tensors):
        byte_view(buffer, record).copy_(t)
    manifest = Manifest(step=step, rank=rank, world_size=world_size, data_bytes=size, tensors=records, state={"s": step})
    view = memoryview(buffer.numpy())
    return with_checksums(manifest, view), view


def single_rank_gather(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0)


# ------------------------------------------------------------------------------------------ global commit


def test_a_step_is_visible_only_after_every_rank_wrote_and_the_coordinator_committed(tier_url):
    tier = FsspecTier(tier_url)
    written = {r: rank_checkpoint(10, r) for r in range(2)}
    tier.write(*written[0])
    assert tier.try_commit(10, 2) == [1]  # rank 1's files are not there: no marker
    assert tier.committed_steps(0) == [] and tier.steps() == [10]
    assert not tier.checkpoint(10).fs.exists(tier.checkpoint(10).commit_path)
    with pytest.raises(CheckpointFormatError, match="not committed"):
        tier.read(10, 0)
    tier.write(*written[1])
    assert tier.try_commit(10, 2) == []
    # a fresh client (another process, a restarted job) sees the committed step and reads it back verified
    fresh = FsspecTier(tier_url)
    assert fresh.committed_steps(0) == fresh.committed_steps(1) == [10]
    for rank in range(2):
        loaded = fresh.read(10, rank)
        assert loaded.manifest.step == 10 and loaded.manifest.verified
        assert bytes(loaded.buffer.numpy()[: written[rank][0].data_bytes]) == bytes(written[rank][1])
    commit = fresh.checkpoint(10).read_commit()
    assert commit["step"] == 10 and commit["world_size"] == 2 and set(commit["manifests"]) == {"0", "1"}


def test_retention_keeps_the_newest_committed_steps_and_old_steps_vanish_before_their_files(tier_url):
    tier = FsspecTier(tier_url)
    for step in (5, 10, 15, 20):
        for rank in range(2):
            tier.write(*rank_checkpoint(step, rank))
        assert tier.try_commit(step, 2) == []
    tier.write(*rank_checkpoint(25, 0))  # a torn newer step (rank 1 never wrote it) is left alone
    assert tier.prune(1, keep_last=2) == []  # rank 1 waits until the coordinator took old steps out of sight
    assert tier.committed_steps(0) == [5, 10, 15, 20]
    assert tier.prune(0, keep_last=2) == [5, 10]
    assert tier.committed_steps(0) == [15, 20]  # invisible first ...
    assert tier.prune(1, keep_last=2) == [5, 10]  # ... then every rank removes its files
    assert tier.steps() == [15, 20, 25]
    assert tier.committed_steps(1) == [15, 20]


def test_a_rank_rewriting_a_committed_step_reads_as_corrupt_never_as_a_mix(tier_url):
    tier = FsspecTier(tier_url)
    for rank in range(2):
        tier.write(*rank_checkpoint(7, rank))
    assert tier.try_commit(7, 2) == []
    manifest, data = rank_checkpoint(7, 1, numel=2000)  # another run's rank 1 rewrites step 7
    tier.write(manifest, data)
    with pytest.raises(CheckpointFormatError, match="rank 1's manifest is not the one the commit marker names"):
        tier.read(7, 1)
    assert tier.try_commit(7, 2) == []  # the coordinator re-commits what is there now
    assert tier.read(7, 1).manifest.data_bytes == manifest.data_bytes


def test_a_commit_takes_only_manifests_of_one_run_never_a_stale_file_of_an_abandoned_one(tier_url):
    tier = FsspecTier(tier_url)

    def write(rank: int, run: str) -> None:
        manifest, view = rank_checkpoint(10, rank)
        tier.write(dataclasses.replace(manifest, run=run), view)

    write(0, "abandoned")
    write(1, "abandoned")  # a rank whose tier was down at the resume has not removed this one yet
    write(0, "resumed")
    assert tier.try_commit(10, 2, run="resumed") == [1]
    assert not tier.checkpoint(10).is_committed()
    write(1, "resumed")
    assert tier.try_commit(10, 2, run="resumed") == []
    assert {tier.read(10, r).manifest.run for r in range(2)} == {"resumed"}


def test_the_explicit_checkpoint_marker_is_the_same_commit_concept(tmp_path):
    # strategy.save_checkpoint writes COMMIT with the step and the world size; readers accept it as committed
    tier = FsspecTier(str(tmp_path))
    tier.write(*rank_checkpoint(3, 0, world_size=1))
    directory = tier.checkpoint(3)
    assert not directory.is_committed()
    directory.write_marker(COMMIT_MARKER, b'{"step": 3, "world_size": 1}')
    assert tier.committed_steps(0) == [3] and tier.read(3, 0).manifest.step == 3
    directory.write_marker(COMMIT_MARKER, b'{"step": 3, "wor')  # a torn commit file (no atomic rename) is invisible
    assert tier.committed_steps(0) == []


# ------------------------------------------------------------------------------------------------ integrity


@pytest.mark.parametrize("protocol", ["hdfs", "webhdfs"])
def test_a_flipped_bit_on_hdfs_is_reported_by_name_and_the_previous_step_is_used(hdfs_cluster, hdfs_root, protocol, caplog):
    url = hdfs_root if protocol == "hdfs" else webhdfs_url(hdfs_cluster, hdfs_root)
    tier = FsspecTier(url)
    for step in (4, 8):
        tier.write(*rank_checkpoint(step, 0, world_size=1))
        assert tier.try_commit(step, 1) == []
    # flip one bit of the exp_avg tensor of step 8, in place on HDFS (through the other client)
    fs = hdfs_cluster.hdfs_fs()
    path = f"{urllib.parse.urlparse(hdfs_root).path}/step-000000008/rank-00000.data"
    manifest = tier.read(8, 0).manifest
    offset = next(r.offset for r in manifest.tensors if r.name == "exp_avg") + 5
    raw = bytearray(fs.cat_file(path))
    raw[offset] ^= 0x10
    fs.rm(path)
    fs.pipe_file(path, bytes(raw))
    with pytest.raises(CheckpointFormatError) as err:
        tier.read(8, 0)
    for name in ("step 8", "rank 0", "'exp_avg'", urllib.parse.urlparse(hdfs_root).path):
        assert name in str(err.value)
    with caplog.at_level(logging.WARNING):
        result = recover([tier], 0, 1, single_rank_gather, Recorder)
    assert result is not None and result.step == 4
    assert [step for step, _ in result.skipped] == [8] and "exp_avg" in result.skipped[0][1]
    assert any("step 8, rank 0" in r.message and url in r.message for r in caplog.records)


# ------------------------------------------------------------------------ another number of ranks


class Recorder:
    """A sink for the saved ranks of a step written by another number of ranks: notes what it took in."""

    def __init__(self) -> None:
        self.taken: list = []

    def absorb(self, loaded) -> None:
        self.taken.append(loaded)

    @property
    def ranks(self) -> list[int]:
        return [c.manifest.rank for c in self.taken]


def commit(tier: FsspecTier, step: int, world_size: int) -> None:
    for rank in range(world_size):
        tier.write(*rank_checkpoint(step, rank, world_size))
    assert tier.try_commit(step, world_size) == []


def test_after_a_resume_with_fewer_ranks_retention_removes_the_files_of_ranks_the_run_no_longer_has(tier_url):
    tier = FsspecTier(tier_url)
    for step in (5, 10, 20):
        commit(tier, step, 2)
    commit(tier, 15, 1)  # resumed from step 10 on one process
    assert tier.commits() == {5: 2, 10: 2, 15: 1, 20: 2}
    assert tier.committed_steps(0, world_size=1) == [15] and tier.committed_steps(1) == [5, 10, 20]
    # the resumed run discards the abandoned step 20 and prunes to one step: no file of rank 1 is left behind
    # (the helper's steps are all of one run, so step 20 is of the resumed line)
    assert tier.discard_after(15, 0, Origin(), world_size=1) == [20]
    assert tier.prune(0, keep_last=1, world_size=1) == [5, 10]
    assert tier.steps() == [15]
    assert tier.commits() == {15: 1}


def test_recovery_takes_the_newest_step_whatever_number_of_ranks_wrote_it(tmp_path, caplog):
    tier = FsspecTier(str(tmp_path / "tier"))
    for step, size in ((3, 2), (4, 1), (6, 2)):
        commit(tier, step, size)
    result = recover([tier], 0, 1, single_rank_gather, Recorder)
    # step 6, written by 2 ranks, is newer than step 4: this rank reads both ranks' parts to take its own
    assert result.step == 6 and result.repartition.ranks == [0, 1] and result.checkpoint.manifest.rank == 0
    commit(tier, 8, 1)
    result = recover([tier], 0, 1, single_rank_gather, Recorder)
    assert result.step == 8 and result.repartition is None and result.checkpoint.manifest.rank == 0
    # a corrupt part of the newest step written by 2 ranks: back to the previous good one
    path = tmp_path / "tier" / "step-000000008"
    for name in ("COMMIT", "rank-00000.data", "rank-00000.manifest.json"):
        (path / name).unlink()
    data = tmp_path / "tier" / "step-000000006" / "rank-00001.data"
    raw = bytearray(data.read_bytes())
    raw[10] ^= 0x01
    data.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        result = recover([tier], 0, 1, single_rank_gather, Recorder)
    assert result.step == 4 and [step for step, _ in result.skipped] == [6]
    assert "ranks 0 to 1" in result.skipped[0][1] and "checksum mismatch" in result.skipped[0][1]


def test_a_run_on_one_machine_resumes_with_fewer_ranks_from_shared_memory_and_frees_the_memory_of_the_others(tmp_path):
    job = tmp_path / "oteacheck-job"
    pools = [SlotPool(job / f"rank-{r:05d}", 3) for r in range(2)]
    for step in (6, 7):
        for rank, pool in enumerate(pools):
            seal(pool, step, rank, 2)
    tier = FsspecTier(str(tmp_path / "tier"))
    commit(tier, 5, 2)
    for pool in pools:
        pool.close(remove=False)  # a crash: the shared memory stays
    restarted = SlotPool(job / "rank-00000", 3)
    result = recover([MemoryTier(restarted.directory), tier], 0, 1, single_rank_gather, Recorder)
    assert result.step == 7 and result.repartition.ranks == [0, 1]
    assert all(c.source.startswith("memory:") for c in result.repartition.taken)
    restarted.remove_ranks_from(1)
    assert sorted(p.name for p in job.iterdir()) == ["rank-00000"]
    restarted.close(remove=True)
    assert not job.exists()


def test_snapshots_only_in_the_shared_memory_of_several_machines_stop_a_resume_with_another_number_of_ranks(tmp_path):
    pool = SlotPool(tmp_path / "oteacheck-job" / "rank-00000", 3)  # rank 1 ran on another machine
    seal(pool, 7, 0, 2)
    with pytest.raises(StrandedCheckpointError, match="step 7, was written by 2 ranks .* Restart with 2 processes"):
        recover([MemoryTier(pool.directory)], 0, 1, single_rank_gather, Recorder)
    # a persisted step, even an older one, is one this run can resume from
    tier = FsspecTier(str(tmp_path / "tier"))
    commit(tier, 5, 2)
    result = recover([MemoryTier(pool.directory), tier], 0, 1, single_rank_gather, Recorder)
    assert result.step == 5 and result.repartition.ranks == [0, 1]
    pool.close(remove=True)


def test_a_root_never_created_holds_nothing_so_a_first_run_with_ckpt_path_last_starts(tier_url):
    # every backend reports a missing root as "not found", never as an outage
    tier = FsspecTier(f"{tier_url}/never-created")
    assert tier.holdings(0) == Holdings({}, {}, {})
    assert recover([tier], 0, 1, single_rank_gather, Recorder) is None


def test_a_restart_while_hdfs_is_down_stops_with_the_cause_instead_of_starting_afresh(hdfs_cluster, hdfs_root, tmp_path, caplog):
    commit(FsspecTier(hdfs_root), 5, 1)
    pool = SlotPool(tmp_path / "oteacheck-job" / "rank-00000", 2)  # a new machine: nothing in memory
    tiers = [MemoryTier(pool.directory), FsspecTier(hdfs_root, storage_options=FAST_FAIL),
             FsspecTier(webhdfs_url(hdfs_cluster, hdfs_root))]
    try:
        hdfs_cluster.kill()
        with caplog.at_level(logging.WARNING), pytest.raises(TiersUnreachableError) as stopped:
            recover(tiers, 0, 1, single_rank_gather, Recorder)
        message = str(stopped.value)
        # it names each tier it could not list, with the cause, and what to do
        assert f"{hdfs_root}: " in message and f"{tiers[2].name}: " in message and "Error" in message
        assert "Restore access to the storage" in message and "without ckpt_path" in message
        assert sum("cannot list checkpoints in" in r.message for r in caplog.records) == 2
        # a run starting afresh cannot see what the tier holds either: it goes on, and the warning says what it does
        # with that tier
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert newest_held(tiers, 0, 1) == (-1, None)
        assert f"could not check a tier for an earlier run's checkpoints ({hdfs_root}: " in caplog.text
        assert "each rank looks again before its first write there" in caplog.text
        # a tier that works and holds a step is still resumed from, as before
        local = FsspecTier(str(tmp_path / "local"))
        commit(local, 3, 1)
        assert recover([*tiers, local], 0, 1, single_rank_gather, Recorder).step == 3
    finally:
        hdfs_cluster.start()
    # nothing was lost: once HDFS is back, the same restart resumes from its newest step
    result = recover(tiers, 0, 1, single_rank_gather, Recorder)
    assert result.step == 5 and result.checkpoint.source == hdfs_root
    pool.close(remove=True)


def commit_of(tier: FsspecTier, step: int, run: str, forks: list, began: float = 0.0, world_size: int = 1) -> None:
    for rank in range(world_size):
        manifest, view = rank_checkpoint(step, rank, world_size)
        tier.write(dataclasses.replace(manifest, run=run, forks=forks, run_began=began), view)
    assert tier.try_commit(step, world_size, run=run) == []


def test_a_step_of_an_abandoned_timeline_left_in_a_tier_that_was_down_is_never_resumed_from(tmp_path, caplog):
    # run A persisted steps 4 and 8 to the remote tier; it was down when run B resumed from step 4 (from local
    # disk), so B could not remove step 8 there; B persisted steps 5 and 6 locally, and was killed before writing
    # to the remote tier, which is back now
    remote, local = FsspecTier(f"memory://oteacheck-{uuid.uuid4().hex}"), FsspecTier(str(tmp_path / "local"))
    for step in (4, 8):
        commit_of(remote, step, "A", [])
    for step in (5, 6):
        commit_of(local, step, "B", [["A", 4]])
    with caplog.at_level(logging.WARNING):
        result = recover([remote, local], 0, 1, single_rank_gather, Recorder)
    assert (result.step, result.checkpoint.manifest.run) == (6, "B")
    assert f"step 8 in {remote.name} is of a run that a later run resumed from step 4" in caplog.text
    # a corrupt step 6 falls back to B's step 5, then to A's step 4, where B's line left A; never to A's step 8
    for step, expected in ((6, 5), (5, 4)):
        data = tmp_path / "local" / f"step-{step:09d}" / "rank-00000.data"
        data.write_bytes(bytes(b ^ 0xFF for b in data.read_bytes()))
        result = recover([remote, local], 0, 1, single_rank_gather, Recorder)
        assert result.step == expected
    assert result.checkpoint.source == remote.name
    local.discard_after(4, 0, Origin("C", (("A", 4), ("B", 4))))  # C resumed B's line from its step 4
    assert FsspecTier(str(tmp_path / "local")).commits() == {}
    # with no step of B's line left anywhere, nothing says step 8 was abandoned: as before, the newest is taken
    assert recover([remote, local], 0, 1, single_rank_gather, Recorder).step == 8
    # the commit marker carries the origin, so recovery reads it from one listing per tier
    assert remote.holdings(0).origins[8] == Origin("A", ())
    commit_of(local, 7, "C", [["A", 4], ["B", 6]])
    assert local.holdings(0).origins[7] == Origin("C", (("A", 4), ("B", 6)))
    assert recover([remote, local], 0, 1, single_rank_gather, Recorder).step == 7


def test_the_line_begun_last_is_resumed_never_an_earlier_runs_newer_steps_it_could_not_see(tmp_path, caplog):
    # run A (began at t=100) persisted steps 20, 25 and 30, only to the remote tier; run B was started afresh in the
    # same folder (t=200) while that tier was down, so its start could not see them, and persisted steps 5 and 10
    # locally before it was killed; the remote tier is back
    remote, local = FsspecTier(f"memory://oteacheck-{uuid.uuid4().hex}"), FsspecTier(str(tmp_path / "local"))
    for step in (20, 25, 30):
        commit_of(remote, step, "A", [], began=100.0)
    for step in (5, 10):
        commit_of(local, step, "B", [], began=200.0)
    with caplog.at_level(logging.WARNING):
        result = recover([remote, local], 0, 1, single_rank_gather, Recorder)
    assert (result.step, result.checkpoint.manifest.run) == (10, "B")
    assert f"step 30 in {remote.name} is of a run that a later run did not go on from it" in caplog.text
    assert remote.holdings(0).origins[30] == Origin("A", (), 100.0)
    # run C resumed from A's step 25 by its path (t=300): its line is A up to 25, then C; B's steps and A's 30 are
    # abandoned, and a corrupt step of C falls back to A's 25, never to B's 10 or A's 30
    commit_of(local, 27, "C", [["A", 25]], began=300.0)
    assert recover([remote, local], 0, 1, single_rank_gather, Recorder).step == 27
    data = tmp_path / "local" / f"step-{27:09d}" / "rank-00000.data"
    data.write_bytes(bytes(b ^ 0xFF for b in data.read_bytes()))
    result = recover([remote, local], 0, 1, single_rank_gather, Recorder)
    assert (result.step, result.checkpoint.manifest.run) == (25, "A")
    assert abandoned_after([Origin("A", (), 100.0), Origin("B", (), 200.0), Origin("C", (("A", 25),), 300.0)]) == {"A": 25, "B": -1}


def test_a_resumed_run_begins_after_the_run_it_goes_on_from_whatever_the_clocks_say():
    # the restart's node has a clock 10 minutes behind the killed run's: its line still ranks above the killed run's
    io = OTeaCheckpointIO()
    io.run_began = 1000.0
    io.continue_line(5, ["A", [["X", 2]], 1600.0])
    assert io.forks == [["X", 2], ["A", 5]] and io.run_began > 1600.0
    mine = Origin("B", (("X", 2), ("A", 5)), io.run_began)
    assert abandoned_after([Origin("X", (), 900.0), Origin("A", (("X", 2),), 1600.0), mine]) == {"X": 2, "A": 5}
    ahead = OTeaCheckpointIO()
    ahead.run_began = 1000.0
    ahead.continue_line(5, ["A", [], 100.0])  # where its clock is ahead, its own start stands
    assert ahead.run_began == 1000.0


def test_every_rank_stops_when_one_rank_could_not_list_a_tier(tmp_path):
    """The ranks raise together (a rank that went on alone would wait forever in training's first collective)."""
    pool = SlotPool(tmp_path / "oteacheck-job" / "rank-00000", 2)

    def gather_with_rank_1(t: torch.Tensor) -> torch.Tensor:
        # rank 1 holds no step either, and could not list one tier (the exchange of what each rank found: tiers it
        # could not list, newest stranded step, its world size)
        return torch.stack([t, torch.tensor([1, -1, 0]) if t.numel() == 3 else t])

    with pytest.raises(TiersUnreachableError, match=r"rank\(s\) \[1\] could not list a tier \(see their logs\)"):
        recover([MemoryTier(pool.directory)], 0, 2, gather_with_rank_1, Recorder)
    pool.close(remove=True)


# ------------------------------------------------------------------------------------ persister, 2 "ranks"


def seal(pool: SlotPool, step: int, rank: int, world_size: int, numel: int = 4000, **origin) -> None:
    manifest, view = rank_checkpoint(step, rank, world_size, numel)
    # without checksums: the persister computes them, off the training thread
    manifest = dataclasses.replace(manifest, tensors=[dataclasses.replace(r, checksum=None) for r in manifest.tensors], **origin)
    slot = pool.acquire(manifest.data_bytes)
    assert slot is not None, "training would have had to skip a snapshot"
    slot.memoryview(manifest.data_bytes)[:] = view
    pool.seal(slot, manifest)


def test_steps_of_the_abandoned_run_on_a_tier_down_at_the_resume_go_before_the_next_write_to_it(hdfs_cluster, hdfs_root, tmp_path, caplog):
    tier = FsspecTier(hdfs_root, storage_options=FAST_FAIL)
    for step in (4, 8):
        commit(tier, step, 1)  # the interrupted run persisted step 8; the restart resumed from step 4 (from disk)
    pool = SlotPool(tmp_path / "shm", 4)
    persister = Persister(pool, [(tier, PersistSchedule(every_n_steps=1))], retries=2, backoff_seconds=0.2, world_size=1)
    try:
        hdfs_cluster.kill()
        with caplog.at_level(logging.WARNING):
            persister.discard_after(4, 0, Origin("B", (("", 4),)))  # the helper's run is ""
        assert f"could not remove steps after 4 from {hdfs_root} now" in caplog.text
        hdfs_cluster.start()
        seal(pool, 5, 0, 1)
        persister.request(5)
        assert persister.drain(60)
        # step 8 of the abandoned run is gone before the resumed run's first step there
        assert FsspecTier(hdfs_root).commits() == {4: 1, 5: 1}
        assert "removed this rank's files of steps [8]" in caplog.text
    finally:
        if not hdfs_cluster.running:
            hdfs_cluster.start()
        persister.close(drain=False)
        pool.close(remove=True)


def test_a_tier_holding_another_lines_steps_is_refused_and_left_untouched(tmp_path, caplog):
    # run A persisted steps 20, 25 and 30 to the remote tier; run B began afresh in the same folder while that tier
    # was down (so its start could not see them), and now persists every 5 steps; the tier is back
    remote, local = FsspecTier(f"memory://oteacheck-{uuid.uuid4().hex}"), FsspecTier(str(tmp_path / "local"))
    for step in (20, 25, 30):
        commit_of(remote, step, "A", [], began=100.0)
    files = {path: remote.fs.cat_file(path) for path in remote.fs.find(remote.root)}
    pool = SlotPool(tmp_path / "shm", 6)
    schedule = PersistSchedule(every_n_steps=5, keep_last=2)
    persister = Persister(pool, [(remote, schedule), (local, schedule)], world_size=1)
    try:
        with caplog.at_level(logging.WARNING):
            for step in (5, 10, 15):
                seal(pool, step, 0, 1, run="B", run_began=200.0)
                persister.request(step)
                assert persister.drain(60)
        # nothing of A's written over or removed (retention would have taken B's steps as older, and B's step 20
        # would have gone into A's), and B's steps go on to the local tier
        assert {path: remote.fs.cat_file(path) for path in remote.fs.find(remote.root)} == files
        stats = persister.stats()
        assert stats[remote.name].refused and not stats[remote.name].healthy and stats[remote.name].persisted == 0
        assert stats[local.name].persisted == 3 and stats[local.name].healthy and not stats[local.name].refused
        assert local.commits() == {10: 1, 15: 1}
        assert caplog.text.count(f"{remote.name} holds step(s) [20, 25, 30] of another line of training") == 1
    finally:
        persister.close(drain=False)
        pool.close(remove=True)

    def resume_and_persist(folder: str, line: Origin, step: int) -> tuple[bool, bool]:
        """A run of ``line`` resumed from its last fork and persisted ``step``: whether the tier was refused at the
        resume, and after the write."""
        pool = SlotPool(tmp_path / folder, 4)
        persister = Persister(pool, [(remote, schedule)], world_size=1)
        try:
            persister.discard_after(line.forks[-1][1], 0, line=line)
            at_resume = persister.stats()[remote.name].refused
            seal(pool, step, 0, 1, run=line.run, forks=[list(f) for f in line.forks], run_began=line.began)
            persister.request(step)
            assert persister.drain(60)
            return at_resume, persister.stats()[remote.name].refused
        finally:
            persister.close(drain=False)
            pool.close(remove=True)

    # B is killed and resumed (run D, from B's step 15): the resume takes newer steps only of the runs its line
    # left, so A's steps stay (before, they went as newer than 15), and D refuses the tier too, at its resume
    assert resume_and_persist("shm1", Origin("D", (("B", 15),), 300.0), 20) == (True, True)
    assert {path: remote.fs.cat_file(path) for path in remote.fs.find(remote.root)} == files
    # a run that resumed from A's step 25 is on A's line up to there: A's step 30 goes, and its own step 30 is written
    assert resume_and_persist("shm2", Origin("C", (("A", 25),), 400.0), 30) == (False, False)
    assert remote.commits() == {25: 1, 30: 1} and remote.holdings(0).origins[30].run == "C"


def test_a_rank_that_writes_before_rank_0_removed_the_abandoned_steps_is_not_refused(tmp_path):
    # run A (2 ranks) persisted steps 20, 25 and 30; run C resumed from A's step 20. The tier was down at the resume,
    # so rank 0's removal of A's steps 25 and 30 waits for its first write, and rank 1's first write came first:
    # those steps are still committed then, but they are this line's own abandoned steps, not another line's
    tier = FsspecTier(f"memory://oteacheck-{uuid.uuid4().hex}")
    for step in (20, 25, 30):
        commit_of(tier, step, "A", [], began=100.0, world_size=2)
    line = Origin("C", (("A", 20),), 200.0)
    schedule = PersistSchedule(every_n_steps=1)
    pools = [SlotPool(tmp_path / f"shm{rank}", 4) for rank in range(2)]
    persisters = [Persister(pool, [(tier, schedule)], world_size=2) for pool in pools]
    try:
        for rank in (1, 0):
            persisters[rank].discard_after(20, rank, line=line)
            assert not persisters[rank].stats()[tier.name].refused  # checked at the resume already
            seal(pools[rank], 21, rank, 2, run="C", forks=[["A", 20]], run_began=200.0)
            persisters[rank].request(21)
            assert persisters[rank].drain(60)
        assert tier.commits() == {20: 2, 21: 2}
        assert not any(p.stats()[tier.name].refused for p in persisters)
    finally:
        for persister, pool in zip(persisters, pools):
            persister.close(drain=False)
            pool.close(remove=True)


class HeldTier(FsspecTier):
    """A real tier whose writes wait until released (a slow rank)."""

    def __init__(self, url):
        super().__init__(url)
        self.release = threading.Event()

    def write(self, manifest, data):
        assert self.release.wait(60)
        super().write(manifest, data)


def test_the_coordinator_commits_on_hdfs_only_after_every_rank_persisted(hdfs_root, tmp_path):
    pools = [SlotPool(tmp_path / f"shm{r}", 4) for r in range(2)]
    tiers = [FsspecTier(hdfs_root), HeldTier(hdfs_root)]
    persisters = [Persister(pools[r], [(tiers[r], PersistSchedule(every_n_steps=2, keep_last=2))]) for r in range(2)]
    try:
        for step in (1, 2):
            for r in range(2):
                seal(pools[r], step, r, 2)
                persisters[r].request(step)
        deadline = time.monotonic() + 30
        while persisters[0].stats()[hdfs_root].persisted_step != 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # several polls of the coordinator
        assert tiers[0].steps() == [2] and tiers[0].committed_steps(0) == []  # rank 1 has not written: invisible
        assert persisters[0].stats()[hdfs_root].uncommitted == 1
        tiers[1].release.set()
        for p in persisters[::-1]:
            assert p.drain(60)
        assert FsspecTier(hdfs_root).committed_steps(1) == [2]
        stats = persisters[0].stats()[hdfs_root]
        assert stats.committed_step == 2 and stats.uncommitted == 0
    finally:
        tiers[1].release.set()
        for r in range(2):
            assert persisters[r].close(drain=True, timeout=60) == []
            pools[r].close(remove=True)


class NameNodeDiesMidWrite(FsspecTier):
    """A real HDFS tier; while writing the data object of the first step from ``step`` on, after the first half,
    the NameNode (and its DataNode: one JVM) is SIGKILLed."""

    def __init__(self, url, cluster, step):
        super().__init__(url, storage_options=FAST_FAIL)
        self.cluster, self.step = cluster, step
        self.killed = threading.Event()

    def write(self, manifest, data):
        if manifest.step >= self.step and not self.killed.is_set():
            self.torn_step = manifest.step
            directory = self.checkpoint(manifest.step)
            directory.makedirs()
            half = manifest.data_bytes // 2

            def chunks():
                yield data[:half]
                self.cluster.kill()
                self.killed.set()
                yield data[half : manifest.data_bytes]

            directory._put(directory.data_path(manifest.rank), chunks())
        super().write(manifest, data)


def test_namenode_killed_mid_persist_then_restarted(hdfs_cluster, hdfs_root, tmp_path, caplog):
    pool = SlotPool(tmp_path / "shm", 4)
    tier = NameNodeDiesMidWrite(hdfs_root, hdfs_cluster, step=4)
    persister = Persister(pool, [(tier, PersistSchedule(every_n_steps=2, keep_last=3))], retries=2, backoff_seconds=0.2)
    slowest_request = 0.0
    try:
        with caplog.at_level(logging.WARNING):
            step = 0

            def train_until(done, limit=60):
                nonlocal step, slowest_request
                deadline = time.monotonic() + limit
                while not done():
                    assert time.monotonic() < deadline, f"stuck at step {step}: {persister.stats()}"
                    step += 1
                    seal(pool, step, 0, 1, numel=200_000)  # ~1 MiB per rank
                    started = time.perf_counter()
                    persister.request(step)
                    slowest_request = max(slowest_request, time.perf_counter() - started)
                    time.sleep(0.02)

            stats = persister.stats()[tier.name]
            train_until(lambda: tier.killed.is_set() and stats.failures >= 2)
            assert not stats.healthy and stats.failed_step >= tier.torn_step and stats.last_error
            hdfs_cluster.start()
            train_until(lambda: stats.healthy and stats.committed_step > tier.torn_step)
            assert persister.drain(60)
        fresh = FsspecTier(hdfs_root)
        committed = fresh.committed_steps(0)
        assert tier.torn_step not in committed and committed[-1] == stats.committed_step  # the torn step: invisible
        assert not fresh.checkpoint(tier.torn_step).is_committed()
        fresh.read(committed[-1], 0)  # and what is visible is complete
        assert slowest_request < 0.05  # training never waited for the outage
        assert stats.outages == 1 and stats.failures >= 2
        warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
        assert sum("failed at step" in m for m in warnings) == 1, warnings  # warned once, with the cause
        assert any(tier.name in m and "Error" in m for m in warnings if "failed at step" in m)  # names the cause
        assert any("recovered" in m for m in warnings)
    finally:
        if not hdfs_cluster.running:
            hdfs_cluster.start()
        persister.close(drain=False)
        pool.close(remove=True)

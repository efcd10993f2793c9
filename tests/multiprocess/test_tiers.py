"""Persistent tiers in real training runs: 2 processes (DeepSpeed ZeRO 2 on CPU, gloo), a real HDFS
(MiniDFSCluster) whose NameNode is killed in the middle of a persist, and a real size-limited filesystem that
fills up. Few and short on purpose: each run costs ~15 s on a 2-core CI machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse

import pytest
import torch

from oteacheck_lightning.format import Manifest, byte_view, plan_layout, with_checksums
from oteacheck_lightning.tiers import FsspecTier
from tests.support import harness

pytestmark = pytest.mark.multiprocess

MAX_STEPS = 24
# hdfs-native gives up on a dead NameNode after ~0.3 s instead of Hadoop's default ~3 minutes of failover retries
FAST_FAIL = ["dfs.client.failover.max.attempts=1", "dfs.client.failover.sleep.base.millis=100",
             "dfs.client.failover.sleep.max.millis=200"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiers-reference")
    env = harness.environment(f"tiersref-{base.name}", base / "shm")
    harness.run(base / "root", base / "out", env, stage=2, devices=2, max_steps=MAX_STEPS, persist_every=5)
    return base / "out"


def tier_stats(out, rank, url):
    try:
        return json.loads((out / f"persist-rank{rank}.json").read_text())["tiers"][url]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def test_namenode_killed_mid_persist_then_resume_from_hdfs_alone(tmp_path, reference, hdfs_cluster, hdfs_root):
    """Local every 5 keeping 3 and HDFS every 4 keeping 2. Rank 0's HDFS write of step 4 is cut in the middle by
    SIGKILLing the NameNode; training goes on, the failure is warned about and counted, the NameNode restarts and
    persistence resumes; the run is then SIGKILLed. With local disk and shared memory gone, a restart while HDFS is
    down stops on both ranks without training or removing anything; once it is up, the run resumes from HDFS alone, skipping the newest HDFS step (one flipped bit) for the previous one, and ends bit-identical to an
    uninterrupted run."""
    ctl, out, env = tmp_path / "ctl", tmp_path / "out", harness.environment(f"hdfs-{tmp_path.name}", tmp_path / "shm")
    ctl.mkdir()
    local = tmp_path / "root"
    # ~0.9 s a step: the NameNode restart and the commits after it must fit in the run's 24 steps
    options = dict(stage=2, devices=2, max_steps=MAX_STEPS, sleep=0.6, persist=[f"{local}:5:3", f"{hdfs_root}:4:2"],
                   storage_option=FAST_FAIL, commit_timeout=20)
    seen = {"phase": "persisting"}

    def outage():
        if seen["phase"] == "persisting" and (ctl / "stalled").exists():
            hdfs_cluster.kill()  # rank 0's data object of the torn step is half written now
            (ctl / "go").touch()
            seen.update(phase="down", torn=int((ctl / "stalled").read_text()), killed_at=harness.steps_logged(out)[-1]["step"])
        elif seen["phase"] == "down":
            stats = tier_stats(out, 0, hdfs_root)
            if stats and stats["failures"] >= 1 and not stats["healthy"]:
                seen.update(phase="restarting", failed_at=harness.steps_logged(out)[-1]["step"])
                hdfs_cluster.start()
                seen.update(phase="up", restarted_at=harness.steps_logged(out)[-1]["step"])
        elif seen["phase"] == "up":
            stats = tier_stats(out, 0, hdfs_root)
            return bool(stats and stats["committed"] >= 2 and stats["committed_step"] > seen["torn"])
        return False

    try:
        logged = harness.run_and_kill(local, out, env, MAX_STEPS - 1, during=outage,
                                      fault=f"stall-remote-persist:4:{ctl}", **options)
    finally:
        if not hdfs_cluster.running:
            hdfs_cluster.start()
    assert seen["phase"] == "up", seen
    # training never stopped: steps went on while HDFS was down and while it restarted
    steps = [d["step"] for d in harness.steps_logged(out)]
    assert steps == list(range(1, logged + 1))
    assert seen["restarted_at"] > seen["failed_at"] >= seen["killed_at"] >= seen["torn"]
    # the outage shows in the metric and in one warning naming the tier and the cause; then it recovered
    stats = tier_stats(out, 0, hdfs_root)
    assert stats["outages"] == 1 and stats["failures"] >= 1 and stats["healthy"] and stats["last_error"]
    log = (out / "stderr.txt").read_text()
    assert 1 <= log.count(f"persisting to {hdfs_root} failed at step") <= 2  # once per rank at most
    assert f"persistence to {hdfs_root} recovered" in log
    # nothing partial is visible: every committed step reads back verified on every rank. The torn step is either
    # uncommitted, or committed because rank 0's retry rewrote it whole once the NameNode was back (the retry races
    # with the next due step); it never appears half written.
    tier = FsspecTier(hdfs_root)
    committed = tier.committed_steps(0)
    assert len(committed) == 2 and committed[-1] > seen["torn"], (committed, tier.steps(), seen, stats, logged)
    assert tier.checkpoint(seen["torn"]).is_committed() == (seen["torn"] in committed)
    for step in committed:
        for rank in range(2):
            tier.read(step, rank)

    # a flipped bit in rank 1's copy of the newest HDFS step
    fs = hdfs_cluster.hdfs_fs()
    path = f"{urllib.parse.urlparse(hdfs_root).path}/step-{committed[-1]:09d}/rank-00001.data"
    raw = bytearray(fs.cat_file(path))
    # inside a tensor (the alignment padding between tensors carries no data, so no checksum covers it)
    largest = max(tier.checkpoint(committed[-1]).read_manifest(1).tensors, key=lambda r: r.nbytes)
    raw[largest.offset + largest.nbytes // 3] ^= 0x04
    fs.rm(path)
    fs.pipe_file(path, bytes(raw))
    # the node is lost: no shared memory, no local disk; resume from HDFS alone
    shutil.rmtree(tmp_path / "shm", ignore_errors=True)
    shutil.rmtree(local)
    # and HDFS is down at the restart: both ranks stop, naming the tier and the cause, instead of training from
    # step 0 (which would lose every checkpoint HDFS holds)
    hdfs_cluster.kill()
    try:
        refused = subprocess.run(harness.command(tmp_path / "fresh-root", tmp_path / "refused", ckpt_path=hdfs_root,
                                                 **options), env=env, capture_output=True, text=True, timeout=300,
                                 start_new_session=True)
    finally:
        hdfs_cluster.start()
    assert refused.returncode != 0, refused.stderr[-3000:]
    assert f"could not list a tier ({hdfs_root}: " in refused.stderr, refused.stderr[-3000:]
    assert "Restore access to the storage" in refused.stderr
    assert not harness.steps_logged(tmp_path / "refused")  # not one step trained
    assert tier.committed_steps(0) == committed  # and nothing removed
    proc = harness.run(tmp_path / "fresh-root", out, env, ckpt_path=hdfs_root, **options)
    resumed = [harness.resumed_from(out, r) for r in range(2)]
    assert resumed[0] == resumed[1] == {"step": committed[0], "source": hdfs_root}
    assert f"checkpoint of step {committed[-1]}, rank 1 in {hdfs_root} is unusable" in proc.stderr
    assert "checksum mismatch in tensor" in proc.stderr
    harness.assert_bit_identical(reference, out, ranks=2)


def earlier_runs_step(tier: FsspecTier, step: int, run: str) -> None:
    """A committed step of another run on ``tier``, both ranks' parts, written through the tier as a run writes."""
    for rank in range(2):
        tensors = [("weight", torch.full((64,), float(rank)))]
        records, size = plan_layout(tensors)
        buffer = torch.zeros(size, dtype=torch.uint8)
        byte_view(buffer, records[0]).copy_(tensors[0][1])
        view = memoryview(buffer.numpy())
        manifest = Manifest(step=step, rank=rank, world_size=2, data_bytes=size, tensors=records, state={"s": step},
                            run=run, run_began=1.0)
        tier.write(with_checksums(manifest, view), view)
    assert tier.try_commit(step, 2, run=run) == []


def test_a_fresh_run_that_could_not_see_a_tier_at_its_start_refuses_it_once_it_is_back(tmp_path, reference, hdfs_cluster, hdfs_root):
    """HDFS holds an earlier run's step and is down when a fresh run (no ckpt_path) starts there. The run warns and
    trains; once the NameNode is back, each rank looks at HDFS before its first write there, finds the earlier run's
    step and refuses the tier (an error and the refused metric), writing and removing nothing there. Its local steps
    commit, and it ends bit-identical to an uninterrupted run."""
    earlier = FsspecTier(hdfs_root)
    earlier_runs_step(earlier, 30, "an-earlier-run")
    local, out = tmp_path / "root", tmp_path / "out"
    env = harness.environment(f"fresh-{tmp_path.name}", tmp_path / "shm")
    command = harness.command(local, out, stage=2, devices=2, max_steps=MAX_STEPS, sleep=0.6,
                              persist=[f"{local}:5:3", f"{hdfs_root}:4:2"], storage_option=FAST_FAIL, commit_timeout=20)
    out.mkdir()
    hdfs_cluster.kill()
    try:
        with open(out / "stderr.txt", "w") as stderr:
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
            try:
                deadline = time.monotonic() + 300
                while len(harness.steps_logged(out)) < 2:  # it started, and trains with HDFS down
                    assert proc.poll() is None, (out / "stderr.txt").read_text()[-6000:]
                    assert time.monotonic() < deadline, "training did not start in time"
                    time.sleep(0.05)
                hdfs_cluster.start()
                assert proc.wait(timeout=300) == 0, (out / "stderr.txt").read_text()[-6000:]
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    finally:
        if not hdfs_cluster.running:
            hdfs_cluster.start()
    log = (out / "stderr.txt").read_text()
    assert log.count(f"could not check a tier for an earlier run's checkpoints ({hdfs_root}") == 2  # each rank's
    assert log.count(f"{hdfs_root} holds step(s) [30] of another line of training than this run's") == 2, log[-6000:]
    for rank in range(2):
        stats = tier_stats(out, rank, hdfs_root)
        assert stats["refused"] and not stats["healthy"], stats
        assert stats["persisted"] == 0
    # nothing written there and nothing removed; the run's steps went to local disk
    assert earlier.steps() == [30] and earlier.commits() == {30: 2}
    assert FsspecTier(str(local)).committed_steps(0)[-3:] == [15, 20, 24]
    harness.assert_bit_identical(reference, out, ranks=2)


def test_a_full_local_disk_warns_and_training_goes_on(tmp_path, reference):
    """The local tier is a real 160 KiB tmpfs (mounted in the run's own user and mount namespace, so no root is
    needed); it fills up after a few steps. Training runs to the end, bit-identical to the reference, with one
    clear warning per rank naming the tier and ENOSPC, and the failures in the metrics."""
    disk = tmp_path / "disk"
    disk.mkdir()
    prefix = harness.in_small_tmpfs(disk, "160k")
    probe = __import__("subprocess").run(prefix + ["true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs in a user namespace here: {probe.stderr.strip()}")
    out, env = tmp_path / "out", harness.environment(f"full-{tmp_path.name}", tmp_path / "shm")
    started = time.monotonic()
    proc = harness.run(tmp_path / "root", out, env, prefix=prefix, stage=2, devices=2, max_steps=MAX_STEPS,
                       persist=[f"{disk}:2:2"], commit_timeout=3)
    assert time.monotonic() - started < 120
    assert "No space left on device" in proc.stderr
    assert f"persisting to {disk} failed at step" in proc.stderr
    for rank in range(2):
        stats = tier_stats(out, rank, str(disk))
        assert stats["failures"] >= 1 and stats["outages"] >= 1 and "No space left" in stats["last_error"]
    assert tier_stats(out, 0, str(disk))["persisted"] >= 1  # it did write until the disk was full
    harness.assert_bit_identical(reference, out, ranks=2)


def test_a_time_schedule_with_two_ranks_persists_steps_both_agreed_on_so_they_commit(tmp_path):
    """After its first time-scheduled request, rank 1's persister counts from half an interval earlier (out of step
    with rank 0, as after a late start). Measured per rank, the two ranks then persisted different steps and none
    committed (steps 1 and 60 of 60 on the old code); the ranks now agree on a step interval for the seconds, so
    they persist the same steps, which commit at one spacing."""
    disk = tmp_path / "disk"
    out, env = tmp_path / "out", harness.environment(f"paced-{tmp_path.name}", tmp_path / "shm")
    harness.run(tmp_path / "root", out, env, stage=2, devices=2, max_steps=60, sleep=0.05, persist=[f"{disk}:1s:all"],
                fault="rank1-persist-clock-early:0.5")
    committed = FsspecTier(str(disk)).committed_steps()
    during = [s for s in committed if s < 60]  # the last step is persisted at the end of training in any case
    assert len(during) >= 2, f"committed steps {committed}"
    spacing = {b - a for a, b in zip(during, during[1:])}
    assert len(spacing) == 1, f"committed steps {committed}"
    # both ranks report the interval they agreed on, the one the commits show
    assert [tier_stats(out, rank, str(disk))["paced_every_n_steps"] for rank in range(2)] == [spacing.pop()] * 2

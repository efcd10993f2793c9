"""The central tests: real DeepSpeed (CPU accelerator, gloo), a real Lightning Trainer, 2 processes, real shared
memory and local disk, killed with SIGKILL and resumed with ckpt_path="last"."""

import json
import random
import shutil
import subprocess
import time

import pytest

from oteacheck_lightning.tiers import FsspecTier, Origin
from tests.support import harness

pytestmark = pytest.mark.multiprocess

MAX_STEPS = 24  # 16 steps per epoch: runs cross an epoch boundary
COMMON = dict(devices=2, max_steps=MAX_STEPS, persist_every=5)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One uninterrupted run per ZeRO stage, checking every snapshot against the live state on the way."""
    done = {}

    def get(stage):
        if stage not in done:
            base = tmp_path_factory.mktemp(f"reference-stage{stage}")
            env = harness.environment(f"ref{stage}-{base.name}", base / "shm")
            harness.run(base / "root", base / "out", env, stage=stage, check_snapshots=True, **COMMON)
            done[stage] = base / "out"
        return done[stage]

    return get


# ZeRO 2 and 3 here; ZeRO 1's SIGKILL resume is bit-exact in the epoch-end test below (its kill is at a fixed step)
@pytest.mark.parametrize("stage", [2, 3])
def test_sigkill_at_a_random_step_then_resume_is_bit_exact(tmp_path, references, stage):
    reference = references(stage)
    kill_after = random.randint(3, MAX_STEPS - 4)
    env = harness.environment(f"kill{stage}-{tmp_path.name}", tmp_path / "shm")
    logged = harness.run_and_kill(tmp_path / "root", tmp_path / "out", env, kill_after, stage=stage, sleep=0.05, **COMMON)
    harness.run(tmp_path / "root", tmp_path / "out", env, stage=stage, ckpt_path="last", **COMMON)
    resumed = [harness.resumed_from(tmp_path / "out", r) for r in range(2)]
    # invariant 4: every rank resumed from the same step, from shared memory, losing at most one iteration
    assert resumed[0]["step"] == resumed[1]["step"]
    assert all(r["source"].startswith("memory:") for r in resumed)
    assert logged - 1 <= resumed[0]["step"] <= logged
    harness.assert_bit_identical(reference, tmp_path / "out", ranks=2)


def test_resume_from_the_last_step_of_an_epoch_keeps_the_next_epochs_data_order(tmp_path, references):
    # 16 steps per epoch: each rank kills itself after step 17, so step 16 (the epoch's last) is the newest sealed
    # snapshot. Lightning alone would resume one epoch late and shuffle the next epoch differently.
    reference = references(1)
    env = harness.environment(f"epoch-end-{tmp_path.name}", tmp_path / "shm")
    with pytest.raises(AssertionError, match="training failed"):
        harness.run(tmp_path / "root", tmp_path / "out", env, stage=1, kill_at=17, **COMMON)
    # a fit without ckpt_path in the same folder stops on both ranks before its first snapshot, and loses nothing
    # (the resume below is bit-exact from step 16, in shared memory)
    disk = sorted(p.name for p in (tmp_path / "root").rglob("*"))
    fresh = subprocess.run(harness.command(tmp_path / "root", tmp_path / "fresh", stage=1, **COMMON), env=env,
                           capture_output=True, text=True, timeout=600, start_new_session=True)
    assert fresh.returncode != 0
    for rank in range(2):
        assert f"[rank{rank}]: oteacheck_lightning.recovery.CheckpointsExistError: this fit was started without " \
               f"ckpt_path, but its checkpoint folder {tmp_path / 'root'} already holds checkpoints (the newest: " \
               "step 16, in " in fresh.stderr, fresh.stderr[-3000:]
    assert 'To continue it, pass ckpt_path="last"' in fresh.stderr
    assert not harness.steps_logged(tmp_path / "fresh")
    assert sorted(p.name for p in (tmp_path / "root").rglob("*")) == disk
    harness.run(tmp_path / "root", tmp_path / "out", env, stage=1, ckpt_path="last", **COMMON)
    assert [harness.resumed_from(tmp_path / "out", r)["step"] for r in range(2)] == [16, 16]
    harness.assert_bit_identical(reference, tmp_path / "out", ranks=2)


def test_a_stream_resumed_from_the_last_step_of_an_epoch_goes_on_with_the_next_epoch(tmp_path, tmp_path_factory):
    # a loader without a length: when step 16 (the epoch's last) ends, Lightning has already found the stream
    # exhausted, while the snapshot keeps the position after batch 16 (not exhausted). The resumed loader finds the
    # stream's end at its first fetch, and the run ends the epoch once and starts the next with its first batch, as
    # the uninterrupted run did. (The kill mid-epoch, where the position matters, is the "stream" loop below.)
    reference = tmp_path_factory.mktemp("reference-stream-epoch")
    harness.run(reference / "root", reference / "out", harness.environment(f"ref-stream-{reference.name}", reference / "shm"),
                stage=2, stream=True, **COMMON)
    env = harness.environment(f"stream-epoch-end-{tmp_path.name}", tmp_path / "shm")
    with pytest.raises(AssertionError, match="training failed"):
        harness.run(tmp_path / "root", tmp_path / "out", env, stage=2, stream=True, kill_at=17, **COMMON)
    harness.run(tmp_path / "root", tmp_path / "out", env, stage=2, stream=True, ckpt_path="last", **COMMON)
    assert [harness.resumed_from(tmp_path / "out", r)["step"] for r in range(2)] == [16, 16]
    harness.assert_bit_identical(reference / "out", tmp_path / "out", ranks=2)


def test_a_rank_whose_sealer_lags_still_shares_a_snapshot_with_its_peers(tmp_path, references):
    # three slots per rank (no persistent tier). Rank 1's sealer stalls on step 8; rank 0 must not drop its slot of
    # step 7 before rank 1 sealed 7, or a crash leaves no snapshot that both ranks hold
    env = harness.environment(f"lagging-seal-{tmp_path.name}", tmp_path / "shm")
    options = dict(COMMON, persist_every=0)
    with pytest.raises(AssertionError, match="training failed"):
        harness.run(tmp_path / "root", tmp_path / "out", env, stage=2, fault="rank1-seal-stalls-then-all-die:8", **options)
    harness.run(tmp_path / "root", tmp_path / "out", env, stage=2, ckpt_path="last", **options)
    resumed = [harness.resumed_from(tmp_path / "out", r) for r in range(2)]
    assert resumed[0] is not None, "no snapshot common to both ranks: training started fresh"
    assert [r["step"] for r in resumed] == [7, 7] and all(r["source"].startswith("memory:") for r in resumed)
    harness.assert_bit_identical(references(2), tmp_path / "out", ranks=2)


def test_every_sealed_snapshot_equals_the_state_after_its_step(references):
    # invariant 2, checked in the reference run of ZeRO 2 at every step; the copies ran past DeepSpeed's gradient
    # norm and clipping, up to the base optimizer's update (the fence at BEFORE_UPDATE)
    for rank in range(2):
        check = json.loads((references(2) / f"snapshot-check-rank{rank}.json").read_text())
        assert check["checked"] >= MAX_STEPS - 2 and check["mismatched"] == check["missing"] == 0
        assert check["fenced_at_update"] >= MAX_STEPS - 2, check


def test_background_threads_never_call_collectives(references):
    # invariant 8: torch.distributed was wrapped in the run; only the training thread used it
    for rank in range(2):
        threads = json.loads((references(2) / f"collectives-rank{rank}.json").read_text())
        assert threads == ["MainThread"]


def test_after_a_node_loss_the_disk_checkpoint_is_taken(tmp_path, references):
    env = harness.environment(f"nodeloss-{tmp_path.name}", tmp_path / "shm")
    harness.run_and_kill(tmp_path / "root", tmp_path / "out", env, 13, stage=2, sleep=0.05, **COMMON)
    shutil.rmtree(tmp_path / "shm")  # the node's shared memory is gone with it
    harness.run(tmp_path / "root", tmp_path / "out", env, stage=2, ckpt_path="last", **COMMON)
    resumed = [harness.resumed_from(tmp_path / "out", r) for r in range(2)]
    assert resumed[0] == resumed[1] == {"step": 10, "source": str(tmp_path / "root")}
    harness.assert_bit_identical(references(2), tmp_path / "out", ranks=2)
    # the resumed run's steps say where its line left the killed run's (so that no later recovery takes a step the
    # killed run wrote after step 10, from a tier that was down at this resume)
    origins = FsspecTier(str(tmp_path / "root")).holdings(0).origins  # kept: 15, 20 and the end's 24
    (killed, at), = origins[15].forks
    assert at == 10 and killed and killed != origins[15].run
    # and when it began, the same on both ranks (the marker holds rank 0's; the commit took manifests of one run)
    assert set(origins.values()) == {Origin(origins[15].run, ((killed, 10),), origins[15].began)}
    began = {json.loads((tmp_path / "root" / "step-000000015" / f"rank-{r:05d}.manifest.json").read_text())["run_began"]
             for r in range(2)}
    assert began == {origins[15].began} and time.time() - 600 < origins[15].began < time.time()


def test_disk_checkpoint_after_node_loss_and_kill_during_a_local_write(tmp_path, references):
    env = harness.environment(f"fault-{tmp_path.name}", tmp_path / "shm")
    # the run dies while rank 0 writes the data of step 15 (steps 5 and 10 were persisted before)
    proc_out = tmp_path / "out"
    with pytest.raises(AssertionError, match="training failed"):
        harness.run(tmp_path / "root", proc_out, env, stage=2, fault="kill-during-persist:15", **COMMON)
    partial = tmp_path / "root" / "step-000000015"
    assert not (partial / "rank-00000.manifest.json").exists()  # invariant 1: nothing partial is committed
    shutil.rmtree(tmp_path / "shm")  # a lost node: only the disk remains
    harness.run(tmp_path / "root", proc_out, env, stage=2, ckpt_path="last", **COMMON)
    resumed = [harness.resumed_from(proc_out, r) for r in range(2)]
    assert resumed[0] == resumed[1] == {"step": 10, "source": str(tmp_path / "root")}
    harness.assert_bit_identical(references(2), proc_out, ranks=2)


def test_a_corrupt_newest_checkpoint_is_skipped_for_the_previous_good_one(tmp_path, references):
    env = harness.environment(f"corrupt-{tmp_path.name}", tmp_path / "shm")
    harness.run_and_kill(tmp_path / "root", tmp_path / "out", env, 12, stage=2, sleep=0.05, **COMMON)
    shutil.rmtree(tmp_path / "shm")
    data = tmp_path / "root" / "step-000000010" / "rank-00001.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0x01  # one flipped bit in rank 1's copy of the newest disk checkpoint
    data.write_bytes(raw)
    harness.run(tmp_path / "root", tmp_path / "out", env, stage=2, ckpt_path="last", **COMMON)
    assert [harness.resumed_from(tmp_path / "out", r)["step"] for r in range(2)] == [5, 5]
    harness.assert_bit_identical(references(2), tmp_path / "out", ranks=2)


def test_no_checkpoint_anywhere_starts_fresh(tmp_path, references):
    env = harness.environment(f"fresh-{tmp_path.name}", tmp_path / "shm")
    proc = harness.run(tmp_path / "root", tmp_path / "out", env, stage=2, ckpt_path="last", **COMMON)
    assert "starting fresh" in proc.stderr
    assert harness.resumed_from(tmp_path / "out", 0) is None
    harness.assert_bit_identical(references(2), tmp_path / "out", ranks=2)


# accumulate_grad_batches=2: Lightning calls the strategy's optimizer step at every batch and DeepSpeed updates at
# every second one (AFTER_STEP used to come after the next window's first batch, and the fence with it); 12 steps
# are 24 batches, across the 16-batch epoch. With it, a snapshot every 3 steps: a kill loses up to two intervals, and
# the resume replays them bit for bit. Manual optimization: the model's training step runs backward, the optimizer
# step and the scheduler, all inside the events of its forward pass. fp16: DeepSpeed's dynamic loss scale overflows
# in the first steps and skips their updates; each skipped step's snapshot is fenced at its end instead (the state did
# not change), and the loss scaler resumes where it was. A loader without a length: Lightning holds the next batch
# already when a step ends, and the resumed loader must start at that batch (its epoch has 16 steps, so every kill
# here falls mid-epoch, where a position one batch ahead skips a batch). With it, validation every 5 batches: the
# snapshot's copies run on through it, and the resumed run validates where the uninterrupted one did. (Features that
# combine share a run, to keep CI short.)
LOOPS = {"stream-validate": dict(stream=True, validate_every=5), "accumulate-every3": dict(accumulate=2, snapshot_every=3, persist_every=6),
         "manual": dict(manual=True), "fp16": dict(precision="16-mixed")}


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_sigkill_resume_is_bit_exact_and_the_fence_waits_for_the_update_in_other_loops(tmp_path, tmp_path_factory, loop):
    # every sealed snapshot is the state its step ended with, its copies run up to the update, and a run killed at
    # a random step resumes bit-exact
    options = dict(COMMON, stage=2, max_steps=12, **LOOPS[loop])
    every = options.get("snapshot_every", 1)
    reference = tmp_path_factory.mktemp(f"reference-{loop}")
    env = harness.environment(f"ref-{loop}-{reference.name}", reference / "shm")
    harness.run(reference / "root", reference / "out", env, check_snapshots=True, **options)
    for rank in range(2):
        check = json.loads((reference / "out" / f"snapshot-check-rank{rank}.json").read_text())
        assert check["checked"] >= 12 // every - 1 and check["mismatched"] == check["missing"] == 0, check
        assert check["fenced_at_update"] + check["skipped_updates"] >= check["checked"], check
        assert (check["skipped_updates"] > 0) == (loop == "fp16"), check
    kill_after = random.randint(2 + every, 9)  # past the first snapshot's seal
    env = harness.environment(f"kill-{loop}-{tmp_path.name}", tmp_path / "shm")
    logged = harness.run_and_kill(tmp_path / "root", tmp_path / "out", env, kill_after, sleep=0.05, **options)
    harness.run(tmp_path / "root", tmp_path / "out", env, ckpt_path="last", **options)
    resumed = [harness.resumed_from(tmp_path / "out", r) for r in range(2)]
    assert resumed[0]["step"] == resumed[1]["step"] and all(r["source"].startswith("memory:") for r in resumed)
    # the newest snapshotted step, or the one before it if the kill came before its seal
    assert logged - 2 * every < resumed[0]["step"] <= logged and resumed[0]["step"] % every == 0
    harness.assert_bit_identical(reference / "out", tmp_path / "out", ranks=2)
    if "validate_every" in LOOPS[loop]:  # the same validations, at the same steps, with the same results (a repeat replaces one)
        def validations(out, rank):
            lines = (out / f"validations-rank{rank}.jsonl").read_text().splitlines()
            return {d["step"]: d["val_loss"] for d in map(json.loads, lines)}

        for rank in range(2):
            expected = validations(reference / "out", rank)
            assert len(expected) >= 2 and validations(tmp_path / "out", rank) == expected


def test_a_run_killed_on_one_machine_resumes_on_fewer_processes_from_shared_memory(tmp_path):
    # all ranks ran on this machine, so every rank's snapshot of the newest step is here: the resume with one
    # process re-partitions it (the state's exactness is tested from disk in tests/cli/test_resize.py)
    env = harness.environment(f"fewer-{tmp_path.name}", tmp_path / "shm")
    logged = harness.run_and_kill(tmp_path / "root", tmp_path / "out", env, 7, stage=3, sleep=0.05, **COMMON)
    job = next((tmp_path / "shm").iterdir())
    assert sorted(p.name for p in job.iterdir()) == ["rank-00000", "rank-00001"]
    harness.run(tmp_path / "root", tmp_path / "out", env, stage=3, ckpt_path="last", **{**COMMON, "devices": 1})
    resumed = harness.resumed_from(tmp_path / "out", 0)
    assert resumed["source"].startswith("memory:") and logged - 1 <= resumed["step"] <= logged
    assert harness.steps_logged(tmp_path / "out")[-1]["step"] == MAX_STEPS
    assert not job.exists()  # rank 1's snapshots were freed at the resume, rank 0's at the normal end

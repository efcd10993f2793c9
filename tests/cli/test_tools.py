"""The checkpoint tools on checkpoints written with the real format and tier code (no training needed)."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from oteacheck_lightning import cli, tools
from oteacheck_lightning.format import Manifest, plan_layout, with_checksums
from oteacheck_lightning.tiers import CheckpointDir, FsspecTier

# a ZeRO-2-like layout: parameters a (3x4) and b (5) back to back in one flat group of 18 elements (one element of
# padding), cut into two partitions of 9; a spans both ranks
A = torch.arange(12, dtype=torch.float32).view(3, 4)
B = torch.arange(100, 105, dtype=torch.float32)
FLAT = torch.cat([A.view(-1), B, torch.zeros(1)])
BN = torch.tensor([7.0, 8.0])
PMAP = [
    {"groups": [{"master": "fp32/0", "params": [
        {"name": "_forward_module.a", "shape": [3, 4], "segments": [[0, 0, 9]]},
        {"name": "_forward_module.b", "shape": [5], "segments": []}]}],
     "frozen": [], "aliases": {"_forward_module.tied": "_forward_module.a"}, "buffers": ["_forward_module.bn"]},
    {"groups": [{"master": "fp32/0", "params": [
        {"name": "_forward_module.a", "shape": [3, 4], "segments": [[9, 0, 3]]},
        {"name": "_forward_module.b", "shape": [5], "segments": [[0, 3, 5]]}]}],
     "frozen": [], "aliases": {"_forward_module.tied": "_forward_module.a"}, "buffers": ["_forward_module.bn"]},
]


def write_rank(directory: CheckpointDir, step: int, rank: int, param_map: bool = True, run: str = "",
               forks: tuple = (), began: float = 0.0) -> None:
    named = [("fp32/0", FLAT[rank * 9 : (rank + 1) * 9].clone()), ("optim/fp32/0/exp_avg", torch.ones(9)),
             ("buffer/_forward_module.bn", BN.clone())]
    records, data_bytes = plan_layout(named)
    buffer = torch.zeros(data_bytes, dtype=torch.uint8)
    for record, (_, t) in zip(records, named):
        buffer[record.offset : record.offset + record.nbytes] = t.view(-1).view(torch.uint8)
    deepspeed = {"stage": 2, **({"param_map": PMAP[rank]} if param_map else {})}
    manifest = Manifest(step, rank, 2, data_bytes, records, {"main": {"deepspeed": deepspeed}, "rng": {}}, run=run,
                        forks=[list(f) for f in forks], run_began=began)
    view = memoryview(buffer.numpy())
    directory.write_rank(with_checksums(manifest, view), view)


def commit(directory: CheckpointDir, step: int) -> None:
    """Publishes the step where the layout has a step-level commit marker (written by the coordinator)."""
    try_commit = getattr(directory, "try_commit", None)
    if try_commit is not None:
        assert try_commit(step, 2) == []


def write_step(tier: FsspecTier, step: int, param_map: bool = True, run: str = "", forks: tuple = (),
               began: float = 0.0) -> None:
    for rank in (0, 1):
        write_rank(tier.checkpoint(step), step, rank, param_map, run, forks, began)
    commit(tier.checkpoint(step), step)


@pytest.fixture
def tier(tmp_path):
    root = tmp_path / "tier"
    t = FsspecTier(str(root))
    for step in (10, 20, 30):
        write_step(t, step)
    write_rank(t.checkpoint(40), 40, 0)  # rank 1 has not written step 40 (yet): not committed
    return root


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ls_lists_steps_ranks_sizes_and_commits(tier, capsys):
    code, out, _ = run(capsys, "ls", str(tier))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["STEP", "RANKS", "SIZE", "COMMITTED", "VERIFIED", "RUN"]
    assert [line.split()[0] for line in lines[1:]] == ["10", "20", "30", "40"]
    assert lines[-1].split()[1] == "1/2" and "no" in lines[-1].split()
    code, out, _ = run(capsys, "ls", str(tier), "--json", "--verify")
    assert code == 0
    doc = json.loads(out)
    assert [(c["step"], c["committed"], c["verified"]) for c in doc] == [
        (10, True, True), (20, True, True), (30, True, True), (40, False, None)]


def test_ls_names_each_steps_run_and_marks_a_step_of_an_abandoned_timeline(tmp_path, capsys):
    # run A persisted steps 4 and 8; run B resumed from step 4 and persisted step 6, but could not remove step 8
    # (the tier was down at the resume)
    root = tmp_path / "tier"
    t = FsspecTier(str(root))
    for step in (4, 8):
        write_step(t, step, run="a" * 32)
    write_step(t, 6, run="b" * 32, forks=(("a" * 32, 4),))
    code, out, _ = run(capsys, "ls", str(root))
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows["4"].endswith("  aaaaaaaa") and rows["6"].endswith("  bbbbbbbb")
    assert rows["8"].endswith("  aaaaaaaa (abandoned: a later run resumed from step 4)")
    code, out, _ = run(capsys, "ls", str(root), "--json")
    assert [(c["step"], c["run"][:1], c["abandoned_after"]) for c in json.loads(out)] == [(4, "a", None), (6, "b", None), (8, "a", 4)]
    # export's newest complete checkpoint is the newest of the live timeline; step 8 only when asked for by number
    assert tools.resolve_checkpoint(str(root)).step == 6
    assert tools.resolve_checkpoint(str(root), step=8).step == 8
    # gc keeps the live timeline's newest: step 8 does not count among the kept
    assert tools.gc(str(root), keep=1, dry_run=True) == [4]
    # run C, started afresh later beside them (their tier was down at its start): the line begun last is live,
    # and every step of the earlier runs is of an abandoned timeline
    write_step(t, 2, run="c" * 32, began=300.0)
    code, out, _ = run(capsys, "ls", str(root))
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows["2"].endswith("  cccccccc")
    assert rows["6"].endswith("  bbbbbbbb (abandoned: a later run did not go on from it)")
    assert tools.resolve_checkpoint(str(root)).step == 2


def test_verify_detects_a_flipped_bit_and_names_the_tensor(tier, capsys):
    assert run(capsys, "verify", str(tier))[0] == tools.Exit.OK
    data = tier / "step-000000020" / "rank-00001.data"
    raw = bytearray(data.read_bytes())
    raw[5] ^= 0x10
    data.write_bytes(raw)
    code, out, _ = run(capsys, "verify", str(tier))
    assert code == tools.Exit.CORRUPT == 4
    assert "step 20 rank 1: CORRUPT data: checksum mismatch in tensor 'fp32/0'" in out
    assert "step 30 rank 1: ok" in out
    assert run(capsys, "verify", str(tier), "--step", "30")[0] == tools.Exit.OK
    assert run(capsys, "ls", str(tier), "--verify")[0] == tools.Exit.CORRUPT


def test_exit_codes_for_not_found_and_usage(tmp_path, capsys):
    code, _, err = run(capsys, "ls", str(tmp_path / "nowhere"))
    assert code == tools.Exit.NOT_FOUND == 3
    assert err.startswith("oteacheck ls: error: ") and "does not exist" in err
    assert run(capsys, "verify", str(tmp_path))[0] == tools.Exit.NOT_FOUND
    with pytest.raises(SystemExit) as exc:
        cli.main(["gc", str(tmp_path)])  # --keep is required
    assert exc.value.code == tools.Exit.USAGE == 2
    assert run(capsys, "gc", str(tmp_path), "--keep", "0")[0] == tools.Exit.USAGE


def test_gc_keeps_the_newest_complete_checkpoints_and_newer_writes(tier, capsys):
    code, out, _ = run(capsys, "gc", str(tier), "--keep", "2", "--dry-run")
    assert code == 0 and "would remove 1 checkpoint(s): steps [10]" in out
    assert (tier / "step-000000010").exists()
    code, out, _ = run(capsys, "gc", str(tier), "--keep", "1", "--json")
    assert code == 0 and json.loads(out) == {"removed": [10, 20], "dry_run": False}
    assert FsspecTier(str(tier)).steps() == [30, 40]  # 40 is not complete, but newer: maybe a write in progress


def test_export_consolidates_partitions_from_every_rank(tier, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    code, text, _ = run(capsys, "export", str(tier), str(out))
    assert code == 0 and "of step 30 (ZeRO 2, 2 ranks)" in text  # step 40 is incomplete
    weights = load_file(str(out))
    assert sorted(weights) == ["a", "b", "bn", "tied"]
    assert torch.equal(weights["a"], A) and torch.equal(weights["b"], B) and torch.equal(weights["bn"], BN)
    assert torch.equal(weights["tied"], A)
    assert run(capsys, "export", str(tier / "step-000000010"), str(out))[0] == 0
    assert load_file(str(out))["b"].equal(B)
    assert run(capsys, "export", str(tier), str(out), "--step", "40")[0] == tools.Exit.NOT_FOUND


def test_export_refuses_a_corrupt_master_and_a_checkpoint_without_a_map(tmp_path, capsys):
    write_step(FsspecTier(str(tmp_path / "old")), 5, param_map=False)
    code, _, err = run(capsys, "export", str(tmp_path / "old"), str(tmp_path / "w.safetensors"))
    assert code == tools.Exit.UNSUPPORTED == 5 and "no parameter map" in err
    write_step(FsspecTier(str(tmp_path / "good")), 5)
    data = tmp_path / "good" / "step-000000005" / "rank-00000.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(raw)
    code, _, err = run(capsys, "export", str(tmp_path / "good"), str(tmp_path / "w.safetensors"))
    assert code == tools.Exit.CORRUPT and "checksum mismatch in tensor 'fp32/0'" in err
    assert not (tmp_path / "w.safetensors").exists()


def test_the_tools_never_unpickle(tier, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a tool tried to unpickle")

    for target, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(target, name, refuse)
    assert run(capsys, "ls", str(tier), "--verify")[0] == 0
    assert run(capsys, "verify", str(tier))[0] == 0
    assert run(capsys, "export", str(tier), str(tmp_path / "w.safetensors"))[0] == 0


def _seal_snapshots(memory_dir, job, rank, steps, world_size=2):
    from oteacheck_lightning.slots import SlotPool, rank_folder

    pool = SlotPool(rank_folder(memory_dir, job, rank), 3)
    for step in steps:
        slot = pool.acquire(8192)
        slot.buffer[:] = 1  # every data page written, as a snapshot's copies would
        pool.seal(slot, Manifest(step=step, rank=rank, world_size=world_size, data_bytes=8192, tensors=[], state={}))
    return pool


def test_memory_lists_each_jobs_snapshots_on_this_machine_and_finds_a_run_by_its_checkpoint_folder(tmp_path, capsys):
    from oteacheck_lightning.slots import job_id_for

    shm = tmp_path / "shm"
    job = job_id_for(str(tmp_path / "ckpt"))
    # rank 1 lags a step behind rank 0: a restart here resumes from the newest step both hold
    pools = [_seal_snapshots(shm, job, 0, [3, 4, 5]), _seal_snapshots(shm, job, 1, [3, 4])]
    _seal_snapshots(shm, "other-job", 0, [9], world_size=1)
    (shm / "oteacheck-empty").mkdir()  # a job folder without ranks: not a job
    (shm / "unrelated").mkdir()

    assert cli.main(["memory", str(shm), "--json"]) == 0
    jobs = {j["job"]: j for j in json.loads(capsys.readouterr().out)}
    assert set(jobs) == {job, "other-job"}
    mine = jobs[job]
    assert mine["ranks"] == [{"rank": 0, "steps": [3, 4, 5]}, {"rank": 1, "steps": [3, 4]}]
    assert (mine["world_size"], mine["newest_on_every_rank"], mine["newest"]) == (2, 4, 5)
    assert mine["bytes"] >= 5 * 8192 and 0 <= mine["sealed_seconds_ago"] < 60

    assert cli.main(["memory", str(shm), "--dirpath", str(tmp_path / "ckpt")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 and table[1].split()[:4] == [job, "2/2", "4", "5"]

    assert cli.main(["memory", str(shm), "--dirpath", str(tmp_path / "elsewhere")]) == tools.Exit.NOT_FOUND
    assert "no snapshots of job" in capsys.readouterr().err
    assert cli.main(["memory", str(tmp_path / "missing")]) == tools.Exit.NOT_FOUND
    for pool in pools:
        pool.close(remove=True)


def test_memory_remove_frees_an_abandoned_jobs_memory_and_refuses_while_a_process_maps_it(tmp_path, capsys):
    import subprocess
    import sys

    shm = tmp_path / "shm"
    # another process holds the job's slots mapped, as a running job does; a line on stdout says they are sealed
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from oteacheck_lightning.format import Manifest\n"
        "from oteacheck_lightning.slots import SlotPool, rank_folder\n"
        "pool = SlotPool(rank_folder(sys.argv[1], 'live', 0), 3)\n"
        "slot = pool.acquire(8192)\n"
        "pool.seal(slot, Manifest(step=1, rank=0, world_size=1, data_bytes=8192, tensors=[], state={}))\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"), str(shm)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert cli.main(["memory", str(shm), "--remove", "live"]) == tools.Exit.IN_USE
        assert f"in use by process {holder.pid}" in capsys.readouterr().err
        assert (shm / "oteacheck-live" / "rank-00000").is_dir()
    finally:
        holder.kill()
        holder.wait()
    # killed, as a crashed job is: its snapshots stay until removed
    assert cli.main(["memory", str(shm), "--json"]) == 0
    assert [j["job"] for j in json.loads(capsys.readouterr().out)] == ["live"]
    assert cli.main(["memory", str(shm), "--remove", "live"]) == 0
    assert not (shm / "oteacheck-live").exists()
    assert cli.main(["memory", str(shm), "--remove", "live"]) == tools.Exit.NOT_FOUND

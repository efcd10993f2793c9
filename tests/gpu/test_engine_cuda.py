"""The CUDA copy engine on a real GPU: copy stream, staging ring, page-locked shared-memory slots."""

import gc
import json

import pytest
import torch

from oteacheck_lightning.bubbles import Phase, PhaseEvent
from oteacheck_lightning.engine import SnapshotEngine
from oteacheck_lightning.format import load_tensors, plan_layout
from oteacheck_lightning.plan import MiB
from oteacheck_lightning.slots import SlotPool
from tests.support import harness

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PHASES = [Phase.ITERATION_START, Phase.FORWARD_START, Phase.FORWARD_END, Phase.BUCKET_REDUCED, Phase.BACKWARD_END]


class FakeManifest:
    def __init__(self, records):
        self.tensors = records


def make_state(mib_per_master=96):
    n = mib_per_master * MiB // 4
    g = torch.Generator(device="cuda").manual_seed(0)
    named = [("fp32/0", torch.randn(n, device="cuda", generator=g))]
    named += [(f"optim/fp32/0/{k}", torch.randn(n, device="cuda", generator=g)) for k in ("exp_avg", "exp_avg_sq")]
    named += [(f"frozen/p{i}", torch.randn(17 * i + 1, device="cuda", generator=g)) for i in range(40)]
    named += [(f"buffer/bn{i}.running_mean", torch.randn(64, device="cuda", generator=g)) for i in range(20)]
    named += [(f"buffer/bn{i}.num_batches_tracked", torch.tensor(i, device="cuda")) for i in range(20)]
    return named


def iteration(engine, step, named, work, compute):
    """One training iteration: forward work that changes the buffers, backward work, fence, optimizer step."""
    for phase in PHASES:
        engine.on_event(PhaseEvent(phase, step, 0, 0 if phase is Phase.BUCKET_REDUCED else None))
        if phase is Phase.FORWARD_START:
            for _ in range(compute):
                work = torch.tanh(work @ work)
            for name, t in named:
                if name.startswith("buffer/"):
                    t.add_(1)  # BatchNorm statistics change during forward
        if phase is Phase.FORWARD_END:
            for _ in range(compute):
                work = torch.tanh(work @ work)
    ticket = engine.fence()
    for name, t in named:
        if not name.startswith("buffer/"):
            t.mul_(0.999).add_(0.001)  # the optimizer step changes masters and states right after the fence
    return ticket, work


@pytest.mark.parametrize("policy", ["bubbles", "bubbles-pump", "bubbles-split", "eager", "naive"])
def test_snapshot_t_equals_the_state_after_step_t_while_training_continues(shm_dir, policy):
    named = make_state(32)
    records, size = plan_layout(named)
    pool = SlotPool(shm_dir / "slots", 3)
    base = policy.split("-")[0]
    engine = SnapshotEngine(torch.device("cuda"), base, staging_bytes=16 * MiB, bucket_elements=5_000_000,
                            pump=policy.endswith("-pump"))
    engine.copier.coalesce = not policy.endswith("-split")  # one copy call per partition
    pool.set_unmap_hook(engine.forget)
    boundary = [n.startswith("buffer/") for n, _ in named]
    work = torch.randn(1024, 1024, device="cuda")
    try:
        for step in range(6):
            expected = {n: t.detach().cpu().clone() for n, t in named}
            slot = pool.acquire(size)
            engine.start(slot.buffer, records, [t for _, t in named], boundary)
            ticket, work = iteration(engine, step + 1, named, work, compute=20)
            ticket.wait()
            snapshot = load_tensors(FakeManifest(records), slot.buffer)
            mismatched = [n for n, t in expected.items() if not harness.same_bits(snapshot[n], t)]
            assert mismatched == [], f"step {step}: snapshot differs from the state after the step in {mismatched[:5]}"
            pool.abandon(slot)
    finally:
        pool.close(remove=True)
        engine.close()


def test_gpu_memory_beyond_the_ring_does_not_grow_over_200_steps(shm_dir):
    named = make_state(16)
    records, size = plan_layout(named)
    pool = SlotPool(shm_dir / "slots", 3)
    staging = 8 * MiB
    engine = SnapshotEngine(torch.device("cuda"), "bubbles", staging_bytes=staging)
    pool.set_unmap_hook(engine.forget)
    boundary = [n.startswith("buffer/") for n, _ in named]
    work = torch.randn(512, 512, device="cuda")
    gc.collect()  # what earlier tests left to the collector must not be freed inside the measurement
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    peaks = []
    try:
        for step in range(200):
            slot = pool.acquire(size)
            engine.start(slot.buffer, records, [t for _, t in named], boundary)
            ticket, work = iteration(engine, step + 1, named, work, compute=2)
            ticket.wait()
            pool.abandon(slot)
            peaks.append(torch.cuda.memory_allocated() - before)
    finally:
        pool.close(remove=True)
        engine.close()
    assert max(peaks) <= staging, f"extra GPU memory {max(peaks)} exceeds the staging ring ({staging})"
    assert peaks[-1] == peaks[1], "GPU memory grew over 200 snapshots"


def test_the_stall_accounting_adds_up(shm_dir):
    named = make_state(64)
    records, size = plan_layout(named)
    pool = SlotPool(shm_dir / "slots", 2)
    boundary = [n.startswith("buffer/") for n, _ in named]
    work = torch.randn(2048, 2048, device="cuda")
    results = {}
    engine = None
    try:
        for label, compute in (("no bubbles", 0), ("long iteration", 150)):
            # an engine per regime: windows count at their shortest recent length, so one engine would carry the
            # empty windows of the first regime into the second for a while
            if engine is not None:
                engine.close()
            engine = SnapshotEngine(torch.device("cuda"), "bubbles", staging_bytes=64 * MiB)
            pool.set_unmap_hook(engine.forget)
            stalls = []
            for step in range(8):
                slot = pool.acquire(size)
                engine.start(slot.buffer, records, [t for _, t in named], boundary)
                ticket, work = iteration(engine, step + 1, named, work, compute)
                ticket.wait()
                stats = engine.stats
                assert sum(stats.bytes_by_phase.values()) == stats.planned_bytes
                assert stats.fence_bytes == stats.bytes_by_phase.get("before_step", 0)
                # the issuer thread made the copy calls, and its time is accounted
                assert stats.issues >= 1 and stats.issuer_ms > 0
                stalls.append(ticket.stall_ms())
                pool.abandon(slot)
            copy_ms = stats.planned_bytes / (stats.gbps * 1e6)
            results[label] = dict(stall_ms=sorted(stalls)[len(stalls) // 2], copy_ms=copy_ms, gbps=stats.gbps,
                                  by_phase=stats.bytes_by_phase)
    finally:
        pool.close(remove=True)
        if engine is not None:
            engine.close()
    print(json.dumps(results, indent=1))
    # with no compute to hide in, the copy shows up as stall; with a long iteration it is hidden
    assert results["no bubbles"]["stall_ms"] >= 0.5 * results["no bubbles"]["copy_ms"]
    assert results["long iteration"]["stall_ms"] <= 0.2 * results["long iteration"]["copy_ms"]


def test_training_run_snapshots_match_the_live_state(tmp_path, shm_dir):
    env = harness.environment(f"gpu-check-{tmp_path.name}", shm_dir)
    harness.run(tmp_path / "root", tmp_path / "out", env, stage=2, devices=1, accelerator="cuda", max_steps=25,
                persist_every=10, check_snapshots=True)
    check = json.loads((tmp_path / "out" / "snapshot-check-rank0.json").read_text())
    assert check["checked"] >= 20 and check["mismatched"] == check["missing"] == 0
    # the copies ran on past DeepSpeed's gradient norm, up to the base optimizer's update
    assert check["fenced_at_update"] >= 20, check


def test_waiting_for_a_snapshots_copies_sleeps_instead_of_spinning_a_core(shm_dir):
    # the sealer waits on the fence ticket for up to an iteration; spinning would cost a core per rank
    import time

    named = make_state(16)
    records, size = plan_layout(named)
    pool = SlotPool(shm_dir / "slots", 3)
    engine = SnapshotEngine(torch.device("cuda"), "bubbles", staging_bytes=16 * MiB)
    pool.set_unmap_hook(engine.forget)
    boundary = [n.startswith("buffer/") for n, _ in named]
    try:
        slot = pool.acquire(size)
        engine.start(slot.buffer, records, [t for _, t in named], boundary)
        engine.on_event(PhaseEvent(Phase.ITERATION_START, 1, 0, None))
        torch.cuda._sleep(600_000_000)  # GPU work before the fence point: 0.3 s at 2 GHz, longer at lower clocks
        ticket = engine.fence()
        wall, cpu = time.perf_counter(), time.thread_time()
        ticket.wait()
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        pool.abandon(slot)
    finally:
        pool.close(remove=True)
        engine.close()
    assert wall > 0.1, f"the wait took {wall:.3f} s; the GPU work before the fence should have made it longer"
    assert cpu < 0.25 * wall, f"the waiting thread used {cpu:.3f} s of CPU in {wall:.3f} s: it spun"


@pytest.mark.parametrize("layout", ["capture", "interleaved"])
def test_boundary_tensors_reach_the_slot_bit_for_bit_packed_or_one_by_one(shm_dir, layout):
    # the capture's layout puts the boundary tensors back to back, GPU ones first: those on the GPU go through the
    # ring as one transfer; a layout with other records between them is copied tensor by tensor. Both must give the
    # state after the step, and the padding inside the packed span holds zeros, not bytes of an earlier snapshot.
    from oteacheck_lightning import OTeaCheckpointIO

    named = make_state(4)
    named.append(("state/metric.total", torch.arange(5, dtype=torch.float64)))  # a boundary tensor on the host
    if layout == "capture":
        records, _, boundary, size = OTeaCheckpointIO()._layout(named, [])
    else:
        ahead, at_boundary = named[:43], named[43:]  # masters, optimizer states, frozen weights; buffers and state
        named = [x for pair in zip(ahead, at_boundary) for x in pair] + ahead[len(at_boundary) :]
        records, size = plan_layout(named)
        boundary = [n.startswith(("buffer/", "state/")) for n, _ in named]
    pool = SlotPool(shm_dir / "slots", 2)
    engine = SnapshotEngine(torch.device("cuda"), "bubbles", staging_bytes=8 * MiB, bucket_elements=1_000_000)
    pool.set_unmap_hook(engine.forget)
    work = torch.randn(256, 256, device="cuda")
    try:
        for step in range(3):
            expected = {n: t.detach().cpu().clone() for n, t in named}
            slot = pool.acquire(size)
            slot.buffer.fill_(0xFF)  # what an earlier snapshot could have left
            engine.start(slot.buffer, records, [t for _, t in named], boundary)
            packed = engine._packed_for[2]
            if layout == "capture":
                assert packed is not None and len(packed.groups) == 2 and len(packed.rest) == 1
            else:
                assert packed is None
            ticket, work = iteration(engine, step + 1, named, work, compute=2)
            ticket.wait()
            snapshot = load_tensors(FakeManifest(records), slot.buffer)
            mismatched = [n for n, t in expected.items() if not harness.same_bits(snapshot[n], t)]
            assert mismatched == [], f"step {step}: snapshot differs from the state after the step in {mismatched[:5]}"
            if packed is not None:
                span = slot.buffer[packed.lo : packed.hi].clone()
                for r in records:
                    if packed.lo <= r.offset < packed.hi:
                        span[r.offset - packed.lo : r.offset - packed.lo + r.nbytes] = 0
                assert int(span.count_nonzero()) == 0, "padding in the packed span is not zero"
            pool.abandon(slot)
    finally:
        pool.close(remove=True)
        engine.close()

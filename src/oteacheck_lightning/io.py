"""``OTeaCheckpointIO``: the checkpoint plugin, a facade over the slots, the snapshot engine, the tiers, the persister
and recovery.

It implements Lightning's :class:`~lightning.fabric.plugins.io.checkpoint_io.CheckpointIO` faithfully
(``save_checkpoint`` writes a durable checkpoint at a path, ``load_checkpoint`` reads one, ``remove_checkpoint``,
``teardown``), and adds the every-iteration snapshot that :class:`~oteacheck_lightning.OTeaCheckStrategy` drives,
all on the training thread:

1. ``capture(step, state)`` at the end of optimizer step *t*: take a free shared-memory slot, copy what the next
   forward pass would change (buffers, metric states, Lightning's small state), arm the engine with the rest;
2. ``on_phase(ITERATION_START)`` of iteration *t+1*: grab the RNG states (the point a resumed run restores them);
3. ``on_phase(...)`` at the bubbles of *t+1*: the engine copies partitions of snapshot *t* while training runs;
4. ``on_phase(BEFORE_STEP)``: the fence; optimizer step *t+1* waits for what is left (the stall), and the snapshot
   goes to the sealer.

The sealer, a background thread, waits for the copies to land, writes the RNG states into the slot and then the
manifest (the slot becomes the newest in-memory checkpoint), and tells the persister, which writes the newest
sealed slot to the persistent tiers. None of that is on the training thread: in a loop bound by the host, every
millisecond there is iteration time, while the sealer mostly runs when the training thread waits for the GPU.

Two moments are kept apart in the metrics: a snapshot is *safe* (training may go on) when sealed, and *durable*
when a persistent tier committed it.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.types import _PATH

from . import statecodec
from .bubbles import Phase, PhaseEvent
from .copier import FenceTicket, HostCopier
from .deepspeed_state import DeepSpeedState
from .engine import DEFAULT_STAGING_MIB, EngineStats, SnapshotEngine
from .format import Manifest, TensorRecord, load_tensors, plan_layout, with_checksums
from .persist import Persister, PersistSchedule, TargetStats
from .plan import MiB
from .recovery import Gather, newest_held, recover, take_in_every_rank
from .reshard import Repartition
from .scheduler import SchedulePolicy, WindowKey
from .slots import DEFAULT_SHM_ROOT, Slot, SlotPool, job_id_for, rank_folder
from .tiers import CheckpointDir, FsspecTier, LoadedRankCheckpoint, MemoryTier, Origin
from .training_state import RawRng, collect_metrics, find_metrics, grab_rng, rng_state
from .worker import BackgroundWorker

log = logging.getLogger(__name__)

# keys of Lightning's checkpoint dict that may hold user objects; if they cannot be stored without pickle they are
# left out (the model is rebuilt from code on resume), with one warning
_OPTIONAL_KEYS = ("hyper_parameters", "hparams_type", "datamodule_hyper_parameters", "datamodule_hparams_type")
PRIVATE_KEY = "_oteacheck"
# tensors that the next forward pass may change: copied at the step boundary, never ahead
_BOUNDARY_PREFIXES = ("buffer/", "state/")


@dataclass
class _Pending:
    step: int
    slot: Slot
    records: list[TensorRecord]
    rng_records: list[TensorRecord]
    document: Any
    data_bytes: int
    capture_ms: float = 0.0
    seal_wait_ms: float = 0.0  # the training thread's waits for earlier seals in the iteration that ended with it
    rng: RawRng | None = None  # grabbed at the start of iteration t+1, stored by the sealer
    ticket: FenceTicket | None = None
    copies: EngineStats | None = None  # the engine's account of this snapshot's copies, complete at its fence
    # made by the sealer ahead of the fence (RNG states stored, manifest serialized), so that at the fence only the
    # manifest's write is left: see _prepare
    preparing: bool = False
    discard: bool = False  # fenced too late to be trusted: the sealer releases its slot instead of sealing it
    manifest: Manifest | None = None
    payload: bytes = b""
    prepare_ms: float = 0.0


MIN_MEMORY_SLOTS = 3
# the forks a manifest keeps (Manifest.forks): the newest 64, so a manifest stays small however often a job resumes
# (a step left behind 64 resumes ago would have to lie in a tier that stayed down through all of them)
MAX_FORKS = 64


@dataclass(frozen=True)
class SealedSnapshot:
    """The account of one sealed snapshot. The sealer publishes it whole, as one reference, so a reader on another
    thread (the logger's, on the training thread) never mixes the numbers of two snapshots."""

    step: int = -1
    count: int = 0  # snapshots sealed so far, this one included
    stall_ms: float = 0.0  # fence_ms + capture_ms + seal_wait_ms: what the training thread lost to this snapshot
    fence_ms: float = 0.0  # how long the optimizer step waited for the copies (GPU time on CUDA)
    capture_ms: float = 0.0  # training-thread time at the step boundary
    seal_wait_ms: float = 0.0  # training-thread time in its iteration waiting for earlier snapshots to be sealed
    seal_ms: float = 0.0  # sealer time to store the RNG and publish the manifest (not on the training thread)
    issues: int = 0  # calls that queued the copies, spread over the next iteration
    issue_ms: float = 0.0  # training-thread time in those calls (not in stall_ms: it overlaps the GPU's work)
    issuer_ms: float = 0.0  # the copy-issuer thread's CPU time for them (on a GPU)
    bytes: int = 0
    bytes_by_phase: Mapping[str, int] = field(default_factory=dict)
    copy_gbps: float = 0.0


@dataclass
class SnapshotStats:
    """Metrics of the in-memory snapshots: counters, the persistent tiers' state and the last sealed snapshot."""

    skipped: int = 0  # snapshots not taken: no free slot (training thread)
    seal_wait_total_ms: float = 0.0  # the training thread's waits for lagging seals, all of them (training thread)
    persist_request_errors: int = 0  # sealed snapshots the persister could not be told of (they stay in memory)
    tiers: dict[str, TargetStats] = field(default_factory=dict)
    last: SealedSnapshot = field(default_factory=SealedSnapshot)

    @property
    def sealed_step(self) -> int:
        return self.last.step

    @property
    def sealed(self) -> int:
        return self.last.count


class OTeaCheckpointIO(CheckpointIO):
    """Checkpoint IO with every-iteration in-memory snapshots and background persistence.

    Args:
        memory_slots: shared-memory snapshot slots per rank; default three plus two per persistent tier, so the
            newest snapshot, the one before it (which a lagging peer may still need), the one being filled and, per
            tier, the one being persisted and the one due next never collide.
        memory_dir: folder for the shared-memory slots (default ``/dev/shm``).
        job_id: names this job's shared memory, so a restarted run finds the snapshots of the crashed one; default
            the ``OTEACHECK_JOB_ID`` environment variable, else derived from the checkpoint folder.
        schedule: how snapshot copies are placed in the next iteration: ``"bubbles"`` (default: bucket-aligned
            partitions issued into the forward/backward bubbles within learned byte budgets), ``"eager"`` (the same
            partitions, all issued at iteration start) or ``"naive"`` (one copy per tensor at iteration start).
        staging_mib: size of the GPU staging ring in MiB, the engine's only extra GPU memory (default 64). The
            largest single transfer is a quarter of it.
        avoid_allreduce: issue no copies during backward, where DeepSpeed reduces gradient buckets (for machines
            whose GPU-host link also carries the gradient all-reduce).
    """

    def __init__(
        self,
        memory_slots: int | None = None,
        memory_dir: _PATH | None = None,
        job_id: str | None = None,
        schedule: SchedulePolicy | str = SchedulePolicy.BUBBLES,
        staging_mib: float = DEFAULT_STAGING_MIB,
        avoid_allreduce: bool = False,
    ) -> None:
        if memory_slots is not None and memory_slots < MIN_MEMORY_SLOTS:
            raise ValueError(f"memory_slots must be at least {MIN_MEMORY_SLOTS} (got {memory_slots}): the newest snapshot, "
                             "the one before it (a lagging peer may still need it) and one to fill; with two, the "
                             "snapshot after an unsealed one finds no free slot and is skipped")
        try:
            self.schedule = SchedulePolicy(schedule)
        except ValueError:
            choices = ", ".join(repr(p.value) for p in SchedulePolicy)
            raise ValueError(f"schedule must be one of {choices}, got {schedule!r}") from None
        if not staging_mib or staging_mib < 1:
            raise ValueError(f"staging_mib must be at least 1 (MiB), got {staging_mib!r}")
        self.staging_mib = staging_mib
        self.avoid_allreduce = bool(avoid_allreduce)
        self.memory_slots = memory_slots
        self.memory_dir = Path(memory_dir or os.environ.get("OTEACHECK_MEMORY_DIR", DEFAULT_SHM_ROOT))
        self.job_id = job_id or os.environ.get("OTEACHECK_JOB_ID")
        self.run_id = ""  # set by attach()
        self.run_began = 0.0  # set by attach()
        self.forks: list[list] = []  # where this run's line left earlier runs (Manifest.forks); set at a resume
        self.schedules: list[PersistSchedule] = []
        self.root: str | None = None
        self.engine: SnapshotEngine | None = None
        self.stats = SnapshotStats()
        self._state: DeepSpeedState | None = None
        self._module: torch.nn.Module | None = None
        self._metric_modules: dict[str, Any] | None = None
        self._rank = 0
        self._world_size = 1
        self._pool: SlotPool | None = None
        self._persister: Persister | None = None
        self._tiers: list[FsspecTier] = []
        self._pending: _Pending | None = None  # captured, not fenced yet
        self._sealer: BackgroundWorker | None = None  # fenced snapshots, sealed in order once their copies landed
        self._abandon = False  # the sealer drops what it gets instead (after a crash)
        # where the fence waits: at BEFORE_UPDATE (right before the base optimizer changes the state) where the
        # strategy could hook the optimizer, else at BEFORE_STEP; see on_phase
        self._fence_at_update = False
        self._update_seen = False  # a BEFORE_UPDATE came in this fit: the hook works
        self._steps_without_update = 0  # steps in a row that ended without it, before it ever came
        self._skipped_before_step = 0  # DeepSpeed's count of skipped updates at the last BEFORE_STEP
        self._last_rng: tuple[Any, list] | None = None  # the last RNG state stored: sizes the next snapshot's records
        self._held_by_all = -1  # the newest snapshot step every rank has sealed (known since this iteration's forward)
        self._seal_wait_ms = 0.0  # this iteration's waits for seals so far (stall, charged to its snapshot)
        self._layout_key: tuple | None = None
        self._layout_cache: tuple[list[TensorRecord], list[TensorRecord], list[bool], int] = ([], [], [], 0)
        self._warned: set[str] = set()
        self._crashed = False

    # --- wiring ----------------------------------------------------------------------------------------

    def configure(self, root: str, schedules: Sequence[PersistSchedule]) -> None:
        """Called by the checkpoint callback at setup: the job's checkpoint folder and the persistence policy."""
        self.root = str(root)
        self.schedules = list(schedules)
        if self.job_id is None:
            self.job_id = job_id_for(self.root)

    def attach(self, state: DeepSpeedState, module: torch.nn.Module, rank: int, world_size: int, run_id: str | None = None,
               run_began: float | None = None) -> None:
        """Called by the strategy once the DeepSpeed engine exists: opens the slots and starts the persister.
        ``run_id`` and ``run_began``: this run's id and when it began, the same on every rank (for a single
        process, a fresh id and now)."""
        if self.root is None:
            raise RuntimeError("OTeaCheckpointIO.configure() must run before attach(); add OTeaCheckpoint to the callbacks")
        self._state, self._module, self._rank, self._world_size = state, module, rank, world_size
        self.run_id = run_id or uuid.uuid4().hex
        self.run_began = time.time() if run_began is None else run_began
        self.forks = []  # a fresh line until a resume says otherwise (continue_line)
        # metrics are modules of the LightningModule, created before fit; found once, not at every snapshot
        self._metric_modules = find_metrics(module)
        self._tiers = [FsspecTier(s.url or self.root, storage_options=s.storage_options) for s in self.schedules]
        # the newest snapshot, one whose copies are landing, the one being filled, and per tier one being written
        # plus one due (pinned)
        slots = self.memory_slots or MIN_MEMORY_SLOTS + 2 * len(self._tiers)
        self._pool = SlotPool(rank_folder(self.memory_dir, self.job_id or "", rank), slots)
        self.engine = SnapshotEngine(
            state.device(),
            self.schedule,
            staging_bytes=int(self.staging_mib * MiB),
            bucket_elements=state.bucket_elements(),
            avoid_allreduce=self.avoid_allreduce,
        )
        self._pool.set_unmap_hook(self.engine.forget)
        device = state.device()
        self._sealer = BackgroundWorker(
            "oteacheck-sealer",
            # the copies' events are waited for on this thread, which needs the training GPU current
            on_start=(lambda: torch.cuda.set_device(device)) if device.type == "cuda" else None,
            stop_on_error=False,  # every snapshot handed over is sealed or abandoned, so no slot stays taken
        )
        self._abandon = False
        self._held_by_all = -1
        self._seal_wait_ms = 0.0
        self._persister = Persister(self._pool, list(zip(self._tiers, self.schedules)), paced=world_size > 1, world_size=world_size)
        self.stats.tiers = self._persister.stats()
        self._crashed = False

    @property
    def memory_tier(self) -> MemoryTier | None:
        return MemoryTier(self._pool.directory) if self._pool is not None else None

    # --- every-iteration snapshot (training thread) --------------------------------------------------------

    def _encode_state(self, lightning_state: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
        state = dict(lightning_state)
        for key in _OPTIONAL_KEYS:
            if key in state:
                try:
                    statecodec.encode(state[key])
                except statecodec.UnsupportedStateError as err:
                    del state[key]
                    self._warn_once(key, f"left {key!r} out of the checkpoint: {err}")
        assert self._state is not None and self._module is not None
        return statecodec.encode(
            {"lightning": state, "deepspeed": self._state.meta(), "metrics": collect_metrics(self._module, self._metric_modules)},
            tensor_prefix="state/",
        )

    def _collect(self, lightning_state: dict[str, Any], rng: tuple[Any, list] | None = None) -> tuple[Any, list, Any, list]:
        """Everything a checkpoint of this rank holds: the state document and the tensors it names (engine tensors
        first, then small-state tensors), and the RNG document with its tensors (``rng``, or collected now)."""
        assert self._state is not None
        document, small = self._encode_state(lightning_state)
        rng_doc, rng_tensors = rng if rng is not None else _encode_rng()
        return document, self._state.tensors() + list(small.items()), rng_doc, rng_tensors

    def capture(self, step: int, lightning_state: dict[str, Any]) -> bool:
        """Takes the snapshot of optimizer step ``step``; returns False (and counts it) if no slot was free.

        Never waits for the previous snapshot's copies unless two are still in flight (the GPU is more than an
        iteration behind the host): blocking here would cost the host its lead over the GPU every iteration.
        """
        assert self._state is not None and self._pool is not None and self.engine is not None
        if self._pending is not None:
            self._fence(self._pending)
        self._wait_sealed(at_most=1, timed=True)
        seal_wait_ms, self._seal_wait_ms = self._seal_wait_ms, 0.0
        started = time.perf_counter()
        # a snapshot's RNG values are grabbed at the next iteration start; sizing their records only needs the
        # last recording (RNG states keep their shapes), which saves collecting them twice per snapshot
        document, named, _, rng = self._collect(lightning_state, self._last_rng)
        records, rng_records, boundary, data_bytes = self._layout(named, rng)
        slot = self._pool.acquire(data_bytes, keep_from_step=self._held_by_all if self._held_by_all >= 0 else None)
        if slot is None:
            self.stats.skipped += 1
            self._warn_once("no-slot", "no free snapshot slot (all are being persisted); skipping snapshots until one is free")
            return False
        self.engine.start(slot.buffer, records, [t for _, t in named], boundary)
        self._pending = _Pending(step, slot, records, rng_records, document, data_bytes)
        self._pending.capture_ms = (time.perf_counter() - started) * 1e3
        self._pending.seal_wait_ms = seal_wait_ms
        return True

    def _layout(self, named: list, rng: list) -> tuple[list[TensorRecord], list[TensorRecord], list[bool], int]:
        """The slot layout of a snapshot's tensors: records of the state and of the RNG states, which tensors are
        copied at the step boundary, and the data size. Made again only when a name, dtype, shape or device changed:
        with hundreds of tensors (a model's BatchNorm buffers) laying them out cost the capture more than checking
        them; the records are immutable, so the snapshots share them."""
        key = tuple((name, t.dtype, t.shape, t.device) for name, t in named + rng)
        if key != self._layout_key:
            boundary = [name.startswith(_BOUNDARY_PREFIXES) for name, _ in named]
            # the boundary tensors first, those on a GPU before the others: the engine sends the GPU ones to the slot
            # as one transfer when their records lie back to back; the RNG states last
            order = sorted((i for i, b in enumerate(boundary) if b), key=lambda i: named[i][1].device.type != "cuda")
            order += [i for i, b in enumerate(boundary) if not b]
            placed, data_bytes = plan_layout([named[i] for i in order] + rng)
            where = {i: at for at, i in enumerate(order)}
            records = [placed[where[i]] for i in range(len(named))]
            self._layout_key, self._layout_cache = key, (records, placed[len(named) :], boundary, data_bytes)
        return self._layout_cache

    def fence_at_update(self, on: bool) -> None:
        """Called by the strategy at setup: whether BEFORE_UPDATE events come (the base optimizer is hooked).

        The fence then waits there instead of at BEFORE_STEP. Between the two, DeepSpeed computes the gradient
        norm, checks for overflow and clips, reading gradients only, and the host waits for the GPU there: with the
        wait for the copies at BEFORE_STEP, that wait took the rest of the snapshot's copies with it."""
        self._fence_at_update = on
        self._update_seen = False
        self._steps_without_update = 0

    def on_phase(self, event: PhaseEvent) -> None:
        """Drives the pending snapshot through iteration *t+1* (subscribed to the strategy's bubble bus)."""
        if event.phase is Phase.BEFORE_UPDATE:
            self._update_seen = True
        if event.phase is Phase.FORWARD_END:
            # every fenced snapshot (t-1 at a snapshot per step) sealed before this iteration's gradient collectives:
            # once a rank is past those, every rank holds it, and the capture of t+1 keeps it (keep_from_step).
            # Without this, a rank whose sealer lagged an iteration held only t-2 while a peer had dropped it, and a
            # crash then found no snapshot common to all ranks. t-1's copies landed an iteration ago: a short wait
            # at most.
            self._wait_sealed(at_most=0, timed=True)
            self._held_by_all = self.stats.last.step
        pending = self._pending
        if pending is None:
            return
        if event.phase is Phase.ITERATION_START and pending.rng is None:
            pending.rng = grab_rng()
        elif event.phase is Phase.FORWARD_END and pending.rng is not None and not pending.preparing:
            pending.preparing = True
            assert self._sealer is not None
            self._sealer.put(self._prepare, [pending])
        assert self.engine is not None
        self.engine.on_event(event)
        if event.phase is Phase.BEFORE_STEP:
            if self._fence_at_update:
                self.engine.issue_rest()  # queued now; waited for at BEFORE_UPDATE
                assert self._state is not None
                self._skipped_before_step = self._state.skipped_updates()
            else:
                self._fence(pending)
        elif event.phase is Phase.BEFORE_UPDATE:
            self._fence(pending)
        elif event.phase is Phase.AFTER_STEP and self._fence_at_update:
            self._after_step_without_update(pending)

    def _after_step_without_update(self, pending: _Pending) -> None:
        """The step ended and no BEFORE_UPDATE fenced ``pending``. If DeepSpeed counted the step as skipped (an fp16
        overflow, a gradient norm that is not finite), or the hook has worked before (then this is such a skip),
        the state did not change and the snapshot is good. Otherwise the optimizer may have updated the state
        without announcing it, while the copies ran: the snapshot is dropped, and after three such steps the fence
        goes back to BEFORE_STEP. (fp16 training skips its first steps while the loss scale settles: without
        DeepSpeed's count, those steps looked like a silent hook.)"""
        assert self._state is not None
        if self._update_seen or self._state.skipped_updates() > self._skipped_before_step:
            self._fence(pending)
            return
        pending.discard = True
        self._fence(pending)
        self._steps_without_update += 1
        if self._steps_without_update >= 3:
            self._fence_at_update = False
            self._warn_once("no-update-event", "the optimizer's step pre-hook never ran: snapshots are fenced before "
                            "DeepSpeed's step from now on (the three taken so far were dropped)")

    def block_windows(self) -> frozenset[WindowKey] | None:
        """The model-block events the strategy should announce in this iteration (``None``: all of them)."""
        if self._pending is None or self.engine is None:
            return frozenset()
        return self.engine.block_windows()

    def _fence(self, pending: _Pending) -> None:
        """The fence of ``pending`` (the optimizer step waits for its copies); the sealer takes it from here."""
        assert self.engine is not None and self._sealer is not None
        if pending.rng is None:
            pending.rng = grab_rng()
        pending.ticket = self.engine.fence()
        pending.copies = self.engine.stats  # the engine starts a new one for the next snapshot
        self._pending = None
        self._sealer.put(self._land, [pending])

    def _wait_sealed(self, at_most: int, timed: bool = False) -> None:
        """Waits until at most ``at_most`` fenced snapshots are unsealed; raises what went wrong sealing one. A
        ``timed`` wait is a stall of the training loop, charged to the next snapshot captured."""
        if self._sealer is None:
            return
        started = time.perf_counter()
        error = self._sealer.wait_until(at_most)
        if timed:
            waited_ms = (time.perf_counter() - started) * 1e3
            self._seal_wait_ms += waited_ms
            self.stats.seal_wait_total_ms += waited_ms
        if error is not None:
            raise RuntimeError("a snapshot could not be completed (its slot was released)") from error

    def _prepare(self, pending: _Pending) -> None:
        """On the sealer thread, after the forward pass of iteration *t+1*: stores the RNG states of ``pending`` in its
        slot (their records lie apart from the copied tensors) and serializes its manifest, all of which is known
        before the copies end. At the fence only the manifest's write is then left. Sealing all of it there put
        half a millisecond of Python on the sealer just as the optimizer step, which is bound by the host, ran: the
        two contend for the GIL. Here the training thread is mostly ahead of the GPU, queueing the backward pass."""
        started = time.perf_counter()
        try:
            pending.manifest = self._manifest(pending)
            pending.payload = pending.manifest.to_json()
        except Exception:  # the fence's seal makes it again, and reports what goes wrong there
            pending.manifest = None
        pending.prepare_ms = (time.perf_counter() - started) * 1e3

    def _manifest(self, pending: _Pending) -> Manifest:
        return Manifest(
            step=pending.step,
            rank=self._rank,
            world_size=self._world_size,
            data_bytes=pending.data_bytes,
            tensors=pending.records + pending.rng_records,
            state={"main": pending.document, "rng": self._store_rng(pending)},
            job=self.job_id or "",
            run=self.run_id,
            forks=self.forks,
            run_began=self.run_began,
        )

    def _land(self, pending: _Pending) -> None:
        """On the sealer thread: waits for the copies of ``pending``, then seals it (or abandons it)."""
        assert self._pool is not None
        try:
            assert pending.ticket is not None
            pending.ticket.wait()
            if self._abandon or pending.discard:
                self._pool.abandon(pending.slot)
                return
            self._seal(pending)
        except BaseException:
            self._pool.abandon(pending.slot)
            raise
        # outside the guard: a sealed slot is the newest checkpoint and must never be abandoned for this
        self._request_persist(pending.step)

    def _request_persist(self, step: int) -> None:
        assert self._persister is not None
        try:
            self._persister.request(step)
        except Exception as err:  # only this step's persistence is lost; the next sealed step asks again
            self.stats.persist_request_errors += 1
            log.warning("could not hand the snapshot of step %d to the persister (it stays in memory): %s", step, err)

    def _store_rng(self, pending: _Pending) -> Any:
        """Writes the RNG states grabbed for ``pending`` into its slot; returns their document."""
        assert pending.rng is not None
        rng_doc, rng = _encode_rng(pending.rng)
        if len(rng) != len(pending.rng_records):
            raise RuntimeError("the RNG state changed shape between capture and seal")
        # through numpy: a byte view and a copy per state through torch cost the sealer more than the states' bytes
        slot = pending.slot.buffer.numpy()
        for record, (_, tensor) in zip(pending.rng_records, rng):
            raw = tensor.numpy().reshape(-1).view(np.uint8)
            if raw.nbytes != record.nbytes or tensor.dtype is not record.torch_dtype:
                raise RuntimeError("the RNG state changed shape between capture and seal")
            slot[record.offset : record.offset + record.nbytes] = raw
        self._last_rng = (rng_doc, rng)
        return rng_doc

    def _seal(self, pending: _Pending) -> None:
        """Publishes a snapshot whose copies landed: the manifest is written last."""
        assert self._pool is not None and self._persister is not None and pending.ticket is not None
        started = time.perf_counter()
        if pending.manifest is None:
            self._pool.seal(pending.slot, self._manifest(pending))
        else:
            self._pool.seal(pending.slot, pending.manifest, pending.payload)
        copies = pending.copies
        assert copies is not None
        fence_ms = pending.ticket.stall_ms()
        self.stats.last = SealedSnapshot(
            step=pending.step, count=self.stats.last.count + 1,
            stall_ms=fence_ms + pending.capture_ms + pending.seal_wait_ms, fence_ms=fence_ms,
            capture_ms=pending.capture_ms, seal_wait_ms=pending.seal_wait_ms,
            seal_ms=pending.prepare_ms + (time.perf_counter() - started) * 1e3, issues=copies.issues,
            issue_ms=copies.issue_ms, issuer_ms=copies.issuer_ms, bytes=pending.data_bytes,
            bytes_by_phase=copies.bytes_by_phase, copy_gbps=copies.gbps,
        )

    def seal_pending(self) -> int | None:
        """Completes every snapshot taken so far now, waiting for its copies; returns the newest sealed step."""
        if self._pending is not None:
            self._fence(self._pending)
        self._wait_sealed(at_most=0)
        return self.stats.sealed_step if self.stats.sealed_step >= 0 else None

    @property
    def paces_persistence(self) -> bool:
        """Whether time-based persist schedules need step intervals agreed by the ranks (:mod:`.pace`)."""
        return self._world_size > 1 and any(s.every_n_seconds is not None for s in self.schedules)

    def pace_persistence(self, from_step: int, seconds_per_step: float, step_multiple: int) -> None:
        """Time schedules fire every ``every_n_seconds / seconds_per_step`` steps from ``from_step`` on (training
        thread, the same values on every rank)."""
        assert self._persister is not None
        self._persister.pace(from_step, seconds_per_step, step_multiple)

    def persist_now(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Persists the newest sealed snapshot to every tier now (e.g. at the end of training)."""
        self.seal_pending()
        if self._persister is None or self._pool is None or self._pool.newest() is None:
            return True
        self._persister.request(self._pool.newest().step, force=True)
        return self._persister.drain(timeout) if wait else True

    def discard_snapshots_after(self, step: int) -> None:
        """After resuming from ``step``: newer in-memory snapshots belong to an abandoned timeline, and those of
        ranks this run does not have (it resumed with fewer) to no one."""
        if self._pool is not None:
            self._pool.invalidate_after(step)
            self._pool.remove_ranks_from(self._world_size)

    # --- CheckpointIO: explicit, durable checkpoints ----------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Writes this rank's full state to the checkpoint folder ``path``, synchronously and durably.

        The strategy calls this on every rank, then writes the folder's ``COMMIT`` marker once all ranks returned.
        """
        if storage_options is not None:
            raise TypeError("OTeaCheckpointIO.save_checkpoint does not take storage_options")
        assert self._state is not None
        self.seal_pending()
        document, named, rng_doc, rng = self._collect(checkpoint)
        named += rng
        records, data_bytes = plan_layout(named)
        buffer = torch.empty(data_bytes, dtype=torch.uint8)
        HostCopier().start(buffer, records, [t for _, t in named])
        manifest = Manifest(int(checkpoint.get("global_step", -1)), self._rank, self._world_size, data_bytes, records,
                            {"main": document, "rng": rng_doc}, job=self.job_id or "", run=self.run_id,
                            forks=self.forks, run_began=self.run_began)
        view = memoryview(buffer.numpy())
        CheckpointDir.from_url(path).write_rank(with_checksums(manifest, view), view)

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Reads and verifies this rank's part of the checkpoint folder ``path`` (no unpickling)."""
        directory = CheckpointDir.from_url(path, **self.storage_options_for(path))
        commit = directory.read_commit()
        saved = commit["world_size"] if commit is not None else self._world_size
        if saved == self._world_size:
            return self.decode(directory.read_rank(self._rank))
        repartition = self._start_repartition()
        own = take_in_every_rank(directory.read_rank, saved, self._rank, repartition)
        return self.decode(own, repartition)

    def remove_checkpoint(self, path: _PATH) -> None:
        directory = CheckpointDir.from_url(path)
        directory.remove_rank(self._rank)

    def teardown(self) -> None:
        """Drains the persister; removes the shared memory after a normal end, keeps it after a crash."""
        if self._crashed:
            self._drop_pending()
        else:
            self.seal_pending()
        if self._sealer is not None:
            self._sealer.close()
            self._sealer = None
        not_persisted: list[str] = []
        if self._persister is not None:
            not_persisted = self._persister.close(drain=True)
            self._persister = None
        if not_persisted:
            log.warning("not everything was persisted before shutdown: %s", "; ".join(not_persisted))
        if self._pool is not None:
            self._pool.close(remove=not self._crashed)
            self._pool = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self._pending = None

    def _drop_pending(self) -> None:
        """Abandons unsealed snapshots once their copies stopped touching their slots."""
        self._abandon = True
        if self._pending is not None and self.engine is not None and self._sealer is not None:
            self._pending.ticket = self.engine.fence()
            self._sealer.put(self._land, [self._pending])
        self._pending = None
        if self._sealer is not None:
            error = self._sealer.drain()
            if error is not None:
                log.warning("a snapshot in flight at the crash could not be released cleanly: %s", error)

    def mark_crashed(self) -> None:
        """Training failed: keep the shared-memory snapshots for the restart."""
        self._crashed = True

    # --- recovery ----------------------------------------------------------------------------------------

    def storage_options_for(self, url: _PATH) -> dict[str, Any]:
        """The client settings of the configured tier that ``url`` lies in (an explicit ``ckpt_path`` into one of
        them is read with the settings it was written with: failover, timeouts, credentials)."""
        url = str(url).rstrip("/")
        for tier in self._tiers:
            root = tier.url.rstrip("/")
            if url == root or url.startswith(root + "/"):
                return tier.storage_options
        return {}

    def tiers_for_recovery(self, url: str | None = None) -> list[Any]:
        """All tiers (memory first), or only the persistent tier at ``url``."""
        if url is not None:
            return [FsspecTier(url, storage_options=self.storage_options_for(url))]
        tiers: list[Any] = [self.memory_tier] if self._pool is not None else []
        return tiers + list(self._tiers)

    def newest_held(self) -> tuple[int, str | None]:
        """The newest step of which this rank finds any part in this job's tiers, and where (``(-1, None)``: none)."""
        return newest_held(self.tiers_for_recovery(), self._rank, self._world_size)

    def continue_line(self, step: int, origin: list) -> None:
        """After resuming from ``step`` of the run ``origin`` names (``[run, forks, run_began]`` of the checkpoint,
        the same on every rank): this run's manifests carry that line's forks and this one, so that recovery never
        takes a step the earlier run wrote after ``step`` (kept by a tier that is down now, say). The newest
        ``MAX_FORKS``. This run begins after the one it goes on from whatever the clocks say (recovery goes on with
        the line begun last; a restart on a node whose clock is behind would otherwise rank its line below the
        earlier run's)."""
        run, forks, began = origin
        self.forks = (list(forks) + [[run, step]])[-MAX_FORKS:]
        self.run_began = max(self.run_began, began + 1e-3)

    def discard_persisted_after(self, step: int) -> None:
        """After resuming from ``step`` (training thread, before the next iteration): steps newer than it in this
        job's persistent tiers belong to the abandoned run; they are taken out of sight (rank 0) and this rank's
        files of them removed, so they can never be committed together with the resumed run's files. Every rank
        does this before its first collective of the resumed run, so no rank writes a newer step before all
        ranks cleaned up. A tier that is down now is cleaned up before this rank's next write to it. Steps of
        another line (a run this one never went on from, such as one whose tier was down at a fresh run's start)
        are left alone, and that tier is refused for this run (see :class:`~.persist.Persister`)."""
        assert self._persister is not None, "attach() first"
        self._persister.discard_after(step, self._rank, Origin.of(self.run_id, self.forks, self.run_began))

    def recover(self, gather: Gather, url: str | None = None) -> dict[str, Any] | None:
        """The freshest checkpoint complete on every rank (a collective); ``None`` if there is none."""
        result = recover(self.tiers_for_recovery(url), self._rank, self._world_size, gather, self._start_repartition)
        if result is None:
            return None
        for step, reason in result.skipped:
            log.warning("skipped checkpoint of step %d: %s", step, reason)
        return self.decode(result.checkpoint, result.repartition)

    def _start_repartition(self) -> Repartition:
        assert self._state is not None
        return Repartition(self._state.param_map(), self._state.stage)

    def decode(self, loaded: LoadedRankCheckpoint, repartition: Repartition | None = None) -> dict[str, Any]:
        """Lightning's checkpoint dict of a loaded rank checkpoint; the engine state rides along under
        ``PRIVATE_KEY`` for the strategy to apply. After a change of world size, ``loaded`` is the saved rank this
        rank goes on with, and the engine state comes from ``repartition``, which took in every saved rank."""
        manifest = loaded.manifest
        if manifest.world_size != self._world_size and repartition is None:
            raise RuntimeError(f"{loaded.source} was written by {manifest.world_size} ranks, this run has "
                               f"{self._world_size}; re-partitioning it needs every saved rank's part")
        tensors = load_tensors(manifest, loaded.buffer)
        main = statecodec.decode(manifest.state["main"], tensors)
        engine = {n: t for n, t in tensors.items() if not n.startswith(("state/", "rng/"))}
        deepspeed = main["deepspeed"]
        if repartition is not None:
            assert self._state is not None
            engine, deepspeed = repartition.tensors(dict(self._state.tensors()), engine, deepspeed)
            self._warn_once(
                "repartitioned",
                f"step {manifest.step} was written by {manifest.world_size} ranks and this run has {self._world_size}: "
                "the weights and optimizer state are re-partitioned exactly, but the rest of the epoch's data order, "
                "the random number streams and the unsynchronized metric states continue from "
                + ("the saved ranks of the same number (rank 0's for the new ones)"
                   if self._world_size > manifest.world_size
                   else f"saved ranks 0 to {self._world_size - 1} (those of the others are dropped)")
                + ", so they differ from an uninterrupted run's",
            )
        checkpoint = dict(main["lightning"])
        checkpoint[PRIVATE_KEY] = {
            "step": manifest.step,
            "source": loaded.source,
            "origin": [manifest.run, manifest.forks, manifest.run_began],
            "engine": engine,
            "deepspeed": deepspeed,
            "metrics": main["metrics"],
            "rng": statecodec.decode(manifest.state["rng"], tensors),
            "buffer": loaded.buffer,
        }
        return checkpoint

    # --- metrics -----------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Numbers for the logger: the in-memory snapshot (safe) and each tier (durable)."""
        s = self.stats.last
        out = {
            "oteacheck/sealed_step": float(s.step),
            "oteacheck/stall_ms": s.stall_ms,
            "oteacheck/fence_ms": s.fence_ms,
            "oteacheck/capture_ms": s.capture_ms,
            "oteacheck/seal_wait_ms": s.seal_wait_ms,
            "oteacheck/seal_ms": s.seal_ms,
            "oteacheck/issues": float(s.issues),
            "oteacheck/issue_ms": s.issue_ms,
            "oteacheck/issuer_ms": s.issuer_ms,
            "oteacheck/copy_gbps": s.copy_gbps,
            "oteacheck/snapshot_mib": s.bytes / 2**20,
            "oteacheck/skipped_snapshots": float(self.stats.skipped),
            "oteacheck/seal_wait_total_ms": self.stats.seal_wait_total_ms,
            "oteacheck/persist_request_errors": float(self.stats.persist_request_errors),
        }
        for phase, nbytes in s.bytes_by_phase.items():
            out[f"oteacheck/mib_{phase}"] = nbytes / 2**20
        for i, (name, t) in enumerate(self.stats.tiers.items()):
            out[f"oteacheck/tier{i}_persisted_step"] = float(t.persisted_step)
            out[f"oteacheck/tier{i}_committed_step"] = float(t.committed_step)
            out[f"oteacheck/tier{i}_failures"] = float(t.failures)
            out[f"oteacheck/tier{i}_outage_s"] = t.outage_seconds
            out[f"oteacheck/tier{i}_skipped"] = float(t.skipped)
            out[f"oteacheck/tier{i}_healthy"] = float(t.healthy)
            out[f"oteacheck/tier{i}_refused"] = float(t.refused)
            if t.paced_every_n_steps:  # what every_n_seconds became, with several ranks
                out[f"oteacheck/tier{i}_paced_every_n_steps"] = float(t.paced_every_n_steps)
        return out

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


def _encode_rng(raw: RawRng | None = None) -> tuple[Any, list[tuple[str, torch.Tensor]]]:
    """The RNG states of ``raw`` (default: grabbed now), encoded: a snapshot's stored states, and those of the first
    snapshot's sizing and of explicit checkpoints."""
    rng_doc, rng_tensors = statecodec.encode(rng_state(raw if raw is not None else grab_rng()), tensor_prefix="rng/")
    return rng_doc, list(rng_tensors.items())

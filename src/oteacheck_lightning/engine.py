"""The snapshot engine: one snapshot from the end of optimizer step *t* to the fence before step *t+1*.

It joins the partition plan, the bubble scheduler and a copier (CUDA or CPU), and is driven by the checkpoint IO on
the training thread:

1. ``start`` (end of step *t*): tensors that change during the next forward pass (BatchNorm statistics, metric
   states, the small Lightning state) are copied now, in stream order on the GPU, so the next forward cannot get
   ahead of them; the rest (fp32 masters, optimizer states, frozen weights) is planned and armed;
2. ``on_event`` (bubbles of iteration *t+1*): the scheduler hands out partitions, the copier issues them;
3. ``fence`` (BEFORE_STEP of *t+1*): the rest is issued and the optimizer step is made to wait for all of it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .bubbles import Phase, PhaseEvent
from .copier import Copier, CudaCopier, FenceTicket, ThreadCopier
from .format import TensorRecord, byte_view
from .plan import MiB, Partition, Piece, per_tensor_partitions, plan_partitions
from .scheduler import BLOCK_PHASES, BUBBLE_PHASES, BubbleScheduler, SchedulePolicy, WindowKey, window_key

DEFAULT_STAGING_MIB = 64
# the ring's segments; a segment is the largest transfer, and what a training-side copy may wait behind
RING_SEGMENTS = 4
# bubbles times every window of one snapshot in this many (and only its issue points in the others): the windows
# change little from one iteration to the next, and an event per window costs the training thread every iteration
RETIME_EVERY = 8
# with the optional pump thread: partitions queued on the copy stream at once (one 16 MiB partition is about 0.3 ms
# of copy engine a training-side transfer may wait behind; two 8 MiB partitions in flight cost 30% on GPT-2 124M)
DEFAULT_INFLIGHT = 1


@dataclass(frozen=True)
class _PackedBoundary:
    """Boundary tensors on the GPU whose slot records lie back to back in ``[lo, hi)``: they are gathered into the
    staging ring by one fused copy per dtype and sent to the slot as one transfer. Copied one by one, each cost the
    training thread a driver call at the step boundary, where the GPU waits for the host (a ResNet-50 has 161
    BatchNorm buffers: about half a millisecond)."""

    lo: int
    hi: int
    groups: tuple[tuple[list[int], list[torch.Tensor]], ...]  # per dtype: tensor indices and their views in the ring
    rest: list[int]  # boundary tensors copied one by one (those on the host)


@dataclass
class EngineStats:
    """What the last fenced snapshot cost and where its bytes went."""

    bytes_by_phase: dict[str, int] = field(default_factory=dict)
    fence_bytes: int = 0
    boundary_bytes: int = 0
    planned_bytes: int = 0
    gbps: float = 0.0
    issues: int = 0  # issue calls, the fence's included
    issue_ms: float = 0.0  # training-thread time in them
    issuer_ms: float = 0.0  # the copier thread's CPU time making the copy calls they queued
    groups: int = 0  # issue points the scheduler planned
    sync_windows: int = 0  # windows closed to copies because training waited for them there
    start_ms: float = 0.0  # training-thread time in start (boundary copies, planning, arming)


class SnapshotEngine:
    """Copies snapshot *t* into its slot during iteration *t+1*.

    Args:
        device: where the training state lives (``cuda:N`` uses the copy stream, ``cpu`` a worker thread).
        policy: ``bubbles`` (the engine), ``eager`` (bucket partitions, all issued at iteration start) or ``naive``
            (per-tensor copies at iteration start): the last two exist to measure the first against.
        staging_bytes: the GPU staging ring (the engine's only extra GPU memory).
        bucket_elements: DeepSpeed's ``reduce_bucket_size``; partitions are cut on its boundaries.
        avoid_allreduce: keep copies out of the backward pass, where gradient buckets are reduced.
        pump: on a GPU, feed the copy stream from a thread a partition at a time (see :class:`CudaCopier`);
            ``False`` queues each window's copies from the training thread.
        pace_by_blocks: use the model-block events as windows (fine pacing); ``False`` uses the coarse phases only.
    """

    def __init__(
        self,
        device: torch.device,
        policy: SchedulePolicy | str = SchedulePolicy.BUBBLES,
        staging_bytes: int = DEFAULT_STAGING_MIB * MiB,
        bucket_elements: int | None = None,
        avoid_allreduce: bool = False,
        inflight: int = DEFAULT_INFLIGHT,
        ring_segments: int = RING_SEGMENTS,
        pump: bool = False,
        pace_by_blocks: bool = True,
    ) -> None:
        self.device = device
        self.policy = SchedulePolicy(policy)
        self.staging_bytes = staging_bytes
        self.segment_bytes = max(4096, staging_bytes // ring_segments)
        self.bucket_elements = bucket_elements
        self.scheduler = BubbleScheduler(self.policy, avoid_allreduce=avoid_allreduce)
        # host ms per issue call (the training thread's and the issuer thread's), smoothed over snapshots: in a loop
        # bound by the host both are iteration time, the issuer's through the GIL
        self._issue_cost = 0.0
        self._started = 0
        self.copier: Copier = (
            CudaCopier(device, staging_bytes, self.segment_bytes, inflight, pump) if device.type == "cuda" else ThreadCopier()
        )
        self.pace_by_blocks = pace_by_blocks
        self.stats = EngineStats()
        self._plan_key: tuple | None = None
        self._plan: list[Partition] = []
        self._plan_bytes = 0
        # per slot buffer: the layout key and the byte views of its boundary records (made once, not per snapshot),
        # with the records and indices they were made for (a capture with a cached layout passes the same lists)
        self._boundary_views: dict[int, tuple[tuple, list[torch.Tensor], Sequence[TensorRecord], list[int]]] = {}
        # the last start's records and boundary flags, and what they gave: indices copied now and ahead, bytes now
        self._split_for: tuple = (None, None, [], [], 0)
        self._plan_for: tuple = (None, None, False)
        self._packed_for: tuple = (None, None, None)  # records, boundary indices, their _PackedBoundary (or None)

    def set_policy(self, policy: SchedulePolicy | str) -> None:
        """Switches the policy for the next snapshot (the benchmark interleaves policies in one run)."""
        if self.scheduler.armed:
            raise RuntimeError("set_policy() while a snapshot is being copied; call it between fence and start")
        self.policy = self.scheduler.policy = SchedulePolicy(policy)

    def plan(self, records: Sequence[TensorRecord], ahead: Sequence[int]) -> list[Partition]:
        """The partitions of the tensors at indices ``ahead`` (cached while the layout stays the same)."""
        # the per-tensor plan and the bucket plan differ; eager and bubbles share one
        naive = self.policy is SchedulePolicy.NAIVE
        if records is self._plan_for[0] and ahead is self._plan_for[1] and naive == self._plan_for[2]:
            return self._plan  # the same (immutable) records and indices as last time: the checkpoint IO's cached layout
        key = (naive, tuple((records[i].offset, records[i].nbytes, records[i].device) for i in ahead))
        self._plan_for = (records, ahead, naive)
        if key != self._plan_key:
            subset = [records[i] for i in ahead]
            if self.policy is SchedulePolicy.NAIVE:
                planned = per_tensor_partitions(subset)
            else:
                planned = plan_partitions(
                    subset, self.segment_bytes, self.bucket_elements, pack_below=min(MiB, self.segment_bytes)
                )
            # the plan indexes the subset; the copier indexes the snapshot's full tensor list
            self._plan = [
                Partition(p.index, tuple(Piece(ahead[x.tensor], x.src_offset, x.dst_offset, x.nbytes) for x in p.pieces), p.packed, p.bucket)
                for p in planned
            ]
            self._plan_key = key
            self._plan_bytes = sum(p.span for p in self._plan)
        return self._plan

    def _views(self, buffer: torch.Tensor, records: Sequence[TensorRecord], indexes: list[int]) -> list[torch.Tensor]:
        """The byte views of ``records[indexes]`` in ``buffer``, cached per slot while the layout stays the same."""
        cached = self._boundary_views.get(buffer.data_ptr())
        if cached is not None and cached[2] is records and cached[3] is indexes:
            return cached[1]
        key = tuple((records[i].offset, records[i].nbytes, records[i].dtype, tuple(records[i].shape)) for i in indexes)
        if cached is None or cached[0] != key:
            cached = (key, [byte_view(buffer, records[i]) for i in indexes])
        # the entry keeps records and indexes alive, so their identities stay theirs
        self._boundary_views[buffer.data_ptr()] = (cached[0], cached[1], records, indexes)
        return cached[1]

    def _packed_boundary(self, records: Sequence[TensorRecord], now: list[int]) -> _PackedBoundary | None:
        """How the boundary tensors ``now`` go through the ring, or None where they cannot (on the CPU, or records of
        other tensors lie between theirs); made once per layout."""
        if records is self._packed_for[0] and now is self._packed_for[1]:
            return self._packed_for[2]
        packed = None
        on_gpu = [i for i in now if records[i].device == "cuda"]
        if isinstance(self.copier, CudaCopier) and len(on_gpu) > 1:
            lo = min(records[i].offset for i in on_gpu)
            hi = max(records[i].offset + records[i].nbytes for i in on_gpu)
            mine = set(on_gpu)
            # the one transfer overwrites [lo, hi) of the slot: only these tensors (and their padding) may lie there
            alone = not any(r.nbytes and r.offset < hi and r.offset + r.nbytes > lo for i, r in enumerate(records) if i not in mine)
            ring = self.copier.ring
            if alone and hi - lo <= ring.numel():
                by_dtype: dict[str, tuple[list[int], list[torch.Tensor]]] = {}
                for i in on_gpu:
                    indices, views = by_dtype.setdefault(records[i].dtype, ([], []))
                    indices.append(i)
                    views.append(byte_view(ring, records[i], base=lo))  # the ring holds the span from lo on
                packed = _PackedBoundary(lo, hi, tuple(by_dtype.values()), [i for i in now if i not in mine])
        self._packed_for = (records, now, packed)
        return packed

    def _copy_boundary(self, buffer: torch.Tensor, records: Sequence[TensorRecord], tensors: Sequence[torch.Tensor], now: list[int]) -> None:
        """Copies the tensors ``now`` into the slot before the next forward pass can change them: on a GPU the copies
        are queued on the compute stream, so they run before the next forward's kernels."""
        packed = self._packed_boundary(records, now)
        if packed is None:
            # one call for all of them; it still copies tensor by tensor
            torch._foreach_copy_(self._views(buffer, records, now), [tensors[i] for i in now], non_blocking=True)
            return
        # The ring is free here: the fence made optimizer step t wait for every copy of snapshot t-1, and the copy
        # stream touches the ring again only after copier.begin's event, which is recorded behind these copies.
        assert isinstance(self.copier, CudaCopier)
        span = self.copier.ring[: packed.hi - packed.lo]
        span.zero_()  # the padding between records: no bytes of an earlier snapshot in the slot
        for indices, views in packed.groups:
            torch._foreach_copy_(views, [tensors[i] for i in indices], non_blocking=True)
        buffer[packed.lo : packed.hi].copy_(span, non_blocking=True)
        if packed.rest:
            torch._foreach_copy_(self._views(buffer, records, packed.rest), [tensors[i] for i in packed.rest], non_blocking=True)

    @torch.no_grad()
    def start(self, buffer: torch.Tensor, records: Sequence[TensorRecord], tensors: Sequence[torch.Tensor], boundary: Sequence[bool]) -> None:
        """Begins snapshot *t*: copies the ``boundary`` tensors now, arms the rest for the next iteration."""
        started = time.perf_counter()
        if len(boundary) != len(records) or len(tensors) != len(records):
            raise ValueError("records, tensors and boundary must be of one length")
        if records is not self._split_for[0] or boundary is not self._split_for[1]:
            now = [i for i, at_boundary in enumerate(boundary) if at_boundary and records[i].nbytes]
            ahead = [i for i, at_boundary in enumerate(boundary) if not at_boundary]
            self._split_for = (records, boundary, now, ahead, sum(records[i].nbytes for i in now))
        _, _, now, ahead, boundary_bytes = self._split_for
        if now:
            self._copy_boundary(buffer, records, tensors, now)
        partitions = self.plan(records, ahead)
        self.copier.begin(buffer, tensors)
        self.scheduler.learn(self.copier.window_ms(), self.copier.bytes_per_ms(), self._issue_cost)
        self.scheduler.begin(partitions, self._plan_bytes)
        # this snapshot times every window (bubbles only: the others mark nothing)
        self.copier.time_windows = self.policy is SchedulePolicy.BUBBLES and (
            not self.scheduler.has_budgets or self._started % RETIME_EVERY == 0
        )
        self._started += 1
        self.stats = EngineStats(
            boundary_bytes=boundary_bytes, planned_bytes=self._plan_bytes, groups=self.scheduler.groups,
            sync_windows=len(self.scheduler.sync_windows),
        )
        self.stats.start_ms = (time.perf_counter() - started) * 1e3

    def block_windows(self) -> frozenset[WindowKey] | None:
        """The model-block events this snapshot needs: all of them (``None``) to time the windows, else only those
        that are issue points (often none). Each costs the training thread a few microseconds (a hook, the event, its
        handlers), and in a loop bound by the host during forward and backward (BERT-large's) that is iteration time:
        most iterations announce one block or none, not every block twice."""
        if not (self.scheduler.armed and self.policy is SchedulePolicy.BUBBLES and self.pace_by_blocks):
            return frozenset()
        return None if self.copier.time_windows else self.scheduler.issue_blocks

    def on_event(self, event: PhaseEvent) -> None:
        if not self.scheduler.armed or event.phase not in BUBBLE_PHASES:
            return
        if self.policy is not SchedulePolicy.BUBBLES:
            # these issue everything at iteration start and need no window timing
            if event.phase is Phase.ITERATION_START:
                self._issue(self.scheduler.on_event(event))
            return
        if not self.pace_by_blocks and event.phase in BLOCK_PHASES:
            return
        issued = self.scheduler.on_event(event)
        # the mark also gates the issued copies on the GPU: they start when the window does
        if issued or self.copier.time_windows:
            self.copier.mark(window_key(event))
        self._issue(issued)

    def _issue(self, partitions: Sequence[Partition]) -> None:
        if not partitions:
            return
        started = time.perf_counter()
        self.copier.issue(partitions)
        self.stats.issue_ms += (time.perf_counter() - started) * 1e3
        self.stats.issues += 1

    def issue_rest(self) -> None:
        """Issues what the scheduler has left, without waiting for it: the wait comes at :meth:`fence`, which may
        then come later (right before the optimizer updates the state)."""
        if self.scheduler.armed:
            self._issue(self.scheduler.fence())

    def fence(self) -> FenceTicket:
        """Issues what is left and makes the next optimizer step wait for every copy of the snapshot."""
        self.issue_rest()
        ticket = self.copier.fence()
        s = self.stats
        s.bytes_by_phase = dict(self.scheduler.bytes_by_phase)
        s.fence_bytes = self.scheduler.fence_bytes
        s.gbps = self.copier.bytes_per_ms() / 1e6
        s.issuer_ms = self.copier.thread_ms()
        if s.issues:
            per_issue = (s.issue_ms + s.issuer_ms) / s.issues
            self._issue_cost = per_issue if not self._issue_cost else 0.7 * self._issue_cost + 0.3 * per_issue
        return ticket

    def forget(self, buffer: torch.Tensor) -> None:
        """Called before a slot's memory is unmapped: nothing may keep a view of it."""
        self._boundary_views.pop(buffer.data_ptr(), None)
        if isinstance(self.copier, CudaCopier):
            self.copier.forget(buffer)

    def close(self) -> None:
        self.copier.close()

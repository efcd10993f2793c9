"""Copiers move a snapshot's partitions into its host slot.

* :class:`CudaCopier`: one dedicated CUDA copy stream; small tensors are packed into a fixed GPU staging ring (one
  device-to-device copy each, then one large transfer); large tensors go straight from GPU memory into the slot,
  which is shared memory registered with CUDA (page-locked), so there is no second host copy. Nothing on the
  training thread blocks: the fence makes the *compute stream* wait for the copy stream, and the stall is measured
  on the GPU with events.
* :class:`ThreadCopier`: the CPU path. A worker thread copies the partitions while training goes on; the fence waits
  for it on the training thread.
* :class:`HostCopier`: copies everything at once on the calling thread (explicit, synchronous saves).

A copier is driven by the snapshot engine, on the training thread only: ``begin`` after optimizer step *t*;
``mark`` at each bubble event of iteration *t+1* (window timing); ``issue`` for the partitions the scheduler hands
out; ``fence`` before optimizer step *t+1*, which returns a :class:`FenceTicket`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from .format import TensorRecord, byte_view
from .plan import Partition, Piece
from .scheduler import WindowKey
from .worker import BackgroundWorker

log = logging.getLogger(__name__)


def source_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of ``tensor`` (no copy for the contiguous tensors DeepSpeed keeps)."""
    t = tensor.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8)


def coalesce(partitions: Sequence[Partition]) -> list[Partition]:
    """Joins runs of direct partitions that continue each other in both the source tensor and the slot, so a
    window's copies cost the training thread one call per run instead of one per partition."""
    out: list[Partition] = []
    for partition in partitions:
        if out and not partition.packed and not out[-1].packed:
            last, piece = out[-1].pieces[0], partition.pieces[0]
            if (piece.tensor == last.tensor and piece.src_offset == last.src_offset + last.nbytes
                    and piece.dst_offset == last.dst_offset + last.nbytes):
                joined = Piece(last.tensor, last.src_offset, last.dst_offset, last.nbytes + piece.nbytes)
                out[-1] = Partition(out[-1].index, (joined,), packed=False, bucket=out[-1].bucket)
                continue
        out.append(partition)
    return out


class FenceTicket(Protocol):
    def done(self) -> bool:
        """True once every copy of the snapshot landed (never blocks)."""
        ...

    def wait(self) -> None:
        """Blocks until :meth:`done`."""
        ...

    def stall_ms(self) -> float:
        """How long training waited at the fence (valid once done)."""
        ...


class Copier(Protocol):
    # whether this snapshot's marks time every window (set after ``begin``); if not, they only gate issued copies
    time_windows: bool

    def begin(self, buffer: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None: ...
    def mark(self, key: WindowKey) -> None: ...
    def issue(self, partitions: Sequence[Partition]) -> None: ...
    def fence(self) -> FenceTicket: ...
    def window_ms(self) -> dict[WindowKey, float]:
        """Window durations measured since the last call (empty if none were): each measurement is learned once."""
        ...
    def bytes_per_ms(self) -> float: ...
    def thread_ms(self) -> float:
        """CPU time the copier's own thread spent issuing this snapshot's copies (valid after ``fence``)."""
        ...
    def close(self) -> None: ...


class HostCopier:
    """Copies at once, on the calling thread."""

    @torch.no_grad()
    def start(self, buffer: torch.Tensor, records: Sequence[TensorRecord], tensors: Sequence[torch.Tensor]) -> None:
        for record, tensor in zip(records, tensors, strict=True):
            if record.nbytes:
                byte_view(buffer, record).copy_(tensor)


def _copy_piece_on_host(buffer: torch.Tensor, tensors: Sequence[torch.Tensor], partition: Partition) -> None:
    for piece in partition.pieces:
        src = source_bytes(tensors[piece.tensor])[piece.src_offset : piece.src_offset + piece.nbytes]
        buffer[piece.dst_offset : piece.dst_offset + piece.nbytes].copy_(src)


class _DoneTicket:
    def __init__(self, waited_ms: float) -> None:
        self._waited_ms = waited_ms

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        pass

    def stall_ms(self) -> float:
        return self._waited_ms


class _EMA:
    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.value = 0.0

    def add(self, sample: float) -> None:
        self.value = sample if self.value == 0.0 else (1 - self.alpha) * self.value + self.alpha * sample


class _Measured:
    """What both copiers learn for the scheduler: window lengths (from the marks of snapshots that time them) and the
    copy bandwidth."""

    def __init__(self) -> None:
        self._windows: dict[WindowKey, float] = {}
        self._bandwidth = _EMA()
        self.time_windows = True

    def window_ms(self) -> dict[WindowKey, float]:
        windows, self._windows = self._windows, {}
        return windows

    def bytes_per_ms(self) -> float:
        return self._bandwidth.value


class ThreadCopier(_Measured):
    """The CPU path: a worker thread copies issued partitions into the slot while training goes on.

    Safe because the tensors of snapshot *t* do not change before optimizer step *t+1*, and the fence (on the
    training thread, before that step) waits for the worker. The worker runs no collectives.
    """

    def __init__(self, name: str = "oteacheck-copier") -> None:
        super().__init__()
        self._worker = BackgroundWorker(name)
        self._buffer: torch.Tensor | None = None
        self._tensors: Sequence[torch.Tensor] = ()
        self._marks: list[tuple[WindowKey, float]] = []

    def begin(self, buffer: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        self._buffer, self._tensors = buffer, tensors
        self._marks = []

    def mark(self, key: WindowKey) -> None:
        self._marks.append((key, time.perf_counter()))

    def issue(self, partitions: Sequence[Partition]) -> None:
        assert self._buffer is not None
        self._worker.put(self._copy, [(self._buffer, self._tensors, partition) for partition in partitions])

    def fence(self) -> FenceTicket:
        started = time.perf_counter()
        error = self._worker.drain()
        if error is not None:
            raise RuntimeError("copying a snapshot failed") from error
        now = time.perf_counter()
        self._learn_windows(now)
        return _DoneTicket((now - started) * 1e3)

    def _learn_windows(self, end: float) -> None:
        if not self._marks or not self.time_windows:
            return
        windows: dict[WindowKey, float] = {}
        times = [t for _, t in self._marks] + [end]
        for (key, t0), t1 in zip(self._marks, times[1:]):
            windows[key] = windows.get(key, 0.0) + (t1 - t0) * 1e3
        self._windows = windows

    def thread_ms(self) -> float:
        return 0.0  # the worker copies; the issuing happens on the training thread

    def _copy(self, item: tuple[torch.Tensor, Sequence[torch.Tensor], Partition]) -> None:
        buffer, tensors, partition = item
        started = time.perf_counter()
        with torch.no_grad():
            _copy_piece_on_host(buffer, tensors, partition)
        elapsed_ms = (time.perf_counter() - started) * 1e3
        if elapsed_ms > 0:
            self._bandwidth.add(partition.nbytes / elapsed_ms)

    def close(self) -> None:
        self._worker.close()


class HostMemoryRegistry:
    """Page-locks host memory (the shared-memory slots) for CUDA, so copies into it are asynchronous DMA transfers.
    Registration lasts until :meth:`unregister`, which must come before the memory is unmapped.

    It calls the driver API (``cuMemHostRegister``) rather than the runtime's ``cudaHostRegister``: a refused
    registration (memory that cannot be locked, such as a file on disk) then leaves no pending runtime error behind
    for an unrelated later CUDA call to trip over.
    """

    def __init__(self) -> None:
        self._registered: dict[int, int] = {}
        self._failed = False
        self._driver: Any = None

    def _lib(self) -> Any:
        if self._driver is None:
            self._driver = ctypes.CDLL("libcuda.so.1")
            self._register = getattr(self._driver, "cuMemHostRegister_v2", None) or self._driver.cuMemHostRegister
            self._register.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            self._unregister = self._driver.cuMemHostUnregister
            self._unregister.argtypes = [ctypes.c_void_p]
        return self._driver

    def register(self, buffer: torch.Tensor) -> bool:
        ptr, size = buffer.data_ptr(), buffer.numel()
        if self._registered.get(ptr) == size:
            return True
        if ptr in self._registered:
            self.unregister(buffer)
        try:
            self._lib()
            torch.cuda.synchronize()  # the driver call needs torch's CUDA context created and current
            err = self._register(ptr, size, 0)
        except OSError as load_error:
            err = f"no CUDA driver library: {load_error}"
        if err != 0:
            if not self._failed:
                log.warning(
                    "could not page-lock the %d MiB snapshot slot for CUDA (CUresult %s); snapshot copies will block "
                    "the training thread. Put the slots on a tmpfs such as /dev/shm (memory_dir) and check the "
                    "locked-memory limit (ulimit -l).", size >> 20, err,
                )
                self._failed = True
            return False
        self._registered[ptr] = size
        return True

    def unregister(self, buffer: torch.Tensor) -> None:
        ptr = buffer.data_ptr()
        if self._registered.pop(ptr, None) is not None:
            self._unregister(ptr)

    def unregister_all(self) -> None:
        for ptr in list(self._registered):
            self._unregister(ptr)
        self._registered.clear()


class _CudaFenceTicket:
    def __init__(self, copies_done: torch.cuda.Event, before: torch.cuda.Event, after: torch.cuda.Event, host_wait_ms: float, host: FenceTicket) -> None:
        self.copies_done, self.before, self.after, self.host_wait_ms, self.host = copies_done, before, after, host_wait_ms, host

    def done(self) -> bool:
        return self.copies_done.query() and self.after.query()

    def wait(self) -> None:
        self.after.synchronize()

    def stall_ms(self) -> float:
        # the host waited for the issuer to queue the last partitions; the compute stream sat between before and
        # after only while the copy stream was still busy
        return self.host_wait_ms + self.before.elapsed_time(self.after) + self.host.stall_ms()


class CudaCopier(_Measured):
    """GPU -> host copies on a dedicated stream, through a fixed staging ring, into page-locked shared memory.

    Why copies are queued window by window: a GPU serves device-to-host transfers in order, so if the whole snapshot
    were queued at once, any small device-to-host copy the training code makes (``loss.item()``, a mask check) would
    wait behind hundreds of MiB of snapshot, and a device-wide synchronize waits for all of it. By default the
    training thread queues, at each window's event, the partitions the scheduler gave that window, behind an event
    of the window's start on the compute stream: with windows one model block long, what a training-side transfer
    can find ahead of it is one window's budget. With ``pump`` a thread feeds the copy stream ``inflight``
    partitions at a time instead (a bound of one partition, at the price of a thread contending for the GIL; on an
    H200 it was 4% slower on GPT-2 124M than the window-by-window queue). The thread only issues copies and waits
    on events; it runs no collectives.

    Why the copy calls are made on a thread (``issue_thread``): the driver's host time for one device-to-host copy
    grows with its size (on an H200 host, 0.28 ms for one 500 MiB copy into page-locked memory, 23 us for each of
    32 pieces of it), so queueing a whole snapshot cost the training thread 0.5-0.6 ms per iteration. A copy call
    releases the GIL while the driver works; on the issuer thread that time overlaps training. The window's gate
    event is recorded on the training thread first, so where the copies start on the GPU does not change.

    Args:
        device: the training GPU.
        staging_bytes: the ring's size, the only extra GPU memory the engine uses.
        segment_bytes: the largest single transfer (the plan's ``max_bytes``); the ring holds
            ``staging_bytes // segment_bytes`` segments used round-robin.
        inflight: partitions queued on the copy stream at any time (with the pump).
        pump: feed the copy stream from a thread, ``inflight`` partitions at a time; ``False`` queues each window's
            partitions at once, behind the window's start on the GPU, so how long a training-side copy can wait is
            bounded by the scheduler's per-window budget instead.
        issue_thread: without the pump, queue each window's copies from the issuer thread (default) rather than
            from the training thread.
    """

    def __init__(
        self, device: torch.device, staging_bytes: int, segment_bytes: int, inflight: int = 1, pump: bool = False,
        issue_thread: bool = True,
    ) -> None:
        if segment_bytes > staging_bytes:
            raise ValueError(f"a partition ({segment_bytes} bytes) must fit the staging ring ({staging_bytes} bytes)")
        if inflight < 1:
            raise ValueError(f"inflight must be at least 1, got {inflight}")
        super().__init__()
        # the issuer thread selects this device by index
        self.device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        self.staging_bytes = staging_bytes
        self.segment_bytes = segment_bytes
        self.inflight = inflight
        self.pump = pump
        self.issue_thread = issue_thread
        # join contiguous partitions into one copy call (fewer calls); False queues each partition as its own copy,
        # for the ablation's question whether the driver defers part of a large copy's work into later API calls
        self.coalesce = True
        self.stream = torch.cuda.Stream(device=self.device)
        self.registry = HostMemoryRegistry()
        self._ring: torch.Tensor | None = None
        self._next_segment = 0
        self._last_gate: torch.cuda.Event | None = None  # the copy stream waits on each window's gate once
        self._host = ThreadCopier("oteacheck-host-copier")  # partitions whose tensors live in host memory (offload)
        self._buffer: torch.Tensor | None = None
        self._tensors: Sequence[torch.Tensor] = ()
        self._sources: list[torch.Tensor | None] = []
        self._is_cuda: list[bool] = []
        # coalesced runs by the issued partitions' first and last object and count: a loop issues the same slices
        # of a cached plan every snapshot, and joining them again cost the training thread per partition
        self._runs: dict[tuple[int, int, int], tuple[Partition, Partition, list[Partition]]] = {}
        self._compute = torch.cuda.current_stream(self.device)
        self._marks: list[tuple[WindowKey, torch.cuda.Event]] = []
        self._previous_marks: tuple[list[tuple[WindowKey, torch.cuda.Event]], torch.cuda.Event] | None = None
        self._done_copies: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []
        self._done_lock = threading.Lock()  # _done_copies is appended to by the issuer thread
        # the issuer: the pump's (partition, gate event) or a window's (runs, gate event), in issue order
        self._issuer = BackgroundWorker("oteacheck-copy-issuer", on_start=functools.partial(torch.cuda.set_device, self.device))
        self._queued: deque[torch.cuda.Event] = deque()  # the pump's copies on the stream, oldest first
        self._flush = False
        self._thread_ms = 0.0  # the issuer's CPU time for this snapshot (written by the issuer, read after a drain)

    @property
    def ring(self) -> torch.Tensor:
        if self._ring is None:
            segments = max(1, self.staging_bytes // self.segment_bytes)
            self._ring = torch.empty(segments * self.segment_bytes, dtype=torch.uint8, device=self.device)
        return self._ring

    def begin(self, buffer: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        self.registry.register(buffer)
        self._buffer, self._tensors = buffer, tensors
        self._flush = False
        self._thread_ms = 0.0
        self._host.begin(buffer, tensors)
        self.ring  # allocated on the training thread, before the issuer uses it
        self._learn()
        self._marks = []
        # looked up once per snapshot: at every window the lookup cost the training thread more than the event
        self._compute = torch.cuda.current_stream(self.device)
        self._sources = [None] * len(tensors)
        self._is_cuda = [t.is_cuda for t in tensors]
        # the copy stream may read the state only once optimizer step t (queued on the compute stream) is done
        ready = torch.cuda.Event()
        ready.record(self._compute)
        self.stream.wait_event(ready)

    def mark(self, key: WindowKey) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record(self._compute)
        self._marks.append((key, event))

    def _source(self, index: int) -> torch.Tensor:
        """The byte view of the snapshot's tensor ``index``, made once per snapshot (a large tensor is copied in many
        partitions). The issuer thread needs no snapshot of its own: the fence drains it before the next ``begin``."""
        view = self._sources[index]
        if view is None:
            view = self._sources[index] = source_bytes(self._tensors[index])
        return view

    def issue(self, partitions: Sequence[Partition]) -> None:
        assert self._buffer is not None
        is_cuda = self._is_cuda
        on_host = [p for p in partitions if not is_cuda[p.pieces[0].tensor]]
        on_gpu = [p for p in partitions if is_cuda[p.pieces[0].tensor]] if on_host else partitions
        if on_host:
            self._host.issue(on_host)
        # copies of this window start on the GPU when the window does, not when the host got here
        gate = self._marks[-1][1] if self._marks else None
        if not self.pump:
            if not on_gpu:
                return
            runs = self._coalesced(on_gpu) if self.coalesce else on_gpu
            if self.issue_thread:
                self._issuer.put(self._enqueue_window, [(runs, gate)])
            else:
                self._enqueue(runs, gate)
            return
        self._issuer.put(self._pump_one, [(partition, gate) for partition in on_gpu])

    def _coalesced(self, partitions: Sequence[Partition]) -> list[Partition]:
        first, last = partitions[0], partitions[-1]
        key = (id(first), id(last), len(partitions))
        cached = self._runs.get(key)
        if cached is not None and cached[0] is first and cached[1] is last:  # the entry keeps both alive: ids hold
            return cached[2]
        if len(self._runs) >= 256:  # plans of an earlier layout
            self._runs.clear()
        runs = coalesce(partitions)
        self._runs[key] = (first, last, runs)
        return runs

    def _enqueue_window(self, item: tuple[Sequence[Partition], torch.cuda.Event | None]) -> None:
        # on the issuer thread; no collectives here
        started = time.thread_time()
        self._enqueue(*item)
        self._thread_ms += (time.thread_time() - started) * 1e3

    def _pump_one(self, item: tuple[Partition, torch.cuda.Event | None]) -> None:
        # on the pump thread; no collectives here
        partition, gate = item
        while len(self._queued) >= self.inflight and not self._flush:
            self._queued.popleft().synchronize()  # releases the GIL while the GPU copies
        started = time.thread_time()
        self._queued.append(self._enqueue((partition,), gate))
        self._thread_ms += (time.thread_time() - started) * 1e3

    def _enqueue(self, partitions: Sequence[Partition], gate: torch.cuda.Event | None) -> torch.cuda.Event:
        """Queues the partitions' copies on the copy stream behind ``gate``, timed as one run (events and the stream
        switch cost the training thread per call, not per partition); returns the event of their end."""
        if gate is not None and gate is not self._last_gate:
            self.stream.wait_event(gate)
            self._last_gate = gate
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.no_grad(), torch.cuda.stream(self.stream):
            start.record(self.stream)
            for partition in partitions:
                self._copy(partition)
            end.record(self.stream)
        with self._done_lock:
            self._done_copies.append((start, end, sum(p.span for p in partitions)))
        return end

    def _copy(self, partition: Partition) -> None:
        assert self._buffer is not None
        dst = self._buffer[partition.dst_offset : partition.dst_offset + partition.span]
        if not partition.packed:
            piece = partition.pieces[0]
            dst.copy_(self._source(piece.tensor)[piece.src_offset : piece.src_offset + piece.nbytes], non_blocking=True)
            return
        ring = self.ring
        segments = ring.numel() // self.segment_bytes
        base = self._next_segment * self.segment_bytes
        self._next_segment = (self._next_segment + 1) % segments
        # same stream: a segment is refilled only after its previous transfer left it
        staged = ring[base : base + partition.span]
        for piece in partition.pieces:
            at = piece.dst_offset - partition.dst_offset
            staged[at : at + piece.nbytes].copy_(
                self._source(piece.tensor)[piece.src_offset : piece.src_offset + piece.nbytes], non_blocking=True
            )
        dst.copy_(staged, non_blocking=True)

    def fence(self) -> FenceTicket:
        started = time.perf_counter()
        # past the last bubble: the issuer queues the rest at once, so the host waits for the issuing, not the copies
        self._flush = True
        error = self._issuer.drain()
        self._queued.clear()
        host_wait_ms = (time.perf_counter() - started) * 1e3
        if error is not None:
            raise RuntimeError("copying a snapshot failed") from error
        copies_done = torch.cuda.Event()
        copies_done.record(self.stream)
        compute = self._compute
        # the sealer waits on ``after``, up to an iteration: a blocking event lets its thread sleep there instead of
        # spinning a core (by default CUDA spins while fewer contexts than cores are active; eight ranks per host
        # would keep eight cores busy waiting)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True, blocking=True)
        before.record(compute)
        compute.wait_event(copies_done)  # optimizer step t+1 runs only after snapshot t left the GPU
        after.record(compute)
        if self.time_windows and self._marks:  # otherwise the marks only gated copies; the last timing stays
            self._previous_marks = (self._marks, before)
        self._marks = []
        return _CudaFenceTicket(copies_done, before, after, host_wait_ms, self._host.fence())

    def _learn(self) -> None:
        """Window durations and copy bandwidth from events that completed (never waits)."""
        if self._previous_marks is not None:
            marks, end = self._previous_marks
            if end.query():
                windows: dict[WindowKey, float] = {}
                for (key, e0), e1 in zip(marks, [e for _, e in marks[1:]] + [end]):
                    windows[key] = windows.get(key, 0.0) + e0.elapsed_time(e1)
                self._windows = windows
                self._previous_marks = None
        with self._done_lock:
            copies, self._done_copies = self._done_copies, []
        keep, nbytes, ms = [], 0, 0.0
        for start, end_event, size in copies:
            if end_event.query():
                nbytes += size
                ms += start.elapsed_time(end_event)
            else:
                keep.append((start, end_event, size))
        if ms > 0:
            self._bandwidth.add(nbytes / ms)
        with self._done_lock:
            self._done_copies = keep + self._done_copies

    def thread_ms(self) -> float:
        # CPU time, not wall time: waiting for the GIL is not the issuer's cost. It includes the driver's time with
        # the GIL released, which a host with idle cores absorbs, so the scheduler errs toward fewer issue points
        return self._thread_ms

    def forget(self, buffer: torch.Tensor) -> None:
        """The slot behind ``buffer`` is about to be unmapped."""
        self.stream.synchronize()
        self.registry.unregister(buffer)

    def close(self) -> None:
        self._issuer.close()
        self.stream.synchronize()
        self._host.close()
        self.registry.unregister_all()
        self._ring = None

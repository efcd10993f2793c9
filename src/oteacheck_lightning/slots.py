"""Host snapshot slots in shared memory: the in-memory tier's storage, owned by the training process.

Each slot is a file under a per-job, per-rank folder in ``/dev/shm`` (created ``0700``; files ``0600``), mapped into
the process. Shared memory outlives a crash of the training process, so a restarted process on the same node can
resume from it. A slot holds one snapshot: ``slot-K.data`` (the rank's data object, see :mod:`.format`) and, once
sealed, ``slot-K.manifest.json``.

Slot life cycle (all transitions under the pool's lock)::

    FREE --acquire--> FILLING --seal--> SEALED --acquire (reuse)--> FILLING ...
                         \\--abandon--> FREE

``acquire`` never hands out (DESIGN invariant 3):

* the newest sealed slot (it stays the resume point until a newer snapshot is sealed);
* a slot that is pinned (the persister is reading it).

Reusing a sealed slot first deletes its manifest, so a reader can never mistake half-overwritten data for a
snapshot (invariant 1).
"""

from __future__ import annotations

import enum
import hashlib
import mmap
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .format import Manifest

DEFAULT_SHM_ROOT = "/dev/shm"
JOB_PREFIX = "oteacheck-"
RANK_PREFIX = "rank-"


def job_id_for(dirpath: str) -> str:
    """The job id a run derives from its checkpoint folder when neither ``OTEACHECK_JOB_ID`` nor ``job_id`` names
    one: a restart with the same folder finds the same shared memory."""
    return hashlib.sha256(os.path.abspath(dirpath).encode()).hexdigest()[:16]


def job_folder(memory_dir: str | Path, job_id: str) -> Path:
    """Where one job keeps the snapshot slots of its ranks on this machine."""
    return Path(memory_dir) / f"{JOB_PREFIX}{job_id}"


def rank_folder(memory_dir: str | Path, job_id: str, rank: int) -> Path:
    """Where one rank of one job keeps its snapshot slots."""
    return job_folder(memory_dir, job_id) / f"{RANK_PREFIX}{rank:05d}"


def rank_folders(job: Path) -> dict[int, Path]:
    """The rank folders in one job's folder on this machine, by rank."""
    out = {}
    for folder in sorted(job.glob(f"{RANK_PREFIX}*")):
        digits = folder.name[len(RANK_PREFIX) :]
        if digits.isdigit():
            out[int(digits)] = folder
    return out


class SlotState(enum.Enum):
    FREE = "free"
    FILLING = "filling"
    SEALED = "sealed"


def write_file_atomically(path: Path, payload: bytes, fsync: bool = False) -> None:
    """Writes ``payload`` to a temporary name and renames it over ``path`` (owner-only permissions)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if fsync:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def make_private_dir(path: Path) -> Path:
    """Creates ``path`` (and parents) readable by the owner only, and refuses a folder someone else owns."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user; choose another memory_dir or job id")
    os.chmod(path, 0o700)
    return path


@dataclass(eq=False)
class Slot:
    index: int
    data_path: Path
    manifest_path: Path
    state: SlotState = SlotState.FREE
    step: int = -1
    pins: int = 0
    capacity: int = 0
    manifest: Manifest | None = None
    _mmap: mmap.mmap | None = field(default=None, repr=False)
    _buffer: torch.Tensor | None = field(default=None, repr=False)
    # told before the mapping goes away (the CUDA copier un-page-locks it)
    before_unmap: Callable[[torch.Tensor], None] | None = field(default=None, repr=False)

    @property
    def buffer(self) -> torch.Tensor:
        """The slot's bytes as a flat ``uint8`` CPU tensor over shared memory (no copy)."""
        if self._buffer is None:
            raise RuntimeError(f"slot {self.index} is not mapped")
        return self._buffer

    def memoryview(self, nbytes: int) -> memoryview:
        assert self._mmap is not None
        return memoryview(self._mmap)[:nbytes]

    def ensure_capacity(self, nbytes: int) -> None:
        """Grows the shared-memory file to at least ``nbytes`` and (re)maps it."""
        if nbytes <= self.capacity and self._mmap is not None:
            return
        size = max(nbytes, 4096)
        self.unmap()
        fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, size)
            self._mmap = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.capacity = size
        self._buffer = torch.frombuffer(self._mmap, dtype=torch.uint8)

    def unmap(self) -> None:
        if self._buffer is not None and self.before_unmap is not None:
            self.before_unmap(self._buffer)
        self._buffer = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                # a tensor view still references the mapping; the OS reclaims it when that view dies
                pass
            self._mmap = None


class SlotPool:
    """A fixed number of shared-memory slots for one rank of one job."""

    def __init__(self, directory: Path, count: int) -> None:
        if count < 2:
            raise ValueError("memory_slots must be at least 2: one for the newest snapshot and one to fill")
        self.directory = make_private_dir(Path(directory))
        self._lock = threading.Lock()
        self._slots = [
            Slot(i, self.directory / f"slot-{i}.data", self.directory / f"slot-{i}.manifest.json") for i in range(count)
        ]
        self._newest: Slot | None = None
        self._sequence = 0
        self._sealed_order: dict[int, int] = {}
        self.skipped = 0
        # a restarted process takes over the folder of the crashed one: its snapshots stay readable until
        # the first new snapshot reuses their slot
        found = [(m.step, slot) for slot in self._slots if (m := read_manifest(slot.manifest_path)) is not None]
        for step, slot in sorted(found, key=lambda item: item[0]):
            slot.state, slot.step, slot.manifest = SlotState.SEALED, step, read_manifest(slot.manifest_path)
            self._mark_sealed(slot)

    @property
    def slots(self) -> list[Slot]:
        return list(self._slots)

    def set_unmap_hook(self, hook: Callable[[torch.Tensor], None] | None) -> None:
        for slot in self._slots:
            slot.before_unmap = hook

    def newest(self) -> Slot | None:
        with self._lock:
            return self._newest

    def _mark_sealed(self, slot: Slot) -> None:
        self._sequence += 1
        self._sealed_order[slot.index] = self._sequence
        self._newest = slot

    def invalidate_after(self, step: int) -> None:
        """Drops sealed snapshots newer than ``step``: after resuming from ``step`` they belong to a timeline
        that no longer exists and must never be resumed from."""
        with self._lock:
            for slot in self._slots:
                if slot.state is SlotState.SEALED and slot.step > step and slot.pins == 0:
                    slot.manifest_path.unlink(missing_ok=True)
                    slot.state, slot.step = SlotState.FREE, -1
                    self._sealed_order.pop(slot.index, None)
            sealed = [s for s in self._slots if s.state is SlotState.SEALED]
            self._newest = max(sealed, key=lambda s: self._sealed_order[s.index]) if sealed else None

    def acquire(self, nbytes: int, keep_from_step: int | None = None) -> Slot | None:
        """A slot to fill with a new snapshot, or ``None`` (counted in :attr:`skipped`) when every slot is
        protected. Never blocks. Protected: the newest sealed slot, slots being filled or pinned, and sealed slots
        of ``keep_from_step`` or later (a snapshot that other ranks may hold as their newest)."""
        with self._lock:
            candidates = [
                s for s in self._slots
                if s.state is not SlotState.FILLING and s.pins == 0 and s is not self._newest
                and not (keep_from_step is not None and s.state is SlotState.SEALED and s.step >= keep_from_step)
            ]
            if not candidates:
                self.skipped += 1
                return None
            # prefer a free slot, then the oldest sealed one
            slot = min(candidates, key=lambda s: (s.state is SlotState.SEALED, self._sealed_order.get(s.index, 0)))
            slot.state, slot.step, slot.manifest = SlotState.FILLING, -1, None
        # invisible before its bytes change
        slot.manifest_path.unlink(missing_ok=True)
        slot.ensure_capacity(nbytes)
        return slot

    def seal(self, slot: Slot, manifest: Manifest, payload: bytes | None = None) -> None:
        """Publishes ``slot`` as the snapshot of ``manifest.step``: the manifest is written last, atomically
        (``payload``: its JSON, if already made)."""
        if slot.state is not SlotState.FILLING:
            raise RuntimeError(f"slot {slot.index} is {slot.state.value}, not filling")
        write_file_atomically(slot.manifest_path, manifest.to_json() if payload is None else payload)
        with self._lock:
            slot.state, slot.step, slot.manifest = SlotState.SEALED, manifest.step, manifest
            self._mark_sealed(slot)

    def abandon(self, slot: Slot) -> None:
        with self._lock:
            slot.state, slot.step = SlotState.FREE, -1
            self._sealed_order.pop(slot.index, None)

    def pin_newest(self) -> Slot | None:
        """Pins the newest sealed slot (so it cannot be reused while read) and returns it; ``None`` if none."""
        with self._lock:
            slot = self._newest
            if slot is None or slot.state is not SlotState.SEALED:
                return None
            slot.pins += 1
            if slot._mmap is None:
                slot.ensure_capacity(slot.data_path.stat().st_size)
            return slot

    def unpin(self, slot: Slot) -> None:
        with self._lock:
            if slot.pins <= 0:
                raise RuntimeError(f"slot {slot.index} is not pinned")
            slot.pins -= 1

    def remove_ranks_from(self, first: int) -> None:
        """Deletes the shared memory of the job's ranks numbered ``first`` or higher on this machine: after a
        resume with fewer ranks no process owns it, and it would hold the machine's memory until reboot."""
        for rank, folder in rank_folders(self.directory.parent).items():
            if rank >= first and folder != self.directory:
                shutil.rmtree(folder, ignore_errors=True)

    def close(self, remove: bool) -> None:
        """Unmaps every slot; with ``remove`` also deletes the shared memory (a normal end of training)."""
        for slot in self._slots:
            slot.unmap()
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)
            try:
                self.directory.parent.rmdir()  # the job folder, once the last rank of this node is gone
            except OSError:
                pass


def read_manifest(path: Path) -> Manifest | None:
    """The manifest at ``path``, or ``None`` if it does not exist or cannot be parsed."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return Manifest.from_json(raw)
    except ValueError:
        return None

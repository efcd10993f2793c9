"""Background persistence of sealed in-memory snapshots to the persistent tiers.

One daemon thread per rank. The training thread only *marks* a target as due (:meth:`Persister.request`); it
never waits on storage (DESIGN invariant 5). The thread, for each due target, pins the newest sealed slot (so it
cannot be reused, invariant 3), computes the checksums, writes the rank's objects and prunes old steps.

State of one target::

    idle --request--> due --thread picks newest sealed slot--> writing --ok--> idle
                                                                   \\--error--> retry with backoff (newest slot)
                                                                               \\--gave up--> idle, unhealthy

When storage is slower than the schedule, requests that arrive while a write is running collapse into one, which
takes the newest snapshot then; the collapsed ones are counted in ``skipped``. A failing tier warns once with the
cause, counts ``failures`` and keeps ``healthy=False`` until a write succeeds again. Training goes on (invariant 9).

Do not use any collectives in this module: it runs off the training thread (invariant 8).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from .format import Manifest, add_checksums
from .slots import Slot, SlotPool

log = logging.getLogger(__name__)


class PersistentTier(Protocol):
    name: str

    def write(self, manifest: Manifest, data: memoryview) -> None: ...

    def prune(self, rank: int, keep_last: int) -> list[int]: ...


@dataclass
class PersistSchedule:
    """When to persist to one tier, and how many checkpoints to keep there.

    Args:
        url: where (a local path, ``file://``, ``hdfs://``, ``webhdfs://``, ``memory://``); ``None`` means the
            checkpoint callback's ``dirpath``.
        every_n_steps: persist the newest snapshot when the global step is a multiple of this.
        every_n_seconds: persist the newest snapshot when this much time passed since the last persist began.
        keep_last: number of committed checkpoints kept in this tier (older ones are removed); ``None`` keeps all.
    """

    url: str | None = None
    every_n_steps: int | None = 50
    every_n_seconds: float | None = None
    keep_last: int | None = 3

    def __post_init__(self) -> None:
        if self.every_n_steps is None and self.every_n_seconds is None:
            raise ValueError("PersistSchedule needs every_n_steps or every_n_seconds (or both)")
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {self.every_n_steps}")
        if self.every_n_seconds is not None and self.every_n_seconds <= 0:
            raise ValueError(f"every_n_seconds must be > 0, got {self.every_n_seconds}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {self.keep_last}")

    def is_due(self, step: int, seconds_since_last: float) -> bool:
        by_steps = self.every_n_steps is not None and step % self.every_n_steps == 0
        by_time = self.every_n_seconds is not None and seconds_since_last >= self.every_n_seconds
        return by_steps or by_time


@dataclass
class TargetStats:
    """Metrics of one persistent tier; read by the training thread, written by the persister thread."""

    persisted_step: int = -1
    persisted: int = 0
    skipped: int = 0
    failures: int = 0
    healthy: bool = True
    last_error: str | None = None
    last_seconds: float = 0.0
    last_bytes: int = 0

    @property
    def last_gbps(self) -> float:
        return self.last_bytes / self.last_seconds / 1e9 if self.last_seconds > 0 else 0.0


@dataclass(eq=False)
class _Target:
    tier: PersistentTier
    schedule: PersistSchedule
    stats: TargetStats = field(default_factory=TargetStats)
    due: bool = False
    last_start: float = field(default_factory=time.monotonic)
    warned: bool = False


class Persister:
    """Writes the newest sealed snapshot of one rank to each persistent tier on its schedule."""

    def __init__(
        self,
        pool: SlotPool,
        targets: list[tuple[PersistentTier, PersistSchedule]],
        retries: int = 3,
        backoff_seconds: float = 0.5,
    ) -> None:
        self.pool = pool
        self.targets = [_Target(tier, schedule) for tier, schedule in targets]
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="oteacheck-persister", daemon=True)
        self._thread.start()

    # --- training thread ---------------------------------------------------------------------------------

    def request(self, step: int, force: bool = False) -> None:
        """Marks each target whose schedule is due at ``step`` (all targets with ``force``). Never blocks on I/O."""
        now = time.monotonic()
        with self._cond:
            for t in self.targets:
                if force or t.schedule.is_due(step, now - t.last_start):
                    if t.due:
                        t.stats.skipped += 1
                    t.due = True
            self._cond.notify_all()

    def stats(self) -> dict[str, TargetStats]:
        return {t.tier.name: t.stats for t in self.targets}

    def drain(self, timeout: float | None = None) -> bool:
        """Waits until nothing is due or being written; returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while any(t.due for t in self.targets) or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, drain: bool, timeout: float | None = 600.0) -> list[str]:
        """Stops the thread (after draining, if asked); returns the names of tiers left with unwritten work."""
        if drain:
            self.drain(timeout)
        with self._cond:
            self._closed = True
            pending = [t.tier.name for t in self.targets if t.due]
            self._cond.notify_all()
        self._thread.join(timeout=60)
        return pending

    # --- persister thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not any(t.due for t in self.targets):
                    self._cond.wait()
                if self._closed:
                    return
                target = next(t for t in self.targets if t.due)
                target.due = False
                target.last_start = time.monotonic()
                self._busy = True
            try:
                self._persist(target)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _persist(self, target: _Target) -> None:
        for attempt in range(self.retries + 1):
            slot = self.pool.pin_newest()
            if slot is None:
                return
            try:
                started = time.monotonic()
                manifest = self._checksummed_manifest(slot)
                target.tier.write(manifest, slot.memoryview(manifest.data_bytes))
                if target.schedule.keep_last is not None:
                    target.tier.prune(manifest.rank, target.schedule.keep_last)
            except Exception as err:  # any storage error degrades persistence, never training
                self._record_failure(target, err, attempt)
                if attempt < self.retries and not self._closed:
                    time.sleep(self.backoff_seconds * 2**attempt)
                    continue
                return
            finally:
                self.pool.unpin(slot)
            stats = target.stats
            stats.persisted_step, stats.persisted = manifest.step, stats.persisted + 1
            stats.last_seconds, stats.last_bytes = time.monotonic() - started, manifest.data_bytes
            if not stats.healthy:
                log.warning("persistence to %s recovered at step %d", target.tier.name, manifest.step)
            stats.healthy, target.warned = True, False
            return

    def _checksummed_manifest(self, slot: Slot) -> Manifest:
        manifest = slot.manifest
        if manifest is None:
            raise RuntimeError(f"slot {slot.index} has no manifest")
        if not manifest.verified:
            # computed once per snapshot, here, off the training thread
            add_checksums(manifest, slot.memoryview(manifest.data_bytes))
        return manifest

    def _record_failure(self, target: _Target, err: Exception, attempt: int) -> None:
        stats = target.stats
        stats.failures += 1
        stats.healthy = False
        stats.last_error = f"{type(err).__name__}: {err}"
        if not target.warned:
            target.warned = True
            log.warning(
                "persisting to %s failed (%s); training continues, snapshots stay in memory, retrying",
                target.tier.name,
                stats.last_error,
            )
        else:
            log.debug("persisting to %s failed again (attempt %d): %s", target.tier.name, attempt + 1, stats.last_error)

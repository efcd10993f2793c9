"""Background persistence of sealed in-memory snapshots to the persistent tiers, and their global commit.

One daemon thread per rank writes to every tier of that rank. The training thread only *marks* a target as due
(:meth:`Persister.request`): it pins the snapshot of the requested step (a lock and a counter, no I/O) so the slot
cannot be reused (DESIGN invariant 3), and never waits on storage (invariant 5).

State of one target (one tier with its schedule)::

    idle --request: pin slot of step s--> due(s) --thread takes it--> writing(s) --ok--> written(s) --> idle
           ^   \\--request(s') while due: unpin s, pin s', skipped += 1    \\--error--> retry with backoff
           |                                                                    (same slot; a newer request wins)
           +---- written(s) on rank 0: commit pending(s) --all manifests there--> COMMIT(s), retention
                                                         \\--commit timeout / newer step committed--> dropped

Commit protocol of a periodic checkpoint of step *s* in one tier (see :mod:`.tiers.fsspec_tier` for the layout):

1. the training thread of every rank seals snapshot *s* and requests it; with a step schedule every rank requests
   the same steps, and pinning at request time makes every rank persist exactly those steps;
2. every rank's persister thread writes its data object, then its manifest (durable before the manifest);
3. the coordinator, rank 0's persister thread, keeps *s* as a pending commit and polls the step folder every
   ``poll_seconds`` (without blocking its other work) until all ``world_size`` manifests of *s* are there;
4. the coordinator writes the ``COMMIT`` marker (atomically: rename, or a commit file that only parses once
   complete); from then on readers see *s*; then it applies retention, making old steps invisible first;
5. the other ranks remove their files of steps the coordinator took out of sight, at their next retention pass.

Coordinating through storage keeps torch.distributed on the training thread only (invariant 8) and keeps the
training thread free of storage waits (invariant 5). Time schedules with several ranks fire at step intervals the
ranks agreed on (:mod:`.pace`), so they too request the same steps everywhere. A step that some rank never writes
(its tier failed) is never committed: the coordinator drops it when a newer step commits or after
``commit_timeout_seconds``, and retention removes its files.

When storage is slower than the schedule, a request that arrives while the previous one is still due replaces it
(the newest sealed snapshot wins) and is counted in ``skipped``; at most two slots per tier are pinned (one being
written, one due), so host memory stays bounded. A failing tier warns once with the cause, counts ``failures``,
keeps ``healthy=False`` and ``failing_since`` until a write succeeds again, then logs that it recovered. Training
goes on (invariant 9). :meth:`Persister.close` drains, or returns what was not persisted.

At a resume, or else before its first write to a tier, each rank lists it once: a tier holding steps of another
line of training than this run's (an earlier run's that its start could not see, the tier being down then) is
refused for the rest of the run, ``refused`` and an error, and nothing is written there or removed from there.

Do not use any collectives in this module: it runs off the training thread (invariant 8).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from .format import Manifest, with_checksums
from .slots import Slot, SlotPool
from .tiers.base import Holdings, Origin

log = logging.getLogger(__name__)


class PersistentTier(Protocol):
    name: str

    def write(self, manifest: Manifest, data: memoryview) -> None: ...

    def try_commit(self, step: int, world_size: int, run: str | None = None) -> list[int]: ...

    def prune(self, rank: int, keep_last: int, coordinator: bool | None = None, world_size: int | None = None) -> list[int]: ...

    def discard_after(self, step: int, rank: int, line: Origin, coordinator: bool | None = None,
                      world_size: int | None = None) -> list[int]: ...

    def holdings(self, rank: int) -> Holdings: ...


def unsnapshotted_interval(every_n_steps: int | None, snapshot_every: int, snapshot_key: str = "snapshot_every_n_steps") -> str | None:
    """Why a persist schedule's ``every_n_steps`` cannot work with a snapshot every ``snapshot_every`` steps (named
    ``snapshot_key`` in the message), or None where it can: a step that is never snapshotted is never persisted, so
    such a schedule would persist at the common multiples only, far less often than asked, and say nothing."""
    if every_n_steps is None or every_n_steps % snapshot_every == 0:
        return None
    return (f"not a multiple of {snapshot_key} ({snapshot_every}): only snapshotted steps can be persisted; use a "
            f"multiple of {snapshot_every}")


@dataclass
class PersistSchedule:
    """When to persist to one tier, and how many checkpoints to keep there.

    Args:
        url: where (a local path, ``file://``, ``hdfs://``, ``webhdfs://user@host:port/path``, ``memory://``);
            ``None`` means the checkpoint callback's ``dirpath``.
        every_n_steps: persist the snapshot of every step that is a multiple of this (the same steps on every
            rank, so each of them can be committed).
        every_n_seconds: persist the newest snapshot when this much time passed since the last request. With
            several ranks, about this often, at a step interval every rank agrees on (see :mod:`.pace`), so that
            every rank persists the same steps and they can be committed.
        keep_last: number of committed checkpoints kept in this tier (older ones are removed); ``None`` keeps all.
        storage_options: passed to the fsspec filesystem (for ``hdfs://``: hdfs-native client settings).
        commit_timeout_seconds: how long rank 0 waits for the other ranks' files of a step before giving it up.
    """

    url: str | None = None
    every_n_steps: int | None = 50
    every_n_seconds: float | None = None
    keep_last: int | None = 3
    storage_options: dict[str, Any] | None = None
    commit_timeout_seconds: float = 120.0

    def __post_init__(self) -> None:
        if self.every_n_steps is None and self.every_n_seconds is None:
            raise ValueError("PersistSchedule needs every_n_steps or every_n_seconds (or both)")
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {self.every_n_steps}")
        if self.every_n_seconds is not None and self.every_n_seconds <= 0:
            raise ValueError(f"every_n_seconds must be > 0, got {self.every_n_seconds}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {self.keep_last}")
        if self.commit_timeout_seconds <= 0:
            raise ValueError(f"commit_timeout_seconds must be > 0, got {self.commit_timeout_seconds}")

    @classmethod
    def parse(cls, spec: str, **kwargs: Any) -> PersistSchedule:
        """``URL:EVERY:KEEP``, e.g. ``/ckpt:50:3``, ``hdfs://nn:8020/ckpt:500:10``, ``file:///ckpt:30s:all``
        (``EVERY`` in steps, or seconds with an ``s`` suffix; ``KEEP`` a count or ``all``)."""
        try:
            url, every, keep = spec.rsplit(":", 2)
        except ValueError:
            raise ValueError(f"a persist spec is URL:EVERY:KEEP, got {spec!r}") from None
        if not url or not every or not keep:
            raise ValueError(f"a persist spec is URL:EVERY:KEEP, got {spec!r}")
        timing = {"every_n_steps": None, "every_n_seconds": float(every[:-1])} if every.endswith("s") else {"every_n_steps": int(every)}
        return cls(url=url, keep_last=None if keep == "all" else int(keep), **timing, **kwargs)

    def is_due(self, step: int, seconds_since_last: float | None, seconds_as_steps: int | None = None) -> bool:
        """Whether ``step`` is to be persisted. ``seconds_since_last`` ``None``: the time schedule is paced in steps
        (several ranks, :mod:`.pace`), due at multiples of ``seconds_as_steps`` once the ranks agreed on it."""
        by_steps = self.every_n_steps is not None and step % self.every_n_steps == 0
        if self.every_n_seconds is None:
            return by_steps
        if seconds_since_last is not None:
            return by_steps or seconds_since_last >= self.every_n_seconds
        return by_steps or (seconds_as_steps is not None and step % seconds_as_steps == 0)


@dataclass
class TargetStats:
    """Metrics of one persistent tier; written by the persister thread, read by the training thread.

    ``persisted_step`` is the newest step this rank wrote (durable); ``committed_step`` the newest step globally
    committed, known on the coordinator (rank 0) only. ``failing_since`` is a ``time.monotonic()`` value while the
    tier fails (``None`` when healthy); ``outages`` counts healthy->failing transitions."""

    persisted_step: int = -1
    persisted: int = 0
    committed_step: int = -1
    committed: int = 0
    skipped: int = 0
    failures: int = 0
    outages: int = 0
    healthy: bool = True
    failing_since: float | None = None
    last_error: str | None = None
    failed_step: int = -1
    uncommitted: int = 0
    commit_timeouts: int = 0
    last_seconds: float = 0.0
    last_bytes: int = 0
    paced_every_n_steps: int = 0  # with several ranks: the agreed step interval of every_n_seconds (0: none yet)
    # the tier holds steps of another line than this run's, seen at the resume or before this run's first write
    # there: nothing is written to it or removed from it for the rest of the run
    refused: bool = False

    @property
    def last_gbps(self) -> float:
        return self.last_bytes / self.last_seconds / 1e9 if self.last_seconds > 0 else 0.0

    @property
    def outage_seconds(self) -> float:
        return time.monotonic() - self.failing_since if self.failing_since is not None else 0.0


@dataclass(eq=False)
class _Target:
    tier: PersistentTier
    schedule: PersistSchedule
    stats: TargetStats = field(default_factory=TargetStats)
    pending: Slot | None = None  # pinned by request(), owned by the target until the thread takes it
    last_request: float = field(default_factory=time.monotonic)
    warned: bool = False
    # coordinator only: step -> (world size, monotonic deadline, the run that wrote it)
    commits: dict[int, tuple[int, float, str]] = field(default_factory=dict)
    # with several ranks: every_n_seconds as agreed step intervals, (from step, every n steps), newest last
    paced: list[tuple[int, int]] = field(default_factory=list)
    # after a resume from this step while the tier was down: its newer steps belong to the abandoned run and are
    # removed before this rank's next write to it
    discard_after: int | None = None
    discard_line: Origin | None = None  # the resumed run's origin: only steps of the runs it left go
    # whether this rank looked (at the resume, or before its first write to the tier) for steps of another line
    checked: bool = False


class Persister:
    """Writes the snapshots of one rank to each persistent tier on its schedule; on rank 0, also commits them."""

    def __init__(
        self,
        pool: SlotPool,
        targets: list[tuple[PersistentTier, PersistSchedule]],
        retries: int = 3,
        backoff_seconds: float = 0.5,
        poll_seconds: float = 0.05,
        paced: bool = False,
        world_size: int | None = None,
    ) -> None:
        self.pool = pool
        # the ranks of this run: retention also removes files of ranks beyond it (a run resumed with fewer ranks)
        self.world_size = world_size
        # several ranks: time schedules fire at the agreed step intervals of pace(), never by this rank's clock
        self.paced = paced
        self.targets = [_Target(tier, schedule) for tier, schedule in targets]
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.poll_seconds = poll_seconds
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="oteacheck-persister", daemon=True)
        self._thread.start()

    # --- training thread ---------------------------------------------------------------------------------

    def request(self, step: int, force: bool = False) -> None:
        """Marks every target whose schedule is due at ``step`` (or all, with ``force``) and pins the newest
        sealed snapshot for it. Never blocks on I/O."""
        now = time.monotonic()
        with self._cond:
            if self._closed:
                return
            for t in self.targets:
                if t.stats.refused or not (force or self._due(t, step, now)):
                    continue
                slot = self.pool.pin_newest()
                if slot is None:
                    continue
                if t.pending is not None:
                    self.pool.unpin(t.pending)
                    t.stats.skipped += 1
                t.pending, t.last_request = slot, now
            self._cond.notify_all()

    def _due(self, t: _Target, step: int, now: float) -> bool:
        if not self.paced:
            return t.schedule.is_due(step, now - t.last_request)
        # the agreed interval that applies at this step (none before the first agreement)
        return t.schedule.is_due(step, None, next((n for first, n in reversed(t.paced) if first <= step), None))

    def pace(self, from_step: int, seconds_per_step: float, step_multiple: int = 1) -> None:
        """From ``from_step`` on, time schedules fire every ``every_n_seconds / seconds_per_step`` steps (a
        multiple of ``step_multiple``, the snapshot interval); called with the same values on every rank."""
        with self._cond:
            for t in self.targets:
                if t.schedule.every_n_seconds is None:
                    continue
                snapshots = max(1, round(t.schedule.every_n_seconds / (max(seconds_per_step, 1e-9) * step_multiple)))
                t.paced = t.paced[-1:] + [(from_step, snapshots * step_multiple)]  # the previous one still applies before
                t.stats.paced_every_n_steps = snapshots * step_multiple

    def discard_after(self, step: int, rank: int, line: Origin) -> None:
        """After resuming from ``step`` (training thread): each tier's newer steps belong to the abandoned run; they
        are taken out of sight (rank 0) and this rank's files of them removed now, or, where the tier is down,
        before this rank's next write to it. (Until then its stale files cannot be committed with the resumed run's:
        a commit takes only manifests of one run.) ``line`` is the resumed run's origin: steps of another line (a run
        it never went on from) are left alone."""
        for t in self.targets:
            with self._cond:
                t.discard_after, t.discard_line = step, line
            try:
                self._discard_abandoned(t, rank, logging.INFO)
            except Exception as err:  # down now: done before the next write (_persist)
                log.warning("could not remove steps after %d from %s now (%s: %s); they are removed before the next "
                            "write to it", step, t.tier.name, type(err).__name__, err)
                continue
            try:  # told now rather than at the first write
                self._check_line(t, rank, line)
            except Exception:  # down again: looked at before the first write (_persist)
                log.debug("could not check %s for another line's steps now", t.tier.name, exc_info=True)

    def stats(self) -> dict[str, TargetStats]:
        return {t.tier.name: t.stats for t in self.targets}

    def _idle(self) -> bool:
        return not self._busy and all(t.pending is None and not t.commits for t in self.targets)

    def drain(self, timeout: float | None = None) -> bool:
        """Waits until nothing is due, being written or (on rank 0) waiting to be committed; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._idle():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, drain: bool, timeout: float | None = 600.0) -> list[str]:
        """Stops the thread (after draining, if asked); returns one line per tier describing what was not
        persisted (empty when everything requested is durable and committed)."""
        if drain:
            self.drain(timeout)
        report = []
        with self._cond:
            self._closed = True
            for t in self.targets:
                if t.pending is not None:
                    report.append(f"{t.tier.name}: step {t.pending.step} was never written")
                    self.pool.unpin(t.pending)
                    t.pending = None
                for step in sorted(t.commits):
                    report.append(f"{t.tier.name}: step {step} was written but not every rank's files arrived, so it is not committed")
                if t.stats.failed_step > t.stats.persisted_step:
                    report.append(f"{t.tier.name}: step {t.stats.failed_step} failed ({t.stats.last_error})")
            self._cond.notify_all()
        self._thread.join(timeout=60)
        return report

    # --- persister thread: do not use any collectives below ------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                target = next((t for t in self.targets if t.pending is not None), None)
                if target is None:
                    waiting = any(t.commits for t in self.targets)
                    self._cond.wait(self.poll_seconds if waiting else None)
                    if self._closed:
                        return
                    target = next((t for t in self.targets if t.pending is not None), None)
                slot = None
                if target is not None:
                    slot, target.pending = target.pending, None
                self._busy = True
            try:
                if target is not None and slot is not None:
                    self._persist(target, slot)
                self._advance_commits()
            except Exception:  # a bug here must not kill the thread silently
                log.exception("the persister failed unexpectedly")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _persist(self, target: _Target, slot: Slot) -> None:
        try:
            for attempt in range(self.retries + 1):
                manifest = slot.manifest
                try:
                    started = time.monotonic()
                    manifest = self._checksummed_manifest(slot)
                    if target.discard_after is not None:
                        self._discard_abandoned(target, manifest.rank, logging.WARNING)
                    if not target.checked and not self._check_line(target, manifest.rank, Origin.of_manifest(manifest)):
                        return
                    target.tier.write(manifest, slot.memoryview(manifest.data_bytes))
                except Exception as err:  # any storage error degrades persistence, never training
                    step = manifest.step if manifest is not None else slot.step
                    self._record_failure(target, err, step, attempt)
                    if attempt < self.retries and self._backoff(target, self.backoff_seconds * 2**attempt):
                        continue
                    return
                self._record_success(target, manifest, time.monotonic() - started)
                break
        finally:
            self.pool.unpin(slot)
        if manifest.rank == 0:
            deadline = time.monotonic() + target.schedule.commit_timeout_seconds
            target.commits[manifest.step] = (manifest.world_size, deadline, manifest.run)
            target.stats.uncommitted = len(target.commits)
        elif target.schedule.keep_last is not None:
            self._prune(target, manifest.rank)

    def _discard_abandoned(self, target: _Target, rank: int, level: int) -> None:
        """Removes ``target``'s steps newer than its ``discard_after`` (see :meth:`discard_after`); raises, leaving
        it due, while the tier is down."""
        assert target.discard_after is not None and target.discard_line is not None
        removed = target.tier.discard_after(target.discard_after, rank, target.discard_line, world_size=self.world_size)
        if removed:
            log.log(level, "removed this rank's files of steps %s from %s (newer than the resumed step %d)",
                    removed, target.tier.name, target.discard_after)
        target.discard_after = None

    def _check_line(self, target: _Target, rank: int, line: Origin) -> bool:
        """At a resume, or else before this rank's first write to ``target``: whether the tier holds only steps of
        runs on this run's ``line`` (its own, and those of the earlier runs it went on from; their steps beyond where
        it left them are abandoned, and rank 0 removes them, maybe only after this rank looked). A step of another
        line is an earlier run's that this run could not see at its start (the tier was down then: a fit without
        ``ckpt_path`` over existing checkpoints is refused), or a run's writing beside this one. Writing among them
        would mix the two runs' steps of one number and let retention remove either's; so the tier is refused for
        the rest of this run, touching nothing there, with an error in the log and the tier's metrics unhealthy.
        Raises, leaving the check due, while the tier cannot be listed."""
        held = target.tier.holdings(rank)
        others = {step: origin for step, origin in held.origins.items() if not line.of_line(origin.run)}
        target.checked = True
        if not others:
            return True
        newest = max(others)
        stats = target.stats
        stats.refused, stats.healthy = True, False
        stats.last_error = f"holds step(s) {sorted(others)} of another run's line"
        log.error(
            "%s holds step(s) %s of another line of training than this run's (the newest, step %d, of run %s): "
            "checkpoints this run could not see when it began (was the tier down then?) or of a run writing there "
            "now. Nothing is persisted to it or removed from it for the rest of this run; its snapshots stay in "
            "memory and go to the other tiers. To keep this run's steps there, move those checkpoints away (or use "
            "another dirpath), or resume from them in a new run with ckpt_path=\"last\"",
            target.tier.name, sorted(others), newest, others[newest].run[:8] or "of an older format",
        )
        return False

    def _backoff(self, target: _Target, seconds: float) -> bool:
        """Sleeps before a retry; False when the retry is pointless (closing, or a newer snapshot is due)."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while not self._closed and target.pending is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return True
                self._cond.wait(remaining)
            return False

    def _advance_commits(self) -> None:
        """Coordinator: commits every pending step whose ranks all wrote their files."""
        for target in self.targets:
            for step in sorted(target.commits):
                if step not in target.commits:
                    continue  # dropped below as superseded
                world_size, deadline, run = target.commits[step]
                try:
                    missing = target.tier.try_commit(step, world_size, run)
                except Exception as err:
                    self._record_failure(target, err, step, 0)
                    break
                if not missing:
                    del target.commits[step]
                    stats = target.stats
                    stats.committed_step, stats.committed = max(stats.committed_step, step), stats.committed + 1
                    for older in [s for s in target.commits if s < step]:
                        del target.commits[older]  # a newer step is visible; retention removes the older files
                    if target.schedule.keep_last is not None:
                        self._prune(target, 0)
                elif time.monotonic() > deadline:
                    del target.commits[step]
                    target.stats.commit_timeouts += 1
                    log.warning(
                        "step %d is not committed to %s: rank(s) %s did not write it within %.0f s",
                        step, target.tier.name, missing, target.schedule.commit_timeout_seconds,
                    )
            target.stats.uncommitted = len(target.commits)

    def _prune(self, target: _Target, rank: int) -> None:
        try:
            target.tier.prune(rank, target.schedule.keep_last, coordinator=rank == 0, world_size=self.world_size)
        except Exception as err:
            self._record_failure(target, err, target.stats.persisted_step, 0, what="applying retention to")

    def _checksummed_manifest(self, slot: Slot) -> Manifest:
        manifest = slot.manifest
        if manifest is None:
            raise RuntimeError(f"slot {slot.index} has no manifest")
        if not manifest.verified:
            # computed once per snapshot, here, off the training thread, and kept for the other tiers (the slot is
            # pinned: nothing refills it meanwhile)
            manifest = slot.manifest = with_checksums(manifest, slot.memoryview(manifest.data_bytes))
        return manifest

    def _record_success(self, target: _Target, manifest: Manifest, seconds: float) -> None:
        stats = target.stats
        stats.persisted_step, stats.persisted = manifest.step, stats.persisted + 1
        stats.last_seconds, stats.last_bytes = seconds, manifest.data_bytes
        if not stats.healthy:
            log.warning(
                "persistence to %s recovered at step %d after %d failure(s) over %.1f s",
                target.tier.name, manifest.step, stats.failures, stats.outage_seconds,
            )
        stats.healthy, stats.failing_since, target.warned = True, None, False

    def _record_failure(self, target: _Target, err: Exception, step: int, attempt: int, what: str = "persisting to") -> None:
        stats = target.stats
        stats.failures += 1
        stats.failed_step = max(stats.failed_step, step)
        stats.last_error = f"{type(err).__name__}: {err}"
        if stats.healthy:
            stats.healthy, stats.failing_since, stats.outages = False, time.monotonic(), stats.outages + 1
        if not target.warned:
            target.warned = True
            log.warning(
                "%s %s failed at step %d (%s); training continues, snapshots stay in memory, retrying with backoff",
                what, target.tier.name, step, stats.last_error,
            )
        else:
            log.debug("%s %s failed again at step %d (attempt %d): %s", what, target.tier.name, step, attempt + 1, stats.last_error)

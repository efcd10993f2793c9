"""Failure recovery: the freshest step complete on every rank, loaded from the fastest tier that holds it.

Commit protocol as recovery reads it:

1. every rank lists the steps it holds, in each tier it can reach, with the number of ranks that wrote each
   (memory: its sealed slots; persistent tiers: steps whose global ``COMMIT`` marker is complete, see
   :mod:`.tiers.fsspec_tier`). A tier that cannot be listed holds nothing for this recovery, but if no step is
   found anywhere, recovery stops with the tiers' errors rather than start afresh over checkpoints it could not see
   (a missing root is no error: a first run finds nothing and starts);
2. the ranks exchange those lists (a collective on the training thread) and take the newest step that every rank
   holds somewhere. A step of an abandoned timeline does not count: one a run wrote after the step that a later
   run resumed from (every manifest names the run that wrote it and where that run's line left earlier runs, its
   forks), as a tier that was down at that resume still holds until the resumed line writes there;
3. each rank reads that step from its fastest tier that holds it and verifies the checksums, falling back to the
   next tier on a corrupt copy;
4. the ranks exchange success; if any rank could not load the step, every rank drops it and goes back to 2.

A step written by another number of ranks counts where every rank can read every saved rank's part of it (a
persistent tier; shared memory when all ranks ran on one machine), and wins if it is the newest: then each rank
reads all the saved ranks' checkpoints and takes its own part of them (:mod:`.reshard`). If such a step is only in
the shared memory of several machines, recovery says so rather than start afresh.

So all ranks resume from the same step (DESIGN invariant 4), and a corrupt or partial checkpoint is skipped for
the previous good one. Every skip is reported with the step, the rank, the tier's URL and the reason (for a
checksum mismatch, the tensor's name). Only this module's callers run on the training thread: the collectives here
never run in a background thread (invariant 8).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .tiers.base import Holdings, LoadedRankCheckpoint, Origin, Tier

log = logging.getLogger(__name__)

# gathers one int64 tensor of the same shape from every rank into a (world_size, *shape) tensor
Gather = Callable[[torch.Tensor], torch.Tensor]


class Sink(Protocol):
    """Takes in the saved ranks' checkpoints of a step written by another number of ranks, one at a time (so that
    each one's buffer can go once taken in): :class:`~oteacheck_lightning.reshard.Repartition`."""

    def absorb(self, loaded: LoadedRankCheckpoint) -> None: ...


@dataclass
class RecoveryResult:
    step: int
    # this rank's checkpoint; after a change of world size, that of the saved rank whose own state (data position,
    # RNG streams, metric states) this rank goes on with
    checkpoint: LoadedRankCheckpoint
    skipped: list[tuple[int, str]]
    # after a change of world size: the sink that took in every saved rank's checkpoint
    repartition: Sink | None = None


class StrandedCheckpointError(RuntimeError):
    """The only checkpoints there are were written by another number of ranks, and only parts of them can be read
    here (snapshots in the shared memory of several machines), so this run can neither use nor re-partition them."""


class CheckpointsExistError(RuntimeError):
    """A fit started without ``ckpt_path`` in a checkpoint folder that already holds checkpoints: it would train
    from step 0 beside them, retention would remove its persisted steps as older than the earlier run's, and a later
    ``ckpt_path="last"`` would go back to the earlier run."""


class TiersUnreachableError(RuntimeError):
    """No checkpoint was found, but a tier could not be listed on some rank: it may hold the run's checkpoints, and
    training from step 0 would throw them away (and later write over their step numbers)."""


@dataclass
class _Listing:
    """What one rank found in its tiers."""

    holders: dict[int, list[Tier]]  # steps of this rank's part at this world size: the tiers holding it
    foreign: dict[int, list[tuple[Tier, int]]]  # steps whole at another world size: the tiers, with that size
    stranded: dict[int, int]  # steps at another world size of which only parts are here: that size
    unreachable: list[str]  # "tier: error" of each tier that could not be listed


def abandoned_after(origins: Iterable[Origin]) -> dict[str, int]:
    """Each run whose newer steps belong to an abandoned timeline, with the newest step of it that stays live (-1:
    none).

    The live timeline is the line begun last: its run's steps, and each earlier run's up to the step where the line
    left it (its forks). Every other run was left behind: by a resume from an earlier step of it, or entirely, by a
    run started afresh beside its steps (that could not see them: their tier was down at its start) or by a resume
    from another line. Where no run recorded its start (older checkpoints), the forks alone decide: a run is
    abandoned after the earliest step any later line left it at."""
    origins = set(origins)
    live = max(origins, key=lambda o: (o.began, o.run), default=None)
    ordered = live is not None and live.began > 0
    cut: dict[str, int] = {}
    for origin in [live] if ordered else origins:
        for run, step in origin.forks:
            cut[run] = min(step, cut.get(run, step))
    if ordered:
        assert live is not None
        for origin in origins:
            if origin.run != live.run:
                cut.setdefault(origin.run, -1)
    return cut


def left_at(step: int, origin: Origin, cut: dict[str, int]) -> int | None:
    """The step at which the live line left the run that wrote ``step`` (of ``cut``, :func:`abandoned_after`; -1:
    it never went on from that run), if ``step`` is newer: then it belongs to an abandoned timeline. ``None`` for a
    live step."""
    at = cut.get(origin.run)
    return at if at is not None and step > at else None


def how_left(at: int) -> str:
    """Why a step that :func:`left_at` places at ``at`` is of an abandoned timeline, for messages."""
    return f"a later run resumed from step {at}" if at >= 0 else "a later run did not go on from it"


def _list_steps(tiers: Sequence[Tier], rank: int, world_size: int) -> _Listing:
    listing = _Listing({}, {}, {}, [])
    holders, foreign, stranded = listing.holders, listing.foreign, listing.stranded
    found: list[tuple[Tier, Holdings]] = []
    for tier in sorted(tiers, key=lambda t: t.speed):
        try:
            found.append((tier, tier.holdings(rank)))
        except Exception as err:  # unreachable: it holds nothing for this recovery (a missing root lists empty)
            log.warning("cannot list checkpoints in %s: %s: %s", tier.name, type(err).__name__, err)
            listing.unreachable.append(f"{tier.name}: {type(err).__name__}: {err}")
    cut = abandoned_after(origin for _, held in found for origin in held.origins.values())
    for tier, held in found:
        gone = {step: at for step, origin in held.origins.items() if (at := left_at(step, origin, cut)) is not None}
        for step, at in sorted(gone.items()):
            log.warning("step %d in %s is of a run that %s: a step of an abandoned timeline, not resumed from",
                        step, tier.name, how_left(at))
        commits = {step: size for step, size in held.mine.items() if step not in gone}
        whole = {step: size for step, size in held.whole.items() if step not in gone}
        for step, size in commits.items():
            if size == world_size:
                holders.setdefault(step, []).append(tier)
            elif step not in whole:
                stranded[step] = size
        for step, size in whole.items():
            if size != world_size:
                foreign.setdefault(step, []).append((tier, size))
    return listing


def newest_held(tiers: Sequence[Tier], rank: int, world_size: int) -> tuple[int, str | None]:
    """The newest step of which this rank finds any part in ``tiers`` (at any world size), and the first tier
    holding it; ``(-1, None)`` when there is none. A tier that cannot be listed is skipped, with a warning that
    says what a run starting afresh does with it (the persister looks again before its first write there)."""
    listing = _list_steps(tiers, rank, world_size)
    for tier in listing.unreachable:
        log.warning("could not check a tier for an earlier run's checkpoints (%s); each rank looks again before its "
                    "first write there, and if it holds some, this run persists nothing there (its snapshots go to the "
                    "other tiers): restore access, or give this run another dirpath", tier)
    newest, where = -1, None
    for step, held in listing.holders.items():
        if step > newest:
            newest, where = step, held[0].name
    for step, copies in listing.foreign.items():
        if step > newest:
            newest, where = step, copies[0][0].name
    stranded = max(listing.stranded, default=-1)  # parts at another world size, in this machine's shared memory
    return (stranded, "shared memory") if stranded > newest else (newest, where)


def agree_on_step(steps: set[int], gather: Gather) -> int | None:
    """The newest step present in every rank's ``steps`` (a collective: every rank must call it)."""
    count = gather(torch.tensor([len(steps)], dtype=torch.int64))
    width = max(int(count.max().item()), 1)
    padded = torch.full((width,), -1, dtype=torch.int64)
    padded[: len(steps)] = torch.tensor(sorted(steps), dtype=torch.int64)
    everyone = gather(padded)
    common = set(everyone[0].tolist())
    for row in everyone[1:]:
        common &= set(row.tolist())
    common.discard(-1)
    return max(common) if common else None


def _unusable(step: int, label: str, tier: Tier, err: Exception, skipped: list[tuple[int, str]]) -> None:
    log.warning("checkpoint of step %d, %s in %s is unusable (%s: %s); trying the next copy",
                step, label, tier.name, type(err).__name__, err)
    skipped.append((step, f"{label} in {tier.name}: {err}"))


def _read_own(step: int, tiers: Sequence[Tier], rank: int, skipped: list[tuple[int, str]]) -> RecoveryResult | None:
    """This rank's checkpoint of ``step`` from the first tier that has it intact."""
    for tier in tiers:
        try:
            return RecoveryResult(step, tier.read(step, rank), skipped)
        except Exception as err:  # corrupt (CheckpointFormatError) or unreachable (OSError, client errors)
            _unusable(step, f"rank {rank}", tier, err, skipped)
    return None


def take_in_every_rank(read: Callable[[int], LoadedRankCheckpoint], size: int, rank: int, sink: Sink) -> LoadedRankCheckpoint:
    """Feeds ``sink`` the checkpoints of the ``size`` saved ranks that ``read(r)`` returns, one at a time; returns
    the one this rank goes on with (that of its own number, or rank 0's for a rank the saved run did not have)."""
    keep, kept = rank if rank < size else 0, None
    for r in range(size):
        loaded = read(r)
        sink.absorb(loaded)
        kept = loaded if r == keep else kept
    assert kept is not None
    return kept


def _read_all(step: int, copies: Sequence[tuple[Tier, int]], rank: int, start: Callable[[], Sink],
              skipped: list[tuple[int, str]]) -> RecoveryResult | None:
    """Every saved rank's checkpoint of ``step``, from the first tier (of ``copies``: tier, saved world size) that
    has them all intact, taken in by a fresh ``start()`` sink (:func:`take_in_every_rank`)."""
    for tier, size in copies:
        sink = start()
        try:
            kept = take_in_every_rank(lambda r: tier.read(step, r), size, rank, sink)
        except Exception as err:  # corrupt, unreachable, or parts that do not fit together
            _unusable(step, f"ranks 0 to {size - 1}", tier, err, skipped)
            continue
        return RecoveryResult(step, kept, skipped, sink)
    return None


def _refuse_to_start_afresh(listing: _Listing, world_size: int, gather: Gather) -> None:
    """No step is complete on every rank. Raises, on every rank alike (a collective), where starting afresh could
    lose checkpoints: parts of a step in the shared memory of several machines, or a tier some rank could not list."""
    newest = max(listing.stranded, default=-1)
    mine = torch.tensor([len(listing.unreachable), newest, listing.stranded.get(newest, 0)], dtype=torch.int64)
    everyone = gather(mine).view(-1, 3).tolist()
    step, size = max((row[1], row[2]) for row in everyone)
    if step >= 0:
        raise StrandedCheckpointError(
            f"the newest checkpoint, step {step}, was written by {size} ranks and is only in shared memory, and not "
            f"every rank's part of it is on every machine of this run of {world_size} ranks. Restart with {size} "
            "processes to resume from it, or configure a persistent tier, from which a run with another number of "
            "ranks can resume."
        )
    failing = [r for r, row in enumerate(everyone) if row[0]]
    if failing:
        seen = "; ".join(listing.unreachable) if listing.unreachable else "see their logs"
        raise TiersUnreachableError(
            f"no checkpoint to resume from was found, but rank(s) {failing} could not list a tier ({seen}). It may "
            "hold this run's checkpoints, and starting from step 0 would lose them. Restore access to the storage "
            "and restart with the same ckpt_path; to start over on purpose, run without ckpt_path or with a new "
            "checkpoint dirpath."
        )


def recover(tiers: Sequence[Tier], rank: int, world_size: int, gather: Gather,
            start_repartition: Callable[[], Sink]) -> RecoveryResult | None:
    """Runs the protocol above; ``None`` when no step is complete on every rank. ``start_repartition()`` makes the
    sink for a step written by another number of ranks."""
    listing = _list_steps(tiers, rank, world_size)
    holders, foreign = listing.holders, listing.foreign
    excluded: set[int] = set()
    skipped: list[tuple[int, str]] = []
    while True:
        step = agree_on_step(set(holders) - excluded, gather)
        other = agree_on_step(set(foreign) - excluded, gather)
        if other is not None and (step is None or other > step):
            # written by another number of ranks: every rank reads all of them and takes its own part
            step = other
            result = _read_all(step, foreign[step], rank, start_repartition, skipped)
        elif step is not None:
            result = _read_own(step, holders[step], rank, skipped)
        else:
            _refuse_to_start_afresh(listing, world_size, gather)
            return None
        ok = gather(torch.tensor([1 if result is not None else 0], dtype=torch.int64))
        if result is not None and bool(ok.min().item()):
            return result
        failed = [r for r, v in enumerate(ok.view(-1).tolist()) if not v]
        log.warning("step %d could not be loaded on rank(s) %s; falling back to an older checkpoint", step, failed)
        excluded.add(step)

"""Failure recovery: the freshest step complete on every rank, loaded from the fastest tier that holds it.

Commit protocol as recovery reads it:

1. every rank lists the steps it holds, in each tier it can reach, with the number of ranks that wrote each
   (memory: its sealed slots; persistent tiers: steps whose global ``COMMIT`` marker is complete, see
   :mod:`.tiers.fsspec_tier`; a tier that cannot be listed holds nothing);
2. the ranks exchange those lists (a collective on the training thread) and take the newest step that every rank
   holds somewhere;
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .tiers.base import LoadedRankCheckpoint, Tier

log = logging.getLogger(__name__)

# gathers one int64 tensor of the same shape from every rank into a (world_size, *shape) tensor
Gather = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RecoveryResult:
    step: int
    # this rank's checkpoint; after a change of world size, every saved rank's (this rank re-partitions them)
    checkpoints: list[LoadedRankCheckpoint]
    skipped: list[tuple[int, str]]


class StrandedCheckpointError(RuntimeError):
    """The only checkpoints there are were written by another number of ranks, and only parts of them can be read
    here (snapshots in the shared memory of several machines), so this run can neither use nor re-partition them."""


def _list_steps(tiers: Sequence[Tier], rank: int, world_size: int) -> tuple[dict[int, list[Tier]], dict[int, list[tuple[Tier, int]]], dict[int, int]]:
    """Per step: the tiers holding this rank's part at this world size; the tiers holding every rank's part at
    another (with the world size that wrote it); and steps at another world size of which only parts are here."""
    holders: dict[int, list[Tier]] = {}
    foreign: dict[int, list[tuple[Tier, int]]] = {}
    stranded: dict[int, int] = {}
    for tier in sorted(tiers, key=lambda t: t.speed):
        try:
            commits, whole = tier.commits(rank), tier.whole_steps()
        except Exception as err:  # an unreachable tier simply holds nothing for this recovery
            log.warning("cannot list checkpoints in %s: %s", tier.name, err)
            continue
        for step, size in commits.items():
            if size == world_size:
                holders.setdefault(step, []).append(tier)
            elif step not in whole:
                stranded[step] = size
        for step, size in whole.items():
            if size != world_size:
                foreign.setdefault(step, []).append((tier, size))
    return holders, foreign, stranded


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


def _read_first(step: int, copies: Sequence[tuple[Tier, list[int]]], skipped: list[tuple[int, str]]) -> list[LoadedRankCheckpoint] | None:
    """The ranks' checkpoints of ``step`` from the first tier in ``copies`` (tier, ranks to read) that has them
    all intact."""
    for tier, ranks in copies:
        label = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]} to {ranks[-1]}"
        try:
            return [tier.read(step, r) for r in ranks]
        except Exception as err:  # corrupt (CheckpointFormatError) or unreachable (OSError, client errors)
            log.warning(
                "checkpoint of step %d, %s in %s is unusable (%s: %s); trying the next copy",
                step, label, tier.name, type(err).__name__, err,
            )
            skipped.append((step, f"{label} in {tier.name}: {err}"))
    return None


def recover(tiers: Sequence[Tier], rank: int, world_size: int, gather: Gather) -> RecoveryResult | None:
    """Runs the protocol above; ``None`` when no step is complete on every rank."""
    holders, foreign, stranded = _list_steps(tiers, rank, world_size)
    excluded: set[int] = set()
    skipped: list[tuple[int, str]] = []
    while True:
        step = agree_on_step(set(holders) - excluded, gather)
        other = agree_on_step(set(foreign) - excluded, gather)
        if other is not None and (step is None or other > step):
            # written by another number of ranks: every rank reads all of them and takes its own part
            step = other
            loaded = _read_first(step, [(tier, list(range(size))) for tier, size in foreign[step]], skipped)
        elif step is not None:
            loaded = _read_first(step, [(tier, [rank]) for tier in holders[step]], skipped)
        else:
            if stranded:
                newest = max(stranded)
                raise StrandedCheckpointError(
                    f"the newest checkpoint, step {newest}, was written by {stranded[newest]} ranks and is only in "
                    f"shared memory, and not every rank's part of it is on every machine of this run of {world_size} "
                    f"ranks. Restart with {stranded[newest]} processes to resume from it, or configure a persistent "
                    "tier, from which a run with another number of ranks can resume."
                )
            return None
        ok = gather(torch.tensor([1 if loaded is not None else 0], dtype=torch.int64))
        if loaded is not None and bool(ok.min().item()):
            return RecoveryResult(step, loaded, skipped)
        failed = [r for r, v in enumerate(ok.view(-1).tolist()) if not v]
        log.warning("step %d could not be loaded on rank(s) %s; falling back to an older checkpoint", step, failed)
        excluded.add(step)

"""Failure recovery: the freshest step complete on every rank, loaded from the fastest tier that holds it.

Commit protocol as recovery reads it:

1. every rank lists the steps it holds, in each tier it can reach (memory: its sealed slots; persistent tiers:
   steps whose global ``COMMIT`` marker is complete, see :mod:`.tiers.fsspec_tier`; a tier that cannot be listed
   holds nothing);
2. the ranks exchange those lists (a collective on the training thread) and take the newest step that every rank
   holds somewhere;
3. each rank reads that step from its fastest tier that holds it and verifies the checksums, falling back to the
   next tier on a corrupt copy;
4. the ranks exchange success; if any rank could not load the step, every rank drops it and goes back to 2.

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
    checkpoint: LoadedRankCheckpoint
    skipped: list[tuple[int, str]]


def _local_steps(tiers: Sequence[Tier], rank: int) -> dict[int, list[Tier]]:
    holders: dict[int, list[Tier]] = {}
    for tier in sorted(tiers, key=lambda t: t.speed):
        try:
            steps = tier.committed_steps(rank)
        except Exception as err:  # an unreachable tier simply holds nothing for this recovery
            log.warning("cannot list checkpoints in %s: %s", tier.name, err)
            continue
        for step in steps:
            holders.setdefault(step, []).append(tier)
    return holders


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


def recover(tiers: Sequence[Tier], rank: int, gather: Gather) -> RecoveryResult | None:
    """Runs the protocol above; ``None`` when no step is complete on every rank."""
    holders = _local_steps(tiers, rank)
    excluded: set[int] = set()
    skipped: list[tuple[int, str]] = []
    while True:
        step = agree_on_step(set(holders) - excluded, gather)
        if step is None:
            return None
        loaded = None
        for tier in holders.get(step, []):
            try:
                loaded = tier.read(step, rank)
                break
            except Exception as err:  # corrupt (CheckpointFormatError) or unreachable (OSError, client errors)
                log.warning(
                    "checkpoint of step %d, rank %d in %s is unusable (%s: %s); trying the next copy",
                    step, rank, tier.name, type(err).__name__, err,
                )
                skipped.append((step, f"rank {rank} in {tier.name}: {err}"))
        ok = gather(torch.tensor([1 if loaded is not None else 0], dtype=torch.int64))
        if loaded is not None and bool(ok.min().item()):
            return RecoveryResult(step, loaded, skipped)
        failed = [r for r, v in enumerate(ok.view(-1).tolist()) if not v]
        log.warning("step %d could not be loaded on rank(s) %s; falling back to an older checkpoint", step, failed)
        excluded.add(step)

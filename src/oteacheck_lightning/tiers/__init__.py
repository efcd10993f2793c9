"""Storage tiers: where a rank's checkpoint lives.

Every tier stores the same per-rank objects (:mod:`oteacheck_lightning.format`) and answers the same questions:
which steps it holds committed for a rank, and the manifest and data of one. Tiers are ordered by
:attr:`Tier.speed` (lower is faster); recovery reads from the fastest tier that holds the chosen step.
"""

from .base import Holdings, LoadedRankCheckpoint, Origin, Tier
from .fsspec_tier import CheckpointDir, FsspecTier
from .memory import MemoryTier

__all__ = ["CheckpointDir", "FsspecTier", "Holdings", "LoadedRankCheckpoint", "MemoryTier", "Origin", "Tier"]

"""The protocol every storage tier implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..format import Manifest


@dataclass
class LoadedRankCheckpoint:
    """One rank's checkpoint, read and verified: ``buffer`` is the data object as a flat uint8 tensor."""

    manifest: Manifest
    buffer: torch.Tensor
    source: str


class Tier(Protocol):
    name: str
    speed: int  # 0 memory, 1 local disk, 2 remote storage

    def holdings(self, rank: int) -> tuple[dict[int, int], dict[int, int]]:
        """Two maps of committed step to the number of ranks that wrote it, from one listing: the steps of which
        this rank's part is here, and those of which every rank's part can be read from here (what a run with
        another number of ranks can resume from)."""
        ...

    def committed_steps(self, rank: int, world_size: int | None = None) -> list[int]:
        """Steps for which this rank's checkpoint is committed in this tier, ascending (only those written by
        ``world_size`` ranks, if given)."""
        ...

    def read(self, step: int, rank: int) -> LoadedRankCheckpoint:
        """Reads and verifies one rank's checkpoint; raises ``CheckpointFormatError`` if it is corrupt."""
        ...

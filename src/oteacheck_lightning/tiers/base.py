"""The protocol every storage tier implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..format import Manifest, is_fork, is_time


@dataclass
class LoadedRankCheckpoint:
    """One rank's checkpoint, read and verified: ``buffer`` is the data object as a flat uint8 tensor."""

    manifest: Manifest
    buffer: torch.Tensor
    source: str


@dataclass(frozen=True)
class Origin:
    """The run that wrote a step, where that run's line of training left earlier runs ([run, step] pairs, oldest
    first; see :attr:`Manifest.forks`), and when it began (:attr:`Manifest.run_began`). Checkpoints of older formats
    have none of them, or no start."""

    run: str = ""
    forks: tuple[tuple[str, int], ...] = ()
    began: float = 0.0

    @classmethod
    def of(cls, run: object, forks: object, began: object = 0.0) -> Origin:
        """From a manifest's or a ``COMMIT`` marker's fields; anything malformed reads as unknown."""
        if not isinstance(run, str) or not isinstance(forks, list):
            return cls()
        return cls(run, tuple((f[0], f[1]) for f in forks if is_fork(f)), float(began) if is_time(began) else 0.0)

    @classmethod
    def of_manifest(cls, manifest: Manifest) -> Origin:
        return cls.of(manifest.run, manifest.forks, manifest.run_began)

    def of_line(self, run: str) -> bool:
        """Whether ``run`` is this origin's run or one its line went on from: its steps beyond the fork are this
        line's abandoned ones (a resume removes them), not another line's."""
        return run == self.run or any(left == run for left, _ in self.forks)


@dataclass
class Holdings:
    """What one listing of a tier found: committed steps with the number of ranks that wrote each, and their
    origins."""

    mine: dict[int, int]  # the steps of which this rank's part is here
    whole: dict[int, int]  # the steps of which every rank's part can be read from here (a resume at another size)
    origins: dict[int, Origin]  # of the steps in either map


class Tier(Protocol):
    name: str
    speed: int  # 0 memory, 1 local disk, 2 remote storage

    def holdings(self, rank: int) -> Holdings:
        """The committed steps as one listing finds them (what recovery chooses from)."""
        ...

    def committed_steps(self, rank: int, world_size: int | None = None) -> list[int]:
        """Steps for which this rank's checkpoint is committed in this tier, ascending (only those written by
        ``world_size`` ranks, if given)."""
        ...

    def read(self, step: int, rank: int) -> LoadedRankCheckpoint:
        """Reads and verifies one rank's checkpoint; raises ``CheckpointFormatError`` if it is corrupt."""
        ...

"""The in-memory tier as recovery sees it: sealed slots in this rank's shared-memory folder."""

from __future__ import annotations

from pathlib import Path

import torch

from ..format import CheckpointFormatError, Manifest, verify
from ..slots import RANK_PREFIX, rank_folders, read_manifest
from .base import LoadedRankCheckpoint


class MemoryTier:
    """Reads the sealed snapshots that a (possibly crashed) training process left in shared memory: this rank's, and
    for a resume with another number of ranks, those of the job's other ranks that ran on this machine."""

    speed = 0

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.name = f"memory:{self.directory}"

    def _folder(self, rank: int) -> Path:
        return self.directory.parent / f"{RANK_PREFIX}{rank:05d}"

    @staticmethod
    def _sealed(folder: Path) -> dict[int, tuple[Path, Manifest]]:
        found: dict[int, tuple[Path, Manifest]] = {}
        for path in sorted(folder.glob("slot-*.manifest.json")):
            manifest = read_manifest(path)
            if manifest is not None:
                found[manifest.step] = (path, manifest)
        return found

    def commits(self, rank: int) -> dict[int, int]:
        return {step: m.world_size for step, (_, m) in sorted(self._sealed(self.directory).items())}

    def committed_steps(self, rank: int, world_size: int | None = None) -> list[int]:
        return [step for step, size in self.commits(rank).items() if world_size is None or size == world_size]

    def holdings(self, rank: int) -> tuple[dict[int, int], dict[int, int]]:
        return self.commits(rank), self.whole_steps()

    def whole_steps(self) -> dict[int, int]:
        """Steps of which every rank's snapshot is on this machine (all ranks of the job ran here)."""
        held = {rank: {step: m.world_size for step, (_, m) in self._sealed(folder).items()}
                for rank, folder in rank_folders(self.directory.parent).items()}
        return {step: size for step, size in held.get(0, {}).items()
                if all(held.get(r, {}).get(step) == size for r in range(size))}

    def read(self, step: int, rank: int) -> LoadedRankCheckpoint:
        path, manifest = self._sealed(self._folder(rank)).get(step, (None, None))
        if path is None or manifest is None or manifest.rank != rank:
            raise CheckpointFormatError(f"{self.name}: no sealed snapshot of step {step} for rank {rank}")
        data_path = path.with_name(path.name.replace(".manifest.json", ".data"))
        buffer = bytearray(manifest.data_bytes)
        with open(data_path, "rb") as f:
            got = f.readinto(buffer)
        view = memoryview(buffer)[:got]
        verify(manifest, view, f"{self.name} step {step}")
        return LoadedRankCheckpoint(manifest, torch.frombuffer(buffer, dtype=torch.uint8), self.name)

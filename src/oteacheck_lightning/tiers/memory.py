"""The in-memory tier as recovery sees it: sealed slots in this rank's shared-memory folder."""

from __future__ import annotations

from pathlib import Path

import torch

from ..format import CheckpointFormatError, Manifest, verify
from ..slots import read_manifest
from .base import LoadedRankCheckpoint


class MemoryTier:
    """Reads the sealed snapshots that a (possibly crashed) training process left in shared memory."""

    speed = 0
    shared = False  # this rank's folder: other ranks' snapshots may be on other machines

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.name = f"memory:{self.directory}"

    def _sealed(self) -> dict[int, tuple[Path, Manifest]]:
        found: dict[int, tuple[Path, Manifest]] = {}
        for path in sorted(self.directory.glob("slot-*.manifest.json")):
            manifest = read_manifest(path)
            if manifest is not None:
                found[manifest.step] = (path, manifest)
        return found

    def commits(self, rank: int) -> dict[int, int]:
        return {step: m.world_size for step, (_, m) in sorted(self._sealed().items())}

    def committed_steps(self, rank: int, world_size: int | None = None) -> list[int]:
        return [step for step, size in self.commits(rank).items() if world_size is None or size == world_size]

    def read(self, step: int, rank: int) -> LoadedRankCheckpoint:
        path, manifest = self._sealed().get(step, (None, None))
        if path is None or manifest is None or manifest.rank != rank:
            raise CheckpointFormatError(f"{self.name}: no sealed snapshot of step {step} for rank {rank}")
        data_path = path.with_name(path.name.replace(".manifest.json", ".data"))
        buffer = bytearray(manifest.data_bytes)
        with open(data_path, "rb") as f:
            got = f.readinto(buffer)
        view = memoryview(buffer)[:got]
        verify(manifest, view, f"{self.name} step {step}")
        return LoadedRankCheckpoint(manifest, torch.frombuffer(buffer, dtype=torch.uint8), self.name)

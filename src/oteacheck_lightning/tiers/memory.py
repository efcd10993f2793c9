"""The in-memory tier as recovery sees it: sealed slots in this rank's shared-memory folder."""

from __future__ import annotations

from pathlib import Path

import torch

from ..format import CheckpointFormatError, verify
from ..slots import read_manifest
from .base import LoadedRankCheckpoint


class MemoryTier:
    """Reads the sealed snapshots that a (possibly crashed) training process left in shared memory."""

    speed = 0

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.name = f"memory:{self.directory}"

    def _sealed(self) -> dict[int, Path]:
        found: dict[int, Path] = {}
        for path in sorted(self.directory.glob("slot-*.manifest.json")):
            manifest = read_manifest(path)
            if manifest is not None:
                found[manifest.step] = path
        return found

    def committed_steps(self, rank: int) -> list[int]:
        return sorted(self._sealed())

    def read(self, step: int, rank: int) -> LoadedRankCheckpoint:
        path = self._sealed().get(step)
        manifest = read_manifest(path) if path is not None else None
        if manifest is None or manifest.rank != rank:
            raise CheckpointFormatError(f"{self.name}: no sealed snapshot of step {step} for rank {rank}")
        data_path = path.with_name(path.name.replace(".manifest.json", ".data"))
        buffer = bytearray(manifest.data_bytes)
        with open(data_path, "rb") as f:
            got = f.readinto(buffer)
        view = memoryview(buffer)[:got]
        verify(manifest, view, f"{self.name} step {step}")
        return LoadedRankCheckpoint(manifest, torch.frombuffer(buffer, dtype=torch.uint8), self.name)

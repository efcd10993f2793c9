"""The in-memory tier as recovery sees it: sealed slots in this rank's shared-memory folder."""

from __future__ import annotations

from pathlib import Path

import torch

from ..format import CheckpointFormatError, Manifest, verify
from ..slots import RANK_PREFIX, rank_folders, read_manifest
from .base import Holdings, LoadedRankCheckpoint, Origin


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

    def holdings(self, rank: int) -> Holdings:
        # the job's ranks that ran on this machine: the steps of which every rank's snapshot is here
        folders = rank_folders(self.directory.parent)
        sealed = {r: self._sealed(folder) for r, folder in folders.items()}
        own = next((sealed[r] for r, folder in folders.items() if folder == self.directory), None)
        if own is None:  # a folder not named as a rank's: read on its own
            own = self._sealed(self.directory)
        held = {r: {step: m.world_size for step, (_, m) in found.items()} for r, found in sealed.items()}
        whole = {step: size for step, size in held.get(0, {}).items()
                 if all(held.get(r, {}).get(step) == size for r in range(size))}
        # a step's origin as this rank's snapshot of it says (one run wrote every rank's), else as rank 0's
        origins = {step: Origin.of_manifest(m) for step, (_, m) in own.items()}
        for step, (_, m) in sealed.get(0, {}).items():
            origins.setdefault(step, Origin.of_manifest(m))
        return Holdings({step: m.world_size for step, (_, m) in own.items()}, whole, origins)

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

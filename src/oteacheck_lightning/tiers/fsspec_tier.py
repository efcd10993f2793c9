"""Persistent tiers through fsspec: local disk (``file://`` or a plain path), ``hdfs://``, ``webhdfs://``,
``memory://``.

Layout under a tier's root::

    step-000000123/rank-00000.data
    step-000000123/rank-00000.manifest.json     <- written last: the rank's commit

Each object is written under a temporary name and renamed into place; on local disk the file and its folder are
fsynced first, so a committed manifest always describes durable data. An explicit checkpoint path
(``trainer.save_checkpoint(path)``) is a :class:`CheckpointDir` with the same per-rank objects.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from ..format import CheckpointFormatError, Manifest, verify
from ..slots import write_file_atomically
from .base import LoadedRankCheckpoint

CHUNK = 8 * 1024 * 1024
STEP_PREFIX = "step-"


def _chunks(data: memoryview, size: int = CHUNK) -> Iterable[memoryview]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class CheckpointDir:
    """One checkpoint (all ranks) in a folder of some filesystem."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs = fs
        self.path = path.rstrip("/")
        self.local = isinstance(fs, LocalFileSystem)

    @classmethod
    def from_url(cls, url: str | os.PathLike) -> CheckpointDir:
        fs, path = fsspec.core.url_to_fs(str(url))
        return cls(fs, path)

    def _object(self, rank: int, suffix: str) -> str:
        return f"{self.path}/rank-{rank:05d}.{suffix}"

    def manifest_path(self, rank: int) -> str:
        return self._object(rank, "manifest.json")

    def data_path(self, rank: int) -> str:
        return self._object(rank, "data")

    def is_committed(self, rank: int) -> bool:
        return self.fs.exists(self.manifest_path(rank))

    def committed_ranks(self) -> list[int]:
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(n[5:10]) for n in names if n.startswith("rank-") and n.endswith(".manifest.json"))

    # --- writing ---------------------------------------------------------------------------------------

    def _put(self, path: str, chunks: Iterable[memoryview | bytes]) -> None:
        """Writes ``path`` atomically: temporary name, (fsync,) rename."""
        tmp = f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[1]}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            if self.local:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    for chunk in chunks:
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
                dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            else:
                with self.fs.open(tmp, "wb") as f:
                    for chunk in chunks:
                        f.write(chunk)
                self.fs.mv(tmp, path)
        except BaseException:
            try:
                self.fs.rm(tmp)
            except (OSError, FileNotFoundError):
                pass
            raise

    def makedirs(self) -> None:
        if self.local:
            Path(self.path).mkdir(parents=True, exist_ok=True, mode=0o700)
        else:
            self.fs.makedirs(self.path, exist_ok=True)

    def write_rank(self, manifest: Manifest, data: memoryview) -> None:
        """Writes one rank's data, then its manifest (the commit). ``manifest`` must carry checksums."""
        if not manifest.verified:
            raise ValueError("persisted manifests carry a checksum for every tensor")
        self.makedirs()
        self._put(self.data_path(manifest.rank), _chunks(data[: manifest.data_bytes]))
        self._put(self.manifest_path(manifest.rank), [manifest.to_json()])

    def write_marker(self, name: str, payload: bytes = b"") -> None:
        if self.local:
            write_file_atomically(Path(self.path) / name, payload, fsync=True)
        else:
            self._put(f"{self.path}/{name}", [payload])

    # --- reading ---------------------------------------------------------------------------------------

    def read_manifest(self, rank: int) -> Manifest:
        try:
            raw = self.fs.cat_file(self.manifest_path(rank))
        except FileNotFoundError:
            raise CheckpointFormatError(f"{self.path}: no committed checkpoint for rank {rank}") from None
        return Manifest.from_json(raw)

    def read_rank(self, rank: int, source: str | None = None) -> LoadedRankCheckpoint:
        manifest = self.read_manifest(rank)
        if manifest.rank != rank:
            raise CheckpointFormatError(f"{self.manifest_path(rank)} describes rank {manifest.rank}")
        buffer = bytearray(manifest.data_bytes)
        view = memoryview(buffer)
        got = 0
        try:
            with self.fs.open(self.data_path(rank), "rb") as f:
                while got < len(buffer):
                    n = f.readinto(view[got : got + CHUNK])
                    if not n:
                        break
                    got += n
        except FileNotFoundError:
            raise CheckpointFormatError(f"{self.data_path(rank)} is missing") from None
        verify(manifest, view[:got], self.data_path(rank))
        return LoadedRankCheckpoint(manifest, torch.frombuffer(buffer, dtype=torch.uint8), source or self.path)

    def remove_rank(self, rank: int) -> None:
        """Removes one rank's objects, manifest first so that the checkpoint is never half visible."""
        for path in (self.manifest_path(rank), self.data_path(rank)):
            try:
                self.fs.rm(path)
            except FileNotFoundError:
                pass
        try:
            for stale in self.fs.ls(self.path, detail=False):
                if stale.rsplit("/", 1)[-1].startswith(f".rank-{rank:05d}."):
                    self.fs.rm(stale)
            if not self.fs.ls(self.path, detail=False):
                self.fs.rmdir(self.path)
        except (FileNotFoundError, OSError):
            pass  # another rank is still using the folder


class FsspecTier:
    """A folder of step checkpoints on any fsspec filesystem, with retention."""

    def __init__(self, url: str | os.PathLike, speed: int | None = None) -> None:
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/") or "/"
        self.name = self.url
        self.speed = speed if speed is not None else (1 if isinstance(self.fs, LocalFileSystem) else 2)

    def checkpoint(self, step: int) -> CheckpointDir:
        return CheckpointDir(self.fs, f"{self.root}/{STEP_PREFIX}{step:09d}")

    def steps(self) -> list[int]:
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(n[len(STEP_PREFIX) :]) for n in names if n.startswith(STEP_PREFIX) and n[len(STEP_PREFIX) :].isdigit())

    def committed_steps(self, rank: int) -> list[int]:
        return [s for s in self.steps() if self.checkpoint(s).is_committed(rank)]

    def read(self, step: int, rank: int) -> LoadedRankCheckpoint:
        return self.checkpoint(step).read_rank(rank, source=self.name)

    def write(self, manifest: Manifest, data: memoryview) -> None:
        self.checkpoint(manifest.step).write_rank(manifest, data)

    def prune(self, rank: int, keep_last: int) -> list[int]:
        """Keeps this rank's newest ``keep_last`` committed steps and removes the rest (and stale temporaries)."""
        committed = self.committed_steps(rank)
        removed = committed[:-keep_last] if keep_last > 0 else committed
        for step in removed:
            self.checkpoint(step).remove_rank(rank)
        # folders of writes that a crash interrupted: never committed for this rank, older than what we keep
        oldest_kept = committed[-keep_last] if keep_last > 0 and len(committed) >= keep_last else None
        for step in self.steps():
            if oldest_kept is not None and step < oldest_kept and step not in committed:
                self.checkpoint(step).remove_rank(rank)
        return removed

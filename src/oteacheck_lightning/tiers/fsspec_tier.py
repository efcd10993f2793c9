"""Persistent tiers through fsspec: local disk (``file://`` or a plain path), ``hdfs://`` (hdfs-native),
``webhdfs://`` (fsspec's REST client), ``memory://`` (tests).

Layout under a tier's root::

    step-000000123/rank-00000.data
    step-000000123/rank-00000.manifest.json     <- written after the rank's data: the rank is done
    step-000000123/rank-00001.data
    step-000000123/rank-00001.manifest.json
    step-000000123/COMMIT                       <- written last, by the coordinator: the step is visible

Commit protocol of a periodic (persisted) checkpoint of step *s*, in one tier:

1. every rank's persister thread writes its ``rank-R.data``, then its ``rank-R.manifest.json`` (each object
   durable before the next: fsync on local disk, a closed file on HDFS);
2. the coordinator (rank 0's persister thread) polls the step folder until all ``world_size`` manifests exist,
   parse, and describe step *s*; it never waits on the training thread and no rank runs a collective;
3. the coordinator writes ``COMMIT``: JSON with the step, the world size, the xxh3 digest of every rank's
   manifest bytes, and the run that wrote it with that run's forks (:class:`~.base.Origin`);
4. readers (:meth:`FsspecTier.committed_steps`, recovery) see step *s* only once ``COMMIT`` parses, and check each
   rank's manifest against its digest, so a rank's files rewritten after the commit read as corrupt, not as a
   mix of two runs.

The coordination goes through storage, not ``torch.distributed``: a background thread must never run collectives
(DESIGN invariant 8), and the training thread must never wait for storage (invariant 5). Polling a folder costs one
listing per poll interval on one rank, which is cheap next to writing the data.

Atomicity per store (Orbax's split: rename where the store has an atomic rename, a commit file where it has not):

* local disk and ``hdfs://``: each object is written under a temporary name and renamed into place (``os.replace``
  after ``fsync``; an HDFS rename is one NameNode operation). A crash leaves only temporaries, cleaned by retention;
* ``webhdfs://`` (a rename onto an existing file silently does nothing), ``memory://`` and anything else: objects
  are written under their final names, and only ``COMMIT`` makes a step visible. A torn ``COMMIT`` does not parse,
  so it is invisible too.

An explicit checkpoint (``trainer.save_checkpoint(path)``) is a :class:`CheckpointDir` with the same objects; the
strategy writes its ``COMMIT`` (step and world size, no digests) once every rank returned.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from ..format import CheckpointFormatError, Manifest, checksum, verify
from ..slots import write_file_atomically
from .base import Holdings, LoadedRankCheckpoint, Origin

log = logging.getLogger(__name__)

CHUNK = 8 * 1024 * 1024
STEP_PREFIX = "step-"
COMMIT_MARKER = "COMMIT"
# filesystems whose rename is one atomic operation that refuses or replaces an existing target as asked
_ATOMIC_RENAME_PROTOCOLS = {"hdfs", "viewfs"}


def _chunks(data: memoryview, size: int = CHUNK) -> Iterable[memoryview]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    protocol = fs.protocol
    return set(protocol) if isinstance(protocol, (tuple, list)) else {protocol}


class CheckpointDir:
    """One checkpoint (all ranks) in a folder of some filesystem."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs = fs
        self.path = path.rstrip("/")
        self.local = isinstance(fs, LocalFileSystem)
        self.atomic_rename = self.local or bool(_protocols(fs) & _ATOMIC_RENAME_PROTOCOLS)

    @classmethod
    def from_url(cls, url: str | os.PathLike, **storage_options: Any) -> CheckpointDir:
        fs, path = fsspec.core.url_to_fs(str(url), **storage_options)
        return cls(fs, path)

    @property
    def url(self) -> str:
        return self.path if self.local else self.fs.unstrip_protocol(self.path)

    def _object(self, rank: int, suffix: str) -> str:
        return f"{self.path}/rank-{rank:05d}.{suffix}"

    def manifest_path(self, rank: int) -> str:
        return self._object(rank, "manifest.json")

    def data_path(self, rank: int) -> str:
        return self._object(rank, "data")

    @property
    def commit_path(self) -> str:
        return f"{self.path}/{COMMIT_MARKER}"

    def has_rank(self, rank: int) -> bool:
        """This rank wrote its files (its manifest exists); says nothing about the global commit."""
        return self.fs.exists(self.manifest_path(rank))

    def committed_ranks(self) -> list[int]:
        """Ranks whose manifest exists (written, not necessarily globally committed)."""
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(n[5:10]) for n in names if n.startswith("rank-") and n.endswith(".manifest.json"))

    # --- writing ---------------------------------------------------------------------------------------

    def _put(self, path: str, chunks: Iterable[memoryview | bytes]) -> None:
        """Writes ``path``: atomically (temporary name, fsync, rename) where the store can rename atomically,
        else straight under its final name (the step's ``COMMIT`` is then the only thing that publishes it)."""
        if not self.atomic_rename:
            if self.fs.exists(path):
                self.fs.rm(path)
            with self.fs.open(path, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
            return
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
                # closing an HDFS file completes its blocks on the DataNodes; the rename then publishes it
                self.fs.mv(tmp, path, overwrite=True)
        except BaseException:
            try:
                self.fs.rm(tmp)
            except Exception:  # the store may be the thing that failed; retention removes the temporary later
                pass
            raise

    def makedirs(self) -> None:
        if self.local:
            Path(self.path).mkdir(parents=True, exist_ok=True, mode=0o700)
        else:
            self.fs.makedirs(self.path, exist_ok=True)

    def write_rank(self, manifest: Manifest, data: memoryview) -> None:
        """Writes one rank's data, then its manifest. ``manifest`` must carry checksums.

        A rank that rewrites a step (a resumed run) first removes its old manifest, so the rank's copy is never
        a new manifest over old data or the reverse."""
        if not manifest.verified:
            raise ValueError("persisted manifests carry a checksum for every tensor")
        self.makedirs()
        try:
            self.fs.rm(self.manifest_path(manifest.rank))
        except FileNotFoundError:
            pass
        self._put(self.data_path(manifest.rank), _chunks(data[: manifest.data_bytes]))
        self._put(self.manifest_path(manifest.rank), [manifest.to_json()])

    def write_marker(self, name: str, payload: bytes = b"") -> None:
        if self.local:
            write_file_atomically(Path(self.path) / name, payload, fsync=True)
        else:
            self._put(f"{self.path}/{name}", [payload])

    def try_commit(self, step: int, world_size: int, run: str | None = None) -> list[int]:
        """Coordinator: writes ``COMMIT`` if every rank's manifest of ``step`` is there; returns the ranks still
        missing (empty once committed). A manifest that does not parse yet (a store without atomic rename, read
        while being written) counts as missing, and so, with ``run``, does one another run wrote (a rank's stale
        file of an abandoned run, which that rank has not yet replaced)."""
        digests: dict[str, str] = {}
        missing: list[int] = []
        first: Manifest | None = None
        for rank in range(world_size):
            try:
                raw = self.fs.cat_file(self.manifest_path(rank))
                manifest = Manifest.from_json(raw)
            except (FileNotFoundError, CheckpointFormatError):
                missing.append(rank)
                continue
            if run is not None and manifest.run != run:
                missing.append(rank)
                continue
            if manifest.step != step or manifest.rank != rank or manifest.world_size != world_size:
                raise CheckpointFormatError(
                    f"{self.url}: rank {rank}'s manifest describes step {manifest.step}, rank {manifest.rank} of "
                    f"{manifest.world_size}, expected step {step} of {world_size}"
                )
            digests[str(rank)] = checksum(raw)
            first = first or manifest
        if missing or first is None:
            return missing
        # the origin, for recovery to tell a step of an abandoned line from one listing (the ranks' manifests
        # agree on it: one run wrote them)
        doc = {"step": step, "world_size": world_size, "manifests": digests, "run": first.run, "forks": first.forks,
               "run_began": first.run_began}
        self.write_marker(COMMIT_MARKER, json.dumps(doc, sort_keys=True).encode())
        return []

    def uncommit(self) -> None:
        """Removes ``COMMIT`` (the step becomes invisible before any of its files go)."""
        try:
            self.fs.rm(self.commit_path)
        except FileNotFoundError:
            pass

    # --- reading ---------------------------------------------------------------------------------------

    def read_commit(self) -> dict[str, Any] | None:
        """The parsed ``COMMIT`` marker, or ``None`` when the folder is not (or not completely) committed."""
        try:
            raw = self.fs.cat_file(self.commit_path)
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None  # torn: written in place on a store without atomic rename
        if not isinstance(doc, dict) or not isinstance(doc.get("step"), int) or not isinstance(doc.get("world_size"), int):
            return None
        return doc

    def is_committed(self) -> bool:
        return self.read_commit() is not None

    def read_manifest(self, rank: int, commit: dict[str, Any] | None = None) -> Manifest:
        try:
            raw = self.fs.cat_file(self.manifest_path(rank))
        except FileNotFoundError:
            raise CheckpointFormatError(f"{self.url}: no manifest for rank {rank}") from None
        digests = (commit or {}).get("manifests")
        if isinstance(digests, dict) and digests.get(str(rank)) != checksum(raw):
            raise CheckpointFormatError(
                f"{self.url}: rank {rank}'s manifest is not the one the commit marker names (rewritten after commit)"
            )
        return Manifest.from_json(raw)

    def read_rank(self, rank: int, source: str | None = None) -> LoadedRankCheckpoint:
        commit = self.read_commit()
        manifest = self.read_manifest(rank, commit)
        where = f"{self.url} (step {manifest.step}, rank {rank})"
        if manifest.rank != rank:
            raise CheckpointFormatError(f"{where}: the manifest describes rank {manifest.rank}")
        buffer = bytearray(manifest.data_bytes)
        view = memoryview(buffer)
        got = 0
        try:
            with self.fs.open(self.data_path(rank), "rb") as f:
                while got < len(buffer):
                    chunk = f.read(min(CHUNK, len(buffer) - got))
                    if not chunk:
                        break
                    view[got : got + len(chunk)] = chunk
                    got += len(chunk)
        except FileNotFoundError:
            raise CheckpointFormatError(f"{where}: the data object is missing") from None
        verify(manifest, view[:got], where)
        return LoadedRankCheckpoint(manifest, torch.frombuffer(buffer, dtype=torch.uint8), source or self.url)

    # --- removing --------------------------------------------------------------------------------------

    def remove_ranks_from(self, first: int) -> None:
        """Removes the objects of every rank numbered ``first`` or higher: after a resume with fewer ranks, no
        process of the run owns them any more."""
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        except FileNotFoundError:
            return
        for name in names:
            digits = name.lstrip(".")[5:10]
            if name.lstrip(".").startswith("rank-") and digits.isdigit() and int(digits) >= first:
                try:
                    self.fs.rm(f"{self.path}/{name}")
                except FileNotFoundError:
                    pass

    def remove_rank(self, rank: int) -> None:
        """Removes one rank's objects (manifest first) and its stale temporaries; the folder once empty."""
        for path in (self.manifest_path(rank), self.data_path(rank)):
            try:
                self.fs.rm(path)
            except FileNotFoundError:
                pass
        try:
            for stale in self.fs.ls(self.path, detail=False):
                if stale.rstrip("/").rsplit("/", 1)[-1].startswith(f".rank-{rank:05d}."):
                    self.fs.rm(stale)
            if not self.fs.ls(self.path, detail=False):
                self.fs.rmdir(self.path)
                if not self.local and self.fs.exists(self.path):
                    # fsspec's WebHDFS has no rmdir; a non-recursive delete refuses a folder that is not empty
                    self.fs.rm(self.path, recursive=False)
        except Exception:  # another rank is still using the folder, or it is gone already
            pass


class FsspecTier:
    """A folder of step checkpoints on any fsspec filesystem, with the global commit and retention.

    Args:
        url: the tier's root (a local path, ``file://``, ``hdfs://``, ``webhdfs://user@host:port/...``,
            ``memory://``).
        speed: recovery reads from the fastest tier holding a step (default 1 for local disk, 2 otherwise).
        storage_options: passed to the fsspec filesystem (for ``hdfs://``, hdfs-native's client settings, e.g.
            ``{"dfs.client.failover.max.attempts": "2"}`` to give up on a dead NameNode sooner).
    """

    def __init__(self, url: str | os.PathLike, speed: int | None = None, storage_options: dict[str, Any] | None = None) -> None:
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = self.root.rstrip("/") or "/"
        self.name = self.url
        self.speed = speed if speed is not None else (1 if isinstance(self.fs, LocalFileSystem) else 2)

    def checkpoint(self, step: int) -> CheckpointDir:
        return CheckpointDir(self.fs, f"{self.root}/{STEP_PREFIX}{step:09d}")

    def steps(self) -> list[int]:
        """Every step folder, committed or not."""
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(n[len(STEP_PREFIX) :]) for n in names if n.startswith(STEP_PREFIX) and n[len(STEP_PREFIX) :].isdigit())

    def _commit_markers(self) -> dict[int, dict[str, Any]]:
        """The parsed ``COMMIT`` marker of every step whose marker is complete (so every rank's files were durable)."""
        out = {}
        for step in self.steps():
            commit = self.checkpoint(step).read_commit()
            if commit is not None and commit["step"] == step:
                out[step] = commit
        return out

    def commits(self, rank: int | None = None) -> dict[int, int]:
        """Every committed step, with the number of ranks that wrote it."""
        return self.holdings(0).whole

    def holdings(self, rank: int) -> Holdings:
        markers = self._commit_markers()
        commits = {step: commit["world_size"] for step, commit in markers.items()}
        origins = {step: Origin.of(commit.get("run", ""), commit.get("forks", []), commit.get("run_began", 0.0))
                   for step, commit in markers.items()}
        # every rank's files under one root: all of a step is here
        return Holdings({s: n for s, n in commits.items() if rank < n}, commits, origins)

    def committed_steps(self, rank: int = 0, world_size: int | None = None) -> list[int]:
        """Committed steps that include ``rank`` (and were written by ``world_size`` ranks, if given)."""
        return [step for step, size in self.commits().items()
                if rank < size and (world_size is None or size == world_size)]

    def read(self, step: int, rank: int) -> LoadedRankCheckpoint:
        directory = self.checkpoint(step)
        if directory.read_commit() is None:
            raise CheckpointFormatError(f"{self.name}: step {step} is not committed")
        return directory.read_rank(rank, source=self.name)

    def write(self, manifest: Manifest, data: memoryview) -> None:
        self.checkpoint(manifest.step).write_rank(manifest, data)

    def try_commit(self, step: int, world_size: int, run: str | None = None) -> list[int]:
        return self.checkpoint(step).try_commit(step, world_size, run)

    def prune(self, rank: int, keep_last: int, coordinator: bool | None = None, world_size: int | None = None) -> list[int]:
        """Keeps the newest ``keep_last`` committed steps and removes this rank's files of older steps.

        The coordinator (rank 0 by default) first removes an old step's ``COMMIT``, so the step disappears before
        any file of it does; the other ranks remove their files of old steps once the marker is gone (at their
        next prune). Uncommitted folders older than the oldest kept step are leftovers of interrupted writes and
        go too. With ``world_size``, the coordinator also removes the files of ranks beyond it (written before a
        resume with fewer ranks). Returns the steps this call touched."""
        coordinator = rank == 0 if coordinator is None else coordinator
        committed = self.committed_steps(rank)
        if len(committed) < keep_last:
            return []
        oldest_kept = committed[-keep_last]
        removed = []
        for step in self.steps():
            if step >= oldest_kept:
                continue
            directory = self.checkpoint(step)
            if step in committed:
                if not coordinator:
                    continue  # wait until the coordinator took it out of sight
                directory.uncommit()
            if coordinator and world_size is not None:
                directory.remove_ranks_from(world_size)
            directory.remove_rank(rank)
            removed.append(step)
        return removed

    def discard_after(self, step: int, rank: int, line: Origin, coordinator: bool | None = None,
                      world_size: int | None = None) -> list[int]:
        """After resuming from ``step``: newer steps belong to an abandoned run; makes them invisible (coordinator)
        and removes this rank's files of them, so they can never be committed together with the new run's. With
        ``world_size``, the coordinator also removes the files of ranks beyond it. ``line`` is the resumed run's
        origin: a committed step goes only if a run on that line wrote it (``Origin.of_line``, the
        persister's test for another line too): another line's steps (a run this one never went on from) stay, and
        the persister refuses the tier rather than write beside them."""
        coordinator = rank == 0 if coordinator is None else coordinator
        origins = self.holdings(rank).origins
        removed = []
        for newer in self.steps():
            if newer <= step or (newer in origins and not line.of_line(origins[newer].run)):
                continue
            directory = self.checkpoint(newer)
            if coordinator:
                directory.uncommit()
                if world_size is not None:
                    directory.remove_ranks_from(world_size)
            directory.remove_rank(rank)
            removed.append(newer)
        return removed

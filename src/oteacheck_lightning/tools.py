"""The ``oteacheck`` tools: list, verify, export and garbage-collect checkpoints in a persistent tier, and list the
in-memory snapshots on this machine.

    oteacheck ls URL [--verify] [--json]       checkpoints in a tier: step, ranks, size, committed, verified, run
    oteacheck verify URL [--step N] [--json]   re-reads the data and checks every tensor's checksum
    oteacheck export CKPT OUT.safetensors      consolidated fp32 weights (any ZeRO stage, any world size)
    oteacheck gc URL --keep K [--dry-run]      keeps the newest K complete checkpoints, removes the rest
    oteacheck memory [DIR] [--dirpath PATH]    the snapshots jobs keep in shared memory on this machine
    oteacheck memory [DIR] --remove JOB        frees an abandoned job's shared memory (refused while in use)

``URL`` is a tier (a folder of ``step-NNNNNNNNN`` checkpoints: a local path, ``file://``, ``hdfs://``,
``webhdfs://``, ``memory://``) or one checkpoint folder (a ``step-*`` folder, or a ``trainer.save_checkpoint`` path).
``CKPT`` is a checkpoint folder, or a tier (its newest complete checkpoint, or ``--step N``).

Exit codes, for scripts (:class:`Exit`): 0 ok, 1 unexpected error, 2 usage, 3 not found, 4 corrupt,
5 unsupported (e.g. a checkpoint without a parameter map), 6 in use (a running job's shared memory). Errors go to
stderr as one line, ``oteacheck <tool>: error: <message>``; ``--json`` output goes to stdout.

The tools never unpickle: manifests are JSON, tensors raw bytes checked against their xxh3 checksums
(DESIGN invariant 7).
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash

from .format import CheckpointFormatError, Manifest, TensorRecord
from .recovery import abandoned_after, how_left, left_at
from .reshard import Assembler
from .slots import DEFAULT_SHM_ROOT, JOB_PREFIX, job_folder, job_id_for, rank_folders, read_manifest
from .tiers import CheckpointDir, FsspecTier, Origin
from .tiers.fsspec_tier import STEP_PREFIX

READ_CHUNK = 8 * 1024 * 1024
# the prefix Lightning's DeepSpeed strategy puts before the LightningModule's names (its forward wrapper)
WRAPPER_PREFIX = "_forward_module."


class Exit(enum.IntEnum):
    """Exit codes of every ``oteacheck`` tool."""

    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_FOUND = 3
    CORRUPT = 4
    UNSUPPORTED = 5
    IN_USE = 6


class ToolError(Exception):
    """An error with the exit code it maps to; its message is printed as is."""

    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- finding checkpoints -----------------------------------------------------------------------------------

# fsspec options for the filesystem of every URL the tools open (``--storage-option KEY=VALUE``, e.g. hdfs-native
# client settings); set by :func:`main` for one command
_storage_options: dict[str, Any] = {}


def _dir(url: str) -> CheckpointDir:
    return CheckpointDir.from_url(url, **_storage_options) if _storage_options else CheckpointDir.from_url(url)


def _tier(url: str) -> FsspecTier:
    return FsspecTier(url, storage_options=dict(_storage_options)) if _storage_options else FsspecTier(url)


def _read_commit(directory: CheckpointDir) -> tuple[bool, dict[str, Any] | None]:
    """Whether this layout publishes a step with a ``COMMIT`` marker, and the parsed marker (``None``: absent or
    torn). Layouts without step markers treat every rank's manifest as the commit."""
    read = getattr(directory, "read_commit", None)
    if read is None:
        return False, None
    return True, read()


def _read_manifest(directory: CheckpointDir, rank: int, commit: dict[str, Any] | None) -> Manifest:
    if commit is not None:
        # the marker names each rank's manifest by digest: a manifest rewritten after the commit reads as corrupt
        return directory.read_manifest(rank, commit)
    return directory.read_manifest(rank)


@dataclass
class RankInfo:
    rank: int
    data_bytes: int
    checksummed: bool
    error: str | None = None  # set when the manifest cannot be read or the data fails verification


@dataclass
class CheckpointInfo:
    """One checkpoint (all ranks) as the tools see it."""

    url: str
    step: int
    world_size: int
    ranks: list[RankInfo] = field(default_factory=list)
    verified: bool | None = None  # None: not checked
    commit_marker: bool | None = None  # None: a layout without step markers
    run: str = ""  # the training run that wrote it ("" before runs were recorded)
    forks: list = field(default_factory=list)  # where that run's line left earlier runs: [run, step] per resume
    run_began: float = 0.0  # when that run began (seconds since the epoch; 0: not recorded)
    # set where the line begun last in the same tier left this one's run before this step: the step it left it at
    # (-1: it never went on from that run); this checkpoint belongs to an abandoned timeline, and recovery does not
    # take it
    abandoned_after: int | None = None

    @property
    def committed(self) -> bool:
        """Published (the step's ``COMMIT`` marker, where the layout has one) with every rank's manifest there and
        readable: only such checkpoints are ever resumed from."""
        present = {r.rank for r in self.ranks if r.error is None or r.error.startswith("data:")}
        complete = self.world_size > 0 and present == set(range(self.world_size))
        return complete and self.commit_marker is not False

    @property
    def size(self) -> int:
        return sum(r.data_bytes for r in self.ranks)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(committed=self.committed, size=self.size)
        return doc


def _is_checkpoint_dir(directory: CheckpointDir) -> bool:
    return bool(directory.committed_ranks()) or _read_commit(directory)[1] is not None


def _describe(directory: CheckpointDir, url: str, step_hint: int | None = None) -> CheckpointInfo:
    ranks, world_size, step = [], 0, step_hint if step_hint is not None else -1
    run, forks, began = "", [], 0.0
    uses_marker, commit = _read_commit(directory)
    if commit is not None:
        world_size = int(commit["world_size"])
    for rank in directory.committed_ranks():
        try:
            manifest = _read_manifest(directory, rank, commit)
        except (CheckpointFormatError, OSError) as err:
            ranks.append(RankInfo(rank, 0, False, f"manifest: {err}"))
            continue
        world_size = max(world_size, manifest.world_size)
        step = manifest.step if step_hint is None else step
        if not ranks:  # the ranks' manifests agree on their run
            run, forks, began = manifest.run, manifest.forks, manifest.run_began
        ranks.append(RankInfo(rank, manifest.data_bytes, manifest.verified))
    return CheckpointInfo(url, step, world_size, ranks, commit_marker=(commit is not None) if uses_marker else None,
                          run=run, forks=forks, run_began=began)


def _join(url: str, name: str) -> str:
    return f"{url.rstrip('/')}/{name}"


def find_checkpoints(url: str) -> list[CheckpointInfo]:
    """Every checkpoint at ``url`` (a tier or one checkpoint folder), oldest first. Raises NOT_FOUND."""
    directory = _dir(url)
    if _is_checkpoint_dir(directory):
        return [_describe(directory, url)]
    tier = _tier(url)
    try:
        exists = tier.fs.exists(tier.root)
    except OSError as err:
        raise ToolError(Exit.NOT_FOUND, f"cannot reach {url}: {err}") from None
    if not exists:
        raise ToolError(Exit.NOT_FOUND, f"{url} does not exist")
    found = []
    for step in tier.steps():
        name = f"{STEP_PREFIX}{step:09d}"
        found.append(_describe(tier.checkpoint(step), _join(url, name), step_hint=step))
    origins = [Origin.of(c.run, c.forks, c.run_began) for c in found]
    cut = abandoned_after(origins)
    for c, origin in zip(found, origins):
        c.abandoned_after = left_at(c.step, origin, cut)
    return found


def resolve_checkpoint(url: str, step: int | None = None) -> CheckpointInfo:
    """One complete checkpoint: ``url`` itself if it is a checkpoint folder, else the tier's step ``step``
    (default: the newest complete one that is not of an abandoned timeline)."""
    found = find_checkpoints(url)
    if step is not None:
        found = [c for c in found if c.step == step]
        if not found:
            raise ToolError(Exit.NOT_FOUND, f"no checkpoint of step {step} in {url}")
    complete = [c for c in found if c.committed and (step is not None or c.abandoned_after is None)]
    if not complete:
        if found:
            raise ToolError(Exit.NOT_FOUND, f"no complete checkpoint in {url} (some ranks have not committed)")
        raise ToolError(Exit.NOT_FOUND, f"no checkpoint in {url}")
    return complete[-1]


# --- verification --------------------------------------------------------------------------------------------


def _progress(total: int, description: str, enabled: bool | None = None) -> Any:
    from tqdm.auto import tqdm

    # None: shown on a terminal, silent in logs and pipes
    return tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                disable=None if enabled is None else not enabled, file=sys.stderr)


def _read_record(f: Any, record: TensorRecord, bar: Any, out: bytearray | None = None) -> str:
    """Streams one tensor's bytes from the open data object; returns their xxh3 (and fills ``out``)."""
    hasher = xxhash.xxh3_64()
    f.seek(record.offset)
    remaining, pos = record.nbytes, 0
    while remaining:
        chunk = f.read(min(READ_CHUNK, remaining))
        if not chunk:
            raise CheckpointFormatError(f"data is truncated inside tensor {record.name!r}")
        hasher.update(chunk)
        if out is not None:
            out[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
        remaining -= len(chunk)
        bar.update(len(chunk))
    return hasher.hexdigest()


def verify_rank(directory: CheckpointDir, rank: int, bar: Any, commit: dict[str, Any] | None = None) -> Manifest:
    """Reads one rank's data object tensor by tensor and checks every checksum (bounded memory)."""
    manifest = _read_manifest(directory, rank, commit)
    if not manifest.verified:
        raise CheckpointFormatError("manifest carries no checksums")
    try:
        f = directory.fs.open(directory.data_path(rank), "rb")
    except FileNotFoundError:
        raise CheckpointFormatError(f"{directory.data_path(rank)} is missing") from None
    with f:
        for record in sorted(manifest.tensors, key=lambda r: r.offset):
            if _read_record(f, record, bar) != record.checksum:
                raise CheckpointFormatError(f"checksum mismatch in tensor {record.name!r}")
    return manifest


def verify_checkpoint(info: CheckpointInfo, progress: bool | None = None) -> CheckpointInfo:
    directory = _dir(info.url)
    commit = _read_commit(directory)[1]
    with _progress(info.size, f"verify step {info.step}", progress) as bar:
        for r in info.ranks:
            if r.error is not None:
                continue
            try:
                verify_rank(directory, r.rank, bar, commit)
            except (CheckpointFormatError, OSError) as err:
                r.error = f"data: {err}"
    info.verified = info.committed and all(r.error is None for r in info.ranks)
    return info


# --- export --------------------------------------------------------------------------------------------------


def _read_tensor(f: Any, record: TensorRecord, bar: Any, where: str) -> torch.Tensor:
    raw = bytearray(record.nbytes)
    if _read_record(f, record, bar, raw) != record.checksum:
        raise CheckpointFormatError(f"{where}: checksum mismatch in tensor {record.name!r}")
    if record.nbytes == 0:
        return torch.empty(record.shape, dtype=record.torch_dtype)
    return torch.frombuffer(raw, dtype=record.torch_dtype).view(record.shape)


def _param_map(manifest: Manifest, where: str) -> tuple[int, dict[str, Any]]:
    try:
        deepspeed = manifest.state["main"]["deepspeed"]
        stage = int(deepspeed["stage"])
    except (KeyError, TypeError, ValueError):
        raise ToolError(Exit.CORRUPT, f"{where}: the manifest has no DeepSpeed state") from None
    pmap = deepspeed.get("param_map")
    if not isinstance(pmap, dict):
        raise ToolError(
            Exit.UNSUPPORTED,
            f"{where}: this checkpoint has no parameter map (written by an older oteacheck-lightning); "
            "it can be resumed but not exported",
        )
    return stage, pmap


def consolidate(info: CheckpointInfo, progress: bool | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The full fp32 weights (and persistent buffers) of a checkpoint, named as in the LightningModule's
    ``state_dict()``; and metadata about where they came from."""
    directory = _dir(info.url)
    commit = _read_commit(directory)[1]
    manifests = {r: _read_manifest(directory, r, commit) for r in range(info.world_size)}
    stage, pmap0 = _param_map(manifests[0], directory.manifest_path(0))
    assembler = Assembler(info.url)
    buffers: dict[str, torch.Tensor] = {}
    with _progress(info.size, f"export step {info.step}", progress) as bar:
        for rank, manifest in manifests.items():
            where = directory.data_path(rank)
            rank_stage, pmap = _param_map(manifest, directory.manifest_path(rank))
            if rank_stage != stage:
                raise ToolError(Exit.CORRUPT, f"{info.url}: ranks disagree on the ZeRO stage")
            records = {r.name: r for r in manifest.tensors}
            wanted = [g["master"] for g in pmap["groups"]] + [e["master"] for e in pmap["frozen"]]
            if rank == 0:
                wanted += [f"buffer/{n}" for n in pmap["buffers"]]
            missing = [n for n in wanted if n not in records]
            if missing:
                raise ToolError(Exit.CORRUPT, f"{where}: tensors {missing[:3]} named by the parameter map are missing")
            try:
                f = directory.fs.open(where, "rb")
            except FileNotFoundError:
                raise ToolError(Exit.CORRUPT, f"{where} is missing") from None
            with f:
                assembler.add_rank(pmap, lambda name: _read_tensor(f, records[name], bar, where))
                if rank == 0:
                    for name in pmap["buffers"]:
                        buffers[name] = _read_tensor(f, records[f"buffer/{name}"], bar, where).clone()
    assembler.check_complete()
    full = {**assembler.weights(), **buffers}
    for alias, canonical in pmap0["aliases"].items():
        if canonical in full:
            full[alias] = full[canonical]
    meta = {"step": str(info.step), "zero_stage": str(stage), "world_size": str(info.world_size),
            "source": info.url, "format": "pt"}
    return full, meta


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def export(ckpt: str, out: str, step: int | None = None, prefix: str = "", progress: bool | None = None) -> dict[str, Any]:
    """Writes the consolidated fp32 weights of ``ckpt`` to the safetensors file ``out``; returns a summary."""
    from safetensors.torch import save_file

    info = resolve_checkpoint(ckpt, step)
    tensors, meta = consolidate(info, progress)
    if all(k.startswith(WRAPPER_PREFIX) for k in tensors):
        tensors = _strip(tensors, WRAPPER_PREFIX)
    if prefix:
        tensors = _strip(tensors, prefix)
        if not tensors:
            raise ToolError(Exit.USAGE, f"no tensor name starts with --prefix {prefix!r}")
    # safetensors refuses tensors that share memory (tied weights): every name gets its own copy
    seen: set[int] = set()
    for name, t in tensors.items():
        if t.data_ptr() in seen:
            tensors[name] = t.clone()
        seen.add(tensors[name].data_ptr())
    tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {**meta, "out": out, "step": info.step, "zero_stage": int(meta["zero_stage"]),
            "world_size": info.world_size, "tensors": len(tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


# --- garbage collection ---------------------------------------------------------------------------------------


def gc(url: str, keep: int, dry_run: bool = False) -> list[int]:
    """Keeps the newest ``keep`` complete checkpoints of the tier at ``url`` (not counting steps of an abandoned
    timeline); removes every step older than the oldest kept (newer incomplete ones may be writes in progress).
    Returns the removed steps."""
    if keep < 1:
        raise ToolError(Exit.USAGE, f"--keep must be at least 1 (got {keep})")
    found = find_checkpoints(url)
    tier = _tier(url)
    if len(found) == 1 and found[0].url == url and _is_checkpoint_dir(_dir(url)):
        raise ToolError(Exit.USAGE, f"{url} is one checkpoint, not a tier of step-* checkpoints")
    # a step of an abandoned timeline is never one of the kept (it would push out the live line's newest)
    complete = [c.step for c in found if c.committed and c.abandoned_after is None]
    kept = set(complete[-keep:])
    oldest_kept = min(kept) if kept else None
    removed = [c.step for c in found if c.step not in kept and oldest_kept is not None and c.step < oldest_kept]
    if dry_run:
        return removed
    for step in removed:
        directory = tier.checkpoint(step)
        # the step's commit marker first, then the manifests: a checkpoint being removed is never seen as
        # committed with missing data
        try:
            directory.fs.rm(f"{directory.path}/COMMIT")
        except FileNotFoundError:
            pass
        for rank in directory.committed_ranks():
            directory.fs.rm(directory.manifest_path(rank))
        directory.fs.rm(directory.path, recursive=True)
    return removed


# --- in-memory snapshots ----------------------------------------------------------------------------------------


def memory_snapshots(memory_dir: str | Path) -> list[dict[str, Any]]:
    """The jobs whose snapshots lie in ``memory_dir`` (a machine's ``/dev/shm``): per job, each rank's sealed
    steps (only this machine's ranks: every node keeps its own), the newest step all of them hold (what a restart
    here resumes from, if the other nodes hold it too), the memory the slots take, and how long ago the newest was
    sealed. Only reads; a running job may seal and reuse slots meanwhile. Other users' jobs (their folders are
    theirs alone) are left out."""
    root = Path(memory_dir)
    if not root.is_dir():
        raise ToolError(Exit.NOT_FOUND, f"{root} is not a folder (the memory_dir of the runs, default {DEFAULT_SHM_ROOT})")
    jobs = []
    for job in sorted(root.glob(f"{JOB_PREFIX}*")):
        if not os.access(job, os.R_OK | os.X_OK):  # another user's job: its folder is theirs alone
            continue
        ranks: dict[int, list[int]] = {}
        world_sizes, used, sealed_at = set(), 0, 0.0
        for rank, rank_dir in rank_folders(job).items():
            if not os.access(rank_dir, os.R_OK | os.X_OK):
                continue
            steps = ranks.setdefault(rank, [])
            for path in rank_dir.glob("slot-*"):
                try:
                    stat = path.stat()
                except FileNotFoundError:  # reused by the running job meanwhile
                    continue
                used += stat.st_blocks * 512  # the memory it takes (a slot file may be larger than what was written)
                manifest = read_manifest(path) if path.name.endswith(".manifest.json") else None
                if manifest is not None:
                    steps.append(manifest.step)
                    world_sizes.add(manifest.world_size)
                    sealed_at = max(sealed_at, stat.st_mtime)
            steps.sort()
        if not ranks:
            continue
        common = set.intersection(*(set(steps) for steps in ranks.values()))
        jobs.append({
            "job": job.name.removeprefix(JOB_PREFIX), "folder": str(job),
            "ranks": [{"rank": rank, "steps": steps} for rank, steps in sorted(ranks.items())],
            "world_size": max(world_sizes) if world_sizes else None,
            "newest_on_every_rank": max(common) if common else None,
            "newest": max((s for steps in ranks.values() for s in steps), default=None),
            "bytes": used, "sealed_seconds_ago": round(time.time() - sealed_at, 1) if sealed_at else None,
        })
    return jobs


def processes_using(folder: Path) -> list[int]:
    """The processes of this machine that have a file under ``folder`` mapped or open, as far as ``/proc`` lets this
    user see (a job's memory folder is its owner's alone, and so are the processes of the job)."""
    prefix = str(folder.resolve()) + os.sep
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if prefix in (proc / "maps").read_text():
                found.append(int(proc.name))
                continue
            if any(os.readlink(fd).startswith(prefix) for fd in (proc / "fd").iterdir()):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return sorted(found)


def remove_memory_job(memory_dir: str | Path, job: str) -> Path:
    """Deletes the shared memory of ``job`` (all its ranks on this machine), unless a process maps or holds it: a
    running job, or one still shutting down. Returns the folder removed."""
    folder = job_folder(memory_dir, job)
    if not folder.is_dir():
        raise ToolError(Exit.NOT_FOUND, f"no shared memory of job {job} in {memory_dir}")
    users = processes_using(folder)
    if users:
        raise ToolError(Exit.IN_USE, f"job {job} is in use by process {', '.join(map(str, users))}; stop it first "
                        "(a job that ends normally frees its memory itself)")
    shutil.rmtree(folder)
    return folder


# --- command line ---------------------------------------------------------------------------------------------


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _cmd_ls(args: argparse.Namespace) -> int:
    found = find_checkpoints(args.url)
    if args.verify:
        found = [verify_checkpoint(c, args.progress) if c.committed else c for c in found]
    if args.json:
        print(json.dumps([c.to_json() for c in found], indent=1))
    else:
        print(f"{'STEP':>10}  {'RANKS':>7}  {'SIZE':>10}  {'COMMITTED':9}  {'VERIFIED':8}  RUN")
        for c in found:
            ranks = f"{len([r for r in c.ranks if r.error is None or r.error.startswith('data:')])}/{c.world_size or '?'}"
            verified = "-" if c.verified is None else ("yes" if c.verified else "CORRUPT")
            run = (c.run[:8] or "-") + (f" (abandoned: {how_left(c.abandoned_after)})"
                                        if c.abandoned_after is not None else "")
            print(f"{c.step:>10}  {ranks:>7}  {_human(c.size):>10}  {'yes' if c.committed else 'no':9}  {verified:8}  {run}")
    if args.verify and any(c.verified is False for c in found if c.committed):
        return Exit.CORRUPT
    return Exit.OK


def _cmd_verify(args: argparse.Namespace) -> int:
    found = find_checkpoints(args.url)
    if args.step is not None:
        found = [c for c in found if c.step == args.step]
        if not found:
            raise ToolError(Exit.NOT_FOUND, f"no checkpoint of step {args.step} in {args.url}")
    complete = [c for c in found if c.committed]
    if not complete:
        raise ToolError(Exit.NOT_FOUND, f"no complete checkpoint in {args.url}")
    for c in complete:
        verify_checkpoint(c, args.progress)
    if args.json:
        print(json.dumps([c.to_json() for c in complete], indent=1))
    else:
        for c in complete:
            for r in c.ranks:
                status = "ok" if r.error is None else f"CORRUPT {r.error}"
                print(f"step {c.step} rank {r.rank}: {status}")
        bad = [c.step for c in complete if not c.verified]
        print(f"{len(complete) - len(bad)} of {len(complete)} checkpoints verified" + (f"; corrupt: {bad}" if bad else ""))
    return Exit.CORRUPT if any(not c.verified for c in complete) else Exit.OK


def _cmd_export(args: argparse.Namespace) -> int:
    summary = export(args.ckpt, args.out, step=args.step, prefix=args.prefix, progress=args.progress)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {summary['tensors']} tensors ({_human(summary['bytes'])}) of step {summary['step']} "
              f"(ZeRO {summary['zero_stage']}, {summary['world_size']} ranks) to {args.out}")
    return Exit.OK


def _cmd_gc(args: argparse.Namespace) -> int:
    removed = gc(args.url, args.keep, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"removed": removed, "dry_run": args.dry_run}))
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {len(removed)} checkpoint(s)" + (f": steps {removed}" if removed else ""))
    return Exit.OK


def _cmd_memory(args: argparse.Namespace) -> int:
    if args.remove is not None:
        folder = remove_memory_job(args.dir, args.remove)
        print(json.dumps({"removed": str(folder)}) if args.json else f"removed {folder}")
        return Exit.OK
    jobs = memory_snapshots(args.dir)
    if args.dirpath is not None:
        wanted = job_id_for(args.dirpath)
        jobs = [j for j in jobs if j["job"] == wanted]
        if not jobs:
            raise ToolError(Exit.NOT_FOUND, f"no snapshots of job {wanted} (derived from {args.dirpath}) in {args.dir}; "
                            "a run with OTEACHECK_JOB_ID or checkpoint_io.job_id set uses that id instead")
    if args.json:
        print(json.dumps(jobs, indent=1))
        return Exit.OK
    if not jobs:
        print(f"no OTeaCheck snapshots in {args.dir}")
        return Exit.OK
    print(f"{'JOB':18s}  {'RANKS HERE':>10}  {'ON EVERY RANK':>13}  {'NEWEST':>8}  {'MEMORY':>10}  SEALED")
    for j in jobs:
        here = f"{len(j['ranks'])}/{j['world_size'] or '?'}"
        common = "-" if j["newest_on_every_rank"] is None else str(j["newest_on_every_rank"])
        newest = "-" if j["newest"] is None else str(j["newest"])
        ago = "-" if j["sealed_seconds_ago"] is None else f"{j['sealed_seconds_ago']:.0f} s ago"
        print(f"{j['job']:18s}  {here:>10}  {common:>13}  {newest:>8}  {_human(j['bytes']):>10}  {ago}")
    return Exit.OK


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(Exit.USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="oteacheck", description="Tools for OTeaCheck checkpoints (they never unpickle).",
                epilog="exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 corrupt, 5 unsupported, 6 in use")
    sub = p.add_subparsers(dest="tool", required=True, parser_class=_Parser)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        q.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bars on stderr (default: only on a terminal)")
        q.add_argument("-o", "--storage-option", action="append", default=[], metavar="KEY=VALUE",
                       help="an fsspec option for the URL's filesystem (repeatable), e.g. hdfs-native settings")

    q = sub.add_parser("ls", help="list the checkpoints of a tier")
    q.add_argument("url", help="a tier (folder of step-* checkpoints) or one checkpoint folder")
    q.add_argument("--verify", action="store_true", help="also read the data and check the checksums")
    common(q)
    q.set_defaults(func=_cmd_ls)

    q = sub.add_parser("verify", help="check the checksums of every complete checkpoint")
    q.add_argument("url", help="a tier or one checkpoint folder")
    q.add_argument("--step", type=int, default=None, help="only this step")
    common(q)
    q.set_defaults(func=_cmd_verify)

    q = sub.add_parser("export", help="consolidated fp32 weights as safetensors, loadable without DeepSpeed")
    q.add_argument("ckpt", help="a checkpoint folder, or a tier (its newest complete checkpoint)")
    q.add_argument("out", help="the .safetensors file to write")
    q.add_argument("--step", type=int, default=None, help="the step to export when CKPT is a tier")
    q.add_argument("--prefix", default="",
                   help="keep only names under this prefix and strip it (e.g. 'model.' for a wrapped nn.Module)")
    common(q)
    q.set_defaults(func=_cmd_export)

    q = sub.add_parser("gc", help="remove old checkpoints of a tier")
    q.add_argument("url", help="a tier (folder of step-* checkpoints)")
    q.add_argument("--keep", type=int, required=True, help="how many of the newest complete checkpoints to keep")
    q.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    common(q)
    q.set_defaults(func=_cmd_gc)

    q = sub.add_parser("memory", help="list the snapshots jobs keep in shared memory on this machine")
    q.add_argument("dir", nargs="?", default=os.environ.get("OTEACHECK_MEMORY_DIR", DEFAULT_SHM_ROOT),
                   help=f"the runs' memory_dir (default $OTEACHECK_MEMORY_DIR, else {DEFAULT_SHM_ROOT})")
    q.add_argument("--dirpath", default=None,
                   help="only the job a run with this checkpoint folder uses when no job id is set")
    q.add_argument("--remove", metavar="JOB", default=None,
                   help="delete this job's shared memory on this machine (refused while a process maps it)")
    q.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    q.set_defaults(func=_cmd_memory, storage_option=[])
    return p


TOOLS = ("ls", "verify", "export", "gc", "memory")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--storage-option takes KEY=VALUE, got {item!r}")
        options[key] = value
    _storage_options.clear()
    _storage_options.update(options)
    try:
        return int(args.func(args))
    except ToolError as err:
        print(f"oteacheck {args.tool}: error: {err}", file=sys.stderr)
        return int(err.code)
    except CheckpointFormatError as err:
        print(f"oteacheck {args.tool}: error: {err}", file=sys.stderr)
        return int(Exit.CORRUPT)
    except FileNotFoundError as err:
        print(f"oteacheck {args.tool}: error: not found: {err}", file=sys.stderr)
        return int(Exit.NOT_FOUND)
    finally:
        _storage_options.clear()


"""The versioned layout of one rank's checkpoint: a data blob and a manifest that describes it.

A checkpoint of one rank is two objects:

* ``data``: the raw bytes of every tensor, each at an offset aligned to :data:`ALIGN` (page size, so the same layout
  serves shared memory, pinned buffers and direct I/O);
* ``manifest``: JSON with the step, the rank, each tensor's name, dtype, shape, offset, size and (once computed)
  its xxh3-64 checksum, and the non-tensor state as a :mod:`~oteacheck_lightning.statecodec` document.

The manifest is written last. Its presence is the rank's commit: a reader ignores data without a manifest, and a
manifest's checksums make a torn or corrupted data object detectable.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import xxhash

from . import statecodec

FORMAT_VERSION = 1
ALIGN = 4096
MAX_MANIFEST_BYTES = 256 * 1024 * 1024

# dtypes a manifest may name; loading never resolves arbitrary attribute names
_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
        torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
    )
}
for _name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        _DTYPES[_name] = getattr(torch, _name)


class CheckpointFormatError(ValueError):
    """A manifest or data object is malformed, from another format version, or fails verification."""


@dataclass(frozen=True)
class TensorRecord:
    """One tensor's place in the data object. Immutable: snapshots of one layout share their records, and a
    checksum makes a new record (:func:`with_checksums`)."""

    name: str
    dtype: str
    shape: list[int]
    offset: int
    nbytes: int
    device: str = "cpu"
    checksum: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return _DTYPES[self.dtype]
        except KeyError:
            raise CheckpointFormatError(f"tensor {self.name!r} has unsupported dtype {self.dtype!r}") from None


def is_fork(entry: object) -> bool:
    """Whether ``entry`` is one of :attr:`Manifest.forks`: ``[run, step]``."""
    return isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], int)


def is_time(value: object) -> bool:
    """Whether ``value`` is a time as :attr:`Manifest.run_began` holds one: seconds since the epoch, or 0."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


@dataclass
class Manifest:
    step: int
    rank: int
    world_size: int
    data_bytes: int
    tensors: list[TensorRecord]
    state: Any
    job: str = ""
    # the training run that wrote it (one id agreed by every rank at setup; a resumed job is a new run): a step is
    # committed only from manifests of one run, never from a new rank's file beside a stale one of an abandoned run
    run: str = ""
    # where this run's line of training left earlier runs, oldest first: [run, step] for each resume, from ``step``
    # of ``run``. That run's newer steps were abandoned then, and recovery never takes them, wherever they still lie
    # (a tier that was down at the resume keeps them until this line writes there)
    forks: list = field(default_factory=list)
    # when that run began (rank 0's clock at its setup, seconds since the epoch; 0: not recorded). Recovery goes on
    # with the line begun last, so a run started afresh beside an earlier one's steps that it could not see (their
    # tier was down at its start) is never set aside for them
    run_began: float = 0.0
    created_unix: float = field(default_factory=time.time)
    format_version: int = FORMAT_VERSION

    @property
    def verified(self) -> bool:
        """True when every tensor carries a checksum, so the data can be verified."""
        return all(t.checksum is not None for t in self.tensors)

    def to_json(self) -> bytes:
        # not dataclasses.asdict: it deep-copies the state document, which costs milliseconds on every seal
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["tensors"] = _records_document(self.tensors)
        return statecodec.dumps(doc).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        if len(raw) > MAX_MANIFEST_BYTES:
            raise CheckpointFormatError("manifest is implausibly large")
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointFormatError(f"manifest is not valid JSON: {err}") from None
        if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
            version = doc.get("format_version") if isinstance(doc, dict) else None
            raise CheckpointFormatError(f"unsupported checkpoint format version {version!r} (expected {FORMAT_VERSION})")
        try:
            records = [TensorRecord(**r) for r in doc.pop("tensors")]
            manifest = cls(tensors=records, **doc)
        except TypeError as err:
            raise CheckpointFormatError(f"manifest has unexpected fields: {err}") from None
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Checks that every record lies inside the data object and agrees with its dtype and shape."""
        if not isinstance(self.forks, list) or not all(is_fork(f) for f in self.forks):
            raise CheckpointFormatError(f"manifest's forks are not a list of [run, step]: {self.forks!r}")
        if not is_time(self.run_began):
            raise CheckpointFormatError(f"manifest's run_began is not a time: {self.run_began!r}")
        for r in self.tensors:
            numel = 1
            for dim in r.shape:
                if not isinstance(dim, int) or dim < 0:
                    raise CheckpointFormatError(f"tensor {r.name!r} has a bad shape {r.shape}")
                numel *= dim
            itemsize = torch.empty((), dtype=r.torch_dtype).element_size()
            if r.nbytes != numel * itemsize or r.offset < 0 or r.offset + r.nbytes > self.data_bytes:
                raise CheckpointFormatError(f"tensor {r.name!r} does not fit the data object")


# the records of the last manifest written and their JSON: the snapshots of one layout share their (immutable)
# records, and writing hundreds of them out again cost the seal more than the rest of the manifest
_last_records: tuple[tuple[TensorRecord, ...], statecodec.Verbatim] | None = None


def _records_document(records: list[TensorRecord]) -> statecodec.Verbatim:
    global _last_records
    cached = _last_records  # one read: the sealer and the persisters write manifests on their own threads
    if cached is not None and len(cached[0]) == len(records) and all(a is b for a, b in zip(cached[0], records)):
        return cached[1]
    # the entry holds the records themselves, so no other object can take their identities
    document = statecodec.Verbatim([dict(vars(r)) for r in records])
    _last_records = (tuple(records), document)
    return document


def padded(nbytes: int) -> int:
    """The bytes a tensor of ``nbytes`` takes in the layout: the next tensor starts on an :data:`ALIGN` boundary."""
    return -(-nbytes // ALIGN) * ALIGN


def plan_layout(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[TensorRecord], int]:
    """Assigns each tensor an aligned offset; returns the records and the total data size."""
    records: list[TensorRecord] = []
    offset = 0
    for name, t in tensors:
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise CheckpointFormatError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        records.append(TensorRecord(name, dtype, list(t.shape), offset, nbytes, t.device.type))
        offset += padded(nbytes)
    return records, offset


def byte_view(buffer: torch.Tensor, record: TensorRecord, base: int = 0) -> torch.Tensor:
    """The bytes of ``record`` inside a flat uint8 ``buffer`` that holds the layout from offset ``base`` on, viewed
    with the record's dtype and shape."""
    raw = buffer[record.offset - base : record.offset - base + record.nbytes]
    if record.nbytes == 0:
        return torch.empty(record.shape, dtype=record.torch_dtype)
    return raw.view(record.torch_dtype).view(record.shape)


def checksum(data: memoryview | bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def with_checksums(manifest: Manifest, buffer: memoryview) -> Manifest:
    """``manifest`` with each record's checksum computed from ``buffer`` (the rank's data object)."""
    records = [replace(r, checksum=checksum(buffer[r.offset : r.offset + r.nbytes])) for r in manifest.tensors]
    return replace(manifest, tensors=records)


def verify(manifest: Manifest, buffer: memoryview, where: str) -> None:
    """Raises :class:`CheckpointFormatError` naming ``where`` if a tensor's bytes do not match its checksum."""
    if len(buffer) < manifest.data_bytes:
        raise CheckpointFormatError(f"{where}: data is truncated ({len(buffer)} of {manifest.data_bytes} bytes)")
    for r in manifest.tensors:
        if r.checksum is not None and checksum(buffer[r.offset : r.offset + r.nbytes]) != r.checksum:
            raise CheckpointFormatError(f"{where}: checksum mismatch in tensor {r.name!r}")


def load_tensors(manifest: Manifest, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views (not copies) of every tensor in ``buffer``; the caller copies what it keeps."""
    return {r.name: byte_view(buffer, r) for r in manifest.tensors}


def records_by_name(manifest: Manifest) -> Mapping[str, TensorRecord]:
    return {r.name: r for r in manifest.tensors}

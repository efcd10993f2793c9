"""The partition plan: which bytes of a snapshot are copied together, in what order. Pure; no CUDA, no DeepSpeed.

A rank's snapshot tensors (fp32 master partitions, optimizer states, frozen weights) are laid out in the host slot by
:func:`~oteacheck_lightning.format.plan_layout`. The plan cuts them into *partitions*, the unit the scheduler issues
and the copier transfers:

* a large tensor is cut at DeepSpeed's gradient-bucket boundaries (every ``reduce_bucket_size`` elements of the
  flat partition, the gradient merging strategy) and at ``max_bytes``, so one partition never spans two buckets
  and always fits the staging ring;
* small tensors (under ``pack_below`` bytes) are packed together, in slot order, into partitions of at most
  ``max_bytes``: one transfer through the GPU staging ring instead of hundreds of tiny ones. A packed partition
  covers a contiguous span of the slot, padding between tensors included, so it is one host transfer; it holds
  tensors of one device only, and only tensors that lie next to each other in the slot (the transfer writes its
  whole span, so a tensor planned elsewhere, such as one copied at the step boundary, must not lie inside it).

Every byte of every planned tensor is in exactly one partition. Partitions come in slot order, which is the order
of :meth:`~oteacheck_lightning.deepspeed_state.DeepSpeedState.tensors` (masters first, then optimizer states):
after optimizer step *t* all of them are final until step *t+1*, so that order is also the order they may be copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .format import TensorRecord, padded

MiB = 1 << 20


@dataclass(frozen=True)
class Piece:
    """A byte range of one source tensor and where it lands in the slot."""

    tensor: int  # index into the snapshot's tensor list
    src_offset: int  # bytes into the source tensor
    dst_offset: int  # bytes into the slot
    nbytes: int


@dataclass(frozen=True)
class Partition:
    index: int
    pieces: tuple[Piece, ...]
    packed: bool  # several small tensors staged through the ring into one transfer
    bucket: int | None = None  # the gradient bucket of a cut tensor (None for packed partitions)

    @property
    def dst_offset(self) -> int:
        return self.pieces[0].dst_offset

    @property
    def span(self) -> int:
        """Bytes of the slot this partition's transfer covers (padding between packed tensors included)."""
        last = self.pieces[-1]
        return last.dst_offset + last.nbytes - self.pieces[0].dst_offset

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in this partition."""
        return sum(p.nbytes for p in self.pieces)


def _itemsize(record: TensorRecord) -> int:
    return record.torch_dtype.itemsize


def plan_partitions(
    records: Sequence[TensorRecord],
    max_bytes: int,
    bucket_elements: int | None = None,
    pack_below: int = 1 * MiB,
) -> list[Partition]:
    """Cuts the tensors described by ``records`` (slot layout) into partitions of at most ``max_bytes``.

    Args:
        records: one per tensor, in slot order; ``records[i]`` describes source tensor ``i``.
        max_bytes: the largest transfer (a staging-ring segment).
        bucket_elements: DeepSpeed's ``reduce_bucket_size``; cuts fall on multiples of it (in elements of each
            tensor's dtype). ``None``: no bucket alignment.
        pack_below: tensors smaller than this are packed together; ``0`` copies every tensor on its own.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if pack_below > max_bytes:
        raise ValueError(f"pack_below ({pack_below}) cannot exceed max_bytes ({max_bytes})")
    if bucket_elements is not None and bucket_elements <= 0:
        raise ValueError(f"bucket_elements must be positive, got {bucket_elements}")
    partitions: list[Partition] = []
    packing: list[Piece] = []

    def close_pack() -> None:
        if packing:
            partitions.append(Partition(len(partitions), tuple(packing), packed=True))
            packing.clear()

    for i, record in enumerate(records):
        if record.nbytes == 0:
            continue
        if record.nbytes < pack_below:
            piece = Piece(i, 0, record.offset, record.nbytes)
            too_long = packing and piece.dst_offset + piece.nbytes - packing[0].dst_offset > max_bytes
            # one transfer comes from one device: a host tensor is never staged through the GPU ring
            other_device = packing and records[packing[0].tensor].device != record.device
            last = records[packing[-1].tensor] if packing else None
            apart = last is not None and piece.dst_offset != last.offset + padded(last.nbytes)  # a tensor between
            if too_long or other_device or apart:
                close_pack()
            packing.append(piece)
            continue
        close_pack()
        item = _itemsize(record)
        bucket_bytes = bucket_elements * item if bucket_elements is not None else record.nbytes
        # cuts stay on element boundaries so a partition never splits a value
        step = max(item, (max_bytes // item) * item)
        start = 0
        while start < record.nbytes:
            bucket = start // bucket_bytes
            end = min(record.nbytes, start + step, (bucket + 1) * bucket_bytes)
            partitions.append(
                Partition(
                    len(partitions),
                    (Piece(i, start, record.offset + start, end - start),),
                    packed=False,
                    bucket=bucket if bucket_elements is not None else None,
                )
            )
            start = end
    close_pack()
    return partitions


def per_tensor_partitions(records: Sequence[TensorRecord]) -> list[Partition]:
    """One partition per tensor, uncut and unpacked: the naive baseline the engine is measured against."""
    out: list[Partition] = []
    for i, record in enumerate(records):
        if record.nbytes:
            out.append(Partition(len(out), (Piece(i, 0, record.offset, record.nbytes),), packed=False))
    return out

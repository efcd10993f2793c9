"""The partition plan: every byte once, no partition over the ring segment, cuts on gradient-bucket boundaries."""

import dataclasses

import pytest
import torch

from oteacheck_lightning.format import plan_layout
from oteacheck_lightning.plan import per_tensor_partitions, plan_partitions

KiB = 1024


def layout(*specs):
    """specs: (numel, dtype, device) -> records in slot order."""
    tensors = [(f"t{i}", torch.empty(n, dtype=d)) for i, (n, d, _) in enumerate(specs)]
    records, _ = plan_layout(tensors)
    return [dataclasses.replace(record, device=device) for record, (_, _, device) in zip(records, specs)]


def covered(records, partitions):
    seen = {i: [] for i in range(len(records))}
    for p in partitions:
        for piece in p.pieces:
            assert piece.dst_offset == records[piece.tensor].offset + piece.src_offset
            seen[piece.tensor].append((piece.src_offset, piece.src_offset + piece.nbytes))
    for i, ranges in seen.items():
        ranges.sort()
        pos = 0
        for start, end in ranges:
            assert start == pos, f"tensor {i}: gap or overlap at {start}"
            pos = end
        assert pos == records[i].nbytes


@pytest.mark.parametrize("max_bytes", [8 * KiB, 64 * KiB, 1 << 20])
@pytest.mark.parametrize("bucket_elements", [None, 5000, 1 << 14])
def test_every_byte_in_exactly_one_partition_of_bounded_size(max_bytes, bucket_elements):
    records = layout((100_000, torch.float32, "cpu"), (3, torch.int64, "cpu"), (777, torch.bfloat16, "cpu"),
                     (50_000, torch.float32, "cpu"), (1, torch.float32, "cpu"), (0, torch.float32, "cpu"))
    partitions = plan_partitions(records, max_bytes, bucket_elements, pack_below=min(4 * KiB, max_bytes))
    covered(records, partitions)
    assert all(p.span <= max_bytes for p in partitions)
    assert [p.index for p in partitions] == list(range(len(partitions)))
    assert [p.dst_offset for p in partitions] == sorted(p.dst_offset for p in partitions)


def test_cuts_fall_on_bucket_boundaries_and_whole_elements():
    records = layout((10_000, torch.float32, "cuda"), (9_999, torch.bfloat16, "cuda"))
    bucket = 3000
    partitions = plan_partitions(records, 6 * KiB + 2, bucket, pack_below=0)
    for p in partitions:
        (piece,) = p.pieces
        item = records[piece.tensor].torch_dtype.itemsize
        first, last = piece.src_offset // (bucket * item), (piece.src_offset + piece.nbytes - 1) // (bucket * item)
        assert first == last == p.bucket, "a partition spans two gradient buckets"
        assert piece.src_offset % item == 0 and piece.nbytes % item == 0
    covered(records, partitions)


def test_small_tensors_are_packed_per_device_and_big_ones_go_alone():
    records = layout((10, torch.float32, "cuda"), (20, torch.float32, "cuda"), (30, torch.float32, "cpu"),
                     (40, torch.float32, "cpu"), (1 << 16, torch.float32, "cuda"), (5, torch.float32, "cuda"))
    partitions = plan_partitions(records, 1 << 20, None, pack_below=64 * KiB)
    assert [[x.tensor for x in p.pieces] for p in partitions] == [[0, 1], [2, 3], [4], [5]]
    assert [p.packed for p in partitions] == [True, True, False, True]
    # a packed partition is one transfer over its span, padding included
    assert partitions[0].span == records[1].offset + records[1].nbytes - records[0].offset
    assert partitions[0].nbytes == records[0].nbytes + records[1].nbytes


def test_a_packed_partition_never_spans_a_tensor_planned_elsewhere():
    # the engine plans only the tensors copied during the next iteration; a tensor copied at the step boundary may lie
    # between two of them in the slot, and a packed transfer over it would overwrite its bytes
    records = layout((10, torch.float32, "cuda"), (20, torch.float32, "cuda"), (30, torch.float32, "cuda"),
                     (40, torch.float32, "cuda"), (50, torch.float32, "cuda"))
    planned = [records[0], records[1], records[3], records[4]]  # records[2] is copied elsewhere
    partitions = plan_partitions(planned, 1 << 20, None, pack_below=64 * KiB)
    assert [[x.tensor for x in p.pieces] for p in partitions] == [[0, 1], [2, 3]]
    for p in partitions:
        assert not (p.dst_offset <= records[2].offset < p.dst_offset + p.span)
    covered(planned, partitions)


def test_naive_plan_is_one_partition_per_tensor():
    records = layout((1 << 20, torch.float32, "cpu"), (0, torch.float32, "cpu"), (3, torch.float32, "cpu"))
    partitions = per_tensor_partitions(records)
    assert [(p.pieces[0].tensor, p.nbytes) for p in partitions] == [(0, 4 << 20), (2, 12)]


@pytest.mark.parametrize("kwargs", [dict(max_bytes=0), dict(max_bytes=10, pack_below=11), dict(max_bytes=10, bucket_elements=0)])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        plan_partitions(layout((4, torch.float32, "cpu")), **kwargs)

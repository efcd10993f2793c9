import json

import pytest
import torch

from oteacheck_lightning.format import (
    ALIGN,
    CheckpointFormatError,
    Manifest,
    byte_view,
    load_tensors,
    plan_layout,
    verify,
    with_checksums,
)


def make(tensors):
    named = list(tensors.items())
    records, size = plan_layout(named)
    buffer = torch.zeros(size, dtype=torch.uint8)
    for r, (_, t) in zip(records, named):
        byte_view(buffer, r).copy_(t)
    manifest = Manifest(step=3, rank=0, world_size=1, data_bytes=size, tensors=records, state={"k": 1})
    return manifest, buffer


def test_layout_is_aligned_and_roundtrips():
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.ones(2, dtype=torch.bfloat16), "empty": torch.empty(0)}
    manifest, buffer = make(tensors)
    assert all(r.offset % ALIGN == 0 for r in manifest.tensors)
    loaded = load_tensors(Manifest.from_json(manifest.to_json()), buffer)
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t) and loaded[name].dtype == t.dtype


def test_checksums_detect_a_flipped_bit():
    manifest, buffer = make({"a": torch.randn(100)})
    view = memoryview(buffer.numpy())
    manifest = with_checksums(manifest, view)
    verify(manifest, view, "here")
    buffer[manifest.tensors[0].offset + 5] ^= 1
    with pytest.raises(CheckpointFormatError, match="checksum mismatch in tensor 'a'"):
        verify(manifest, view, "here")


def test_truncated_data_is_detected():
    manifest, buffer = make({"a": torch.randn(100)})
    manifest = with_checksums(manifest, memoryview(buffer.numpy()))
    with pytest.raises(CheckpointFormatError, match="truncated"):
        verify(manifest, memoryview(buffer.numpy())[:100], "here")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format_version=99), "format version"),
        (lambda d: d["tensors"][0].update(offset=10**9), "does not fit"),
        (lambda d: d["tensors"][0].update(dtype="object"), "unsupported dtype"),
        (lambda d: d["tensors"][0].update(shape=[-1]), "bad shape"),
        (lambda d: d.update(surprise=1), "unexpected fields"),
        (lambda d: d.update(forks=[["run", "7"]]), r"forks are not a list of \[run, step\]"),
        (lambda d: d.update(forks={"run": 7}), r"forks are not a list of \[run, step\]"),
        (lambda d: d.update(run_began="yesterday"), "run_began is not a time"),
        (lambda d: d.update(run_began=-1.0), "run_began is not a time"),
    ],
)
def test_malformed_manifests_are_rejected(mutate, message):
    manifest, _ = make({"a": torch.randn(4)})
    doc = json.loads(manifest.to_json())
    mutate(doc)
    with pytest.raises(CheckpointFormatError, match=message):
        Manifest.from_json(json.dumps(doc).encode())


def test_a_snapshot_layout_is_made_again_only_when_a_tensor_changes():
    # the capture keeps the layout of the last snapshot: the same records (immutable, shared by the snapshots) while
    # nothing changed, a new layout as soon as a name, dtype, shape or device does
    from oteacheck_lightning import OTeaCheckpointIO

    io = OTeaCheckpointIO()
    named = [("fp32/0", torch.zeros(1000)), ("buffer/bn.running_mean", torch.zeros(16)), ("state/0", torch.arange(3))]
    rng = [("rng/0", torch.zeros(625, dtype=torch.int64))]
    records, rng_records, boundary, size = io._layout(named, rng)
    assert [r.name for r in records] == ["fp32/0", "buffer/bn.running_mean", "state/0"] and rng_records[0].name == "rng/0"
    assert boundary == [False, True, True]
    # the step-boundary tensors lie first and back to back (the engine sends those on a GPU as one transfer), the
    # RNG states last
    expected, expected_size = plan_layout([named[1], named[2], named[0]] + rng)
    assert records == [expected[2], expected[0], expected[1]] and rng_records == expected[3:] and size == expected_size
    same = io._layout([(n, t.clone()) for n, t in named], [(n, t.clone()) for n, t in rng])  # new tensors, same geometry
    assert same[0] is records and same[1] is rng_records and same[3] == size
    for changed in ([("fp32/0", torch.zeros(2000)), *named[1:]], [("fp32/0", torch.zeros(1000, dtype=torch.float64)), *named[1:]],
                    [("fp32/1", torch.zeros(1000)), *named[1:]]):
        again, _, _, new_size = io._layout(changed, rng)
        expected, expected_size = plan_layout([changed[1], changed[2], changed[0]] + rng)
        assert again is not records and again == [expected[2], expected[0], expected[1]] and new_size == expected_size


def test_a_manifest_of_shared_records_writes_them_as_a_fresh_one_would():
    # manifests of one layout share their records, and their JSON is written once; a checksummed copy (new records)
    # and another layout are written out anew
    import oteacheck_lightning.format as fmt

    manifest, buffer = make({"a": torch.randn(100), "b": torch.randn(7, 3)})
    first = manifest.to_json()
    again = Manifest(**{**vars(manifest), "step": 9}).to_json()  # the next snapshot: same records
    fmt._last_records = None
    assert again == Manifest(**{**vars(manifest), "step": 9}).to_json() and again != first
    checked = with_checksums(manifest, memoryview(buffer.numpy()))
    assert all(r.checksum for r in Manifest.from_json(checked.to_json()).tensors)
    assert not any(r.checksum for r in Manifest.from_json(manifest.to_json()).tensors)
    other, _ = make({"c": torch.randn(5)})
    assert [r.name for r in Manifest.from_json(other.to_json()).tensors] == ["c"]

"""Re-partitioning without DeepSpeed: ZeRO-2-like flat groups (parameters back to back with alignment padding, cut
into one equal partition per rank) saved by one number of ranks and cut for another. The real DeepSpeed runs are
in tests/cli/test_resize.py; these cover many world sizes, parameters split across several ranks and padding."""

import pytest
import torch

from oteacheck_lightning.format import CheckpointFormatError
from oteacheck_lightning.reshard import Assembler, add_saved_rank, resharded_tensors, wanted_names

SHAPES = {"emb": (7, 5), "w": (13,), "b": (1,), "head": (3, 4)}
ALIGN = 4


def flat_layout():
    """Each parameter's offset in the flat group, and the group's length before the padding to the world size."""
    offsets, at = {}, 0
    for name, shape in SHAPES.items():
        offsets[name] = at
        at += -(-torch.Size(shape).numel() // ALIGN) * ALIGN
    return offsets, at


def rank_state(world_size: int, rank: int, values: dict[str, dict[str, torch.Tensor]]):
    """One rank's tensors and parameter map, as deepspeed_state.py writes them for ZeRO 1/2."""
    offsets, length = flat_layout()
    part = -(-length // world_size)
    begin, end = rank * part, (rank + 1) * part
    tensors, entries = {}, []
    for key in ("", "exp_avg", "exp_avg_sq"):
        flat = torch.zeros(part * world_size)
        for name, shape in SHAPES.items():
            numel = torch.Size(shape).numel()
            flat[offsets[name] : offsets[name] + numel] = values[key][name].reshape(-1)
        tensors["fp32/0" if not key else f"optim/fp32/0/{key}"] = flat[begin:end].clone()
    tensors["optim/fp32/0/step"] = torch.tensor(17.0)
    for name, shape in SHAPES.items():
        numel = torch.Size(shape).numel()
        lo, hi = max(begin, offsets[name]), min(end, offsets[name] + numel)
        segments = [[lo - offsets[name], lo - begin, hi - lo]] if hi > lo else []
        entries.append({"name": name, "shape": list(shape), "segments": segments})
    pmap = {"groups": [{"master": "fp32/0", "params": entries}], "frozen": [], "buffers": [], "aliases": {}}
    meta = {"stage": 2, "layout": {"fp32/0": [part]}, "param_map": pmap, "param_groups": [{"lr": 0.1}],
            "optim_scalars": {"fp32/0": {"bias_correction": True}}, "optim_devices": {"fp32/0/exp_avg": "cpu"}}
    return tensors, meta


@pytest.mark.parametrize("saved,now", [(3, 2), (2, 3), (4, 1), (1, 4), (3, 5)])
def test_every_rank_gets_exactly_its_new_partition_of_the_weights_and_the_optimizer_state(saved, now):
    g = torch.Generator().manual_seed(saved * 10 + now)
    values = {key: {n: torch.randn(s, generator=g) for n, s in SHAPES.items()} for key in ("", "exp_avg", "exp_avg_sq")}
    old = [rank_state(saved, r, values) for r in range(saved)]
    for rank in range(now):
        expected, expected_meta = rank_state(now, rank, values)
        pmap = expected_meta["param_map"]
        assembler = Assembler("test", wanted=wanted_names(pmap))
        for tensors, meta in old:
            add_saved_rank(assembler, meta["param_map"], tensors)
        assembler.check_complete()
        live = {"fp32/0": torch.empty_like(expected["fp32/0"])}
        got, got_meta = resharded_tensors(assembler, pmap, live, old[0][0], old[0][1])
        assert sorted(got) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), f"{saved} -> {now} ranks, rank {rank}: {name} differs"
        assert got_meta["layout"] == expected_meta["layout"] and got_meta["param_map"] == pmap
        assert got_meta["optim_scalars"] == expected_meta["optim_scalars"]
        assert got_meta["optim_devices"] == expected_meta["optim_devices"]


def test_a_missing_saved_rank_is_detected_not_filled_with_zeros():
    values = {key: {n: torch.ones(s) for n, s in SHAPES.items()} for key in ("", "exp_avg", "exp_avg_sq")}
    assembler = Assembler("step-000000006")
    for rank in (0, 2):  # rank 1 of 3 is missing
        tensors, meta = rank_state(3, rank, values)
        add_saved_rank(assembler, meta["param_map"], tensors)
    with pytest.raises(CheckpointFormatError, match="step-000000006: the ranks do not cover every element"):
        assembler.check_complete()

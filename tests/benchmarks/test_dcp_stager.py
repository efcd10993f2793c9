"""The DCP comparison keeps working where torch closes its stager after each stage (torch 2.11 did, and the next
stage then failed with ``KeyError: <class 'type'>``)."""

from __future__ import annotations

import pytest
import torch

staging = pytest.importorskip("torch.distributed.checkpoint.staging")

from benchmarks.methods import DCPAsyncSaver, Record  # noqa: E402


def test_a_closed_stager_is_replaced_and_stages_again():
    saver = DCPAsyncSaver(Record(), args=None)
    saver.stager = saver._new_stager()
    state = {"rank0/w": torch.arange(6.0), "meta": {"cls": dict}}  # a class object is what the closed table lacks
    try:
        saver.stager.stage(state).result()
        saver.stager.close()  # what torch 2.11's DefaultStager did after every stage
        with pytest.raises(KeyError):
            saver.stager._state_dict_stager.stage(state)
        first = saver.stager
        stager = saver._usable_stager()
        assert stager is not first
        staged = stager.stage(state).result()
        assert torch.equal(staged["rank0/w"], state["rank0/w"]) and staged["meta"]["cls"] is dict
        assert saver._usable_stager() is stager  # an open stager is kept (its pinned buffers with it)
        assert any("new DefaultStager per save" in n for n in saver.record.notes)
    finally:
        saver.stager.close()

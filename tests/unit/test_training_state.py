"""Random generator states: captured as tensors, restored to the same draws, also from the older list form."""

import random

import numpy as np
import torch

from oteacheck_lightning import statecodec
from oteacheck_lightning.training_state import collect_rng, restore_rng


def draws():
    return random.random(), random.gauss(0, 1), float(np.random.rand()), np.random.randn(), torch.rand(3).tolist()


def test_restored_generators_draw_what_they_would_have_drawn():
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    draws()  # leave the generators mid-stream, with a cached gauss
    state = collect_rng()
    # the Mersenne Twister states travel as tensors, so the state document stays small
    document, tensors = statecodec.encode(state, tensor_prefix="rng/")
    assert len(tensors) == 3 and len(str(document)) < 1000
    expected = draws()
    restore_rng(statecodec.decode(document, {k: v.clone() for k, v in tensors.items()}))
    assert draws() == expected


def test_a_state_written_with_lists_still_restores():
    random.seed(7), np.random.seed(8)
    state = collect_rng()
    state["python"]["internal"] = state["python"]["internal"].tolist()
    state["numpy"]["keys"] = state["numpy"]["keys"].tolist()
    expected = draws()
    restore_rng(state)
    assert draws() == expected

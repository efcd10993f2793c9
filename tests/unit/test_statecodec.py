import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch

from oteacheck_lightning import statecodec


def roundtrip(obj):
    doc, tensors = statecodec.encode(obj)
    import json

    doc = json.loads(json.dumps(doc))  # must survive JSON
    return statecodec.decode(doc, tensors)


def test_nested_state_roundtrips_exactly():
    state = {
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 3}}, "flag": True, "none": None}},
        "betas": (0.9, 0.999),
        "lrs": [1e-3, 2.5e-4],
        "inf": math.inf,
        "int_keys": {0: "a", 1: "b"},
        "tensor": torch.arange(6, dtype=torch.float64).view(2, 3),
        "bf16": torch.ones(3, dtype=torch.bfloat16),
        "array": np.arange(4, dtype=np.int32),
        "np_scalar": np.float32(1.5),
        "dtype": torch.float16,
        "ordered": OrderedDict(b=1, a=2),
        "tagged_key": {statecodec.TAG: "not a tag"},
    }
    out = roundtrip(state)
    assert out["betas"] == (0.9, 0.999) and isinstance(out["betas"], tuple)
    assert out["inf"] == math.inf
    assert out["int_keys"] == {0: "a", 1: "b"}
    assert torch.equal(out["tensor"], state["tensor"]) and out["tensor"].dtype == torch.float64
    assert torch.equal(out["bf16"], state["bf16"])
    assert np.array_equal(out["array"], state["array"]) and out["array"].dtype == np.int32
    assert out["np_scalar"] == np.float32(1.5) and isinstance(out["np_scalar"], np.float32)
    assert out["dtype"] is torch.float16
    assert list(out["ordered"]) == ["b", "a"]
    assert out["tagged_key"] == {statecodec.TAG: "not a tag"}
    assert out["loops"] == state["loops"]


def test_nan_roundtrips():
    assert math.isnan(roundtrip({"x": math.nan})["x"])


def test_arbitrary_objects_are_refused_with_the_path():
    class Custom:
        pass

    with pytest.raises(statecodec.UnsupportedStateError, match=r"state\['callbacks'\]\['cb'\]"):
        statecodec.encode({"callbacks": {"cb": Custom()}})


def test_decoding_unknown_tags_never_runs_code():
    # a document that names a "pickle" payload is rejected, not executed (invariant 7)
    with pytest.raises(statecodec.CorruptStateError):
        statecodec.decode({statecodec.TAG: "pickle", "data": "gASVAAAAAAAAAAA="}, {})
    with pytest.raises(statecodec.CorruptStateError):
        statecodec.decode({statecodec.TAG: "tensor", "ref": "missing"}, {})
    with pytest.raises(statecodec.CorruptStateError):
        statecodec.decode({statecodec.TAG: "dtype", "name": "__class__"}, {})


def test_a_verbatim_part_is_encoded_once_and_round_trips():
    static = {"layout": [("fp32/0", 3, (0, 12))], "names": ["a", "b"], 7: "int key"}
    verbatim = statecodec.Verbatim(static)
    static["names"].append("changed later")  # the verbatim copy was taken when it was made
    document, tensors = statecodec.encode({"step": 1, "map": verbatim, "other": verbatim})
    assert tensors == {}
    expected = statecodec.encode({"layout": [("fp32/0", 3, (0, 12))], "names": ["a", "b"], 7: "int key"})[0]
    # written out, the verbatim part reads back as the document it was encoded to, wherever it appears
    written = json.loads(statecodec.dumps(document))
    assert written == {"step": 1, "map": expected, "other": expected}
    original = {"layout": [("fp32/0", 3, (0, 12))], "names": ["a", "b"], 7: "int key"}
    assert statecodec.decode(written, {})["map"] == statecodec.decode(document, {})["map"] == original
    with pytest.raises(statecodec.UnsupportedStateError):
        statecodec.Verbatim({"t": torch.zeros(1)})


def test_splicing_verbatim_text_never_touches_the_state_s_own_strings():
    verbatim = statecodec.Verbatim({"k": [1, 2]})
    # strings that look like placeholders stay as they are
    state = {"a": verbatim, "b": ":0", "c": "0:0", "d": ["x", verbatim]}
    document, _ = statecodec.encode(state)
    assert json.loads(statecodec.dumps(document)) == {"a": {"k": [1, 2]}, "b": ":0", "c": "0:0", "d": ["x", {"k": [1, 2]}]}
    with pytest.raises(TypeError, match="not part of an encoded document"):
        statecodec.dumps({"x": object()})


def test_the_fast_paths_hand_every_unusual_value_to_the_full_encoder():
    class Name(str):
        pass

    state = {
        "mixed_keys": {"a": 1, 2: "b"},  # a plain dict until its second key
        "floats": [1.5, math.nan, -math.inf, 2],
        "nested": {"lr": 0.1, "nan": math.nan, "pair": (1, 2.0), "name": Name("x")},
    }
    out = roundtrip(state)
    assert out["mixed_keys"] == {"a": 1, 2: "b"}
    assert out["floats"][0] == 1.5 and math.isnan(out["floats"][1]) and out["floats"][2:] == [-math.inf, 2]
    assert out["nested"]["lr"] == 0.1 and math.isnan(out["nested"]["nan"]) and out["nested"]["pair"] == (1, 2.0)
    assert out["nested"]["name"] == "x" and type(out["nested"]["name"]) is str

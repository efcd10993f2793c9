"""Nested Python state <-> a JSON document plus named tensors, without pickle.

Lightning's checkpoint dict (loops, callbacks, schedulers, data position), RNG states and metric states are nested
containers of plain values and tensors. :func:`encode` turns them into a JSON-compatible document in which every
tensor is replaced by a reference; the tensors themselves travel as raw bytes described by the manifest.
:func:`decode` rebuilds the structure and refuses anything it does not know, so loading a checkpoint can never run
code from it (DESIGN invariant 7).
"""

from __future__ import annotations

import enum
import json
import math
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

TAG = "__otea__"


class UnsupportedStateError(TypeError):
    """A value in the training state has a type that cannot be stored without pickle."""

    def __init__(self, path: str, value: Any) -> None:
        self.path = path
        super().__init__(
            f"cannot store {path} of type {type(value).__module__}.{type(value).__qualname__} without pickle. "
            "Checkpoint state may hold dicts, lists, tuples, str, int, float, bool, None, tensors and numpy arrays; "
            "convert this value in the state_dict()/on_save_checkpoint() that produces it."
        )


_PLAIN = frozenset({int, str, bool, type(None)})
_isfinite = math.isfinite


class Verbatim:
    """A part of the state that does not change between snapshots (for example the parameter map): encoded and
    serialized once here, then placed into every document as is (:func:`dumps` splices its JSON text), so a snapshot
    pays neither for walking it again nor for writing it out again."""

    def __init__(self, value: Any) -> None:
        self.document, tensors = encode(value, tensor_prefix="verbatim/")
        if tensors:
            raise UnsupportedStateError("verbatim", "a value with tensors")
        self.json = json.dumps(self.document, separators=(",", ":"), allow_nan=False)


def dumps(document: Any) -> str:
    """The JSON text of an encoded document; a :class:`Verbatim` part goes in as the text it was serialized to."""
    spliced: list[str] = []
    nonce = uuid.uuid4().hex  # the placeholders cannot collide with a string of the state

    def placeholder(value: Any) -> str:
        if not isinstance(value, Verbatim):
            raise TypeError(f"{type(value).__name__} is not part of an encoded document")
        spliced.append(value.json)
        return f"{nonce}:{len(spliced) - 1}"

    text = json.dumps(document, separators=(",", ":"), allow_nan=False, default=placeholder)
    for i, raw in enumerate(spliced):
        text = text.replace(f'"{nonce}:{i}"', raw, 1)
    return text


class CorruptStateError(ValueError):
    """A stored state document does not have the expected structure."""


def encode(obj: Any, tensor_prefix: str = "state/") -> tuple[Any, dict[str, torch.Tensor]]:
    """Returns ``(document, tensors)``; ``document`` is JSON-serializable and names each tensor it references."""
    tensors: dict[str, torch.Tensor] = {}

    def add_tensor(t: torch.Tensor) -> str:
        name = f"{tensor_prefix}{len(tensors)}"
        tensors[name] = t.detach()
        return name

    # a value's place in the state is a chain (parent, key, style), made into text only for an error message:
    # rendering it for every value cost more than encoding the value
    def enc(value: Any, path: Any) -> Any:
        kind = type(value)
        if kind in _PLAIN:  # exact types first: most of a state is these, and every snapshot walks it
            return value
        if kind is float and _isfinite(value):
            return value
        # plain containers of plain values: their leaves are taken in place, without a call each
        if kind is dict and TAG not in value:
            out = {}
            for k, v in value.items():
                if type(k) is not str:
                    break
                t = type(v)
                out[k] = v if t in _PLAIN or (t is float and _isfinite(v)) else enc(v, (path, k, "item"))
            else:
                return out
        if kind is list:
            return [
                v if (t := type(v)) in _PLAIN or (t is float and _isfinite(v)) else enc(v, (path, i, "index"))
                for i, v in enumerate(value)
            ]
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, Verbatim):
            return value  # serialized as its stored text by dumps()
        if isinstance(value, enum.Enum) and not isinstance(value, (str, int)):
            raise UnsupportedStateError(_render(path), value)
        if isinstance(value, str):
            return str(value)
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            if math.isfinite(value):
                return float(value)
            return {TAG: "float", "repr": repr(float(value))}
        if isinstance(value, torch.Tensor):
            return {TAG: "tensor", "ref": add_tensor(value)}
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise UnsupportedStateError(_render(path), value)
            return {TAG: "ndarray", "ref": add_tensor(torch.from_numpy(np.ascontiguousarray(value)).clone())}
        if isinstance(value, np.generic):
            return {TAG: "npscalar", "dtype": str(value.dtype), "value": enc(value.item(), path)}
        if isinstance(value, torch.dtype):
            return {TAG: "dtype", "name": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {TAG: "device", "name": str(value)}
        if isinstance(value, tuple):
            return {TAG: "tuple", "items": [enc(v, (path, i, "index")) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [enc(v, (path, i, "index")) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            if all(isinstance(k, str) for k in value) and TAG not in value:
                return {str(k): enc(v, (path, k, "item")) for k, v in value.items()}
            return {TAG: "dict", "items": [[enc(k, (path, None, "key")), enc(v, (path, k, "item"))] for k, v in value.items()]}
        if isinstance(value, (set, frozenset)):
            return {TAG: "set", "items": [enc(v, (path, None, "member")) for v in sorted(value, key=repr)]}
        raise UnsupportedStateError(_render(path), value)

    return enc(obj, "state"), tensors


def _render(path: Any) -> str:
    """``state['loops'][0].key`` from the chain :func:`encode` keeps."""
    parts = []
    while isinstance(path, tuple):
        path, key, style = path
        parts.append(f"[{key!r}]" if style == "item" else f"[{key}]" if style == "index" else ".key" if style == "key" else "{}")
    return path + "".join(reversed(parts))


def decode(document: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode`. ``tensors`` maps the reference names to loaded tensors."""

    def tensor(ref: Any) -> torch.Tensor:
        if not isinstance(ref, str) or ref not in tensors:
            raise CorruptStateError(f"state references unknown tensor {ref!r}")
        return tensors[ref]

    def dec(value: Any) -> Any:
        if isinstance(value, list):
            return [dec(v) for v in value]
        if isinstance(value, Verbatim):  # a document not written out yet
            return dec(value.document)
        if not isinstance(value, dict):
            return value
        kind = value.get(TAG)
        if kind is None:
            return {k: dec(v) for k, v in value.items()}
        handler = _DECODERS.get(kind)
        if handler is None:
            raise CorruptStateError(f"unknown state tag {kind!r}")
        return handler(value, dec, tensor)

    return dec(document)


def _decode_ndarray(v: dict, dec: Callable, tensor: Callable) -> np.ndarray:
    return tensor(v["ref"]).numpy().copy()


def _decode_dtype(v: dict, dec: Callable, tensor: Callable) -> torch.dtype:
    dtype = getattr(torch, str(v["name"]), None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptStateError(f"unknown dtype {v['name']!r}")
    return dtype


_DECODERS: dict[str, Callable[[dict, Callable, Callable], Any]] = {
    "float": lambda v, dec, tensor: float(v["repr"]) if v["repr"] in ("nan", "inf", "-inf") else _bad(v),
    "tensor": lambda v, dec, tensor: tensor(v["ref"]),
    "ndarray": _decode_ndarray,
    "npscalar": lambda v, dec, tensor: np.dtype(str(v["dtype"])).type(dec(v["value"])),
    "dtype": _decode_dtype,
    "device": lambda v, dec, tensor: torch.device(str(v["name"])),
    "tuple": lambda v, dec, tensor: tuple(dec(x) for x in v["items"]),
    "dict": lambda v, dec, tensor: {_hashable(dec(k)): dec(x) for k, x in v["items"]},
    "set": lambda v, dec, tensor: {_hashable(dec(x)) for x in v["items"]},
}


def _bad(v: Any) -> Any:
    raise CorruptStateError(f"malformed state value {v!r}")


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    return key

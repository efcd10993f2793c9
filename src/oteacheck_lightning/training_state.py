"""Training state that lives neither in Lightning's checkpoint dict nor in the DeepSpeed engine: the random number
generators and torchmetrics states.

Both are restored at the start of the first iteration after a resume, the same point of the loop at which they
were captured, so that dropout masks, random augmentations on the main process and metric accumulators continue
exactly as in an uninterrupted run.
"""

from __future__ import annotations

import array
import random
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric


RawRng = tuple[Any, Any, Any, Any]


def grab_rng() -> RawRng:
    """The generators' states as their own calls return them: cheap enough for the training thread at the exact
    point of the loop they belong to; :func:`rng_state` turns them into a storable state later, elsewhere."""
    # initialized implies available; torch.cuda.is_available() itself may ask NVML every call (0.27 ms in a
    # Lightning run, which turns on NVML-based checks)
    # the current device's generator asked directly: torch.cuda.get_rng_state parses its device argument and
    # checks the lazy initialization every call
    cuda = torch.cuda.default_generators[torch.cuda.current_device()].get_state() if torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def rng_state(raw: RawRng) -> dict[str, Any]:
    """The state of :func:`grab_rng`'s states. The two Mersenne Twister states (625 and 624 words) are tensors: as
    lists they were about 14 KB of JSON in every snapshot's manifest (int64: every word fits, and the tensor needs
    no unsigned dtype)."""
    (version, internal, gauss), (np_kind, np_keys, np_pos, np_has_gauss, np_gauss), cpu, cuda = raw
    # through a C array of 32-bit words (every word of the state fits): half the time of numpy reading the tuple
    c_words = array.array("I", internal)
    words = np.frombuffer(c_words, dtype=f"u{c_words.itemsize}").astype(np.int64)
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.from_numpy(words), "gauss": gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": cpu,
    }
    if cuda is not None:
        state["cuda"] = cuda
    return state


def collect_rng() -> dict[str, Any]:
    """The generators' states now."""
    return rng_state(grab_rng())


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(_words(py["internal"])), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], np.asarray(_words(npy["keys"]), dtype=np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"].clone())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].clone())


def _words(value: Any) -> Any:
    """A generator state's words: a tensor, or a list in checkpoints written before they were tensors."""
    return value.tolist() if isinstance(value, torch.Tensor) else value


def find_metrics(module: torch.nn.Module) -> dict[str, Metric]:
    """The torchmetrics metrics of ``module``, by their module path."""
    return {name or "<root>": m for name, m in module.named_modules() if isinstance(m, Metric)}



def collect_metrics(module: torch.nn.Module, metrics: dict[str, Metric] | None = None) -> dict[str, Any]:
    """Every torchmetrics state of ``module`` (accumulators, not yet synchronized across ranks). ``metrics``: the
    result of :func:`find_metrics`, found once, so a snapshot does not walk the module tree."""
    out = {}
    for name, metric in (metrics if metrics is not None else find_metrics(module)).items():
        states = {attr: getattr(metric, attr) for attr in metric._defaults}
        out[name] = {"states": states, "update_count": metric._update_count}
    return out


def restore_metrics(module: torch.nn.Module, saved: dict[str, Any]) -> None:
    live = find_metrics(module)
    missing = sorted(set(saved) - set(live))
    if missing:
        raise KeyError(f"checkpoint has metric states for {missing}, which this model does not have")
    for name, entry in saved.items():
        metric = live[name]
        for attr, value in entry["states"].items():
            device = metric.device
            if isinstance(value, torch.Tensor):
                value = value.to(device=device, copy=True)
            elif isinstance(value, list):
                value = [v.to(device=device, copy=True) for v in value]
            setattr(metric, attr, value)
        metric._update_count = entry["update_count"]
        metric._computed = None

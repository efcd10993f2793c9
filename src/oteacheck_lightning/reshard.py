"""Resuming at another world size: each parameter's values gathered from the saved ranks, then cut as this run
partitions them.

Every rank's checkpoint carries a parameter map (:meth:`DeepSpeedState.param_map`): for each master tensor, which
elements of which parameter it holds. The optimizer's per-element states (Adam's moments) are laid out exactly as
their master, so one map places them too. :class:`Assembler` puts the saved partitions together into whole
parameters (``oteacheck export`` uses it for the weights alone). :class:`Repartition` feeds it the saved ranks one at
a time, keeping only the parameters this rank holds now, then cuts them (:func:`resharded_tensors`) into the tensors
this rank's engine holds, named as a checkpoint of this world size names them, so that
:meth:`DeepSpeedState.restore` applies them as it applies any checkpoint.

Values that are not per element (an optimizer's step count) and buffers are the same on every rank: they come from
one saved rank. Alignment padding inside the masters, which no parameter owns, is zero, as DeepSpeed creates it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from . import statecodec
from .format import CheckpointFormatError, load_tensors
from .tiers.base import LoadedRankCheckpoint

MASTER = ""  # the state key of the weights themselves; an optimizer state is keyed by its own name ("exp_avg")


def param_map_of(meta: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The parameter map in a checkpoint's DeepSpeed state, or an error that says the checkpoint predates it."""
    pmap = meta.get("param_map")
    if not isinstance(pmap, dict):
        raise CheckpointFormatError(
            f"{where}: this checkpoint has no parameter map (written by an older oteacheck-lightning), so it cannot "
            "be re-partitioned; resume it with the world size it was written with"
        )
    return pmap


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class Assembler:
    """Whole parameters (and their per-element optimizer states) put together from saved partitions.

    ``wanted`` limits the work to the parameters a caller needs (a rank re-partitioning needs only its own)."""

    def __init__(self, where: str, wanted: set[str] | None = None) -> None:
        self.where = where
        self.wanted = wanted
        self.full: dict[tuple[str, str], torch.Tensor] = {}
        self._covered: dict[tuple[str, str], torch.Tensor] = {}

    def place(self, key: str, entry: Mapping[str, Any], master: torch.Tensor) -> None:
        """Copies the segments ``entry`` names out of ``master`` into parameter ``entry["name"]``'s ``key``."""
        name, shape = entry["name"], entry["shape"]
        if self.wanted is not None and name not in self.wanted:
            return
        numel = _numel(shape)
        target = self.full.get((key, name))
        if target is None:
            target = self.full[(key, name)] = torch.zeros(shape, dtype=master.dtype)
            self._covered[(key, name)] = torch.zeros(numel, dtype=torch.bool)
        flat, source = target.view(-1), master.reshape(-1)
        for start, offset, length in entry["segments"]:
            if start < 0 or offset < 0 or start + length > numel or offset + length > source.numel():
                raise CheckpointFormatError(f"{self.where}: the parameter map of {name!r} does not fit its master")
            flat[start : start + length] = source[offset : offset + length]
            self._covered[(key, name)][start : start + length] = True

    def add_rank(self, pmap: Mapping[str, Any], read: Callable[[str], torch.Tensor],
                 per_element: Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]] | None = None) -> None:
        """Places one saved rank's masters and frozen parameters (``read(name)`` returns its saved tensor), and the
        optimizer states that ``per_element(master name, master)`` returns as (key, tensor) pairs."""
        for group in pmap["groups"]:
            master = read(group["master"])
            for entry in group["params"]:
                self.place(MASTER, entry, master)
            for key, value in per_element(group["master"], master) if per_element is not None else []:
                for entry in group["params"]:
                    self.place(key, entry, value)
        for entry in pmap["frozen"]:
            self.place(MASTER, entry, read(entry["master"]))

    def check_complete(self) -> None:
        incomplete = sorted({name for (_, name), mask in self._covered.items() if not bool(mask.all())})
        if incomplete:
            raise CheckpointFormatError(f"{self.where}: the ranks do not cover every element of {incomplete[:3]}")

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: t for (key, name), t in self.full.items() if key == MASTER}


def add_saved_rank(assembler: Assembler, pmap: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Places one saved rank's decoded tensors, weights and per-element optimizer states (those shaped as their
    master; a step count is not)."""

    def read(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointFormatError(f"{assembler.where}: tensor {name!r} named by the parameter map is missing")
        return tensors[name]

    def per_element(name: str, master: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        prefix = f"optim/{name}/"
        return [(n[len(prefix) :], t) for n, t in tensors.items()
                if n.startswith(prefix) and t.dim() > 0 and t.shape == master.shape]

    assembler.add_rank(pmap, read, per_element)


class Repartition:
    """The saved ranks' checkpoints of one step, taken in one at a time (:meth:`absorb`: only the parameters this
    rank holds now are kept, so the buffers can go), then cut into this rank's tensors (:meth:`tensors`).

    ``pmap`` and ``stage`` are this run's parameter map and ZeRO stage."""

    def __init__(self, pmap: Mapping[str, Any], stage: int) -> None:
        self.pmap, self.stage = pmap, stage
        self.assembler = Assembler("", wanted=wanted_names(pmap))
        self.step: int | None = None
        self.saved_world_size: int | None = None

    def absorb(self, loaded: LoadedRankCheckpoint) -> None:
        manifest = loaded.manifest
        where = f"{loaded.source} (step {manifest.step}, rank {manifest.rank})"
        if self.step is None:
            self.step, self.saved_world_size, self.assembler.where = manifest.step, manifest.world_size, loaded.source
        tensors = load_tensors(manifest, loaded.buffer)
        meta = statecodec.decode(manifest.state["main"]["deepspeed"], tensors)
        if (manifest.step, manifest.world_size, meta["stage"]) != (self.step, self.saved_world_size, self.stage):
            raise CheckpointFormatError(
                f"{where}: step {manifest.step} of {manifest.world_size} ranks at ZeRO stage {meta['stage']}; expected "
                f"step {self.step} of {self.saved_world_size} ranks at this run's ZeRO stage {self.stage}"
            )
        add_saved_rank(self.assembler, param_map_of(meta, where), tensors)

    def tensors(self, live: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor],
                saved_meta: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """See :func:`resharded_tensors`."""
        self.assembler.check_complete()
        return resharded_tensors(self.assembler, self.pmap, live, saved, saved_meta)


def wanted_names(pmap: Mapping[str, Any]) -> set[str]:
    """The parameters of which a rank with parameter map ``pmap`` holds any element."""
    entries = [e for g in pmap["groups"] for e in g["params"]] + list(pmap["frozen"])
    return {e["name"] for e in entries if e["segments"]}


def resharded_tensors(
    assembler: Assembler,
    pmap: Mapping[str, Any],
    live: Mapping[str, torch.Tensor],
    saved: Mapping[str, torch.Tensor],
    saved_meta: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's checkpoint tensors and DeepSpeed state at the current partitioning: ``pmap`` is this run's
    parameter map, ``live`` this rank's current tensors by checkpoint name (for shapes and dtypes), ``saved`` and
    ``saved_meta`` one saved rank's tensors and DeepSpeed state (for what every rank shares)."""
    per_element_keys = sorted({key for key, _ in assembler.full if key != MASTER})
    saved_masters = list(saved_meta["layout"])
    out: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    devices: dict[str, str] = {}
    for index, group in enumerate(pmap["groups"]):
        name = group["master"]
        # what every group shares (a step count): from the saved group at the same place, else the first
        twin = saved_masters[index] if index < len(saved_masters) else saved_masters[0]
        for key in [MASTER, *per_element_keys]:
            tensor = torch.zeros(live[name].shape, dtype=live[name].dtype if key == MASTER else _dtype(saved, twin, key))
            for entry in group["params"]:
                _fill(tensor, entry, assembler, key)
            out[name if key == MASTER else f"optim/{name}/{key}"] = tensor
        prefix = f"optim/{twin}/"
        for tname, value in saved.items():
            key = tname[len(prefix) :]
            if tname.startswith(prefix) and key not in per_element_keys:
                out[f"optim/{name}/{key}"] = value.clone()
        if twin in saved_meta["optim_scalars"]:
            scalars[name] = dict(saved_meta["optim_scalars"][twin])
        for key, device in saved_meta["optim_devices"].items():
            if key.startswith(f"{twin}/"):
                devices[f"{name}/{key[len(twin) + 1 :]}"] = device
    for entry in pmap["frozen"]:
        tensor = torch.zeros(live[entry["master"]].shape, dtype=live[entry["master"]].dtype)
        _fill(tensor, entry, assembler, MASTER)
        out[entry["master"]] = tensor
    for name in pmap["buffers"]:
        out[f"buffer/{name}"] = saved[f"buffer/{name}"].clone()
    meta = dict(saved_meta)
    meta.update(layout={g["master"]: list(live[g["master"]].shape) for g in pmap["groups"]},
                optim_scalars=scalars, optim_devices=devices, param_map=pmap)
    return out, meta


def _dtype(saved: Mapping[str, torch.Tensor], master: str, key: str) -> torch.dtype:
    t = saved.get(f"optim/{master}/{key}")
    return t.dtype if t is not None else torch.float32


def _fill(tensor: torch.Tensor, entry: Mapping[str, Any], assembler: Assembler, key: str) -> None:
    if not entry["segments"]:
        return
    full = assembler.full.get((key, entry["name"]))
    if full is None:
        raise CheckpointFormatError(f"{assembler.where}: no saved rank holds {key or 'the weights'} of {entry['name']!r}")
    flat, source = tensor.view(-1), full.reshape(-1)
    for start, offset, length in entry["segments"]:
        flat[offset : offset + length] = source[start : start + length]

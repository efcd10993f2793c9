"""The only module that knows DeepSpeed's internals: this rank's checkpoint tensors for ZeRO stages 0 to 3.

A rank's training state under DeepSpeed is, per stage:

* ZeRO 1/2: the fp32 master partition of each parameter group (``single_partition_of_fp32_groups``) and the
  optimizer state keyed by it; the 16-bit (or fp32) model weights are a cast of the masters, all-gathered.
* ZeRO 3: the fp32 master partition of each sub-group (``fp32_partitioned_groups_flat``) and its optimizer state;
  the parameters themselves are partitions (``ds_tensor``) refreshed from the masters.
* ZeRO 0 with fp32 weights: the parameters are the masters, keyed directly in the optimizer state.

Plus, for every stage: persistent module buffers, frozen parameters, the loss scaler and DeepSpeed's step counters.

:meth:`DeepSpeedState.tensors` returns *references* to the live tensors (the copy engine copies them);
:meth:`DeepSpeedState.restore` writes saved values back in place and refreshes the model weights from the
masters, so a resumed engine is bit-identical to the one that was saved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .statecodec import Verbatim

SUPPORTED_STAGES = (0, 1, 2, 3)


class UnsupportedEngineError(RuntimeError):
    """The DeepSpeed configuration is one that OTeaCheck cannot snapshot (yet)."""


def _persistent_buffer_slots(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """Where the persistent buffers live: (full name, owning module, attribute)."""
    out = []
    for prefix, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                out.append((f"{prefix}.{name}" if prefix else name, sub, name))
    return out


def _persistent_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(full, sub._buffers[name]) for full, sub, name in _persistent_buffer_slots(module)]


def _group_rank(group: Any) -> int:
    import torch.distributed as dist

    return dist.get_rank(group=group) if dist.is_available() and dist.is_initialized() else 0


def _zero3_entry(name: str, param: Any, offset: int, group_rank: int) -> dict[str, Any]:
    """ZeRO 3 keeps elements ``[rank * p, (rank + 1) * p)`` of every flattened parameter (``p`` = partition size,
    the last partition padded); they sit at ``offset`` in the sub-group's flat master."""
    part = int(param.ds_tensor.ds_numel)
    numel = int(param.ds_numel)
    start = group_rank * part
    length = max(0, min(part, numel - start))
    return {"name": name, "shape": list(param.ds_shape), "segments": [[start, offset, length]] if length else []}


class DeepSpeedState:
    """Enumerates and restores this rank's part of a :class:`deepspeed.DeepSpeedEngine`'s training state."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        if self.stage not in SUPPORTED_STAGES:
            raise UnsupportedEngineError(f"ZeRO stage {self.stage} is not supported")
        self.optimizer = engine.optimizer
        if self.optimizer is None:
            raise UnsupportedEngineError("the DeepSpeed engine has no optimizer; OTeaCheck snapshots training runs")
        if self.stage == 3 and getattr(self.optimizer, "swap_optimizer", False):
            raise UnsupportedEngineError(
                "ZeRO-3 with NVMe optimizer offload is not supported: the optimizer state is not in memory. "
                "Use offload_optimizer_device='cpu' or no offload."
            )
        if self.stage == 0 and hasattr(self.optimizer, "optimizer"):
            raise UnsupportedEngineError(
                f"ZeRO stage 0 with {type(self.optimizer).__name__} (16-bit training without ZeRO) is not supported; "
                "use stage 1, 2 or 3 for bf16/fp16 training, or fp32 weights with stage 0."
            )
        self.base = self.optimizer.optimizer if self.stage > 0 else self.optimizer
        self.module: torch.nn.Module = engine.module

    # --- what to copy -------------------------------------------------------------------------------------

    def masters(self) -> list[tuple[str, torch.Tensor]]:
        """The tensors the base optimizer updates, named by stage and group."""
        if self.stage in (1, 2):
            return [(f"fp32/{i}", t) for i, t in enumerate(self.optimizer.single_partition_of_fp32_groups)]
        if self.stage == 3:
            return [(f"fp32/{i}", t) for i, t in enumerate(self.optimizer.fp32_partitioned_groups_flat)]
        return [(f"param/{n}", p) for n, p in self.module.named_parameters() if p.requires_grad]

    def _frozen(self) -> list[tuple[str, torch.Tensor]]:
        # the module's structure is fixed once DeepSpeed wrapped it: walk it once, not at every snapshot
        if getattr(self, "_frozen_params", None) is None:
            self._frozen_params = [(n, p) for n, p in self.module.named_parameters() if not p.requires_grad]
        frozen = self._frozen_params
        if self.stage == 3:
            return [(f"frozen/{n}", p.ds_tensor) for n, p in frozen if hasattr(p, "ds_tensor")]
        return [(f"frozen/{n}", p.data) for n, p in frozen]

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """References to every tensor of this rank's state, masters first (they are final once the step ends)."""
        out = [(name, t.data) for name, t in self.masters()]
        for name, master in self.masters():
            for key, value in sorted(self.base.state.get(master, {}).items()):
                if isinstance(value, torch.Tensor):
                    out.append((f"optim/{name}/{key}", value))
        out += self._frozen()
        out += self.step_boundary_tensors()
        return out

    def skipped_updates(self) -> int:
        """How many optimizer steps DeepSpeed skipped without updating the state (fp16 overflows, gradient norms
        that are not finite): the engine counts them once its step returns."""
        return int(getattr(self.engine, "skipped_steps", 0) or 0)

    def bucket_elements(self) -> int | None:
        """DeepSpeed's gradient bucket size in elements (``reduce_bucket_size``), the plan's cut points."""
        if self.stage == 0:
            return None
        try:
            return int(self.engine.zero_reduce_bucket_size())
        except (AttributeError, TypeError, ValueError):
            return None

    def device(self) -> torch.device:
        """Where the masters live (a GPU, or the CPU in CPU runs)."""
        masters = [t for _, t in self.masters()]
        return next((t.device for t in masters if t.is_cuda), masters[0].device if masters else torch.device("cpu"))

    def step_boundary_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Tensors that change during forward (BatchNorm statistics and other buffers): captured at the step
        boundary, never ahead."""
        if getattr(self, "_buffer_slots", None) is None:
            # the names made once: per snapshot, formatting hundreds of them cost the step boundary 0.1 ms
            self._buffer_slots = [(f"buffer/{full}", sub._buffers, name) for full, sub, name in _persistent_buffer_slots(self.module)]
        # looked up each time: a module may assign a new tensor to a buffer attribute
        return [(full, buffers[name]) for full, buffers, name in self._buffer_slots]

    def param_map(self) -> dict[str, Any]:
        """Where each parameter's values lie in this rank's masters, so that the fp32 weights can be rebuilt
        offline from the checkpoints of all ranks without DeepSpeed (``oteacheck export``).

        Every parameter is described by the segments of its flattened values that this rank holds: ``start``
        (index into the flattened parameter), ``offset`` (index into the master tensor) and ``length``. ZeRO 1/2
        cut each group's flat buffer (parameters back to back, with alignment padding) into one partition per rank,
        so a parameter may be split between ranks; ZeRO 3 cuts every parameter into equal padded partitions; stage
        0 holds every parameter whole. ``aliases`` names tied parameters and buffers (one tensor, several names).
        """
        names = {id(p): n for n, p in self.module.named_parameters()}
        groups: list[dict[str, Any]] = []
        if self.stage in (1, 2):
            opt = self.optimizer
            for i, master in enumerate(opt.single_partition_of_fp32_groups):
                group_rank = _group_rank(opt.real_dp_process_group[i])
                partitions = [int(t.numel()) for t in opt.parallel_partitioned_bit16_groups[i]]
                begin = sum(partitions[:group_rank])
                end = begin + partitions[group_rank]
                params = opt.round_robin_bit16_groups[i]
                offsets = getattr(opt, "round_robin_bit16_offsets", None)
                if offsets is not None:
                    offsets = offsets[i]
                else:  # DeepSpeed versions without per-parameter alignment: parameters back to back
                    offsets = [sum(int(q.numel()) for q in params[:k]) for k in range(len(params))]
                entries = []
                for param, flat_start in zip(params, offsets):
                    numel = int(getattr(param, "ds_numel", param.numel()))
                    lo, hi = max(begin, flat_start), min(end, flat_start + numel)
                    segments = [[lo - flat_start, lo - begin, hi - lo]] if hi > lo else []
                    entries.append({"name": names[id(param)], "shape": list(param.shape), "segments": segments})
                groups.append({"master": f"fp32/{i}", "partition_rank": group_rank, "partition_count": len(partitions),
                               "partition_numel": int(master.numel()), "padding": int(opt.groups_padding[i]),
                               "params": entries})
        elif self.stage == 3:
            opt = self.optimizer
            for i, sub_group in enumerate(opt.fp16_groups):
                offset, entries = 0, []
                group_rank = _group_rank(opt.sub_group_process_groups[i]) if hasattr(opt, "sub_group_process_groups") else _group_rank(None)
                for param in sub_group:
                    entries.append(_zero3_entry(names[id(param)], param, offset, group_rank))
                    offset += int(param.ds_tensor.ds_numel)
                groups.append({"master": f"fp32/{i}", "partition_rank": group_rank,
                               "partition_count": int(opt.sub_group_partition_counts[i]) if hasattr(opt, "sub_group_partition_counts") else None,
                               "partition_numel": offset, "padding": int(opt.fp32_partitioned_groups_flat[i].numel()) - offset,
                               "params": entries})
        else:
            for name, param in self.masters():
                groups.append({"master": name, "partition_rank": 0, "partition_count": 1,
                               "partition_numel": int(param.numel()), "padding": 0,
                               "params": [{"name": name[len("param/"):], "shape": list(param.shape),
                                           "segments": [[0, 0, int(param.numel())]]}]})
        frozen = []
        for name, param in self.module.named_parameters():
            if param.requires_grad:
                continue
            if self.stage == 3 and hasattr(param, "ds_tensor"):
                frozen.append({"master": f"frozen/{name}", **_zero3_entry(name, param, 0, _group_rank(getattr(param, "ds_process_group", None)))})
            else:
                frozen.append({"master": f"frozen/{name}", "name": name, "shape": list(param.shape),
                               "segments": [[0, 0, int(param.numel())]]})
        aliases = {}
        for kind in ("named_parameters", "named_buffers"):
            first: dict[int, str] = {}
            for name, t in getattr(self.module, kind)(remove_duplicate=False):
                if t is None:
                    continue
                if id(t) in first:
                    aliases[name] = first[id(t)]
                else:
                    first[id(t)] = name
        return {"groups": groups, "frozen": frozen, "aliases": aliases,
                "buffers": [n for n, _ in _persistent_buffers(self.module)]}

    def _cached_param_map(self) -> Verbatim:
        # fixed once the engine exists; meta() runs at every snapshot
        if getattr(self, "_param_map", None) is None:
            self._param_map = Verbatim(self.param_map())
        return self._param_map

    def meta(self) -> dict[str, Any]:
        """The non-tensor part of the state: optimizer hyperparameters and scalars, loss scale, counters."""
        optim_scalars: dict[str, dict[str, Any]] = {}
        optim_devices: dict[str, str] = {}
        for name, master in self.masters():
            for key, value in self.base.state.get(master, {}).items():
                if isinstance(value, torch.Tensor):
                    optim_devices[f"{name}/{key}"] = value.device.type
                else:
                    optim_scalars.setdefault(name, {})[key] = value
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.base.param_groups]
        scaler = getattr(self.optimizer, "loss_scaler", None)
        scaler_state = (
            {k: v for k, v in vars(scaler).items() if isinstance(v, (int, float, bool))} if scaler is not None else None
        )
        e = self.engine
        return {
            "stage": self.stage,
            "layout": {name: list(t.shape) for name, t in self.masters()},
            "param_map": self._cached_param_map(),
            "param_groups": groups,
            "optim_scalars": optim_scalars,
            "optim_devices": optim_devices,
            "loss_scaler": scaler_state,
            "dynamic_loss_scale": getattr(self.optimizer, "dynamic_loss_scale", None),
            "counters": {
                "global_steps": e.global_steps,
                "global_samples": e.global_samples,
                "skipped_steps": e.skipped_steps,
                "micro_steps": e.micro_steps,
            },
        }

    # --- restore -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Writes a saved state back into the live engine. Runs collectives (ZeRO 1/2 all-gather the refreshed
        weights), so every rank must call it."""
        if meta["stage"] != self.stage:
            raise UnsupportedEngineError(
                f"checkpoint was taken with ZeRO stage {meta['stage']}, this run uses stage {self.stage}"
            )
        layout = {name: list(t.shape) for name, t in self.masters()}
        if layout != meta["layout"]:
            raise UnsupportedEngineError(
                "checkpoint partition layout differs from this run's (different world size, parameter set or "
                "ZeRO bucket settings?). Resume with the same world size and DeepSpeed configuration."
            )
        for name, master in self.masters():
            master.data.copy_(tensors[name])
            state = self.base.state[master]
            state.clear()
            prefix = f"optim/{name}/"
            for tname, value in tensors.items():
                if tname.startswith(prefix):
                    key = tname[len(prefix) :]
                    device = master.device if meta["optim_devices"].get(f"{name}/{key}") != "cpu" else "cpu"
                    state[key] = value.to(device=device, copy=True)
            state.update(meta["optim_scalars"].get(name, {}))
            if not state:
                del self.base.state[master]
        for group, saved in zip(self.base.param_groups, meta["param_groups"]):
            for key, value in saved.items():
                group[key] = value
        for name, t in self._frozen():
            t.copy_(tensors[name])
        for name, b in _persistent_buffers(self.module):
            b.copy_(tensors[f"buffer/{name}"])
        if meta.get("loss_scaler") is not None and getattr(self.optimizer, "loss_scaler", None) is not None:
            for key, value in meta["loss_scaler"].items():
                setattr(self.optimizer.loss_scaler, key, value)
        for key, value in meta["counters"].items():
            setattr(self.engine, key, value)
        self._refresh_model_weights()

    def _refresh_model_weights(self) -> None:
        """Recomputes the model's weights from the restored masters, as the optimizer step does."""
        if self.stage in (1, 2):
            self.optimizer.update_lp_params()
            for i in range(len(self.optimizer.bit16_groups)):
                self.optimizer._update_model_bit16_weights(i)
        elif self.stage == 3:
            opt = self.optimizer
            for i, fp32 in enumerate(opt.fp32_partitioned_groups_flat):
                if fp32.numel() > 0:
                    opt.fp16_partitioned_groups_flat[i].data.copy_(fp32.data)
            for i, flat in enumerate(opt.fp16_partitioned_groups_flat):
                for param, view in zip(opt.fp16_partitioned_groups[i], opt.unflatten(flat, opt.fp16_partitioned_groups[i])):
                    param.data = view.data


def install_update_hook(base_optimizer: Any, on_update: Any) -> Any | None:
    """Calls ``on_update()`` right before each call of the base optimizer's ``step`` (the update of the fp32 masters
    and optimizer states), through PyTorch's step pre-hooks. Returns the hook's handle, or None where the optimizer
    runs no such hooks (not a :class:`torch.optim.Optimizer` whose ``step`` PyTorch wrapped)."""
    register = getattr(base_optimizer, "register_step_pre_hook", None)
    if register is None or not getattr(type(base_optimizer).step, "hooked", False):
        return None

    def before_step(optimizer: Any, args: Any, kwargs: Any) -> None:  # a pre-hook returns None or new arguments
        on_update()

    return register(before_step)


def install_bucket_hook(engine: Any, on_bucket: Any) -> bool:
    """Calls ``on_bucket(k)`` after DeepSpeed reduces its k-th gradient bucket of a backward pass.

    ZeRO 2 and 3 reduce gradients bucket by bucket during backward (``reduce_bucket_size``); those are the
    boundaries the copy scheduler plans around. Returns False when the stage has no per-bucket reduction
    (ZeRO 0/1 reduce once after backward).
    """
    optimizer = engine.optimizer
    stage = int(engine.zero_optimization_stage())
    if stage == 2:
        name = "reduce_ipg_grads"
    elif stage == 3:
        name = "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads"
    else:
        return False
    original = getattr(optimizer, name, None)
    if original is None:
        return False
    counter = {"k": 0, "micro_step": -1}

    def reduce_and_announce(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if counter["micro_step"] != engine.micro_steps:
            counter["micro_step"], counter["k"] = engine.micro_steps, 0
        on_bucket(counter["k"])
        counter["k"] += 1
        return result

    # an instance attribute shadows the method, so DeepSpeed's own calls go through the wrapper
    setattr(optimizer, name, reduce_and_announce)
    return True

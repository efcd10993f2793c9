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

SUPPORTED_STAGES = (0, 1, 2, 3)


class UnsupportedEngineError(RuntimeError):
    """The DeepSpeed configuration is one that OTeaCheck cannot snapshot (yet)."""


def _persistent_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for prefix, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                out.append((f"{prefix}.{name}" if prefix else name, buf))
    return out


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
        frozen = [(n, p) for n, p in self.module.named_parameters() if not p.requires_grad]
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
        out += [(f"buffer/{n}", b) for n, b in _persistent_buffers(self.module)]
        return out

    def step_boundary_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Tensors that change during forward (BatchNorm statistics and other buffers): captured at the step
        boundary, never ahead."""
        return [(f"buffer/{n}", b) for n, b in _persistent_buffers(self.module)]

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

"""``OTeaCheckStrategy``: Lightning's DeepSpeed strategy with every-iteration checkpoints.

Compared with :class:`~lightning.pytorch.strategies.DeepSpeedStrategy` it

* runs on CUDA (NCCL) and on CPU (DeepSpeed's CPU accelerator with gloo), so ZeRO 1-3 run in CI without a GPU;
* emits the iteration's phase events on :attr:`OTeaCheckStrategy.bus` (see :mod:`oteacheck_lightning.bubbles`);
* routes every save and load through its checkpoint IO plugin, :class:`~oteacheck_lightning.OTeaCheckpointIO`
  (Lightning's DeepSpeed strategy bypasses CheckpointIO plugins);
* resolves ``ckpt_path="last"`` to the freshest snapshot complete on every rank, across memory and disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import uuid
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.launcher import _Launcher
from torch.optim import Optimizer

from . import loader_position
from .bubbles import BubbleBus, Phase, find_blocks, install_block_hooks
from .deepspeed_state import DeepSpeedState, install_bucket_hook, install_update_hook
from .io import PRIVATE_KEY, OTeaCheckpointIO
from .lightning_state import LightningStateDump
from .recovery import CheckpointsExistError
from .scheduler import WindowKey
from .tiers import CheckpointDir
from .training_state import restore_metrics, restore_rng

log = logging.getLogger(__name__)

COMMIT_MARKER = "COMMIT"


def match_norm_buffers_to_parameters(config: dict[str, Any], model: torch.nn.Module) -> str | None:
    """DeepSpeed 0.19 casts only the parameters to bf16/fp16 and keeps buffers as loaded, so a batch norm meets
    bf16 weights with fp32 running statistics and fails ("expected scalar type BFloat16 but found Float"). For
    models with batch norm, and unless ``config`` sets ``data_types.buffer_dtype``, this sets it to the training
    dtype, as earlier DeepSpeed versions (which ignore the setting) behaved. Returns the dtype set, or None."""
    dtype = "bf16" if (config.get("bf16") or {}).get("enabled") else "fp16" if (config.get("fp16") or {}).get("enabled") else None
    data_types = config.get("data_types") or {}
    if dtype is None or "buffer_dtype" in data_types:
        return None
    if not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in model.modules()):
        return None
    config["data_types"] = {**data_types, "buffer_dtype": dtype}
    return dtype


def _is_checkpoint_folder(url: str, storage_options: dict[str, Any]) -> bool:
    """Whether ``url`` is one committed checkpoint folder; ``False`` where it cannot be read (a tier that is down:
    recovery then lists it and stops with the cause)."""
    try:
        return CheckpointDir.from_url(url, **storage_options).is_committed()
    except Exception:
        return False


def _resume_last_batch_as_mid_epoch(checkpoint: dict[str, Any]) -> None:
    """A checkpoint taken after the last batch of an epoch, before the epoch's end hooks ran, resumes one epoch
    late in Lightning (2.6): the restarted epoch counts as completed twice, so the sampler of the next epoch is
    seeded with the wrong epoch and the data order changes. Marking the batch as not the last makes Lightning
    resume mid-epoch instead: it finds the loader exhausted and ends the epoch once, as the interrupted run did."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    batches, epochs = fit_loop.get("epoch_loop.batch_progress"), fit_loop.get("epoch_progress")
    if not isinstance(batches, dict) or not isinstance(epochs, dict):
        return
    current = epochs.get("current", {})
    if batches.get("is_last_batch") and current.get("processed", 0) < current.get("started", 0):
        batches["is_last_batch"] = False


class _NoCheckpoint(dict):
    """What ``load_checkpoint`` returns when there is nothing to resume from: Lightning's loader needs the version
    key, and skips every restore step for a falsy checkpoint, so training starts fresh."""

    def __bool__(self) -> bool:
        return False


class _EnsureCallbackLauncher(_Launcher):
    """Wraps the strategy's launcher to add an ``OTeaCheckpoint`` callback before ``fit`` resolves
    ``ckpt_path="last"``: that happens before any strategy hook sees the trainer."""

    def __init__(self, inner: _Launcher | None, strategy: OTeaCheckStrategy) -> None:
        self.inner = inner
        self.strategy = strategy

    @property
    def is_interactive_compatible(self) -> bool:
        return self.inner.is_interactive_compatible if self.inner is not None else True

    def launch(self, function: Callable, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        if trainer is not None:
            self.strategy.ensure_checkpoint_callback(trainer)
        if self.inner is not None:
            return self.inner.launch(function, *args, trainer=trainer, **kwargs)
        return function(*args, **kwargs)

    def kill(self, signum: Any) -> None:
        if self.inner is not None:
            self.inner.kill(signum)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class OTeaCheckStrategy(DeepSpeedStrategy):
    """DeepSpeed training with an in-memory checkpoint of every iteration.

    Takes every argument of :class:`~lightning.pytorch.strategies.DeepSpeedStrategy` (``stage``, ``config``,
    ``offload_optimizer``, ``reduce_bucket_size``, ...), plus:

    Args:
        checkpoint_io: the :class:`OTeaCheckpointIO` to use (default: one with default settings). It can also be
            given as ``Trainer(plugins=[OTeaCheckpointIO(...)])``.
    """

    strategy_name = "oteacheck"

    def __init__(self, *args: Any, checkpoint_io: OTeaCheckpointIO | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if checkpoint_io is not None:
            self.checkpoint_io = checkpoint_io
        self.bus = BubbleBus()
        self._ds_state: DeepSpeedState | None = None
        self._restore_at_next_iteration: tuple[dict, dict] | None = None
        self.resumed_from: dict[str, Any] | None = None
        self._asked_to_resume = False  # this fit was given a ckpt_path (load_checkpoint ran)
        self._in_training_forward = False
        # set per iteration: the block events the checkpoint IO needs (None: all of them)
        self._block_windows: frozenset[WindowKey] | None = None
        self._iteration_step = 0
        self._hooks: list[Any] = []  # handles of the block hooks and the optimizer hook, removed at teardown
        self._dump: LightningStateDump | None = None  # Lightning's checkpoint dict, taken at every snapshot

    # --- the checkpoint IO ---------------------------------------------------------------------------------

    @property
    def checkpoint_io(self) -> OTeaCheckpointIO:
        if self._checkpoint_io is None:
            self._checkpoint_io = OTeaCheckpointIO()
        return self._checkpoint_io  # type: ignore[return-value]

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO | None) -> None:
        if io is not None and not isinstance(io, OTeaCheckpointIO):
            raise TypeError(
                f"OTeaCheckStrategy saves through OTeaCheckpointIO, got {type(io).__name__}. "
                "Remove the other CheckpointIO plugin or pass OTeaCheckpointIO(...)."
            )
        self._checkpoint_io = io

    def ensure_checkpoint_callback(self, trainer: pl.Trainer) -> None:
        from .callback import OTeaCheckpoint

        if not any(isinstance(cb, OTeaCheckpoint) for cb in trainer.callbacks):
            trainer.callbacks.append(OTeaCheckpoint())

    # --- CPU and CUDA ----------------------------------------------------------------------------------------

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        self._launcher = _EnsureCallbackLauncher(self._launcher, self)

    def setup_environment(self) -> None:
        if not isinstance(self.accelerator, (CUDAAccelerator, CPUAccelerator)):
            raise RuntimeError(
                f"OTeaCheckStrategy runs on CUDA GPUs or on CPU, not on {type(self.accelerator).__name__}"
            )
        if isinstance(self.accelerator, CPUAccelerator):
            # DeepSpeed picks its accelerator once per process; on CPU it must be the CPU one (gloo)
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if self.lightning_module is not None:
            self.ensure_checkpoint_callback(self.lightning_module.trainer)
        # skip DeepSpeedStrategy's CUDA-only check, keep the rest of the DDP set-up
        super(DeepSpeedStrategy, self).setup_environment()

    def setup_distributed(self) -> None:
        if isinstance(self.accelerator, CPUAccelerator):
            # CPU devices have no index to validate against the local rank
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()
        else:
            super().setup_distributed()

    def _without_device_synchronize(self) -> None:
        """DeepSpeed's throughput timer synchronizes the whole device at every forward and step by default. A
        device-wide synchronize also waits for the snapshot copy stream, so it would turn every copy into a stall
        (measured on an H200, GPT-2 355M: the forward waited 75 ms for the snapshot). The timer then measures host
        time instead; a configuration that asks for synchronized timers keeps them, with a warning."""
        timers = self.config.setdefault("timers", {}).setdefault("throughput", {})
        if timers.get("synchronized") is True or self.config.get("wall_clock_breakdown") is True:
            pl.utilities.rank_zero_warn(
                "the DeepSpeed configuration synchronizes the device for its timers (timers.throughput.synchronized "
                "or wall_clock_breakdown); every such synchronize waits for the snapshot copies and stalls training. "
                "Remove these settings unless you are profiling."
            )
        else:
            timers["synchronized"] = False

    def _norm_buffers_follow_parameters(self, model: torch.nn.Module) -> None:
        dtype = match_norm_buffers_to_parameters(self.config, model)
        if dtype is not None:
            pl.utilities.rank_zero_info(
                f"batch norm under {dtype}: DeepSpeed's data_types.buffer_dtype set to {dtype} so the running "
                "statistics match the weights; set data_types.buffer_dtype in the DeepSpeed configuration to choose otherwise"
            )

    def _setup_model_and_optimizer(self, model: torch.nn.Module, optimizer: Optimizer | None, lr_scheduler: Any = None) -> tuple[Any, Any]:
        import deepspeed

        self._without_device_synchronize()
        self._norm_buffers_follow_parameters(model)

        device_rank = self.root_device.index if self.root_device.index is not None else self.local_rank
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=device_rank),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != "fit":
            return
        self._ds_state = DeepSpeedState(self.deepspeed_engine)
        self._asked_to_resume = False
        # one id and start for this run's manifests on every rank
        run_id, run_began = self.broadcast([uuid.uuid4().hex, time.time()])
        self.checkpoint_io.attach(self._ds_state, self.lightning_module, self.global_rank, self.world_size, run_id, run_began)
        self.bus.subscribe(self.checkpoint_io.on_phase)
        install_bucket_hook(self.deepspeed_engine, lambda k: self.bus.emit(Phase.BUCKET_REDUCED, self._iteration_step, bucket=k))
        update = install_update_hook(self._ds_state.base, lambda: self.bus.emit(Phase.BEFORE_UPDATE, self._iteration_step))
        self.checkpoint_io.fence_at_update(update is not None)
        self._hooks = install_block_hooks(
            find_blocks(self.lightning_module),
            on_forward=lambda i: self.bus.emit(Phase.FORWARD_BLOCK, self._iteration_step, block=i),
            on_backward=lambda i: self.bus.emit(Phase.BACKWARD_BLOCK, self._iteration_step, block=i),
            wanted=self._wants_block,
        )
        if update is not None:
            self._hooks.append(update)

    def _wants_block(self, phase: Phase, block: int) -> bool:
        windows = self._block_windows
        return self._in_training_forward and (windows is None or (phase, block) in windows)

    def _step(self) -> int:
        return self.lightning_module.trainer.global_step if self.lightning_module is not None else 0

    # --- phase events ----------------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        super().on_train_start()
        if not self._asked_to_resume:
            self._refuse_to_train_over_checkpoints()
        loader_position.track(self.lightning_module.trainer)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self._restore_at_next_iteration is not None:
            rng, metrics = self._restore_at_next_iteration
            self._restore_at_next_iteration = None
            restore_rng(rng)
            restore_metrics(self.lightning_module, metrics)
        # read once per iteration: the events of an iteration carry the step it works towards, and the trainer's
        # property chain costs more than the rest of an event
        self._iteration_step = self._step()
        self.bus.emit(Phase.ITERATION_START, self._iteration_step, batch_idx=batch_idx)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self.bus.emit(Phase.FORWARD_START, self._iteration_step)
        self._block_windows = self.checkpoint_io.block_windows()
        self._in_training_forward = True
        try:
            out = super().training_step(*args, **kwargs)
        finally:
            self._in_training_forward = False
        self.bus.emit(Phase.FORWARD_END, self._iteration_step)
        return out

    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = super().backward(closure_loss, optimizer, *args, **kwargs)
        self.bus.emit(Phase.BACKWARD_END, self._iteration_step)
        return out

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        # Lightning calls this for every batch and DeepSpeed steps at the last one of each accumulation window.
        # Asked before DeepSpeed's step: the answer depends on its micro-step counter, which the step advances (asked
        # after it, AFTER_STEP came after every other micro-batch instead of after the update)
        boundary = self.deepspeed_engine.is_gradient_accumulation_boundary()

        def closure_then_fence() -> Any:
            result = closure()
            if boundary:
                self.bus.emit(Phase.BEFORE_STEP, self._iteration_step)
            return result

        out = super().optimizer_step(optimizer, closure_then_fence, model, **kwargs)
        if boundary:
            self.bus.emit(Phase.AFTER_STEP, self._iteration_step)
        return out

    # --- snapshots -------------------------------------------------------------------------------------------

    def take_snapshot(self) -> bool:
        """Captures the state right after the optimizer step that just ended (call from ``on_train_batch_end``)."""
        trainer = self.lightning_module.trainer
        if self._dump is None or self._dump.trainer is not trainer:
            self._dump = LightningStateDump(trainer)
        state = self._dump()
        loader_position.correct(state, trainer)
        return self.checkpoint_io.capture(trainer.global_step, state)

    # the weights and optimizer states are in the engine's tensors, which the checkpoint IO stores itself
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        return {}

    # --- save / load through the checkpoint IO ------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict, filepath: _PATH, storage_options: Any | None = None) -> None:
        """Writes a durable checkpoint folder at ``filepath``: every rank its part, then rank 0 the commit marker."""
        filepath = self.broadcast(str(filepath))
        checkpoint = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        if self.lightning_module is not None:
            loader_position.correct(checkpoint, self.lightning_module.trainer)
        self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options)
        self.barrier("oteacheck_save_checkpoint")
        if self.is_global_zero:
            info = {"step": int(checkpoint.get("global_step", -1)), "world_size": self.world_size}
            CheckpointDir.from_url(filepath).write_marker(COMMIT_MARKER, json.dumps(info).encode())
        self.barrier("oteacheck_save_checkpoint_committed")

    def remove_checkpoint(self, filepath: _PATH) -> None:
        directory = CheckpointDir.from_url(filepath)
        if self.is_global_zero:
            try:
                directory.fs.rm(f"{directory.path}/{COMMIT_MARKER}")
            except FileNotFoundError:
                pass
            directory.remove_ranks_from(self.world_size)  # written before a resume with fewer ranks
        self.checkpoint_io.remove_checkpoint(filepath)

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        return self.all_gather(tensor.to(self.root_device)).cpu()

    def _refuse_to_train_over_checkpoints(self) -> None:
        """A fit without ``ckpt_path`` stops, on every rank alike (a collective), before its first snapshot where
        this job's tiers already hold checkpoints: nothing of them is written over or removed."""
        io = self.checkpoint_io
        step, where = io.newest_held()
        found = self._gather(torch.tensor([step], dtype=torch.int64)).view(-1).tolist()
        newest = max(found)
        if newest < 0:
            return
        holder = found.index(newest)
        place = where if holder == self.global_rank else f"a tier of rank {holder}"
        raise CheckpointsExistError(
            f"this fit was started without ckpt_path, but its checkpoint folder {io.root} already holds checkpoints "
            f"(the newest: step {newest}, in {place}). Training from step 0 there would mix two runs: the persisted "
            "steps' retention would remove this run's steps as older than the earlier run's, and ckpt_path=\"last\" "
            "would go back to the earlier run. To continue it, pass ckpt_path=\"last\". To start over, give "
            "OTeaCheckpoint another dirpath, or first remove the earlier run's checkpoints (the folders of its "
            f"persistent tiers, and its in-memory snapshots: oteacheck memory --remove {io.job_id})."
        )

    def _every_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (a collective): the ranks then take the same path."""
        return bool(self._gather(torch.tensor([int(flag)], dtype=torch.int64)).min().item())

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Loads ``checkpoint_path`` (or, for ``"last"``, recovers) and restores the engine in place."""
        from .callback import OTeaCheckpoint

        self._asked_to_resume = True
        path = str(checkpoint_path)
        trainer = self.lightning_module.trainer
        anchors = {cb.root for cb in trainer.callbacks if isinstance(cb, OTeaCheckpoint) and cb.root is not None}
        io = self.checkpoint_io
        if os.path.normpath(path) in {os.path.normpath(a) for a in anchors}:
            checkpoint = io.recover(self._gather)
        elif self._every_rank(_is_checkpoint_folder(path, io.storage_options_for(path))):  # explicit, or one step
            checkpoint = io.load_checkpoint(path)
        else:
            checkpoint = io.recover(self._gather, url=path)
        if checkpoint is None:
            log.warning("no checkpoint is complete on every rank (looked in %s); starting fresh", path)
            trainer._checkpoint_connector._ckpt_path = None  # so Lightning does not report a restore
            return _NoCheckpoint({"pytorch-lightning_version": pl.__version__})
        private = checkpoint.pop(PRIVATE_KEY)
        _resume_last_batch_as_mid_epoch(checkpoint)
        assert self._ds_state is not None
        self._ds_state.restore(private["engine"], private["deepspeed"])
        self._restore_at_next_iteration = (private["rng"], private["metrics"])
        # rank 0's origin: one fork on every rank, whichever tier each rank read the step from
        io.continue_line(private["step"], self.broadcast(private["origin"]))
        io.discard_snapshots_after(private["step"])
        io.discard_persisted_after(private["step"])
        self.resumed_from = {"step": private["step"], "source": private["source"]}
        log.warning("resuming from step %d (%s)", private["step"], private["source"])
        return checkpoint

    # --- shutdown ---------------------------------------------------------------------------------------

    def on_exception(self, exception: BaseException) -> None:
        self.checkpoint_io.mark_crashed()
        super().on_exception(exception)

    def teardown(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.checkpoint_io.teardown()
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("oteacheck", cls, description="DeepSpeed with every-iteration OTeaCheck snapshots")
        for stage in (1, 2, 3):
            strategy_registry.register(
                f"oteacheck_stage_{stage}", cls, description=f"OTeaCheck on DeepSpeed ZeRO stage {stage}", stage=stage
            )


if "oteacheck" not in StrategyRegistry:
    OTeaCheckStrategy.register_strategies(StrategyRegistry)

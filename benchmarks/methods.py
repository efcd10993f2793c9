"""The checkpointing methods under comparison, each as a Lightning strategy plus callbacks.

Every method runs DeepSpeed ZeRO-2 inside Lightning. The OTeaCheck rows use :class:`OTeaCheckStrategy`; the other
rows use Lightning's own :class:`DeepSpeedStrategy` (what a user of those systems runs), and each family is
compared with "no checkpointing" on its own strategy (``none`` and ``none-deepspeed``), so that the ratio is the
cost of checkpointing and nothing else.

What is saved: unless noted, a method saves this rank's training state as :class:`DeepSpeedState` enumerates it
(fp32 master partition, AdamW moments, persistent buffers, plus the small metadata needed to restore it), the same
bytes that OTeaCheck keeps, so the methods differ only in *how* they save. ``sync-deepspeed`` saves DeepSpeed's own
format (which adds the 16-bit module weights) and ``lightning-async`` Lightning's checkpoint dict (module
state_dict plus the ZeRO optimizer's state_dict), because that is what a user of them gets.

Every saver keeps two moments apart, as PyTorch DCP does: *stall* (how long the training thread was held) and
*durable* (when the checkpoint was complete on disk, from the end of its step).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from .catalog import METHODS, OTEACHECK_METHODS


def _sync_training_stream() -> None:
    # only the training stream: a device-wide synchronize would also wait for a method's own side streams
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()


@dataclass
class Record:
    """What the savers report, per rank. Times are ``time.perf_counter()`` seconds."""

    stall_ms: list[float] = field(default_factory=list)
    durable_s: list[float] = field(default_factory=list)
    taken: list[int] = field(default_factory=list)  # steps whose checkpoint was started
    durable_steps: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    every_n_steps_chosen: list[int] = field(default_factory=list)  # adaptive methods
    extra: dict[str, list[float]] = field(default_factory=dict)  # method-specific series (medians reported)
    lock: threading.Lock = field(default_factory=threading.Lock)
    latest_file: Path | None = None

    def durable(self, step: int, step_end: float, location: str) -> None:
        """Called when the checkpoint of ``step`` is complete on disk (any thread; no collectives)."""
        with self.lock:
            self.durable_s.append(time.perf_counter() - step_end)
            self.durable_steps.append(step)
            if self.latest_file is not None:
                tmp = self.latest_file.with_suffix(".tmp")
                tmp.write_text(json.dumps({"step": step, "location": location}))
                os.replace(tmp, self.latest_file)


# --- strategies ----------------------------------------------------------------------------------------------

# gradient bucket size (elements) of the CPU smoke runs: DeepSpeed allocates its bucket buffers anew every step, and
# at Lightning's default of 2e8 elements that took most of a tiny model's step on the CPU (on a GPU the caching
# allocator reuses them, so GPU runs keep the default)
CPU_BUCKET_ELEMENTS = 1 << 18


def zero2_options(on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed options every benchmark strategy gets: ZeRO stage 2, and small buckets on the CPU."""
    if on_gpu:
        return dict(stage=2)
    return dict(stage=2, reduce_bucket_size=CPU_BUCKET_ELEMENTS, allgather_bucket_size=CPU_BUCKET_ELEMENTS)


class BenchDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy; on CPU (the smoke runs) it takes DeepSpeed's CPU accelerator with gloo, the
    way OTeaCheckStrategy does, because Lightning's own refuses anything but CUDA. On CUDA it is unchanged."""

    def _on_cpu(self) -> bool:
        from lightning.pytorch.accelerators import CPUAccelerator

        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self._on_cpu():
            return super().setup_environment()
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        super(DeepSpeedStrategy, self).setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> tuple[Any, Any]:
        from oteacheck_lightning.strategy import match_norm_buffers_to_parameters

        # the same model numerics as under OTeaCheckStrategy (ResNet-50 under bf16 does not train otherwise)
        match_norm_buffers_to_parameters(self.config, model)
        if not self._on_cpu():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import argparse

        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()), optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, ds_optimizer


class AsyncIODeepSpeedStrategy(BenchDeepSpeedStrategy):
    """How a user gets Lightning's ``AsyncCheckpointIO`` to do anything under DeepSpeed.

    ``DeepSpeedStrategy.save_checkpoint`` calls ``engine.save_checkpoint`` and never its CheckpointIO plugin, so
    ``Trainer(plugins=[AsyncCheckpointIO()])`` alone is silently synchronous DeepSpeed saving. The smallest user
    fix, done here, is a subclass whose ``save_checkpoint`` hands Lightning's checkpoint dict (module state_dict +
    the ZeRO optimizer's state_dict, this rank's partition) to the plugin, one file per rank.

    Two changes a user also needs: ``AsyncCheckpointIO`` clones every tensor *on the GPU* and queues saves without
    bound, so saving every step piles full-state GPU clones up until memory runs out; we let at most one save be in
    flight (waiting for the previous one counts as stall). The wait goes through the plugin's executor (one worker,
    first in first out): a no-op submitted behind the pending save completes when it did.
    """

    record: Record | None = None

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any | None = None) -> None:
        io = self.checkpoint_io
        executor = getattr(io, "_executor", None)
        if executor is not None:
            executor.submit(lambda: None).result()
        path = f"{filepath}.rank{self.global_rank}.ckpt"
        io.save_checkpoint(checkpoint, path)
        step, step_end, record = int(checkpoint.get("global_step", -1)), time.perf_counter(), self.record
        if record is not None and getattr(io, "_executor", None) is not None:
            io._executor.submit(record.durable, step, step_end, path)


def make_strategy(method: str, accelerator: str, record: Record, args: Any) -> tuple[Any, list, list, bool]:
    """(strategy, callbacks, plugins, enable_checkpointing) for ``method``."""
    common = zero2_options(accelerator == "cuda")
    if method in OTEACHECK_METHODS:
        from oteacheck_lightning import OTeaCheckpoint, OTeaCheckpointIO, OTeaCheckStrategy, PersistSchedule

        root = str(Path(args.workdir) / "oteacheck")
        if method == "none":
            # the same strategy with no snapshot ever (OTeaCheckStrategy always has an OTeaCheckpoint callback)
            io = OTeaCheckpointIO()
            callback = OTeaCheckpoint(dirpath=root, snapshot_every_n_steps=10**12, persist=[], log_metrics=False)
        else:
            if method == "oteacheck":
                io = OTeaCheckpointIO()
            else:
                schedule = method.split("-", 1)[1]
                try:
                    io = OTeaCheckpointIO(schedule=schedule, staging_mib=args.staging_mib)
                except TypeError as err:
                    raise MethodUnavailable(
                        f"OTeaCheckpointIO does not take schedule=/staging_mib= in this version ({err}); "
                        f"the {method} ablation needs the bubble-scheduled engine") from err
            persist = [PersistSchedule(url=str(Path(args.workdir) / "persist"), every_n_steps=args.persist_every_n_steps,
                                       keep_last=2)] if args.persist_every_n_steps else []
            callback = OTeaCheckpoint(dirpath=root, snapshot_every_n_steps=args.every_n_steps, persist=persist,
                                      log_metrics=True)
        return OTeaCheckStrategy(checkpoint_io=io, **common), [callback], [], True
    if method == "lightning-async":
        from lightning.pytorch.plugins.io import AsyncCheckpointIO

        strategy = AsyncIODeepSpeedStrategy(**common)
        strategy.record = record
        return strategy, [EveryNSaver(record, args, _lightning_save)], [AsyncCheckpointIO()], False
    strategy = BenchDeepSpeedStrategy(**common)
    savers = {
        "none-deepspeed": None,
        "sync-torch-save": _torch_save,
        "sync-deepspeed": _deepspeed_save,
        "torchsnapshot": TorchSnapshotSaver,
        "dcp-async": DCPAsyncSaver,
    }
    if method == "checkfreq":
        from .checkfreq import CheckFreq

        return strategy, [CheckFreq(record, args)], [], False
    if method not in savers:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    saver = savers[method]
    if saver is None:
        return strategy, [], [], False
    if isinstance(saver, type):
        return strategy, [saver(record, args)], [], False
    return strategy, [EveryNSaver(record, args, saver)], [], False


class MethodUnavailable(RuntimeError):
    """The method cannot run in this environment; the result records why."""


# --- the state every method saves ------------------------------------------------------------------------


_STATES: dict[int, Any] = {}


def rank_state(trainer: pl.Trainer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's tensors (references to the live ones) and the metadata that restores them."""
    from oteacheck_lightning.deepspeed_state import DeepSpeedState

    engine = trainer.strategy.deepspeed_engine
    # one DeepSpeedState per engine: it caches the parameter map, which would otherwise be rebuilt at every save
    # and charged to the method's stall
    state = _STATES.get(id(engine))
    if state is None or state.engine is not engine:
        state = _STATES[id(engine)] = DeepSpeedState(engine)
    return dict(state.tensors()), state.meta()


def restore_rank_state(trainer: pl.Trainer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from oteacheck_lightning.deepspeed_state import DeepSpeedState

    DeepSpeedState(trainer.strategy.deepspeed_engine).restore(tensors, meta)


def rank_dir(args: Any, trainer: pl.Trainer, name: str) -> Path:
    path = Path(args.workdir) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- synchronous and "save call" methods -------------------------------------------------------------------


class EveryNSaver(pl.Callback):
    """Calls ``save(trainer, step, path, record, step_end)`` every ``every_n_steps`` optimizer steps at the end of
    the batch, timing how long it holds the training thread. Two paths alternate, so a crash while writing one
    still leaves the other, and disk use stays at two checkpoints."""

    def __init__(self, record: Record, args: Any, save: Any) -> None:
        self.record, self.args, self.save = record, args, save
        self.count = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step <= 0 or step % self.args.every_n_steps:
            return
        _sync_training_stream()
        start = time.perf_counter()
        path = Path(self.args.workdir) / f"ckpt-{self.count % 2}"
        self.count += 1
        self.save(trainer, step, path, self.record, start)
        self.record.stall_ms.append((time.perf_counter() - start) * 1e3)
        self.record.taken.append(step)


def _torch_save(trainer: pl.Trainer, step: int, path: Path, record: Record, step_end: float) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tensors, meta = rank_state(trainer)
    file = path / f"rank{trainer.global_rank}.pt"
    torch.save({"tensors": tensors, "meta": meta, "step": step}, file)
    with open(file, "rb+") as f:  # durable means on disk, not in the page cache
        os.fsync(f.fileno())
    record.durable(step, step_end, str(file))


def _deepspeed_save(trainer: pl.Trainer, step: int, path: Path, record: Record, step_end: float) -> None:
    # what Lightning's DeepSpeedStrategy does for trainer.save_checkpoint: engine.save_checkpoint, every rank
    trainer.save_checkpoint(str(path))
    record.durable(step, step_end, str(path))


def _lightning_save(trainer: pl.Trainer, step: int, path: Path, record: Record, step_end: float) -> None:
    # durability is recorded by AsyncIODeepSpeedStrategy when the plugin's worker is done
    trainer.save_checkpoint(str(path))


# --- torchsnapshot -------------------------------------------------------------------------------------------


class TorchSnapshotSaver(pl.Callback):
    """torchsnapshot's ``Snapshot.async_take``: returns once the state is staged in host memory, writes in the
    background. At most one take in flight: a new one first waits for the previous (stall)."""

    def __init__(self, record: Record, args: Any) -> None:
        import torchsnapshot  # noqa: F401 (fail at set-up, with the import error in the result)

        self.record, self.args = record, args
        self.pending: Any = None
        self.count = 0

    def _finish(self) -> None:
        if self.pending is not None:
            pending, step, step_end, path = self.pending
            pending.wait()
            self.pending = None
            self.record.durable(step, step_end, path)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._poll()
        step = trainer.global_step
        if step <= 0 or step % self.args.every_n_steps:
            return
        from torchsnapshot import Snapshot, StateDict

        _sync_training_stream()
        start = time.perf_counter()
        self._finish()
        path = str(Path(self.args.workdir) / f"snapshot-{step}")
        tensors, _ = rank_state(trainer)
        # torchsnapshot reads "/" in a key as a path
        app_state = {f"rank{trainer.global_rank}": StateDict(**{k.replace("/", "."): v for k, v in tensors.items()})}
        pending = Snapshot.async_take(path, app_state=app_state)
        self.pending = (pending, step, start, path)
        self.record.stall_ms.append((time.perf_counter() - start) * 1e3)
        self.record.taken.append(step)
        self._prune(step)

    def _poll(self) -> None:
        if self.pending is not None and self.pending[0].done():
            self._finish()

    def _prune(self, step: int) -> None:
        # keep the two newest snapshots (the pending one and the last durable one)
        if trainer_rank() != 0:
            return
        olds = sorted(Path(self.args.workdir).glob("snapshot-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in olds[:-3]:
            shutil.rmtree(old, ignore_errors=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()


def trainer_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


# --- PyTorch DCP async_save -----------------------------------------------------------------------------------


class DCPAsyncSaver(pl.Callback):
    """``torch.distributed.checkpoint.async_save`` with pinned host staging.

    On torch versions with ``DefaultStager`` (2.9+), staging into pinned, shared host memory runs asynchronously
    and ``async_save`` returns two futures: staging done (the state may change again) and upload done (durable).
    The state must not change before staging is done, so the callback waits for it just before the next optimizer
    step (that wait is part of the stall). On older versions ``async_save`` stages synchronously inside the call.
    Keys carry the rank: ZeRO-2 partitions are different tensors on every rank, and DCP would otherwise treat
    equal keys as one replicated tensor. Background collectives go through a gloo group, as DCP requires.
    """

    def __init__(self, record: Record, args: Any) -> None:
        self.record, self.args = record, args
        self.stager: Any = None
        self.group: Any = None
        self.staging: Any = None
        self.upload: Any = None
        self.upload_info: tuple[int, float, str] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            self.group = dist.new_group(backend="gloo")
        self.stager = self._new_stager()
        self.record.notes.append("DefaultStager(pinned, shared memory, async staging, non-blocking copies)"
                                 if self.stager is not None else "no DefaultStager in this torch: async_save stages synchronously")

    @staticmethod
    def _new_stager() -> Any:
        try:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        except ImportError:
            return None
        return DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(), use_shared_memory=True,
                                            use_async_staging=True, use_non_blocking_copy=torch.cuda.is_available()))

    def _usable_stager(self) -> Any:
        """Some torch versions (2.11 on the H200) close the stager's copier after each stage, which empties its
        dispatch table, and the next stage fails with ``KeyError: <class 'type'>`` (a known torch bug). Such a
        stager also dropped its pinned buffers, so a fresh one per save costs what torch itself would."""
        inner = getattr(self.stager, "_state_dict_stager", None)
        if inner is not None and not getattr(inner, "_deepcopy_dispatch", True):
            self.stager.close()
            self.stager = self._new_stager()
            note = "a new DefaultStager per save (torch closes it after each stage)"
            if note not in self.record.notes:
                self.record.notes.append(note)
        return self.stager

    def _wait_upload(self) -> None:
        if self.upload is not None:
            self.upload.result()
            step, step_end, path = self.upload_info
            self.upload = None
            self.record.durable(step, step_end, path)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.staging is not None:
            start = time.perf_counter()
            self.staging.result()
            self.staging = None
            if self.record.stall_ms:
                self.record.stall_ms[-1] += (time.perf_counter() - start) * 1e3

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.upload is not None and self.upload.done():
            self._wait_upload()
        step = trainer.global_step
        if step <= 0 or step % self.args.every_n_steps:
            return
        import torch.distributed.checkpoint as dcp

        _sync_training_stream()
        start = time.perf_counter()
        self._wait_upload()  # one checkpoint in flight: the staging buffers are reused
        tensors, meta = rank_state(trainer)
        # plain tensors, not DeepSpeed's nn.Parameter partitions: what a user hands DCP
        state = {f"rank{trainer.global_rank}/{k}": v.detach() for k, v in tensors.items()}
        path = str(Path(self.args.workdir) / f"dcp-{step}")
        # what a restart needs to allocate the tensors to load into (AdamW state does not exist before a step)
        Path(path).mkdir(parents=True, exist_ok=True)
        torch.save({"meta": meta, "shapes": {k: (list(v.shape), str(v.dtype)) for k, v in tensors.items()}, "step": step},
                   Path(path) / f"bench-meta-rank{trainer.global_rank}.pt")
        kwargs: dict[str, Any] = {"checkpoint_id": path, "process_group": self.group}
        if self.stager is not None:
            kwargs["async_stager"] = self._usable_stager()
        if self.group is None:
            kwargs["no_dist"] = True
        response = dcp.async_save(state, **kwargs)
        if hasattr(response, "upload_completion"):
            self.staging, self.upload = response.staging_completion, response.upload_completion
        else:
            self.upload = response
        self.upload_info = (step, start, path)
        self.record.stall_ms.append((time.perf_counter() - start) * 1e3)
        self.record.taken.append(step)
        if trainer.global_rank == 0:
            olds = sorted(Path(self.args.workdir).glob("dcp-*"), key=lambda p: int(p.name.split("-")[1]))
            for old in olds[:-3]:
                shutil.rmtree(old, ignore_errors=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.staging is not None:
            self.staging.result()
        self._wait_upload()
        if self.stager is not None:
            self.stager.close()


def expected_work_lost(every_n_steps: float, durable_lag_steps: float) -> float:
    """Steps of work lost on average by a failure at a random moment: half an interval, plus the steps between
    a checkpoint's step and the moment it became usable (durable on disk, or sealed in memory one iteration
    later), plus the iteration in progress."""
    return (every_n_steps - 1) / 2 + max(durable_lag_steps, 0.0) + 1


def ceil_div(a: float, b: float) -> int:
    return max(1, math.ceil(a / b)) if b > 0 else 1

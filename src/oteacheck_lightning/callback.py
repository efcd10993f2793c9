"""``OTeaCheckpoint``: the checkpoint policy, and ``ckpt_path="last"`` wired into Lightning's own resolution.

It is a :class:`~lightning.pytorch.callbacks.ModelCheckpoint`, so everything ModelCheckpoint does still works
(``monitor``/``save_top_k`` checkpoints are written through OTeaCheckpointIO as checkpoint folders), and Lightning
asks it for the "last" checkpoint. On top of that it decides:

* when to take an in-memory snapshot (``snapshot_every_n_steps``, default every optimizer step);
* when to persist, where, and how many to keep (one :class:`PersistSchedule` per tier);

and it reports the snapshot and persistence metrics to the logger and the progress bar.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from .io import OTeaCheckpointIO
from .pace import PersistPace
from .persist import PersistSchedule, unsnapshotted_interval


class OTeaCheckpoint(ModelCheckpoint):
    """Every-iteration in-memory snapshots, persisted on a schedule, resumable with ``ckpt_path="last"``.

    Args:
        dirpath: the job's checkpoint folder, stable across restarts (default ``<default_root_dir>/oteacheck``);
            the default persistent tier writes here.
        snapshot_every_n_steps: take an in-memory snapshot every this many optimizer steps (default 1).
        persist: where and when to persist: a :class:`PersistSchedule` or a list of them, one per tier
            (default: ``dirpath`` every 50 steps, or the next multiple of ``snapshot_every_n_steps``, keeping 3);
            ``[]`` keeps snapshots in memory only. Each ``every_n_steps`` must be a multiple of
            ``snapshot_every_n_steps``: only snapshotted steps can be persisted.
        log_metrics: send the ``oteacheck/*`` metrics (stall, sealed and persisted steps, failures) to the trainer's
            loggers every ``log_every_n_steps`` steps, and the sealed step and stall to the progress bar.
        **kwargs: any :class:`ModelCheckpoint` argument; ``save_top_k`` defaults to 0 here, so only the
            snapshot policy writes unless you ask for more.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        snapshot_every_n_steps: int = 1,
        persist: PersistSchedule | Sequence[PersistSchedule] | None = None,
        log_metrics: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("save_top_k", 0)
        super().__init__(dirpath=dirpath, **kwargs)
        if snapshot_every_n_steps < 1:
            raise MisconfigurationException(f"snapshot_every_n_steps must be >= 1, got {snapshot_every_n_steps}")
        self.snapshot_every_n_steps = every = snapshot_every_n_steps
        if persist is None:
            # only snapshotted steps can be persisted: the default interval, rounded up to a multiple of the snapshots'
            steps = PersistSchedule.every_n_steps  # the dataclass field's default
            persist = [PersistSchedule(every_n_steps=-(-steps // every) * every)]
        elif isinstance(persist, PersistSchedule):
            persist = [persist]
        self.persist = list(persist)
        for schedule in self.persist:
            if not isinstance(schedule, PersistSchedule):
                raise MisconfigurationException(f"persist takes PersistSchedule objects, got {type(schedule).__name__}")
            problem = unsnapshotted_interval(schedule.every_n_steps, every)
            if problem is not None:
                raise MisconfigurationException(f"a persist schedule's every_n_steps is {schedule.every_n_steps}, {problem}")
        self.log_metrics = log_metrics
        self.root: str | None = str(dirpath) if dirpath is not None else None
        self._last_snapshot_step = -1
        self._pace = PersistPace()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.root, snapshot_every_n_steps=self.snapshot_every_n_steps)

    def _resolve_root(self, trainer: pl.Trainer) -> str:
        if self.root is None:
            self.root = os.path.join(trainer.default_root_dir, "oteacheck")
        if "://" not in self.root or self.root.startswith("file://"):
            Path(self.root.removeprefix("file://")).mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.root

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        # Lightning picks "last" among these before the processes can talk to each other; the job folder stands
        # for "the freshest checkpoint complete on every rank", which the strategy works out once they can
        return {self._resolve_root(trainer)}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, OTeaCheckpointIO):
            raise MisconfigurationException(
                "OTeaCheckpoint needs Trainer(strategy=OTeaCheckStrategy(...)) (or strategy='oteacheck')"
            )
        root = self._resolve_root(trainer)
        if self.dirpath is None:
            self.dirpath = root
        super().setup(trainer, pl_module, stage)
        io.configure(root, self.persist)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if step > 0 and step != self._last_snapshot_step and step % self.snapshot_every_n_steps == 0:
            self._last_snapshot_step = step
            trainer.strategy.take_snapshot()
        io = trainer.strategy.checkpoint_io
        if io.paces_persistence:
            agreed = self._pace.on_step(step, lambda local: _largest_over_ranks(trainer, local))
            if agreed is not None:
                io.pace_persistence(*agreed, self.snapshot_every_n_steps)
        if self.log_metrics:
            self._report(trainer, pl_module)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Sends the metrics to the loggers at the trainer's ``log_every_n_steps``, and the sealed step and stall to
        the progress bar, if there is one.

        Straight to the loggers rather than through ``LightningModule.log``: Lightning's per-call bookkeeping cost
        about 5 ms of training-thread time per step for these 15 values (profiled on CPU), and a training loop bound
        by the host pays that in iteration time. The loggers see the same cadence ``self.log(on_step=True)`` gives.
        """
        step = trainer.global_step
        metrics = None
        if trainer.loggers and step % max(1, trainer.log_every_n_steps) == 0:
            metrics = trainer.strategy.checkpoint_io.metrics()
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)  # Lightning's loggers write on rank 0 only
        bar = trainer.progress_bar_callback
        if bar is not None and bar.is_enabled:  # every step: the bar shows what was logged when it refreshes
            metrics = metrics or trainer.strategy.checkpoint_io.metrics()
            pl_module.log("ckpt_step", metrics["oteacheck/sealed_step"], on_step=True, prog_bar=True, logger=False, batch_size=1)
            pl_module.log("stall_ms", metrics["oteacheck/stall_ms"], on_step=True, prog_bar=True, logger=False, batch_size=1)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._pace.start(trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        io = trainer.strategy.checkpoint_io
        if not io.persist_now(wait=True, timeout=600):
            pl.utilities.rank_zero_warn("the final snapshot was not persisted within 10 minutes")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        io = trainer.strategy.checkpoint_io
        if isinstance(io, OTeaCheckpointIO):  # otherwise setup refused the strategy: that error is the one to see
            io.mark_crashed()
        super().on_exception(trainer, pl_module, exception)


def _largest_over_ranks(trainer: pl.Trainer, value: float) -> float:
    """The largest ``value`` over the ranks (a collective: every rank calls it at the same step)."""
    tensor = torch.tensor(value, dtype=torch.float64, device=trainer.strategy.root_device)
    return float(trainer.strategy.reduce(tensor, reduce_op="max"))

"""CheckFreq (Mohan, Phanishayee, Chidambaram: "CheckFreq: Frequent, Fine-Grained DNN Checkpointing", FAST'21),
written from the paper's description as a Lightning callback.

The paper's three mechanisms, as done here:

1. **Two-phase checkpoint.** ``snapshot`` copies the training state into a second in-memory copy (in GPU memory
   when it fits, as the paper prefers, else pinned host memory); ``persist`` writes that copy to storage in the
   background.
2. **Pipelined snapshot.** The snapshot of step *t* runs on a side CUDA stream while iteration *t+1*'s forward and
   backward run; only the next weight update must wait for it, and that wait is on the device (the update's stream
   waits for the copy's event), so the host does not stall. Only one checkpoint is in flight: a snapshot waits
   for the previous persist to finish, because the persist reads the snapshot copy.
3. **Adaptive frequency.** A short profile measures the iteration time with no checkpoint, then one checkpoint
   measures its cost (the extra time of the iterations it touched, host stall included) and its persist time.
   The interval is the smallest ``k`` with ``cost / (k * t_iter) <= budget`` (5% in the paper) and
   ``k * t_iter >= persist time`` (so a snapshot never waits for the previous persist); cost and persist time are
   re-measured at every checkpoint (moving average) and ``k`` follows.

A fixed ``every_n_steps >= 1`` turns the adaptation off (the "checkpoint every iteration" row); ``0`` means adaptive.
What is saved is the same rank state as the other methods (:func:`benchmarks.methods.rank_state`).
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from .methods import Record, rank_state


class CheckFreq(pl.Callback):
    PROFILE_STEPS = 5
    EMA = 0.5

    def __init__(self, record: Record, args: Any, budget: float | None = None) -> None:
        self.record, self.args = record, args
        self.budget = budget if budget is not None else getattr(args, "overhead_budget", 0.05)
        self.fixed = args.every_n_steps if args.every_n_steps >= 1 else None
        self.k = self.fixed or 0  # 0: still profiling
        self.cuda = torch.cuda.is_available()
        self.copy: dict[str, torch.Tensor] | None = None
        self.meta: dict[str, Any] | None = None
        self.copy_on_gpu = False
        self.snap_event: Any = None
        self.side: Any = None  # CUDA streams, made in setup() once this rank's device is current
        self.persist_stream: Any = None
        self.persist_thread: threading.Thread | None = None
        self.persist_s: float | None = None
        self.cost_s: float | None = None
        self.t_iter: float | None = None
        self._profile: list[float] = []
        self._last_end: float | None = None
        self._measure_after: int | None = None  # step whose next iteration time is the checkpoint's cost
        self._pending_cost = 0.0
        self.next_step: int | None = None
        self.count = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.cuda:
            device = trainer.strategy.root_device
            self.side, self.persist_stream = torch.cuda.Stream(device), torch.cuda.Stream(device)

    # --- timing (synchronized only around the iterations being measured) ------------------------------------

    def _now(self, sync: bool) -> float:
        if sync and self.cuda:
            torch.cuda.current_stream().synchronize()
        return time.perf_counter()

    # --- the snapshot fence: before the next weight update ---------------------------------------------------

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.snap_event is not None and self.cuda:
            torch.cuda.current_stream().wait_event(self.snap_event)  # device-side: the host goes on

    # --- per iteration -------------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step <= 0:
            return
        measuring = self.fixed is None and (self.k == 0 or self._measure_after is not None)
        now = self._now(sync=measuring)
        if self.fixed is None:
            self._adapt(step, now)
        due = (step % self.k == 0) if self.fixed else (self.next_step is not None and step >= self.next_step)
        if due:
            self._checkpoint(trainer, step)
            self._last_end = self._now(sync=self.fixed is None)
        else:
            self._last_end = now

    def _adapt(self, step: int, now: float) -> None:
        last, self._last_end = self._last_end, now
        if last is None:
            return
        elapsed = now - last
        if self.k == 0:
            self._profile.append(elapsed)
            if len(self._profile) >= self.PROFILE_STEPS:
                self.t_iter = sorted(self._profile)[len(self._profile) // 2]
                self.k = -1  # profiled; the next step takes the measuring checkpoint
                self.next_step = step + 1
            return
        if self._measure_after is not None and step == self._measure_after + 1:
            cost = self._pending_cost + max(0.0, elapsed - self.t_iter)
            self.cost_s = cost if self.cost_s is None else self.EMA * cost + (1 - self.EMA) * self.cost_s
            self._measure_after = None
            self._choose(step)

    def _choose(self, step: int) -> None:
        t = self.t_iter or 1e-9
        persist = self.persist_s or 0.0
        k = max(1, math.ceil((self.cost_s or 0.0) / (self.budget * t)), math.ceil(persist / t))
        self.k = k
        self.next_step = (step // k + 1) * k
        self.record.every_n_steps_chosen.append(k)

    # --- the two phases ------------------------------------------------------------------------------------

    def _allocate(self, tensors: dict[str, torch.Tensor]) -> None:
        try:
            self.copy = {n: torch.empty_like(t) for n, t in tensors.items()}
            self.copy_on_gpu = self.cuda
        except torch.OutOfMemoryError:
            self.copy = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for n, t in tensors.items()}
            self.copy_on_gpu = False
            self.record.notes.append("snapshot copy in pinned host memory (no room on the GPU)")
        if self.copy_on_gpu:
            self.record.notes.append("snapshot copy in GPU memory")

    def _checkpoint(self, trainer: pl.Trainer, step: int) -> None:
        start = time.perf_counter()
        # one checkpoint in flight: the persist reads the snapshot copy
        if self.persist_thread is not None:
            self.persist_thread.join()
        tensors, self.meta = rank_state(trainer)
        if self.copy is None:
            self._allocate(tensors)
        assert self.copy is not None
        if self.cuda:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                for name, t in tensors.items():
                    self.copy[name].copy_(t, non_blocking=True)
                self.snap_event = torch.cuda.Event()
                self.snap_event.record(self.side)
        else:
            for name, t in tensors.items():
                self.copy[name].copy_(t)
        stall = time.perf_counter() - start
        self.record.stall_ms.append(stall * 1e3)
        self.record.taken.append(step)
        if self.fixed is None:
            self.next_step = None  # chosen once this checkpoint's cost is measured
            self._pending_cost = stall
            self._measure_after = step
        path = Path(self.args.workdir) / f"checkfreq-{self.count % 2}" / f"rank{trainer.global_rank}.pt"
        self.count += 1
        self.persist_thread = threading.Thread(target=self._persist, args=(step, start, path, self.snap_event),
                                               name="checkfreq-persist", daemon=True)
        self.persist_thread.start()

    def _persist(self, step: int, step_end: float, path: Path, event: Any) -> None:
        # background thread: no collectives here
        try:
            started = time.perf_counter()
            assert self.copy is not None
            if self.cuda:
                event.synchronize()
                with torch.cuda.stream(self.persist_stream):
                    host = {n: t.to("cpu") for n, t in self.copy.items()} if self.copy_on_gpu else self.copy
            else:
                host = self.copy
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"tensors": host, "meta": self.meta, "step": step}, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            elapsed = time.perf_counter() - started
            self.persist_s = elapsed if self.persist_s is None else self.EMA * elapsed + (1 - self.EMA) * self.persist_s
            self.record.durable(step, step_end, str(path))
        except Exception as err:  # reported in the result, training goes on
            self.record.errors.append(f"persist of step {step}: {type(err).__name__}: {err}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.persist_thread is not None:
            self.persist_thread.join()

"""Measuring an iteration: timings at iteration boundaries, memory, versions.

An iteration is measured from the start of one training batch to the start of the next, so everything a method
does on the training thread (its work at the end of the batch, a fence at the start of the next) is inside it.
On CUDA the boundaries are CUDA events on the training stream rather than ``torch.cuda.synchronize()``: a device
synchronization would also wait for the side streams of the asynchronous methods and charge them a stall that
they would not cause in a real run. An event on the training stream is recorded when the host reaches it and
completes when the device does, so a host-side stall and a device-side slowdown both show.
"""

from __future__ import annotations

import os
import platform
import random
import resource
import statistics
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch


class IterationTimer(pl.Callback):
    """Times every iteration; after ``warmup`` iterations, keeps the next ``steps``. Train ``warmup + steps + 1``
    iterations: the start of the last one closes the last measured iteration. Stops training early when
    ``max_seconds`` (wall, from fit start) is spent and at least ``min_measured`` iterations were measured, so a
    slow method (a synchronous save of several GB every step) still fits its time slot. A slow warm-up is cut short
    too, but never below ``min_warmup`` iterations (one-time costs the caller knows of, such as snapshot slots being
    created)."""

    def __init__(self, warmup: int, steps: int, max_seconds: float | None = None, min_measured: int = 5, min_warmup: int = 2) -> None:
        self.warmup, self.steps = warmup, steps
        self.min_warmup = min_warmup
        self.max_seconds, self.min_measured = max_seconds, min_measured
        self.cuda = torch.cuda.is_available()
        self._marks: list[Any] = []  # one per iteration start: CUDA event or perf_counter seconds
        self._mark_steps: list[int] = []
        self.started = time.perf_counter()
        self.first_step_end_wall: float | None = None
        self.fit_called_wall: float | None = None
        self.stopped_early = False
        self.extra_stats: dict[str, list[float]] = {}
        self.on_iteration_end: list[Any] = []  # callables (trainer, step) run at each batch end
        self.at_last_mark: Any = None  # callable (trainer) run when the last measured iteration ended

    def _mark(self, step: int) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())
        self._mark_steps.append(step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._mark(trainer.global_step)
        if (self.max_seconds is not None and len(self._marks) <= self.warmup and len(self._marks) - 1 >= self.min_warmup
                and time.perf_counter() - self.started > 0.3 * self.max_seconds):
            # a slow method (seconds per iteration): cut the warm-up short rather than the measurement
            self.warmup = len(self._marks) - 1
        if len(self._marks) == self.warmup + self.steps + 1 and self.at_last_mark is not None:
            # the start of the extra iteration closes the last measured one; before the strategy's own hook runs
            self.at_last_mark(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.first_step_end_wall is None:
            self.first_step_end_wall = time.time()
        for fn in self.on_iteration_end:
            fn(trainer, trainer.global_step)
        measured = len(self._marks) - 1 - self.warmup
        if (self.max_seconds is not None and measured >= self.min_measured
                and time.perf_counter() - self.started > self.max_seconds):
            self.stopped_early = True
            trainer.should_stop = True

    def iteration_ms(self) -> list[float]:
        """Milliseconds of each measured iteration (after warm-up)."""
        if self.cuda:
            torch.cuda.synchronize()
            times = [a.elapsed_time(b) for a, b in zip(self._marks, self._marks[1:])]
        else:
            times = [(b - a) * 1e3 for a, b in zip(self._marks, self._marks[1:])]
        return times[self.warmup:]

    def measured_steps(self) -> list[int]:
        """The global step each measured iteration started at (aligned with :meth:`iteration_ms`)."""
        return self._mark_steps[self.warmup:len(self._marks) - 1]


def summarize(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p90": None, "mean": None}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median": statistics.median(ordered), "p90": p90, "mean": statistics.fmean(ordered)}


def kept_in_blocks(rows: list[dict[str, Any]], first_step: int, block: int, skip: int) -> list[dict[str, Any]]:
    """The iterations (rows with a ``step``) of the blocks that start at ``first_step``, less the first ``skip`` of
    each block (they may seal the previous block's last snapshot) and its last (it ends with the next block's
    first snapshot)."""
    return [r for r in rows if r["step"] >= first_step and skip <= (r["step"] - first_step) % block < block - 1]


def paired_overhead(kept: list[dict[str, Any]], variant: str, first_step: int, block: int) -> tuple[list[float], list[float] | None]:
    """Blocks alternate from ``first_step``: no checkpointing (even), a checkpointing variant (odd). Returns the
    ratios of the median ``iter_ms`` of each block of ``variant`` to that of the block right before it, and a 95%
    bootstrap interval of their median (``None`` under two pairs)."""
    by_block: dict[int, list[dict[str, Any]]] = {}
    for r in kept:
        by_block.setdefault((r["step"] - first_step) // block, []).append(r)
    ratios = []
    for b, rows in sorted(by_block.items()):
        before = by_block.get(b - 1)
        if b % 2 == 1 and rows[0]["variant"] == variant and before:
            ratios.append(statistics.median(r["iter_ms"] for r in rows) / statistics.median(r["iter_ms"] for r in before))
    return ratios, median_ci95(ratios)


def median_ci95(values: list[float]) -> list[float] | None:
    """A 95% bootstrap interval of the median of ``values`` (``None`` under two values); seeded, so reruns agree."""
    if len(values) < 2:
        return None
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(2000))
    return [medians[int(0.025 * len(medians))], medians[int(0.975 * len(medians)) - 1]]


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:
        return None


def versions() -> dict[str, str | None]:
    import lightning

    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.version.cuda,
    }
    for name in ("deepspeed", "transformers", "torchvision", "torchsnapshot"):
        mod = sys.modules.get(name)
        out[name] = getattr(mod, "__version__", None) if mod is not None else None
    # a copy of the tree without its git history (the GPU machine's) is named by whoever copied it
    if os.environ.get("OTEACHECK_COMMIT"):
        out["oteacheck_commit"] = os.environ["OTEACHECK_COMMIT"]
        return out
    try:
        import subprocess

        here = os.path.dirname(os.path.dirname(__file__))
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=here).stdout.strip()
        # a tree with uncommitted changes to the code is not that commit: say so
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "benchmarks"], capture_output=True,
                               text=True, timeout=5, cwd=here).stdout.strip()
        out["oteacheck_commit"] = (commit + ("+dirty" if dirty else "")) or None
    except Exception:
        out["oteacheck_commit"] = None
    return out


def card() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"

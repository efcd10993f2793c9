"""The cost of checkpoints taken every so many steps, against the run's own quiet iterations.

A run at an interval (issue 5's search for each method's shortest interval within 5%) is compared with a baseline
run in another process, and separately started processes drift: on one H100 host the median iteration of ViT-B/16
ran 12% slower in the method's process than in the baseline's, though its checkpoints cost 2% of the run. Between
its checkpoints a run at an interval does what the baseline does, so its own iterations away from them are a
baseline that shares its process, memory layout and GPU clocks.
"""

from __future__ import annotations

import math
import statistics
from typing import Any


def in_run_overhead(times: list[float], steps: list[int], taken: list[int], tail: int) -> tuple[float, float] | None:
    """A run with checkpoints every so many steps against its own quiet iterations: the time of all ``times`` over
    their count times the mean of those that are neither the iteration a checkpoint was taken in (it starts at the
    step before the one in ``taken``) nor one of the ``tail`` after it. Returns that ratio and the quiet mean.

    It misses a cost spread over more than ``tail`` iterations after a checkpoint, so ``tail`` should cover the
    checkpoint's background work. ``None`` where fewer than a third of the iterations are quiet."""
    busy = {s - 1 + k for s in taken for k in range(tail + 1)}
    quiet = [t for t, s in zip(times, steps) if s not in busy]
    if not times or len(quiet) < len(times) / 3:
        return None
    quiet_mean = statistics.fmean(quiet)
    return sum(times) / (len(times) * quiet_mean), quiet_mean


def in_run_of(result: dict[str, Any]) -> dict[str, Any] | None:
    """:func:`in_run_overhead` of a result with checkpoints every so many steps (not a paired or every-iteration
    run), as fields to add to it. Its checkpoints are the steps it recorded, or, in results from before it
    recorded them, the multiples of its fixed interval (the first measured iteration starts at step ``warmup``;
    ``None`` for an interval chosen as it went).
    The tail covers the slowest durable write (p90) and 10 iterations more."""
    times, every, taken = result.get("iter_ms"), result.get("every_n_steps") or 1, result.get("checkpoint_steps")
    if not times or every <= 1 or result.get("overhead_paired") is not None:
        return None
    if taken is None and result.get("every_n_steps_history"):
        return None  # an interval it chose as it went (CheckFreq's), and no record of its checkpoints' steps
    first = result.get("measured_first_step", result.get("warmup", 0))
    steps = list(range(first, first + len(times)))
    if taken is None:
        taken = [s + 1 for s in steps if (s + 1) % every == 0]
    durable = result.get("durable_s_p90") or result.get("durable_s") or 0.0
    tail = 10 + math.ceil(durable * 1e3 / statistics.median(times))
    got = in_run_overhead(times, steps, taken, tail)
    if got is None:
        return None
    return {"overhead_in_run": got[0], "quiet_iter_ms_mean": got[1], "quiet_tail": tail,
            "cost_ms_per_checkpoint_in_run": (sum(times) - len(times) * got[1]) / max(len(taken), 1)}

"""Time-based persist schedules with several ranks: the seconds made into a step interval every rank agrees on.

A step can be committed only if every rank persisted it. Measured per rank, ``every_n_seconds`` fires at different
steps on different ranks as soon as their clocks or start times differ by a step (ranks of a real job start
seconds apart), and then none of them commits. So with several ranks the schedule is paced in steps instead: every
rank measures its seconds per step, the training threads take the largest with one small all-reduce (rarely: after
the first iterations, then every ``PACE_EVERY`` steps), and each tier persists every ``every_n_seconds`` divided by
that many steps, rounded to a multiple of the snapshot interval. An agreed interval applies from ``PACE_AHEAD``
steps after the agreement, so that snapshots already on their way to the sealer all use the previous one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

PACE_FROM = 5  # steps into the fit before measuring: the first iterations run slow (allocation, warm-up)
PACE_FIRST = 15  # the first agreement, this many steps into the fit
PACE_EVERY = 200  # then again every this many steps (the iteration time drifts)
PACE_AHEAD = 10  # an agreed interval applies from this many steps after the agreement


class PersistPace:
    """Measures seconds per step on the training thread and, at the same steps on every rank, agrees on them."""

    def __init__(self) -> None:
        self._mark: tuple[float, int] | None = None  # (perf_counter, step) measured from
        self._next: int | None = None  # the step of the next mark or agreement

    def start(self, step: int) -> None:
        """At the start of a fit (``step``: the global step it starts from, the same on every rank)."""
        self._mark, self._next = None, step + PACE_FROM

    def on_step(self, step: int, largest: Callable[[float], float]) -> tuple[int, float] | None:
        """At every batch end, on every rank. At an agreement step, calls ``largest`` (a collective: the largest
        value over the ranks) and returns ``(from_step, seconds_per_step)``; otherwise ``None``."""
        if self._next is None or step < self._next:
            return None
        now = time.perf_counter()
        if self._mark is None:
            self._mark, self._next = (now, step), step + PACE_FIRST - PACE_FROM
            return None
        started, first = self._mark
        seconds = largest((now - started) / max(1, step - first))
        self._mark, self._next = (now, step), step + PACE_EVERY
        return step + PACE_AHEAD, seconds

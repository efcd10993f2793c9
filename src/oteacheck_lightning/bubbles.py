"""The phases of one training iteration, and the event bus that announces them.

The strategy emits a :class:`PhaseEvent` at each phase boundary of an iteration. Subscribers (the checkpoint
engine, metrics, user code) use them to place work into the *bubbles* of the iteration: the stretches where the
host link is idle, such as the forward pass or the gaps between gradient-bucket reductions.

Order of events in one optimizer step (``k`` counts the gradient buckets reduced during backward)::

    ITERATION_START -> FORWARD_START -> FORWARD_END -> BUCKET_REDUCED(k)... -> BACKWARD_END
                    -> BEFORE_STEP -> AFTER_STEP

With gradient accumulation, the forward/backward events repeat once per micro-batch and BEFORE_STEP/AFTER_STEP
come once per optimizer step. Subscribers run synchronously on the training thread, so they must be quick; work
that takes long belongs on a stream or thread of the subscriber's own.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Phase(enum.Enum):
    ITERATION_START = "iteration_start"
    FORWARD_START = "forward_start"
    FORWARD_END = "forward_end"
    BUCKET_REDUCED = "bucket_reduced"
    BACKWARD_END = "backward_end"
    BEFORE_STEP = "before_step"
    AFTER_STEP = "after_step"


@dataclass(frozen=True)
class PhaseEvent:
    """One phase boundary. ``step`` is the optimizer step the iteration is working towards (the global step
    before the update), ``time_ns`` a ``time.perf_counter_ns`` timestamp."""

    phase: Phase
    step: int
    time_ns: int
    bucket: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


Subscriber = Callable[[PhaseEvent], None]


class BubbleBus:
    """Synchronous publish/subscribe for :class:`PhaseEvent`.

    Only the training thread emits. A subscriber that raises is not dropped silently: the exception propagates
    to the training loop, because a broken checkpoint engine must not go unnoticed.
    """

    def __init__(self) -> None:
        self._subscribers: list[tuple[int, Subscriber, frozenset[Phase] | None]] = []
        self._next_handle = 0
        self._lock = threading.Lock()

    def subscribe(self, callback: Subscriber, phases: set[Phase] | None = None) -> int:
        """Calls ``callback`` for every event (or only for ``phases``); returns a handle for :meth:`unsubscribe`."""
        with self._lock:
            handle = self._next_handle
            self._next_handle += 1
            self._subscribers.append((handle, callback, frozenset(phases) if phases is not None else None))
            return handle

    def unsubscribe(self, handle: int) -> None:
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s[0] != handle]

    def emit(self, phase: Phase, step: int, bucket: int | None = None, **info: Any) -> PhaseEvent:
        event = PhaseEvent(phase=phase, step=step, time_ns=time.perf_counter_ns(), bucket=bucket, info=info)
        for _, callback, phases in list(self._subscribers):
            if phases is None or phase in phases:
                callback(event)
        return event


class PhaseTimer:
    """Subscriber that measures how long each phase lasted (milliseconds), per iteration.

    The duration of a phase is the time from its event to the next event. ``last_iteration_ms`` holds the phases
    of the most recently completed iteration; the copy scheduler learns its per-phase byte budget from them.
    """

    def __init__(self) -> None:
        self._last: PhaseEvent | None = None
        self._current: dict[Phase, float] = {}
        self.last_iteration_ms: dict[Phase, float] = {}
        self.iteration_ms: float | None = None
        self._iteration_start_ns: int | None = None

    def __call__(self, event: PhaseEvent) -> None:
        if self._last is not None:
            elapsed = (event.time_ns - self._last.time_ns) / 1e6
            self._current[self._last.phase] = self._current.get(self._last.phase, 0.0) + elapsed
        if event.phase is Phase.ITERATION_START:
            if self._iteration_start_ns is not None:
                self.iteration_ms = (event.time_ns - self._iteration_start_ns) / 1e6
                self.last_iteration_ms = self._current
            self._iteration_start_ns = event.time_ns
            self._current = {}
        self._last = event

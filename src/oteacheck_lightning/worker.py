"""A background thread that runs queued calls in order: the CPU copier, the CUDA copier's pump and the sealer."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any


class BackgroundWorker:
    """One daemon thread that runs queued ``(handle, item)`` calls in order; started on first use, so an owner that
    never needs it costs no thread. Counts outstanding items and keeps the first error, which the owner collects
    (:meth:`drain`, :meth:`wait_until`) on its own thread. It holds no reference to a handle between items, so a
    dropped owner is freed (with, say, its GPU ring) without waiting for the garbage collector. The thread must run
    no collectives: only the training thread may."""

    def __init__(self, name: str, on_start: Callable[[], None] | None = None, stop_on_error: bool = True) -> None:
        self._name, self._on_start = name, on_start
        # whether items after a failed one are skipped (a copy after a failed copy is wasted) or still run (a handle
        # that must release what its item holds either way)
        self._stop_on_error = stop_on_error
        self._queue: queue.Queue[tuple[Callable[[Any], None], Any] | None] = queue.Queue()
        self._idle = threading.Condition()
        self._outstanding = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def outstanding(self) -> int:
        """Items queued or running."""
        return self._outstanding

    def put(self, handle: Callable[[Any], None], items: Sequence[Any]) -> None:
        if not items:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        with self._idle:
            self._outstanding += len(items)
        for item in items:
            self._queue.put((handle, item))

    def drain(self) -> BaseException | None:
        """Waits until every queued item was handled; returns (and forgets) the first error since the last drain."""
        return self.wait_until(0)

    def wait_until(self, at_most: int) -> BaseException | None:
        """Waits until at most ``at_most`` items are outstanding; returns (and forgets) the first error so far."""
        with self._idle:
            while self._outstanding > at_most:
                if not self._idle.wait(timeout=5.0) and not (self._thread and self._thread.is_alive()):
                    raise RuntimeError(f"the {self._name} thread died")
            error, self._error = self._error, None
        return error

    def _run(self) -> None:
        if self._on_start is not None:
            try:
                self._on_start()
            except BaseException as err:  # every item then fails, and the owner hears why
                self._error = err
        while True:
            call = self._queue.get()
            if call is None:
                return
            try:
                if self._error is None or not self._stop_on_error:
                    call[0](call[1])
            except BaseException as err:
                self._error = self._error or err
            finally:
                call = None  # no reference to the owner while idle
                with self._idle:
                    self._outstanding -= 1
                    self._idle.notify_all()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=60)

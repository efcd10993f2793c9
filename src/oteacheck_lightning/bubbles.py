"""The phases of one training iteration, and the event bus that announces them.

The strategy emits a :class:`PhaseEvent` at each phase boundary of an iteration. Subscribers (the checkpoint
engine, metrics, user code) use them to place work into the *bubbles* of the iteration: the stretches where the
host link is idle, such as the forward pass or the gaps between gradient-bucket reductions.

Order of events in one optimizer step (``i`` counts the model's repeated blocks, such as transformer layers, ``k``
the gradient buckets reduced during backward)::

    ITERATION_START -> FORWARD_START -> FORWARD_BLOCK(i)... -> FORWARD_END
                    -> BACKWARD_BLOCK(i)... and BUCKET_REDUCED(k)..., interleaved -> BACKWARD_END
                    -> BEFORE_STEP -> BEFORE_UPDATE... -> AFTER_STEP

BEFORE_UPDATE comes from the base optimizer (a step pre-hook), once per call of its ``step``: DeepSpeed calls it
per parameter group, after the gradient norm, the overflow check and the clipping, which read gradients only. It
is the last moment before the fp32 masters and optimizer states change, and it does not come in a step that
DeepSpeed skips (an overflow).

The block events cut forward and backward into windows of a few milliseconds each, so copies can be paced along
the GPU timeline (see :func:`install_block_hooks`).

With gradient accumulation, the forward/backward events repeat once per micro-batch and BEFORE_STEP/AFTER_STEP
come once per optimizer step. Subscribers run synchronously on the training thread, so they must be quick; work
that takes long belongs on a stream or thread of the subscriber's own.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import torch


class Phase(enum.Enum):
    ITERATION_START = "iteration_start"
    FORWARD_START = "forward_start"
    FORWARD_BLOCK = "forward_block"
    FORWARD_END = "forward_end"
    BACKWARD_BLOCK = "backward_block"
    BUCKET_REDUCED = "bucket_reduced"
    BACKWARD_END = "backward_end"
    BEFORE_STEP = "before_step"
    BEFORE_UPDATE = "before_update"
    AFTER_STEP = "after_step"


class PhaseEvent(NamedTuple):
    """One phase boundary. ``step`` is the optimizer step the iteration is working towards (the global step
    before the update), ``time_ns`` a ``time.perf_counter_ns`` timestamp, ``bucket`` the gradient bucket of a
    BUCKET_REDUCED event, ``block`` the model block of a FORWARD_BLOCK or BACKWARD_BLOCK event.

    A named tuple: immutable, and made in a third of a frozen dataclass's time (the training thread makes a dozen
    or more per iteration)."""

    phase: Phase
    step: int
    time_ns: int
    bucket: int | None = None
    info: Mapping[str, Any] = MappingProxyType({})
    block: int | None = None


Subscriber = Callable[[PhaseEvent], None]


class BubbleBus:
    """Synchronous publish/subscribe for :class:`PhaseEvent`.

    Only the training thread emits. A subscriber that raises is not dropped silently: the exception propagates
    to the training loop, because a broken checkpoint engine must not go unnoticed.
    """

    def __init__(self) -> None:
        self._subscribers: list[tuple[int, Subscriber, frozenset[Phase] | None]] = []
        # per phase, its subscribers in subscription order; rebuilt on (un)subscribe, read without the lock by emit
        self._routes: dict[Phase, tuple[Subscriber, ...]] = {}
        self._next_handle = 0
        self._lock = threading.Lock()

    def subscribe(self, callback: Subscriber, phases: set[Phase] | None = None) -> int:
        """Calls ``callback`` for every event (or only for ``phases``); returns a handle for :meth:`unsubscribe`."""
        with self._lock:
            handle = self._next_handle
            self._next_handle += 1
            self._subscribers.append((handle, callback, frozenset(phases) if phases is not None else None))
            self._route()
            return handle

    def unsubscribe(self, handle: int) -> None:
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s[0] != handle]
            self._route()

    def _route(self) -> None:
        self._routes = {
            phase: tuple(callback for _, callback, phases in self._subscribers if phases is None or phase in phases)
            for phase in Phase
        }

    def emit(self, phase: Phase, step: int, bucket: int | None = None, block: int | None = None, **info: Any) -> PhaseEvent | None:
        """Calls the phase's subscribers with a new event and returns it; ``None`` (and no event is made) when the
        phase has none."""
        callbacks = self._routes.get(phase)
        if not callbacks:
            return None
        event = PhaseEvent(phase, step, time.perf_counter_ns(), bucket, info, block)
        for callback in callbacks:
            callback(event)
        return event


class PhaseTimer:
    """Subscriber that measures how long each phase lasted (milliseconds), per iteration.

    The duration of a phase is the time from its event to the next event. ``last_iteration_ms`` holds the phases
    of the most recently completed iteration. For users who want the host-side phase times
    (``strategy.bus.subscribe(PhaseTimer())``); the copy scheduler times its windows on the GPU instead.
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


def find_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (transformer layers, residual blocks), in registration order.

    They are the instances of the composite module class (one with submodules, containers aside) that occurs most
    often, ties going to the class that holds more parameters: a transformer layer rather than its attention or MLP
    part. Leaves (linear layers, norms, activations) never count. Empty if no composite class repeats.
    """
    by_class: dict[type, list[torch.nn.Module]] = {}
    for sub in module.modules():
        # containers repeat by construction; a block has parameters of its own below it
        if sub is module or isinstance(sub, (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)):
            continue
        if next(sub.children(), None) is None:
            continue
        by_class.setdefault(type(sub), []).append(sub)
    best: list[torch.nn.Module] = []
    best_key = (0, 0)
    for instances in by_class.values():
        if len(instances) < 2:
            continue
        key = (len(instances), sum(p.numel() for m in instances for p in m.parameters()))
        if key > best_key:
            best, best_key = instances, key
    return best


def install_block_hooks(blocks: Sequence[torch.nn.Module], on_forward: Callable[[int], None], on_backward: Callable[[int], None], wanted: Callable[[Phase, int], bool]) -> list[Any]:
    """Calls ``on_forward(i)`` when block ``i`` starts its forward pass and ``on_backward(i)`` when its backward pass
    starts (the gradient of its output arrives), where ``wanted(Phase.FORWARD_BLOCK, i)`` (or ``BACKWARD_BLOCK``)
    is true at the block's forward pass. Returns the hook handles.

    The backward side is a hook on the block's output tensor rather than a module backward hook: it leaves the
    autograd graph as it is (module backward hooks wrap inputs and outputs and reject in-place updates of them).
    A block run again inside backward (activation checkpointing) announces nothing, since ``wanted`` is then false.
    """
    handles = []
    for index, block in enumerate(blocks):

        def before(_module: torch.nn.Module, _inputs: Any, index: int = index) -> None:
            if wanted(Phase.FORWARD_BLOCK, index):
                on_forward(index)

        def after(_module: torch.nn.Module, _inputs: Any, output: Any, index: int = index) -> None:
            if not torch.is_grad_enabled() or not wanted(Phase.BACKWARD_BLOCK, index):
                return
            tensor = _first_tensor_needing_grad(output)
            if tensor is not None:
                tensor.register_hook(lambda _grad, index=index: on_backward(index) and None)  # None: grad unchanged

        handles.append(block.register_forward_pre_hook(before))
        handles.append(block.register_forward_hook(after))
    return handles


def _first_tensor_needing_grad(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            found = _first_tensor_needing_grad(item)
            if found is not None:
                return found
    return None

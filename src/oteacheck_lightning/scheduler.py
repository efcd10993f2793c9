"""The bubble scheduler: decides at which phase of iteration *t+1* each partition of snapshot *t* is issued.

State machine (one snapshot at a time; the training thread drives every transition)::

    IDLE --begin(partitions)--> ARMED --bubble event--> ISSUING --bubble event--> ISSUING ...
      ^                                                     |
      +--------------------- fence() ----------------------+   (fence hands back all that is not issued yet)

* ``begin`` (end of optimizer step *t*): the plan of snapshot *t* becomes the queue; the per-phase budgets are
  learned from earlier iterations (:meth:`learn`). A window's duration is the shortest of its recent measurements:
  anything in a window that waits for the copy engine (a device-wide synchronize, a ``.item()``) stretches that
  window by the copies queued before it, and learning the stretched length would hand the window a still larger
  budget next time. Consecutive windows are then joined into groups, each issued at once at its first window's
  event: every issue costs the training thread a fixed time (events, a stream switch), and in a loop bound by the
  host that time is iteration time. So the groups are as many as ``host_share`` of the iteration pays for at the
  measured cost of one issue, and no more than the windows.
* at each group's first event in iteration *t+1* (``on_event``), the scheduler returns the next partitions that fit
  the group's budget: ``group ms x measured copy bandwidth x safety``, minus what is still in flight from earlier
  groups (an expected "copy clock"). With ``avoid_allreduce`` the backward windows, where DeepSpeed reduces
  gradient buckets, get no budget, and no group spans them.
* the last group of the iteration takes everything left, whatever its budget: the fence could only issue it later.
* *sync windows*: a window that stretched, against its shortest length, by at least half the copy time in flight
  in it and by 5% of the iteration holds a point where training waits for the copy engine (a ``.item()``, a mask
  check that reads a GPU tensor: a GPU serves device-to-host transfers in order, so it waits behind every snapshot
  byte queued before it). Such a window is closed to copies from then on, like an all-reduce window: it ends a
  group, and the copies issued before it get only the budget that is done by its start (unless no copyable window
  follows it: then the last group still takes the rest). BERT in transformers checks its attention mask in forward:
  with the whole snapshot queued at iteration start, forward took 94 ms instead of 18.
* ``fence`` (BEFORE_STEP of *t+1*): everything left (before any window was measured, the whole snapshot) is issued at
  once; the copier then waits for all of it. That wait is the only stall. With ``front_load``, a window also takes whatever the rest of the iteration's windows are
  not expected to hold, so less is left for the fence (at the price of a longer queue early in the iteration).
* ``issue_late``: the first group opens at the latest window from which the copyable windows up to the fence still
  hold the whole snapshot (at the measured bandwidth, with the safety factor); the windows before it take nothing.
  On ResNet-50 and GPT-2 124M, host work at iteration start, while the training thread queues the next forward
  pass and the GPU waits for it, cost the iteration all or most of its time; after the forward pass was queued, half
  or nothing (the probe ablations of 2d2605c on an H100). The copies' issue (and the issuer thread's Python) then
  leaves that stretch whenever the later windows can carry the snapshot; a snapshot that needs every window (BERT-
  large's) keeps its plan. Off by default: in the paired run of 57609cc on a steady H100 host it cost more than the
  default on ResNet-50 (1.049x against 1.025x) and GPT-2 124M (1.011x against 1.002x).

Policies (the engine's ablation rows): ``naive`` and ``eager`` issue the whole plan at ITERATION_START (``naive``
with a per-tensor plan); ``bubbles`` spreads it over the bubbles by budget. Before it has measured an iteration,
``bubbles`` leaves everything to the fence: that one snapshot stalls for its whole copy, and the windows are learned
from an iteration no copy disturbed.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Mapping, Sequence

from .bubbles import Phase, PhaseEvent
from .plan import Partition

# events that open a window in which copies may run, in iteration order
BUBBLE_PHASES = frozenset(
    {
        Phase.ITERATION_START,
        Phase.FORWARD_START,
        Phase.FORWARD_BLOCK,
        Phase.FORWARD_END,
        Phase.BACKWARD_BLOCK,
        Phase.BUCKET_REDUCED,
        Phase.BACKWARD_END,
    }
)
# windows of one model block each (see bubbles.install_block_hooks)
BLOCK_PHASES = frozenset({Phase.FORWARD_BLOCK, Phase.BACKWARD_BLOCK})
# windows in which DeepSpeed reduces gradients (ZeRO 2/3 overlap reduction with backward)
_ALLREDUCE_PHASES = frozenset({Phase.FORWARD_END, Phase.BACKWARD_BLOCK, Phase.BUCKET_REDUCED})

log = logging.getLogger(__name__)

WindowKey = tuple[Phase, int | None]
# a loop bound by the host pays every issue call in iteration time: 0.3% of it goes to issuing
DEFAULT_HOST_SHARE = 0.003
# the least stretch of a window, as a share of the iteration, that counts as training waiting for the copies
SYNC_SHARE = 0.05


class SchedulePolicy(str, enum.Enum):
    NAIVE = "naive"
    EAGER = "eager"
    BUBBLES = "bubbles"


def window_key(event: PhaseEvent) -> WindowKey:
    return (event.phase, event.bucket if event.bucket is not None else event.block)


class BubbleScheduler:
    """Issues a snapshot's partitions into the bubbles of the next iteration, within learned byte budgets."""

    def __init__(
        self,
        policy: SchedulePolicy | str = SchedulePolicy.BUBBLES,
        avoid_allreduce: bool = False,
        safety: float = 0.8,
        history: int = 8,
        front_load: bool = False,
        host_share: float | None = DEFAULT_HOST_SHARE,
        last_takes_rest: bool = True,
        issue_late: bool = False,
    ) -> None:
        self.policy = SchedulePolicy(policy)
        if not 0 < safety <= 1:
            raise ValueError(f"safety must be in (0, 1], got {safety}")
        if host_share is not None and not 0 < host_share < 1:
            raise ValueError(f"host_share must be in (0, 1) or None (one issue per window), got {host_share}")
        # the share of an iteration the training thread may spend issuing copies; None: every window issues
        self.host_share = host_share
        self._issue_ms = 0.0
        self._group_ms: dict[WindowKey, float] = {}
        self.avoid_allreduce = avoid_allreduce
        self.safety = safety
        # issue at once what the rest of the iteration's windows cannot take, instead of leaving it to the fence
        self.front_load = front_load
        # the last group issues what is left instead of leaving it to the fence (False: budgets only, for tests)
        self.last_takes_rest = last_takes_rest
        self.issue_late = issue_late
        self._last_head: WindowKey | None = None
        self._queue: deque[Partition] = deque()
        self._queued_bytes = 0
        self._armed = False
        self._window_ms: dict[WindowKey, float] = {}
        self._windows_learned = 0  # counts updates of _window_ms: what the groups were derived from
        # key, copyable ms, groups, each window's expected start in the iteration, the group heads at model blocks
        self._derived: tuple[tuple, float, dict[WindowKey, float], dict[WindowKey, float], frozenset[WindowKey]] | None = None
        self._starts: dict[WindowKey, float] = {}
        self._issue_blocks: frozenset[WindowKey] = frozenset()  # the group heads at model blocks (see issue_blocks)
        self._history: dict[WindowKey, deque[float]] = {}
        self._history_len = history
        self._bytes_per_ms = 0.0
        # windows in which training waited for the copies (closed to copies), and the copy time expected in flight
        # in each window the last time its event came (block events come only in some iterations; windows are
        # learned from the last timed one)
        self._sync_windows: set[WindowKey] = set()
        self._inflight_ms: dict[WindowKey, float] = {}
        self._clock_ms = 0.0  # expected time since the first window of this iteration opened
        self._busy_until_ms = 0.0  # expected time the copies issued so far are done
        self.bytes_by_phase: dict[str, int] = {}
        self.fence_bytes = 0

    # --- learning -------------------------------------------------------------------------------------------

    def learn(self, window_ms: Mapping[WindowKey, float], bytes_per_ms: float, issue_ms: float = 0.0) -> None:
        """Durations of the windows of the last measured iteration (in iteration order), the copy bandwidth
        achieved, and the training thread's time per issue call."""
        if issue_ms > 0:
            self._issue_ms = issue_ms
        if window_ms:
            iteration_ms = sum(window_ms.values())
            for key, ms in window_ms.items():
                history = self._history.setdefault(key, deque(maxlen=self._history_len))
                if history and key not in self._sync_windows:
                    self._detect_sync(key, ms - min(history), iteration_ms)
                history.append(ms)
            # windows of the last iteration only (a model's blocks can change); each at its shortest recent length
            self._window_ms = {key: min(self._history[key]) for key in window_ms}
            self._windows_learned += 1
        if bytes_per_ms > 0:
            self._bytes_per_ms = bytes_per_ms

    def _detect_sync(self, key: WindowKey, stretch_ms: float, iteration_ms: float) -> None:
        inflight = self._inflight_ms.get(key, 0.0)
        # half the copy time in flight, and a share of the iteration: in a loop bound by the host, a host pause (the
        # collector, the data loader) stretches a window too, by a millisecond or two, which near the end of the
        # copies is half of what is still in flight (on an H200, 8 of GPT-2 355M's windows were closed for it and
        # it cost 6%); a wait that late costs little anyway
        if stretch_ms >= max(0.5 * inflight, SYNC_SHARE * iteration_ms) and inflight > 0:
            self._sync_windows.add(key)
            log.info("training waited for the snapshot copies in window %s (%.1f ms longer with %.1f ms of copies in "
                     "flight); no copies are issued across it from now on", key, stretch_ms, inflight)

    @property
    def sync_windows(self) -> frozenset[WindowKey]:
        """Windows in which training waited for the copy engine (closed to copies)."""
        return frozenset(self._sync_windows)

    @property
    def has_budgets(self) -> bool:
        return bool(self._window_ms) and self._bytes_per_ms > 0

    # --- one snapshot ----------------------------------------------------------------------------------------

    @property
    def armed(self) -> bool:
        return self._armed

    def begin(self, partitions: Sequence[Partition], planned_bytes: int | None = None) -> None:
        """Arms a snapshot's ``partitions`` (``planned_bytes``: their total, if the caller keeps it)."""
        if self._armed:
            raise RuntimeError("begin() while a snapshot is still being scheduled; fence() it first")
        self._queue = deque(partitions)
        # kept as partitions leave: front_load reads it per window
        self._queued_bytes = planned_bytes if planned_bytes is not None else sum(p.span for p in partitions)
        self._armed = True
        self._clock_ms = self._busy_until_ms = 0.0
        self._copyable_passed_ms = 0.0
        # copy time the windows of one iteration offer, and the groups: derived again only when what they come
        # from changed (the windows are retimed one snapshot in several), not at every snapshot
        affordable = self._affordable_issues()
        # copy time the snapshot needs (whole milliseconds: the bandwidth varies a little from snapshot to snapshot)
        need_ms = None
        if self.issue_late and self._bytes_per_ms > 0:
            need_ms = int(self._queued_bytes / (self._bytes_per_ms * self.safety)) + 1
        key = (self._windows_learned, affordable, self.avoid_allreduce, self.policy, len(self._sync_windows), need_ms)
        if self._derived is None or self._derived[0] != key:
            first = self._late_head(need_ms) if need_ms is not None else None
            copyable_ms = 0.0
            for k, ms in self._window_ms.items():
                if k == first:
                    copyable_ms = 0.0  # the windows before the late head take nothing
                if self._copyable(k):
                    copyable_ms += ms
            groups = self._groups(copyable_ms, affordable, first) if self.policy is SchedulePolicy.BUBBLES else {}
            starts, clock = {}, 0.0
            for k, ms in self._window_ms.items():
                starts[k], clock = clock, clock + ms
            self._derived = (key, copyable_ms, groups, starts, frozenset(k for k in groups if k[0] in BLOCK_PHASES))
        _, self._copyable_ms, self._group_ms, self._starts, self._issue_blocks = self._derived
        self._last_head = next(reversed(self._group_ms), None)
        self.bytes_by_phase = {}
        self.fence_bytes = 0

    def on_event(self, event: PhaseEvent) -> list[Partition]:
        """The partitions to issue now, at the start of the window ``event`` opens."""
        if not self._armed or event.phase not in BUBBLE_PHASES:
            return []
        if self.policy is not SchedulePolicy.BUBBLES:
            return self._take_all(event) if event.phase is Phase.ITERATION_START and self._queue else []
        if not self.has_budgets:
            return []
        key = window_key(event)
        window = self._window_ms.get(key, 0.0)
        # a window's start comes from the measured iteration, so windows whose events are left out (block events
        # in an iteration that issues nothing at a block) still count; a window not measured starts where we are
        start = self._starts.get(key, self._clock_ms)
        self._clock_ms = start + window
        issued = self._take(key, start, window) if self._queue else []
        # an empty queue still has copies in flight: their time in this window is what a stretch is compared with
        self._inflight_ms[key] = max(0.0, self._busy_until_ms - start)
        return issued

    def _take(self, key: WindowKey, start: float, window: float) -> list[Partition]:
        """The partitions the window ``key`` (opening at ``start``, ``window`` ms long) issues."""
        if not self._copyable(key):
            return []
        self._copyable_passed_ms += window
        span = self._group_ms.get(key)
        if span is None:  # inside a group: its first window issued for it
            return []
        # time this group leaves the copy engine once the copies already issued are through
        free_ms = start + span - max(self._busy_until_ms, start)
        budget = int(free_ms * self._bytes_per_ms * self.safety)
        if self.last_takes_rest and key == self._last_head:
            budget = self._queued_bytes
        if self.front_load:
            later = max(0.0, self._copyable_ms - (self._copyable_passed_ms - window + span)) * self._bytes_per_ms * self.safety
            budget = max(budget, int(self._queued_bytes - later))
        issued: list[Partition] = []
        while self._queue and budget >= self._queue[0].span:
            partition = self._queue.popleft()
            budget -= partition.span
            issued.append(partition)
        if issued:
            nbytes = sum(p.span for p in issued)
            self._queued_bytes -= nbytes
            self._busy_until_ms = max(self._busy_until_ms, start) + nbytes / self._bytes_per_ms
            self._count(key[0].value, nbytes)
        return issued

    def _copyable(self, key: WindowKey) -> bool:
        return not (self.avoid_allreduce and key[0] in _ALLREDUCE_PHASES) and key not in self._sync_windows

    def _affordable_issues(self) -> int | None:
        """How many issue calls ``host_share`` of an iteration pays for at the measured cost of one (``None``: no
        limit)."""
        if self.host_share is None or self._issue_ms <= 0:
            return None
        return int(self.host_share * sum(self._window_ms.values()) / self._issue_ms)

    def _late_head(self, need_ms: float) -> WindowKey | None:
        """The latest copyable window from which the copyable windows up to the fence last ``need_ms`` (the first
        copyable window when even all of them do not)."""
        head, left_ms = None, 0.0
        for key in reversed(self._window_ms):
            if self._copyable(key):
                head, left_ms = key, left_ms + self._window_ms[key]
                if left_ms >= need_ms:
                    break
        return head

    def _groups(self, copyable_ms: float, affordable: int | None, first: WindowKey | None = None) -> dict[WindowKey, float]:
        """The first window of each group, with the group's length: consecutive copyable windows joined until a
        group is at least ``copyable time / affordable`` long. A window no copy may enter ends a group; with
        ``first``, the windows before it are not part of any group."""
        least_ms = 0.0  # one group per window
        if affordable is not None and affordable < len(self._window_ms):
            least_ms = copyable_ms / max(1, affordable)
        groups: dict[WindowKey, float] = {}
        head: WindowKey | None = None
        waiting = first is not None
        for key, ms in self._window_ms.items():
            waiting = waiting and key != first
            if waiting or not self._copyable(key):
                head = None
                continue
            if head is None or groups[head] >= least_ms:
                head = key
                groups[head] = 0.0
            groups[head] += ms
        return groups

    @property
    def issue_blocks(self) -> frozenset[WindowKey]:
        """The model-block windows that are issue points of the armed snapshot: the other block events may be left
        out, as they would issue nothing."""
        return self._issue_blocks

    @property
    def groups(self) -> int:
        """Issue points of the armed snapshot (windows, or groups of them)."""
        return len(self._group_ms)

    def fence(self) -> list[Partition]:
        """Ends the snapshot: everything not issued yet, to be copied now (the stall)."""
        rest = list(self._queue)
        self._queue.clear()
        self._queued_bytes = 0
        self._armed = False
        self.fence_bytes = sum(p.span for p in rest)
        if rest:
            self._count(Phase.BEFORE_STEP.value, self.fence_bytes)
        return rest

    def _take_all(self, event: PhaseEvent) -> list[Partition]:
        issued = list(self._queue)
        self._queue.clear()
        self._queued_bytes = 0
        self._count(event.phase.value, sum(p.span for p in issued))
        return issued

    def _count(self, phase: str, nbytes: int) -> None:
        self.bytes_by_phase[phase] = self.bytes_by_phase.get(phase, 0) + nbytes

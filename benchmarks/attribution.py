"""Where a snapshot's host time goes: a torch profiler trace of some of the ablation's iterations, summed per
iteration by operator and CUDA runtime call, and compared between no checkpointing and each snapshot policy.

The ablation shows that a snapshot lengthens an iteration by more than our own functions take, and that the cost
goes away when nothing is copied (its ``dry`` modifier). The profile answers where the rest is spent: in CUDA
runtime calls that wait (``cudaStreamSynchronize``, a blocking ``cudaMemcpyAsync``), in kernel launches that got
slower, in operators' own CPU time or in Python between them, and whether the GPU's kernels got slower.

Used by ``python -m benchmarks.ablation --profile-rounds K``: the profiler runs for ``K`` rounds after warm-up and
the summary goes into ``profile__<model>__g<gpus>__<run>.json``. The profiler adds host time to every operator, so
the absolute numbers are the profiled loop's, not the plain one's; the differences between variants are what to read.
"""

from __future__ import annotations

import bisect
import statistics
from collections import defaultdict
from typing import Any

import torch

_MARKER = "ablation-iteration"
# the marker's own self time: Python and Lightning between operators
PYTHON = "(python between operators)"


class IterationProfiler:
    """Profiles steps ``first`` to ``last`` (inclusive), each inside a named range, so events can be told apart by
    iteration. Driven from the training thread: :meth:`iteration_start` at the start of every iteration."""

    def __init__(self, first: int, last: int, cuda: bool) -> None:
        self.first, self.last = first, last
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False)
        self._range: Any = None
        self._running = False
        self.steps: dict[str, int] = {}  # marker name -> step

    def iteration_start(self, step: int) -> None:
        self._end_range()
        if step == self.first and not self._running:
            self._profiler.start()
            self._running = True
        if step > self.last:
            self._stop()
        if self._running:
            name = f"{_MARKER}-{step}"
            self.steps[name] = step
            self._range = torch.profiler.record_function(name)
            self._range.__enter__()

    def close(self) -> None:
        self._end_range()
        self._stop()

    def _end_range(self) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def _stop(self) -> None:
        if self._running:
            self._profiler.stop()
            self._running = False

    def per_iteration(self) -> dict[int, dict[str, float]]:
        """Per profiled step, microseconds by name: the training thread's self CPU time per operator or runtime call
        (its Python between operators as :data:`PYTHON`), other threads' as ``[thread <id>] name`` (on a GPU,
        backward runs on autograd's device thread), and the GPU's busy
        time per kind of work as ``[gpu] kernels`` and ``[gpu] memcpy``/``memset``."""
        events = list(self._profiler.events() or [])
        markers = sorted((e for e in events if e.name in self.steps), key=lambda e: e.time_range.start)
        if not markers:
            return {}
        training_thread = markers[0].thread
        starts = [m.time_range.start for m in markers]
        out: dict[int, dict[str, float]] = {self.steps[m.name]: defaultdict(float) for m in markers}

        def owner(t: float) -> int | None:
            i = bisect.bisect_right(starts, t) - 1
            if i < 0 or t > markers[i].time_range.end:
                return None
            return self.steps[markers[i].name]

        for e in events:
            step = owner(e.time_range.start)
            if step is None:
                continue
            on_gpu = getattr(e, "device_type", None) not in (None, torch.autograd.DeviceType.CPU)
            if on_gpu:
                kind = "memcpy" if "memcpy" in e.name.lower() else "memset" if "memset" in e.name.lower() else "kernels"
                out[step][f"[gpu] {kind}"] += e.time_range.end - e.time_range.start
            elif e.name in self.steps:
                out[step][PYTHON] += e.self_cpu_time_total
            elif e.thread == training_thread:
                out[step][e.name] += e.self_cpu_time_total
            else:
                out[step][f"[thread {e.thread}] {e.name}"] += e.self_cpu_time_total
        return {step: dict(by_name) for step, by_name in out.items()}


def compare(per_step: dict[int, dict[str, float]], variant_of: dict[int, str], kept: set[int], top: int = 30) -> dict[str, Any]:
    """Mean milliseconds per kept iteration by name for each variant, and the names whose time a policy changed most
    against ``none`` (largest absolute difference first)."""
    by_variant: dict[str, list[dict[str, float]]] = defaultdict(list)
    for step, by_name in per_step.items():
        if step in kept:
            by_variant[variant_of.get(step, "none")].append(by_name)
    means: dict[str, dict[str, float]] = {}
    for variant, iterations in by_variant.items():
        names = {n for it in iterations for n in it}
        means[variant] = {n: statistics.mean(it.get(n, 0.0) for it in iterations) / 1e3 for n in names}
    result: dict[str, Any] = {"iterations": {v: len(its) for v, its in by_variant.items()}, "differences": {}}
    base = means.get("none", {})
    for variant, mean in means.items():
        if variant == "none":
            continue
        names = set(mean) | set(base)
        delta = {n: mean.get(n, 0.0) - base.get(n, 0.0) for n in names}
        cpu = [n for n in names if not n.startswith(("[gpu]", "[thread"))]
        threads = sorted({n.split("]")[0] + "]" for n in names if n.startswith("[thread")})
        result["differences"][variant] = {
            "training_thread_ms": {"none": sum(base.get(n, 0.0) for n in cpu), variant: sum(mean.get(n, 0.0) for n in cpu)},
            "other_threads_ms": {
                t: {"none": sum(v for n, v in base.items() if n.startswith(t)), variant: sum(v for n, v in mean.items() if n.startswith(t))}
                for t in threads
            },
            "largest_ms": [
                {"name": n, "none": round(base.get(n, 0.0), 4), variant: round(mean.get(n, 0.0), 4), "delta": round(delta[n], 4)}
                for n in sorted(names, key=lambda n: -abs(delta[n]))[:top]
            ],
        }
    result["none_top_ms"] = sorted(({"name": n, "ms": round(v, 4)} for n, v in base.items()), key=lambda r: -r["ms"])[:top]
    return result

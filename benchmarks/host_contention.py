"""Does a snapshot's copy slow the host? Host work timed alone and while the GPU copies (not a timed test).

    python -m benchmarks.host_contention --out DIR [--rounds 15] [--copy-mib 64]
    python -m benchmarks.host_contention --out DIR --smoke      # CPU only: checks the tool, measures nothing useful

Why: the training loops we benchmark are bound by the host on some machines, and there the engine's cost grows
with how long the copies are in flight, while doing everything but the copies (the ablation's ``dry``) costs
nothing. If the copies slow the CPU itself, no change to our host code can help; what kind of copy does it tells
where the contention is:

* ``d2h``: device to page-locked host memory, the engine's copy (the DMA engine writes host memory);
* ``h2d``: page-locked host memory to the device (the DMA engine reads host memory);
* ``d2d``: device to device (neither the link nor host memory is touched);
* ``idle``: nothing in flight.

Under each, the main thread times three kinds of host work, each about as long as a slice of a training iteration:

* ``python``: a pure-Python loop (the interpreter between operators, most of a training iteration here);
* ``memcpy``: one single-threaded copy between two host arrays (host memory bandwidth);
* ``launch``: many tiny kernel launches on the compute stream (the driver's launch path), without waiting for them.

The copies are queued on their own stream before the work starts, enough of them to outlast it (so no thread of
ours competes for the GIL). A piece of work that outlasted its copies is measured again with a queue twice as long
(that longer queue is kept for that work and copy from then on), so a work slowed by much is not timed partly
idle; pieces never covered are recorded as such and left out of the ratios. Every round runs
every condition, in a shuffled order, and each work's time under a condition is divided by its time idle in the
same round: the result is the median ratio with a 95% bootstrap interval. ``--smoke`` (no GPU) has one condition
besides ``idle``: ``host-copy``, a thread copying host memory (numpy copies release the GIL).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import measure

WORKS = ("python", "memcpy", "launch")
GPU_CONDITIONS = ("idle", "d2h", "h2d", "d2d")
SMOKE_CONDITIONS = ("idle", "host-copy")


def python_work(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i & 7
    return total


class HostWork:
    """The three kinds of host work, sized once (``calibrate``) to about ``target_ms`` each when idle."""

    def __init__(self, device: torch.device | None, memcpy_mib: int) -> None:
        self.device = device
        nbytes = memcpy_mib * 2**20
        self.src, self.dst = np.ones(nbytes, dtype=np.uint8), np.zeros(nbytes, dtype=np.uint8)
        self.python_n = 100_000
        self.launches = 500
        self.tiny = torch.zeros(16, device=device) if device is not None else None

    def run(self, work: str) -> tuple[float, float]:
        """Wall and CPU milliseconds of one piece of ``work``."""
        wall, cpu = time.perf_counter(), time.thread_time()
        if work == "python":
            python_work(self.python_n)
        elif work == "memcpy":
            np.copyto(self.dst, self.src)
        elif work == "launch":
            if self.tiny is None:
                raise ValueError("launch needs a GPU")
            for _ in range(self.launches):
                self.tiny.add_(1.0)
        else:
            raise ValueError(f"unknown work {work!r}")
        out = ((time.perf_counter() - wall) * 1e3, (time.thread_time() - cpu) * 1e3)
        if work == "launch":
            torch.cuda.synchronize(self.device)  # not timed: the launches' execution is not the question
        return out

    def calibrate(self, works: tuple[str, ...], target_ms: float) -> dict[str, float]:
        """Sizes each work to ``target_ms`` (the memcpy is sized by its array); returns each one's idle ms."""
        idle_ms = {}
        for work in works:
            self.run(work)
            ms = statistics.median(self.run(work)[0] for _ in range(3))
            scale = max(0.05, min(100.0, target_ms / max(ms, 1e-3)))
            if work == "python":
                self.python_n = max(1000, int(self.python_n * scale))
            elif work == "launch":
                self.launches = max(50, min(20_000, int(self.launches * scale)))
            idle_ms[work] = statistics.median(self.run(work)[0] for _ in range(3))
        return idle_ms


class GpuCopies:
    """Copies queued on their own stream, back to back, long enough to outlast one piece of host work."""

    def __init__(self, device: torch.device, copy_mib: int) -> None:
        nbytes = copy_mib * 2**20
        self.stream = torch.cuda.Stream(device=device)
        self.gpu_a = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        # device-to-device runs ~30 times faster than the link: larger copies keep the queue short (a full queue
        # would block the host while queueing)
        self.gpu_big = torch.empty(2, 16 * nbytes, dtype=torch.uint8, device=device)
        self.gbps: dict[str, float] = {}

    def _pair(self, condition: str) -> tuple[torch.Tensor, torch.Tensor]:
        return {"d2h": (self.host, self.gpu_a), "h2d": (self.gpu_a, self.host), "d2d": (self.gpu_big[1], self.gpu_big[0])}[condition]

    def measure_rate(self, condition: str, copies: int = 8) -> float:
        dst, src = self._pair(condition)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            for _ in range(copies):
                dst.copy_(src, non_blocking=True)
            end.record(self.stream)
        end.synchronize()
        self.gbps[condition] = copies * dst.numel() / (start.elapsed_time(end) * 1e6)
        return self.gbps[condition]

    def start(self, condition: str, seconds: float) -> torch.cuda.Event:
        """Queues ``seconds`` worth of copies; returns the event of their end."""
        dst, src = self._pair(condition)
        copies = max(2, int(seconds * self.gbps[condition] * 1e9 / dst.numel()) + 1)
        with torch.cuda.stream(self.stream):
            for _ in range(copies):
                dst.copy_(src, non_blocking=True)
        done = torch.cuda.Event()
        done.record(self.stream)
        return done


class HostCopies:
    """The CPU stand-in for a copy in flight (``--smoke``): a thread copying host memory until stopped."""

    def __init__(self, mib: int) -> None:
        self.a, self.b = np.ones(mib * 2**20, dtype=np.uint8), np.zeros(mib * 2**20, dtype=np.uint8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            np.copyto(self.b, self.a)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# copies are first queued for this many times a work's idle time; a piece whose copies ended before it is timed
# again with a queue QUEUE_GROWTH times longer, MAX_RETRIES times at most
FIRST_QUEUE_FACTOR, QUEUE_GROWTH, MAX_RETRIES = 3.0, 2.0, 3


def run_round(order: list[tuple[str, str]], work: HostWork, under: Callable[[str, str, float], Callable[[], bool]],
              queue_factor: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
    """One piece of work per (condition, work) in ``order``. ``under(condition, work, factor)`` starts the condition
    with copies queued for ``factor`` times the work's idle time and returns a function that ends it and says
    whether the copies outlasted the work; an uncovered piece is retried with a longer queue (``queue_factor``
    keeps the longer one for the rounds after)."""
    rows = []
    for condition, kind in order:
        for attempt in range(MAX_RETRIES + 1):
            factor = queue_factor.get((condition, kind), FIRST_QUEUE_FACTOR)
            finish = under(condition, kind, factor)
            wall_ms, cpu_ms = work.run(kind)
            covered = finish()
            if covered or attempt == MAX_RETRIES:
                break
            queue_factor[(condition, kind)] = factor * QUEUE_GROWTH
        rows.append({"condition": condition, "work": kind, "wall_ms": wall_ms, "cpu_ms": cpu_ms, "covered": covered,
                     "retries": attempt, "queue_factor": factor})
    return rows


def ratios_to_idle(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Per work and condition: each round's ``key`` over the same round's idle value, summarized."""
    out: dict[str, dict[str, Any]] = {}
    # a piece its copies did not cover was partly timed idle: it measures nothing
    by_round: dict[tuple[int, str, str], float] = {(r["round"], r["work"], r["condition"]): r[key] for r in rows
                                                   if r.get("covered", True)}
    for (rnd, kind, condition), value in sorted(by_round.items()):
        idle = by_round.get((rnd, kind, "idle"))
        if condition == "idle" or not idle:
            continue
        out.setdefault(kind, {}).setdefault(condition, {"ratios": []})["ratios"].append(value / idle)
    for per_condition in out.values():
        for summary in per_condition.values():
            summary["median"] = statistics.median(summary["ratios"])
            summary["ci95"] = measure.median_ci95(summary["ratios"])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_contention", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--work-ms", type=float, default=40.0, help="each piece of host work, sized to take this long idle")
    p.add_argument("--copy-mib", type=int, default=64, help="size of one queued copy")
    p.add_argument("--memcpy-mib", type=int, default=256, help="the host copy of the memcpy work")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--smoke", action="store_true", help="CPU only: a host-copy thread stands in for the GPU copies")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
    conditions = GPU_CONDITIONS if cuda else SMOKE_CONDITIONS
    works = WORKS if cuda else ("python", "memcpy")
    if args.smoke:
        args.memcpy_mib = min(args.memcpy_mib, 16)
    work = HostWork(device, args.memcpy_mib)
    idle_ms = work.calibrate(works, args.work_ms)

    if cuda:
        copies = GpuCopies(device, args.copy_mib)
        for condition in conditions[1:]:
            copies.measure_rate(condition)

        def under(condition: str, kind: str, factor: float) -> Callable[[], bool]:
            if condition == "idle":
                return lambda: True
            # a multiple of the work's idle time: work slowed down must still end before the copies do
            done = copies.start(condition, factor * idle_ms[kind] / 1e3 + 0.02)

            def finish() -> bool:
                covered = not done.query()
                done.synchronize()
                return covered
            return finish
    else:
        host = HostCopies(args.memcpy_mib)

        def under(condition: str, kind: str, factor: float) -> Callable[[], bool]:
            if condition == "idle":
                return lambda: True
            host.start()

            def finish() -> bool:
                host.stop()
                return True
            return finish

    rng = random.Random(0)
    pairs = [(c, w) for c in conditions for w in works]
    queue_factor: dict[tuple[str, str], float] = {}
    run_round(pairs, work, under, queue_factor)  # warm-up, not kept (it already learns the queue lengths)
    rows: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        order = pairs[:]
        rng.shuffle(order)
        rows += [dict(row, round=rnd) for row in run_round(order, work, under, queue_factor)]

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    result: dict[str, Any] = {
        "kind": "host_contention",
        "run": stamp,
        "smoke": args.smoke,
        "card": measure.card(),
        "host_cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "versions": measure.versions(),
        "command": "python -m benchmarks.host_contention " + " ".join(sys.argv[1:] if argv is None else argv),
        "rounds": args.rounds,
        "sizes": {"python_n": work.python_n, "launches": work.launches, "memcpy_mib": args.memcpy_mib,
                  "copy_mib": args.copy_mib},
        "copy_gbps": copies.gbps if cuda else {},
        "covered_fraction": statistics.fmean(r["covered"] for r in rows if r["condition"] != "idle"),
        "retries": sum(r["retries"] for r in rows),
        "queue_factor": {f"{c}/{w}": f for (c, w), f in sorted(queue_factor.items())},
        "idle_ms_median": {w: statistics.median(r["wall_ms"] for r in rows if r["work"] == w and r["condition"] == "idle")
                           for w in works},
        "wall_ratio": ratios_to_idle(rows, "wall_ms"),
        "cpu_ratio": ratios_to_idle(rows, "cpu_ms"),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"host_contention__g1__{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    for kind, per_condition in result["wall_ratio"].items():
        line = ", ".join(f"{c} {s['median']:.3f}x {_ci(s['ci95'])}" for c, s in per_condition.items())
        print(f"{kind:7s} idle {result['idle_ms_median'][kind]:.1f} ms; {line}")
    print(f"copies outlasted the work in {result['covered_fraction']:.0%} of the pieces ({result['retries']} retried "
          f"with longer queues; uncovered ones left out); copy GB/s {result['copy_gbps']}")
    print(f"wrote {path}")
    return result


def _ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[-]"


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


if __name__ == "__main__":
    main()

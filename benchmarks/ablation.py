"""The engine's ablation: snapshot policies interleaved in one training run, against no checkpointing in that run.

    python -m benchmarks.ablation --model gpt2-124m --gpus 1 --out docs/benchmarks/results

One process trains one model and switches, every ``--block`` iterations, between no snapshot (``none``) and a
snapshot policy: ``naive`` (per-tensor copies at iteration start), ``eager`` (bucket partitions at iteration start)
or ``bubbles`` (the engine). Every policy block follows a block of ``none`` of its own, and the policies take turns
in a rotated order each round, so all of them share the process, GPU clocks and memory layout, which separate runs
do not (the iteration time of one configuration moved by 15% between processes on the same card). Within one run
the iteration time still drifts in stretches of many iterations, so the overhead is paired: each policy block is
compared with the ``none`` block right before it, ``overhead`` is the median of those ratios, and
``overhead_ci95`` a bootstrap interval over the pairs. The first ``--skip`` iterations of each block are left out,
and so is the last (the next block's first snapshot is taken at its end).

Short blocks pair best: the drift within a run (p10 to p90 of no checkpointing alone spanned 19-37% of the median
on H200s) moves over tens of iterations, so two iterations six apart see nearly the same conditions. The default
``--block 3 --skip 1`` keeps the middle iteration of each block, which in a policy block carries the cost of
snapshotting every iteration (the copies of the snapshot taken before it, the capture of its own, the seal of the
one before that, once its copies landed) and in a ``none`` block none of it (its first iteration, left out, may
still seal the last policy snapshot). ``--rounds`` sets the pairs per policy (8-iteration blocks and six pairs gave
95% intervals 5-30% wide on H200s; these defaults, with 30-40 pairs, gave 3-11%).

Modifiers for diagnosis, joined with ``+``: ``pump`` (feed the copy stream from a thread), ``inline`` (queue the
copies on the training thread instead of the issuer thread), ``coarse`` (no per-block
windows), ``frontload`` (issue at once what the later windows cannot hold), ``late`` (the first issue waits for the
latest window from which the rest of the iteration still holds the snapshot), ``noallreduce`` (no copies in gradient
all-reduce windows), ``fine`` (one issue call per window instead of the groups the measured issue cost pays for),
``dry`` (plan and schedule, copy nothing: the training thread's share of the cost), ``split`` (one copy call per
partition, not per contiguous run: on an H100 the training thread's kernel launches took 1.2 ms longer per
iteration while a coalesced snapshot was in flight; does the driver push a large copy's pieces inside later calls?),
``pinned`` (copy into one ``cudaHostAlloc`` buffer instead of the registered shared-memory slot: whether the kind
of host memory matters; the slot then holds no snapshot, so use it only here). A ``paced`` modifier (a GPU sleep after each partition on the
copy stream, to copy at half the link's rate) was tried at 83442d0 and removed: on an H100 it cost 1.359x, as
DeepSpeed's device-wide synchronize at the end of backward waits for the copy stream's sleeps too.

A ``probe`` variant takes no snapshot: it spins the training thread for ``--probe-ms`` (holding the GIL, as our
Python does) at one place of each iteration, named by its modifier: ``end`` (the step's end, where the capture runs),
``start`` (iteration start, where the RNG grab runs), ``fwd`` (after the forward pass is queued) or ``bwd`` (after
backward, past DeepSpeed's synchronize); ``side`` spins another thread from the forward pass's end, as the sealer's
Python runs there, which costs the training loop only through the GIL. Its overhead is the price of that much host
work at that place on this host: where the GPU waits for the host (the start of the next forward), all of it; where
the host runs ahead, less. It tells which of the engine's host work is worth moving, and where to. (The warm-up
takes its snapshots with the first variant that takes any.)

``--profile-rounds K`` appends ``K`` rounds run under the torch profiler (left out of the overheads) and writes
where each policy's extra time went, by operator and CUDA runtime call, to ``profile__<model>__g<gpus>__<run>.json``
(see :mod:`benchmarks.attribution`).

Per variant it writes ``ablation__<model>__<variant>__g<gpus>__<run>.json`` (``run``: the UTC start time) with the fields of the engine issue (``card``,
``gpus``, ``model``, ``method``, ``iter_ms_median``, ``overhead``, ``stall_ms_median``, ``extra_gpu_mib``,
``versions``, ``command``) plus GPU time of forward, backward and optimizer step, the bytes copied per phase, and
per iteration the training thread's and the process's CPU time, its waits for the GPU (``torch.cuda.synchronize``,
``Tensor.item``) and the garbage collector's pauses.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import queue
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from . import attribution, catalog, measure, models
from .methods import zero2_options

DEFAULT_VARIANTS = "none,naive,eager,bubbles"
# calls in which the training thread waits for the GPU (DeepSpeed synchronizes the device at the end of backward)
_GPU_WAITS = ((torch.cuda, "synchronize"), (torch.Tensor, "item"))
_TIMED = ("iteration_start", "forward_start", "forward_end", "backward_end", "before_step", "after_step")
# where a probe variant spins: the modifier, the phase event it spins at (None: the step's end, in the callback),
# and whether a thread of its own spins (started at that event) instead of the training thread
PROBE_SITES = {"end": (None, False), "start": ("iteration_start", False), "fwd": ("forward_end", False),
               "bwd": ("backward_end", False), "side": ("forward_end", True)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-124m")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--block", type=int, default=3, help="iterations per block")
    p.add_argument("--skip", type=int, default=1, help="iterations left out at the start of each block")
    p.add_argument("--rounds", type=int, default=40, help="blocks of each policy (each after a block of none)")
    p.add_argument("--warmup", type=int, default=16, help="iterations before measuring (half with snapshots)")
    p.add_argument("--staging-mib", type=int, default=64)
    p.add_argument("--probe-ms", type=float, default=1.0, help="host work of the probe variants, ms per iteration")
    p.add_argument("--profile-rounds", type=int, default=0, help="extra rounds under the torch profiler (attribution)")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU (checks the harness, measures nothing)")
    return p


class _Timeline:
    """Host time and, on a GPU, an event on the compute stream at each timed phase of each iteration; per
    iteration the CPU time of the training thread and of the whole process, the training thread's waits for the GPU
    and the garbage collector's pauses.

    The loops measured here are mostly bound by the host, so a snapshot's cost is mostly host time: the training
    thread's CPU time shows what it spent (cold caches included, which timing each function alone does not show),
    the process's what the engine's own threads spent too, the waits how much of that CPU time was a wait for the
    GPU that spins, and the collector's pauses whether a snapshot's objects made it run more often.

    On a GPU, each mark also asks (without waiting) whether the GPU has reached the mark before it: if not, the GPU
    is behind the host at this phase by at least that stretch, and host work placed here is hidden behind the
    GPU's queue. The probe ablations measured where host work costs; this says where the host leads, which is
    what an engine that placed its own host work would read."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: dict[int, dict[str, tuple[Any, float]]] = {}
        self.cpu: dict[int, tuple[float, float]] = {}  # step -> (training thread, process) CPU seconds at its start
        self.gc_s: dict[int, float] = {}
        self.sync_s: dict[int, float] = {}  # the training thread's waits for the GPU (synchronize, .item())
        self.variant_of: dict[int, str] = {}
        self.behind: dict[int, dict[str, bool]] = {}  # step -> phase -> the GPU had not reached the mark before
        self._last_event: Any = None
        self._step = -1
        self._gc_started = 0.0

    def mark(self, phase: str, step: int) -> None:
        event = None
        if self.cuda:
            if self._last_event is not None:
                self.behind.setdefault(step, {})[phase] = not self._last_event.query()
            event = self._last_event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.marks.setdefault(step, {})[phase] = (event, time.perf_counter())
        if phase == "iteration_start":
            self.cpu[step] = (time.thread_time(), time.process_time())
            self._step = step

    def timed_wait(self, fn: Any) -> Any:
        """``fn`` (a call that waits for the GPU), its wall time added to the iteration's when the training thread
        calls it: a wait that spins is CPU time, so this tells waiting from working."""
        training = threading.get_ident()

        @functools.wraps(fn)
        def wait(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != training:
                return fn(*args, **kwargs)
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync_s[self._step] = self.sync_s.get(self._step, 0.0) + time.perf_counter() - started

        return wait

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        # gc.callbacks: any thread's collection pauses every thread, so it counts for the iteration it falls in
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_s[self._step] = self.gc_s.get(self._step, 0.0) + time.perf_counter() - self._gc_started

    def span_ms(self, a: tuple[Any, float], b: tuple[Any, float]) -> float:
        return a[0].elapsed_time(b[0]) if self.cuda else (b[1] - a[1]) * 1e3

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for step in sorted(self.marks):
            cur, nxt = self.marks[step], self.marks.get(step + 1)
            if not nxt or "iteration_start" not in cur or "iteration_start" not in nxt:
                continue
            row: dict[str, Any] = {"step": step, "variant": self.variant_of.get(step, "none"),
                                   "iter_ms": self.span_ms(cur["iteration_start"], nxt["iteration_start"])}
            for name, a, b in (("forward_ms", "forward_start", "forward_end"), ("backward_ms", "forward_end", "backward_end"),
                               ("fence_wait_ms", "backward_end", "after_step")):
                row[name] = self.span_ms(cur[a], cur[b]) if a in cur and b in cur else None
            # the host's own clock too: what the training thread spent off the CPU is this less its CPU time
            row["host_ms"] = (nxt["iteration_start"][1] - cur["iteration_start"][1]) * 1e3
            if step in self.cpu and step + 1 in self.cpu:
                row["train_cpu_ms"] = (self.cpu[step + 1][0] - self.cpu[step][0]) * 1e3
                row["process_cpu_ms"] = (self.cpu[step + 1][1] - self.cpu[step][1]) * 1e3
            row["gc_ms"] = self.gc_s.get(step, 0.0) * 1e3
            row["sync_wait_ms"] = self.sync_s.get(step, 0.0) * 1e3
            row["gpu_behind"] = self.behind.get(step, {})
            out.append(row)
        return out


def _schedule(variants: list[str], args: argparse.Namespace) -> list[str]:
    # warm-up: first without snapshots (the baseline's peak memory), then with them, so every snapshot slot is
    # created and page-locked (about a second per slot) before anything is measured
    policies = [v for v in variants if v != "none"]
    snapshotting = next((v for v in policies if not v.startswith("probe")), policies[0])
    steps = ["none"] * (args.warmup // 2) + [snapshotting] * (args.warmup - args.warmup // 2)
    for r in range(args.rounds + args.profile_rounds):
        for v in policies[r % len(policies):] + policies[: r % len(policies)]:  # no policy always follows another
            steps += ["none"] * args.block + [v] * args.block
    return steps


def _begin_pinned(begin: Any, buffers: dict[int, torch.Tensor], buffer: torch.Tensor, tensors: Any) -> None:
    """A copier's ``begin`` with a page-locked buffer from ``cudaHostAlloc`` (one per size, reused) in place of the
    slot; page-locked already, so it is not registered."""
    scratch = buffers.get(buffer.numel())
    if scratch is None:
        scratch = buffers[buffer.numel()] = torch.empty(buffer.numel(), dtype=torch.uint8, pin_memory=True)
    registry = getattr(begin.__self__, "registry", None)
    if registry is not None:
        registry._registered[scratch.data_ptr()] = scratch.numel()  # nothing to register: it is pinned
    begin(scratch, tensors)


def _behind_share(rows: list[dict[str, bool]]) -> dict[str, float]:
    phases = sorted({phase for row in rows for phase in row}, key=_TIMED.index)
    return {phase: sum(row.get(phase, False) for row in rows) / len(rows) for phase in phases}


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from oteacheck_lightning import OTeaCheckpoint, OTeaCheckpointIO, OTeaCheckStrategy
    from oteacheck_lightning.scheduler import DEFAULT_HOST_SHARE

    variants = args.variants.split(",")
    if "none" not in variants:
        variants = ["none", *variants]
    for variant in variants:
        base, *mods = variant.split("+")
        if base == "probe" and (len(mods) != 1 or mods[0] not in PROBE_SITES):
            raise SystemExit(f"{variant}: a probe takes one place, probe+{'|'.join(PROBE_SITES)}")
    schedule = _schedule(variants, args)
    cuda = not args.smoke and torch.cuda.is_available()
    # the profiled rounds come last, so they disturb none of the measured ones
    profiled_from = args.warmup + args.rounds * (len(variants) - 1) * 2 * args.block
    profiler = attribution.IterationProfiler(profiled_from, len(schedule) - 1, cuda) if args.profile_rounds else None
    pl.seed_everything(1234)
    workdir = tempfile.mkdtemp(prefix="oteacheck-ablation-")
    io = OTeaCheckpointIO(job_id=f"ablation-{os.getpid()}", staging_mib=args.staging_mib)
    policy_cb = OTeaCheckpoint(dirpath=workdir, persist=[], log_metrics=False)
    strategy = OTeaCheckStrategy(checkpoint_io=io, **zero2_options(cuda))
    timeline = _Timeline(cuda)
    stats_of: dict[int, dict[str, Any]] = {}
    memory: dict[str, float] = {}
    copier_issue: dict[str, Any] = {}
    pinned: dict[int, torch.Tensor] = {}  # the pinned modifier's buffer by size
    probe_at: list[str | None] = [None]  # the phase event the coming iteration's probe spins at ("end": the step's end)
    probe_side = [False]  # whether the side thread spins instead of the training thread
    side_requests: queue.SimpleQueue = queue.SimpleQueue()

    def spin() -> None:
        until = time.perf_counter() + args.probe_ms / 1e3
        while time.perf_counter() < until:
            pass

    def side_loop() -> None:
        while side_requests.get() is not None:
            spin()

    def probe(event: Any) -> None:
        if event.phase.value != probe_at[0]:
            return
        if probe_side[0]:
            side_requests.put(True)
        else:
            spin()

    threading.Thread(target=side_loop, name="probe-side", daemon=True).start()

    def variant_for(step: int) -> str:
        return schedule[min(step, len(schedule) - 1)]

    def configure(step: int) -> None:
        """Sets up the snapshot taken at the end of ``step - 1``, copied during iteration ``step``."""
        variant = variant_for(step)
        timeline.variant_of[step] = variant
        base, *mods = variant.split("+")
        policy_cb.snapshot_every_n_steps = 10**9 if base in ("none", "probe") else 1
        probe_at[0], probe_side[0] = (PROBE_SITES[mods[0]][0] or "end", PROBE_SITES[mods[0]][1]) if base == "probe" else (None, False)
        engine = io.engine
        if engine is None or base in ("none", "probe"):
            return
        engine.set_policy(base)
        engine.pace_by_blocks = "coarse" not in mods
        engine.scheduler.front_load = "frontload" in mods
        engine.scheduler.issue_late = "late" in mods
        engine.scheduler.avoid_allreduce = "noallreduce" in mods
        engine.scheduler.host_share = None if "fine" in mods else DEFAULT_HOST_SHARE
        if hasattr(engine.copier, "pump"):
            engine.copier.pump = "pump" in mods
            engine.copier.issue_thread = "inline" not in mods
            engine.copier.coalesce = "split" not in mods
        if "issue" not in copier_issue:
            copier_issue["issue"], copier_issue["begin"] = engine.copier.issue, engine.copier.begin
        engine.copier.issue = (lambda partitions: None) if "dry" in mods else copier_issue["issue"]
        engine.copier.begin = copier_issue["begin"]
        if "pinned" in mods and cuda:
            engine.copier.begin = functools.partial(_begin_pinned, copier_issue["begin"], pinned)

    class Control(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            strategy.bus.subscribe(lambda e: timeline.mark(e.phase.value, e.step) if e.phase.value in _TIMED else None)
            strategy.bus.subscribe(probe)
            if profiler is not None:
                strategy.bus.subscribe(lambda e: profiler.iteration_start(e.step) if e.phase.value == "iteration_start" else None)
            gc.callbacks.append(timeline.on_gc)
            for owner, name in _GPU_WAITS:
                originals.append((owner, name, getattr(owner, name)))
                setattr(owner, name, timeline.timed_wait(getattr(owner, name)))
            configure(trainer.global_step)

        def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            step = trainer.global_step
            s = io.stats.last
            stats_of[step] = {"fence_ms": s.fence_ms, "stall_ms": s.stall_ms, "capture_ms": s.capture_ms, "seal_ms": s.seal_ms,
                              "gbps": s.copy_gbps, "by_phase": dict(s.bytes_by_phase), "sealed": s.step}
            if io.engine is not None:  # the copies of the iteration that just ended (its snapshot is fenced)
                e = io.engine.stats
                stats_of[step].update(issues=e.issues, issue_ms=e.issue_ms, issuer_ms=e.issuer_ms, groups=e.groups, sync_windows=e.sync_windows, start_ms=e.start_ms)
            if cuda and step == args.warmup // 2:
                memory["baseline_peak"] = torch.cuda.max_memory_allocated() / 2**20
                torch.cuda.reset_peak_memory_stats()
            configure(step)  # runs before OTeaCheckpoint (Lightning calls checkpoint callbacks last)
            if probe_at[0] == "end":  # where the snapshot of a policy variant would be captured
                spin()

    trainer = pl.Trainer(
        accelerator="cuda" if cuda else "cpu", devices=args.gpus, strategy=strategy,
        precision="bf16-mixed" if cuda else "32-true", max_steps=len(schedule), callbacks=[Control(), policy_cb],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, use_distributed_sampler=False, default_root_dir=workdir,
    )
    module = models.BenchModule(catalog.spec(args.model, args.smoke))
    started = time.time()
    originals: list[tuple[Any, str, Any]] = []
    try:
        trainer.fit(module)
    finally:
        if profiler is not None:
            profiler.close()
        if timeline.on_gc in gc.callbacks:
            gc.callbacks.remove(timeline.on_gc)
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    if cuda:
        torch.cuda.synchronize()
        memory["peak"] = torch.cuda.max_memory_allocated() / 2**20
    if trainer.global_rank != 0:
        return
    rows = [r for r in timeline.rows() if r["step"] < profiled_from]
    kept = measure.kept_in_blocks(rows, args.warmup, args.block, args.skip)
    none_ms = _median([r["iter_ms"] for r in kept if r["variant"] == "none"])
    command = "python -m benchmarks.ablation " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the same for every variant of this run (versions asks git twice)
    card, versions, batch = measure.card(), measure.versions(), catalog.spec(args.model, args.smoke).batch
    # names the process that measured: overheads compare only within one run, and runs must not overwrite each other
    run = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    summary = {}
    for variant in variants:
        mine = [r for r in kept if r["variant"] == variant]
        # the stats of iteration s's snapshot are complete after iteration s + 1 (sealed without waiting)
        snapshots = not variant.startswith(("none", "probe"))
        stats = [stats_of[r["step"] + 1] for r in mine if r["step"] + 1 in stats_of and snapshots]
        median_ms = _median([r["iter_ms"] for r in mine])
        ratios, interval = (measure.paired_overhead(kept, variant, args.warmup, args.block) if variant != "none"
                            else ([1.0], [1.0, 1.0]))
        result = {
            "status": "ok", "kind": "ablation", "run": run, "design": {"block": args.block, "skip": args.skip, "rounds": args.rounds},
            "card": card, "gpus": args.gpus, "model": args.model,
            "method": f"oteacheck-{variant}" if snapshots else variant.replace("+", "-"), "variant": variant,
            "every_n_steps": 1 if snapshots else None, "zero_stage": 2,
            "probe_ms": args.probe_ms if variant.startswith("probe") else None,
            "precision": "bf16-mixed" if cuda else "32-true", "batch": batch,
            "iterations": len(mine), "iter_ms": [r["iter_ms"] for r in mine], "iter_ms_median": median_ms,
            "iter_ms_mean": statistics.mean(r["iter_ms"] for r in mine) if mine else None,
            "overhead": statistics.median(ratios) if ratios else None,
            "overhead_ci95": interval,
            "overhead_pairs": ratios,
            # all kept iterations of the variant against all of none's, unpaired
            "overhead_pooled": median_ms / none_ms if median_ms and none_ms else None,
            "forward_ms_median": _median([r["forward_ms"] for r in mine]),
            "backward_ms_median": _median([r["backward_ms"] for r in mine]),
            "fence_wait_ms_median": _median([r["fence_wait_ms"] for r in mine]),
            # host time per iteration: the training thread's CPU, all threads' CPU, the collector's pauses (a mean:
            # most iterations have none)
            "host_ms_median": _median([r.get("host_ms") for r in mine]),
            "train_cpu_ms_median": _median([r.get("train_cpu_ms") for r in mine]),
            "process_cpu_ms_median": _median([r.get("process_cpu_ms") for r in mine]),
            "gc_ms_mean": statistics.mean(r["gc_ms"] for r in mine) if mine else None,
            # of the training thread's time, waiting for the GPU in torch.cuda.synchronize and Tensor.item
            "sync_wait_ms_median": _median([r.get("sync_wait_ms") for r in mine]),
            # per phase, the share of iterations in which the GPU had not reached the phase before it (GPU only)
            "gpu_behind_share": _behind_share([r["gpu_behind"] for r in mine]) if cuda else None,
            "stall_ms_median": _median([s["stall_ms"] for s in stats]),
            "fence_ms_median": _median([s["fence_ms"] for s in stats]),
            "capture_ms_median": _median([s["capture_ms"] for s in stats]),
            "copy_gbps_median": _median([s["gbps"] for s in stats]),
            # the training thread's calls that queued the copies, and its time in them
            "issues_median": _median([s.get("issues") for s in stats]),
            "issue_ms_median": _median([s.get("issue_ms") for s in stats]),
            # the issuer thread's CPU time making those copy calls (GPU only)
            "issuer_ms_median": _median([s.get("issuer_ms") for s in stats]),
            "groups_median": _median([s.get("groups") for s in stats]),
            # windows closed to copies because training waited for the copies there (at the last snapshot)
            "sync_windows": stats[-1].get("sync_windows") if stats else None,
            # the engine's part of the capture (boundary copies, plan, arming the copier and scheduler)
            "engine_start_ms_median": _median([s.get("start_ms") for s in stats]),
            "mib_by_phase": {k: v / 2**20 for k, v in (stats[len(stats) // 2]["by_phase"] if stats else {}).items()},
            "snapshot_mib_per_rank": io.stats.last.bytes / 2**20,
            # the engine's GPU memory is the ring, allocated at the first snapshot and kept: the peak after the
            # snapshot-free warm-up less the warm-up's peak
            "extra_gpu_mib": (memory["peak"] - memory["baseline_peak"]) if "peak" in memory and snapshots else 0.0,
            "wall_s": time.time() - started, "versions": versions, "command": command,
        }
        name = f"ablation__{args.model}__{variant.replace('+', '-')}__g{args.gpus}__{run}.json"
        (out / name).write_text(json.dumps(result, indent=1))
        summary[variant] = {k: result[k] for k in ("iter_ms_median", "overhead", "overhead_ci95", "stall_ms_median", "forward_ms_median",
                                                     "backward_ms_median", "fence_wait_ms_median", "host_ms_median", "train_cpu_ms_median",
                                                     "process_cpu_ms_median", "gc_ms_mean", "sync_wait_ms_median", "copy_gbps_median",
                                                     "capture_ms_median", "issues_median", "issue_ms_median", "issuer_ms_median", "groups_median", "sync_windows",
                                                     "gpu_behind_share", "extra_gpu_mib", "iterations")}
    if profiler is not None:
        profiled_kept = {s for s in range(profiled_from, len(schedule)) if args.skip <= (s - args.warmup) % args.block < args.block - 1}
        profile = attribution.compare(profiler.per_iteration(), timeline.variant_of, profiled_kept)
        profile.update(run=run, card=card, gpus=args.gpus, model=args.model, rounds=args.profile_rounds,
                       versions=versions, command=command)
        (out / f"profile__{args.model}__g{args.gpus}__{run}.json").write_text(json.dumps(profile, indent=1))
        summary["profile"] = {v: d["largest_ms"][:8] for v, d in profile["differences"].items()}
    print(json.dumps({"model": args.model, "card": card, "summary": summary}, indent=1, default=str))


if __name__ == "__main__":
    main()

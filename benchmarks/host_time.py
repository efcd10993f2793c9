"""Where a snapshot's host time goes: each piece timed at every call (wall time and the calling thread's CPU time)
in one training run with a snapshot every iteration.

    python -m benchmarks.host_time --model gpt2-124m [--policy bubbles] [--steps 30] [--out FILE]
    python -m benchmarks.host_time --model gpt2-124m --batch 1 --seq 16     # the same state on a CPU

The training loops of these models are bound by the host (DeepSpeed's Python per parameter fills most of an
iteration), so every millisecond of host work a snapshot costs is iteration time: on the training thread directly,
on the engine's own threads through the GIL. The pieces, by thread:

* training thread: ``capture`` at the step boundary (of it: ``collect`` of the state document and tensors,
  ``acquire`` of a slot, ``engine.start``), Lightning's checkpoint dict (``lightning-dump``), the RNG grab at the
  next iteration start (``grab-rng``), every phase event (``on-phase``), the ``fence``;
* sealer: ``prepare`` after the forward pass (of it: ``store-rng`` and the manifest's ``to-json``), then ``seal`` after
  the fence (the manifest's ``write``; all of it when nothing was prepared);
* copy issuer (CUDA): the copy calls of each window (``issue-window``).

The pieces nest (``capture`` contains ``collect``), so the column sums overlap. Wall time includes waiting (for the
GIL, for a lock); CPU time does not. ``--smoke``: a small GPT-2 on CPU (checks the tool; CPU numbers are not the
GPU host's).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from . import catalog, measure, models


def _pieces() -> list[tuple[str, str, Any, str]]:
    """(name, thread, owner, attribute) of every timed function."""
    from oteacheck_lightning import copier, engine, format, io, lightning_state, slots

    return [
        ("capture", "training", io.OTeaCheckpointIO, "capture"),
        ("collect", "training", io.OTeaCheckpointIO, "_collect"),
        ("acquire", "training", slots.SlotPool, "acquire"),
        ("engine.start", "training", engine.SnapshotEngine, "start"),
        ("lightning-dump", "training", lightning_state.LightningStateDump, "__call__"),
        ("grab-rng", "training", io, "grab_rng"),
        ("on-phase", "training", io.OTeaCheckpointIO, "on_phase"),
        ("fence", "training", io.OTeaCheckpointIO, "_fence"),
        ("prepare", "sealer", io.OTeaCheckpointIO, "_prepare"),
        ("seal", "sealer", io.OTeaCheckpointIO, "_seal"),
        ("store-rng", "sealer", io.OTeaCheckpointIO, "_store_rng"),
        ("to-json", "sealer", format.Manifest, "to_json"),
        ("write", "sealer", slots, "write_file_atomically"),
        ("issue-window", "issuer", copier.CudaCopier, "_enqueue_window"),
    ]


class _Timings:
    """Per piece and call: wall ms, CPU ms, and the CPU ms of the timed pieces it called (the fence runs inside a
    phase event, the RNG grab inside the fence): the piece's own time is its CPU time less that."""

    def __init__(self) -> None:
        self.on = False
        self.calls: dict[str, list[tuple[float, float, float]]] = {}
        self._nested = threading.local()  # per thread: the CPU ms of timed calls made by each open timed call

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            stack = self._nested.__dict__.setdefault("stack", [])
            stack.append(0.0)
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                cpu_ms = (time.thread_time() - cpu) * 1e3
                inner_ms = stack.pop()
                if stack:
                    stack[-1] += cpu_ms
                self.calls.setdefault(name, []).append(((time.perf_counter() - wall) * 1e3, cpu_ms, inner_ms))

        return timed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_time", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-124m")
    p.add_argument("--policy", default="bubbles", choices=["bubbles", "eager", "naive"])
    p.add_argument("--steps", type=int, default=30, help="measured iterations")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON file for the table")
    p.add_argument("--smoke", action="store_true", help="small model on CPU")
    p.add_argument("--batch", type=int, default=None, help="samples per step instead of the model's (e.g. 1 on a CPU)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sample instead of the model's (language models)")
    args = p.parse_args(argv)
    args.command = "python -m benchmarks.host_time " + " ".join(argv if argv is not None else sys.argv[1:])
    timings = _Timings()
    pieces = _pieces()
    originals = [(owner, attr, getattr(owner, attr)) for _, _, owner, attr in pieces]
    for (name, _, owner, attr), (_, _, fn) in zip(pieces, originals):
        setattr(owner, attr, timings.wrap(name, fn))
    try:
        _run(args, timings, pieces)
    finally:  # the wrappers go again (a caller in the same process gets the functions as they were)
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)


def _run(args: argparse.Namespace, timings: _Timings, pieces: list[tuple[str, str, Any, str]]) -> None:
    from oteacheck_lightning import OTeaCheckpoint, OTeaCheckpointIO, OTeaCheckStrategy

    cuda = torch.cuda.is_available() and not args.smoke
    workdir = tempfile.mkdtemp(prefix="oteacheck-host-time-")
    io = OTeaCheckpointIO(job_id=f"host-time-{os.getpid()}", schedule=args.policy)
    measured: dict[str, float] = {}

    class Window(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
            if trainer.global_step == args.warmup:
                timings.on, measured["start"] = True, time.perf_counter()

        def on_train_end(self, trainer: pl.Trainer, *_: Any) -> None:
            timings.on = False
            measured["iteration_ms"] = (time.perf_counter() - measured["start"]) / args.steps * 1e3

    trainer = pl.Trainer(
        accelerator="cuda" if cuda else "cpu", devices=1, strategy=OTeaCheckStrategy(stage=2, checkpoint_io=io),
        precision="bf16-mixed" if cuda else "32-true", max_steps=args.warmup + args.steps,
        callbacks=[Window(), OTeaCheckpoint(dirpath=workdir, persist=[], log_metrics=False)], logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, default_root_dir=workdir,
    )
    # the state and its snapshot depend on the model's configuration, not on the batch: a full-size model with a
    # small batch shows a snapshot's host work on a CPU
    spec = catalog.spec(args.model, args.smoke)
    spec = dataclasses.replace(spec, batch=args.batch or spec.batch, seq=args.seq or spec.seq)
    trainer.fit(models.BenchModule(spec))
    rows = []
    for name, thread, _, _ in pieces:
        calls = timings.calls.get(name, [])
        if not calls:
            continue
        rows.append({
            "piece": name, "thread": thread, "calls_per_iteration": len(calls) / args.steps,
            "wall_ms_median": statistics.median(w for w, _, _ in calls),
            "cpu_ms_median": statistics.median(c for _, c, _ in calls),
            "cpu_ms_per_iteration": sum(c for _, c, _ in calls) / args.steps,
            # without the timed pieces it called: these add up to the thread's whole time in timed pieces
            "self_cpu_ms_per_iteration": sum(c - inner for _, c, inner in calls) / args.steps,
        })
    print(f"{args.model} (batch {spec.batch}), {args.policy}, {measure.card()}: {measured['iteration_ms']:.1f} ms per iteration")
    print(f"{'piece':16s} {'thread':9s} {'calls/it':>8s} {'wall ms':>8s} {'CPU ms':>8s} {'CPU ms/it':>9s} {'self/it':>8s}")
    for r in rows:
        print(f"{r['piece']:16s} {r['thread']:9s} {r['calls_per_iteration']:8.1f} {r['wall_ms_median']:8.3f} "
              f"{r['cpu_ms_median']:8.3f} {r['cpu_ms_per_iteration']:9.3f} {r['self_cpu_ms_per_iteration']:8.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "model": args.model, "batch": spec.batch, "seq": spec.seq, "policy": args.policy, "card": measure.card(),
            "iteration_ms": measured["iteration_ms"],
            "steps": args.steps, "rows": rows, "versions": measure.versions(),
            "command": args.command,
        }, indent=1))


if __name__ == "__main__":
    main()

"""One benchmark: a (method, model, GPU count) training run, measured, written as one JSON result.

    python -m benchmarks.run --model gpt2-124m --method oteacheck --gpus 1 --steps 60 --warmup 10 --out DIR

This process is a driver. It starts the training in a child process (``--role train``), which trains
``warmup + steps`` iterations, measures the last ``steps`` and writes its numbers. With ``--recovery`` the child
then simulates a failure (it dies without any clean-up, in the middle of the next iteration, so shared memory and
files stay as a crash leaves them and in-flight background writes are lost), and the driver restarts training
from each tier the method supports (``--role recover``), timing restart to the end of the first step
(``recovery_s_memory``, ``recovery_s_disk``) and counting the steps lost (``work_lost_steps``). ``start_s`` is the
same time for a fresh start, for comparison.

``overhead`` and ``extra_gpu_mib`` need the no-checkpointing run of the same model; ``benchmarks.matrix`` fills
them in after all runs of a matrix.

``--paired-block N`` (OTeaCheck methods, a snapshot every iteration) measures the overhead within this process
instead, the way ``benchmarks.ablation`` does: after the warm-up, blocks of ``N`` iterations alternate between no
snapshot and a snapshot every iteration, each snapshot block is compared with the block right before it, and
``overhead_paired`` is the median of those ratios with a 95% bootstrap interval (``overhead_ci95``). Separate
processes of one configuration differed by up to 20% on one card, more than OTeaCheck's whole cost; the other
methods cost tens of times the iteration there, and the asynchronous ones would carry their writes into the next
block, so they are measured against the baseline's process.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from . import catalog

ROOT = Path(__file__).resolve().parents[1]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--gpus", type=int, default=1, help="GPUs (processes on CPU)")
    p.add_argument("--steps", type=int, default=60, help="measured iterations")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--every-n-steps", type=int, default=1,
                   help="checkpoint interval in optimizer steps (0: the method's own adaptive choice, checkfreq only)")
    p.add_argument("--persist-every-n-steps", type=int, default=50, help="oteacheck: persist to local disk every N")
    p.add_argument("--staging-mib", type=int, default=64, help="oteacheck ablations: GPU staging ring size")
    p.add_argument("--overhead-budget", type=float, default=0.05, help="checkfreq's adaptive budget")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU, fp32")
    p.add_argument("--accelerator", default=None, help="default: cuda if available and not --smoke, else cpu")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop measuring once training ran this long (at least 5 measured iterations)")
    p.add_argument("--timeout", type=float, default=600, help="kill a child process after this many seconds")
    p.add_argument("--recovery", action="store_true", help="simulate a failure and time the restart")
    p.add_argument("--paired-block", type=int, default=0,
                   help="OTeaCheck methods at every step: alternate blocks of this many iterations without and with "
                        "snapshots, overhead paired within the run (0: off; at least 3)")
    p.add_argument("--workdir", default=None, help="checkpoint folder (default: a fresh folder under $TMPDIR)")
    p.add_argument("--tag", default=None, help="matrix run id, stored in the result")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--role", choices=["driver", "train", "recover"], default="driver", help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--recover-from", default=None, help=argparse.SUPPRESS)
    return p


def result_name(model: str, method: str, gpus: int, every: int) -> str:
    return f"{model}__{method}__g{gpus}__n{every}.json"


# --- child: training ------------------------------------------------------------------------------------------


def _accelerator(args: argparse.Namespace) -> str:
    if args.accelerator:
        return args.accelerator
    import torch

    return "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"


def _build(args: argparse.Namespace, accelerator: str, record: Any, timer: Any, extra_callbacks: list, max_steps: int) -> tuple[Any, Any]:
    import lightning.pytorch as pl

    from . import methods, models

    pl.seed_everything(args.seed, workers=True)
    strategy, callbacks, plugins, enable_checkpointing = methods.make_strategy(args.method, accelerator, record, args)
    module = models.BenchModule(catalog.spec(args.model, args.smoke), seed=args.seed)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=args.gpus,
        strategy=strategy,
        precision="bf16-mixed" if accelerator == "cuda" else "32-true",
        max_steps=max_steps,
        callbacks=[timer, *extra_callbacks, *callbacks],
        plugins=plugins or None,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=enable_checkpointing,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        default_root_dir=args.workdir,
    )
    return trainer, module


def _write_json(path: str | Path, data: dict) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


class _OTeaCheckProbe:
    """Reads the OTeaCheck engine's own metrics at each iteration end: a newly sealed snapshot brings its stall
    (``oteacheck/stall_ms``), a newly persisted step its durable time."""

    def __init__(self, record: Any, step_end: dict[int, float]) -> None:
        self.record, self.step_end = record, step_end
        self.sealed = 0
        self.persisted: dict[str, int] = {}

    def __call__(self, trainer: Any, step: int) -> None:
        stats = trainer.strategy.checkpoint_io.stats
        last = stats.last  # one sealed snapshot's numbers, published whole by the sealer
        if last.count != self.sealed:
            self.sealed = last.count
            self.record.stall_ms.append(last.stall_ms)
            self.record.taken.append(last.step)
            # the engine's own breakdown
            for key in ("fence_ms", "capture_ms", "seal_wait_ms", "seal_ms", "copy_gbps"):
                self.record.extra.setdefault(key, []).append(float(getattr(last, key)))
            self.record.extra.setdefault("skipped_snapshots", []).append(float(stats.skipped))
            for phase, nbytes in last.bytes_by_phase.items():
                self.record.extra.setdefault(f"mib_{phase}", []).append(nbytes / 2**20)
        for name, tier in stats.tiers.items():
            if tier.persisted_step != self.persisted.get(name, -1) and tier.persisted_step in self.step_end:
                self.persisted[name] = tier.persisted_step
                self.record.durable(tier.persisted_step, self.step_end[tier.persisted_step], name)


class PairedGate:
    """Turns OTeaCheck's snapshots off and on in alternating blocks of ``block`` iterations from ``first_step``
    (before it, on: the warm-up creates the slots). Runs at each batch end before the checkpoint callback (Lightning
    calls those last), so it decides whether the snapshot taken there, copied during the iteration that starts at
    the new global step, is taken."""

    def __init__(self, first_step: int, block: int) -> None:
        self.first_step, self.block = first_step, block
        self.variant_of: dict[int, str] = {}
        self._callback: Any = None

    def variant(self, step: int) -> str:
        """What iteration ``step`` (its global step at its start) carries: a snapshot's copies or none."""
        if step < self.first_step:
            return "warmup"
        return "snapshot" if (step - self.first_step) // self.block % 2 else "none"

    def __call__(self, trainer: Any, step: int) -> None:
        if self._callback is None:
            from oteacheck_lightning import OTeaCheckpoint

            self._callback = next(c for c in trainer.callbacks if isinstance(c, OTeaCheckpoint))
        self.variant_of[step] = variant = self.variant(step)
        self._callback.snapshot_every_n_steps = 10**12 if variant == "none" else 1

    def summary(self, steps: list[int], times: list[float]) -> dict[str, Any]:
        """The paired overhead of the measured iterations (``steps``: each one's global step at its start)."""
        from . import measure

        rows = [{"step": s, "variant": self.variant_of.get(s, "warmup"), "iter_ms": t} for s, t in zip(steps, times)]
        kept = measure.kept_in_blocks(rows, self.first_step, self.block, skip=1)
        ratios, interval = measure.paired_overhead(kept, "snapshot", self.first_step, self.block)
        mine = [r["iter_ms"] for r in kept if r["variant"] == "snapshot"]
        none = [r["iter_ms"] for r in kept if r["variant"] == "none"]
        return {"ratios": ratios, "interval": interval, "snapshot_ms": mine, "none_ms": none}


def slot_warmup(args: argparse.Namespace) -> int:
    """OTeaCheck creates and page-locks a shared-memory slot at each of its first snapshots (3 slots, 2 more with a
    persist tier; about a second per GB), a one-time cost: a warm-up this long covers them, so the measured
    iterations are the steady state (BERT-large measured 1.6-1.9 s iterations right after a 5-iteration warm-up).
    0 for the other methods."""
    if args.method not in catalog.OTEACHECK_METHODS or args.method == "none":
        return 0
    slots = 3 + (2 if args.persist_every_n_steps else 0)
    return (slots + 1) * max(args.every_n_steps, 1) + 1


def effective_warmup(args: argparse.Namespace) -> int:
    return max(args.warmup, slot_warmup(args))


def train_child(args: argparse.Namespace) -> None:
    marks = {"entered": time.time()}  # where a run's start-up goes: see start_phases_s
    accelerator = _accelerator(args)
    if accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(args.gpus, 1)))
    import lightning.pytorch as pl
    import torch

    from . import measure, methods

    marks["imported"] = time.time()
    record = methods.Record(latest_file=Path(args.workdir) / f"latest-rank{os.environ.get('LOCAL_RANK', '0')}.json")
    warmup = effective_warmup(args)
    if warmup > args.warmup:
        record.notes.append(f"warm-up raised from {args.warmup} to {warmup} iterations: the snapshot slots are created "
                            "and page-locked at the first snapshots")
    # a slow warm-up may be cut short to fit the time slot, but not into the slots' creation
    # a run cut short by --max-seconds still holds two pairs of blocks
    timer = measure.IterationTimer(warmup, args.steps, max_seconds=args.max_seconds, min_warmup=max(2, slot_warmup(args)),
                                   min_measured=max(5, 4 * args.paired_block))
    step_end: dict[int, float] = {}
    timer.on_iteration_end.append(lambda trainer, step: step_end.__setitem__(step, time.perf_counter()))
    if args.method in catalog.OTEACHECK_METHODS and args.method != "none":
        timer.on_iteration_end.append(_OTeaCheckProbe(record, step_end))
    gate = PairedGate(warmup, args.paired_block) if args.paired_block else None
    if gate is not None:
        timer.on_iteration_end.append(gate)  # the timer runs before the checkpoint callback, so the gate does too

    def finish(trainer: pl.Trainer, crash: bool) -> None:
        """Writes the result (rank 0) and ends the process: at the last measured iteration, or at the end of a fit
        that stopped before it."""
        if trainer.global_rank == 0:
            _write_json(args.result_file, {**_train_result(args, trainer, timer, record, accelerator, gate),
                                           "start_marks_wall": marks})
        if crash:
            # a failure: no teardown, no flush, no clean-up; background threads die mid-write
            os._exit(17)
        # everything measured is written; the teardown (the method's threads, the process group, CUDA) is in no
        # result, and every run of a GPU call waited for it (about half of the 3 s after a CPU smoke run's last step)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    class Failure(pl.Callback):
        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            finish(trainer, crash=args.recovery)

    timer.at_last_mark = lambda trainer: finish(trainer, crash=args.recovery)
    trainer, module = _build(args, accelerator, record, timer, [Failure()], warmup + args.steps + 1)
    if accelerator == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timer.fit_called_wall = marks["fit_called"] = time.time()
    trainer.fit(module)
    finish(trainer, crash=False)


def _train_result(args: argparse.Namespace, trainer: Any, timer: Any, record: Any, accelerator: str,
                  gate: PairedGate | None = None) -> dict:
    import torch

    from . import measure, methods, models

    times = timer.iteration_ms()
    steps = timer.measured_steps()
    window = {s + 1 for s in steps}
    paired = gate.summary(steps, times) if gate is not None else None
    # paired: the iteration times are those of the snapshot blocks' kept iterations (a snapshot every iteration)
    stats = measure.summarize(paired["snapshot_ms"] if paired is not None else times)
    in_window = [i for i, s in enumerate(record.taken) if s in window]
    stall = measure.summarize([record.stall_ms[i] for i in in_window if i < len(record.stall_ms)] or record.stall_ms)
    durable = measure.summarize(record.durable_s)
    seconds = sum(times) / 1e3
    checkpoints = len(in_window)
    tensors, _ = methods.rank_state(trainer)
    state_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    every = args.every_n_steps
    if record.every_n_steps_chosen:
        every = record.every_n_steps_chosen[-1]
    iter_s = (stats["mean"] or 0) / 1e3
    if paired is not None and iter_s > 0:
        checkpoints_per_hour = 3600 / iter_s  # one per iteration in the snapshot blocks
    else:
        checkpoints_per_hour = checkpoints / seconds * 3600 if seconds > 0 else None
    pairing: dict[str, Any] = {}
    if paired is not None:
        none_median = measure.summarize(paired["none_ms"])["median"]
        overhead = statistics.median(paired["ratios"]) if paired["ratios"] else None
        pairing = {
            "paired": {"block": args.paired_block, "skip": 1, "pairs": len(paired["ratios"]), "first_step": gate.first_step},
            "overhead_paired": overhead,
            "overhead_ci95": paired["interval"],
            "overhead_pairs": paired["ratios"],
            "paired_none_iter_ms_median": none_median,
            # what a snapshot adds to the iteration that copies it, against the no-snapshot block before it
            "cost_ms_per_checkpoint": (overhead - 1) * none_median if overhead is not None and none_median else None,
        }
    disk_every = args.persist_every_n_steps if args.method in catalog.OTEACHECK_METHODS else every
    lag_steps = (durable["median"] / iter_s) if durable["median"] is not None and iter_s > 0 else None
    return {
        "status": "ok",
        "card": measure.card(),
        "accelerator": accelerator,
        "gpus": args.gpus,
        "model": args.model,
        "method": args.method,
        "baseline_method": catalog.baseline_of(args.method),
        "smoke": args.smoke,
        "precision": "bf16-mixed" if accelerator == "cuda" else "32-true",
        "zero_stage": 2,
        "batch": catalog.spec(args.model, args.smoke).batch,
        "params": models.parameter_count(trainer.lightning_module),
        "state_mib_per_rank": state_bytes / 2**20,
        "every_n_steps": every,
        "every_n_steps_requested": args.every_n_steps,
        "every_n_steps_history": record.every_n_steps_chosen,
        "persist_every_n_steps": args.persist_every_n_steps if args.method.startswith("oteacheck") else None,
        "steps_measured": len(times),
        "measured_first_step": steps[0] if steps else None,
        "checkpoint_steps": [s for s in record.taken if s in window],
        "warmup": timer.warmup,
        "stopped_early": timer.stopped_early,
        "iter_ms": times,
        "iter_ms_median": stats["median"],
        "iter_ms_p90": stats["p90"],
        "iter_ms_mean": stats["mean"],
        "overhead": None,
        "overhead_median": None,
        "checkpoints": checkpoints,
        "checkpoints_per_hour": checkpoints_per_hour,
        "stall_ms": [record.stall_ms[i] for i in in_window if i < len(record.stall_ms)],
        "stall_ms_median": stall["median"],
        "stall_ms_p90": stall["p90"],
        "durable_s": durable["median"],
        "durable_s_p90": durable["p90"],
        "durable_count": len(record.durable_s),
        # a failure at a random moment, on average: losing the process (memory tier survives, OTeaCheck only),
        # losing the node (only what is durable on disk counts)
        "work_lost_steps_expected_memory": (methods.expected_work_lost(every, 1.0)
                                            if args.method in catalog.OTEACHECK_METHODS and args.method != "none" else None),
        "work_lost_steps_expected_disk": (methods.expected_work_lost(disk_every, lag_steps)
                                          if lag_steps is not None and args.method not in ("none", "none-deepspeed") else None),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if accelerator == "cuda" else None,
        "extra_gpu_mib": None,
        "host_rss_mib": measure.peak_rss_mib(),
        "method_metrics_median": {k: measure.summarize(v)["median"] for k, v in record.extra.items()},
        "errors": list(record.errors),
        "notes": list(record.notes),
        "failed_at_step": trainer.global_step,
        "first_step_end_wall": timer.first_step_end_wall,
        # without process start-up and imports: set-up (engine, model on the device) and the first iteration
        "fit_to_first_step_s": (timer.first_step_end_wall - timer.fit_called_wall
                                if timer.first_step_end_wall and getattr(timer, "fit_called_wall", None) else None),
        "versions": measure.versions(),
        **pairing,
    }


# --- child: recovery -----------------------------------------------------------------------------------------


def recover_child(args: argparse.Namespace) -> None:
    accelerator = _accelerator(args)
    if accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import lightning.pytorch as pl
    import torch

    from . import measure, methods

    record = methods.Record()
    timer = measure.IterationTimer(0, 10**9)
    loaded: dict[str, Any] = {}
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    latest_file = Path(args.workdir) / f"latest-rank{rank}.json"

    class Load(pl.Callback):
        """Loads the method's newest durable checkpoint into the engine before the first step (methods that
        Lightning cannot resume by itself)."""

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if args.method in catalog.OTEACHECK_METHODS or args.method == "sync-deepspeed":
                return
            latest = json.loads(latest_file.read_text())
            device = trainer.strategy.root_device
            if args.method == "dcp-async":
                import torch.distributed as dist
                import torch.distributed.checkpoint as dcp

                side = torch.load(Path(latest["location"]) / f"bench-meta-rank{trainer.global_rank}.pt", weights_only=False)
                state = {f"rank{trainer.global_rank}/{k}": torch.empty(shape, dtype=getattr(torch, dtype.split(".")[-1]), device=device)
                         for k, (shape, dtype) in side["shapes"].items()}
                group = dist.new_group(backend="gloo") if dist.is_initialized() else None
                dcp.load(state, checkpoint_id=latest["location"], process_group=group, no_dist=group is None)
                prefix = f"rank{trainer.global_rank}/"
                tensors, meta, step = {k[len(prefix):]: v for k, v in state.items()}, side["meta"], side["step"]
            else:
                saved = torch.load(latest["location"], map_location=device, weights_only=False)
                tensors, meta, step = saved["tensors"], saved["meta"], saved["step"]
            methods.restore_rank_state(trainer, tensors, meta)
            loaded["step"] = step

    def first_step(trainer: pl.Trainer, step: int) -> None:
        if trainer.global_rank == 0:
            resumed = getattr(trainer.strategy, "resumed_from", None) or {}
            now = time.time()
            out = {"first_step_end_wall": now, "fit_to_first_step_s": now - fit_called[0],
                   "resumed_step": loaded.get("step", resumed.get("step")),
                   "source": resumed.get("source", args.recover_from)}
            if args.method == "sync-deepspeed":
                out["resumed_step"] = json.loads(latest_file.read_text())["step"]
            _write_json(args.result_file, out)
        os._exit(0)  # the restart is measured; nothing else to do

    timer.on_iteration_end.append(first_step)
    trainer, module = _build(args, accelerator, record, timer, [Load()], 10**9)
    ckpt_path: str | None = None
    if args.method in catalog.OTEACHECK_METHODS:
        ckpt_path = "last"
    elif args.method == "sync-deepspeed":
        ckpt_path = json.loads(latest_file.read_text())["location"]
    fit_called = [time.time()]
    trainer.fit(module, ckpt_path=ckpt_path)


# --- driver -------------------------------------------------------------------------------------------------


def _child(args: argparse.Namespace, role: str, result_file: Path, env: dict[str, str], extra: list[str]) -> tuple[float, subprocess.CompletedProcess | None, str]:
    cmd = [sys.executable, "-m", "benchmarks.run", *_forward(args), "--role", role, "--result-file", str(result_file), *extra]
    launched = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return launched, None, f"timed out after {args.timeout:.0f} s (--timeout; killed before it wrote a result)\n{output[-4000:]}"
    return launched, subprocess.CompletedProcess(cmd, proc.returncode, output), output


def _forward(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, "--method", args.method, "--gpus", str(args.gpus), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--every-n-steps", str(args.every_n_steps),
           "--persist-every-n-steps", str(args.persist_every_n_steps), "--staging-mib", str(args.staging_mib),
           "--overhead-budget", str(args.overhead_budget), "--out", args.out, "--workdir", args.workdir,
           "--seed", str(args.seed)]
    if args.smoke:
        out.append("--smoke")
    if args.accelerator:
        out += ["--accelerator", args.accelerator]
    if args.max_seconds is not None:
        out += ["--max-seconds", str(args.max_seconds)]
    if args.recovery:
        out.append("--recovery")
    if args.paired_block:
        out += ["--paired-block", str(args.paired_block)]
    return out


def _error_tail(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln or "error" in ln:
            return ln.strip()[:500]
    return (lines[-1] if lines else "no output")[:500]


def drive(args: argparse.Namespace, command: str) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    own_workdir = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="oteacheck-bench-")
    # BENCH_SHM_ROOT: where the shared-memory slots go when /dev/shm is too small (a container's default 64 MB)
    shm_root = os.environ.get("BENCH_SHM_ROOT") or ("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir())
    shm = Path(shm_root) / f"oteacheck-bench-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ)
    env.update(OTEACHECK_JOB_ID=f"bench-{uuid.uuid4().hex[:8]}", OTEACHECK_MEMORY_DIR=str(shm),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")) if p))
    base = {"model": args.model, "method": args.method, "gpus": args.gpus, "every_n_steps": args.every_n_steps,
            "baseline_method": catalog.baseline_of(args.method) if args.method in catalog.METHODS else None,
            "smoke": args.smoke, "command": command, "tag": args.tag, "memory_dir_root": shm_root}
    result_file = Path(args.workdir) / "train-result.json"
    try:
        if args.method not in catalog.METHODS:
            raise SystemExit(f"unknown method {args.method!r}; choose from {', '.join(catalog.METHODS)}")
        check_paired(args)
        launched, proc, output = _child(args, "train", result_file, env, [])
        if not result_file.exists():
            # a run killed at --timeout says so (its log's last line is whatever it printed last)
            error = output.splitlines()[0] if proc is None else _error_tail(output)
            result = {**base, "status": "error", "error": error, "log_tail": output[-3000:]}
        else:
            result = {**base, **json.loads(result_file.read_text()), "command": command, "tag": args.tag}
            if result.get("first_step_end_wall"):
                result["start_s"] = result["first_step_end_wall"] - launched
                result["start_phases_s"] = start_phases(launched, result.pop("start_marks_wall", {}), result["first_step_end_wall"])
            result["recovery_s_memory"] = result["recovery_s_disk"] = result["work_lost_steps"] = None
            result["recovered_step"] = {}
            if args.recovery and args.method in catalog.RECOVERY:
                for source in catalog.RECOVERY[args.method]:
                    _recover(args, env, source, shm, result)
            elif args.recovery:
                result["notes"].append("recovery not measured for this method")
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        if own_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)
    path = out / result_name(args.model, args.method, args.gpus, args.every_n_steps)
    _write_json(path, result)
    return result


def start_phases(launched: float, marks: dict[str, float], first_step_end: float) -> dict[str, float]:
    """``start_s`` cut at the child's marks: the interpreter's start (``python``), the imports of torch, Lightning and
    the method (``imports``), the model and the Trainer (``build``), and ``fit`` to the end of the first iteration
    (DeepSpeed's set-up, the method's, the first step). Empty where a mark is missing."""
    names = ("python", "imports", "build", "fit")
    cuts = [launched, marks.get("entered"), marks.get("imported"), marks.get("fit_called"), first_step_end]
    if any(t is None for t in cuts):
        return {}
    return {name: round(b - a, 3) for name, a, b in zip(names, cuts, cuts[1:])}


def check_paired(args: argparse.Namespace) -> None:
    """Refuses ``--paired-block`` where pairing cannot work, saying what to change."""
    if not args.paired_block:
        return
    if args.method not in catalog.OTEACHECK_METHODS or args.method == "none":
        raise SystemExit(f"--paired-block is for the OTeaCheck methods ({', '.join(m for m in catalog.OTEACHECK_METHODS if m != 'none')}), "
                         f"not {args.method!r}: drop it for this method")
    if args.every_n_steps != 1:
        raise SystemExit("--paired-block needs --every-n-steps 1 (a block holds a snapshot every iteration)")
    if args.paired_block < 3:
        raise SystemExit(f"--paired-block {args.paired_block}: use at least 3 (the first and the last iteration of "
                         "each block are left out)")
    if args.steps < 4 * args.paired_block:
        raise SystemExit(f"--steps {args.steps} holds under two pairs of {args.paired_block}-iteration blocks; "
                         f"use at least {4 * args.paired_block}")


def _recover(args: argparse.Namespace, env: dict[str, str], source: str, shm: Path, result: dict) -> None:
    env = dict(env)
    if source == "disk":
        # a node failure: the shared memory is gone, only the disk tier is left
        env["OTEACHECK_MEMORY_DIR"] = str(shm) + "-empty"
    file = Path(args.workdir) / f"recover-{source}.json"
    launched, proc, output = _child(args, "recover", file, env, ["--recover-from", source])
    shutil.rmtree(str(shm) + "-empty", ignore_errors=True)
    if not file.exists():
        result["errors"].append(f"recovery from {source}: {_error_tail(output)}")
        return
    got = json.loads(file.read_text())
    result["recovered_step"][source] = {"step": got["resumed_step"], "source": got.get("source")}
    if got.get("resumed_step") is None:
        # a fresh start is not a recovery: nothing of this tier was complete when the run failed
        result["notes"].append(f"recovery from {source} not measured: no checkpoint there at the failure (step "
                               f"{result.get('failed_at_step')}; persist every {args.persist_every_n_steps} steps)")
        return
    result[f"recovery_s_{source}"] = got["first_step_end_wall"] - launched
    # the same without process start-up and imports (includes finding and loading the checkpoint)
    result[f"recovery_fit_to_first_step_s_{source}"] = got.get("fit_to_first_step_s")
    lost = result["failed_at_step"] - int(got["resumed_step"])
    # the number that matters: a process crash (memory tier when the method has one)
    if result["work_lost_steps"] is None:
        result["work_lost_steps"] = lost
    result[f"work_lost_steps_{source}"] = lost


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.role == "train":
        try:
            train_child(args)
        except BaseException:
            traceback.print_exc()
            raise
        return
    if args.role == "recover":
        recover_child(args)
        return
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result = drive(args, command)
    keys = ("status", "iter_ms_median", "stall_ms_median", "durable_s", "recovery_s_memory", "recovery_s_disk", "error")
    print(json.dumps({k: result.get(k) for k in keys if k in result}))


if __name__ == "__main__":
    main()

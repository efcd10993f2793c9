"""Training script run as a separate process tree by the multi-process tests (and the demo).

Writes, under ``--out``: ``losses-rank{r}.jsonl`` (one line per optimizer step, flushed at once so that it
survives SIGKILL), ``final-rank{r}.pt`` (this rank's engine tensors at the end), ``resume-rank{r}.json`` (where the
run resumed from) and ``collectives-rank{r}.json`` (which threads called torch.distributed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from oteacheck_lightning import OTeaCheckpoint, OTeaCheckpointIO, OTeaCheckStrategy, PersistSchedule  # noqa: E402
from oteacheck_lightning.deepspeed_state import DeepSpeedState  # noqa: E402
from tests.support.tiny import ManualTinyModel, StreamTinyModel, StreamValidatedTinyModel, TinyModel, ValidatedTinyModel  # noqa: E402


class Recorder(pl.Callback):
    def __init__(self, out: Path, sleep: float, kill_at: int | None, check_snapshots: bool = False,
                 snapshot_every: int = 1) -> None:
        self.out, self.sleep, self.kill_at, self.snapshot_every = out, sleep, kill_at, snapshot_every
        self.file = None
        self.check_snapshots = check_snapshots
        self.previous: tuple[int, dict] | None = None
        self.checked = self.mismatched = self.missing = 0
        self.fenced_at_update = 0  # steps whose snapshot was still in flight after BEFORE_STEP, fenced at BEFORE_UPDATE
        self._in_flight_past_step = False
        self._last_checked = -1

    def setup(self, trainer, pl_module, stage):
        self.file = open(self.out / f"losses-rank{trainer.global_rank}.jsonl", "a", buffering=1)

    def on_train_start(self, trainer, pl_module):
        if self.check_snapshots:
            # subscribed after the checkpoint IO (the strategy's setup came first), so this sees what it did
            trainer.strategy.bus.subscribe(lambda event: self._note_fence(trainer, event))

    def _note_fence(self, trainer, event):
        from oteacheck_lightning.bubbles import Phase

        io = trainer.strategy.checkpoint_io
        if event.phase is Phase.BEFORE_STEP:
            self._in_flight_past_step = io._pending is not None
        elif event.phase is Phase.BEFORE_UPDATE and self._in_flight_past_step and io._pending is None:
            self.fenced_at_update += 1
            self._in_flight_past_step = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.sleep:
            time.sleep(self.sleep)  # makes room for an external kill in the middle of an iteration

    def _dump_persist_stats(self, trainer):
        """Each tier's persister metrics (``persist-rank{r}.json``), rewritten every step so that they survive a
        SIGKILL: failures, health, outage, persisted and committed steps."""
        import dataclasses

        stats = {name: dataclasses.asdict(t) | {"outage_seconds": t.outage_seconds}
                 for name, t in trainer.strategy.checkpoint_io.stats.tiers.items()}
        tmp = self.out / f".persist-rank{trainer.global_rank}.json"
        tmp.write_text(json.dumps({"step": trainer.global_step, "tiers": stats}))
        os.replace(tmp, self.out / f"persist-rank{trainer.global_rank}.json")

    def on_fit_end(self, trainer, pl_module):
        self._dump_persist_stats(trainer)  # after the final persist of OTeaCheckpoint.on_train_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._dump_persist_stats(trainer)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.file.write(json.dumps({"step": trainer.global_step, "loss": loss.item().hex(), "batch_idx": batch_idx}) + "\n")
        self.file.flush()
        if self.check_snapshots:
            self._check_snapshot(trainer)
        if self.kill_at is not None and trainer.global_step >= self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def _check_snapshot(self, trainer):
        """DESIGN invariant 2: the sealed snapshot of step t equals the state right after step t, bit for bit.
        Runs before the checkpoint callback, so snapshot t was sealed at the start of this iteration (t+1)."""
        from oteacheck_lightning.format import CheckpointFormatError, load_tensors
        from tests.support.harness import same_bits

        io = trainer.strategy.checkpoint_io
        if self.previous is not None and self.previous[0] == trainer.global_step:
            return  # a batch inside an accumulation window: no step ended, and the last one's snapshot is in flight
        # on a GPU, snapshot t is sealed as soon as its copies landed, at the latest before snapshot t+1 starts
        io.seal_pending()
        if self.previous is not None and self.previous[0] != self._last_checked:  # each snapshot once
            step, expected = self.previous
            self._last_checked = step
            try:
                loaded = io.memory_tier.read(step, trainer.global_rank)
            except CheckpointFormatError:  # not sealed: dropped (the tests say when that is right)
                self.missing += 1
            else:
                tensors = load_tensors(loaded.manifest, loaded.buffer)
                self.checked += 1
                if any(not same_bits(tensors[n], t) for n, t in expected.items()):
                    self.mismatched += 1
        if trainer.global_step > 0 and trainer.global_step % self.snapshot_every == 0:  # the steps snapshots are of
            state = DeepSpeedState(trainer.strategy.deepspeed_engine)
            self.previous = (trainer.global_step, {n: t.detach().cpu().clone() for n, t in state.tensors()})
        (self.out / f"snapshot-check-rank{trainer.global_rank}.json").write_text(
            json.dumps({"checked": self.checked, "mismatched": self.mismatched, "missing": self.missing,
                        "fenced_at_update": self.fenced_at_update,
                        "skipped_updates": trainer.strategy.deepspeed_engine.skipped_steps}))

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics["val_loss"].item().hex()
        with open(self.out / f"validations-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "val_loss": loss}) + "\n")

    def on_train_end(self, trainer, pl_module):
        state = DeepSpeedState(trainer.strategy.deepspeed_engine)
        tensors = {n: t.detach().cpu().clone() for n, t in state.tensors()}
        metric = pl_module.mean_loss
        torch.save(
            {"engine": tensors, "metric": [metric.mean_value.clone(), metric.weight.clone()], "step": trainer.global_step},
            self.out / f"final-rank{trainer.global_rank}.pt",
        )
        resumed = trainer.strategy.resumed_from
        (self.out / f"resume-rank{trainer.global_rank}.json").write_text(json.dumps(resumed))


def record_collective_threads(out: Path) -> None:
    """Wraps torch.distributed's collectives to note which threads call them (DESIGN invariant 8)."""
    import torch.distributed as dist

    seen: set[str] = set()
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier", "reduce_scatter",
                 "reduce_scatter_tensor", "all_gather_object", "broadcast_object_list", "gather", "scatter"):
        original = getattr(dist, name, None)
        if original is None:
            continue

        def wrapper(*args, __original=original, **kwargs):
            seen.add(threading.current_thread().name)
            return __original(*args, **kwargs)

        setattr(dist, name, wrapper)

    import atexit

    def dump():
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
        (out / f"collectives-rank{rank}.json").write_text(json.dumps(sorted(seen)))

    atexit.register(dump)


def _allow_fp16_on_this_cpu() -> None:
    """DeepSpeed's CPU accelerator refuses fp16 where oneDNN has no fp16 kernels (CPUs without AVX512-FP16 or AMX),
    though torch computes fp16 on any CPU with its reference kernels, slowly. The fp16 tests are about DeepSpeed's
    loss scaler and its skipped updates, which run the same there, so they must not depend on the CI machine's CPU."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu" and not accelerator.is_fp16_supported():
        accelerator.is_fp16_supported = lambda: True  # supported_dtypes() asks it too


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stage", type=int, default=2)
    # a few small buckets: the plan is cut on several bucket boundaries, and on the CPU DeepSpeed does not allocate
    # its default 2e8-element bucket buffers every step (that took most of each step)
    p.add_argument("--reduce-bucket-size", type=int, default=256)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=24)
    p.add_argument("--persist-every", type=int, default=5)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--ckpt-path", default=None)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--check-snapshots", action="store_true")
    p.add_argument("--accumulate", type=int, default=1, help="batches per optimizer step (accumulate_grad_batches)")
    p.add_argument("--manual", action="store_true", help="manual optimization (the model steps its optimizer itself)")
    p.add_argument("--validate-every", type=int, default=None, help="a validation loop every this many batches")
    p.add_argument("--precision", default=None, help="the trainer's precision (e.g. 16-mixed: DeepSpeed's fp16)")
    p.add_argument("--stream", action="store_true", help="a loader without a length (Lightning fetches a batch ahead)")
    p.add_argument("--snapshot-every", type=int, default=1, help="an in-memory snapshot every this many steps")
    p.add_argument("--fault", default=None, help="name of a fault from tests.support.faults to install")
    p.add_argument("--persist", action="append", default=None, metavar="URL:EVERY:KEEP",
                   help="a persistent tier (repeatable; replaces --persist-every/--keep-last), e.g. "
                        "/ckpt:5:3 or hdfs://127.0.0.1:8020/ckpt:10:2 (EVERY in steps, or seconds with an s suffix)")
    p.add_argument("--commit-timeout", type=float, default=None, help="seconds rank 0 waits for a step's files")
    p.add_argument("--csv-log-every", type=int, default=None,
                   help="log to a CSVLogger in OUT/logs every N steps and show the progress bar")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an fsspec storage option for every --persist tier that is not local (repeatable)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record_collective_threads(out)
    torch.set_num_threads(1)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    pl.seed_everything(1234, workers=True)
    if args.precision and args.precision.startswith("16"):
        _allow_fp16_on_this_cpu()
    if args.fault:
        from tests.support import faults

        faults.install(args.fault)
    if args.persist is not None:
        options = dict(o.split("=", 1) for o in args.storage_option)
        extra = {"commit_timeout_seconds": args.commit_timeout} if args.commit_timeout else {}
        persist = [PersistSchedule.parse(spec, **extra) for spec in args.persist]
        for schedule in persist:
            if "://" in schedule.url and not schedule.url.startswith("file://") and options:
                schedule.storage_options = options
    else:
        persist = [PersistSchedule(every_n_steps=args.persist_every, keep_last=args.keep_last)] if args.persist_every else []
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=OTeaCheckStrategy(stage=args.stage, checkpoint_io=OTeaCheckpointIO(), reduce_bucket_size=args.reduce_bucket_size,
                                   allgather_bucket_size=args.reduce_bucket_size),
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate,
        precision=args.precision,
        callbacks=[OTeaCheckpoint(dirpath=args.root, persist=persist, snapshot_every_n_steps=args.snapshot_every),
                   Recorder(out, args.sleep, args.kill_at, args.check_snapshots, args.snapshot_every)],
        logger=CSVLogger(out / "logs", name="", version="") if args.csv_log_every else False,
        log_every_n_steps=args.csv_log_every or 50,
        enable_progress_bar=bool(args.csv_log_every),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=args.validate_every,
        deterministic=True,
        use_distributed_sampler=False,
    )
    ckpt = None if args.ckpt_path in (None, "none") else args.ckpt_path
    if args.manual:
        model = ManualTinyModel()
    elif args.validate_every:
        model = StreamValidatedTinyModel() if args.stream else ValidatedTinyModel()
    else:
        model = StreamTinyModel() if args.stream else TinyModel()
    trainer.fit(model, ckpt_path=ckpt)


if __name__ == "__main__":
    main()

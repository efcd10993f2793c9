"""No checkpointing under Lightning's DeepSpeedStrategy against OTeaCheckStrategy with no snapshot, alternating
in one process, so the two baselines of the comparison share the process and the card.

    python -m benchmarks.strategy_baseline --model gpt2-124m --order ds,ot,ds-async,ot,ds,ot-sync --out results.json

``ds``: Lightning's DeepSpeedStrategy as is; ``ds-async``: the same with DeepSpeed's throughput timer not
synchronizing (what OTeaCheckStrategy sets); ``ot``: OTeaCheckStrategy, snapshots never due; ``ot-sync``: the same
with the synchronizing timer. Iteration times come from :class:`benchmarks.measure.IterationTimer` (``--smoke``: tiny
model on CPU, host time; checks the harness, measures nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from . import catalog, measure, models
from .methods import BenchDeepSpeedStrategy, zero2_options


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.strategy_baseline", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-124m")
    p.add_argument("--order", default="ds,ot,ds-async,ot,ds,ot-sync")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--out", required=True, help="JSON file")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    args = p.parse_args(argv)
    cuda = not args.smoke and torch.cuda.is_available()
    from oteacheck_lightning import OTeaCheckpoint, OTeaCheckpointIO, OTeaCheckStrategy

    rows = []
    for n, which in enumerate(args.order.split(",")):
        root = tempfile.mkdtemp(prefix="oteacheck-baseline-")
        timer = measure.IterationTimer(args.warmup, args.steps)
        timer.cuda = cuda  # --smoke trains on the CPU even where a GPU is present
        callbacks: list[pl.Callback] = [timer]
        if which.startswith("ds"):
            strategy: pl.strategies.Strategy = BenchDeepSpeedStrategy(**zero2_options(cuda))
        else:
            strategy = OTeaCheckStrategy(**zero2_options(cuda), checkpoint_io=OTeaCheckpointIO(job_id=f"baseline-{os.getpid()}-{n}"))
            callbacks.append(OTeaCheckpoint(dirpath=root, persist=[], log_metrics=False, snapshot_every_n_steps=10**12))
        if which in ("ds-async", "ot-sync"):
            strategy.config.setdefault("timers", {}).setdefault("throughput", {})["synchronized"] = which == "ot-sync"
        trainer = pl.Trainer(accelerator="cuda" if cuda else "cpu", devices=1, strategy=strategy,
                             precision="bf16-mixed" if cuda else "32-true", max_steps=args.steps,
                             callbacks=callbacks, logger=False, enable_checkpointing=which.startswith("ot"),
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=root)
        started = time.time()
        trainer.fit(models.BenchModule(catalog.spec(args.model, args.smoke)))
        ms = timer.iteration_ms()
        deciles = statistics.quantiles(ms, n=10)
        rows.append({"position": n, "strategy": which, "iter_ms_median": statistics.median(ms), "iter_ms_p10": deciles[0],
                     "iter_ms_p90": deciles[-1], "iterations": len(ms), "wall_s": time.time() - started})
        print(json.dumps(rows[-1]), flush=True)
        del trainer, strategy
        if cuda:
            torch.cuda.empty_cache()
    out = {"kind": "strategy-baseline", "model": args.model, "smoke": args.smoke, "card": measure.card(), "versions": measure.versions(),
           "command": "python -m benchmarks.strategy_baseline " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

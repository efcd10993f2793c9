"""Trains a small model with repeated blocks under OTeaCheckStrategy on the CPU (one process) and writes, per
iteration, which block events the checkpoint IO asked for at the forward pass's start and which the strategy
announced. ``python -m tests.support.block_events OUT.json ROOT``.

The scheduler is set to issue at every window from the second block's forward on (``host_share=None``: one issue
point per window; its late head pinned there; no sync windows), so which block events are wanted does not depend on
the timings of a shared CPU."""

from __future__ import annotations

import argparse
import json
from typing import Any

import lightning.pytorch as pl
import torch

from oteacheck_lightning import OTeaCheckpoint, OTeaCheckpointIO, OTeaCheckStrategy
from oteacheck_lightning.bubbles import Phase
from oteacheck_lightning.scheduler import BLOCK_PHASES
from tests.support.tiny import tiny_loader

BLOCKS = 3
FIRST_ISSUE = (Phase.FORWARD_BLOCK, 1)


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.norm(self.linear(x)))


class BlockModel(pl.LightningModule):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(16, width)
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(BLOCKS))
        self.out = torch.nn.Linear(width, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return torch.nn.functional.mse_loss(self.out(h), y)

    def train_dataloader(self) -> Any:
        return tiny_loader()

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.iterations: list[dict[str, Any]] = []

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        io = trainer.strategy.checkpoint_io
        scheduler = io.engine.scheduler
        scheduler.issue_late, scheduler.host_share = True, None
        scheduler._late_head = lambda need_ms: FIRST_ISSUE
        # no sync windows either: on a busy CPU a block's window stretches while copies are in flight, and the
        # scheduler (rightly) stops issuing across it, which would make the wanted blocks depend on the load
        scheduler._detect_sync = lambda key, stretch_ms, iteration_ms: None

        def record(event: Any) -> None:
            if event.phase is Phase.FORWARD_START:
                wanted = io.block_windows()
                self.iterations.append({"step": event.step, "wanted": None if wanted is None else sorted(
                    [phase.value, block] for phase, block in wanted), "announced": []})
            elif event.phase in BLOCK_PHASES and self.iterations:
                self.iterations[-1]["announced"].append([event.phase.value, event.block])

        trainer.strategy.bus.subscribe(record)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("root")
    p.add_argument("--steps", type=int, default=14)
    args = p.parse_args()
    pl.seed_everything(1)
    recorder = Recorder()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=OTeaCheckStrategy(stage=2, checkpoint_io=OTeaCheckpointIO()),
                         max_steps=args.steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[OTeaCheckpoint(dirpath=args.root, persist=[], log_metrics=False), recorder],
                         use_distributed_sampler=False)
    trainer.fit(BlockModel())
    with open(args.out, "w") as f:
        json.dump(recorder.iterations, f)


if __name__ == "__main__":
    main()

"""What the four examples share: synthetic data sets made in memory from a seed (nothing is downloaded), served by
a ``StatefulDataLoader`` with a ``StatefulDistributedSampler`` so that the loader's position is part of every
checkpoint and a resume continues with the exact next batch; and the optimizer with a warm-up schedule."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler


class SyntheticData(pl.LightningDataModule):
    """Base class: subclasses implement :meth:`make` (the data set, deterministic given a ``torch.Generator``).

    Use with ``trainer.use_distributed_sampler: false`` (the ``oteacheck`` CLI's default): the sampler here shards
    the data across ranks itself and its position is saved with every snapshot.
    """

    def __init__(self, samples: int = 1024, batch_size: int = 8, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.samples, self.batch_size, self.num_workers, self.seed = samples, batch_size, num_workers, seed
        self.dataset: torch.utils.data.Dataset | None = None

    def make(self, g: torch.Generator) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if self.dataset is None:
            self.dataset = self.make(torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> StatefulDataLoader:
        assert self.dataset is not None
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = StatefulDistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=True,
                                             seed=self.seed, drop_last=True)
        return StatefulDataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler,
                                  num_workers=self.num_workers, drop_last=True)


def adamw_with_warmup(module: pl.LightningModule, lr: float, weight_decay: float, warmup_steps: int,
                      max_steps: int) -> dict:
    """AdamW with linear warm-up then cosine decay over ``max_steps``, stepped every optimizer step.

    The modules take ``decay_steps`` for ``max_steps`` (default: the trainer's ``max_steps``): set it when a run
    may be resumed with a different ``trainer.max_steps``, or the schedule changes at the resume."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

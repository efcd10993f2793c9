"""A tiny, deterministic LightningModule and data for the multi-process tests and the demo."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torchmetrics
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler


class TinyModel(pl.LightningModule):
    """An MLP with dropout (uses the RNG), BatchNorm (buffers changed in forward) and a torchmetrics metric."""

    def __init__(self, width: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU(), torch.nn.Dropout(0.1),
            torch.nn.Linear(width, 1),
        )
        self.mean_loss = torchmetrics.MeanMetric()

    def loss(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.mean_loss.update(loss.detach())
        return loss

    def train_dataloader(self):
        # a sampler whose position is part of the loader state: the resumed run continues the same shuffled order
        return tiny_loader(rank=self.trainer.global_rank, world_size=self.trainer.world_size)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def tiny_data(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic regression data: inputs and targets, the same for a seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 16, generator=g)
    return x, x[:, :4].sum(dim=1, keepdim=True) + 0.1 * torch.randn(samples, 1, generator=g)


def tiny_loader(samples: int = 256, batch_size: int = 8, seed: int = 7, rank: int = 0, world_size: int = 1) -> StatefulDataLoader:
    """Synthetic regression data, shuffled by a stateful distributed sampler (use ``use_distributed_sampler=False``)."""
    dataset = torch.utils.data.TensorDataset(*tiny_data(samples, seed))
    sampler = StatefulDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return StatefulDataLoader(dataset, batch_size=batch_size, sampler=sampler)


class _Stream(torch.utils.data.IterableDataset):
    """This rank's share of the tiny data as a stream: no length, so Lightning fetches a batch ahead."""

    def __init__(self, samples: int, seed: int, rank: int, world_size: int) -> None:
        x, y = tiny_data(samples, seed)
        self.x, self.y = x[rank::world_size], y[rank::world_size]

    def __iter__(self):
        yield from zip(self.x, self.y)


class StreamTinyModel(TinyModel):
    """:class:`TinyModel` fed by a loader without a length (a stream), which keeps its position: Lightning holds one
    batch ahead of the one being trained on."""

    def train_dataloader(self):
        stream = _Stream(256, 7, self.trainer.global_rank, self.trainer.world_size)
        return StatefulDataLoader(stream, batch_size=8)


class ManualTinyModel(TinyModel):
    """:class:`TinyModel` with manual optimization: its training step runs backward, the optimizer step and the
    scheduler itself."""

    def __init__(self, width: int = 32, lr: float = 1e-2) -> None:
        super().__init__(width, lr)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        return loss


class ValidatedTinyModel(TinyModel):
    """:class:`TinyModel` with a validation loop (its dropout off, its BatchNorm statistics only read) and a metric
    of its own."""

    def __init__(self, width: int = 32, lr: float = 1e-2) -> None:
        super().__init__(width, lr)
        self.val_loss = torchmetrics.MeanMetric()

    def validation_step(self, batch, batch_idx):
        self.val_loss.update(self.loss(batch))
        self.log("val_loss", self.val_loss, on_epoch=True)

    def val_dataloader(self):
        return tiny_loader(samples=64, seed=11, rank=self.trainer.global_rank, world_size=self.trainer.world_size)


class StreamValidatedTinyModel(StreamTinyModel, ValidatedTinyModel):
    """:class:`ValidatedTinyModel` fed by a stream: validation runs while Lightning holds the next training batch."""

"""Lightning's checkpoint dict read fast: the same dict as ``dump_checkpoint``, in a real Trainer, at every step."""

import dataclasses
import logging

import lightning.pytorch as pl
import torch
from lightning.pytorch.loops.progress import _BaseProgress

from oteacheck_lightning.lightning_state import LightningStateDump
from tests.support.tiny import TinyModel, tiny_loader


class WithValidation(TinyModel):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def val_dataloader(self):
        return tiny_loader(samples=32)


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


class Compare(pl.Callback):
    def __init__(self, extra=None):
        self.extra = extra
        self.compared = 0
        self.dump = None

    def on_train_start(self, trainer, module):
        if self.extra is not None:
            trainer.fit_loop.epoch_loop.extra_progress = self.extra
        self.dump = LightningStateDump(trainer)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        fast = self.dump()
        reference = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        # the shadowing attribute is gone after the call
        assert "_get_loops_state_dict" not in vars(trainer._checkpoint_connector)
        assert same(fast, reference), f"step {trainer.global_step}: the fast dump differs from Lightning's"
        self.compared += 1


def fit(tmp_path, callback):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=40, val_check_interval=10, callbacks=[callback], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         use_distributed_sampler=False, default_root_dir=tmp_path)
    trainer.fit(WithValidation())
    return trainer


def test_the_fast_dump_is_lightnings_dump_at_every_step_across_validation_and_epochs(tmp_path):
    compare = Compare()
    fit(tmp_path, compare)  # 32 batches an epoch: 40 steps cross an epoch and four validations
    assert compare.compared == 40 and compare.dump.fast is True


@dataclasses.dataclass
class ListProgress(_BaseProgress):
    seen: list = dataclasses.field(default_factory=lambda: [1, 2])

    def reset(self):
        self.seen = []


def test_a_progress_with_other_than_plain_leaves_falls_back_to_lightning_with_a_warning(tmp_path, caplog):
    compare = Compare(extra=ListProgress())
    with caplog.at_level(logging.WARNING, logger="oteacheck_lightning.lightning_state"):
        fit(tmp_path, compare)
    assert compare.compared == 40 and compare.dump.fast is False
    assert "ListProgress.seen is a list" in caplog.text

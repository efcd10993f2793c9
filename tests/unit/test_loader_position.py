"""A loader without a length is saved at the batch trained on, not the one Lightning fetched ahead (a real Trainer,
real torchdata ``StatefulDataLoader``s)."""

import lightning.pytorch as pl
import pytest
import torch

from oteacheck_lightning import loader_position
from tests.support.tiny import StreamTinyModel, TinyModel


class Positions(pl.Callback):
    """Per step: the loader's batches handed out by Lightning's state, and by the corrected one."""

    def __init__(self):
        self.seen = []

    def on_train_start(self, trainer, module):
        loader_position.track(trainer)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        states = checkpoint["loops"]["fit_loop"]["state_dict"].get("combined_loader")
        lightnings = states[0]["_num_yielded"] if states else None
        loader_position.correct(checkpoint, trainer)
        states = checkpoint["loops"]["fit_loop"]["state_dict"].get("combined_loader")
        self.seen.append((batch_idx, lightnings, states[0]["_num_yielded"] if states else None))


def fit(tmp_path, model, steps):
    positions = Positions()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=[positions], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         use_distributed_sampler=False, default_root_dir=tmp_path)
    trainer.fit(model)
    return positions.seen


def test_a_stream_is_saved_at_the_batch_trained_on_across_an_epoch_end(tmp_path):
    # 32 batches an epoch: Lightning's state is a batch ahead (at an epoch's last batch, it found the stream's end)
    seen = fit(tmp_path, StreamTinyModel(), steps=40)
    assert [corrected for _, _, corrected in seen] == [i + 1 for i, _, _ in seen]
    assert [lightnings for _, lightnings, _ in seen] == [min(i + 2, 32) for i, _, _ in seen]
    assert [i for i, _, _ in seen] == list(range(32)) + list(range(8))


def test_a_loader_with_a_length_is_left_as_lightning_saves_it(tmp_path):
    # no batch is fetched ahead, so Lightning's state is the batch trained on already
    seen = fit(tmp_path, TinyModel(), steps=10)
    assert all(lightnings == corrected == i + 1 for i, lightnings, corrected in seen)


class PlainLoaderModel(TinyModel):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 16), torch.randn(64, 1)), batch_size=8, shuffle=True)


def test_a_loader_without_a_position_is_warned_about_with_what_to_use_instead(tmp_path):
    with pytest.warns(UserWarning, match=r"a DataLoader\) keeps no position.*StatefulDataLoader with a stateful sampler"):
        fit(tmp_path, PlainLoaderModel(), steps=2)


def test_a_stateful_loader_gets_no_warning(tmp_path, recwarn):
    fit(tmp_path, TinyModel(), steps=2)
    assert not [w for w in recwarn if "keeps no position" in str(w.message)]


def test_lightnings_distributed_sampler_wrapper_is_warned_about(tmp_path):
    # what use_distributed_sampler=True makes of a stateful loader's own sampler on several processes
    from types import SimpleNamespace

    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.utilities import CombinedLoader
    from torchdata.stateful_dataloader import StatefulDataLoader

    dataset = torch.utils.data.TensorDataset(torch.randn(64, 16))
    sampler = DistributedSamplerWrapper(torch.utils.data.RandomSampler(dataset), num_replicas=2, rank=0)
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(_combined_loader=CombinedLoader(StatefulDataLoader(dataset, sampler=sampler)),
                                                       _data_fetcher=None))
    with pytest.warns(UserWarning, match="DistributedSamplerWrapper.*draws its order again on resume"):
        loader_position.track(trainer)

"""The checkpoint callback refuses a Trainer without the OTeaCheck strategy at setup, with an error that says what
to change, and nothing masks that error on the way out."""

import lightning.pytorch as pl
import pytest
from lightning.fabric.utilities.exceptions import MisconfigurationException

from oteacheck_lightning import OTeaCheckpoint, PersistSchedule
from tests.support.tiny import TinyModel, tiny_loader


def test_a_trainer_without_the_oteacheck_strategy_is_refused_with_what_to_change(tmp_path):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[OTeaCheckpoint(dirpath=str(tmp_path), persist=[])])
    # before the fix, the callback's exception hook raised an AttributeError over it
    with pytest.raises(MisconfigurationException, match=r"needs Trainer\(strategy=OTeaCheckStrategy"):
        trainer.fit(TinyModel(), tiny_loader())


def test_a_persist_interval_that_is_not_a_multiple_of_the_snapshot_interval_is_refused_and_the_default_adapts():
    # steps 5, 10, ... are never snapshotted with a snapshot every 3 steps, so they could never be persisted
    with pytest.raises(MisconfigurationException, match=r"every_n_steps is 5, not a multiple of snapshot_every_n_steps \(3\).*use a multiple of 3"):
        OTeaCheckpoint(snapshot_every_n_steps=3, persist=PersistSchedule(every_n_steps=5))
    assert OTeaCheckpoint(snapshot_every_n_steps=3, persist=PersistSchedule(every_n_steps=6)).persist[0].every_n_steps == 6
    # the default schedule (every 50 steps) rounds up to the next snapshotted step
    assert OTeaCheckpoint(snapshot_every_n_steps=3).persist[0].every_n_steps == 51
    assert OTeaCheckpoint().persist[0].every_n_steps == 50

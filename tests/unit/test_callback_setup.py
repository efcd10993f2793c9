"""The checkpoint callback refuses a Trainer without the OTeaCheck strategy at setup, with an error that says what
to change, and nothing masks that error on the way out."""

import lightning.pytorch as pl
import pytest
from lightning.fabric.utilities.exceptions import MisconfigurationException

from oteacheck_lightning import OTeaCheckpoint
from tests.support.tiny import TinyModel, tiny_loader


def test_a_trainer_without_the_oteacheck_strategy_is_refused_with_what_to_change(tmp_path):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[OTeaCheckpoint(dirpath=str(tmp_path), persist=[])])
    # before the fix, the callback's exception hook raised an AttributeError over it
    with pytest.raises(MisconfigurationException, match=r"needs Trainer\(strategy=OTeaCheckStrategy"):
        trainer.fit(TinyModel(), tiny_loader())

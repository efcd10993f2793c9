"""Every-iteration in-memory checkpoints for DeepSpeed training in PyTorch Lightning."""

from .bubbles import BubbleBus, Phase, PhaseEvent, PhaseTimer
from .callback import OTeaCheckpoint
from .io import OTeaCheckpointIO
from .persist import PersistSchedule
from .strategy import OTeaCheckStrategy

__all__ = [
    "BubbleBus",
    "OTeaCheckpoint",
    "OTeaCheckpointIO",
    "OTeaCheckStrategy",
    "PersistSchedule",
    "Phase",
    "PhaseEvent",
    "PhaseTimer",
]
__version__ = "0.1.0"

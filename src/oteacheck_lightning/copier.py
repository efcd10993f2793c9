"""Copies a snapshot's tensors into a host slot.

:class:`HostCopier` is the step-boundary copy: every tensor is copied, synchronously, when the snapshot is taken.
The bubble-scheduled engine (partitions copied during the next iteration through a GPU staging ring, fenced before
the next optimizer step) implements the same two calls, so the checkpoint IO does not change with the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from .format import TensorRecord, byte_view


class SnapshotCopier(Protocol):
    def start(self, buffer: torch.Tensor, records: Sequence[TensorRecord], tensors: Sequence[torch.Tensor]) -> None:
        """Begins copying ``tensors`` into ``buffer`` at ``records``' offsets."""
        ...

    def fence(self) -> float:
        """Waits until every copy begun by :meth:`start` landed; returns the milliseconds it waited."""
        ...


class HostCopier:
    """Copies at the step boundary, on the calling (training) thread."""

    @torch.no_grad()
    def start(self, buffer: torch.Tensor, records: Sequence[TensorRecord], tensors: Sequence[torch.Tensor]) -> None:
        for record, tensor in zip(records, tensors, strict=True):
            if record.nbytes:
                byte_view(buffer, record).copy_(tensor)

    def fence(self) -> float:
        return 0.0

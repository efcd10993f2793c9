"""Faults injected into a real training process by wrapping real backends (used by train_tiny.py --fault)."""

from __future__ import annotations

import os
import signal

from oteacheck_lightning.tiers import fsspec_tier


def install(spec: str) -> None:
    name, _, arg = spec.partition(":")
    if name == "kill-during-persist":
        _kill_during_persist(int(arg))
    else:
        raise ValueError(f"unknown fault {spec!r}")


def _kill_during_persist(step: int) -> None:
    """Rank 0's persister writes half of the data object of ``step`` to local disk, then the whole run dies."""
    original = fsspec_tier.CheckpointDir._put

    def put(self, path, chunks):
        if f"step-{step:09d}/rank-00000.data" in path:
            def half():
                for i, chunk in enumerate(chunks):
                    if i == 0:
                        yield chunk[: max(1, len(chunk) // 2)]
                os.killpg(os.getpgid(0), signal.SIGKILL)
            return original(self, path, half())
        return original(self, path, chunks)

    fsspec_tier.CheckpointDir._put = put

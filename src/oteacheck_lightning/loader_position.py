"""The training loader's position as of the batch trained on, not the batch Lightning fetched ahead.

Lightning fetches one batch ahead from a loader without a length, to know which batch is the last: when step *t*
ends, the loader has already handed out batch *t+1*, and its ``state_dict`` says so. A checkpoint that stored that
state resumed past batch *t+1*, which no step trained on. :func:`track` gives the fit loop's fetcher a subclass
that records the loaders' states as each batch is handed out, before the next one is fetched; :func:`correct`
puts that position into a checkpoint dict in place of the state Lightning read. Loaders with a length are fetched
on demand, so for them nothing changes (and nothing extra is read).

:func:`track` also warns, once, when a training loader keeps no position at all: Lightning then starts a resumed
epoch's order from its beginning, and the resumed run trains on other batches than the interrupted one would have.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.loops.fetchers import _PrefetchDataFetcher
from lightning.pytorch.utilities import rank_zero_warn

log = logging.getLogger(__name__)


class _PositionedFetcher(_PrefetchDataFetcher):
    """A prefetching fetcher that keeps the loaders' states as of the batch it handed out last."""

    position: list[dict[str, Any]] | None = None

    def __next__(self) -> Any:
        # the batch handed out now was fetched earlier, and nothing was fetched since: this is the position after it
        # (copied: a loader's state may share objects with the loader, which fetches again before the step ends)
        self.position = copy.deepcopy(self.combined_loader._state_dicts()) if self.batches and self.length is None else None
        return super().__next__()


def track(trainer: pl.Trainer) -> None:
    """Makes the fit loop's fetcher record the position of each batch (call before the first training batch), and
    warns if a training loader keeps no position."""
    problem = _unresumable(trainer)
    if problem is not None:
        rank_zero_warn(f"{problem}: a run resumed mid-epoch trains on other batches than the interrupted run would "
                       "have. For an exact resume, use torchdata's StatefulDataLoader with a stateful sampler (e.g. "
                       "StatefulDistributedSampler) and Trainer(use_distributed_sampler=False)")
    fetcher = trainer.fit_loop._data_fetcher
    if type(fetcher) is _PrefetchDataFetcher:
        fetcher.__class__ = _PositionedFetcher  # only methods are added: the instance stays as it is
    elif isinstance(fetcher, _PrefetchDataFetcher) and not isinstance(fetcher, _PositionedFetcher):
        log.warning("the training data fetcher is a %s: a loader without a length is saved one batch ahead",
                    type(fetcher).__name__)


def correct(checkpoint: dict[str, Any], trainer: pl.Trainer) -> None:
    """Puts the training loaders' position as of the batch trained on into ``checkpoint`` (Lightning's dict)."""
    position = getattr(trainer.fit_loop._data_fetcher, "position", None)
    if position is None:
        return
    state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict")
    if isinstance(state, dict) and "combined_loader" in state:
        state["combined_loader"] = position


def _unresumable(trainer: pl.Trainer) -> str | None:
    """Why a training loader keeps no position for a resume, or None."""
    combined = trainer.fit_loop._combined_loader
    for loader in combined.flattened if combined is not None else []:
        if not isinstance(loader, _Stateful):
            return f"the training loader (a {type(loader).__name__}) keeps no position (no state_dict)"
        if isinstance(getattr(loader, "sampler", None), DistributedSamplerWrapper):
            return ("Lightning wrapped the training loader's sampler in a DistributedSamplerWrapper "
                    "(use_distributed_sampler=True), which draws its order again on resume")
    return None

"""Lightning's checkpoint dict at every iteration, with the loops' progress read without ``dataclasses.asdict``.

A snapshot needs ``dump_checkpoint``'s dict every iteration. About 80% of that call goes to the loops' progress
counters: each is a nest of small dataclasses, and ``asdict`` walks them generically (field lookups, a deep copy
per leaf). Their leaves are integers and flags, so reading the fields directly gives the same dict several times
faster. On the training thread of a loop bound by the host that time is iteration time.

:class:`LightningStateDump` checks the fast reading against Lightning's own once, at its first use, and falls back
to Lightning's for the rest of the run if they ever differ (a Lightning version that adds something else to a
progress object), with a warning. Nothing in Lightning is changed for longer than one ``dump_checkpoint`` call.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loops.loop import _Loop
from lightning.pytorch.loops.progress import _BaseProgress

log = logging.getLogger(__name__)

# leaves asdict would deep-copy to themselves
_PLAIN = frozenset({int, float, bool, str, type(None)})
_FIELDS: dict[type, tuple[str, ...]] = {}
_LOOPS = ("fit_loop", "validate_loop", "test_loop", "predict_loop")


class _NotPlain(Exception):
    """A progress object holds something other than plain leaves and dataclasses."""


def progress_state(progress: Any) -> dict[str, Any]:
    """``dataclasses.asdict(progress)`` for a nest of dataclasses with plain leaves (raises :class:`_NotPlain`
    otherwise)."""
    names = _FIELDS.get(type(progress))
    if names is None:
        names = _FIELDS[type(progress)] = tuple(f.name for f in dataclasses.fields(progress))
    out: dict[str, Any] = {}
    for name in names:
        value = getattr(progress, name)
        if type(value) in _PLAIN:
            out[name] = value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[name] = progress_state(value)
        else:
            raise _NotPlain(f"{type(progress).__name__}.{name} is a {type(value).__name__}")
    return out


def loop_fields(loop: _Loop) -> list[tuple[str, bool]]:
    """(attribute, whether it is a child loop) of the loop's progress trackers and child loops, in ``vars`` order."""
    return [(name, isinstance(value, _Loop)) for name, value in vars(loop).items() if isinstance(value, (_BaseProgress, _Loop))]


class LightningStateDump:
    """``trainer``'s checkpoint dict (``dump_checkpoint(weights_only=False)``), the loops read fast."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.fast: bool | None = None  # None: not checked yet
        # per loop (kept alive, so its id stays its own): which attributes hold progress and child loops. A loop's
        # attributes are set when it is made; looking through all of them at every dump cost more than reading them
        self._fields: dict[int, tuple[_Loop, list[tuple[str, bool]]]] = {}

    def _loops(self) -> dict[str, Any]:
        out: dict[str, dict[str, Any]] = {}
        for name in _LOOPS:
            self._loop_state(getattr(self.trainer, name), out.setdefault(name, {}), "")
        return out

    def _loop_state(self, loop: _Loop, out: dict[str, Any], prefix: str) -> None:
        """The loop's ``state_dict()`` into ``out``, its own and its children's progress read by
        :func:`progress_state`."""
        out[prefix + "state_dict"] = loop.on_save_checkpoint()
        cached = self._fields.get(id(loop))
        if cached is None or cached[0] is not loop:
            cached = self._fields[id(loop)] = (loop, loop_fields(loop))
        for name, is_loop in cached[1]:
            value = getattr(loop, name)
            if is_loop:
                self._loop_state(value, out, prefix + name + ".")
            else:
                out[prefix + name] = progress_state(value)

    def __call__(self) -> dict[str, Any]:
        connector = self.trainer._checkpoint_connector
        if self.fast is None:
            self.fast = self._check(connector)
        if not self.fast:
            return connector.dump_checkpoint(weights_only=False)
        # an instance attribute shadows the connector's method for this one call
        connector._get_loops_state_dict = self._loops
        try:
            return connector.dump_checkpoint(weights_only=False)
        finally:
            del connector._get_loops_state_dict

    def _check(self, connector: Any) -> bool:
        try:
            same = self._loops() == connector._get_loops_state_dict()
            reason = "its loops' state differs from Lightning's"
        except _NotPlain as err:
            same, reason = False, str(err)
        if not same:
            log.warning("reading the loop progress directly is off for this run (%s); using Lightning's state_dict", reason)
        return same

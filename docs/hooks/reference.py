"""Generates the configuration reference from the code: the constructor signatures and ``Args:`` docstrings of
OTeaCheckStrategy (with every DeepSpeedStrategy option it forwards), OTeaCheckpointIO, OTeaCheckpoint and
PersistSchedule, each under the YAML key the ``oteacheck`` CLI reads it from.

    python docs/hooks/reference.py > reference.md    # the mkdocs hook calls markdown() at build time
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
from typing import Any

_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters)\s*:\s*$")
_ENTRY = re.compile(r"^(\s*)\**(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")


def parse_args_section(doc: str | None) -> dict[str, str]:
    """``{name: description}`` from a Google-style ``Args:`` section."""
    out: dict[str, str] = {}
    if not doc:
        return out
    lines = inspect.cleandoc(doc).splitlines()
    inside, indent, current = False, None, None
    for line in lines:
        if _SECTION.match(line):
            inside, indent, current = True, None, None
            continue
        if not inside:
            continue
        if line.strip() and not line.startswith(" "):
            inside = False  # the next section
            continue
        m = _ENTRY.match(line)
        if m and (indent is None or len(m.group(1)) == indent):
            indent = len(m.group(1))
            current = m.group(2)
            out[current] = m.group(4).strip()
        elif current is not None and line.strip():
            out[current] += " " + line.strip()
    return out


def _type_name(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, str):
        text = annotation
    elif isinstance(annotation, type):
        text = annotation.__name__
    else:
        text = str(annotation)
    text = re.sub(r"\b(typing|collections\.abc|lightning\.[\w.]+|oteacheck_lightning\.[\w.]+|torch\.)\.", "", str(text))
    return text.replace("|", "\\|")


def _default(value: Any) -> str:
    if value is inspect.Parameter.empty or value is dataclasses.MISSING:
        return "required"
    if hasattr(value, "value") and not isinstance(value, (int, float, str)):
        value = value.value  # an enum: its YAML spelling
    if isinstance(value, str) and hasattr(value, "value"):
        value = value.value
    return f"`{value!r}`".replace("|", "\\|") if not isinstance(value, str) else f"`{value}`"


def _clean(text: str) -> str:
    text = re.sub(r":(class|func|meth|attr|mod|data):`~?([^`]+)`", r"`\2`", text)
    text = text.replace("``", "`")
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(cls: type, skip: set[str] = frozenset(), docs: dict[str, str] | None = None) -> list[tuple[str, str, str, str]]:
    docs = dict(docs or {})
    target = cls if dataclasses.is_dataclass(cls) else cls.__init__
    docs = {**docs, **parse_args_section(cls.__doc__), **parse_args_section(getattr(cls.__init__, "__doc__", None))}
    rows = []
    for name, p in inspect.signature(target).parameters.items():
        if name in ("self", "args", "kwargs") or name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        rows.append((name, _type_name(p.annotation), _default(p.default), _clean(docs.get(name, ""))))
    return rows


def _table(key: str, rows: list[tuple[str, str, str, str]]) -> str:
    out = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, typ, default, doc in rows:
        out.append(f"| `{key}{name}` | {typ} | {default} | {doc} |")
    return "\n".join(out)


def markdown() -> str:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from oteacheck_lightning import OTeaCheckpoint, OTeaCheckpointIO, OTeaCheckStrategy, PersistSchedule

    parts = []

    def section(title: str, cls: type, key: str, intro: str, rows: list) -> None:
        summary = _clean(inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0])
        parts.append(f"## {title}\n\n`{cls.__module__.split('.')[0]}.{cls.__name__}`: {summary}\n\n{intro}\n\n"
                     f"{_table(key, rows)}\n")

    section("Strategy", OTeaCheckStrategy, "trainer.strategy.init_args.",
            "Its own options, then every option of Lightning's `DeepSpeedStrategy`, which it forwards.",
            _rows(OTeaCheckStrategy) + _rows(DeepSpeedStrategy, skip={"accelerator", "parallel_devices",
                                                                      "cluster_environment", "precision_plugin"}))
    section("Checkpoint IO plugin", OTeaCheckpointIO, "trainer.strategy.init_args.checkpoint_io.init_args.",
            "In Python: `OTeaCheckStrategy(checkpoint_io=OTeaCheckpointIO(...))` or `Trainer(plugins=[...])`.",
            _rows(OTeaCheckpointIO))
    section("Snapshot and persistence policy", OTeaCheckpoint, "checkpoint.",
            "The `OTeaCheckpoint` callback; its `ModelCheckpoint` options follow its own.",
            _rows(OTeaCheckpoint) + _rows(ModelCheckpoint, skip={"dirpath"}))
    section("Persistent tiers", PersistSchedule, "checkpoint.persist[i].",
            "One schedule per tier: `checkpoint.persist` is a list (`[]` keeps snapshots in memory only).",
            _rows(PersistSchedule))
    return "\n".join(parts)


if __name__ == "__main__":
    print(textwrap.dedent(markdown()))

"""The ``oteacheck`` command: LightningCLI training runs with OTeaCheck, and the checkpoint tools.

    oteacheck fit --config examples/gpt2/config.yaml                 # train
    oteacheck fit --config examples/gpt2/config.yaml --ckpt_path last  # resume from the freshest checkpoint
    oteacheck ls|verify|export|gc|memory ...                         # tools, see oteacheck_lightning.tools

Every option of the strategy (``trainer.strategy``: the DeepSpeed options and ``checkpoint_io``), of the
checkpoint IO plugin (``trainer.strategy.init_args.checkpoint_io``) and of the snapshot and persistence policy
(``checkpoint``: ``OTeaCheckpoint`` with its ``persist`` schedules, one per tier) can be set in YAML or as flags.
The configuration is checked before anything is instantiated or any process is started: a bad value fails with
a message that names the key and says what to change (exit code 2).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .callback import OTeaCheckpoint
from .io import MIN_MEMORY_SLOTS
from .persist import unsnapshotted_interval
from .strategy import OTeaCheckStrategy

EXIT_CONFIG = 2
STRATEGY_NAMES = {"oteacheck": None, "oteacheck_stage_1": 1, "oteacheck_stage_2": 2, "oteacheck_stage_3": 3}
ACCELERATORS = {"auto", "cpu", "gpu", "cuda"}


class ConfigError(ValueError):
    """A configuration value that OTeaCheck cannot run with; the message says which key and what to change."""


def _get(ns: Any, key: str, default: Any = None) -> Any:
    """``ns[key]`` for a jsonargparse Namespace, a dict or an object, following dots."""
    cur = ns
    for part in key.split("."):
        if cur is None:
            return default
        if isinstance(cur, dict):
            cur = cur.get(part, default)
        elif hasattr(cur, "get") and not isinstance(cur, (str, bytes)):
            cur = cur.get(part, default)
        else:
            cur = getattr(cur, part, default)
    return cur


def _resolve_class(class_path: str) -> type | None:
    import importlib

    module, _, name = class_path.rpartition(".")
    if not module:
        return None
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _check_url(url: str, key: str) -> None:
    import fsspec

    if "://" not in url:
        return
    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ConfigError(f"{key}: unknown storage protocol {protocol!r} in {url!r}; use a local path, file://, "
                          "hdfs://, webhdfs:// or memory://") from None
    except ImportError as err:
        extra = " (pip install 'oteacheck-lightning[hdfs]')" if protocol == "hdfs" else ""
        raise ConfigError(f"{key}: {url!r} needs a package that is not installed{extra}: {err}") from None


def validate(config: Any) -> list[str]:
    """Checks the parts of a ``fit`` configuration that OTeaCheck depends on. Raises :class:`ConfigError`;
    returns warnings (settings that run, but probably not as intended)."""
    warnings: list[str] = []
    strategy = _get(config, "trainer.strategy")
    stage: int | None = 2
    io_args: Any = None
    if isinstance(strategy, str):
        if strategy not in STRATEGY_NAMES:
            raise ConfigError(
                f"trainer.strategy is {strategy!r}; OTeaCheck needs its own strategy. Set trainer.strategy to "
                "'oteacheck' (or 'oteacheck_stage_1|2|3'), or to class_path: oteacheck_lightning.OTeaCheckStrategy "
                "with init_args (stage, checkpoint_io, any DeepSpeedStrategy option)"
            )
        stage = STRATEGY_NAMES[strategy] or 2
    elif strategy is not None:
        class_path = _get(strategy, "class_path")
        if class_path is None:
            if not isinstance(strategy, OTeaCheckStrategy):
                raise ConfigError(f"trainer.strategy must be an OTeaCheckStrategy, got {type(strategy).__name__}")
            stage = getattr(strategy, "config", {}).get("zero_optimization", {}).get("stage", 2)
        else:
            cls = _resolve_class(str(class_path))
            if cls is None or not (isinstance(cls, type) and issubclass(cls, OTeaCheckStrategy)):
                raise ConfigError(
                    f"trainer.strategy.class_path is {class_path!r}; it must be oteacheck_lightning.OTeaCheckStrategy "
                    "(or a subclass)"
                )
            init = _get(strategy, "init_args") or {}
            stage = _get(init, "stage", 2)
            zero = _get(init, "zero_optimization", True)
            if zero is False:
                stage = 0
            if stage not in (0, 1, 2, 3):
                raise ConfigError(f"trainer.strategy.init_args.stage is {stage!r}; use 0, 1, 2 or 3")
            if _get(init, "offload_optimizer_device") == "nvme" and _get(init, "offload_optimizer") and stage == 3:
                raise ConfigError(
                    "trainer.strategy.init_args.offload_optimizer_device is 'nvme' with ZeRO 3: the optimizer state "
                    "is not in memory and cannot be snapshotted; use 'cpu' or turn offload_optimizer off"
                )
            io_args = _get(init, "checkpoint_io")
    if io_args is not None:
        class_path = _get(io_args, "class_path")
        if class_path is not None:
            from .io import OTeaCheckpointIO

            cls = _resolve_class(str(class_path))
            if cls is None or not issubclass(cls, OTeaCheckpointIO):
                raise ConfigError(f"trainer.strategy.init_args.checkpoint_io.class_path is {class_path!r}; it must be "
                                  "oteacheck_lightning.OTeaCheckpointIO")
            io_args = _get(io_args, "init_args") or {}
        slots = _get(io_args, "memory_slots")
        if slots is not None and (not isinstance(slots, int) or slots < MIN_MEMORY_SLOTS):
            raise ConfigError(f"checkpoint_io.memory_slots is {slots!r}; use at least {MIN_MEMORY_SLOTS} (the newest "
                              "snapshot, the one before it, one being filled), or leave it out for the default")
        memory_dir = _get(io_args, "memory_dir")
        if memory_dir is not None:
            memory_dir = str(memory_dir)
            if not os.path.isdir(memory_dir) or not os.access(memory_dir, os.W_OK):
                raise ConfigError(f"checkpoint_io.memory_dir {memory_dir!r} is not a writable folder; point it at "
                                  "shared memory (/dev/shm) or create it")
    precision = str(_get(config, "trainer.precision") or "32")
    if stage == 0 and precision not in ("32", "32-true"):
        raise ConfigError(f"ZeRO stage 0 snapshots fp32 weights only, but trainer.precision is {precision!r}; use "
                          "stage 1, 2 or 3 for mixed precision, or trainer.precision: 32")
    accelerator = _get(config, "trainer.accelerator")
    if isinstance(accelerator, str) and accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator is {accelerator!r}; OTeaCheck runs on 'gpu' (CUDA) or 'cpu'")
    if _get(config, "trainer.use_distributed_sampler"):
        warnings.append("trainer.use_distributed_sampler is true: Lightning re-draws a shuffled order on resume; "
                        "for an exact resume use a stateful sampler and set it to false")
    every = _get(config, "checkpoint.snapshot_every_n_steps", 1)
    if not isinstance(every, int) or every < 1:
        raise ConfigError(f"checkpoint.snapshot_every_n_steps is {every!r}; use an integer >= 1 (1 = every step)")
    persist = _get(config, "checkpoint.persist")
    if persist is not None and not isinstance(persist, (list, tuple)):
        persist = [persist]
    for i, schedule in enumerate(persist or []):
        key = f"checkpoint.persist[{i}]"
        n, seconds, keep = (_get(schedule, k) for k in ("every_n_steps", "every_n_seconds", "keep_last"))
        if n is None and seconds is None:
            raise ConfigError(f"{key}: set every_n_steps or every_n_seconds (or both)")
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ConfigError(f"{key}.every_n_steps is {n!r}; use an integer >= 1 or null")
        if seconds is not None and seconds <= 0:
            raise ConfigError(f"{key}.every_n_seconds is {seconds!r}; use a number > 0 or null")
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise ConfigError(f"{key}.keep_last is {keep!r}; use an integer >= 1, or null to keep all")
        problem = unsnapshotted_interval(n, every, "checkpoint.snapshot_every_n_steps")
        if problem is not None:
            raise ConfigError(f"{key}.every_n_steps is {n}, {problem}")
        url = _get(schedule, "url")
        if url is not None:
            _check_url(str(url), f"{key}.url")
    dirpath = _get(config, "checkpoint.dirpath")
    if dirpath is not None:
        _check_url(str(dirpath), "checkpoint.dirpath")
    return warnings


class OTeaCheckCLI(LightningCLI):
    """:class:`~lightning.pytorch.cli.LightningCLI` with OTeaCheck wired in.

    * ``trainer.strategy`` defaults to ``OTeaCheckStrategy`` (ZeRO 2) and must be one;
    * ``checkpoint`` configures the :class:`OTeaCheckpoint` callback (snapshot and persistence policy), which is
      always present;
    * ``trainer.use_distributed_sampler`` defaults to false (the examples' loaders carry their own stateful
      sampler, so that a resume continues with the exact next batch);
    * the configuration is validated before anything is instantiated (:func:`validate`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(OTeaCheckpoint, "checkpoint")
        parser.set_defaults({
            "trainer.strategy": {"class_path": "oteacheck_lightning.OTeaCheckStrategy", "init_args": {"stage": 2}},
            "trainer.use_distributed_sampler": False,
        })

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        for warning in validate(config):
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(warning)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            # constructors of the strategy, the plugin and the schedules check their arguments too
            raise ConfigError(f"invalid configuration: {_root_cause(str(err))}") from err


def _root_cause(message: str) -> str:
    """The constructor's own words from jsonargparse's nested union report (which tries every type of a
    ``Strategy | str`` or ``OTeaCheckpointIO | None`` and lists each failure)."""
    generic = ("Expected a ", "Does not validate", "Given value", "Subtypes:", "Errors:")
    causes = []
    for line in message.splitlines():
        text = line.strip().removeprefix("- ").strip()
        if text and not text.startswith(generic) and text not in causes:
            causes.append(text)
    return "; ".join(causes) if causes and len(causes) < len(message.splitlines()) else message


def _usage() -> str:
    return (
        "usage: oteacheck {fit,validate,test,predict} --config CONFIG.yaml [options]   (LightningCLI, see --help)\n"
        "       oteacheck {ls,verify,export,gc,memory} ...                              (checkpoint tools)\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``oteacheck`` console script and of ``python -m oteacheck_lightning``."""
    from .tools import TOOLS
    from .tools import main as tools_main

    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        return tools_main(argv)
    if argv[:1] in (["-h"], ["--help"]):
        sys.stdout.write(_usage() + "\nTools: oteacheck ls|verify|export|gc|memory --help\n\n")
    # `class_path: examples.gpt2.GPT2Module` resolves from the current folder, as with `python -m`
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        # from the command line LightningCLI reads sys.argv itself (and the processes it launches re-read it)
        OTeaCheckCLI(args=None if from_command_line else argv)
    except ConfigError as err:
        sys.stderr.write(_usage())
        sys.stderr.write(f"oteacheck: error: {err}\n")
        return EXIT_CONFIG
    return 0


def console_main() -> None:
    raise SystemExit(main())

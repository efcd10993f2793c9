"""Helpers for the tests that run the ``oteacheck`` command as a real process tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[2]


class FinalState(pl.Callback):
    """At the end of training: rank 0 saves the LightningModule's full ``state_dict()`` (ZeRO 3 parameters
    gathered first), and every rank its torchmetrics states. Added to a run with a second ``--config``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dump(trainer, pl_module)

    def dump(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from oteacheck_lightning.training_state import collect_metrics

        self.out.mkdir(parents=True, exist_ok=True)
        params = list(pl_module.parameters())
        if any(hasattr(p, "ds_tensor") for p in params):
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        else:
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        if trainer.global_rank == 0:
            torch.save({"state_dict": state, "step": trainer.global_step}, self.out / "full.pt")
        metrics = collect_metrics(pl_module)
        flat = {f"{m}/{a}": v.detach().clone() for m, e in metrics.items() for a, v in e["states"].items()
                if isinstance(v, torch.Tensor)}
        torch.save(flat, self.out / f"metrics-rank{trainer.global_rank}.pt")


class StartState(FinalState):
    """As training starts (after a resume restored the state): every rank writes an explicit checkpoint to
    ``out/ckpt``, and rank 0 the full ``state_dict()`` to ``out/full.pt``."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(str(self.out / "ckpt"))
        self.dump(trainer, pl_module)


def write_extra_config(path: Path, out: Path, callback: str = "FinalState") -> Path:
    path.write_text(
        f"trainer:\n  callbacks:\n    - class_path: tests.cli.support.{callback}\n"
        f"      init_args:\n        out: {out}\n"
    )
    return path


def whole_training_state(folder: Path) -> dict[str, object]:
    """What a checkpoint folder holds of the training state, independent of how many ranks wrote it: every
    parameter's weights and per-element optimizer states gathered from all ranks, and what every rank holds whole
    (buffers, the optimizer's step counts and hyperparameters, DeepSpeed's counters, the loss scaler)."""
    from oteacheck_lightning import statecodec
    from oteacheck_lightning.format import load_tensors
    from oteacheck_lightning.reshard import Assembler, add_saved_rank
    from oteacheck_lightning.tiers import CheckpointDir

    directory = CheckpointDir.from_url(str(folder))
    world_size = directory.read_commit()["world_size"]
    assembler = Assembler(str(folder))
    whole: dict[str, object] = {}
    for rank in range(world_size):
        loaded = directory.read_rank(rank)
        tensors = load_tensors(loaded.manifest, loaded.buffer)
        meta = statecodec.decode(loaded.manifest.state["main"]["deepspeed"], tensors)
        add_saved_rank(assembler, meta["param_map"], tensors)
        for name, t in tensors.items():
            if name.startswith("buffer/") or (name.startswith("optim/") and t.dim() == 0):
                whole.setdefault(f"rank{rank}/{name.split('/', 3)[-1] if name.startswith('optim/') else name}", t.clone())
        for key in ("param_groups", "loss_scaler", "counters", "stage"):
            whole[f"rank{rank}/{key}"] = meta[key]
        whole[f"rank{rank}/optim_scalars"] = sorted({json_key(v) for v in meta["optim_scalars"].values()})
    assembler.check_complete()
    state = {f"{key or 'weight'}/{name}": t for (key, name), t in assembler.full.items()}
    # what every rank holds whole must agree between ranks; keep one copy
    for name, value in whole.items():
        rank, rest = name.split("/", 1)
        first = whole[f"rank0/{rest}"]
        same = torch.equal(value, first) if isinstance(value, torch.Tensor) else value == first
        assert same, f"{folder}: ranks disagree on {rest}"
        if rank == "rank0":
            state[rest] = value
    return state


def json_key(value: object) -> str:
    import json

    return json.dumps(value, sort_keys=True)


def environment(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OTEACHECK_JOB_ID=f"cli-{tmp.name}", OTEACHECK_MEMORY_DIR=str(tmp / "shm"), PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")) if p))
    (tmp / "shm").mkdir(exist_ok=True)
    return env


def oteacheck(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs ``python -m oteacheck_lightning ARGS`` from the repository root."""
    return subprocess.run([sys.executable, "-m", "oteacheck_lightning", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout, start_new_session=True)


def fit(tmp: Path, run: str, *overrides: str, extra: Path | None = None, env: dict[str, str] | None = None,
        config: str = "examples/gpt2/config.yaml") -> subprocess.CompletedProcess:
    """Trains an example through the CLI with its checkpoints and logs under ``tmp/run``."""
    args = ["fit", "--config", config]
    if extra is not None:
        args += ["--config", str(extra)]
    args += [f"--trainer.default_root_dir={tmp / run}", f"--checkpoint.dirpath={tmp / 'ckpt'}",
             "--trainer.logger=false", "--trainer.enable_progress_bar=false", *overrides]
    proc = oteacheck(*args, env=env or environment(tmp))
    if proc.returncode != 0:
        raise AssertionError(f"oteacheck fit failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc

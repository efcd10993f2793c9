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


def write_extra_config(path: Path, out: Path) -> Path:
    path.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.cli.support.FinalState\n"
        f"      init_args:\n        out: {out}\n"
    )
    return path


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

"""Runs tests/support/train_tiny.py as a real process tree and reads what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "support" / "train_tiny.py"


def command(root: Path, out: Path, **options) -> list[str]:
    cmd = [sys.executable, str(SCRIPT), "--root", str(root), "--out", str(out)]
    for key, value in options.items():
        if isinstance(value, (list, tuple)):  # a repeatable option
            for item in value:
                cmd += [f"--{key.replace('_', '-')}", str(item)]
        elif value is True:
            cmd.append(f"--{key.replace('_', '-')}")
        elif value is not None and value is not False:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


def environment(job_id: str, memory_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OTEACHECK_JOB_ID=job_id, OTEACHECK_MEMORY_DIR=str(memory_dir), PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p))
    return env


def in_small_tmpfs(folder: Path, size: str) -> list[str]:
    """A command prefix that runs the training in its own user and mount namespace with a real, size-limited tmpfs
    mounted on ``folder`` (no root needed where unprivileged user namespaces are allowed; the mount disappears
    with the process tree)."""
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
            f'mount -t tmpfs -o size={size},mode=0700 tmpfs "{folder}" && exec "$@"', "sh"]


def run(root: Path, out: Path, env: dict[str, str], timeout: float = 600, prefix: list[str] | None = None,
        **options) -> subprocess.CompletedProcess:
    # its own session: a fault that kills the run's process group must not take the test runner with it
    proc = subprocess.run((prefix or []) + command(root, out, **options), env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def steps_logged(out: Path, rank: int = 0) -> list[dict]:
    path = out / f"losses-rank{rank}.jsonl"
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by the kill
    return lines


def run_and_kill(root: Path, out: Path, env: dict[str, str], kill_after_step: int, timeout: float = 600,
                 during=None, **options) -> int:
    """Starts training, waits until rank 0 logged ``kill_after_step``, SIGKILLs every process of the run; returns
    the highest step rank 0 logged. ``during()``, if given, is called while the run is going (every 20 ms); when it
    returns True the run is killed at once. The run's stderr is kept in ``out/stderr.txt``."""
    out.mkdir(parents=True, exist_ok=True)
    stderr = open(out / "stderr.txt", "a")
    proc = subprocess.Popen(command(root, out, **options), env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if during is not None and during():
                break
            logged = steps_logged(out)
            if logged and logged[-1]["step"] >= kill_after_step:
                break
            if proc.poll() is not None:
                raise AssertionError(f"training ended before the kill:\n{(out / 'stderr.txt').read_text()[-6000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("training did not reach the kill step in time")
            time.sleep(0.02)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        stderr.close()
    return max(d["step"] for d in steps_logged(out))


def final_state(out: Path, rank: int) -> dict:
    return torch.load(out / f"final-rank{rank}.pt", weights_only=True)


def resumed_from(out: Path, rank: int) -> dict | None:
    return json.loads((out / f"resume-rank{rank}.json").read_text())


def losses_by_step(out: Path, rank: int) -> dict[int, str]:
    """The loss of each step; for a step logged twice (before a kill and after the resume), the later one."""
    return {d["step"]: d["loss"] for d in steps_logged(out, rank)}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (torch.equal treats NaN padding as different from itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def assert_bit_identical(reference: Path, resumed: Path, ranks: int) -> None:
    for rank in range(ranks):
        a, b = final_state(reference, rank), final_state(resumed, rank)
        assert a["step"] == b["step"]
        assert a["engine"].keys() == b["engine"].keys()
        different = [n for n in a["engine"] if not same_bits(a["engine"][n], b["engine"][n])]
        assert not different, f"rank {rank}: tensors differ after resume: {different}"
        assert all(same_bits(x, y) for x, y in zip(a["metric"], b["metric"])), "torchmetrics state differs"
        ref_losses, got = losses_by_step(reference, rank), losses_by_step(resumed, rank)
        assert got == ref_losses, f"rank {rank}: losses differ at steps {[s for s in got if got[s] != ref_losses.get(s)]}"

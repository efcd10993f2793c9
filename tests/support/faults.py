"""Faults injected into a real training process by wrapping real backends (used by train_tiny.py --fault)."""

from __future__ import annotations

import os
import signal

from oteacheck_lightning import persist
from oteacheck_lightning.tiers import fsspec_tier


def install(spec: str) -> None:
    name, _, arg = spec.partition(":")
    if name == "kill-during-persist":
        _kill_during_persist(int(arg))
    elif name == "stall-remote-persist":
        step, _, folder = arg.partition(":")
        _stall_remote_persist(int(step), folder)
    elif name == "persist-request-fails":
        _persist_request_fails(int(arg))
    elif name == "rank1-seal-stalls-then-all-die":
        _seal_stalls(int(arg), 3.0, rank="1", then_die=True)
    elif name == "rank1-persist-clock-early":
        _persist_clock_early(float(arg), rank="1")
    elif name == "seal-stalls":
        step, _, seconds = arg.partition(":")
        _seal_stalls(int(step), float(seconds))
    elif name == "update-hook-silent":
        _update_hook_silent()
    elif name == "first-updates-overflow":
        _first_updates_overflow(int(arg))
    else:
        raise ValueError(f"unknown fault {spec!r}")


def _update_hook_silent() -> None:
    """The optimizer hook is reported installed but never runs, as with an optimizer that updates the state without
    going through a hooked ``step``: the checkpoint IO waits for a BEFORE_UPDATE that never comes."""
    from oteacheck_lightning import strategy

    class Handle:
        def remove(self) -> None:
            pass

    strategy.install_update_hook = lambda base_optimizer, on_update: Handle()


def _first_updates_overflow(count: int) -> None:
    """DeepSpeed finds an overflow in the first ``count`` optimizer steps and skips their updates, as fp16 training
    does while its loss scale settles: its real overflow path runs (gradients dropped, the step counted as skipped),
    on every rank alike (the overflow check's all-reduce still runs)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    step, has_overflow = DeepSpeedZeroOptimizer.step, DeepSpeedZeroOptimizer.has_overflow
    steps = 0

    def overflowing_step(self, closure=None):
        nonlocal steps
        steps += 1
        if steps > count:
            return step(self, closure)
        checks = self.check_grad_overflow
        self.check_grad_overflow = True  # fp32 and bf16 runs do not check by default
        try:
            return step(self, closure)
        finally:
            self.check_grad_overflow = checks

    def overflow_found(self, partition_gradients=True):
        found = has_overflow(self, partition_gradients)
        return True if steps <= count else found

    DeepSpeedZeroOptimizer.step = overflowing_step
    DeepSpeedZeroOptimizer.has_overflow = overflow_found


def _persist_request_fails(step: int) -> None:
    """The persister refuses, once, to be told of the sealed snapshot of ``step`` (as if pinning it had failed)."""
    original = persist.Persister.request
    failed = []

    def request(self, at, force=False):
        if at == step and not failed:
            failed.append(at)
            raise OSError(f"injected: cannot pin the snapshot of step {at}")
        return original(self, at, force)

    persist.Persister.request = request


def _persist_clock_early(seconds: float, rank: str) -> None:
    """After its first time-scheduled request, the persister of ``rank`` counts from ``seconds`` earlier than the
    others, as when a rank's clock or schedule is out of step with its peers'."""
    if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) != rank:
        return
    original = persist.Persister.request
    shifted = []

    def request(self, step, force=False):
        before = [t.last_request for t in self.targets]
        original(self, step, force)
        for target, last in zip(self.targets, before):
            if not shifted and not force and target.last_request != last:
                shifted.append(step)
                target.last_request -= seconds

    persist.Persister.request = request


def _seal_stalls(step: int, seconds: float, rank: str | None = None, then_die: bool = False) -> None:
    """The sealer (of ``rank``, or of every rank) stalls for ``seconds`` before sealing the snapshot of ``step``, as if
    starved of CPU; with ``then_die`` the whole run dies then, before the seal."""
    import time

    from oteacheck_lightning import io

    if rank is not None and os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) != rank:
        return
    original = io.OTeaCheckpointIO._seal

    def seal(self, pending):
        if pending.step == step:
            time.sleep(seconds)
            if then_die:
                os.killpg(os.getpgid(0), signal.SIGKILL)
        return original(self, pending)

    io.OTeaCheckpointIO._seal = seal


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


def _stall_remote_persist(step: int, folder: str) -> None:
    """Rank 0's persister, writing the data object of the first step >= ``step`` to a remote (non-local) tier,
    writes its first half, creates ``folder/stalled`` and waits for ``folder/go`` before writing the rest: the test
    kills the NameNode in between, so the write is really cut in the middle by the outage."""
    import time
    from pathlib import Path

    original = fsspec_tier.CheckpointDir._put
    fired = []

    def put(self, path, chunks):
        name = path.rsplit("/", 1)[-1]
        this = int(path.rsplit("/", 2)[-2].removeprefix(fsspec_tier.STEP_PREFIX) or -1) if "/step-" in path else -1
        if self.local or fired or name != "rank-00000.data" or this < step:
            return original(self, path, chunks)
        fired.append(this)

        def stalled():
            for i, chunk in enumerate(chunks):
                if i:
                    yield chunk
                    continue
                half = max(1, len(chunk) // 2)
                yield chunk[:half]
                Path(folder, "stalled").write_text(str(this))
                deadline = time.monotonic() + 300
                while not Path(folder, "go").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                yield chunk[half:]

        return original(self, path, stalled())

    fsspec_tier.CheckpointDir._put = put

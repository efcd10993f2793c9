"""On a CUDA GPU: the strategy snapshots every step and a killed run resumes bit-exactly (one GPU)."""

import random

import pytest
import torch

from tests.support import harness

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("stage", [2, 3])
def test_cuda_kill_and_resume_is_bit_exact(tmp_path, shm_dir, stage):
    env = harness.environment(f"gpu-{stage}-{tmp_path.name}", shm_dir)
    common = dict(stage=stage, devices=1, accelerator="cuda", max_steps=30, persist_every=10)
    harness.run(tmp_path / "ref-root", tmp_path / "ref", env, **common)
    kill_at = random.Random(stage).randint(5, 22)
    logged = harness.run_and_kill(tmp_path / "root", tmp_path / "run", env, kill_at, sleep=0.05, **common)
    harness.run(tmp_path / "root", tmp_path / "run", env, ckpt_path="last", **common)
    resumed = harness.resumed_from(tmp_path / "run", 0)
    assert resumed["source"].startswith("memory:") and resumed["step"] >= logged - 1
    harness.assert_bit_identical(tmp_path / "ref", tmp_path / "run", ranks=1)

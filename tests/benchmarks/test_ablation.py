"""The engine ablation harness on CPU: policies interleaved in one real training run (Lightning, DeepSpeed ZeRO-2
on its CPU accelerator, a tiny GPT-2), one JSON per variant. Checks the bookkeeping, not the timings."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import attribution

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
PROBE_MS = 60.0  # well above the tiny model's iteration-to-iteration spread on a CPU
FIELDS = ("card", "gpus", "model", "method", "variant", "iter_ms_median", "overhead", "stall_ms_median",
          "extra_gpu_mib", "versions", "command", "mib_by_phase", "snapshot_mib_per_rank", "issues_median", "issue_ms_median")


def test_every_variant_gets_its_iterations_and_a_ratio_to_no_checkpointing_of_the_same_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(ROOT / "src"), str(ROOT))), OTEACHECK_MEMORY_DIR=str(tmp_path / "shm"))
    rounds, block, skip = 2, 4, 1
    cmd = [sys.executable, "-m", "benchmarks.ablation", "--smoke", "--model", "gpt2-124m", "--variants",
           "none,eager,bubbles,bubbles+coarse,bubbles+late,probe+end,probe+side", "--rounds", str(rounds), "--block", str(block),
           "--skip", str(skip), "--warmup", "4", "--profile-rounds", "1", "--probe-ms", str(PROBE_MS), "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {json.loads(p.read_text())["variant"]: json.loads(p.read_text()) for p in tmp_path.glob("ablation__*.json")}
    policies = ("eager", "bubbles", "bubbles+coarse", "bubbles+late")
    probes = ("probe+end", "probe+side")
    assert set(results) == {"none", *policies, *probes}
    kept_per_block = block - skip - 1  # all but the first `skip` iterations and the last
    for variant, r in results.items():
        assert all(k in r for k in FIELDS), variant
        blocks = rounds * (len(policies) + len(probes) if variant == "none" else 1)  # every other block follows a none block
        assert r["iterations"] == blocks * kept_per_block, variant
        assert r["command"].startswith("python -m benchmarks.ablation --smoke")
        # host time per iteration: the training thread's CPU is part of the process's, and a CPU run trains on it
        assert 0 < r["train_cpu_ms_median"] <= r["process_cpu_ms_median"]
        assert r["host_ms_median"] > 0
        assert r["gc_ms_mean"] >= 0 and r["sync_wait_ms_median"] >= 0
        assert r["gpu_behind_share"] is None  # asked of CUDA events only
    assert results["none"]["overhead"] == 1.0 and results["none"]["stall_ms_median"] is None
    for variant in policies:
        r = results[variant]
        assert r["stall_ms_median"] is not None
        # the training thread's issue calls were counted and timed
        assert r["issues_median"] >= 1 and r["issue_ms_median"] > 0
        # one ratio per round (policy block / the none block before it); the overhead is their median
        assert len(r["overhead_pairs"]) == rounds and r["overhead"] == pytest.approx(statistics.median(r["overhead_pairs"]))
        lo, hi = r["overhead_ci95"]
        assert min(r["overhead_pairs"]) <= lo <= r["overhead"] <= hi <= max(r["overhead_pairs"])
        # every snapshot byte was copied in some phase (the CPU path has no staging ring and no block windows
        # for the coarse variant)
        assert sum(r["mib_by_phase"].values()) == pytest.approx(r["snapshot_mib_per_rank"], rel=0.2)
    # a probe takes no snapshot, and its spin lands in the iterations kept: the step's end in the iteration before
    # the next one's start, like a capture (a spin counted in a left-out iteration would not show in the median)
    for variant in probes:
        r = results[variant]
        assert r["method"] == variant.replace("+", "-") and r["every_n_steps"] is None and r["probe_ms"] == PROBE_MS
        assert r["stall_ms_median"] is None and r["issues_median"] is None and r["extra_gpu_mib"] == 0.0
        assert len(r["overhead_pairs"]) == rounds
    assert results["probe+end"]["host_ms_median"] >= results["none"]["host_ms_median"] + PROBE_MS / 2
    # the side probe spins its own thread: the training thread's CPU time is not it (the run itself, on two CPUs,
    # still slows through the GIL: not asserted)
    assert results["probe+side"]["train_cpu_ms_median"] < results["probe+end"]["train_cpu_ms_median"] - PROBE_MS / 2
    assert set(results["eager"]["mib_by_phase"]) == {"iteration_start"} and results["eager"]["issues_median"] == 1
    assert not any(k.endswith("_block") for k in results["bubbles+coarse"]["mib_by_phase"])
    # the profiled round (left out of the counts above) says, per policy, where its time went against none's
    (profile_file,) = tmp_path.glob("profile__gpt2-124m__g1__*.json")
    profile = json.loads(profile_file.read_text())
    others = policies + probes
    assert profile["iterations"] == {"none": len(others) * (block - skip - 1), **{v: block - skip - 1 for v in others}}
    assert set(profile["differences"]) == set(others)
    top = {row["name"] for row in profile["none_top_ms"]}
    assert attribution.PYTHON in top and any(name.startswith("aten::") for name in top)
    for variant in others:
        difference = profile["differences"][variant]
        assert difference["training_thread_ms"]["none"] > 0 and difference["training_thread_ms"][variant] > 0
        assert all(row["delta"] == pytest.approx(row[variant] - row["none"], abs=2e-4) for row in difference["largest_ms"])

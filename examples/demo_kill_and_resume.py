"""Kill a 2-process DeepSpeed training run with SIGKILL, resume it with ckpt_path="last", and show that it
continued exactly where it stopped.

    python examples/demo_kill_and_resume.py [--stage 2] [--kill-after 13]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import harness  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, default=2, choices=[1, 2, 3])
    p.add_argument("--kill-after", type=int, default=13)
    p.add_argument("--max-steps", type=int, default=24)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="oteacheck-demo-"))
    env = harness.environment(f"demo-{work.name}", work / "shm")
    common = dict(stage=args.stage, devices=2, max_steps=args.max_steps, persist_every=5)
    try:
        print(f"[1/3] training ZeRO-{args.stage} on 2 CPU processes; killing it with SIGKILL after step {args.kill_after}")
        logged = harness.run_and_kill(work / "ckpt", work / "run", env, args.kill_after, sleep=0.05, **common)
        print(f"      killed; the last step it logged was {logged}")
        print('[2/3] restarting with trainer.fit(model, ckpt_path="last")')
        harness.run(work / "ckpt", work / "run", env, **common, ckpt_path="last")
        resumed = harness.resumed_from(work / "run", 0)
        print(f"      resumed from step {resumed['step']} ({resumed['source']})")
        print("[3/3] an uninterrupted run for comparison")
        harness.run(work / "ref-ckpt", work / "ref", env, **common)
        harness.assert_bit_identical(work / "ref", work / "run", ranks=2)
        print(f"weights, optimizer states and every loss after the resume are bit-identical to the uninterrupted run")
        print(json.dumps({"killed_after_step": logged, "resumed_from": resumed}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

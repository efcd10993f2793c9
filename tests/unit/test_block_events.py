"""The strategy announces only the model-block events the checkpoint IO asks for: every block, forward and backward,
in the iterations that time the windows, and otherwise just the blocks that are issue points (a real Trainer with
DeepSpeed on the CPU, in a process of its own; the scheduler pinned to issue from the second block on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from oteacheck_lightning.engine import RETIME_EVERY
from tests.support.block_events import BLOCKS

ROOT = Path(__file__).resolve().parents[2]


def test_block_events_are_announced_only_where_the_engine_wants_them(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(ROOT / "src"), str(ROOT))), OTEACHECK_MEMORY_DIR=str(tmp_path / "shm"))
    out = tmp_path / "events.json"
    done = subprocess.run([sys.executable, "-m", "tests.support.block_events", str(out), str(tmp_path / "root"),
                           "--steps", str(RETIME_EVERY + 6)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    iterations = json.loads(out.read_text())
    every_block = [["forward_block", i] for i in range(BLOCKS)] + [["backward_block", i] for i in reversed(range(BLOCKS))]
    timed = [it for it in iterations if it["wanted"] is None]
    chosen = [it for it in iterations if it["wanted"] is not None]
    # the first iteration has no snapshot to copy: nothing wanted, nothing announced
    assert iterations[0]["wanted"] == [] and iterations[0]["announced"] == []
    # the first snapshot (copied in iteration 1) and one in RETIME_EVERY after it time every window
    assert [it["step"] for it in timed] == [1, 1 + RETIME_EVERY] and all(it["announced"] == every_block for it in timed)
    # the others announce exactly the issue points at blocks: every block window from the second block's forward on
    # (the first issue point), in the order they come, and not the first block's forward
    assert chosen and all(it["wanted"] == sorted(every_block[1:]) and it["announced"] == every_block[1:] for it in chosen[1:])

"""Resuming with another number of processes (``--ckpt_path last``): the weights and the optimizer state are
re-partitioned exactly, ZeRO 2 and 3, from 2 processes to 1 and back to 2."""

import pytest
import torch

from tests.cli import support
from tests.cli.test_export import PERSIST, assert_export_equals_the_full_state_dict, two_process_run

pytestmark = pytest.mark.multiprocess


def resume(tmp_path, run: str, stage: int, devices: int, max_steps: int, ckpt_path: str = "last") -> support.subprocess.CompletedProcess:
    """Resumes the run in ``tmp_path/ckpt`` on ``devices`` processes; ``StartState`` writes what it restored
    to ``tmp_path/run``."""
    extra = support.write_extra_config(tmp_path / f"{run}.yaml", tmp_path / run, callback="StartState")
    return support.fit(tmp_path, run, f"--trainer.max_steps={max_steps}", PERSIST, f"--ckpt_path={ckpt_path}",
                       f"--trainer.devices={devices}", f"--trainer.strategy.init_args.stage={stage}", extra=extra)


def assert_same_state(resumed, saved) -> None:
    got, expected = support.whole_training_state(resumed), support.whole_training_state(saved)
    assert sorted(got) == sorted(expected)
    assert any(name.startswith("exp_avg_sq/") for name in expected), "no per-element optimizer state compared"
    different = [k for k, v in expected.items()
                 if not (torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v)]
    assert not different, f"re-partitioned state differs from the saved one: {different[:5]}"


# back to 2 processes: ZeRO 2 with "last", ZeRO 3 from the explicit checkpoint folder the 1-process run wrote
@pytest.mark.parametrize("stage", [2, 3])
def test_a_run_resumes_with_fewer_and_then_more_processes_with_its_state_exact(tmp_path, stage):
    two_process_run(tmp_path, stage)
    assert_export_equals_the_full_state_dict(tmp_path, stage)  # the weights on the way, from the same run
    saved = torch.load(tmp_path / "final" / "full.pt", weights_only=True)

    # 2 processes -> 1: resumes step 6, trains to 9; retention (keep 2) removes step 3 with its second rank's files
    one = resume(tmp_path, "one", stage, devices=1, max_steps=9)
    assert "written by 2 ranks and this run has 1" in one.stderr
    restored = torch.load(tmp_path / "one" / "full.pt", weights_only=True)
    assert restored["step"] == 6
    different = [k for k, v in saved["state_dict"].items() if not torch.equal(restored["state_dict"][k], v)]
    assert not different, f"weights after the resume differ from those saved: {different[:5]}"
    assert_same_state(tmp_path / "one" / "ckpt", tmp_path / "ckpt" / "step-000000006")
    steps = sorted(p.name for p in (tmp_path / "ckpt").glob("step-*"))
    assert steps == ["step-000000006", "step-000000009"], steps
    assert sorted(p.name for p in (tmp_path / "ckpt" / "step-000000009").iterdir()) == [
        "COMMIT", "rank-00000.data", "rank-00000.manifest.json"]

    if stage == 2:  # 1 process -> 2: resumes step 9 (the newest, written by one rank), not step 6 (written by two)
        resume(tmp_path, "two", stage, devices=2, max_steps=10)
        assert torch.load(tmp_path / "two" / "full.pt", weights_only=True)["step"] == 9
        assert_same_state(tmp_path / "two" / "ckpt", tmp_path / "ckpt" / "step-000000009")
    else:  # 1 process -> 2 from the folder trainer.save_checkpoint wrote at step 6
        resume(tmp_path, "two", stage, devices=2, max_steps=10, ckpt_path=str(tmp_path / "one" / "ckpt"))
        assert torch.load(tmp_path / "two" / "full.pt", weights_only=True)["step"] == 6
        assert_same_state(tmp_path / "two" / "ckpt", tmp_path / "one" / "ckpt")

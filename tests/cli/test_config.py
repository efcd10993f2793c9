"""Bad configurations fail before anything is instantiated, with a message that says what to change."""

import pytest

from oteacheck_lightning import cli
from tests.cli.support import ROOT

CONFIG = "examples/gpt2/config.yaml"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["oteacheck"])


def fit(capsys, *overrides):
    code = cli.main(["fit", "--config", CONFIG, *overrides])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--trainer.strategy=ddp"], "trainer.strategy is 'ddp'; OTeaCheck needs its own strategy. Set trainer.strategy to 'oteacheck'"),
        (["--trainer.strategy.init_args.stage=4"], "trainer.strategy.init_args.stage is 4; use 0, 1, 2 or 3"),
        (["--trainer.strategy.init_args.stage=0", "--trainer.precision=bf16-mixed"], "use stage 1, 2 or 3 for mixed precision"),
        (["--trainer.strategy.init_args.checkpoint_io.init_args.memory_slots=2"], "checkpoint_io.memory_slots is 2; use at least 3"),
        (["--trainer.strategy.init_args.checkpoint_io.init_args.memory_dir=/nonexistent/shm"], "is not a writable folder"),
        (["--trainer.accelerator=tpu"], "trainer.accelerator is 'tpu'; OTeaCheck runs on 'gpu' (CUDA) or 'cpu'"),
        (["--checkpoint.snapshot_every_n_steps=0"], "checkpoint.snapshot_every_n_steps is 0; use an integer >= 1"),
        (["--checkpoint.snapshot_every_n_steps=4"], "checkpoint.persist[0].every_n_steps is 10, not a multiple of checkpoint.snapshot_every_n_steps (4)"),
        (["--checkpoint.persist=[{every_n_steps: null, every_n_seconds: null}]"], "checkpoint.persist[0]: set every_n_steps or every_n_seconds"),
        (["--checkpoint.persist=[{every_n_steps: 10, keep_last: 0}]"], "checkpoint.persist[0].keep_last is 0; use an integer >= 1, or null to keep all"),
        (["--checkpoint.persist=[{url: 'nosuchfs://x/y'}]"], "checkpoint.persist[0].url: unknown storage protocol 'nosuchfs'"),
        # checked by the constructors themselves, reported in their words
        (["--trainer.strategy.init_args.checkpoint_io.init_args.staging_mib=0"], "invalid configuration: staging_mib must be at least 1 (MiB), got 0.0"),
        (["--trainer.strategy.init_args.checkpoint_io.init_args.schedule=sometimes"], "invalid configuration: schedule must be one of"),
    ],
)
def test_a_bad_setting_fails_at_setup_naming_the_key_and_the_fix(capsys, overrides, message):
    code, err = fit(capsys, *overrides)
    assert code == cli.EXIT_CONFIG == 2
    assert "oteacheck: error: " in err and message in err, err[-2000:]


def test_a_value_of_the_wrong_type_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", "--config", CONFIG, "--checkpoint.snapshot_every_n_steps=often"])
    assert exc.value.code == 2
    assert "snapshot_every_n_steps" in capsys.readouterr().err


def test_every_option_can_be_set_from_flags(capsys):
    import yaml

    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", "--config", CONFIG, "--trainer.strategy.init_args.stage=3",
                  "--trainer.strategy.init_args.reduce_bucket_size=12345",
                  "--trainer.strategy.init_args.checkpoint_io.init_args.memory_slots=4",
                  "--trainer.strategy.init_args.checkpoint_io.init_args.job_id=job-7",
                  "--checkpoint.snapshot_every_n_steps=2",
                  "--checkpoint.persist=[{url: 'memory://tier', every_n_steps: 4, every_n_seconds: 60, keep_last: 1}]",
                  "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    doc = yaml.safe_load(out[out.index("seed_everything:"):])
    strategy = doc["trainer"]["strategy"]["init_args"]
    assert strategy["stage"] == 3 and strategy["reduce_bucket_size"] == 12345
    io = strategy["checkpoint_io"]["init_args"]
    assert io["memory_slots"] == 4 and io["job_id"] == "job-7"  # and every other OTeaCheckpointIO argument
    assert doc["checkpoint"]["snapshot_every_n_steps"] == 2
    [schedule] = doc["checkpoint"]["persist"]  # every PersistSchedule field (the tier's options) is settable
    assert {k: schedule[k] for k in ("url", "every_n_steps", "every_n_seconds", "keep_last")} == {
        "url": "memory://tier", "every_n_steps": 4, "every_n_seconds": 60.0, "keep_last": 1}


def test_the_command_dispatches_tools_and_explains_itself(capsys, tmp_path):
    assert cli.main(["ls", str(tmp_path / "missing")]) == 3
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "oteacheck {ls,verify,export,gc,memory}" in out and "fit" in out

"""``oteacheck export`` of real 2-process runs, ZeRO 0 to 3: the consolidated weights equal the model's full state_dict."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.cli import support

pytestmark = pytest.mark.multiprocess

STEPS = "--trainer.max_steps=6"
PERSIST = "--checkpoint.persist=[{every_n_steps: 3, keep_last: 2}]"


def two_process_run(tmp_path, stage: int) -> None:
    """Trains the GPT-2 example on 2 processes to step 6, persisting steps 3 and 6 to ``tmp_path/ckpt``; its final
    full state_dict is in ``tmp_path/final/full.pt``."""
    extra = support.write_extra_config(tmp_path / "extra.yaml", tmp_path / "final")
    support.fit(tmp_path, "run", STEPS, PERSIST, f"--trainer.strategy.init_args.stage={stage}", extra=extra)


# ZeRO 2 and 3 are exported by test_resize.py, from the runs it then resumes with another number of processes.
# ZeRO 1 is left out: it shares stage 2's optimizer, its checkpoint tensors (deepspeed_state.py) and the export's
# path; its capture and SIGKILL resume are tested in tests/multiprocess/test_resume.py
def test_export_of_a_two_process_run_equals_the_full_state_dict(tmp_path):
    two_process_run(tmp_path, 0)
    assert_export_equals_the_full_state_dict(tmp_path, 0)


def assert_export_equals_the_full_state_dict(tmp_path, stage: int) -> None:
    """``oteacheck ls`` and ``export`` of :func:`two_process_run`'s checkpoints."""
    full = torch.load(tmp_path / "final" / "full.pt", weights_only=True)
    assert full["step"] == 6

    listed = support.oteacheck("ls", str(tmp_path / "ckpt"), "--json")
    assert listed.returncode == 0, listed.stderr
    steps = [(c["step"], c["committed"], c["world_size"]) for c in json.loads(listed.stdout)]
    assert steps == [(3, True, 2), (6, True, 2)]

    out = tmp_path / "weights.safetensors"
    proc = support.oteacheck("export", str(tmp_path / "ckpt"), str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["step"] == 6 and summary["zero_stage"] == stage and summary["world_size"] == 2

    exported = load_file(str(out))
    expected = full["state_dict"]
    assert sorted(exported) == sorted(expected)
    different = [k for k in expected if not torch.equal(exported[k], expected[k].float())]
    assert not different, f"ZeRO {stage}: exported tensors differ from the state_dict: {different}"

    # the weights load into the plain Hugging Face model, without DeepSpeed or Lightning
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4))
    inner = support.oteacheck("export", str(tmp_path / "ckpt"), str(tmp_path / "inner.safetensors"),
                              "--prefix", "model.")
    assert inner.returncode == 0, inner.stderr
    model.load_state_dict(load_file(str(tmp_path / "inner.safetensors")), strict=True)
    assert torch.equal(model.transformer.wte.weight, expected["model.transformer.wte.weight"])

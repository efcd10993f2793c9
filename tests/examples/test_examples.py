"""The examples: every config parses, every CPU-sized model trains a step, and one example is trained through the
``oteacheck`` command, stopped, and resumed with ``--ckpt_path last`` exactly where it stopped."""

import re

import pytest
import torch
import yaml

from tests.cli import support
from tests.support.harness import same_bits

EXAMPLES = ["gpt2", "bert_qa", "resnet", "vit"]


@pytest.mark.parametrize("config", ["config.yaml", "config.gpu.yaml"])
@pytest.mark.parametrize("example", EXAMPLES)
def test_every_config_parses(example, config, capsys, monkeypatch):
    from oteacheck_lightning import cli

    monkeypatch.chdir(support.ROOT)
    monkeypatch.setattr("sys.argv", ["oteacheck"])
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", "--config", f"examples/{example}/{config}", "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out[out.index("seed_everything:"):])
    assert printed["trainer"]["strategy"]["class_path"] == "oteacheck_lightning.OTeaCheckStrategy"
    assert printed["trainer"]["use_distributed_sampler"] is False


def _instantiate(path):
    import importlib

    doc = yaml.safe_load(path.read_text())

    def build(section):
        module, _, name = doc[section]["class_path"].rpartition(".")
        return getattr(importlib.import_module(module), name)(**doc[section].get("init_args", {}))

    return build("model"), build("data")


@pytest.mark.parametrize("example", EXAMPLES)
def test_cpu_sized_model_trains_a_step_on_its_synthetic_data(example, monkeypatch):
    monkeypatch.syspath_prepend(str(support.ROOT))
    torch.manual_seed(0)
    model, data = _instantiate(support.ROOT / "examples" / example / "config.yaml")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    model.log = lambda *a, **k: None  # no trainer here
    loss = model.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads), "every parameter takes part (ZeRO needs it)"
    # the data is generated, never downloaded, and the same every time
    again = next(iter(_fresh(data).train_dataloader()))
    assert all(torch.equal(a, b) for a, b in zip(batch, again))


@pytest.mark.parametrize("arch, module", [("torchvision:resnet18", "ResNetModule"), ("torchvision:vit_b_16", "ViTModule")])
def test_vision_examples_take_torchvision_models_with_random_weights(arch, module, monkeypatch):
    pytest.importorskip("torchvision")
    monkeypatch.syspath_prepend(str(support.ROOT))
    from examples import vision

    model = getattr(vision, module)(arch=arch, num_classes=10)
    size = 224 if "vit" in arch else 32
    assert model.net(torch.randn(2, 3, size, size)).shape == (2, 10)


def _fresh(data):
    import copy

    fresh = copy.copy(data)
    fresh.dataset = None
    fresh.setup("fit")
    return fresh


@pytest.mark.multiprocess
def test_an_example_resumes_through_the_cli_where_it_stopped(tmp_path):
    """ResNet (BatchNorm statistics, torchmetrics accuracy): 16 steps uninterrupted, against 10 steps, stop, and
    ``--ckpt_path last`` up to 16. Same weights, buffers and metric states, bit for bit."""
    config = "examples/resnet/config.yaml"
    common = ["--checkpoint.persist=[{every_n_steps: 5, keep_last: 2}]", "--seed_everything=7",
              "--model.init_args.decay_steps=16"]  # the same LR schedule, whatever max_steps the run has
    env = support.environment(tmp_path)
    env["OMP_NUM_THREADS"] = "1"

    reference = tmp_path / "reference"
    reference.mkdir()
    support.fit(reference, "run", "--trainer.max_steps=16", *common, config=config,
                env=support.environment(reference) | {"OMP_NUM_THREADS": "1"},
                extra=support.write_extra_config(tmp_path / "ref.yaml", tmp_path / "ref-final"))

    first = support.fit(tmp_path, "run", "--trainer.max_steps=10", *common, config=config, env=env)
    assert "resuming" not in first.stderr
    resumed = support.fit(tmp_path, "run", "--trainer.max_steps=16", "--ckpt_path=last", *common, config=config,
                          env=env, extra=support.write_extra_config(tmp_path / "res.yaml", tmp_path / "res-final"))
    steps = {int(s) for s in re.findall(r"resuming from step (\d+)", resumed.stderr)}
    assert steps == {10}, resumed.stderr[-3000:]

    a = torch.load(tmp_path / "ref-final" / "full.pt", weights_only=True)
    b = torch.load(tmp_path / "res-final" / "full.pt", weights_only=True)
    assert a["step"] == b["step"] == 16
    different = [k for k in a["state_dict"] if not same_bits(a["state_dict"][k], b["state_dict"][k])]
    assert not different, f"weights or buffers differ after the resume: {different}"
    for rank in (0, 1):
        ma = torch.load(tmp_path / "ref-final" / f"metrics-rank{rank}.pt", weights_only=True)
        mb = torch.load(tmp_path / "res-final" / f"metrics-rank{rank}.pt", weights_only=True)
        assert ma.keys() == mb.keys() and ma
        assert all(same_bits(ma[k], mb[k]) for k in ma), f"rank {rank}: torchmetrics states differ after the resume"


_BF16_RESNET = """
import sys, torch, yaml, importlib, lightning.pytorch as pl
from oteacheck_lightning import OTeaCheckpoint, OTeaCheckStrategy
doc = yaml.safe_load(open("examples/resnet/config.yaml"))
def build(section):
    module, _, name = doc[section]["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**doc[section].get("init_args", {}))
model, data = build("model"), build("data")
trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=OTeaCheckStrategy(stage=2), precision="bf16-mixed",
                     max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, use_distributed_sampler=False, default_root_dir=sys.argv[1],
                     callbacks=[OTeaCheckpoint(dirpath=sys.argv[1] + "/ckpt", persist=[])])
trainer.fit(model, datamodule=data)
norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
assert trainer.global_step == 2
assert norms and all(m.running_mean.dtype == torch.bfloat16 == m.weight.dtype for m in norms)
assert all(torch.isfinite(m.running_var).all() for m in norms)
print("trained under bf16 with", len(norms), "batch norms")
"""


def test_the_resnet_example_trains_under_bf16_with_deepspeed(tmp_path):
    # DeepSpeed 0.19 casts parameters, not buffers: without the strategy's buffer_dtype, batch norm fails at once.
    # A process of its own: a Trainer in the test process would leave its process group (and port) behind.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(support.ROOT / "src"), str(support.ROOT), env.get("PYTHONPATH", "")])
    env["OTEACHECK_MEMORY_DIR"] = str(tmp_path / "shm")
    done = subprocess.run([sys.executable, "-c", _BF16_RESNET, str(tmp_path)], cwd=support.ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "trained under bf16 with" in done.stdout

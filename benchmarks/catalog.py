"""What the benchmarks run, by name: the checkpointing methods (``methods.py`` implements them) and the models
(``models.py`` builds them).

Tables only, with no import of torch or Lightning: the matrix and each run's driver only choose and name runs.
Importing those took them about 8 s each on the development CPU, and the matrix took 13-21 s to start on a GPU
host (gpu-search29's call log), time every call of the GPU machine paid once per matrix and once per run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OTEACHECK_METHODS = ("none", "oteacheck", "oteacheck-naive", "oteacheck-eager")
DEEPSPEED_METHODS = ("none-deepspeed", "sync-torch-save", "sync-deepspeed", "checkfreq", "torchsnapshot", "dcp-async",
                     "lightning-async")
METHODS = OTEACHECK_METHODS + DEEPSPEED_METHODS
BASELINES = ("none", "none-deepspeed")  # the no-checkpointing runs, one per strategy
# recovery from a restart: which tiers each method can resume from
RECOVERY = {"oteacheck": ("memory", "disk"), "oteacheck-naive": ("memory", "disk"), "oteacheck-eager": ("memory", "disk"),
            "sync-torch-save": ("disk",), "sync-deepspeed": ("disk",), "checkfreq": ("disk",), "dcp-async": ("disk",)}


def baseline_of(method: str) -> str:
    """The no-checkpointing run a method is compared with: the same strategy, no checkpoints."""
    return "none" if method in OTEACHECK_METHODS else "none-deepspeed"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # gpt2 | bert-qa | resnet | vit
    batch: int
    seq: int = 0  # tokens per sample (language models)
    image: int = 0  # pixels per side (vision models)
    config: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {
    "gpt2-124m": ModelSpec("gpt2-124m", "gpt2", batch=8, seq=1024, config=dict(n_layer=12, n_embd=768, n_head=12)),
    "gpt2-355m": ModelSpec("gpt2-355m", "gpt2", batch=8, seq=1024, config=dict(n_layer=24, n_embd=1024, n_head=16)),
    "gpt2-774m": ModelSpec("gpt2-774m", "gpt2", batch=8, seq=1024, config=dict(n_layer=36, n_embd=1280, n_head=20)),
    "bert-large-qa": ModelSpec("bert-large-qa", "bert-qa", batch=16, seq=384,
                               config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                           intermediate_size=4096)),
    "resnet50": ModelSpec("resnet50", "resnet", batch=64, image=224, config=dict(layers=[3, 4, 6, 3], bottleneck=True,
                                                                                 num_classes=1000)),
    "vit-b16": ModelSpec("vit-b16", "vit", batch=64, image=224,
                         config=dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072,
                                     num_classes=1000)),
}

# the same families, small enough to train a few steps on two CPU cores in seconds (CI)
SMOKE: dict[str, ModelSpec] = {
    "gpt2-124m": ModelSpec("gpt2-124m", "gpt2", batch=2, seq=32, config=dict(n_layer=2, n_embd=64, n_head=2, vocab_size=512)),
    "gpt2-355m": ModelSpec("gpt2-355m", "gpt2", batch=2, seq=32, config=dict(n_layer=3, n_embd=64, n_head=2, vocab_size=512)),
    "gpt2-774m": ModelSpec("gpt2-774m", "gpt2", batch=2, seq=32, config=dict(n_layer=4, n_embd=64, n_head=2, vocab_size=512)),
    "bert-large-qa": ModelSpec("bert-large-qa", "bert-qa", batch=2, seq=32,
                               config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=128, vocab_size=512)),
    "resnet50": ModelSpec("resnet50", "resnet", batch=2, image=32, config=dict(layers=[1, 1, 1, 1], bottleneck=False,
                                                                               num_classes=10)),
    "vit-b16": ModelSpec("vit-b16", "vit", batch=2, image=32,
                         config=dict(patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10)),
}


def spec(name: str, smoke: bool = False) -> ModelSpec:
    table = SMOKE if smoke else MODELS
    if name not in table:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(table)}")
    return table[name]

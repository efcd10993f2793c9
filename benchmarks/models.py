"""The benchmark models, built from configurations (no downloaded weights), and their synthetic data.

Every method of a model trains the same module on the same batches: a small pool of random batches is made once
on the training device from a fixed seed, and step ``i`` uses batch ``i % pool``. The data never crosses the host
link during training, so host-to-device traffic is checkpoint traffic only, and the loader costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch

POOL = 2  # distinct synthetic batches per run


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


def build_module(s: ModelSpec) -> torch.nn.Module:
    if s.family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_positions=max(s.seq, 1024), **s.config)
        return GPT2LMHeadModel(cfg)
    if s.family == "bert-qa":
        from transformers import BertConfig, BertForQuestionAnswering

        return BertForQuestionAnswering(BertConfig(max_position_embeddings=max(s.seq, 512), **s.config))
    if s.family == "resnet":
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

        c = dict(s.config)
        block = Bottleneck if c.pop("bottleneck") else BasicBlock
        return ResNet(block, c.pop("layers"), **c)
    if s.family == "vit":
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(image_size=s.image, **s.config)
    raise ValueError(s.family)


def _make_batch(s: ModelSpec, g: torch.Generator) -> dict[str, torch.Tensor]:
    if s.family == "gpt2":
        ids = torch.randint(0, s.config.get("vocab_size", 50257), (s.batch, s.seq), generator=g)
        return {"input_ids": ids, "labels": ids}
    if s.family == "bert-qa":
        ids = torch.randint(0, s.config.get("vocab_size", 30522), (s.batch, s.seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "start_positions": torch.randint(0, s.seq, (s.batch,), generator=g),
                "end_positions": torch.randint(0, s.seq, (s.batch,), generator=g)}
    x = torch.randn(s.batch, 3, s.image, s.image, generator=g)
    y = torch.randint(0, s.config["num_classes"], (s.batch,), generator=g)
    return {"x": x, "y": y}


class BenchModule(pl.LightningModule):
    """One benchmark model with AdamW; the loss is the model's own (language models) or cross-entropy."""

    def __init__(self, s: ModelSpec, lr: float = 1e-4, seed: int = 1234) -> None:
        super().__init__()
        self.spec = s
        self.lr = lr
        self.seed = seed
        self.model = build_module(s)
        self._pool: list[dict[str, torch.Tensor]] | None = None

    def _batches(self) -> list[dict[str, torch.Tensor]]:
        # made once on the device; a plain attribute, so it is no part of any checkpoint
        if self._pool is None:
            g = torch.Generator().manual_seed(self.seed)
            dtype = next(self.model.parameters()).dtype
            pool = []
            for _ in range(POOL):
                b = _make_batch(self.spec, g)
                pool.append({k: (v.to(dtype) if v.is_floating_point() else v).to(self.device) for k, v in b.items()})
            self._pool = pool
        return self._pool

    def training_step(self, index: torch.Tensor, batch_idx: int) -> torch.Tensor:
        b = self._batches()[batch_idx % POOL]
        if self.spec.family in ("gpt2", "bert-qa"):
            return self.model(**b).loss
        return torch.nn.functional.cross_entropy(self.model(b["x"]).float(), b["y"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        # indices only: the batches themselves live on the device (see _batches)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(1_000_000)), batch_size=1)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

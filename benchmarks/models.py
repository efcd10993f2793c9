"""The benchmark models, built from configurations (no downloaded weights), and their synthetic data.

Every method of a model trains the same module on the same batches: a small pool of random batches is made once
on the training device from a fixed seed, and step ``i`` uses batch ``i % pool``. The data never crosses the host
link during training, so host-to-device traffic is checkpoint traffic only, and the loader costs nothing.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from .catalog import ModelSpec

POOL = 2  # distinct synthetic batches per run


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

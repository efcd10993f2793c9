"""Vision models for the ResNet and ViT examples, and synthetic image classification data.

``arch`` picks the network: ``"builtin"`` (the small implementations below, plain PyTorch), or
``"torchvision:<name>"`` (e.g. ``torchvision:resnet50``, ``torchvision:vit_b_16``) or ``"timm:<name>"`` built with
random weights (``weights=None`` / ``pretrained=False``: nothing is downloaded) when those packages are installed
(``pip install 'oteacheck-lightning[vision]'``).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .common import SyntheticData, adamw_with_warmup

# --- ResNet -------------------------------------------------------------------------------------------------


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out),
        )
        self.shortcut = (nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                         if stride != 1 or inplanes != out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes),
        )
        self.shortcut = (nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
                         if stride != 1 or inplanes != planes else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet; ``layers=(3, 4, 6, 3), block="bottleneck", width=64`` is ResNet-50 (25.6M parameters)."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), block: str = "bottleneck", width: int = 64,
                 num_classes: int = 1000, small_input: bool = False) -> None:
        super().__init__()
        unit = {"bottleneck": _Bottleneck, "basic": _Basic}[block]
        stem = ([nn.Conv2d(3, width, 3, 1, 1, bias=False)] if small_input else
                [nn.Conv2d(3, width, 7, 2, 3, bias=False)])
        stem += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        if not small_input:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        stages, inplanes = [], width
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            for j in range(blocks):
                stages.append(unit(inplanes, planes, 2 if i > 0 and j == 0 else 1))
                inplanes = planes * unit.expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


# --- ViT ----------------------------------------------------------------------------------------------------


class ViT(nn.Module):
    """Vision Transformer; the defaults are ViT-B/16 at 224x224 (86M parameters)."""

    def __init__(self, image_size: int = 224, patch_size: int = 16, dim: int = 768, depth: int = 12,
                 heads: int = 12, mlp_dim: int = 3072, num_classes: int = 1000, dropout: float = 0.0) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.patch = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch_size) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(tokens))[:, 0])


def build(arch: str, num_classes: int, builtin: type[nn.Module], **builtin_args: object) -> nn.Module:
    """The network named by ``arch`` (see the module docstring), with random weights."""
    if arch == "builtin":
        return builtin(num_classes=num_classes, **builtin_args)
    library, _, name = arch.partition(":")
    if library == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    raise ValueError(f"arch is {arch!r}; use 'builtin', 'torchvision:<model name>' or 'timm:<model name>'")


# --- the LightningModules ---------------------------------------------------------------------------------------


class _Classifier(pl.LightningModule):
    def __init__(self, num_classes: int, lr: float, weight_decay: float, warmup_steps: int,
                 label_smoothing: float) -> None:
        super().__init__()
        self.accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.top5 = MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro")
        self.mean_loss = torchmetrics.MeanMetric()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self.net(images)
        loss = nn.functional.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self.accuracy.update(logits.detach(), labels)
        self.top5.update(logits.detach(), labels)
        self.mean_loss.update(loss.detach())
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", self.accuracy, on_step=False, on_epoch=True)
        self.log("train/top5", self.top5, on_step=False, on_epoch=True)
        self.log("train/mean_loss", self.mean_loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        return adamw_with_warmup(self, hp.lr, hp.weight_decay, hp.warmup_steps,
                                 hp.decay_steps or int(self.trainer.estimated_stepping_batches))


class ResNetModule(_Classifier):
    """Image classification with a ResNet (ResNet-50 by default)."""

    def __init__(self, arch: str = "builtin", layers: tuple[int, ...] = (3, 4, 6, 3), block: str = "bottleneck",
                 width: int = 64, small_input: bool = False, num_classes: int = 1000, lr: float = 1e-3,
                 weight_decay: float = 0.05, warmup_steps: int = 100, decay_steps: int | None = None,
                 label_smoothing: float = 0.1) -> None:
        super().__init__(num_classes, lr, weight_decay, warmup_steps, label_smoothing)
        self.save_hyperparameters()
        self.net = build(arch, num_classes, ResNet, layers=tuple(layers), block=block, width=width,
                         small_input=small_input)


class ViTModule(_Classifier):
    """Image classification with a Vision Transformer (ViT-B/16 by default)."""

    def __init__(self, arch: str = "builtin", image_size: int = 224, patch_size: int = 16, dim: int = 768,
                 depth: int = 12, heads: int = 12, mlp_dim: int = 3072, dropout: float = 0.0,
                 num_classes: int = 1000, lr: float = 1e-3, weight_decay: float = 0.05, warmup_steps: int = 100,
                 decay_steps: int | None = None, label_smoothing: float = 0.1) -> None:
        super().__init__(num_classes, lr, weight_decay, warmup_steps, label_smoothing)
        self.save_hyperparameters()
        self.net = build(arch, num_classes, ViT, image_size=image_size, patch_size=patch_size, dim=dim,
                         depth=depth, heads=heads, mlp_dim=mlp_dim, dropout=dropout)


# --- data ------------------------------------------------------------------------------------------------------


class _Patterns(torch.utils.data.Dataset):
    """Image ``i`` is its class's low-resolution pattern, upsampled, plus noise drawn from a generator seeded by
    ``(seed, i)``: any sample can be made on demand, in any order, always the same."""

    def __init__(self, patterns: torch.Tensor, labels: torch.Tensor, image_size: int, noise: float, seed: int) -> None:
        self.patterns, self.labels, self.image_size, self.noise, self.seed = patterns, labels, image_size, noise, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        label = self.labels[i]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        base = nn.functional.interpolate(self.patterns[label][None], size=self.image_size, mode="bilinear",
                                         align_corners=False)[0]
        return base + self.noise * torch.randn(base.shape, generator=g), label


class SyntheticImages(SyntheticData):
    """Synthetic image classification: ``num_classes`` patterns, each sample one of them with noise."""

    def __init__(self, num_classes: int = 1000, image_size: int = 224, noise: float = 0.5, samples: int = 8192,
                 batch_size: int = 32, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(samples, batch_size, num_workers, seed)
        self.num_classes, self.image_size, self.noise = num_classes, image_size, noise

    def make(self, g: torch.Generator) -> torch.utils.data.Dataset:
        patterns = torch.randn(self.num_classes, 3, 4, 4, generator=g)
        labels = torch.randint(0, self.num_classes, (self.samples,), generator=g)
        return _Patterns(patterns, labels, self.image_size, self.noise, self.seed)

"""GPT-2 language modelling, built from a ``transformers.GPT2Config`` (random initialization, nothing downloaded)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torchmetrics
from torchmetrics.text import Perplexity

from ..common import SyntheticData, adamw_with_warmup


class GPT2Module(pl.LightningModule):
    """A causal language model; the defaults are GPT-2 small (124M parameters)."""

    def __init__(self, vocab_size: int = 50257, n_positions: int = 1024, n_embd: int = 768, n_layer: int = 12,
                 n_head: int = 12, dropout: float = 0.1, lr: float = 6e-4, weight_decay: float = 0.1,
                 warmup_steps: int = 100, decay_steps: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                            n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                            use_cache=False, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
        self.model = GPT2LMHeadModel(config)
        self.perplexity = Perplexity()
        self.mean_loss = torchmetrics.MeanMetric()

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        out = self.model(input_ids=tokens, labels=tokens)
        self.perplexity.update(out.logits[:, :-1].detach().float(), tokens[:, 1:])
        self.mean_loss.update(out.loss.detach())
        self.log("train/loss", out.loss, prog_bar=True)
        self.log("train/perplexity", self.perplexity, on_step=False, on_epoch=True)
        self.log("train/mean_loss", self.mean_loss, on_step=False, on_epoch=True)
        return out.loss

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        return adamw_with_warmup(self, hp.lr, hp.weight_decay, hp.warmup_steps,
                                 hp.decay_steps or int(self.trainer.estimated_stepping_batches))


class _Progressions(torch.utils.data.Dataset):
    """Token sequences ``(a + i*b) mod vocab``: predictable from two tokens on, so the loss falls quickly."""

    def __init__(self, starts: torch.Tensor, strides: torch.Tensor, seq_len: int, vocab_size: int) -> None:
        self.starts, self.strides, self.seq_len, self.vocab_size = starts, strides, seq_len, vocab_size

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        positions = torch.arange(self.seq_len)
        return ((self.starts[i] + positions * self.strides[i]) % self.vocab_size,)


class SyntheticText(SyntheticData):
    def __init__(self, vocab_size: int = 50257, seq_len: int = 1024, samples: int = 4096, batch_size: int = 8,
                 num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(samples, batch_size, num_workers, seed)
        self.vocab_size, self.seq_len = vocab_size, seq_len

    def make(self, g: torch.Generator) -> torch.utils.data.Dataset:
        starts = torch.randint(0, self.vocab_size, (self.samples,), generator=g)
        strides = torch.randint(1, 8, (self.samples,), generator=g)
        return _Progressions(starts, strides, self.seq_len, self.vocab_size)

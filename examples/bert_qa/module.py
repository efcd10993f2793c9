"""BERT extractive question answering, built from a ``transformers.BertConfig`` (random initialization)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torchmetrics
from torchmetrics.classification import MulticlassAccuracy

from ..common import SyntheticData, adamw_with_warmup

CLS, SEP, FIRST_WORD = 1, 2, 10


class BertQAModule(pl.LightningModule):
    """Predicts the answer span (start and end token) in a context; the defaults are BERT-base."""

    def __init__(self, vocab_size: int = 30522, hidden_size: int = 768, num_hidden_layers: int = 12,
                 num_attention_heads: int = 12, intermediate_size: int = 3072, max_position_embeddings: int = 512,
                 seq_len: int = 384, dropout: float = 0.1, lr: float = 5e-5, weight_decay: float = 0.01,
                 warmup_steps: int = 100, decay_steps: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import BertConfig, BertForQuestionAnswering

        config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                            num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                            max_position_embeddings=max_position_embeddings, hidden_dropout_prob=dropout,
                            attention_probs_dropout_prob=dropout)
        self.model = BertForQuestionAnswering(config)
        self.start_accuracy = MulticlassAccuracy(num_classes=seq_len, average="micro")
        self.end_accuracy = MulticlassAccuracy(num_classes=seq_len, average="micro")
        self.exact_match = torchmetrics.MeanMetric()

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        input_ids, token_type_ids, start, end = batch
        out = self.model(input_ids=input_ids, token_type_ids=token_type_ids, start_positions=start, end_positions=end)
        pred_start, pred_end = out.start_logits.argmax(-1), out.end_logits.argmax(-1)
        self.start_accuracy.update(pred_start, start)
        self.end_accuracy.update(pred_end, end)
        self.exact_match.update(((pred_start == start) & (pred_end == end)).float())
        self.log("train/loss", out.loss, prog_bar=True)
        self.log("train/start_accuracy", self.start_accuracy, on_step=False, on_epoch=True)
        self.log("train/end_accuracy", self.end_accuracy, on_step=False, on_epoch=True)
        self.log("train/exact_match", self.exact_match, on_step=False, on_epoch=True)
        return out.loss

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        return adamw_with_warmup(self, hp.lr, hp.weight_decay, hp.warmup_steps,
                                 hp.decay_steps or int(self.trainer.estimated_stepping_batches))


class SyntheticQA(SyntheticData):
    """``[CLS] k n [SEP] context [SEP]``: the answer starts at the one place where word ``k`` occurs in the
    context and is ``n`` words long."""

    def __init__(self, vocab_size: int = 30522, seq_len: int = 384, max_answer: int = 4, samples: int = 4096,
                 batch_size: int = 8, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(samples, batch_size, num_workers, seed)
        self.vocab_size, self.seq_len, self.max_answer = vocab_size, seq_len, max_answer

    def make(self, g: torch.Generator) -> torch.utils.data.Dataset:
        n, length = self.samples, self.seq_len
        ids = torch.randint(FIRST_WORD + self.max_answer + 1, self.vocab_size, (n, length), generator=g)
        keys = ids[:, 0].clone()
        answer_len = torch.randint(1, self.max_answer + 1, (n,), generator=g)
        context_start, context_end = 4, length - 1
        start = torch.randint(context_start, context_end - self.max_answer, (n,), generator=g)
        ids[:, 0], ids[:, 1], ids[:, 2], ids[:, 3], ids[:, -1] = CLS, keys, FIRST_WORD + answer_len, SEP, SEP
        context = ids[:, context_start:context_end]
        context[context == keys[:, None]] = FIRST_WORD  # the key occurs only at the answer
        ids[torch.arange(n), start] = keys
        token_type = torch.zeros_like(ids)
        token_type[:, context_start:] = 1
        return torch.utils.data.TensorDataset(ids, token_type, start, start + answer_len - 1)

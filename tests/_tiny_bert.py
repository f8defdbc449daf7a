"""A tiny BERT classifier and a token-classification data set shared by the Trainer tests."""

from __future__ import annotations

import torch
import transformers


def tiny_bert_classifier(seed: int = 0, *, dropout: float = 0.1) -> transformers.PreTrainedModel:
    """BertForSequenceClassification from a config (hidden 32, 1 layer, vocabulary 100): no download."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        num_labels=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return transformers.BertForSequenceClassification(cfg)


def calibration_batches(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of 4 random 8-token sequences (the pretraining proxy of the tests)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 100, (4, 8), generator=g)} for _ in range(n)]


class TokenLabels(torch.utils.data.Dataset):
    """``n`` random 8-token sequences with random binary labels, as Trainer expects them."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 100, (n, 8), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": self.labels[i],
        }

"""A tiny BERT classifier and a token-classification data set shared by the Trainer tests."""

from __future__ import annotations

import torch
import transformers


def _tiny_config(**overrides: object) -> transformers.BertConfig:
    """Hidden 32, 1 layer, 2 heads, intermediate 64, vocabulary 100."""
    kwargs: dict[str, object] = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    kwargs.update(overrides)
    return transformers.BertConfig(**kwargs)


def tiny_bert(seed: int = 0) -> transformers.PreTrainedModel:
    """A BertModel from the tiny config (no download)."""
    torch.manual_seed(seed)
    return transformers.BertModel(_tiny_config())


def tiny_bert_classifier(seed: int = 0, *, dropout: float = 0.1) -> transformers.PreTrainedModel:
    """BertForSequenceClassification from the tiny config (2 labels): no download."""
    torch.manual_seed(seed)
    cfg = _tiny_config(
        num_labels=2, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout
    )
    return transformers.BertForSequenceClassification(cfg)


def calibration_batches(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of 4 random 8-token sequences (the pretraining proxy of the tests)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 100, (4, 8), generator=g)} for _ in range(n)]


def anisotropic_mlp_setup(
    seed: int = 0,
) -> tuple[torch.nn.Module, list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """An MLP 6→16→2, calibration inputs concentrated in a 3-dim subspace (anisotropic ``C_p``) and
    4 task batches of ``(x, y)``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    basis = torch.randn(3, 6)
    calib = [torch.randn(64, 3) @ basis + 0.01 * torch.randn(64, 6) for _ in range(4)]
    task = [(torch.randn(32, 6), torch.randn(32, 2)) for _ in range(4)]
    return model, calib, task


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

"""Tiny random torch models for the tensor-serving tests, built on the spot (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from checkpoints import build_tokenizer


class TinyNet(torch.nn.Module):
    """x: (batch, 4) -> (batch, 3). Importable as tensor_models:TinyNet (tests/ on the path)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().eval()


def build_bert(folder: Path, classify: bool = False, seed: int = 0) -> Path:
    """A 2-layer random BERT (hidden 32) with a byte-level BPE tokenizer, as an HF folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    build_tokenizer(folder)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    if classify:
        config.id2label = {0: "negative", 1: "positive"}
        config.label2id = {"negative": 0, "positive": 1}
        model = BertForSequenceClassification(config)
    else:
        model = BertModel(config)
    model.eval().save_pretrained(folder)
    return folder

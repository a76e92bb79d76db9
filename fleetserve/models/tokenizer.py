"""Tokenizers load with transformers, from an HF folder or from a GGUF file's metadata."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """``path``: an HF folder with tokenizer.json (or another tokenizer file transformers reads)
    or a ``.gguf`` file, whose metadata holds the vocabulary, merges and chat template. Never
    runs remote code."""
    from transformers import AutoTokenizer  # imported here: it takes a second

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path {p} does not exist")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"{p}: expected an HF model folder or a .gguf file")
        return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    if not any((p / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{p} holds no tokenizer; expected one of {list(_TOKENIZER_FILES)}")
    return AutoTokenizer.from_pretrained(p)

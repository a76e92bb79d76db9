"""Building prompts of a given token length, and counting tokens to check a server's usage.

Two schemes behind one small interface:

- `HFTokenizer` (`--tokenizer PATH`, an HF tokenizer folder or a GGUF file): prompts are exact
  in the model's own tokens, and the server's usage is checked against it.
- `WordTokenizer` (no tokenizer given): the documented approximation "one word = one token".
  A prompt of N tokens is N words from `words.WORDS`, each a single token in common BPE
  vocabularies, so the true count is close to N. Counts from it are never
  used to check a server (`exact` is False).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fleetserve.bench.words import WORDS

logger = logging.getLogger(__name__)

# A prompt whose decode/encode round trip keeps moving is accepted after this many tries.
_MAX_FIX_ROUNDS = 8


class TextSource(Protocol):
    """Makes texts of a token length and counts tokens. Implementations are pure computation."""

    exact: bool  # whether counts are the model's own tokenization

    def make_text(self, num_tokens: int, rng: np.random.Generator) -> str: ...

    def count(self, text: str) -> int:
        """Tokens of `text` alone (no special tokens): the measure of generated text."""
        ...

    def count_prompt(self, text: str) -> int:
        """Tokens of a completions prompt as a server encodes it (with BOS if the model adds
        one)."""
        ...

    def count_chat(self, messages: list[dict[str, str]]) -> int | None:
        """Prompt tokens of a chat request after the chat template, or None if unknown."""
        ...


def _words(num_words: int, rng: np.random.Generator) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), num_words))


class WordTokenizer:
    """The approximate scheme: one word is one token."""

    exact = False

    def make_text(self, num_tokens: int, rng: np.random.Generator) -> str:
        return _words(num_tokens, rng)

    def count(self, text: str) -> int:
        return len(text.split())

    def count_prompt(self, text: str) -> int:
        return self.count(text)

    def count_chat(self, messages: list[dict[str, str]]) -> int | None:
        return None


class HFTokenizer:
    """Token-exact texts with a Hugging Face tokenizer (any object with `encode`, `decode` and,
    for chat, `apply_chat_template`)."""

    exact = True

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def make_text(self, num_tokens: int, rng: np.random.Generator) -> str:
        """A text of random common words that encodes to exactly `num_tokens` tokens (without
        special tokens). Cut at a token boundary, decoded, re-encoded until the count holds."""
        if num_tokens == 0:
            return ""
        ids = self._encode(_words(num_tokens, rng))
        for _ in range(_MAX_FIX_ROUNDS):
            if len(ids) > num_tokens:
                ids = ids[:num_tokens]
            elif len(ids) < num_tokens:
                ids = ids + self._encode(" " + _words(num_tokens - len(ids), rng))
                continue
            text = self.tokenizer.decode(ids)
            ids = self._encode(text)
            if len(ids) == num_tokens:
                return text
        logger.debug("a prompt of %d tokens came out at %d tokens", num_tokens, len(ids))
        return self.tokenizer.decode(ids[:num_tokens])

    def count(self, text: str) -> int:
        return len(self._encode(text))

    def count_prompt(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def count_chat(self, messages: list[dict[str, str]]) -> int | None:
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return self.count(text)  # the template already holds the special tokens


def load_tokenizer(path: str | None) -> TextSource:
    """`HFTokenizer` from an HF tokenizer folder or a `.gguf` file, or `WordTokenizer` if None.

    Never downloads: a path that does not exist is an error."""
    if path is None:
        return WordTokenizer()
    location = Path(path)
    if not location.exists():
        raise ValueError(f"--tokenizer {path}: no such file or folder")
    from transformers import AutoTokenizer  # slow import, only when asked for

    if location.is_file() and location.suffix == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(str(location.parent), gguf_file=location.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(location))
    return HFTokenizer(tokenizer)

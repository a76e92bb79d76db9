"""Token ids of the prompts `fleetserve bench` would send, as the replica would see them.

The simulator needs ids, not text: their count is the prefill work, and their blocks are
what the prefix cache and the prefix-aware router match. Content is encoded with the bench's
`TextSource` (exact with `--tokenizer`; one word one token without). On the chat endpoint
the chat template adds tokens around each message; with a tokenizer their counts are
measured once from its template (`TemplateShape`) and stand-in ids of that length are put
where the template puts its own:

    system part | user header + question | assistant header + answer + end | ... | gen prompt

so that a conversation's next prompt extends its previous prompt plus answer, as it does on
a real server. Without a tokenizer the template is unknown and adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleetserve.bench.tokenizer import HFTokenizer, TextSource
from fleetserve.bench.words import WORDS

# Stand-in ids of template tokens, distinct by role, from the bottom of the vocabulary.
_SYSTEM_ID, _USER_ID, _ASSISTANT_ID, _END_ID, _BOS_ID = 1, 2, 3, 4, 5
_WORD_BASE = 16  # ids of words (no tokenizer) start here


@dataclass(frozen=True)
class TemplateShape:
    """Tokens a chat template adds: `system` once per prompt (a default system prompt and
    the like), `per_message` around each message, `generation` for the assistant header at
    the end. `bos`: what a completions prompt gets in front."""

    system: int = 0
    per_message: int = 0
    generation: int = 0
    bos: int = 0

    @classmethod
    def measure(cls, text_source: TextSource) -> TemplateShape:
        if not isinstance(text_source, HFTokenizer):
            return cls()
        tok = text_source.tokenizer
        bos = max(text_source.count_prompt("hello there") - text_source.count("hello there"), 0)
        if not getattr(tok, "chat_template", None):
            return cls(bos=bos)
        q1, a1, q2 = "what is the time", "it is noon now", "and the date"

        def templated(messages: list[dict[str, str]], generation: bool) -> int:
            text = tok.apply_chat_template(
                messages, add_generation_prompt=generation, tokenize=False
            )
            return text_source.count(text)

        one = [{"role": "user", "content": q1}]
        three = one + [
            {"role": "assistant", "content": a1},
            {"role": "user", "content": q2},
        ]
        generation = templated(one, True) - templated(one, False)
        n1, na, n2 = (text_source.count(t) for t in (q1, a1, q2))
        per_message = max((templated(three, False) - templated(one, False) - na - n2) // 2, 0)
        system = max(templated(one, False) - n1 - per_message, 0)
        return cls(system, per_message, max(generation, 0), bos)


class PromptBuilder:
    def __init__(self, text_source: TextSource, endpoint: str) -> None:
        self.text_source = text_source
        self.endpoint = endpoint
        self.shape = TemplateShape.measure(text_source)
        self._word_ids = {w: _WORD_BASE + i for i, w in enumerate(WORDS)}

    def encode(self, text: str) -> list[int]:
        """Content ids of `text` (no special tokens)."""
        if isinstance(self.text_source, HFTokenizer):
            return list(self.text_source.tokenizer.encode(text, add_special_tokens=False))
        ids = self._word_ids
        return [ids.get(w, _WORD_BASE + len(ids)) for w in text.split()]

    def first_prompt(self, system_ids: list[int], question_ids: list[int]) -> list[int]:
        """The prompt of a session's first turn."""
        s = self.shape
        if self.endpoint == "chat":
            ids = [_SYSTEM_ID] * s.system
            if system_ids:
                ids += [_SYSTEM_ID] * s.per_message + system_ids
            return ids + self._user(question_ids) + [_ASSISTANT_ID] * s.generation
        return [_BOS_ID] * s.bos + system_ids + question_ids

    def next_prompt(
        self, previous: list[int], answer: list[int], question_ids: list[int]
    ) -> list[int]:
        """The prompt of the next turn: the previous prompt, its answer, a new question."""
        if self.endpoint == "chat":
            s = self.shape
            end = [_END_ID] * max(s.per_message - s.generation, 0)
            return (
                previous + answer + end + self._user(question_ids) + [_ASSISTANT_ID] * s.generation
            )
        return previous + answer + question_ids

    def _user(self, question_ids: list[int]) -> list[int]:
        return [_USER_ID] * self.shape.per_message + question_ids

    def describe(self) -> dict[str, Any]:
        s = self.shape
        return {
            "chat_template_tokens": {
                "system": s.system,
                "per_message": s.per_message,
                "generation": s.generation,
            },
            "bos_tokens": s.bos,
        }

"""Incremental detokenization with stop strings.

Text is decoded from a sliding window of token ids, so a token whose bytes end in the
middle of a UTF-8 character yields nothing until the character is complete. Text that could
be the start of a stop string is held back from streaming until it is known not to be.
"""

from __future__ import annotations

# Tokens of the prompt decoded with the output, so that the first output token gets the
# leading space (or not) that it has in context.
CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer,
        prompt_token_ids: list[int],
        stop: tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.skip_special = skip_special_tokens
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0  # characters of `text` already handed out as deltas
        self.stop_reason: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add_token(self, token_id: int) -> bool:
        """Append a token; returns True if a stop string has now appeared (text is then cut
        at it)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # an incomplete character: wait for more bytes
        new = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = max(len(self.text) - self.holdback, 0)
        self.text += new
        return self._check_stop(start)

    def _check_stop(self, search_from: int) -> bool:
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at >= 0:
                self.text = self.text[: at + len(s) if self.include_stop else at]
                self.stop_reason = s
                return True
        return False

    def take_delta(self, finished: bool) -> str:
        """New text since the last call, holding back a possible stop-string start unless
        the request is finished."""
        end = len(self.text) if finished or self.stop_reason else len(self.text) - self.holdback
        if end <= self.sent:
            return ""
        delta = self.text[self.sent : end]
        self.sent = end
        return delta

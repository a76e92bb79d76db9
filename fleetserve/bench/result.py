"""What the client saw of one request: client-side timestamps of every streamed chunk, the
server's usage and the error, if any. Times are seconds after the benchmark start (t0)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestResult:
    """One request (one turn of a session).

    Invariants once the request is over: scheduled_s <= start_s <= end_s; every chunk time is
    in [start_s, end_s] and ascending; `error` is None iff the request succeeded, and a request
    that succeeded has at least one chunk (else its error is "empty_output").
    """

    index: int  # order in which requests were sent
    session: int
    turn: int
    input_len: int  # tokens of the new user text, as generated
    output_len: int  # max_tokens asked for
    scheduled_s: float  # when it was due: its arrival, or the end of the previous turn
    group: int | None = None
    start_s: float = 0.0  # when the request was sent
    end_s: float = 0.0  # when the stream ended (or failed)
    chunk_times_s: list[float] = field(default_factory=list)  # chunks that carried text
    text: str = ""  # the generated text
    prompt_tokens: int | None = None  # from the server's usage
    completion_tokens: int | None = None
    expected_prompt_tokens: int | None = None  # from the tokenizer, when it is exact
    expected_completion_tokens: int | None = None
    error: str | None = None  # kind: "http_503", "timeout", "connection_error", ...
    error_detail: str | None = None
    request_input: Any = None  # the prompt or messages sent; kept in memory, not reported

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] - self.start_s if self.chunk_times_s else None

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def output_tokens(self) -> int:
        """Server usage if given, else the tokenizer's count, else one token per chunk."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        if self.expected_completion_tokens is not None:
            return self.expected_completion_tokens
        return len(self.chunk_times_s)

    @property
    def input_tokens(self) -> int:
        """Server usage if given, else the tokenizer's count, else the generated length."""
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        if self.expected_prompt_tokens is not None:
            return self.expected_prompt_tokens
        return self.input_len

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        ttft = self.ttft_s
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - ttft) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive text-bearing chunks (one token per chunk on most servers)."""
        return [b - a for a, b in itertools.pairwise(self.chunk_times_s)]

"""What the engine hands back: token-level outputs of the core, and text-level outputs of
the front end (vLLM's `RequestOutput` / `CompletionOutput` names)."""

from __future__ import annotations

from dataclasses import dataclass, field

# One position's logprobs: token id -> logprob, the sampled token first, then the top-N.
Logprobs = dict[int, float]


@dataclass
class EngineCoreOutput:
    """One step's news about one request, from the engine core (token ids only)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[Logprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[Logprobs | None] | None = None  # first position has none
    # Set on the first output after the request's first schedule (the core's monotonic
    # clock): when it left the waiting queue, and how long it waited there.
    scheduled_time: float | None = None
    queue_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprobs] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or token that ended it
    # Since the previous yield (streaming): text and tokens added.
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs_delta: list[Logprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[Logprobs | None] | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    queue_time: float | None = None  # seconds in the core's queue; None until scheduled

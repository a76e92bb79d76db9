"""One generation request as the engine core sees it: token ids in, token ids out."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from fleetserve.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again; its KV was freed and will be recomputed
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.name.startswith("FINISHED")

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


@dataclass
class EngineCoreRequest:
    """What the front end sends the engine core: one request, already tokenized, n == 1."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    priority: int = 0
    arrival_time: float = 0.0


@dataclass(eq=False)
class Request:
    """Token-level state of one request.

    Invariant, checked by the scheduler: ``0 <= num_computed_tokens <= num_tokens``, where
    ``num_tokens = len(prompt_token_ids) + len(output_token_ids)``. Tokens
    ``[0, num_computed_tokens)`` have their K/V in the blocks of the request's block table;
    ``[num_computed_tokens, num_tokens)`` are known but not yet computed (a prompt not yet
    prefilled, or the token sampled last step). A request samples a new token only in a step
    that brings ``num_computed_tokens`` up to ``num_tokens``.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = 0.0
    priority: int = 0  # lower value = served first, preempted last (vLLM's convention)
    eos_token_ids: frozenset[int] = frozenset()
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit on first schedule; -1 until scheduled
    num_preemptions: int = 0
    num_prompt_logprobs_sent: int = 0  # prompt positions whose logprobs went out (preemption)
    # Hashes of the request's full blocks, extended by the KV-cache manager as tokens arrive.
    block_hashes: list[int] = field(default_factory=list)
    error: str | None = None
    # On the core's clock (`EngineCore.clock`): when it was queued, and first scheduled.
    queued_time: float = 0.0
    scheduled_time: float | None = None
    timing_reported: bool = False  # an output has carried the two above
    seq: int = 0  # admission order, set by the scheduler; breaks ties of arrival_time

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        self.all_token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def extra_hash_keys(self) -> tuple:
        salt = self.sampling_params.cache_salt
        return (salt,) if salt else ()

"""What `EngineCore` needs from whatever runs a scheduled step: the model runner, or a
stand-in with the same contract (a cost model in a simulator, fixed tokens in a test).

No torch here: a stand-in must be importable without it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fleetserve.engine.outputs import Logprobs
from fleetserve.engine.scheduler import SchedulerOutput


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, Logprobs] = field(default_factory=dict)
    # request id -> logprobs of the prompt positions computed this step (None at position 0)
    prompt_logprobs: dict[str, list[Logprobs | None]] = field(default_factory=dict)
    # request id -> why it has no token this step: the request fails, the batch goes on
    errors: dict[str, str] = field(default_factory=dict)

    def merge(self, other: RunnerOutput) -> None:
        self.sampled.update(other.sampled)
        self.logprobs.update(other.logprobs)
        self.prompt_logprobs.update(other.prompt_logprobs)
        self.errors.update(other.errors)


class Runner(Protocol):
    """Runs one step of the batch the scheduler chose.

    `num_blocks` KV blocks of `block_size` tokens back the cache (block 0 is the KV manager's
    null block); token ids are in `[0, vocab_size)`; `eos_token_ids` end a request unless it
    ignores EOS."""

    num_blocks: int
    block_size: int
    vocab_size: int
    eos_token_ids: frozenset[int]

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """One token for every scheduled request whose `samples` is set (the others only
        extend their computed prefix). Must not change any request or scheduler state: the
        core reruns halves of a batch that raised (see `EngineCore._execute`)."""
        ...

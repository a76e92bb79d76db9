"""`CostModelRunner`: the engine's `Runner` contract with a cost model in place of the model.

It samples no real token: every sequence that samples gets a filler token (the simulator
runs every request to its max_tokens, as `--ignore-eos` does for real), and the step's
predicted duration is left in `last_step_s` for the simulated replica to advance its clock.
"""

from __future__ import annotations

from fleetserve.engine.runner import RunnerOutput
from fleetserve.engine.scheduler import SchedulerOutput
from fleetserve.perf.cost_model import CostModel, StepShape


class CostModelRunner:
    def __init__(
        self, cost_model: CostModel, num_blocks: int, block_size: int, vocab_size: int
    ) -> None:
        self.cost_model = cost_model
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.eos_token_ids: frozenset[int] = frozenset()
        self.last_step_s = 0.0

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """A token for every sequence that samples; changes no request (see `Runner`)."""
        self.last_step_s = self.cost_model.step_time(StepShape.of(sched))
        vocab = self.vocab_size
        return RunnerOutput(
            sampled={
                s.request.request_id: filler_token(s.request.num_tokens, vocab)
                for s in sched.scheduled
                if s.num_computed_tokens + s.num_new_tokens == s.request.num_tokens
            }
        )


def filler_token(position: int, vocab_size: int) -> int:
    """The token a simulated sequence samples at `position`: deterministic, and varied so
    that answers do not all hash alike in the prefix cache."""
    return 1 + (position * 7919) % (vocab_size - 1)

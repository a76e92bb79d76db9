"""`SimReplica`: one replica on the virtual clock, the real `EngineCore` (and so the real
`Scheduler` and `KVCacheManager`) stepping a `CostModelRunner`.

    step at t:  core.step() schedules, "runs" (the cost model says d seconds), updates
    at t + d:   the step's tokens reach the gateway, its KV events the prefix index, and the
                next step starts

Requests that arrive during a step join the next one, as in the engine-core process. A
replica that dies loses its engine (a new one, with an empty cache, comes back); a step in
flight when it died delivers nothing (its `generation` is stale).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from fleetserve.engine.core import EngineCore
from fleetserve.engine.outputs import EngineCoreOutput
from fleetserve.engine.request import EngineCoreRequest
from fleetserve.engine.scheduler import SchedulerConfig
from fleetserve.perf.cost_model import CostModel
from fleetserve.sim.events import EventLoop
from fleetserve.sim.runner import CostModelRunner


@dataclass(frozen=True)
class EngineSettings:
    """The engine each simulated replica runs: KV capacity and scheduler limits. Defaults
    come from the cost model's profile (`from_cost_model`)."""

    num_blocks: int = 4096
    block_size: int = 16
    vocab_size: int = 49152
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 1024
    max_model_len: int = 8192
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and value < 2:
                raise ValueError(f"{f.name} must be >= 2, got {value}")

    @classmethod
    def from_cost_model(cls, cost_model: CostModel, **overrides) -> EngineSettings:
        engine = cost_model.meta.get("engine", {})
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in engine.items() if k in known}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
        )


@dataclass
class SharedCores:
    """Replicas that share `cores` CPU cores (three single-thread replicas on a two-core
    machine): a step that starts while `busy` replicas (itself included) are stepping
    takes `busy / cores` times its cost-model time, when that is more than 1. Fair
    sharing, judged when each step starts."""

    cores: float
    busy: int = 0

    def __post_init__(self) -> None:
        if not self.cores > 0:
            raise ValueError(f"shared cores must be > 0, got {self.cores}")

    def slowdown(self) -> float:
        return max(1.0, self.busy / self.cores)


class SimReplica:
    """`on_outputs(replica, outputs)` receives each step's outputs when the step ends;
    `on_kv_events(replica, events)` its KV events, at the same time."""

    def __init__(
        self,
        replica_id: str,
        loop: EventLoop,
        cost_model: CostModel,
        settings: EngineSettings,
        on_outputs: Callable[[SimReplica, list[EngineCoreOutput]], None],
        on_kv_events: Callable[[SimReplica, list], None],
        shared: SharedCores | None = None,
    ) -> None:
        self.id = replica_id
        self.shared = shared
        self._holds_core = False  # a step of this replica counts in `shared.busy`
        self.loop = loop
        self.cost_model = cost_model
        self.settings = settings
        self.on_outputs = on_outputs
        self.on_kv_events = on_kv_events
        self.generation = 0
        self.steps = 0
        self.busy_s = 0.0
        self.core = self._new_core()
        self._stepping = False
        self.prefix_queries = 0  # prefix-cache stats of the engines this replica has had
        self.prefix_hits = 0

    def _new_core(self) -> EngineCore:
        s = self.settings
        runner = CostModelRunner(self.cost_model, s.num_blocks, s.block_size, s.vocab_size)
        return EngineCore(runner, s.scheduler_config, s.enable_prefix_caching, self.loop.clock)

    def add_request(self, request: EngineCoreRequest) -> None:
        rejected = self.core.add_request(request)
        if rejected:
            self.on_outputs(self, rejected)
        self._kick()

    def abort(self, request_ids: list[str]) -> None:
        outputs = self.core.abort_requests(request_ids)
        if outputs:
            self.on_outputs(self, outputs)

    @property
    def num_running(self) -> int:
        return self.core.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.core.scheduler.num_waiting

    @property
    def kv_cache_usage(self) -> float:
        return self.core.kv_cache.usage

    def restart(self) -> None:
        """The process died and a new one starts: every request and cached block is gone;
        a step in flight delivers nothing. The caller migrates the streams."""
        stats = self.core.kv_cache.stats
        self.prefix_queries += stats.queries
        self.prefix_hits += stats.hits
        self.generation += 1
        self._stepping = False
        self._release_core()
        self.core = self._new_core()

    def prefix_stats(self) -> tuple[int, int]:
        stats = self.core.kv_cache.stats
        return self.prefix_queries + stats.queries, self.prefix_hits + stats.hits

    def _kick(self) -> None:
        """Start a step if none is running: as an event at the current time, so that every
        request arriving at this instant joins it (the engine-core process also drains its
        input before it schedules)."""
        if not self._stepping and self.core.has_unfinished():
            self._stepping = True
            self.loop.call_at(self.loop.now, self._step, self.generation)

    def _step(self, generation: int) -> None:
        if generation != self.generation:
            return
        runner = self.core.runner
        runner.last_step_s = 0.0
        outputs = self.core.step()
        seconds = runner.last_step_s
        if seconds == 0.0:  # nothing was scheduled: wait for the next request
            self._stepping = False
            return
        if self.shared is not None:
            self.shared.busy += 1
            self._holds_core = True
            seconds *= self.shared.slowdown()
        self.steps += 1
        self.busy_s += seconds
        self.loop.call_later(seconds, self._step_done, self.generation, outputs)

    def _release_core(self) -> None:
        if self._holds_core:
            self._holds_core = False
            self.shared.busy -= 1

    def _step_done(self, generation: int, outputs: list[EngineCoreOutput]) -> None:
        if generation != self.generation:
            return
        self._stepping = False
        self._release_core()
        events = self.core.take_kv_events()
        if events:
            self.on_kv_events(self, events)
        if outputs:
            self.on_outputs(self, outputs)
        self._kick()

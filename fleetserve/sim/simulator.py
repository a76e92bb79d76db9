"""One simulation from configs to a `fleetserve bench` report.

    plan (bench's sessions and arrivals) -> SimClient -> SimGateway -> SimReplica x N
                                                           ^             (EngineCore +
                                                 SimFleet (failures,      cost model)
                                                 autoscaler)

All on one `EventLoop`; the report is `bench.report.build_report` over the simulated
`RequestResult`s, so `fleetserve bench compare` reads it beside a real run, plus a
`simulation` object (prefix-cache hit rate, migrations, preemptions, scale events).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from fleetserve.bench.benchmark import make_plan
from fleetserve.bench.config import BenchSpec
from fleetserve.bench.report import build_report, config_record
from fleetserve.bench.tokenizer import TextSource
from fleetserve.fleet.scaling import AutoscalingSettings
from fleetserve.gateway.config import GatewayConfig
from fleetserve.perf.cost_model import CostModel
from fleetserve.sim.client import SimClient
from fleetserve.sim.events import EventLoop
from fleetserve.sim.fleet import Failure, SimFleet
from fleetserve.sim.gateway import SimGateway
from fleetserve.sim.prompts import PromptBuilder
from fleetserve.sim.replica import EngineSettings, SharedCores, SimReplica


@dataclass(frozen=True)
class FleetSpec:
    """The simulated fleet: `num_replicas` at the start (with autoscaling, the initial
    count), each running `engine` at the speed of `cost_model`, behind a gateway with
    `gateway` settings; `failures` injected; `cold_start_s` for every (re)start the
    autoscaler orders."""

    cost_model: CostModel
    engine: EngineSettings
    num_replicas: int = 1
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    failures: tuple[Failure, ...] = ()
    autoscaling: AutoscalingSettings | None = None
    cold_start_s: float = 30.0
    drain_timeout_s: float = 30.0
    # The replicas share this many cores (as on one machine); None: each has its own, at
    # the cost model's speed. See `SharedCores`.
    shared_cores: float | None = None

    def __post_init__(self) -> None:
        if self.shared_cores is not None and not self.shared_cores > 0:
            raise ValueError(f"shared_cores must be > 0, got {self.shared_cores}")
        if self.num_replicas < 0 or (self.num_replicas == 0 and self.autoscaling is None):
            raise ValueError("num_replicas must be >= 1 (0 only with autoscaling)")
        if not (0 <= self.cold_start_s < math.inf and 0 <= self.drain_timeout_s < math.inf):
            raise ValueError(
                "cold_start_s and drain_timeout_s must be finite numbers >= 0, got "
                f"{self.cold_start_s!r} and {self.drain_timeout_s!r}"
            )
        for failure in self.failures:
            if failure.replica >= max(self.num_replicas, 1):
                raise ValueError(
                    f"a failure names replica {failure.replica}; the fleet starts with "
                    f"{self.num_replicas}"
                )


@dataclass
class Simulation:
    """A finished run: the report and what the wiring holds (for tests and profiles)."""

    report: dict[str, Any]
    loop: EventLoop
    gateway: SimGateway
    fleet: SimFleet
    client: SimClient


def simulate(bench: BenchSpec, fleet_spec: FleetSpec, text_source: TextSource) -> Simulation:
    loop = EventLoop()
    gateway = SimGateway(loop, fleet_spec.gateway)
    gateway.track_latency = fleet_spec.autoscaling is not None
    cores = fleet_spec.shared_cores
    shared = SharedCores(cores) if cores is not None else None

    def new_engine(replica_id: str) -> SimReplica:
        return SimReplica(
            replica_id,
            loop,
            fleet_spec.cost_model,
            fleet_spec.engine,
            gateway.on_outputs,
            gateway.on_kv_events,
            shared,
        )

    plan = make_plan(bench, text_source)
    prompts = PromptBuilder(text_source, bench.target.endpoint)
    expected = sum(len(s.turns) for s in plan.sessions) if isinstance(plan.sessions, list) else None
    with tqdm(total=expected, unit="req", disable=not bench.progress, leave=False) as bar:
        client = SimClient(loop, gateway, plan, prompts, on_result=lambda _: bar.update())
        auto = fleet_spec.autoscaling
        fleet = SimFleet(
            loop,
            gateway,
            new_engine,
            autoscaler=auto.new_policy() if auto else None,
            interval_s=auto.interval_s if auto else 1.0,
            cold_start_s=fleet_spec.cold_start_s,
            drain_timeout_s=fleet_spec.drain_timeout_s,
            active=lambda: client.active,
        )
        fleet.start(fleet_spec.num_replicas)
        for failure in fleet_spec.failures:
            fleet.inject(failure)
        client.start()

        def advance(now: float) -> None:
            bar.set_postfix_str(f"t={now:.0f}s virtual", refresh=False)

        loop.run(on_advance=advance if bench.progress else None)
    fleet.finish()
    results = client.results
    duration = max((r.end_s for r in results), default=0.0)
    config = config_record(bench.target, bench.workload, bench.load, bench.slo, bench.tokenizer)
    report = build_report(bench.label, config, results, bench.slo, duration)
    report["simulation"] = _simulation_record(fleet_spec, gateway, fleet, loop, prompts)
    return Simulation(report, loop, gateway, fleet, client)


def _simulation_record(
    spec: FleetSpec, gateway: SimGateway, fleet: SimFleet, loop: EventLoop, prompts: PromptBuilder
) -> dict[str, Any]:
    queries = hits = preemptions = steps = 0
    for engine in fleet.engines.values():
        q, h = engine.prefix_stats()
        queries, hits = queries + q, hits + h
        preemptions += engine.core.scheduler.num_preemptions
        steps += engine.steps
    cm = spec.cost_model
    return {
        "replicas": spec.num_replicas,
        "shared_cores": spec.shared_cores,
        "router": spec.gateway.router,
        "max_outstanding_per_replica": spec.gateway.max_outstanding_per_replica,
        "engine": dataclasses.asdict(spec.engine),
        "cost_model": {
            "coefficients": cm.coefficients,
            "serving": cm.serving,
            **{k: cm.meta[k] for k in ("model", "dtype", "hardware") if k in cm.meta},
        },
        "prompts": prompts.describe(),
        "failures": [dataclasses.asdict(f) for f in spec.failures],
        "autoscaling": dataclasses.asdict(spec.autoscaling) if spec.autoscaling else None,
        "prefix_cache": {
            "queries": queries,
            "hits": hits,
            "hit_rate": hits / queries if queries else None,
        },
        "migrations": gateway.migrations,
        "preemptions": preemptions,
        "engine_steps": steps,
        "events": loop.events_run,
        "replicas_started": len(fleet.started),
        "replica_seconds": fleet.replica_seconds,
        "scale_events": fleet.scale_events,
    }

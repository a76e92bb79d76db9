"""Many regions on one virtual clock: each a simulated gateway and fleet, its own users with
their day, and the regional policy, the very object the live gateways run, deciding where
each request goes.

    users of A --(daily curve)--> front A --policy--> gateway A -> replicas of A
                                          \\--RTT/2--> gateway B (pinned there) --RTT/2--> user

- Where: a region's front asks its `RegionalPolicy` with a `RegionView` per region. A view's
  `predicted_wait_s` is what the region's `Dispatcher` would predict for a new request,
  as `Dispatcher.submit` computes it (`predicted_wait`), counting the requests peers have
  spilled to it that are still on their way: zero while they leave a slot free and nobody
  queues, else the wait estimator over the queue ahead and the slots; with no slot, the
  cold start. `healthy`: not dark, and a replica ready or loading.
- A spilled request reaches the peer's gateway half a round trip later and is pinned there
  (the peer's policy sees `spilled_from`); its tokens reach the user half a round trip after
  the peer produced them, so TTFT and end times carry the whole round trip.
- Failures: spot replicas are preempted at their price's rate (killed, back after
  `spot_restart_s`, streams migrated by the gateway as for any failure); an outage darkens a
  region (`SimGateway.go_dark`: every stream it holds ends) and its users fail over to the
  nearest healthy region, or, under `local`, are refused.
- Cost: replica-seconds up (not preempted) by kind, sampled every `tick_s`, at the region's
  prices per hour of the day.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from fleetserve.bench.config import BenchSpec
from fleetserve.bench.runner import Plan
from fleetserve.bench.tokenizer import TextSource
from fleetserve.bench.workload import generate_sessions
from fleetserve.gateway.dispatcher import Dispatcher
from fleetserve.gateway.prefix_index import PrefixView
from fleetserve.gateway.route_request import RouteRequest
from fleetserve.regions.policy import (
    REGIONAL_POLICIES,
    RegionalPolicy,
    RegionChoice,
    RegionRequest,
    RegionView,
)
from fleetserve.sim.client import SimClient
from fleetserve.sim.events import EventLoop
from fleetserve.sim.fleet import SimFleet
from fleetserve.sim.gateway import SimGateway, SimStream
from fleetserve.sim.prompts import PromptBuilder
from fleetserve.sim.regional_report import PlanSLO, regional_report
from fleetserve.sim.regional_spec import Price, RegionSpec, RegionsSpec
from fleetserve.sim.replica import SimReplica
from fleetserve.sim.schedule import ScheduleScaler
from fleetserve.sim.simulator import FleetSpec

_REGION_STREAM = 7_001  # RNG stream ids, apart from bench's
_SPOT_STREAM = 7_002


def predicted_wait(dispatcher: Dispatcher, now: float, arriving: int = 0) -> float:
    """Seconds a new request would wait for a replica slot, as `Dispatcher.submit` predicts
    it, behind `arriving` requests already on their way here (spilled by peers, not yet
    arrived): none while they leave a slot free and nobody queues; else the wait estimator
    over the queue ahead and the slots; with no slot at all, the cold start (inf: nothing is
    coming). The live gateway's very estimate: `Dispatcher.predicted_wait`."""
    return dispatcher.predicted_wait(now, arriving=arriving)


def arrival_times(
    rate_at: Callable[[float], float], start_s: float, end_s: float, rng: np.random.Generator
) -> list[float]:
    """A Poisson process of varying rate on [start_s, end_s), by thinning: candidates at the
    day's highest rate, each kept with probability rate(t) / highest."""
    grid = np.linspace(start_s, end_s, 512)
    peak = max(rate_at(t) for t in grid) * 1.05
    if peak <= 0:
        return []
    times, t = [], start_s
    while True:
        t += rng.exponential(1.0 / peak)
        if t >= end_s:
            return times
        if rng.random() * peak < rate_at(t):
            times.append(float(t))


@dataclass
class RegionStats:
    decisions: Counter = field(default_factory=Counter)  # reason -> requests of its users
    spilled_in: int = 0
    served_output_tokens: int = 0
    replica_s: dict[str, float] = field(default_factory=lambda: {"on_demand": 0.0, "spot": 0.0})
    preemptions: int = 0
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # t, up, in flight


class SimRegion:
    """One region: its gateway, fleet, users (client) and front door (`send`)."""

    def __init__(
        self,
        world: RegionalWorld,
        spec: RegionSpec,
        index: int,
        price: Price | None,
        policy: RegionalPolicy,
    ) -> None:
        self.world = world
        self.spec = spec
        self.name = spec.name
        self.price = price
        self.policy = policy
        self.loop = world.loop
        self.stats = RegionStats()
        self.dark = False
        self.arriving = 0  # requests peers sent here that have not arrived yet
        self.kind: dict[str, str] = {}  # replica id -> "spot" | "on_demand"
        template = world.fleet_template
        self.gateway = SimGateway(self.loop, template.gateway)
        self._rng = np.random.default_rng((world.bench.load.seed, _SPOT_STREAM, index))
        if spec.autoscaling is not None:
            scaler = spec.autoscaling.new_policy()
            interval = spec.autoscaling.interval_s
            first = spec.autoscaling.initial_replicas(None)
        else:
            scaler = ScheduleScaler(self._size_at, template.cold_start_s)
            interval = min(1.0, world.spec.hour_s / 10)
            first = self._size_at(0.0)
        self.fleet = SimFleet(
            self.loop,
            self.gateway,
            self._new_engine,
            autoscaler=scaler,
            interval_s=interval,
            cold_start_s=template.cold_start_s,
            drain_timeout_s=template.drain_timeout_s,
            active=world.active,
        )
        self._first = first
        self.client: SimClient | None = None

    # ---- replicas ----------------------------------------------------------------------

    def _size_at(self, t: float) -> int:
        return self.spec.size_at(self.world.spec.utc_hour(min(t, self.world.spec.duration_s)))

    def _new_engine(self, replica_id: str) -> SimReplica:
        alive = [r for r in self.gateway.replicas if r in self.kind]
        spot = sum(self.kind[r] == "spot" for r in alive)
        wanted = math.floor(self.spec.spot_fraction * (len(alive) + 1) + 0.5)
        self.kind[replica_id] = "spot" if spot < wanted else "on_demand"
        t = self.world.fleet_template
        return SimReplica(
            replica_id,
            self.loop,
            t.cost_model,
            t.engine,
            self.gateway.on_outputs,
            self.gateway.on_kv_events,
        )

    def start(self, client: SimClient) -> None:
        self.client = client
        self.fleet.start(self._first)
        self.loop.call_at(0.0, self._tick)
        client.start()

    def _tick(self) -> None:
        """Account replica-seconds, sample the timeline, and preempt spot replicas."""
        tick = self.world.tick_s
        billed = self.loop.now < self.world.spec.duration_s  # the planned hours only
        up = 0
        for rid, replica in list(self.gateway.replicas.items()):
            if replica.down:
                continue
            up += 1
            kind = self.kind[rid]
            self.stats.replica_s[kind] += tick if billed else 0.0
            rate = self.price.spot_preemptions_per_h if self.price else 0.0
            if kind == "spot" and rate > 0 and not self.dark:
                chance = 1.0 - math.exp(-rate * tick / self.world.spec.hour_s)
                if self._rng.random() < chance:
                    self._preempt(rid)
        in_flight = sum(r.outstanding for r in self.gateway.replicas.values())
        self.stats.timeline.append((self.loop.now, up, in_flight))
        if self.world.active():
            self.loop.call_later(tick, self._tick)

    def _preempt(self, replica_id: str) -> None:
        self.stats.preemptions += 1
        self.gateway.kill(replica_id)
        self.loop.call_later(self.price.spot_restart_s, self._back, replica_id)

    def _back(self, replica_id: str) -> None:
        replica = self.gateway.replicas.get(replica_id)
        if replica is not None and replica.down and not self.dark:
            self.gateway.mark_ready(replica_id)

    def go_dark(self) -> None:
        self.dark = True
        self.gateway.go_dark(f"region {self.name} is dark")

    def light_up(self) -> None:
        self.dark = False
        for replica_id, replica in list(self.gateway.replicas.items()):
            if replica.down:
                self.gateway.mark_ready(replica_id)

    # ---- what the policy sees ----------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return not self.dark and any(
            not r.down and (r.ready or r.loading) for r in self.gateway.replicas.values()
        )

    def view(self, origin: str, route: RouteRequest | None) -> RegionView:
        now = self.loop.now
        cached = 0
        if route is not None:
            cached = max(
                (route.cached_tokens(PrefixView(r.prefix)) for r in self.gateway.replicas.values()),
                default=0,
            )
        return RegionView(
            self.name,
            self.world.spec.rtt(origin, self.name),
            math.inf if self.dark else predicted_wait(self.gateway.dispatcher, now, self.arriving),
            self.healthy,
            cached,
        )

    # ---- requests ----------------------------------------------------------------------

    def send(self, stream: SimStream) -> None:
        """A request of this region's users (what `SimClient` calls its gateway's `send`)."""
        now = self.loop.now
        stream.request_id = f"{self.name}/{stream.request_id}"
        route = None
        if self.policy.config.prefill_s_per_token > 0:
            ids = tuple(stream.prompt_ids)
            route = RouteRequest(stream.request_id, ids, len(ids))
        peers = [r.view(self.name, route) for r in self.world.regions.values() if r is not self]
        local = self.view(self.name, route)
        choice: RegionChoice = self.policy.choose(
            RegionRequest(len(stream.prompt_ids)), local, peers, now
        )
        self.stats.decisions[choice.reason] += 1
        target = self.world.regions[choice.region]
        self.world.where[id(stream.result)] = (self.name, target.name)
        if target is self:
            self._account(stream, self)
            if self.dark:
                stream.finish(now, "http_503", f"region {self.name} is dark")
            else:
                self.gateway.send(stream)
            return
        half = self.world.spec.rtt(self.name, target.name) / 2
        self._account(stream, target, half)
        target.arriving += 1
        self.loop.call_later(half, target.receive, stream, self.name)

    def receive(self, stream: SimStream, origin: str) -> None:
        """A request a peer spilled here: pinned (the policy never sends it on)."""
        self.stats.spilled_in += 1
        self.arriving -= 1
        request = RegionRequest(len(stream.prompt_ids), origin)
        choice = self.policy.choose(request, self.view(self.name, None), [], self.loop.now)
        assert choice.region == self.name and choice.reason == "pinned", choice
        if self.dark:
            stream.finish(self.loop.now, "http_503", f"peer region {self.name} is dark")
        else:
            self.gateway.send(stream)

    def _account(self, stream: SimStream, server: SimRegion, half_rtt: float = 0.0) -> None:
        """On the stream's end: count its tokens where they were made; a spilled stream's
        tokens and end reach the user half a round trip later."""
        done = stream.on_done

        def ended(s: SimStream) -> None:
            server.stats.served_output_tokens += len(s.output_ids)
            if not half_rtt:
                done(s)
                return
            result = s.result
            result.chunk_times_s[:] = [t + half_rtt for t in result.chunk_times_s]
            result.end_s += half_rtt
            self.loop.call_later(half_rtt, done, s)

        stream.on_done = ended


class RegionalWorld:
    """The regions of a `RegionsSpec` wired on one loop (built by `simulate_regions`)."""

    def __init__(
        self,
        spec: RegionsSpec,
        bench: BenchSpec,
        fleet_template: FleetSpec,
        prices: Mapping[str, Price] | None,
        tick_s: float | None,
    ) -> None:
        self.spec = spec
        self.bench = bench
        self.fleet_template = fleet_template
        self.loop = EventLoop()
        self.tick_s = tick_s or min(1.0, spec.hour_s / 20)
        self.regions: dict[str, SimRegion] = {}
        self.where: dict[int, tuple[str, str]] = {}  # id(result) -> (users' region, server)
        policy_cls = REGIONAL_POLICIES.get(spec.policy)
        for i, r in enumerate(spec.regions):
            price = (prices or {}).get(r.name)
            self.regions[r.name] = SimRegion(self, r, i, price, policy_cls(spec.regional))

    def active(self) -> bool:
        return any(r.client is None or r.client.active for r in self.regions.values())


@dataclass
class RegionalRun:
    """A finished regional run: the combined bench report (with a `regions` object) and the
    world, for tests."""

    report: dict[str, Any]
    world: RegionalWorld


def simulate_regions(
    spec: RegionsSpec,
    bench: BenchSpec,
    fleet_template: FleetSpec,
    text_source: TextSource,
    prices: Mapping[str, Price] | None = None,
    slo: PlanSLO | None = None,
    tick_s: float | None = None,
) -> RegionalRun:
    """Simulate `spec.hours` of the day. `bench` gives the workload (prompt and answer
    lengths, kind, seed) and the SLO; its rate is replaced by each region's curve.
    `fleet_template` gives each replica's cost model and engine, the gateway's settings and
    the cold start; its replica count, failures and autoscaling are the regions'."""
    world = RegionalWorld(spec, bench, fleet_template, prices, tick_s)
    prompts = PromptBuilder(text_source, bench.target.endpoint)
    plans = []
    for i, region in enumerate(world.regions.values()):
        rng = np.random.default_rng((bench.load.seed, _REGION_STREAM, i))
        arrivals = arrival_times(
            lambda t, r=region.spec: r.rate_at(spec.utc_hour(t)), 0.0, spec.duration_s, rng
        )
        sessions = generate_sessions(bench.workload, text_source, bench.load.seed, 100 + i)
        plans.append(Plan([next(sessions) for _ in arrivals], arrivals))
    expected = sum(len(s.turns) for p in plans for s in p.sessions)
    with tqdm(total=expected, unit="req", disable=not bench.progress, leave=False) as bar:
        for region, plan in zip(world.regions.values(), plans):
            client = SimClient(world.loop, region, plan, prompts, on_result=lambda _: bar.update())
            region.start(client)
        for outage in spec.outages:
            region = world.regions[outage.region]
            at = (outage.at_h - spec.start_hour) * spec.hour_s
            world.loop.call_at(max(at, 0.0), region.go_dark)
            world.loop.call_at(max(at + outage.for_h * spec.hour_s, 0.0), region.light_up)

        def advance(now: float) -> None:
            bar.set_postfix_str(f"{spec.utc_hour(now) % 24:05.2f} h UTC", refresh=False)

        world.loop.run(on_advance=advance if bench.progress else None)
    for region in world.regions.values():
        region.fleet.finish()
    return RegionalRun(regional_report(world, bench, slo), world)

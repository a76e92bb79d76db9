"""The autoscaling policy on synthetic traces: plain numbers, the snapshot's ``now`` as the
clock, exact assertions. ``ToyFleet`` applies each decision so a trace plays out as it would
on a fleet (new replicas load for ``cold_start_s``, removed ones go at once)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest

from fleetserve.fleet.autoscaler import (
    AUTOSCALING_POLICIES,
    Autoscaler,
    AutoscalerConfig,
    FleetSnapshot,
    ReplicaSample,
    ScaleDecision,
)

TICK = 2.0


def replica(
    id: str, state: str = "ready", running: int = 0, waiting: int = 0, started_at: float = 0.0
) -> ReplicaSample:
    return ReplicaSample(id, state, running, waiting, 0.0, started_at)


def snapshot(now: float, *replicas: ReplicaSample, queued: int = 0, **latency) -> FleetSnapshot:
    in_flight = sum(r.running + r.waiting for r in replicas)
    return FleetSnapshot(now, tuple(replicas), queued, in_flight, **latency)


@dataclass
class ToyFleet:
    """Replicas that share a given load evenly; decisions applied at once."""

    cold_start_s: float = 0.0
    ready_at: dict[str, float] = field(default_factory=dict)
    started: int = 0

    def add(self, now: float) -> None:
        self.ready_at[f"r{self.started}"] = now + self.cold_start_s
        self.started += 1

    def snapshot(self, now: float, load: int, **latency) -> FleetSnapshot:
        ready = [i for i, t in self.ready_at.items() if t <= now]
        replicas = []
        for rid, at in self.ready_at.items():
            share = 0
            if rid in ready:
                share = load // len(ready) + (1 if ready.index(rid) < load % len(ready) else 0)
            state = "ready" if at <= now else "loading"
            replicas.append(replica(rid, state, running=share, started_at=at - self.cold_start_s))
        queued = 0 if ready else load
        return snapshot(now, *replicas, queued=queued, **latency)

    def apply(self, now: float, decision: ScaleDecision) -> None:
        for rid in decision.remove:
            del self.ready_at[rid]
        while len(self.ready_at) < decision.desired:
            self.add(now)
        assert len(self.ready_at) == decision.desired


def play(
    scaler: Autoscaler, fleet: ToyFleet, loads: list[int], start: float = 0.0, **latency
) -> list[tuple[float, int, ScaleDecision]]:
    """One decision per tick; returns (now, size before, decision) for every tick."""
    trace = []
    for i, load in enumerate(loads):
        now = start + i * TICK
        size = len(fleet.ready_at)
        decision = scaler.decide(fleet.snapshot(now, load, **latency))
        fleet.apply(now, decision)
        trace.append((now, size, decision))
    return trace


def events(trace: list[tuple[float, int, ScaleDecision]]) -> list[tuple[float, int, int, str]]:
    return [(t, size, d.desired, d.reason) for t, size, d in trace if d.desired != size]


def fleet_of(n: int, cold_start_s: float = 0.0) -> ToyFleet:
    fleet = ToyFleet(cold_start_s)
    for _ in range(n):
        fleet.add(-cold_start_s)
    return fleet


CONFIG = AutoscalerConfig(
    min_replicas=1, max_replicas=20, target_concurrency=10, scale_down_delay_s=60
)


def test_noisy_flat_load_causes_no_scale_events_after_warm_up() -> None:
    rng = random.Random(7)
    loads = [25 + rng.randint(-6, 6) for _ in range(300)]  # 600 s around 2.5 replicas' worth
    trace = play(Autoscaler(CONFIG), fleet_of(1), loads)
    warm_up_s = 120
    assert [e for e in events(trace) if e[0] >= warm_up_s] == []
    assert trace[-1][2].desired == 3


def test_a_10x_step_scales_up_within_the_panic_window() -> None:
    scaler, fleet = Autoscaler(CONFIG), fleet_of(1)
    play(scaler, fleet, [8] * 60)  # 120 s at 0.8 replicas' worth
    step_at = 120.0
    trace = play(scaler, fleet, [80] * 10, start=step_at)
    within = [d for t, _, d in trace if t <= step_at + CONFIG.panic_window_s]
    assert within[0].reason == "panic" and within[0].desired > 1
    assert max(d.desired for d in within) >= 8
    # The stable window alone would still be at ~2 replicas by then.
    assert (54 * 8 + 4 * 80) / 58 / CONFIG.target_concurrency < 2


def test_a_drop_scales_down_only_after_the_delay() -> None:
    scaler, fleet = Autoscaler(CONFIG), fleet_of(4)
    play(scaler, fleet, [40] * 100)
    drop_at = 200.0
    trace = play(scaler, fleet, [8] * 150, start=drop_at)
    downs = [e for e in events(trace) if e[2] < e[1]]
    # The first tick at which the stable mean asks for fewer than 4 replicas; the first step
    # down comes a full delay after it, not before.
    lower_at = next(t for t, _, _ in trace if _stable_wants(t, drop_at) < 4)
    assert lower_at > drop_at
    assert downs[0][0] == lower_at + CONFIG.scale_down_delay_s
    assert [e[2] for e in downs] == [3, 2, 1]  # one at a time, down to the load's 1 replica


def _stable_wants(now: float, drop_at: float) -> int:
    """What the stable window asks for, 40 before `drop_at` and 8 from it, ticks of 2 s:
    ceil(mean / (target x (1 - scale_down_tolerance)))."""
    ticks = [
        t * TICK for t in range(int(now // TICK) + 1) if t * TICK > now - CONFIG.stable_window_s
    ]
    mean = sum(40 if t < drop_at else 8 for t in ticks) / len(ticks)
    return math.ceil(mean / (CONFIG.target_concurrency * (1 - CONFIG.scale_down_tolerance)))


def test_no_scale_down_while_panicking_nor_for_a_stable_window_after() -> None:
    config = AutoscalerConfig(max_replicas=20, target_concurrency=10, scale_down_delay_s=0)
    scaler, fleet = Autoscaler(config), fleet_of(1)
    play(scaler, fleet, [8] * 20)
    burst = play(scaler, fleet, [80] * 5, start=40.0)
    peak = burst[-1][2].desired
    assert peak >= 8
    # Panic is entered at t=40 (a 3.2-replica panic figure on 1 ready replica) and that tick is
    # the last over 2x: at t=42 four replicas are ready. So panic lasts until 40 + 60 s, and
    # the fleet holds its peak all that time although the load fell back at t=50.
    after = play(scaler, fleet, [8] * 60, start=50.0)
    panic_ends = 40 + config.stable_window_s
    assert {d.desired for t, _, d in after if t < panic_ends} == {peak}
    downs = [e for e in events(after) if e[2] < e[1]]
    assert downs[0][0] == panic_ends


def test_the_least_loaded_ready_replicas_are_removed_newest_first() -> None:
    config = AutoscalerConfig(max_replicas=8, scale_down_delay_s=0, max_scale_down_step=2)
    decision = Autoscaler(config).decide(
        snapshot(
            0.0,
            replica("old-idle", running=0, started_at=0.0),
            replica("young-busy", running=2, waiting=1, started_at=9.0),
            replica("mid-idle", running=0, started_at=5.0),
            replica("old-busy", running=1, started_at=1.0),
        )
    )
    assert (decision.desired, decision.remove) == (2, ("mid-idle", "old-idle"))


def test_a_scale_down_blip_restarts_the_delay() -> None:
    config = AutoscalerConfig(
        target_concurrency=10, stable_window_s=6, panic_threshold=10, scale_down_delay_s=20
    )
    scaler, fleet = Autoscaler(config), fleet_of(3)
    loads = [10] * 8 + [30] * 4 + [10] * 20  # 16 s low, a blip back to 3 replicas, low again
    trace = play(scaler, fleet, loads)
    downs = [e for e in events(trace) if e[2] < e[1]]
    # Lower than 3 from t=0, but the blip brings the 6 s mean back to 3 replicas at t=18..24,
    # so the delay restarts at t=26 (two of the window's three samples are 10 again) and the
    # first step down comes at 26 + 20, not at t=20 as the first quiet run alone would give.
    assert downs[0][0] == 26 + 20
    assert downs[0][1:3] == (3, 2)


def test_a_loading_replica_counts_toward_capacity_and_is_never_removed() -> None:
    config = AutoscalerConfig(max_replicas=8, target_concurrency=10, scale_down_delay_s=0)
    scaler = Autoscaler(config)
    # 40 requests on one ready replica, three more loading: enough capacity is on its way.
    loading = [replica(f"l{i}", "loading", started_at=10.0 + i) for i in range(3)]
    decision = scaler.decide(snapshot(0.0, replica("r0", running=40), *loading))
    assert (decision.desired, decision.reason) == (4, "hold")

    # Load falls to one replica's worth: the least-loaded ready replica goes, not the idle,
    # newest, loading one, and the fleet never shrinks below what is still loading.
    scaler = Autoscaler(AutoscalerConfig(target_concurrency=10, scale_down_delay_s=0))
    decision = scaler.decide(
        snapshot(
            0.0,
            replica("busy", running=3, started_at=0.0),
            replica("idle", running=0, started_at=5.0),
            replica("new", "loading", started_at=9.0),
        )
    )
    assert (decision.desired, decision.remove) == (2, ("idle",))
    decision = scaler.decide(
        snapshot(2.0, replica("busy", running=0), replica("new", "loading", started_at=9.0))
    )
    assert (decision.desired, decision.remove) == (2, ())  # "busy" serves while "new" loads


def test_zero_load_reaches_zero_after_the_grace_period_and_one_request_brings_one_back() -> None:
    config = AutoscalerConfig(min_replicas=0, scale_down_delay_s=0, scale_to_zero_grace_s=30)
    scaler, fleet = Autoscaler(config), fleet_of(1)
    trace = play(scaler, fleet, [0] * 20)
    assert events(trace) == [(30.0, 1, 0, "idle_to_zero")]
    assert trace[15][2].remove == ("r0",)

    assert scaler.decide(snapshot(40.0)) == ScaleDecision(0, "hold")
    decision = scaler.decide(snapshot(42.0, queued=1))
    assert (decision.desired, decision.reason) == (1, "activate")
    # A policy that starts at zero (a restarted controller) stays there until a request.
    assert Autoscaler(config).decide(snapshot(0.0)) == ScaleDecision(0, "hold")


def test_the_idle_clock_restarts_on_any_request() -> None:
    config = AutoscalerConfig(min_replicas=0, scale_down_delay_s=0, scale_to_zero_grace_s=30)
    scaler, fleet = Autoscaler(config), fleet_of(1)
    trace = play(scaler, fleet, [0] * 10 + [1] + [0] * 20)  # one request at t=20
    assert events(trace) == [(50.0, 1, 0, "idle_to_zero")]


def test_the_idle_clock_starts_when_the_last_replica_is_ready_not_when_it_started() -> None:
    # A cold start longer than the grace must not be spent idle: the replica that finally
    # loaded would go at once, before any request could reach it.
    config = AutoscalerConfig(min_replicas=0, scale_down_delay_s=0, scale_to_zero_grace_s=30)
    scaler, fleet = Autoscaler(config), ToyFleet(cold_start_s=50.0)
    fleet.add(0.0)  # loading until t=50
    trace = play(scaler, fleet, [0] * 60)
    assert events(trace) == [(78.0, 1, 0, "idle_to_zero")]  # last seen loading at t=48


def test_a_replica_that_gets_ready_gets_the_whole_scale_down_delay() -> None:
    # Two replicas start with no load: the second may go, but only a whole delay after both
    # are ready, not the moment it is (the delay would have run out while it loaded).
    config = AutoscalerConfig(min_replicas=1, scale_down_delay_s=20)
    scaler, fleet = Autoscaler(config), ToyFleet(cold_start_s=30.0)
    fleet.add(0.0)
    fleet.add(0.0)  # both loading until t=30
    trace = play(scaler, fleet, [0] * 40)
    assert events(trace) == [(50.0, 2, 1, "stable")]


def test_steps_are_bounded() -> None:
    up = AutoscalerConfig(max_replicas=20, target_concurrency=10, max_scale_up_step=2)
    decision = Autoscaler(up).decide(snapshot(0.0, replica("r0", running=1000)))
    assert (decision.desired, decision.reason) == (3, "panic")

    eight = [replica(f"r{i}") for i in range(8)]
    down = AutoscalerConfig(max_replicas=20, scale_down_delay_s=0)  # 1 at a time
    assert Autoscaler(down).decide(snapshot(0.0, *eight)).desired == 7
    halving = AutoscalerConfig(max_replicas=20, scale_down_delay_s=0, max_scale_down_step=10)
    assert Autoscaler(halving).decide(snapshot(0.0, *eight)).desired == 4  # rate 2


def test_min_and_max_are_respected() -> None:
    config = AutoscalerConfig(min_replicas=2, max_replicas=5, target_concurrency=10)
    assert Autoscaler(config).decide(snapshot(0.0)) == ScaleDecision(2, "min")
    decision = Autoscaler(config).decide(snapshot(0.0, replica("r0", running=10_000)))
    assert (decision.desired, decision.reason) == (5, "max")

    scaler, fleet = (
        Autoscaler(AutoscalerConfig(**{**config.__dict__, "scale_down_delay_s": 0})),
        fleet_of(4),
    )
    trace = play(scaler, fleet, [0] * 100)
    assert min(d.desired for _, _, d in trace) == 2
    assert trace[-1][2] == ScaleDecision(2, "hold")


def test_an_slo_breach_scales_up_and_blocks_scale_down() -> None:
    config = AutoscalerConfig(
        max_replicas=8, target_concurrency=10, scale_down_delay_s=0, ttft_p90_slo_s=1.0
    )
    scaler = Autoscaler(config)
    two = (replica("r0", running=2), replica("r1", running=2))  # 4 requests: 1 replica's worth
    decision = scaler.decide(snapshot(0.0, *two, ttft_p90_s=2.5))
    assert (decision.desired, decision.reason) == (3, "slo")
    # Within the SLO the same load lets the fleet shrink.
    assert scaler.decide(snapshot(2.0, *two, ttft_p90_s=0.5)).desired == 1
    # A replica already loading is the answer to the breach: no second one.
    loading = replica("r2", "loading", started_at=2.0)
    decision = Autoscaler(config).decide(snapshot(0.0, *two, loading, ttft_p90_s=2.5))
    assert (decision.desired, decision.reason) == (3, "hold")

    itl = AutoscalerConfig(max_replicas=8, target_concurrency=10, itl_p90_slo_s=0.05)
    decision = Autoscaler(itl).decide(snapshot(0.0, *two, itl_p90_s=0.2))
    assert (decision.desired, decision.reason) == (3, "slo")


def test_no_cooldown_is_shorter_than_an_observed_cold_start() -> None:
    config = AutoscalerConfig(target_concurrency=10, scale_down_delay_s=10)
    scaler = Autoscaler(config)
    scaler.observe_cold_start(100.0)
    trace = play(scaler, fleet_of(4), [0] * 80)
    assert events(trace)[0][:3] == (100.0, 4, 3)

    zero = AutoscalerConfig(min_replicas=0, scale_down_delay_s=0, scale_to_zero_grace_s=5)
    scaler = Autoscaler(zero)
    scaler.observe_cold_start(60.0)
    scaler.observe_cold_start(20.0)  # the slowest of the recent cold starts counts
    trace = play(scaler, fleet_of(1), [0] * 40)
    assert events(trace) == [(60.0, 1, 0, "idle_to_zero")]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_replicas", -1),
        ("max_replicas", 0),
        ("target_concurrency", 0),
        ("stable_window_s", 0),
        ("panic_window_fraction", 0),
        ("panic_window_fraction", 1.5),
        ("panic_threshold", 1.0),
        ("max_scale_up_step", 0),
        ("max_scale_down_step", 0),
        ("max_scale_up_rate", 1.0),
        ("max_scale_down_rate", 0.5),
        ("scale_down_delay_s", -1),
        ("scale_to_zero_grace_s", -1),
        ("ttft_p90_slo_s", 0),
        ("itl_p90_slo_s", -0.1),
        ("max_samples", 1),
    ],
)
def test_config_validation_names_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"AutoscalerConfig.{field} = "):
        AutoscalerConfig(**{field: value})


def test_max_below_min_and_bad_cold_starts_are_refused() -> None:
    with pytest.raises(ValueError, match="max_replicas .* must be >= min_replicas"):
        AutoscalerConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="cold start"):
        Autoscaler(AutoscalerConfig()).observe_cold_start(-1.0)


def test_the_policy_is_registered() -> None:
    assert AUTOSCALING_POLICIES.names() == ["kpa"]
    assert AUTOSCALING_POLICIES.get("kpa") is Autoscaler


# A seeded Poisson trace through a toy queue: idle -> 10x burst -> idle.


@dataclass
class QueueReplica:
    id: str
    ready_at: float
    started_at: float
    slots: list[float] = field(default_factory=list)  # remaining service seconds per request
    draining: bool = False


def test_a_poisson_burst_scales_up_then_down_without_oscillating() -> None:
    rng = random.Random(2026)
    service_s, capacity, cold_start_s = 8.0, 16, 10.0
    phases = [(120.0, 0.5), (300.0, 5.0), (480.0, 0.5)]  # (seconds, requests per second)
    arrivals, t0 = [], 0.0
    for duration, rate in phases:
        t = t0 + rng.expovariate(rate)
        while t < t0 + duration:
            arrivals.append(t)
            t += rng.expovariate(rate)
        t0 += duration
    config = AutoscalerConfig(
        min_replicas=1, max_replicas=8, target_concurrency=8, scale_down_delay_s=30
    )
    scaler, total = Autoscaler(config), len(arrivals)
    replicas = [QueueReplica("q0", 0.0, -cold_start_s)]
    queue: list[float] = []
    served, sizes, started = 0, [], 1
    for tick in range(int(t0 / TICK)):
        now = tick * TICK
        while arrivals and arrivals[0] <= now:
            queue.append(arrivals.pop(0))
        for r in replicas:
            if r.ready_at == now:
                scaler.observe_cold_start(cold_start_s)
            done = [s for s in r.slots if s <= TICK]
            served += len(done)
            r.slots = [s - TICK for s in r.slots if s > TICK]
        replicas = [r for r in replicas if not (r.draining and not r.slots)]
        open_ = [r for r in replicas if r.ready_at <= now and not r.draining]
        while queue and open_:
            target = min(open_, key=lambda r: len(r.slots))
            if len(target.slots) >= capacity:
                break
            queue.pop(0)
            target.slots.append(service_s)
        samples = tuple(
            ReplicaSample(
                r.id,
                "draining" if r.draining else "ready" if r.ready_at <= now else "loading",
                len(r.slots),
                0,
                len(r.slots) / capacity,
                r.started_at,
            )
            for r in replicas
        )
        in_flight = sum(len(r.slots) for r in replicas)
        decision = scaler.decide(FleetSnapshot(now, samples, len(queue), in_flight))
        size = sum(not r.draining for r in replicas)
        for r in replicas:
            r.draining = r.draining or r.id in decision.remove
        for _ in range(decision.desired - size):
            replicas.append(QueueReplica(f"q{started}", now + cold_start_s, now))
            started += 1
        sizes.append(sum(not r.draining for r in replicas))

    steps = [b - a for a, b in zip(sizes, sizes[1:]) if b != a]
    directions = [1 if s > 0 else -1 for s in steps]
    changes = sum(a != b for a, b in zip(directions, directions[1:]))
    assert max(sizes) >= 5, "the burst (5 req/s x 8 s = 40 in flight) needs 5 replicas"
    assert sizes[-1] == 1, "the fleet returns to its minimum after the burst"
    assert changes <= 2, f"oscillation: sizes went {steps}"
    in_system = len(arrivals) + len(queue) + sum(len(r.slots) for r in replicas)
    assert served + in_system == total, "no request lost"

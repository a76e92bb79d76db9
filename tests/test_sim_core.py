"""The fleet simulator on plain data: a fixed cost model, word prompts, virtual time only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fleetserve.bench.config import (
    SLO,
    BenchSpec,
    LengthSpec,
    LoadConfig,
    TargetConfig,
    WorkloadConfig,
)
from fleetserve.bench.tokenizer import WordTokenizer
from fleetserve.fleet.autoscaler import AutoscalerConfig
from fleetserve.fleet.scaling import AutoscalingSettings
from fleetserve.gateway.config import GatewayConfig
from fleetserve.perf.cost_model import CostModel
from fleetserve.sim.events import EventLoop
from fleetserve.sim.fleet import Failure
from fleetserve.sim.replica import EngineSettings
from fleetserve.sim.simulator import FleetSpec, simulate

# 20 ms a step, plus 0.1 ms a token and 1 ms a sampling sequence: a small replica.
COSTS = CostModel({"base": 0.02, "tokens": 1e-4, "sampled": 1e-3, "context_tokens": 1e-6})
ENGINE = EngineSettings(num_blocks=1024, block_size=16, vocab_size=4096, max_model_len=2048)


def bench(
    kind: str = "random",
    n: int = 60,
    rate: float = 4.0,
    seed: int = 0,
    concurrency: int | None = None,
    input_len: int = 64,
    output_len: int = 32,
    **workload,
) -> BenchSpec:
    spread = 0.0 if kind == "multi-turn" else 0.5
    return BenchSpec(
        target=TargetConfig("http://simulated", "m"),
        workload=WorkloadConfig(
            kind,
            LengthSpec(input_len, range_ratio=spread),
            LengthSpec(output_len, range_ratio=spread),
            **workload,
        ),
        load=LoadConfig(num_sessions=n, rate=rate, seed=seed, concurrency=concurrency),
        slo=SLO(),
        label="sim",
        out_dir=Path("unused"),
        progress=False,
        plots=False,
    )


def fleet(replicas: int = 2, router: str = "round_robin", **kw) -> FleetSpec:
    gateway = GatewayConfig(router=router, **kw.pop("gateway", {}))
    return FleetSpec(COSTS, kw.pop("engine", ENGINE), replicas, gateway, **kw)


def run(spec: BenchSpec, fleet_spec: FleetSpec):
    return simulate(spec, fleet_spec, WordTokenizer())


def stable(report: dict) -> str:
    return json.dumps({k: v for k, v in report.items() if k != "created_at"}, sort_keys=True)


def test_event_loop_runs_in_time_then_schedule_order():
    loop, seen = EventLoop(), []
    loop.call_at(2.0, seen.append, "c")
    loop.call_at(1.0, seen.append, "a")
    loop.call_at(1.0, seen.append, "b")
    loop.call_at(0.5, lambda: loop.call_later(0.0, seen.append, "first"))
    loop.run()
    assert seen == ["first", "a", "b", "c"]
    assert loop.now == 2.0


def test_same_seed_gives_the_same_report_and_another_seed_does_not():
    spec = bench(n=80, rate=8.0)
    a = run(spec, fleet(3, "power_of_two")).report
    b = run(spec, fleet(3, "power_of_two")).report
    assert stable(a) == stable(b)
    c = run(bench(n=80, rate=8.0, seed=1), fleet(3, "power_of_two")).report
    assert stable(a) != stable(c)


def test_report_is_strict_json_in_the_bench_schema():
    report = run(bench(n=20), fleet(1)).report
    json.dumps(report, allow_nan=False)
    assert report["schema_version"] == 1
    assert report["summary"]["requests"] == {"sent": 20, "completed": 20, "failed": 0}
    first = report["requests"][0]
    assert first["completion_tokens"] == first["output_len"]  # runs to max_tokens
    assert first["ttft_ms"] > 0 and first["num_chunks"] == first["output_len"]


def test_one_replica_latency_follows_the_cost_model():
    """One request alone: TTFT is its prefill step, TPOT one decode step."""
    spec = bench(n=1, rate=1.0, input_len=64, output_len=8)
    report = run(spec, fleet(1)).report
    r = report["requests"][0]
    prompt = r["prompt_tokens"]
    ttft = 0.02 + 1e-4 * prompt + 1e-3 + 1e-6 * prompt
    assert r["ttft_ms"] == pytest.approx(ttft * 1000)
    # each decode step: one token, one sample, the context so far
    decode = [0.02 + 1e-4 + 1e-3 + 1e-6 * (prompt + k + 1) for k in range(r["output_len"] - 1)]
    assert r["tpot_ms"] == pytest.approx(sum(decode) / len(decode) * 1000)


def test_every_request_ends_exactly_once_under_overload():
    """Far past capacity with a small gateway queue: requests are shed, none is lost."""
    spec = bench(n=300, rate=200.0)
    sim = run(spec, fleet(2, gateway={"max_queue": 8, "max_outstanding_per_replica": 4}))
    summary = sim.report["summary"]
    assert summary["requests"]["sent"] == 300
    assert summary["requests"]["completed"] + summary["requests"]["failed"] == 300
    assert summary["errors"].get("http_429", 0) > 0
    assert all(r.end_s >= r.start_s for r in sim.client.results)
    assert sum(r.outstanding for r in sim.gateway.replicas.values()) == 0
    assert not sim.gateway.dispatcher.queue.items()


def test_a_replica_that_dies_migrates_its_streams_and_nothing_is_lost():
    spec = bench(n=120, rate=20.0, output_len=64)
    sim = run(spec, fleet(3, failures=(Failure(0, at_s=2.0, down_s=3.0),)))
    report = sim.report
    assert report["simulation"]["migrations"] > 0
    assert report["summary"]["requests"] == {"sent": 120, "completed": 120, "failed": 0}
    # a migrated stream still delivers every token it asked for, in order
    for r in sim.client.results:
        assert len(r.chunk_times_s) == r.output_len
        assert r.chunk_times_s == sorted(r.chunk_times_s)
    # the replica came back and took work again
    assert sim.fleet.engines["r0"].core.kv_cache.stats.queries > 0


def test_failure_of_the_only_replica_fails_streams_after_replica_wait():
    spec = bench(n=20, rate=10.0, output_len=64)
    failing = fleet(
        1, failures=(Failure(0, at_s=1.0, down_s=100.0),), gateway={"replica_wait_s": 5.0}
    )
    sim = run(spec, failing)
    s = sim.report["summary"]
    assert s["requests"]["sent"] == 20
    assert s["requests"]["completed"] + s["requests"]["failed"] == 20
    assert s["requests"]["failed"] > 0


def test_prefix_aware_beats_round_robin_on_hit_rate_for_multi_turn():
    spec = bench("multi-turn", n=24, rate=3.0, input_len=48, output_len=24, turns=4)
    rates = {}
    for router in ("round_robin", "prefix_aware"):
        report = run(spec, fleet(3, router)).report
        assert report["summary"]["requests"]["failed"] == 0
        rates[router] = report["simulation"]["prefix_cache"]["hit_rate"]
    assert rates["prefix_aware"] > rates["round_robin"] + 0.1, rates


def test_shared_prefix_hits_the_cache():
    spec = bench("shared-prefix", n=40, rate=5.0, num_groups=2, prefix_len=256)
    report = run(spec, fleet(1)).report
    assert report["simulation"]["prefix_cache"]["hit_rate"] > 0.5


def test_autoscaler_scales_up_under_load_after_a_cold_start():
    spec = bench(n=400, rate=40.0, output_len=64)
    auto = AutoscalingSettings(
        config=AutoscalerConfig(
            min_replicas=1, max_replicas=6, target_concurrency=4, stable_window_s=6.0
        ),
        interval_s=1.0,
    )
    sim = run(spec, fleet(1, autoscaling=auto, cold_start_s=5.0))
    events = sim.report["simulation"]["scale_events"]
    ups = [e for e in events if e["direction"] == "up"]
    assert ups and ups[0]["to"] > 1
    assert sim.report["simulation"]["replicas_started"] > 1
    # the first new replica took its first work only after its cold start
    r1 = sim.fleet.engines["r1"]
    assert r1.core.kv_cache.stats.queries > 0
    assert (
        sim.report["summary"]["requests"]["completed"] + sim.report["summary"]["requests"]["failed"]
        == 400
    )


def test_closed_loop_concurrency_caps_requests_in_flight():
    spec = bench(n=50, rate=math.inf, concurrency=4)
    sim = run(spec, fleet(2, "least_outstanding"))
    results = sim.client.results
    for r in results:
        overlapping = sum(o.start_s <= r.start_s < o.end_s for o in results)
        assert overlapping <= 4


def test_fleet_spec_rejects_a_failure_of_a_replica_it_does_not_have():
    with pytest.raises(ValueError, match="names replica 2"):
        fleet(2, failures=(Failure(2, 1.0, 1.0),))
    with pytest.raises(ValueError, match="REPLICA@AT_S"):
        Failure.parse("nope")
    assert Failure.parse("1@30+10") == Failure(1, 30.0, 10.0)


def test_scale_from_zero_holds_the_first_requests_for_the_cold_start():
    auto = AutoscalingSettings(
        config=AutoscalerConfig(min_replicas=0, max_replicas=2, stable_window_s=6.0),
        interval_s=1.0,
    )
    sim = run(bench(n=10, rate=5.0, output_len=8), fleet(0, autoscaling=auto, cold_start_s=3.0))
    report = sim.report
    assert report["summary"]["requests"]["completed"] == 10
    first = report["requests"][0]
    assert first["ttft_ms"] >= 3000.0  # held at the gateway while the replica loaded
    assert report["simulation"]["scale_events"][0]["reason"] == "activate"


def test_scale_down_past_the_drain_timeout_migrates_streams_whole():
    auto = AutoscalingSettings(
        config=AutoscalerConfig(
            min_replicas=1,
            max_replicas=2,
            target_concurrency=16,
            stable_window_s=2.0,
            scale_down_delay_s=1.0,
        ),
        interval_s=0.5,
    )
    spec = bench(n=40, rate=2.0, output_len=256)
    sim = run(spec, fleet(2, autoscaling=auto, cold_start_s=0.0, drain_timeout_s=0.5))
    report = sim.report
    assert any(e["direction"] == "down" for e in report["simulation"]["scale_events"])
    assert report["simulation"]["migrations"] > 0
    assert report["summary"]["requests"]["completed"] == 40
    # an evicted stream continues elsewhere: every asked token arrives, none twice
    assert all(len(r.chunk_times_s) == r.output_len for r in sim.client.results)


def test_replicas_sharing_fewer_cores_than_they_are_step_slower():
    """Three replicas on two cores: steps stretch while all three compute; with a core
    each (or more), the run is the one without sharing, to the byte."""
    spec = bench(n=60, rate=30.0, output_len=16)
    alone = run(spec, fleet(3)).report
    shared = run(spec, fleet(3, shared_cores=2)).report
    roomy = run(spec, fleet(3, shared_cores=3)).report
    assert stable(roomy) == stable(alone).replace('"shared_cores": null', '"shared_cores": 3')
    assert shared["summary"]["tpot_ms"]["p50"] > alone["summary"]["tpot_ms"]["p50"] * 1.1
    assert shared["summary"]["requests"]["completed"] == 60

"""Many regions in the simulator: the regional policy on simulated gateways, daily traffic,
spot preemptions, outages, cost, and the files that describe them. Virtual time only."""

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
from fleetserve.gateway.config import GatewayConfig
from fleetserve.perf.cost_model import CostModel
from fleetserve.sim.regional_report import PlanSLO, slo_quantile
from fleetserve.sim.regional_spec import (
    TrafficCurve,
    check_prices,
    load_prices,
    load_regions,
    prices_from_mapping,
    regions_from_mapping,
)
from fleetserve.sim.regions import predicted_wait, simulate_regions
from fleetserve.sim.replica import EngineSettings
from fleetserve.sim.simulator import FleetSpec

COSTS = CostModel({"base": 0.02, "tokens": 1e-4, "sampled": 1e-3, "context_tokens": 1e-6})
ENGINE = EngineSettings(num_blocks=1024, block_size=16, vocab_size=4096, max_model_len=2048)
FLEET = FleetSpec(
    COSTS,
    ENGINE,
    1,
    GatewayConfig(router="least_outstanding", max_outstanding_per_replica=4),
    cold_start_s=1.0,
)
PRICES = prices_from_mapping(
    {
        name: {
            "on_demand_per_h": 4.0,
            "spot_per_h": 1.5,
            "spot_preemptions_per_h": 2.0,
            "spot_restart_s": 2.0,
        }
        for name in ("a", "b", "c")
    }
)


def bench(seed: int = 0, output_len: int = 16) -> BenchSpec:
    return BenchSpec(
        target=TargetConfig("http://simulated", "m"),
        workload=WorkloadConfig(
            "random", LengthSpec(64, range_ratio=0.5), LengthSpec(output_len, range_ratio=0.5)
        ),
        load=LoadConfig(num_sessions=1, rate=1.0, seed=seed),
        slo=SLO(),
        label="regions",
        out_dir=Path("unused"),
        progress=False,
        plots=False,
    )


def world(**overrides) -> dict:
    """Three regions eight hours apart; a day of 96 simulated seconds (4 s an hour)."""
    data = {
        "day_s": 96,
        "hours": 24,
        "policy": "spill",
        "rtt_ms": {"a": {"b": 80, "c": 150}, "b": {"c": 100}},
        "regions": [
            {"name": "a", "utc_offset_h": 0, "traffic": {"peak_rps": 6}, "replicas": 2},
            {"name": "b", "utc_offset_h": 8, "traffic": {"peak_rps": 6}, "replicas": 2},
            {"name": "c", "utc_offset_h": -8, "traffic": {"peak_rps": 6}, "replicas": 2},
        ],
    }
    data.update(overrides)
    return data


def run(data: dict, seed: int = 0, prices=PRICES, slo=None):
    return simulate_regions(
        regions_from_mapping(data), bench(seed), FLEET, WordTokenizer(), prices, slo
    )


def stable(report: dict) -> str:
    return json.dumps({k: v for k, v in report.items() if k != "created_at"}, sort_keys=True)


def user_results(sim, region: str):
    return sim.world.regions[region].client.results


# ---- traffic and files -------------------------------------------------------------------


def test_traffic_curve_peaks_at_its_local_hour_and_bottoms_twelve_hours_later():
    curve = TrafficCurve(peak_rps=8.0, peak_factor=4.0, peak_hour=14.0)
    assert curve.rate(14.0) == pytest.approx(8.0)
    assert curve.rate(2.0) == pytest.approx(2.0)
    assert curve.rate(10.0) == pytest.approx(curve.rate(18.0))
    spec = regions_from_mapping(world())
    a, b = spec.region("a"), spec.region("b")
    # b is eight hours ahead: its users' afternoon peak is at 06:00 UTC
    assert b.rate_at(6.0) == pytest.approx(6.0)
    assert a.rate_at(14.0) == pytest.approx(6.0)
    assert spec.rtt("b", "a") == pytest.approx(0.08)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"regions": []}, "non-empty list"),
        ({"polcy": "spill"}, "unknown keys"),
        ({"policy": "nearest"}, "unknown regional policy"),
        ({"rtt_ms": {"a": {"z": 10}}}, "unknown region 'z'"),
        ({"rtt_ms": {"a": {"b": -1}}}, "rtt_ms a-b"),
        ({"outages": [{"region": "a", "at_h": 1}]}, "needs region, at_h and for_h"),
        ({"outages": [{"region": "q", "at_h": 1, "for_h": 1}]}, "unknown region 'q'"),
        ({"day_s": 0}, "day_s"),
        ({"regional": {"max_spill_fraction": 2}}, "max_spill_fraction"),
    ],
)
def test_bad_regions_files_get_errors_that_name_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        regions_from_mapping(world(**change))


@pytest.mark.parametrize(
    "region, message",
    [
        ({"name": "a", "replicas": [1, 2]}, "integer or a list of 24"),
        ({"name": "a", "replicas": -1}, "integers >= 0"),
        ({"name": "a", "spot_fraction": 1.5}, "spot_fraction"),
        ({"name": "a", "utc_offset_h": 30}, "utc_offset_h"),
        ({"name": "a", "traffic": {"peak_rps": "lots"}}, "peak_rps must be a number"),
        ({"name": "a", "traffic": {"hourly": [1, 2]}}, "24 rates"),
        ({"name": "a", "replica": 2}, "unknown keys"),
        ({"utc_offset_h": 0}, "needs a name"),
    ],
)
def test_bad_region_entries_get_errors_that_name_the_problem(region, message):
    with pytest.raises(ValueError, match=message):
        regions_from_mapping(world(regions=[region], rtt_ms={}))


def test_files_load_from_yaml_and_json_and_bad_prices_are_named(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(world()))
    (tmp_path / "r.yaml").write_text("regions: [{name: a}]\nday_s: 48\n")
    assert len(load_regions(tmp_path / "r.json").regions) == 3
    assert load_regions(tmp_path / "r.yaml").day_s == 48
    (tmp_path / "bad.yaml").write_text("regions: [a, b\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_regions(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="cannot read regions file"):
        load_regions(tmp_path / "missing.yaml")
    (tmp_path / "p.yaml").write_text("a: {spot_per_h: 1.0}\n")
    with pytest.raises(ValueError, match="a needs on_demand_per_h"):
        load_prices(tmp_path / "p.yaml")
    (tmp_path / "p.yaml").write_text("a: {on_demand_per_h: -2}\n")
    with pytest.raises(ValueError, match="on_demand_per_h must be within"):
        load_prices(tmp_path / "p.yaml")
    spec = regions_from_mapping(world())
    with pytest.raises(ValueError, match="no price for region 'b'"):
        check_prices(spec, prices_from_mapping({"a": {"on_demand_per_h": 1.0}}))
    spot = regions_from_mapping(world(regions=[{"name": "a", "spot_fraction": 0.5}], rtt_ms={}))
    with pytest.raises(ValueError, match="has no spot_per_h"):
        check_prices(spot, prices_from_mapping({"a": {"on_demand_per_h": 1.0}}))


# ---- runs ----------------------------------------------------------------------------------


def test_a_regional_run_is_deterministic_and_seeded():
    data = world(hours=6)
    data["regions"][0]["spot_fraction"] = 0.5
    a = run(data).report
    b = run(data).report
    assert stable(a) == stable(b)
    assert stable(a) != stable(run(data, seed=1).report)
    json.dumps(a, allow_nan=False)


def test_every_request_ends_once_through_an_outage_and_spot_preemptions():
    data = world(hours=8, outages=[{"region": "b", "at_h": 2, "for_h": 2}])
    for region in data["regions"]:
        region["spot_fraction"] = 0.5
    sim = run(data)
    report = sim.report
    requests = report["summary"]["requests"]
    assert requests["sent"] > 300
    assert requests["completed"] + requests["failed"] == requests["sent"]
    assert sum(r["preemptions"] for r in report["regions"]["by_region"].values()) > 0
    for region in sim.world.regions.values():
        assert region.client.in_flight == 0
        for r in region.client.results:
            assert r.end_s >= r.start_s
            if r.ok:
                assert len(r.chunk_times_s) == r.output_len  # migrations lose no token
        gateway = region.gateway
        assert sum(x.outstanding for x in gateway.replicas.values()) == 0
        assert not gateway.dispatcher.queue.items()
    # b's users are served elsewhere while b is dark (4 s an hour: dark from 8 s to 16 s)
    during = [r for r in user_results(sim, "b") if 8.0 <= r.start_s < 16.0]
    assert during and all(r.ok for r in during)
    served_by = {(x["region"], x["served_by"]) for x in report["requests"]}
    assert ("b", "a") in served_by or ("b", "c") in served_by
    assert report["regions"]["by_region"]["b"]["decisions"]["failover"] == len(during)


def test_local_only_refuses_a_dark_regions_users():
    data = world(hours=6, policy="local", outages=[{"region": "b", "at_h": 2, "for_h": 2}])
    sim = run(data)
    during = [r for r in user_results(sim, "b") if 8.0 <= r.start_s < 16.0]
    assert during and all(r.error == "http_503" for r in during)
    assert sim.report["regions"]["by_region"]["b"]["spilled_out"] == 0


def burst_world(policy: str) -> dict:
    """Region a's users burst to 3x what its two replicas serve for two hours; b and c
    are in their night."""
    hourly = [2.0] * 24
    hourly[1] = hourly[2] = 24.0
    data = world(hours=4, policy=policy)
    data["regions"][0]["traffic"] = {"hourly": hourly}
    for region in data["regions"][1:]:
        region["traffic"] = {"hourly": [2.0] * 24}
    return data


def test_spill_beats_local_on_ttft_p99_under_a_regional_burst():
    local = run(burst_world("local"))
    spill = run(burst_world("spill"))
    p99 = {}
    for name, sim in (("local", local), ("spill", spill)):
        p99[name] = slo_quantile(user_results(sim, "a"), "ttft_s", 0.99)
    assert p99["spill"] < 0.5 * p99["local"], p99
    by_region = spill.report["regions"]["by_region"]
    assert by_region["a"]["spilled_out"] > 0
    assert (
        by_region["b"]["spilled_in"] + by_region["c"]["spilled_in"] == by_region["a"]["spilled_out"]
    )
    # a spilled request pays the round trip: nothing spilled to b answers faster than 80 ms
    spilled = [x for x in spill.report["requests"] if x["region"] == "a" and x["served_by"] == "b"]
    assert spilled and min(x["ttft_ms"] for x in spilled) >= 80.0


def test_cost_follows_replica_hours_and_spot_prices():
    data = world(hours=6)
    data["regions"][0]["spot_fraction"] = 1.0
    prices = prices_from_mapping(
        {
            "a": {"on_demand_per_h": 4.0, "spot_per_h": 1.0},
            "b": {"on_demand_per_h": 4.0},
            "c": {"on_demand_per_h": 2.0},
        }
    )
    by_region = run(data, prices=prices).report["regions"]["by_region"]
    # two replicas for six hours of the day each
    assert by_region["a"]["replica_hours"]["spot"] == pytest.approx(12.0, rel=0.05)
    assert by_region["a"]["cost_usd"] == pytest.approx(12.0, rel=0.05)
    assert by_region["b"]["cost_usd"] == pytest.approx(48.0, rel=0.05)
    assert by_region["c"]["cost_usd"] == pytest.approx(24.0, rel=0.05)
    c = by_region["c"]
    assert c["usd_per_million_output_tokens"] == pytest.approx(
        c["cost_usd"] / c["served_output_tokens"] * 1e6
    )


def test_hourly_sizes_follow_the_schedule_with_a_cold_start_ahead():
    sizes = [1] * 24
    sizes[2] = 3
    one = {"name": "a", "traffic": {"peak_rps": 1}, "replicas": sizes}
    data = world(hours=4, regions=[one], rtt_ms={})
    sim = run(data, prices=None)
    timeline = sim.world.regions["a"].stats.timeline

    def up_at(when: float) -> int:
        return [up for t, up, _ in timeline if t <= when][-1]

    assert up_at(4.5) == 1  # hour 1
    assert up_at(6.5) == 1
    assert up_at(7.5) == 3  # ordered a cold start (1 s) before hour 2 (4 s an hour) begins
    assert up_at(11.5) == 3
    assert up_at(12.5) == 1  # hour 3: drained


def test_predicted_wait_is_zero_with_a_free_slot_and_grows_with_the_queue():
    sim = run(world(hours=1), prices=None)
    dispatcher = sim.world.regions["a"].gateway.dispatcher
    now = sim.world.loop.now
    slots = dispatcher.router.total_slots(dispatcher.views(now))
    assert predicted_wait(dispatcher, now) == 0.0
    # requests on their way here take the free slots first
    assert predicted_wait(dispatcher, now, arriving=slots - 1) == 0.0
    assert predicted_wait(dispatcher, now, arriving=slots) > 0.0
    for replica in dispatcher.replicas.values():
        replica.outstanding = dispatcher.router.max_outstanding
    full = predicted_wait(dispatcher, sim.world.loop.now)
    assert 0 < full < math.inf


def test_plan_slo_counts_failed_requests_as_never_answered():
    sim = run(world(hours=2, policy="local", outages=[{"region": "a", "at_h": 0, "for_h": 1}]))
    results = user_results(sim, "a")
    assert any(not r.ok for r in results)
    assert slo_quantile(results, "ttft_s", 0.99) == math.inf
    slo = PlanSLO((("ttft_s", 0.5, 10.0),))
    report = run(world(hours=2), slo=slo).report
    assert all(r["meets_slo"] for r in report["regions"]["by_region"].values())


def test_an_autoscaled_region_grows_under_its_peak():
    hourly = [1.0] * 24
    hourly[2] = 12.0
    region = {
        "name": "a",
        "traffic": {"hourly": hourly},
        "autoscale": {"min": 1, "max": 4, "target_concurrency": 2},
    }
    sim = run(world(hours=4, regions=[region], rtt_ms={}), prices=None)
    ups = [e for e in sim.world.regions["a"].fleet.scale_events if e["direction"] == "up"]
    assert ups and max(e["to"] for e in ups) > 1
    requests = sim.report["summary"]["requests"]
    assert requests["completed"] == requests["sent"]

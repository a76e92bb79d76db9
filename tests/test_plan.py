"""`fleetserve plan` on a tiny world: a plan it prints meets the SLOs when simulated, and the
same plan one replica smaller does not. Virtual time, a tiny cost model."""

from __future__ import annotations

import json

import pytest
import yaml

from fleetserve.bench.result import RequestResult
from fleetserve.cli import main
from fleetserve.perf.cost_model import CostModel
from fleetserve.sim.regional_report import PlanSLO, meets_slo

COSTS = CostModel(
    {"base": 0.02, "tokens": 1e-4, "sampled": 1e-3, "context_tokens": 1e-6},
    meta={"engine": {"num_blocks": 1024, "block_size": 16, "max_model_len": 2048}},
)
REGIONS = {
    "day_s": 48,  # 2 simulated seconds an hour
    "policy": "spill",
    "rtt_ms": {"east": {"west": 90}},
    "regions": [
        {"name": "east", "utc_offset_h": 0, "traffic": {"peak_rps": 20, "peak_factor": 4}},
        {"name": "west", "utc_offset_h": -8, "traffic": {"peak_rps": 14, "peak_factor": 4}},
    ],
}
PRICES = {"east": {"on_demand_per_h": 3.0}, "west": {"on_demand_per_h": 2.0}}


def files(tmp_path, regions=REGIONS, prices=PRICES):
    COSTS.save(tmp_path / "costs.json")
    (tmp_path / "regions.yaml").write_text(yaml.safe_dump(regions))
    (tmp_path / "prices.json").write_text(json.dumps(prices))
    return [
        *["--cost-model", str(tmp_path / "costs.json")],
        *["--regions", str(tmp_path / "regions.yaml")],
        *["--prices", str(tmp_path / "prices.json")],
        *["--input-len", "64", "--output-len", "16", "--range-ratio", "0.5"],
        *["--max-outstanding-per-replica", "4", "--cold-start", "0.5", "--window", "8"],
        *["--out", str(tmp_path / "out"), "--no-progress"],
    ]


def test_the_printed_plan_meets_the_slo_and_one_size_smaller_does_not(tmp_path, capsys):
    argv = ["plan", *files(tmp_path), "--ttft-p99", "250", "--tpot-p50", "60"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "cheapest plan meeting the SLOs" in out and "per million output tokens" in out
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert (tmp_path / "out" / "plan.png").exists()
    best = plan["best"]
    assert best["meets_slo"]
    assert all(r["meets_slo"] for r in best["by_region"].values())
    assert all(r["ttft_p99_all_ms"] <= 250 for r in best["by_region"].values())
    assert best["usd_per_million_output_tokens"] > 0
    # it is the cheapest of the plans that meet the SLOs, and they are all listed
    meeting = [c for c in plan["candidates"] if c["meets_slo"]]
    assert best["cost_usd"] == min(c["cost_usd"] for c in meeting)
    assert {c["name"] for c in plan["candidates"]} >= {"hourly", "flat"}
    # the daily curve shows in the plan: more replicas at a region's peak than in its night
    east = best["sizes"]["east"]
    assert max(east) > min(east)
    smaller = plan["smaller"]
    assert smaller is not None and not smaller["meets_slo"]
    assert sum(map(sum, smaller["sizes"].values())) < sum(map(sum, best["sizes"].values()))


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "name at least one SLO"),
        (["--ttft-p99", "0"], "--ttft-p99 must be > 0 ms"),
    ],
)
def test_plan_without_a_valid_slo_is_a_usage_error(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(["plan", *files(tmp_path), *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_plan_with_a_region_missing_from_the_prices_is_a_usage_error(tmp_path, capsys):
    argv = ["plan", *files(tmp_path, prices={"east": {"on_demand_per_h": 1.0}})]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--ttft-p99", "250"])
    assert exc.value.code == 2
    assert "no price for region 'west'" in capsys.readouterr().err


def test_simulate_with_regions_writes_per_region_results(tmp_path, capsys):
    regions = dict(REGIONS, hours=6, outages=[{"region": "west", "at_h": 2, "for_h": 1}])
    argv = ["simulate", *files(tmp_path, regions=regions)]
    argv = [a for a in argv if a != "--window" and a != "8"]
    assert main([*argv, "--no-plots", "--regional-policy", "least_load"]) == 0
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    regions_out = report["regions"]
    assert regions_out["policy"] == "least_load"
    west = regions_out["by_region"]["west"]
    assert west["decisions"]["failover"] > 0
    assert regions_out["total"]["cost_usd"] > 0
    assert "spilled out / in" in (tmp_path / "out" / "regions.md").read_text()
    assert "least_load" in capsys.readouterr().out


def test_simulate_prices_without_regions_is_a_usage_error(tmp_path, capsys):
    COSTS.save(tmp_path / "costs.json")
    (tmp_path / "p.yaml").write_text("a: {on_demand_per_h: 1}\n")
    argv = ["simulate", "--cost-model", str(tmp_path / "costs.json"), "--prices"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, str(tmp_path / "p.yaml")])
    assert exc.value.code == 2
    assert "need --regions" in capsys.readouterr().err


def test_a_window_without_requests_meets_the_slos_and_one_late_request_does_not():
    """A region with no users (or a sizing window no request fell in) misses no objective:
    it counted as infinitely late, so a region without traffic forced repairs and a plan
    could end with none."""
    slo = PlanSLO(objectives=(("ttft_s", 0.99, 0.5),))
    assert meets_slo([], slo)
    late = RequestResult(index=0, session=0, turn=0, input_len=8, output_len=4, scheduled_s=0.0)
    late.start_s, late.end_s, late.chunk_times_s = 0.0, 2.0, [1.0, 2.0]
    late.prompt_tokens, late.completion_tokens = 8, 2
    assert not meets_slo([late], slo)

"""A simulated day of three regions eight time zones apart: the regional policies side by
side, and the capacity planner's plan checked in simulation.

    .venv/bin/python benchmarks/regions.py            # about 6 minutes on 2 busy cores
    .venv/bin/python benchmarks/regions.py --day-s 240 --peak-rps 4   # a quick look

The world: us-west (UTC-8), eu-west (UTC+0) and ap-southeast (UTC+8), round trips of
140/160/170 ms, each region's users on a day/night curve (peak `--peak-rps` at 14:00 local,
a quarter of it at 02:00), half of every fleet bought as spot (preempted 0.2 times an hour,
back 20 s later). The day is compressed: `--day-s` simulated seconds stand for 24 hours
(default 720: 30 s an hour), and the rates are those of a small fleet (requests per
simulated second), because the simulator runs some hundreds of requests a wall second:
a real day at real rates would take hours. Prices are per hour of the day, so the $ are
those of a day of this (small) fleet. The replicas are a synthetic cost model (not a
measured one): 30 ms a step, 0.2 ms a token, 0.5 ms a sampled sequence, 0.1 us a
context token (at TTFT p99 <= 500 ms a replica serves about 2.7 requests/s of this
workload: the plan needs 3 for 8 requests/s).

1. policies: the same fixed fleet (`--replicas` per region all day) under `local`,
   `least_load` and `spill`: TTFT p99 of each region's users, requests spilled, cost; then
   `local` and `spill` again with eu-west dark from 12:00 to 13:00 UTC.
2. plan: `fleetserve plan`'s search for TTFT p99 <= `--ttft-p99` ms and TPOT p50 <=
   `--tpot-p50` ms; its plan simulated over the day (meets the SLOs), and the same plan one
   replica smaller at every hour (does not).

Results also go to benchmarks/out/regions.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleetserve.bench.config import (  # noqa: E402
    SLO,
    BenchSpec,
    LengthSpec,
    LoadConfig,
    TargetConfig,
    WorkloadConfig,
)
from fleetserve.bench.tokenizer import WordTokenizer  # noqa: E402
from fleetserve.gateway.config import GatewayConfig  # noqa: E402
from fleetserve.perf.cost_model import CostModel  # noqa: E402
from fleetserve.plan.search import Planner  # noqa: E402
from fleetserve.sim.regional_report import PlanSLO  # noqa: E402
from fleetserve.sim.regional_spec import prices_from_mapping, regions_from_mapping  # noqa: E402
from fleetserve.sim.regions import simulate_regions  # noqa: E402
from fleetserve.sim.replica import EngineSettings  # noqa: E402
from fleetserve.sim.simulator import FleetSpec  # noqa: E402

COSTS = CostModel({"base": 0.03, "tokens": 2e-4, "sampled": 5e-4, "context_tokens": 1e-7})
ENGINE = EngineSettings(num_blocks=4096, block_size=16, vocab_size=32000, max_model_len=4096)
PRICES = {
    "us-west": {"on_demand_per_h": 4.0, "spot_per_h": 1.6},
    "eu-west": {"on_demand_per_h": 4.4, "spot_per_h": 1.8},
    "ap-southeast": {"on_demand_per_h": 5.0, "spot_per_h": 2.0},
}


def world(args, policy: str, replicas: int, outage: bool = False) -> dict:
    regions = [
        {
            "name": name,
            "utc_offset_h": offset,
            "traffic": {"peak_rps": args.peak_rps, "peak_factor": 4, "peak_hour": 14},
            "replicas": replicas,
            "spot_fraction": 0.5,
        }
        for name, offset in (("us-west", -8), ("eu-west", 0), ("ap-southeast", 8))
    ]
    return {
        "day_s": args.day_s,
        "policy": policy,
        "rtt_ms": {
            "us-west": {"eu-west": 140, "ap-southeast": 170},
            "eu-west": {"ap-southeast": 160},
        },
        "regions": regions,
        "outages": [{"region": "eu-west", "at_h": 12, "for_h": 1}] if outage else [],
    }


def prices():
    return prices_from_mapping(
        {
            name: {**p, "spot_preemptions_per_h": 0.2, "spot_restart_s": 20.0}
            for name, p in PRICES.items()
        }
    )


def bench(args) -> BenchSpec:
    return BenchSpec(
        target=TargetConfig("http://simulated", "m"),
        workload=WorkloadConfig(
            "random",
            LengthSpec(args.input_len, range_ratio=0.5),
            LengthSpec(args.output_len, range_ratio=0.5),
        ),
        load=LoadConfig(num_sessions=1, rate=1.0, seed=args.seed),
        slo=SLO(),
        label="regions",
        out_dir=Path("unused"),
        progress=False,
        plots=False,
    )


def fleet(args) -> FleetSpec:
    gateway = GatewayConfig(router="least_outstanding", max_outstanding_per_replica=16)
    return FleetSpec(COSTS, ENGINE, 1, gateway, cold_start_s=args.cold_start)


def row(label: str, report: dict, wall: float) -> dict:
    regions = report["regions"]
    by_region = regions["by_region"]
    return {
        "run": label,
        "wall_s": round(wall, 1),
        "requests": report["summary"]["requests"],
        "ttft_p99_ms": {n: r["ttft_ms"]["p99"] for n, r in by_region.items()},
        "ttft_p99_all_ms": {n: r["ttft_p99_all_ms"] for n, r in by_region.items()},
        "failed": {n: r["requests"]["failed"] for n, r in by_region.items()},
        "spilled_out": {n: r["spilled_out"] for n, r in by_region.items()},
        "preemptions": sum(r["preemptions"] for r in by_region.values()),
        "cost_usd": regions["total"]["cost_usd"],
        "usd_per_million_output_tokens": regions["total"]["usd_per_million_output_tokens"],
        "ttft_p99_overall_ms": report["summary"]["ttft_ms"]["p99"],
    }


def print_rows(rows: list[dict]) -> None:
    names = list(rows[0]["ttft_p99_ms"])
    head = ["run", *(f"{n} p99" for n in names), "failed", "spilled", "$/day", "$/M tok"]
    print(" | ".join(head))
    for r in rows:
        cells = [r["run"]]
        cells += [f"{r['ttft_p99_ms'][n]:.0f}" if r["ttft_p99_ms"][n] else "-" for n in names]
        cells += [str(sum(r["failed"].values())), str(sum(r["spilled_out"].values()))]
        cells += [f"{r['cost_usd']:.2f}", f"{r['usd_per_million_output_tokens']:.0f}"]
        print(" | ".join(cells))


def policies(args) -> list[dict]:
    rows = []
    cases = [(p, False) for p in ("local", "least_load", "spill")]
    cases += [("local", True), ("spill", True)]
    for policy, outage in cases:
        spec = regions_from_mapping(world(args, policy, args.replicas, outage))
        start = time.perf_counter()
        run = simulate_regions(spec, bench(args), fleet(args), WordTokenizer(), prices())
        wall = time.perf_counter() - start
        label = policy + (" + eu-west dark 12-13h" if outage else "")
        rows.append(row(label, run.report, wall))
        print(f"  {label}: {wall:.0f} s wall", flush=True)
    return rows


def plan(args) -> dict:
    spec = regions_from_mapping(world(args, "spill", 1))
    slo = PlanSLO((("ttft_s", 0.99, args.ttft_p99 / 1000), ("tpot_s", 0.5, args.tpot_p50 / 1000)))
    planner = Planner(
        spec,
        prices(),
        bench(args),
        fleet(args),
        WordTokenizer(),
        slo,
        window_s=args.window,
        on_progress=lambda what: print(f"  {what}", flush=True),
    )
    result = planner.plan()
    return {
        "slo": slo.describe(),
        "wall_s": round(result.wall_s, 1),
        "windows_run": result.windows_run,
        "best": result.best.record() if result.best else None,
        "candidates": [dataclasses.asdict(c) | {"by_region": None} for c in result.candidates],
        "smaller": result.smaller.record() if result.smaller else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--day-s", type=float, default=720.0, help="simulated seconds for 24 h")
    p.add_argument("--peak-rps", type=float, default=8.0, help="each region's peak, req/s")
    p.add_argument("--replicas", type=int, default=2, help="per region, for the policies")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--cold-start", type=float, default=10.0)
    p.add_argument("--ttft-p99", type=float, default=500.0, help="ms, for the plan")
    p.add_argument("--tpot-p50", type=float, default=60.0, help="ms, for the plan")
    p.add_argument("--window", type=float, default=30.0, help="sizing window, simulated s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the JSON file's name")
    p.add_argument("--skip-plan", action="store_true")
    p.add_argument("--skip-policies", action="store_true")
    args = p.parse_args()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"load before: {load}")
    result = {"args": vars(args), "load_before": load}
    if not args.skip_policies:
        print("policies (same fleet):", flush=True)
        result["policies"] = rows = policies(args)
        print_rows(rows)
    if not args.skip_plan:
        print("plan:", flush=True)
        result["plan"] = planned = plan(args)
        for c in planned["candidates"]:
            print(
                f"  {c['name']}: meets {c['meets']}, ${c['cost_usd']:.2f}/day, "
                f"${c['usd_per_million_output_tokens'] or 0:.0f}/M tok, "
                f"{c['replica_hours']:.1f} replica-h"
            )
        if planned["smaller"]:
            s = planned["smaller"]
            worst = max(r["ttft_p99_all_ms"] or float("inf") for r in s["by_region"].values())
            print(f"  one size smaller: meets {s['meets_slo']}, worst TTFT p99 {worst:.0f} ms")
        print(f"  planner: {planned['windows_run']} windows, {planned['wall_s']} s wall")
    result["load_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout
    out = ROOT / "benchmarks" / "out"
    os.makedirs(out, exist_ok=True)
    (out / f"regions{args.tag}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {out / f'regions{args.tag}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

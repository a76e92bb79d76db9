"""How fast the simulator runs: simulated requests per wall-second on one core, for fleets
of 1, 100 and 1,000 replicas, and where the time goes.

    flock /tmp/fleetserve-bench.lock python benchmarks/sim_speed.py \\
        --cost-model bench-out/smollm2.json [--replicas 1,100,1000] [--profile 1000]

Each fleet gets Poisson arrivals of random 128-token prompts and 64-token answers at
`--load` (default half) of the rate one replica sustains, times the replica count, with the
prefix-aware router; `--requests` requests per run (at least `--per-replica` per replica,
so that a big fleet reaches its steady state instead of timing its first requests),
`--repeats` runs, median and spread.
The ratio printed is against Vidur's 12-24k simulated requests per minute per core measured
on this kind of machine (the upper end, 400 requests/s).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import statistics
import sys
import time
from pathlib import Path

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
from fleetserve.sim.replica import EngineSettings
from fleetserve.sim.simulator import FleetSpec, simulate

VIDUR_REQUESTS_PER_S = 24_000 / 60


def spec(num_requests: int, rate: float, seed: int) -> BenchSpec:
    return BenchSpec(
        target=TargetConfig("http://simulated", "m"),
        workload=WorkloadConfig("random", LengthSpec(128), LengthSpec(64)),
        load=LoadConfig(num_sessions=num_requests, rate=rate, seed=seed),
        slo=SLO(),
        label="speed",
        out_dir=Path("unused"),
        progress=False,
        plots=False,
    )


def one_run(cost_model: CostModel, replicas: int, rate: float, n: int, seed: int):
    fleet = FleetSpec(
        cost_model,
        EngineSettings.from_cost_model(cost_model),
        replicas,
        GatewayConfig(router="prefix_aware"),
    )
    start = time.perf_counter()
    sim = simulate(spec(n, rate, seed), fleet, WordTokenizer())
    return time.perf_counter() - start, sim


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cost-model", type=Path, required=True)
    parser.add_argument("--replicas", default="1,100,1000")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument(
        "--per-replica", type=int, default=10, help="requests per replica, at least"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load", type=float, default=0.5, help="of one replica's capacity")
    parser.add_argument("--profile", type=int, help="cProfile one run of this fleet size")
    args = parser.parse_args()
    cost_model = CostModel.load(args.cost_model)
    # One replica's sustained rate: a closed loop of 32 (virtual time, so not timed).
    probe = dataclasses.replace(
        spec(64, float("inf"), 0), load=LoadConfig(num_sessions=64, concurrency=32)
    )
    fleet = FleetSpec(cost_model, EngineSettings.from_cost_model(cost_model), 1)
    capacity = simulate(probe, fleet, WordTokenizer()).report["summary"]["request_throughput"]
    print(f"one replica sustains {capacity:.2f} requests/s (simulated)")
    print("| replicas | requests | virtual s | wall s (median) | requests/s (median, min-max) |")
    print("|---|---|---|---|---|")
    for replicas in [int(r) for r in args.replicas.split(",")]:
        rate = args.load * capacity * replicas
        n = max(args.requests, args.per_replica * replicas)
        walls, virtual = [], 0.0
        for seed in range(args.repeats):
            wall, sim = one_run(cost_model, replicas, rate, n, seed)
            walls.append(wall)
            virtual = sim.report["summary"]["duration_s"]
        speeds = sorted(n / w for w in walls)
        median = statistics.median(speeds)
        print(
            f"| {replicas} | {n} | {virtual:.1f} | {statistics.median(walls):.1f} | "
            f"{median:.0f} ({speeds[0]:.0f}-{speeds[-1]:.0f}), "
            f"{median / VIDUR_REQUESTS_PER_S:.2f}x Vidur |",
            flush=True,
        )
    if args.profile:
        rate = args.load * capacity * args.profile
        profiler = cProfile.Profile()
        profiler.enable()
        one_run(
            cost_model, args.profile, rate, max(args.requests, args.per_replica * args.profile), 0
        )
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`fleetserve simulate`: a `fleetserve bench` run against a simulated fleet.

    fleetserve simulate --cost-model costs.json --replicas 3 --router prefix_aware \\
        --workload multi-turn --num-conversations 40 --rate 2 --seed 0 --out bench-out/sim

Takes every workload and load flag of `fleetserve bench` (same flags and seed, same
requests) and writes the same files (bench.json, summary.md, plots), so that `fleetserve
bench compare` puts a simulated run beside a real one. `--url` and `--model` only label the
report. Each replica runs fleetserve's scheduler and KV-cache manager with the step times of
`--cost-model` (`fleetserve profile`); the gateway's router, queue and admission are the
real ones. Every request runs to its max_tokens (as with --ignore-eos).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    from fleetserve.bench.cli import _add_run_arguments
    from fleetserve.sim import regional_cli

    parser = subparsers.add_parser(
        "simulate",
        help="run a bench workload against a simulated fleet (virtual time, cost model)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_arguments(parser)
    parser.set_defaults(url="http://simulated", model="simulated")
    fleet = parser.add_argument_group("simulated fleet")
    fleet.add_argument(
        "--cost-model", type=Path, required=True, help="JSON from fleetserve profile"
    )
    fleet.add_argument("--replicas", type=int, default=1, help="replicas at the start")
    fleet.add_argument("--router", default="prefix_aware", help="routing policy of the gateway")
    fleet.add_argument("--max-outstanding-per-replica", type=int, default=64)
    fleet.add_argument("--max-queue", type=int, default=1024, help="gateway queue bound")
    fleet.add_argument(
        "--fail",
        action="append",
        default=[],
        metavar="R@T+D",
        help="replica R dies at T s and is back D s later (repeatable), e.g. 0@30+10",
    )
    fleet.add_argument("--min-replicas", type=int, help="turns the autoscaler on")
    fleet.add_argument("--max-replicas", type=int, help="turns the autoscaler on")
    fleet.add_argument("--target-concurrency", type=float, help="autoscaler target per replica")
    fleet.add_argument("--cold-start", type=float, default=30.0, help="seconds to a ready replica")
    fleet.add_argument(
        "--shared-cores",
        type=float,
        help="the replicas share this many CPU cores (e.g. 3 replicas on one 2-core machine): "
        "steps slow down while more replicas step than there are cores",
    )
    engine = parser.add_argument_group("engine (default: the cost model's profile)")
    engine.add_argument("--num-blocks", type=int, help="KV blocks per replica")
    engine.add_argument("--max-num-seqs", type=int)
    engine.add_argument("--max-num-batched-tokens", type=int)
    engine.add_argument("--max-model-len", type=int)
    regional_cli.add_arguments(parser)

    def main(args: argparse.Namespace) -> int:
        try:
            bench, fleet_spec, text_source = build_specs(args)
            regional = regional_cli.load_regional(args)
        except (ValueError, OSError) as exc:
            parser.error(str(exc))
        if regional is not None:
            return regional_cli.run_regional(regional, bench, fleet_spec, text_source)
        return run(bench, fleet_spec, text_source)

    parser.set_defaults(func=main)


def build_specs(args: argparse.Namespace):
    import dataclasses
    from datetime import datetime

    from fleetserve.bench.cli import build_spec
    from fleetserve.fleet.autoscaler import AutoscalerConfig
    from fleetserve.fleet.scaling import AutoscalingSettings
    from fleetserve.gateway.config import GatewayConfig
    from fleetserve.perf.cost_model import CostModel
    from fleetserve.sim.fleet import Failure
    from fleetserve.sim.replica import EngineSettings
    from fleetserve.sim.simulator import FleetSpec

    if args.label is None:
        args.label = f"sim-{args.replicas}x-{args.router}"
    if args.out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = Path("bench-out") / f"{args.label}-{stamp}"
    bench, text_source = build_spec(args)
    cost_model = CostModel.load(args.cost_model)
    engine = EngineSettings.from_cost_model(
        cost_model,
        num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
    )
    autoscaling = None
    if args.min_replicas is not None or args.max_replicas is not None:
        knobs = {
            "min_replicas": args.min_replicas if args.min_replicas is not None else 1,
            "max_replicas": args.max_replicas or max(args.replicas, args.min_replicas or 1),
        }
        if args.target_concurrency is not None:
            knobs["target_concurrency"] = args.target_concurrency
        autoscaling = AutoscalingSettings(
            config=dataclasses.replace(AutoscalerConfig(), **knobs),
            cold_start_estimate_s=args.cold_start,
        )
    fleet_spec = FleetSpec(
        cost_model=cost_model,
        engine=engine,
        num_replicas=args.replicas,
        gateway=GatewayConfig(
            router=args.router,
            seed=args.seed,
            max_outstanding_per_replica=args.max_outstanding_per_replica,
            max_queue=args.max_queue,
        ),
        failures=tuple(Failure.parse(f) for f in args.fail),
        autoscaling=autoscaling,
        cold_start_s=args.cold_start,
        shared_cores=args.shared_cores,
    )
    return bench, fleet_spec, text_source


def run(bench, fleet_spec, text_source) -> int:
    from fleetserve.bench.plots import write_plots
    from fleetserve.bench.report import summary_table, write_report
    from fleetserve.sim.simulator import simulate

    start = time.perf_counter()
    sim = simulate(bench, fleet_spec, text_source)
    wall = time.perf_counter() - start
    report = sim.report
    files = write_report(report, bench.out_dir)
    if bench.plots:
        files += write_plots(report, bench.out_dir)
    s = report["simulation"]
    requests = report["summary"]["requests"]["sent"]
    print(f"\nfleetserve simulate: {bench.label}, {bench.workload.kind}\n")
    print(summary_table(report))
    hit_rate = s["prefix_cache"]["hit_rate"]
    print(
        f"\nprefix-cache hit rate {hit_rate if hit_rate is None else f'{hit_rate:.1%}'}, "
        f"{s['migrations']} migrations, {s['preemptions']} preemptions, "
        f"{s['replicas_started']} replicas started"
    )
    print(
        f"simulated {report['summary']['duration_s']:.1f} s in {wall:.1f} s of wall time: "
        f"{requests / wall:.0f} requests/s, {s['events']} events"
    )
    print("wrote " + ", ".join(str(f) for f in files))
    return 0 if report["summary"]["requests"]["completed"] > 0 else 1

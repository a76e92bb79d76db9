"""`fleetserve plan`: what fleet to buy, per region and hour of the day, for a traffic forecast.

    fleetserve plan --cost-model costs.json --regions regions.yaml --prices prices.yaml \\
        --ttft-p99 500 --tpot-p50 50 --input-len 256 --output-len 128 --out plan-out

The regions file gives each region's users' daily traffic curve, time zone, spot share and
the round trips between regions; the prices file each region's $/h (see `fleetserve
simulate --regions`). SLOs are in milliseconds and hold in every region over the day, a
failed request counting as never answered. bench's workload flags give the requests' shape
(their --rate is ignored: the curves are the rates). Prints the cheapest plan that meets the
SLOs, its cost per million output tokens and the runners-up; writes plan.json and plan.png
(load and replicas by hour) in --out. See `fleetserve.plan.search` for the search.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

_OBJECTIVES = (  # flag, metric, quantile
    ("ttft_p50", "ttft_s", 0.50),
    ("ttft_p90", "ttft_s", 0.90),
    ("ttft_p99", "ttft_s", 0.99),
    ("tpot_p50", "tpot_s", 0.50),
    ("tpot_p90", "tpot_s", 0.90),
    ("tpot_p99", "tpot_s", 0.99),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from fleetserve.bench.cli import _add_run_arguments

    parser = subparsers.add_parser(
        "plan",
        help="the cheapest fleet per region and hour that meets TTFT/TPOT SLOs (simulated)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_arguments(parser)
    parser.set_defaults(url="http://simulated", model="simulated")
    p = parser.add_argument_group("plan")
    p.add_argument("--cost-model", type=Path, required=True, help="JSON from fleetserve profile")
    p.add_argument("--regions", type=Path, required=True, help="regions file (YAML/JSON)")
    p.add_argument("--prices", type=Path, required=True, help="prices file (YAML/JSON)")
    for flag, metric, q in _OBJECTIVES:
        what = "TTFT" if metric == "ttft_s" else "TPOT"
        p.add_argument(
            f"--{flag.replace('_', '-')}",
            type=float,
            metavar="MS",
            help=f"{what} p{q * 100:g} objective in milliseconds",
        )
    p.add_argument(
        "--window", type=float, default=60.0, help="simulated seconds per hourly sizing window"
    )
    p.add_argument("--max-replicas", type=int, default=64, help="per region and hour, at most")
    p.add_argument("--regional-policy", help="for the day checks (default: the regions file's)")
    p.add_argument("--router", default="least_outstanding", help="routing policy per region")
    p.add_argument("--max-outstanding-per-replica", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--cold-start", type=float, default=30.0, help="seconds to a ready replica")

    def main(args: argparse.Namespace) -> int:
        try:
            planner = build_planner(args)
        except (ValueError, OSError) as exc:
            parser.error(str(exc))
        return run(planner, args)

    parser.set_defaults(func=main)


def slo_from_args(args: argparse.Namespace):
    from fleetserve.sim.regional_report import PlanSLO

    objectives = []
    for flag, metric, q in _OBJECTIVES:
        ms = getattr(args, flag)
        if ms is not None:
            if not 0 < ms < float("inf"):
                raise ValueError(f"--{flag.replace('_', '-')} must be > 0 ms and finite, got {ms}")
            objectives.append((metric, q, ms / 1000))
    if not objectives:
        raise ValueError("name at least one SLO, e.g. --ttft-p99 500 --tpot-p50 50 (ms)")
    return PlanSLO(tuple(objectives))


def build_planner(args: argparse.Namespace):
    import dataclasses

    from fleetserve.bench.cli import build_spec
    from fleetserve.gateway.config import GatewayConfig
    from fleetserve.perf.cost_model import CostModel
    from fleetserve.plan.search import Planner
    from fleetserve.sim.regional_spec import check_prices, load_prices, load_regions
    from fleetserve.sim.replica import EngineSettings
    from fleetserve.sim.simulator import FleetSpec

    slo = slo_from_args(args)
    if args.label is None:
        args.label = "plan"
    if args.out is None:
        args.out = Path("bench-out") / f"plan-{time.strftime('%Y%m%d-%H%M%S')}"
    bench, text_source = build_spec(args)
    spec = load_regions(args.regions)
    if args.regional_policy:
        spec = dataclasses.replace(spec, policy=args.regional_policy)
    prices = load_prices(args.prices)
    check_prices(spec, prices)
    cost_model = CostModel.load(args.cost_model)
    template = FleetSpec(
        cost_model=cost_model,
        engine=EngineSettings.from_cost_model(cost_model),
        gateway=GatewayConfig(
            router=args.router,
            seed=args.seed,
            max_outstanding_per_replica=args.max_outstanding_per_replica,
            max_queue=args.max_queue,
        ),
        cold_start_s=args.cold_start,
    )
    return Planner(
        spec,
        prices,
        bench,
        template,
        text_source,
        slo,
        window_s=args.window,
        max_replicas=args.max_replicas,
    )


def run(planner, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fleetserve.plan.search import NoPlan

    out: Path = args.out
    with tqdm(unit="sim", desc="plan", disable=args.no_progress, leave=False) as bar:

        def progress(what: str) -> None:
            bar.update()
            bar.set_postfix_str(what, refresh=False)

        planner.on_progress = progress
        try:
            result = planner.plan()
        except NoPlan as exc:
            bar.close()
            print(f"fleetserve plan: no plan meets the SLOs: {exc}", file=sys.stderr)
            return 1
    out.mkdir(parents=True, exist_ok=True)
    record = plan_record(planner, result)
    files = [out / "plan.json"]
    files[0].write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    if not args.no_plots:
        files.append(plot_plan(record, out / "plan.png"))
    print(plan_text(planner, result))
    print(
        f"\n{result.windows_run} sizing windows of {planner.window_s:g} s and "
        f"{len(result.candidates) + (result.smaller is not None)} simulated days "
        f"in {result.wall_s:.0f} s of wall time"
    )
    print("wrote " + ", ".join(str(f) for f in files))
    return 0 if result.best is not None else 1


def plan_record(planner, result) -> dict[str, Any]:
    spec = planner.spec
    return {
        "slo": planner.slo.describe(),
        "policy": spec.policy,
        "day_s": spec.day_s,
        "window_s": planner.window_s,
        "hour_rates": {k: list(v) for k, v in result.hour_rates.items()},
        "best": result.best.record() if result.best else None,
        "candidates": [c.record() for c in result.candidates],
        "smaller": result.smaller.record() if result.smaller else None,
        "windows_run": result.windows_run,
        "wall_s": result.wall_s,
    }


def plan_text(planner, result) -> str:
    from fleetserve.bench.tables import fmt, markdown_table

    lines = [f"fleetserve plan: {planner.slo.describe()}, policy {planner.spec.policy}\n"]
    if result.best is None:
        lines.append("no candidate plan meets the SLOs (raise --max-replicas, or relax them)\n")
    else:
        best = result.best
        lines.append(
            f"cheapest plan meeting the SLOs: {best.name}, ${best.cost_usd:,.2f} a day, "
            f"${fmt(best.usd_per_million_output_tokens)} per million output tokens\n"
        )
        rows = [[name, *(str(n) for n in sizes)] for name, sizes in best.sizes.items()]
        lines.append("replicas by UTC hour:")
        lines.append(markdown_table(["region", *(f"{h:02d}" for h in range(24))], rows))
        lines.append("")
    rows = []
    extra = [result.smaller] if result.smaller else []
    for c in [*result.candidates, *extra]:
        worst = max(
            (r["ttft_p99_all_ms"] or float("inf") for r in c.by_region.values()), default=None
        )
        rows.append(
            [
                c.name + (" (check)" if c is result.smaller else ""),
                "yes" if c.meets else "no",
                fmt(c.replica_hours, 1),
                fmt(c.cost_usd),
                fmt(c.usd_per_million_output_tokens),
                fmt(worst, 0),
            ]
        )
    lines.append(
        markdown_table(
            ["plan", "meets SLOs", "replica-h", "$ / day", "$ / M out tok", "worst TTFT p99 ms"],
            rows,
        )
    )
    return "\n".join(lines)


def plot_plan(record: dict[str, Any], path: Path) -> Path:
    """The forecast load and the planned replicas of each region by UTC hour."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 6.0), layout="tight")
    FigureCanvasAgg(fig)
    load, fleet = fig.subplots(2, 1, sharex=True)
    hours = list(range(25))
    for name, rates in record["hour_rates"].items():
        load.step(hours, [*rates, rates[-1]], where="post", label=name)
    best = record["best"]
    if best is not None:
        for name, sizes in best["sizes"].items():
            fleet.step(hours, [*sizes, sizes[-1]], where="post", label=name)
    load.set(title="forecast load (sized for)", ylabel="requests / simulated s")
    fleet.set(
        title=f"planned replicas ({best['name'] if best else 'none meets'})",
        xlabel="hour of the day (UTC)",
        ylabel="replicas",
    )
    for ax in (load, fleet):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax.set_ylim(bottom=0)
        ax.set_xlim(0, 24)
    fig.savefig(path, dpi=100)
    return path

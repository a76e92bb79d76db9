"""`fleetserve simulate --regions regions.yaml [--prices prices.yaml]`: a simulated day of
many regions (see `fleetserve.sim.regional_spec` for the files). Bench's workload flags give
the requests' shape and the seed; each region's traffic curve gives their rate. Writes
bench.json (every request, plus a `regions` object), summary.md, regions.md, and with plots
regions.png (load and replicas by hour of the day) beside bench's plots."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from fleetserve.bench.tables import fmt, markdown_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("regions (turn a simulation into a simulated day)")
    group.add_argument("--regions", type=Path, help="regions file (YAML/JSON): see README")
    group.add_argument("--prices", type=Path, help="prices file (YAML/JSON): $/h per region")
    group.add_argument(
        "--regional-policy", help="local, least_load or spill (default: the regions file's)"
    )


def load_regional(args: argparse.Namespace):
    """The regions and prices the flags name; None without --regions. ValueError: a bad file
    or flag, with what is wrong."""
    from fleetserve.sim.regional_spec import check_prices, load_prices, load_regions

    if args.regions is None:
        if args.prices is not None or args.regional_policy is not None:
            raise ValueError("--prices and --regional-policy need --regions")
        return None
    spec = load_regions(args.regions)
    if args.regional_policy:
        spec = dataclasses.replace(spec, policy=args.regional_policy)
    prices = None
    if args.prices is not None:
        prices = load_prices(args.prices)
        check_prices(spec, prices)
    return spec, prices


def run_regional(regional, bench, fleet_spec, text_source) -> int:
    from fleetserve.bench.plots import write_plots
    from fleetserve.bench.report import summary_table, write_report
    from fleetserve.sim.regional_report import default_slo
    from fleetserve.sim.regions import simulate_regions

    spec, prices = regional
    start = time.perf_counter()
    run = simulate_regions(spec, bench, fleet_spec, text_source, prices, default_slo(bench.slo))
    wall = time.perf_counter() - start
    report = run.report
    files = write_report(report, bench.out_dir)
    table = regions_table(report)
    md = bench.out_dir / "regions.md"
    md.write_text(table + "\n")
    files.append(md)
    if bench.plots:
        files += write_plots(report, bench.out_dir)
        files.append(plot_day(report, bench.out_dir / "regions.png"))
    sent = report["summary"]["requests"]["sent"]
    print(f"\nfleetserve simulate: {len(spec.regions)} regions, policy {spec.policy}\n")
    print(summary_table(report))
    print()
    print(table)
    print(
        f"\nsimulated {spec.hours:g} h of the day ({spec.duration_s:.0f} s) in {wall:.1f} s of "
        f"wall time: {sent / max(wall, 1e-9):.0f} requests/s"
    )
    print("wrote " + ", ".join(str(f) for f in files))
    return 0 if report["summary"]["requests"]["completed"] > 0 else 1


def regions_table(report: dict[str, Any]) -> str:
    """One row per region: its users' latency, traffic across regions, its cost."""
    rows = []
    by_region = report["regions"]["by_region"]
    for name, r in by_region.items():
        req = r["requests"]
        rows.append(
            [
                name,
                f"{req['sent']} / {req['failed']}",
                fmt(r["ttft_ms"]["p50"], 0),
                fmt(r["ttft_ms"]["p99"], 0),
                fmt(r["tpot_ms"]["p50"], 1),
                fmt(r["tpot_ms"]["p99"], 1),
                f"{r['spilled_out']} / {r['spilled_in']}",
                fmt(sum(r["replica_hours"].values()), 1),
                fmt(r["preemptions"]),
                fmt(r["cost_usd"]),
                fmt(r["usd_per_million_output_tokens"]),
            ]
        )
    total = report["regions"]["total"]
    blank = [""] * 6
    rows.append(
        ["all", "", "", fmt(total["ttft_p99_all_ms"], 0), *blank, fmt(total["cost_usd"])]
        + [fmt(total["usd_per_million_output_tokens"])]
    )
    headers = [
        "region",
        "sent / failed",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "TPOT p50 ms",
        "TPOT p99 ms",
        "spilled out / in",
        "replica-h",
        "preempted",
        "$",
        "$ / M out tok",
    ]
    return markdown_table(headers, rows)


def plot_day(report: dict[str, Any], path: Path) -> Path:
    """Requests/s of each region's users and its replicas up, by UTC hour of the day."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    regions = report["regions"]
    hour_s = regions["day_s"] / 24
    start = regions["start_hour"]
    fig = Figure(figsize=(7.0, 6.0), layout="tight")
    FigureCanvasAgg(fig)
    load, fleet = fig.subplots(2, 1, sharex=True)
    bins = max(int(regions["hours"] * 4), 1)
    width = regions["hours"] / bins
    for name in regions["by_region"]:
        starts = [
            start + r["start_s"] / hour_s for r in report["requests"] if r.get("region") == name
        ]
        counts = [0] * bins
        for h in starts:
            counts[min(int((h - start) / width), bins - 1)] += 1
        xs = [start + (i + 0.5) * width for i in range(bins)]
        load.plot(xs, [c / (width * hour_s) for c in counts], label=name)
        timeline = regions["timeline"][name]
        fleet.step([start + t / hour_s for t, _, _ in timeline], [u for _, u, _ in timeline],
                   where="post", label=name)  # fmt: skip
    load.set(title="load by region (its users)", ylabel="requests / simulated s")
    fleet.set(title="replicas up", xlabel="hour of the day (UTC)", ylabel="replicas")
    for ax in (load, fleet):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax.set_ylim(bottom=0)
    fig.savefig(path, dpi=100)
    return path

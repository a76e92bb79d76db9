"""What a regional run reports: per region, its users' latency (TTFT/TPOT percentiles), the
requests it spilled out and took in, its replica-hours, preemptions and cost ($ and $ per
million output tokens); for the world, the bench report of every request with the region
of its user and the region that served it; and whether SLOs were met (`PlanSLO`), a failed
request counting as never answered."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleetserve.bench.config import SLO, BenchSpec
from fleetserve.bench.report import build_report, config_record
from fleetserve.bench.result import RequestResult
from fleetserve.bench.stats import summarize

if TYPE_CHECKING:
    from fleetserve.sim.regional_spec import RegionsSpec
    from fleetserve.sim.regions import RegionalWorld, SimRegion


def slo_quantile(results: list[RequestResult], metric: str, q: float) -> float:
    """The `q` quantile of `metric` ("ttft_s" or "tpot_s") in seconds over every request, a
    failed one counted as infinitely late (an SLO cannot be met by dropping requests)."""
    values = []
    for r in results:
        v = getattr(r, metric) if r.ok else math.inf
        if v is not None:
            values.append(v)
    if not values:
        return math.inf
    values.sort()
    return values[min(int(math.ceil(q * len(values))) - 1, len(values) - 1)] if q > 0 else values[0]


def meets_slo(results: list[RequestResult], slo: PlanSLO) -> bool:
    """Whether `results` meet every objective; no requests at all (a region or a window
    without users) miss none."""
    if not results:
        return True
    return all(slo_quantile(results, metric, q) <= limit_s for metric, q, limit_s in slo.objectives)


@dataclass(frozen=True)
class PlanSLO:
    """Objectives a plan must meet in every region: (metric, quantile, limit in seconds)."""

    objectives: tuple[tuple[str, float, float], ...]

    def describe(self) -> str:
        return ", ".join(
            f"{m[:-2].upper()} p{q * 100:g} <= {s * 1000:g} ms" for m, q, s in self.objectives
        )


def _finite(value: float) -> float | None:
    """None for an infinite quantile (failed requests counted as never answered): the report
    is strict JSON."""
    return value if math.isfinite(value) else None


def _ms(stats: dict) -> dict:
    return {k: (v * 1000 if isinstance(v, float) and k != "count" else v) for k, v in stats.items()}


def region_record(region: SimRegion, spec: RegionsSpec, slo: PlanSLO | None) -> dict[str, Any]:
    results = region.client.results if region.client else []
    ok = [r for r in results if r.ok]
    scale = 24.0 / spec.day_s  # simulated second -> hours of the day
    hours = {k: v * scale for k, v in region.stats.replica_s.items()}
    cost = None
    if region.price is not None:
        cost = sum(h * region.price.per_h(kind == "spot") for kind, h in hours.items())
    tokens = region.stats.served_output_tokens
    d = region.stats.decisions
    record = {
        "requests": {"sent": len(results), "completed": len(ok), "failed": len(results) - len(ok)},
        "errors": dict(Counter(r.error for r in results if not r.ok)),
        "ttft_ms": _ms(summarize(r.ttft_s for r in ok if r.ttft_s is not None)),
        "tpot_ms": _ms(summarize(r.tpot_s for r in ok if r.tpot_s is not None)),
        "ttft_p99_all_ms": _finite(slo_quantile(results, "ttft_s", 0.99) * 1000),
        "decisions": dict(sorted(d.items())),
        "spilled_out": d["spill"] + d["failover"],
        "spilled_in": region.stats.spilled_in,
        "served_output_tokens": tokens,
        "replica_hours": hours,
        "preemptions": region.stats.preemptions,
        "cost_usd": cost,
        "usd_per_million_output_tokens": cost / tokens * 1e6
        if cost is not None and tokens
        else None,
    }
    if slo is not None:
        record["meets_slo"] = meets_slo(results, slo)
    return record


def regional_report(world: RegionalWorld, bench: BenchSpec, slo: PlanSLO | None = None):
    spec = world.spec
    results: list[RequestResult] = []
    for region in world.regions.values():
        results.extend(region.client.results)
    results.sort(key=lambda r: (r.start_s, r.session, r.turn))
    for i, r in enumerate(results):
        r.index = i
    duration = max((r.end_s for r in results), default=0.0)
    config = config_record(bench.target, bench.workload, bench.load, bench.slo, bench.tokenizer)
    report = build_report(bench.label, config, results, bench.slo, duration)
    for result, record in zip(results, report["requests"]):
        record["region"], record["served_by"] = world.where[id(result)]
    regions = {name: region_record(r, spec, slo) for name, r in world.regions.items()}
    costs = [r["cost_usd"] for r in regions.values()]
    tokens = sum(r["served_output_tokens"] for r in regions.values())
    total = sum(costs) if all(c is not None for c in costs) else None
    report["regions"] = {
        "policy": spec.policy,
        "day_s": spec.day_s,
        "start_hour": spec.start_hour,
        "hours": spec.hours,
        "total": {
            "cost_usd": total,
            "output_tokens": tokens,
            "usd_per_million_output_tokens": total / tokens * 1e6 if total and tokens else None,
            "ttft_p99_all_ms": _finite(slo_quantile(results, "ttft_s", 0.99) * 1000),
        },
        "by_region": regions,
        "timeline": {
            name: [list(x) for x in r.stats.timeline] for name, r in world.regions.items()
        },
    }
    report["simulation"] = {"events": world.loop.events_run}
    return report


def default_slo(slo: SLO) -> PlanSLO | None:
    """The bench SLO (ms) as plan objectives: TTFT and TPOT at p99, as bench's goodput counts."""
    objectives = []
    if slo.ttft_ms is not None:
        objectives.append(("ttft_s", 0.99, slo.ttft_ms / 1000))
    if slo.tpot_ms is not None:
        objectives.append(("tpot_s", 0.99, slo.tpot_ms / 1000))
    return PlanSLO(tuple(objectives)) if objectives else None

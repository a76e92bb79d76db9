"""The capacity planner: the cheapest fleet per region and hour of the day that meets the SLOs,
found with the simulator.

1. Per region and UTC hour, the hour's highest rate (rounded up onto a grid of `rate_steps`
   steps of the busiest region's peak, so that hours and regions share answers).
2. Per rate, the smallest size that meets the SLOs in a short simulated window of one region
   at that constant rate (`window_s`, the `local` policy: no help from peers), searched by
   galloping up from the size of the next lower rate (a higher rate never needs fewer
   replicas) and bisecting. Every window is memoized by (rate, size).
3. Candidate day plans, each checked by simulating the whole day with every region, the
   regions file's policy, spot preemptions and outages: `hourly` (step 2's sizes; a region
   that misses its SLOs over the day gets one more replica in the hours where its users
   missed them, up to `repairs` times), `hourly-shared` (one fewer at each region's peak
   hours, betting on spill to regions in their night) and `flat` (each region at its peak
   size all day). The cheapest that meets the SLOs in every region wins; the others are the
   runners-up. `smaller` (one fewer replica at every hour of the winner that has more than
   one) shows the margin.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleetserve.bench.config import BenchSpec
from fleetserve.bench.tokenizer import TextSource
from fleetserve.sim.regional_report import PlanSLO
from fleetserve.sim.regional_spec import (
    HOURS,
    MAX_REPLICAS,
    MAX_REQUESTS,
    Price,
    RegionSpec,
    RegionsSpec,
    TrafficCurve,
)
from fleetserve.sim.regions import simulate_regions
from fleetserve.sim.simulator import FleetSpec

Sizes = dict[str, tuple[int, ...]]  # region -> replicas by UTC hour


class NoPlan(ValueError):
    """Some hour's rate needs more than `max_replicas` replicas to meet the SLOs."""


@dataclass
class Candidate:
    name: str
    sizes: Sizes
    meets: bool = False
    cost_usd: float = math.inf
    usd_per_million_output_tokens: float | None = None
    replica_hours: float = 0.0
    by_region: dict[str, Any] = field(default_factory=dict)
    missed_hours: dict[str, set[int]] = field(default_factory=dict)  # of regions that missed

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "meets_slo": self.meets,
            "cost_usd": self.cost_usd if math.isfinite(self.cost_usd) else None,
            "usd_per_million_output_tokens": self.usd_per_million_output_tokens,
            "replica_hours": self.replica_hours,
            "sizes": {k: list(v) for k, v in self.sizes.items()},
            "by_region": {
                name: {
                    k: r[k]
                    for k in (
                        "meets_slo",
                        "ttft_p99_all_ms",
                        "ttft_ms",
                        "tpot_ms",
                        "requests",
                        "spilled_out",
                        "spilled_in",
                        "cost_usd",
                    )
                }
                for name, r in self.by_region.items()
            },
        }


@dataclass
class PlanResult:
    best: Candidate | None
    candidates: list[Candidate]  # checked day plans, cheapest first (meeting ones first)
    smaller: Candidate | None
    hour_rates: dict[str, tuple[float, ...]]  # the rate each hour was sized for
    windows_run: int
    wall_s: float


class Planner:
    def __init__(
        self,
        spec: RegionsSpec,
        prices: Mapping[str, Price],
        bench: BenchSpec,
        fleet_template: FleetSpec,
        text_source: TextSource,
        slo: PlanSLO,
        *,
        window_s: float = 60.0,
        max_replicas: int = 64,
        rate_steps: int = 40,
        repairs: int = 3,
        on_progress: Callable[[str], None] | None = None,
    ) -> None:
        if not slo.objectives:
            raise ValueError("the planner needs an SLO (e.g. --ttft-p99 500)")
        if not 0 < window_s < math.inf or max_replicas < 1 or rate_steps < 1 or repairs < 0:
            raise ValueError("need window_s > 0, max_replicas >= 1, rate_steps >= 1")
        if max_replicas > MAX_REPLICAS:  # a window of that many would never end
            raise ValueError(f"--max-replicas must be <= {MAX_REPLICAS}, got {max_replicas}")
        top = max(r.traffic.max_rps for r in spec.regions)
        if top * window_s > MAX_REQUESTS:
            raise ValueError(
                f"a sizing window of {window_s:g} s at {top:g} req/s simulates more than "
                f"{MAX_REQUESTS:.0e} requests: shorten --window"
            )
        self.spec = spec
        self.prices = prices
        self.bench = dataclasses.replace(bench, progress=False)
        self.fleet_template = fleet_template
        self.text_source = text_source
        self.slo = slo
        self.window_s = window_s
        self.max_replicas = max_replicas
        self.rate_steps = rate_steps
        self.repairs = repairs
        self.on_progress = on_progress or (lambda _: None)
        self._windows: dict[tuple[float, int], bool] = {}
        self._min_size: dict[float, int] = {}

    # ---- step 1 and 2: hours ------------------------------------------------------------

    def hour_rates(self) -> dict[str, tuple[float, ...]]:
        """Each region's highest rate within each UTC hour, rounded up onto the grid."""
        top = max(r.traffic.max_rps for r in self.spec.regions)
        step = top / self.rate_steps if top > 0 else 1.0
        rates = {}
        for region in self.spec.regions:
            row = []
            for hour in range(HOURS):
                peak = max(region.rate_at(hour + k / 8) for k in range(9))
                row.append(round(math.ceil(peak / step - 1e-9) * step, 9))
            rates[region.name] = tuple(row)
        return rates

    def window_meets(self, rate: float, size: int) -> bool:
        """Whether `size` replicas alone meet the SLOs for `window_s` at `rate` req/s."""
        key = (rate, size)
        if key not in self._windows:
            self.on_progress(f"window {rate:.2f} req/s x {size} replicas")
            probe = RegionSpec(
                "probe", traffic=TrafficCurve(peak_rps=rate, peak_factor=1.0), replicas=(size,) * 24
            )
            spec = RegionsSpec(
                regions=(probe,), day_s=HOURS * self.window_s, hours=1.0, policy="local"
            )
            run = simulate_regions(
                spec, self.bench, self.fleet_template, self.text_source, slo=self.slo
            )
            self._windows[key] = run.report["regions"]["by_region"]["probe"]["meets_slo"]
        return self._windows[key]

    def min_size(self, rate: float) -> int:
        """The fewest replicas that meet the SLOs at `rate` (0 for no traffic)."""
        if rate <= 0:
            return 0
        if rate in self._min_size:
            return self._min_size[rate]
        below = [n for r, n in self._min_size.items() if r < rate]
        low = max(below, default=1)  # a higher rate never needs fewer replicas
        failing, size = low - 1, low
        while not self.window_meets(rate, size):
            failing = size
            if size >= self.max_replicas:
                raise NoPlan(
                    f"{rate:.3g} req/s needs more than --max-replicas {self.max_replicas} "
                    f"replicas to meet {self.slo.describe()}"
                )
            size = min(size * 2, self.max_replicas)
        while size - failing > 1:  # failing < answer <= size
            mid = (failing + size) // 2
            if self.window_meets(rate, mid):
                size = mid
            else:
                failing = mid
        self._min_size[rate] = size
        return size

    def hourly_sizes(self, rates: dict[str, tuple[float, ...]]) -> Sizes:
        for rate in sorted({r for row in rates.values() for r in row}):
            self.min_size(rate)
        return {name: tuple(max(self.min_size(r), 1) for r in row) for name, row in rates.items()}

    # ---- step 3: days -------------------------------------------------------------------

    def check_day(self, name: str, sizes: Sizes) -> Candidate:
        self.on_progress(f"day check: {name}")
        regions = tuple(
            dataclasses.replace(r, replicas=sizes[r.name], autoscaling=None)
            for r in self.spec.regions
        )
        spec = dataclasses.replace(self.spec, regions=regions)
        run = simulate_regions(
            spec, self.bench, self.fleet_template, self.text_source, self.prices, self.slo
        )
        regions_report = run.report["regions"]
        by_region = regions_report["by_region"]
        total = regions_report["total"]
        missed = {
            n: self._hours_missed(r.client.results, spec)
            for n, r in run.world.regions.items()
            if not by_region[n]["meets_slo"]
        }
        return Candidate(
            name,
            sizes,
            meets=all(r["meets_slo"] for r in by_region.values()),
            cost_usd=total["cost_usd"] if total["cost_usd"] is not None else math.inf,
            usd_per_million_output_tokens=total["usd_per_million_output_tokens"],
            replica_hours=sum(sum(r["replica_hours"].values()) for r in by_region.values()),
            by_region=by_region,
            missed_hours=missed,
        )

    def _hours_missed(self, results, spec: RegionsSpec) -> set[int]:
        """UTC hours in which a region's users missed an objective by themselves: more than
        1 - q of the hour's requests past the limit of a q-quantile objective (a failed
        request misses every one). All hours when no single hour does."""
        per_hour: dict[int, list] = {}
        for r in results:
            per_hour.setdefault(int(spec.utc_hour(r.start_s)) % HOURS, []).append(r)
        missed = set()
        for hour, rs in per_hour.items():
            for metric, q, limit in self.slo.objectives:
                late = sum(
                    1
                    for r in rs
                    if not r.ok or (getattr(r, metric) is not None and getattr(r, metric) > limit)
                )
                if late > (1 - q) * len(rs):
                    missed.add(hour)
        return missed or set(range(HOURS))

    def plan(self) -> PlanResult:
        start = time.perf_counter()
        rates = self.hour_rates()
        hourly = self.hourly_sizes(rates)
        checked = [self.check_day("hourly", hourly)]
        for _ in range(self.repairs):
            last = checked[-1]
            if last.meets:
                break
            bumped = {
                n: tuple(
                    min(s + 1, self.max_replicas) if h in last.missed_hours.get(n, ()) else s
                    for h, s in enumerate(sizes)
                )
                for n, sizes in last.sizes.items()
            }
            if bumped == last.sizes:
                break  # every missed hour is at --max-replicas already
            checked.append(self.check_day(f"hourly+{len(checked)}", bumped))
        base = checked[-1]
        shared = {n: _peaks_minus_one(s) for n, s in base.sizes.items()}
        if shared != base.sizes:
            checked.append(self.check_day("hourly-shared", shared))
        flat = {n: (max(s),) * HOURS for n, s in base.sizes.items()}
        if flat != base.sizes:
            checked.append(self.check_day("flat", flat))
        checked.sort(key=lambda c: (not c.meets, c.cost_usd, c.name))
        best = checked[0] if checked[0].meets else None
        smaller = None
        if best is not None:
            fewer = {n: tuple(max(x - 1, 1) for x in s) for n, s in best.sizes.items()}
            if fewer != best.sizes:
                smaller = self.check_day("smaller", fewer)
        return PlanResult(
            best, checked, smaller, rates, len(self._windows), time.perf_counter() - start
        )


def _peaks_minus_one(sizes: tuple[int, ...]) -> tuple[int, ...]:
    top = max(sizes)
    return tuple(s - 1 if s == top and s > 1 else s for s in sizes)

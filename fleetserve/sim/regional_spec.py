"""What a regional simulation is made of, and the two files that describe it.

The regions file (YAML or JSON) describes the world; the prices file what replicas cost::

    # regions.yaml
    day_s: 2400            # simulated seconds that stand for 24 hours (the day is compressed)
    start_hour: 0          # UTC hour at simulated time 0
    hours: 24              # hours of the day to simulate
    policy: spill          # regional policy (local, least_load, spill)
    regional: {max_spill_fraction: 0.5, window_s: 60, min_gain_s: 0.05}
    rtt_ms:                # round trips; symmetric, both orders may be given
      us-east: {eu-west: 80, ap-south: 210}
      eu-west: {ap-south: 130}
    regions:
      - name: us-east
        utc_offset_h: -5
        traffic: {peak_rps: 6, peak_factor: 4, peak_hour: 14}   # or hourly: [24 x req/s]
        replicas: 3        # or [24 sizes, by UTC hour]
        spot_fraction: 0.5 # the share of its replicas bought as spot
        autoscale: {min: 1, max: 8, target_concurrency: 8}     # optional, instead of sizes
    outages:
      - {region: eu-west, at_h: 10, for_h: 1}     # dark from 10:00 UTC for an hour

    # prices.yaml
    us-east: {on_demand_per_h: 4.0, spot_per_h: 1.5, spot_preemptions_per_h: 0.2,
              spot_restart_s: 60}

Times of day (`at_h`, `peak_hour`, the per-hour sizes) are hours of the day, stretched onto
`day_s` simulated seconds; prices and preemption rates are per hour of the day, so a day's
cost and preemption count are those of a real day. The engine's physics is not compressed:
step times, cold starts and `spot_restart_s` are simulated seconds as they are.
Rates are requests per simulated second.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fleetserve.fleet.scaling import AutoscalingSettings
from fleetserve.regions.policy import REGIONAL_POLICIES, RegionalConfig

HOURS = 24
# Bounds on one run, so that a typo (a billion replicas, a day of 1e300 s) is an error at
# once rather than a simulation that never ends. Far above any region worth simulating.
MAX_REPLICAS = 1024  # per region and hour (and an autoscaler's max)
MAX_REQUESTS = 10_000_000  # expected over the run, all regions together
MAX_PRICE_PER_H = 1e6  # $ a replica-hour (a day's cost must stay a finite JSON number)


def _number(where: str, value: Any, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where} must be a number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{where} must be within {low} .. {high}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TrafficCurve:
    """Requests per simulated second over the users' local day: a smooth day/night curve,
    `peak_rps` at `peak_hour` local time and `peak_rps / peak_factor` twelve hours later,
    or explicit `hourly` rates (24, by local hour; linear between hour starts)."""

    peak_rps: float = 1.0
    peak_factor: float = 3.0
    peak_hour: float = 14.0
    hourly: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _number("traffic.peak_rps", self.peak_rps)
        _number("traffic.peak_factor", self.peak_factor, 1.0)
        _number("traffic.peak_hour", self.peak_hour, 0.0, 24.0)
        if self.hourly is not None:
            if len(self.hourly) != HOURS:
                raise ValueError(f"traffic.hourly needs 24 rates, got {len(self.hourly)}")
            for rate in self.hourly:
                _number("traffic.hourly[]", rate)

    def rate(self, local_hour: float) -> float:
        h = local_hour % HOURS
        if self.hourly is not None:
            i = int(h)
            frac = h - i
            return self.hourly[i] * (1 - frac) + self.hourly[(i + 1) % HOURS] * frac
        trough = 1.0 / self.peak_factor
        day = 0.5 + 0.5 * math.cos(2 * math.pi * (h - self.peak_hour) / HOURS)
        return self.peak_rps * (trough + (1 - trough) * day)

    @property
    def max_rps(self) -> float:
        return max(self.hourly) if self.hourly is not None else self.peak_rps


@dataclass(frozen=True)
class RegionSpec:
    name: str
    utc_offset_h: float = 0.0
    traffic: TrafficCurve = field(default_factory=TrafficCurve)
    replicas: tuple[int, ...] = (1,) * HOURS  # fleet size by UTC hour
    spot_fraction: float = 0.0
    autoscaling: AutoscalingSettings | None = None  # instead of `replicas` when set

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"a region needs a name (no '/'), got {self.name!r}")
        _number(f"{self.name}: utc_offset_h", self.utc_offset_h, -12.0, 14.0)
        _number(f"{self.name}: spot_fraction", self.spot_fraction, 0.0, 1.0)
        if len(self.replicas) != HOURS:
            raise ValueError(f"{self.name}: replicas needs 24 sizes, got {len(self.replicas)}")
        for n in self.replicas:
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_REPLICAS:
                raise ValueError(
                    f"{self.name}: replicas must be integers >= 0 "
                    f"(at most {MAX_REPLICAS}), got {n!r}"
                )
        if self.autoscaling is not None and self.autoscaling.config.max_replicas > MAX_REPLICAS:
            raise ValueError(
                f"{self.name}: autoscale max must be <= {MAX_REPLICAS}, "
                f"got {self.autoscaling.config.max_replicas!r}"
            )

    def local_hour(self, utc_hour: float) -> float:
        return (utc_hour + self.utc_offset_h) % HOURS

    def rate_at(self, utc_hour: float) -> float:
        return self.traffic.rate(self.local_hour(utc_hour))

    def size_at(self, utc_hour: float) -> int:
        return self.replicas[int(utc_hour % HOURS)]


@dataclass(frozen=True)
class Outage:
    """Region `region` is dark (gateway and replicas) from `at_h` for `for_h` hours."""

    region: str
    at_h: float
    for_h: float


@dataclass(frozen=True)
class Price:
    """What one replica costs in a region, per hour of the day."""

    on_demand_per_h: float
    spot_per_h: float | None = None
    spot_preemptions_per_h: float = 0.0  # per spot replica
    spot_restart_s: float = 60.0  # a preempted spot replica is back this long after

    def __post_init__(self) -> None:
        _number("on_demand_per_h", self.on_demand_per_h, 0.0, MAX_PRICE_PER_H)
        if self.spot_per_h is not None:
            _number("spot_per_h", self.spot_per_h, 0.0, MAX_PRICE_PER_H)
        _number("spot_preemptions_per_h", self.spot_preemptions_per_h)
        _number("spot_restart_s", self.spot_restart_s)

    def per_h(self, spot: bool) -> float:
        return self.spot_per_h if spot and self.spot_per_h is not None else self.on_demand_per_h


@dataclass(frozen=True)
class RegionsSpec:
    regions: tuple[RegionSpec, ...]
    rtt_s: Mapping[tuple[str, str], float] = field(default_factory=dict)  # both orders
    day_s: float = 2400.0
    start_hour: float = 0.0
    hours: float = 24.0
    policy: str = "spill"
    regional: RegionalConfig = field(default_factory=RegionalConfig)
    outages: tuple[Outage, ...] = ()
    default_rtt_s: float = 0.1  # for a pair the file leaves out

    def __post_init__(self) -> None:
        names = [r.name for r in self.regions]
        if not names:
            raise ValueError("regions: name at least one region")
        if len(set(names)) != len(names):
            raise ValueError(f"regions: names must be unique, got {names}")
        REGIONAL_POLICIES.check(self.policy)
        _number("day_s", self.day_s, 1e-3)
        _number("start_hour", self.start_hour, 0.0, 24.0)
        _number("hours", self.hours, 1e-3, 24.0 * 365)
        for (a, b), rtt in self.rtt_s.items():
            for name in (a, b):
                if name not in names:
                    raise ValueError(f"rtt_ms names an unknown region {name!r}; regions: {names}")
            _number(f"rtt_ms {a}-{b}", rtt)
        end_h = self.start_hour + self.hours
        for outage in self.outages:
            if outage.region not in names:
                raise ValueError(f"outages: unknown region {outage.region!r}; regions: {names}")
            _number("outages[].at_h", outage.at_h)
            _number("outages[].for_h", outage.for_h, 1e-6)
            # UTC hours from the first day's midnight (past 24 on later days): one the run
            # never reaches, or one before it starts, was silently no outage at all
            if not self.start_hour <= outage.at_h < end_h:
                raise ValueError(
                    f"outages: {outage.region} at_h {outage.at_h:g} is outside the simulated "
                    f"hours {self.start_hour:g} .. {end_h:g} (start_hour .. start_hour + "
                    "hours; a later day's hour counts on past 24)"
                )
        expected = self.expected_requests()
        if expected > MAX_REQUESTS:
            raise ValueError(
                f"the run would simulate about {expected:.3g} requests, more than "
                f"{MAX_REQUESTS:.0e}: shorten day_s or hours, or lower the traffic"
            )

    def expected_requests(self) -> float:
        """The requests the traffic curves bring over the run (a quarter-hour grid)."""
        steps = max(math.ceil(self.hours * 4), 1)
        step_h = self.hours / steps
        return sum(
            r.rate_at(self.start_hour + (i + 0.5) * step_h) * step_h * self.hour_s
            for r in self.regions
            for i in range(steps)
        )

    @property
    def hour_s(self) -> float:
        """Simulated seconds per hour of the day."""
        return self.day_s / HOURS

    @property
    def duration_s(self) -> float:
        return self.hours * self.hour_s

    def utc_hour(self, t: float) -> float:
        return self.start_hour + t / self.hour_s

    def rtt(self, a: str, b: str) -> float:
        if a == b:
            return 0.0
        return self.rtt_s.get((a, b), self.default_rtt_s)

    def region(self, name: str) -> RegionSpec:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)


# ---- files -------------------------------------------------------------------------------


def read_mapping(path: Path, what: str) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{what} {path} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must be a mapping, got {type(data).__name__}")
    return data


def _mapping(where: str, data: Any) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {data!r}")
    return data


def _only(where: str, data: Any, known: set[str]) -> dict:
    _mapping(where, data)
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return data


def _sizes(where: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * HOURS
    if isinstance(value, list) and len(value) == HOURS:
        return tuple(value)
    raise ValueError(f"{where}: replicas must be an integer or a list of 24, got {value!r}")


def _traffic(where: str, data: Any) -> TrafficCurve:
    data = _only(f"{where}.traffic", data, {"peak_rps", "peak_factor", "peak_hour", "hourly"})
    hourly = data.get("hourly")
    if hourly is not None and not isinstance(hourly, list):
        raise ValueError(f"{where}.traffic.hourly must be a list of 24 rates")
    try:
        return TrafficCurve(
            peak_rps=data.get("peak_rps", max(hourly) if hourly else 1.0),
            peak_factor=data.get("peak_factor", 3.0),
            peak_hour=data.get("peak_hour", 14.0),
            hourly=tuple(hourly) if hourly is not None else None,
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _autoscale(where: str, data: Any) -> AutoscalingSettings:
    import dataclasses

    from fleetserve.fleet.autoscaler import AutoscalerConfig

    data = _only(f"{where}.autoscale", data, {"min", "max", "target_concurrency", "interval_s"})
    knobs = {"min_replicas": data.get("min", 1), "max_replicas": data.get("max", 4)}
    if "target_concurrency" in data:
        knobs["target_concurrency"] = data["target_concurrency"]
    try:
        return AutoscalingSettings(
            config=dataclasses.replace(AutoscalerConfig(), **knobs),
            interval_s=data.get("interval_s", 1.0),
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}.autoscale: {exc}") from None


def regions_from_mapping(data: dict, where: str = "regions file") -> RegionsSpec:
    top = {"day_s", "start_hour", "hours", "policy", "regional", "rtt_ms", "regions", "outages"}
    _only(where, data, top)
    items = data.get("regions")
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where}: 'regions' must be a non-empty list")
    regions = []
    for i, item in enumerate(items):
        known = {"name", "utc_offset_h", "traffic", "replicas", "spot_fraction", "autoscale"}
        item = _only(f"{where}: regions[{i}]", item, known)
        name = item.get("name")
        here = f"{where}: region {name!r}"
        regions.append(
            RegionSpec(
                name=name,
                utc_offset_h=item.get("utc_offset_h", 0.0),
                traffic=_traffic(here, item.get("traffic", {})),
                replicas=_sizes(here, item.get("replicas", 1)),
                spot_fraction=item.get("spot_fraction", 0.0),
                autoscaling=_autoscale(here, item["autoscale"]) if "autoscale" in item else None,
            )
        )
    rtt: dict[tuple[str, str], float] = {}
    for a, row in _mapping(f"{where}: rtt_ms", data.get("rtt_ms") or {}).items():
        for b, ms in _mapping(f"{where}: rtt_ms.{a}", row).items():
            seconds = _number(f"{where}: rtt_ms {a}-{b}", ms) / 1000
            if rtt.get((a, b), seconds) != seconds:
                raise ValueError(f"{where}: rtt_ms {a}-{b} is given twice, differently")
            rtt[(a, b)] = rtt[(b, a)] = seconds
    outages = []
    for i, o in enumerate(data.get("outages") or []):
        o = _only(f"{where}: outages[{i}]", o, {"region", "at_h", "for_h"})
        if "region" not in o or "at_h" not in o or "for_h" not in o:
            raise ValueError(f"{where}: outages[{i}] needs region, at_h and for_h")
        outages.append(Outage(o["region"], o["at_h"], o["for_h"]))
    regional = _only(f"{where}: regional", data.get("regional", {}), _config_keys())
    try:
        regional_config = RegionalConfig(**regional)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: regional: {exc}") from None
    return RegionsSpec(
        regions=tuple(regions),
        rtt_s=rtt,
        day_s=data.get("day_s", 2400.0),
        start_hour=data.get("start_hour", 0.0),
        hours=data.get("hours", 24.0),
        policy=data.get("policy", "spill"),
        regional=regional_config,
        outages=tuple(outages),
    )


def _config_keys() -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(RegionalConfig)}


def load_regions(path: Path) -> RegionsSpec:
    data = read_mapping(path, "regions file")
    try:
        return regions_from_mapping(data, f"regions file {path}")
    except KeyError as exc:
        raise ValueError(f"regions file {path}: unknown policy or region {exc}") from None


def prices_from_mapping(data: dict, where: str = "prices file") -> dict[str, Price]:
    prices = {}
    known = {"on_demand_per_h", "spot_per_h", "spot_preemptions_per_h", "spot_restart_s"}
    for name, row in data.items():
        row = _only(f"{where}: {name}", row, known)
        if "on_demand_per_h" not in row:
            raise ValueError(f"{where}: {name} needs on_demand_per_h")
        try:
            prices[name] = Price(**row)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: {name}: {exc}") from None
    return prices


def load_prices(path: Path) -> dict[str, Price]:
    return prices_from_mapping(read_mapping(path, "prices file"), f"prices file {path}")


def check_prices(spec: RegionsSpec, prices: Mapping[str, Price]) -> None:
    """Every region has a price, and spot replicas have a spot price."""
    for region in spec.regions:
        price = prices.get(region.name)
        if price is None:
            raise ValueError(f"prices file: no price for region {region.name!r}")
        if region.spot_fraction > 0 and price.spot_per_h is None:
            raise ValueError(
                f"prices file: region {region.name!r} buys spot replicas "
                f"(spot_fraction {region.spot_fraction}) but has no spot_per_h"
            )

"""Frozen, validated configuration of one benchmark run.

Every value a user can get wrong is checked here, once, with a `ValueError` that names the
field. Time units: durations and arrival times in seconds, SLOs in milliseconds (the same unit
as the latency metrics of the report).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

WORKLOADS = ("random", "sharegpt-like", "shared-prefix", "multi-turn")
ENDPOINTS = ("chat", "completions")


@dataclass(frozen=True)
class LengthSpec:
    """A distribution of token counts: fixed `mean`, or one of normal (`std`), uniform
    (`range_ratio`: within mean * (1 +- ratio)) or lognormal (`lognormal_sigma`, mean kept).
    Samples are rounded and clipped to [`min`, `max`]."""

    mean: int
    std: float = 0.0
    range_ratio: float = 0.0
    lognormal_sigma: float = 0.0
    min: int = 1
    max: int | None = None

    def __post_init__(self) -> None:
        if self.mean < 1:
            raise ValueError(f"length mean must be >= 1, got {self.mean}")
        if self.std < 0 or self.lognormal_sigma < 0:
            raise ValueError("length std and lognormal_sigma must be >= 0")
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        spreads = [x for x in (self.std, self.range_ratio, self.lognormal_sigma) if x > 0]
        if len(spreads) > 1:
            raise ValueError("give at most one of a std, a range ratio or a lognormal sigma")
        if self.min < 1 or (self.max is not None and self.max < self.min):
            raise ValueError(
                f"length bounds must satisfy 1 <= min <= max, got {self.min}..{self.max}"
            )


@dataclass(frozen=True)
class WorkloadConfig:
    """What to send. `input_len` is the length of each new user text (a whole prompt for
    `random` and `sharegpt-like`, the question after the shared prefix for `shared-prefix`, one
    turn for `multi-turn`); `output_len` is each request's max_tokens."""

    kind: str
    input_len: LengthSpec
    output_len: LengthSpec
    num_groups: int = 1
    prefix_len: int = 0
    turns: int = 1

    def __post_init__(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"workload must be one of {WORKLOADS}, got {self.kind!r}")
        if self.num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {self.num_groups}")
        if self.prefix_len < 0:
            raise ValueError(f"prefix_len must be >= 0, got {self.prefix_len}")
        if self.turns < 1:
            raise ValueError(f"turns must be >= 1, got {self.turns}")
        if self.kind == "shared-prefix" and self.prefix_len < 1:
            raise ValueError("the shared-prefix workload needs prefix_len >= 1")


@dataclass(frozen=True)
class LoadConfig:
    """How to send it. A session is one request, or one conversation of `turns` requests.

    - `rate` (sessions/s, `inf` = all at once) with gamma-distributed gaps of shape `burstiness`
      (1.0 = Poisson, `inf` = constant gaps); `concurrency` caps the sessions in flight (a
      closed loop when rate is inf).
    - `ramp_up_s` (closed loop only): the first `concurrency` sessions start evenly over this
      many seconds instead of all at once. Equal-length requests that all start together stay
      in lockstep, arriving in waves, and a TTFT percentile then depends on where the waves fall.
    - The run stops after `num_sessions` sessions or when `duration_s` has passed (no new
      session starts after it; sessions in flight finish), whichever comes first.
    """

    num_sessions: int | None = 200
    duration_s: float | None = None
    rate: float = math.inf
    burstiness: float = 1.0
    concurrency: int | None = None
    ramp_up_s: float = 0.0
    warmup: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_sessions is None and self.duration_s is None:
            raise ValueError("give a number of requests or a duration")
        if self.num_sessions is not None and self.num_sessions < 1:
            raise ValueError(f"num_sessions must be >= 1, got {self.num_sessions}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 (inf for no limit), got {self.rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.ramp_up_s >= 0 or math.isinf(self.ramp_up_s):
            raise ValueError(f"ramp_up_s must be a finite number >= 0, got {self.ramp_up_s}")
        if self.ramp_up_s and (self.concurrency is None or not math.isinf(self.rate)):
            raise ValueError("a ramp-up applies to a closed loop: --concurrency without --rate")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.num_sessions is None and math.isinf(self.rate) and self.concurrency is None:
            raise ValueError("a run bounded only by a duration needs a rate or a concurrency")


@dataclass(frozen=True)
class TargetConfig:
    """Where and how each request goes. `extra_body` is merged into every request body."""

    url: str
    model: str
    endpoint: str = "chat"
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = False
    extra_body: dict = field(default_factory=dict)
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")

    @property
    def base_url(self) -> str:
        """The server root: `url` without a trailing slash or `/v1`."""
        url = self.url.rstrip("/")
        return url.removesuffix("/v1")


@dataclass(frozen=True)
class SLO:
    """Service-level objectives in milliseconds; None means no objective."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"SLO {name} must be > 0 ms, got {value}")


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark run: every config above, plus where its report goes."""

    target: TargetConfig
    workload: WorkloadConfig
    load: LoadConfig
    slo: SLO
    label: str
    out_dir: Path
    tokenizer: str | None = None
    progress: bool = True
    plots: bool = True

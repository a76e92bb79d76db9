"""The arrival schedule: when each session starts, in seconds after the benchmark starts.

Computed upfront from a seeded RNG, before any request is sent, so a test checks the process on
the schedule itself and a run can be repeated exactly. Gaps between arrivals are gamma-
distributed with shape `burstiness` and mean 1/rate: burstiness 1 is a Poisson process, below 1
arrivals come in bursts (coefficient of variation 1/sqrt(burstiness) > 1), above 1 they are
more regular, and an infinite burstiness is a constant rate (every gap exactly 1/rate). This is
the convention of vLLM's `benchmark_serving --burstiness`.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_times(
    rate: float,
    burstiness: float,
    rng: np.random.Generator,
    *,
    count: int | None = None,
    duration_s: float | None = None,
) -> list[float]:
    """Start times of `count` sessions, or of every session arriving before `duration_s` (the
    first of `count` and `duration_s` that is reached). The first arrival is at 0; an infinite
    rate puts every arrival at 0 and then needs `count`."""
    if count is None and duration_s is None:
        raise ValueError("arrival_times needs a count or a duration")
    if math.isinf(rate):
        if count is None:
            raise ValueError("an infinite rate needs a count")
        return [0.0] * count
    if math.isinf(burstiness):
        gaps = int(count) if count is not None else math.ceil(rate * duration_s)
        times = [i / rate for i in range(gaps)]
        return [t for t in times if duration_s is None or t < duration_s]
    scale = 1.0 / (rate * burstiness)
    times: list[float] = []
    now = 0.0
    while count is None or len(times) < count:
        # Draw in blocks: one RNG call per gap would be slow for long schedules.
        block = count - len(times) if count is not None else max(16, int(rate * duration_s))
        for gap in rng.gamma(burstiness, scale, block):
            if duration_s is not None and now >= duration_s:
                return times
            times.append(now)
            now += float(gap)
            if count is not None and len(times) == count:
                break
    return times

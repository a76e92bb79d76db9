"""Percentiles and distribution summaries. Pure functions over plain numbers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

PERCENTILES = (50, 90, 99)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ascending `sorted_values`, interpolating linearly between
    the two nearest ranks (Hyndman & Fan type 7, numpy's default "linear" method)."""
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    position = (len(sorted_values) - 1) * q / 100
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    fraction = position - lower
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * fraction


def summarize(values: Iterable[float]) -> dict[str, float | int | None]:
    """{count, mean, p50, p90, p99, max} of `values`; every statistic is None when empty."""
    ordered = sorted(values)
    summary: dict[str, float | int | None] = {"count": len(ordered)}
    if not ordered:
        summary.update({"mean": None, **{f"p{q}": None for q in PERCENTILES}, "max": None})
        return summary
    summary["mean"] = math.fsum(ordered) / len(ordered)
    for q in PERCENTILES:
        summary[f"p{q}"] = percentile(ordered, q)
    summary["max"] = ordered[-1]
    return summary

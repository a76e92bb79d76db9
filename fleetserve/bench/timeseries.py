"""Load over time: output tokens/s and running requests, in fixed time buckets. Pure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fleetserve.bench.result import RequestResult

_TARGET_BUCKETS = 60


def bucket_width(duration_s: float) -> float:
    """1 s buckets for runs of a minute or more; shorter runs get about 60 buckets."""
    if duration_s <= 0:
        return 1.0
    return 1.0 if duration_s >= _TARGET_BUCKETS else duration_s / _TARGET_BUCKETS


def timeseries(
    results: Sequence[RequestResult], duration_s: float, bucket_s: float | None = None
) -> dict[str, Any]:
    """`t_s[i]` is the start of bucket i. `output_tokens_per_s[i]`: output tokens of
    completed requests whose chunk arrived in the bucket (a request's tokens spread evenly over
    its chunks). `running_requests[i]`: the time-weighted mean of requests in flight."""
    width = bucket_s if bucket_s is not None else bucket_width(duration_s)
    if width <= 0:
        raise ValueError(f"bucket_s must be > 0, got {width}")
    num = max(1, math.ceil(duration_s / width))
    tokens = [0.0] * num
    busy = [0.0] * num  # request-seconds in flight per bucket

    def bucket(t: float) -> int:
        return min(num - 1, max(0, int(t / width)))

    for result in results:
        if result.ok and result.chunk_times_s:
            per_chunk = result.output_tokens / len(result.chunk_times_s)
            for t in result.chunk_times_s:
                tokens[bucket(t)] += per_chunk
        for i in range(bucket(result.start_s), bucket(result.end_s) + 1):
            overlap = min(result.end_s, (i + 1) * width) - max(result.start_s, i * width)
            busy[i] += max(0.0, overlap)
    return {
        "bucket_s": width,
        "t_s": [i * width for i in range(num)],
        "output_tokens_per_s": [x / width for x in tokens],
        "running_requests": [x / width for x in busy],
    }

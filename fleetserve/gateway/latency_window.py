"""Recent latencies (TTFT, inter-token) over a sliding time window, for policies that act on
what clients feel now (the autoscaler's SLOs), not on all-time histograms. Pure: `now` is
passed in."""

from __future__ import annotations

import math
from collections import deque


class LatencyWindow:
    def __init__(self, window_s: float = 60.0, max_samples: int = 10_000) -> None:
        if not window_s > 0 or max_samples < 1:
            raise ValueError("need window_s > 0 and max_samples >= 1")
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def observe(self, now: float, seconds: float) -> None:
        if math.isfinite(seconds) and seconds >= 0:
            self._samples.append((now, seconds))

    def quantile(self, now: float, q: float) -> float | None:
        """The `q` quantile (nearest rank) of the samples of the last `window_s`; None when
        there are none."""
        while self._samples and self._samples[0][0] <= now - self.window_s:
            self._samples.popleft()
        if not self._samples:
            return None
        values = sorted(v for _, v in self._samples)
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

"""A retry budget, as Envoy's: retries in flight may be at most `percent` of the requests
in flight, and `min_concurrency` retries are allowed whatever the load. When every replica
fails, retries then add a fraction to the load instead of multiplying it by `max_retries`.

Pure counters, no clock: a retry is in flight from the moment it is allowed until its
attempt ends (the next retry decision of the same request, or the request's end).
"""

from __future__ import annotations


class RetryBudget:
    def __init__(self, percent: float = 20.0, min_concurrency: int = 3) -> None:
        if not 0 <= percent <= 100:
            raise ValueError(f"retry budget percent must be within 0..100, got {percent}")
        if min_concurrency < 0:
            raise ValueError(f"retry min concurrency must be >= 0, got {min_concurrency}")
        self.percent = percent
        self.min_concurrency = min_concurrency
        self.active_requests = 0
        self.active_retries = 0  # invariant: 0 <= active_retries

    @property
    def limit(self) -> float:
        return max(self.min_concurrency, self.percent / 100.0 * self.active_requests)

    def request_started(self) -> None:
        self.active_requests += 1

    def request_ended(self) -> None:
        self.active_requests = max(self.active_requests - 1, 0)

    def try_start_retry(self) -> bool:
        """Take a place for one retry if the budget has one; the caller ends it with
        `retry_ended`."""
        if self.active_retries >= self.limit:
            return False
        self.active_retries += 1
        return True

    def retry_ended(self) -> None:
        self.active_retries = max(self.active_retries - 1, 0)

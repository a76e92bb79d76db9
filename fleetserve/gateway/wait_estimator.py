"""Predicts how long a queued request waits for a replica slot, from the mean time a
request holds a slot (an exponential moving average of observed holds). Pure."""

from __future__ import annotations


class WaitEstimator:
    def __init__(self, initial_service_s: float = 1.0, alpha: float = 0.1) -> None:
        if initial_service_s <= 0 or not 0 < alpha <= 1:
            raise ValueError("need initial_service_s > 0 and 0 < alpha <= 1")
        self.mean_service_s = initial_service_s
        self.alpha = alpha

    def observe(self, service_s: float) -> None:
        self.mean_service_s += self.alpha * (max(service_s, 0.0) - self.mean_service_s)

    def predict_wait(self, ahead: int, slots: int) -> float:
        """Seconds until a request with `ahead` waiters before it gets one of `slots`
        busy slots: slots free at a rate of slots / mean_service_s."""
        if slots <= 0:
            return float("inf")
        return (ahead + 1) * self.mean_service_s / slots

"""Token buckets for rate limits. Pure: `now` is passed in, nothing sleeps."""

from __future__ import annotations

import math


class TokenBucket:
    """`rate` tokens per second refill a bucket of `capacity` (it starts full).

    Invariant: tokens <= capacity after every call; tokens < 0 only after `take_debt` (a
    request used more than it was charged): the refill pays the debt before anything else.
    """

    def __init__(self, rate: float, capacity: float, now: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        if capacity <= 0:
            raise ValueError("capacity must be > 0")
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
            self._last = now

    def available(self, now: float) -> float:
        self._refill(now)
        return self.tokens

    def try_take(self, amount: float, now: float) -> float:
        """Take `amount` if the bucket holds it and return 0.0; otherwise take nothing and
        return the seconds until it would (math.inf if `amount` exceeds the capacity)."""
        self._refill(now)
        if amount <= self.tokens:
            self.tokens -= amount
            return 0.0
        if amount > self.capacity:
            return math.inf
        return (amount - self.tokens) / self.rate

    def take_debt(self, amount: float, now: float) -> None:
        """Take `amount` whether or not the bucket holds it (the work is done already)."""
        self._refill(now)
        self.tokens -= max(amount, 0.0)

    def give_back(self, amount: float, now: float) -> None:
        """Return unused tokens (never above capacity)."""
        self._refill(now)
        self.tokens = min(self.capacity, self.tokens + max(amount, 0.0))

"""A per-replica circuit breaker: closed -> open -> half-open -> closed.

Pure: every method takes `now` (seconds, any monotonic clock) and does no I/O.

- closed: requests flow; `failure_threshold` consecutive failures open the circuit.
- open: no request is let through until `cooldown_s` has passed since it opened; then the
  breaker is half-open. Each re-open doubles the cooldown, up to `max_cooldown_s`.
- half-open: at most `half_open_max_calls` trial requests at a time; one success closes the
  circuit (and resets the cooldown), one failure opens it again.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 3
    cooldown_s: float = 2.0
    max_cooldown_s: float = 30.0
    half_open_max_calls: int = 1

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if self.cooldown_s <= 0 or self.max_cooldown_s < self.cooldown_s:
            raise ValueError("need 0 < cooldown_s <= max_cooldown_s")
        if self.half_open_max_calls < 1:
            raise ValueError("half_open_max_calls must be >= 1")


class CircuitBreaker:
    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.config = config or BreakerConfig()
        self._state = BreakerState.CLOSED
        self._failures = 0  # consecutive, while closed
        self._opened_at = 0.0
        self._cooldown = self.config.cooldown_s
        self._trials = 0  # trial requests in flight while half-open
        self.times_opened = 0
        # Called after every change of state (the dispatcher's cached views listen).
        self.on_change: Callable[[], None] | None = None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def changes_at(self, now: float) -> float:
        """When `state` will next change with time alone (an open circuit's cooldown ends);
        inf when only a call can change it."""
        if self._state is BreakerState.OPEN and now - self._opened_at < self._cooldown:
            return self._opened_at + self._cooldown
        return math.inf

    def state(self, now: float) -> BreakerState:
        """The state at `now` (an open circuit whose cooldown is over reads half-open)."""
        if self._state is BreakerState.OPEN and now - self._opened_at >= self._cooldown:
            return BreakerState.HALF_OPEN
        return self._state

    def allows(self, now: float) -> bool:
        """Whether a new request may be sent now. Does not change the state."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN:
            return self._trials_now(now) < self.config.half_open_max_calls
        return False

    def on_dispatch(self, now: float) -> None:
        """A request was sent; while half-open it is a trial."""
        if self.state(now) is BreakerState.HALF_OPEN:
            self._state = BreakerState.HALF_OPEN
            self._trials = self._trials_now(now) + 1
            self._changed()

    def record_success(self, now: float) -> None:
        state = self.state(now)
        if state is BreakerState.OPEN:
            return  # a late answer from before the circuit opened proves little
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._trials = 0
        self._cooldown = self.config.cooldown_s
        self._changed()

    def record_failure(self, now: float) -> None:
        state = self.state(now)
        if state is BreakerState.OPEN:
            return
        if state is BreakerState.HALF_OPEN:
            self._cooldown = min(self._cooldown * 2, self.config.max_cooldown_s)
            self._open(now)
            return
        self._failures += 1
        if self._failures >= self.config.failure_threshold:
            self._open(now)
        # (a failure short of the threshold changes nothing a view shows)

    def record_neutral(self, now: float) -> None:
        """A request ended with no verdict on the replica (e.g. the client left)."""
        if self._state is BreakerState.HALF_OPEN and self._trials > 0:
            self._trials -= 1
            self._changed()

    def force_open(self, now: float) -> None:
        """Open now whatever the count (e.g. the replica's process is known to be gone)."""
        if self.state(now) is not BreakerState.OPEN:
            self._open(now)

    def reset(self) -> None:
        """Back to closed with a clean slate (e.g. a restarted replica)."""
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._trials = 0
        self._cooldown = self.config.cooldown_s
        self._changed()

    def _trials_now(self, now: float) -> int:
        # Trials counted before the cooldown ended belong to an earlier half-open spell.
        return self._trials if self._state is BreakerState.HALF_OPEN else 0

    def _open(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._failures = 0
        self._trials = 0
        self.times_opened += 1
        self._changed()

"""How long to wait before restarting a replica that exited. Pure."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RestartBackoff:
    """Doubles from `base_s` up to `max_s` while a replica keeps dying young; a replica that
    stayed up for `reset_after_s` starts again from `base_s`."""

    base_s: float = 1.0
    max_s: float = 30.0
    reset_after_s: float = 60.0
    _next: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.max_s:
            raise ValueError("need 0 < base_s <= max_s")
        self._next = self.base_s

    def next_delay(self, uptime_s: float) -> float:
        if uptime_s >= self.reset_after_s:
            self._next = self.base_s
        delay = self._next
        self._next = min(self._next * 2, self.max_s)
        return delay

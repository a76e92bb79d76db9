"""The virtual clock and its event queue: the whole simulator runs on one `EventLoop`.

Events at the same time run in the order they were scheduled (a sequence number breaks
ties), so a run is deterministic. Nothing here reads the wall clock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._seq = itertools.count()
        self.events_run = 0

    def clock(self) -> float:
        """The virtual time, as the `clock` callables of the real objects expect it."""
        return self.now

    def call_at(self, when: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` at virtual time `when` (never before now)."""
        heapq.heappush(self._queue, (max(when, self.now), next(self._seq), fn, args))

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        self.call_at(self.now + delay, fn, *args)

    def run(self, until: float | None = None, on_advance: Callable[[float], None] | None = None):
        """Run events in time order until none is left (or the next is after `until`).
        `on_advance(now)` is called every 4096 events (a progress bar)."""
        queue, pop = self._queue, heapq.heappop
        while queue:
            if until is not None and queue[0][0] > until:
                break
            when, _, fn, args = pop(queue)
            self.now = when
            fn(*args)
            self.events_run += 1
            if on_advance is not None and not self.events_run & 4095:
                on_advance(when)

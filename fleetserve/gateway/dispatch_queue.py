"""The bounded queue of admitted requests waiting for a replica slot, served by priority
class and then in arrival order. Pure: no asyncio; the caller wakes whoever it pops.

When the queue is full, a newcomer that outranks the least urgent waiter takes its place
(that waiter is returned, to be shed); otherwise the newcomer is refused.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    pass


@dataclass(order=True)
class _Entry(Generic[T]):
    rank: int
    seq: int
    item: T = field(compare=False)
    removed: bool = field(default=False, compare=False)


class DispatchQueue(Generic[T]):
    def __init__(self, max_size: int) -> None:
        if max_size < 0:
            raise ValueError("max_size must be >= 0")
        self.max_size = max_size
        self._heap: list[_Entry[T]] = []
        self._entries: dict[int, _Entry[T]] = {}  # id(item) -> entry
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, item: T, rank: int) -> T | None:
        """Queue `item`; returns a waiter it displaced, if any. Raises QueueFull if refused."""
        displaced = None
        if len(self) >= self.max_size:
            worst = max(self._entries.values(), default=None)
            if worst is None or worst.rank <= rank:
                raise QueueFull
            displaced = worst.item
            self.remove(worst.item)
        entry = _Entry(rank, next(self._seq), item)
        heapq.heappush(self._heap, entry)
        self._entries[id(item)] = entry
        return displaced

    def peek(self) -> T | None:
        self._drop_removed()
        return self._heap[0].item if self._heap else None

    def pop(self) -> T:
        self._drop_removed()
        entry = heapq.heappop(self._heap)
        del self._entries[id(entry.item)]
        return entry.item

    def remove(self, item: T) -> bool:
        entry = self._entries.pop(id(item), None)
        if entry is None:
            return False
        entry.removed = True
        return True

    def items(self) -> list[T]:
        """The waiters, in no particular order."""
        return [e.item for e in self._entries.values()]

    def ahead_of(self, rank: int) -> int:
        """How many waiters a newcomer of `rank` would wait behind."""
        return sum(1 for e in self._entries.values() if e.rank <= rank)

    def _drop_removed(self) -> None:
        while self._heap and self._heap[0].removed:
            heapq.heappop(self._heap)

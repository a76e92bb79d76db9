"""The dynamic batcher's policy: which waiting requests run together, and when. Pure: plain
data and an injected `now`, no threads, no torch; `workers.py` runs it.

A request brings `rows` (inputs along the batch dimension), a bucket `key` (requests of one
key can share a batch: same tensor shape, or a band of token lengths that pads cheaply), a
`priority` (lower first) and a deadline. The policy:

- The head is the waiting request of the lowest priority, oldest first. A batch is the head
  plus the next requests of its key, in the same order, while the rows fit `max_batch_size`
  (a request is never split; one larger than the limit is refused at the door).
- It runs as soon as a worker asks and either the batch is full or the head has waited
  `max_queue_delay_s`. With the default delay of 0 an idle worker takes whatever is there, and
  batches form by themselves while the workers are busy: no request waits for a batch to fill
  when a worker has nothing else to do.
- The queue holds at most `max_queue_rows` rows: beyond that `submit` raises `QueueFull`
  (HTTP 429). A request still waiting at its deadline leaves with `expired` (HTTP 503).

How the knobs compare with the peers' (their documentation and NOTES.md, 2026); ours first,
then Triton's dynamic batcher, Ray Serve's `@serve.batch`, LitServe, BentoML's adaptive batching:

- batch size: `max_batch_size` 32 | `max_batch_size` of the model config | `max_batch_size`
  10 | `max_batch_size` 1 | `max_batch_size` 100.
- wait for a fuller batch: `max_queue_delay_ms` 0 | `max_queue_delay_microseconds` 0 |
  `batch_wait_timeout_s` 0.01 | `batch_timeout` 0 | none: `max_latency_ms` 60000 bounds the
  latency and the wait is learnt.
- variable shapes: buckets by tensor shape or by power-of-two token length, padded | only equal
  shapes batch (or ragged batching) | the user pads | the user pads | the user pads.
- queue bound: `max_queue_len` rows, then 429 | `max_queue_size` 0 = unbounded |
  `max_ongoing_requests` 5 per replica | unbounded | unbounded.
- per-request timeout: `request_timeout` 30 s, then 503 | `default_timeout_microseconds` with
  REJECT or DELAY | none | `timeout` 30 s | none.
- priorities: `priority`, lower first | `priority_levels` | none | none | none.
- instances: `instances` threads with the cores split | `instance_group` count | replicas
  (processes) | `workers_per_device` (processes) | runners (processes).

Triton's defaults are ours except for the bounded queue (safe by default, DESIGN.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

MAX_WAIT_S = 30 * 24 * 3600.0  # a month: any longer wait is a mistake, not a setting


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = 32  # rows per batch
    max_queue_delay_s: float = 0.0  # how long the head may wait for a fuller batch
    max_queue_rows: int = 1024  # rows waiting beyond which `submit` refuses
    timeout_s: float = 30.0  # a request still waiting after this leaves with an error

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        # A worker waits on a threading.Condition: past TIMEOUT_MAX (or inf) its wait raises
        # OverflowError and the worker thread dies with its batch unanswered.
        if not 0 <= self.max_queue_delay_s <= MAX_WAIT_S:
            raise ValueError(
                f"max_queue_delay must be within 0..{MAX_WAIT_S:g} s, got {self.max_queue_delay_s}"
            )
        if self.max_queue_rows < self.max_batch_size:
            raise ValueError(
                f"max_queue_rows ({self.max_queue_rows}) must be >= max_batch_size "
                f"({self.max_batch_size})"
            )
        if not 0 < self.timeout_s <= MAX_WAIT_S:
            raise ValueError(f"timeout must be within 0..{MAX_WAIT_S:g} s, got {self.timeout_s}")


class QueueFull(Exception):
    """The queue has no room for the request's rows now (HTTP 429)."""


class TooLarge(Exception):
    """The request has more rows than any batch may hold (HTTP 400)."""


@dataclass(eq=False)
class Pending:
    """One request waiting in the queue. `payload` is the caller's (rows, a future); `seq`
    is its place in the order of submission to its queue, set by `BatchQueue.submit`."""

    num_rows: int
    key: Hashable
    arrival: float
    deadline: float
    priority: int = 0
    payload: Any = None
    seq: int = field(default=0, init=False)  # ties in arrival keep FIFO

    def __post_init__(self) -> None:
        if self.num_rows < 1:
            raise ValueError(f"a request has at least one row, got {self.num_rows}")

    def sort_key(self) -> tuple[int, float, int]:
        return (self.priority, self.arrival, self.seq)


class BatchQueue:
    """The waiting requests and the batching decision. Not thread-safe: its user locks."""

    def __init__(self, config: BatchConfig) -> None:
        self.config = config
        self._waiting: list[Pending] = []
        self.num_rows = 0  # rows waiting
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._waiting)

    def submit(self, request: Pending) -> None:
        """Queue `request`, or raise `TooLarge` (never fits a batch) / `QueueFull` (not now)."""
        limit = self.config.max_batch_size
        if request.num_rows > limit:
            raise TooLarge(f"{request.num_rows} inputs in one request, more than {limit}")
        if self.num_rows + request.num_rows > self.config.max_queue_rows:
            raise QueueFull(f"{self.num_rows} of {self.config.max_queue_rows} rows waiting")
        request.seq = next(self._order)
        self._waiting.append(request)
        self.num_rows += request.num_rows

    def cancel(self, request: Pending) -> bool:
        """Take `request` out if it still waits (its client left); True if it did."""
        if request not in self._waiting:
            return False
        self._remove([request])
        return True

    def pop_expired(self, now: float) -> list[Pending]:
        """The requests whose deadline has passed, removed from the queue."""
        expired = [r for r in self._waiting if r.deadline <= now]
        self._remove(expired)
        return expired

    def next_batch(self, now: float) -> list[Pending] | float | None:
        """For a worker that is free at `now`: the batch to run (removed from the queue), or
        the time at which to ask again (the head waits for a fuller batch), or None (empty).
        Call `pop_expired` first: an expired request is still batched here."""
        if not self._waiting:
            return None
        ordered = sorted(self._waiting, key=Pending.sort_key)
        head = ordered[0]
        batch, rows = [], 0
        for request in ordered:
            if request.key != head.key:
                continue
            if rows + request.num_rows > self.config.max_batch_size:
                break
            batch.append(request)
            rows += request.num_rows
        ready_at = head.arrival + self.config.max_queue_delay_s
        if rows < self.config.max_batch_size and now < ready_at:
            return min(ready_at, head.deadline)
        self._remove(batch)
        return batch

    def _remove(self, requests: list[Pending]) -> None:
        gone = {id(r) for r in requests}
        self._waiting = [r for r in self._waiting if id(r) not in gone]
        self.num_rows -= sum(r.num_rows for r in requests)
        assert self.num_rows >= 0, "removed more rows than were queued"

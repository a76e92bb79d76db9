"""`Dispatcher`: which replica takes a request, and when. Pure: no asyncio, no real time, no
I/O; every method takes `now` and returns a decision. The asyncio shell (`Gateway`) does the
waiting; a simulator can drive the very same object on a virtual clock.

A fresh request (`submit`) is routed at once to a replica with a free slot, queued with a
ticket, or refused: the queue is full, or the predicted wait passes its deadline. Every
routed request ends with `release`, which passes the outcome to the replica's circuit
breaker and grants queued tickets the slots that freed. A ticket whose deadline passes
before it is granted is `expire`d. Retries and migrations skip the queue and the slot limit
(`route_now`): they hold the client's place already.

Held at zero. When no replica accepts work but the fleet can start one (its controller sets
`cold_start_s`, the expected time from a replica's start to its first passing probe), a
fresh request is queued while a replica loads, its deadline honoured: one that the expected
cold start cannot meet is refused at once with `COLD_START` (503 and a Retry-After of that
wait), never left to time out. Without `cold_start_s` (a gateway over fixed URLs) nothing is
coming, and the wait is unknown.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.dispatch_queue import DispatchQueue, QueueFull
from fleetserve.gateway.policies import make_policy
from fleetserve.gateway.priority import DEFAULT_PRIORITY, priority_rank
from fleetserve.gateway.replica import Replica, ReplicaView
from fleetserve.gateway.route_request import RouteRequest
from fleetserve.gateway.router import Router
from fleetserve.gateway.wait_estimator import WaitEstimator

NO_REPLICA = "no_replica"  # `Refused.reason` when no replica accepts work at all
# `Refused.reason` when none accepts work and the next one will not be ready by the deadline
COLD_START = "cold_start"


class Outcome(enum.Enum):
    SUCCESS = "success"  # the replica did its part
    FAILURE = "failure"  # the replica failed: counts towards opening its circuit
    NEUTRAL = "neutral"  # no verdict (client left, request invalid)


@dataclass(eq=False)
class Ticket:
    """A queued request. `expires_at`: its deadline, or the first-chunk timeout when it has
    none. `gone`: whether its holder stopped waiting (such a ticket is skipped, never
    granted); the asyncio shell passes its future's `done`."""

    request: RouteRequest
    deadline: float | None
    queued_at: float
    expires_at: float
    gone: Callable[[], bool] = field(default=lambda: False, repr=False)


@dataclass(frozen=True)
class Routed:
    replica: Replica


@dataclass(frozen=True)
class Queued:
    ticket: Ticket
    displaced: Ticket | None = None  # a less urgent waiter it pushed out: refuse it


@dataclass(frozen=True)
class Refused:
    """Shed with 429 and this Retry-After: queue_full, predicted_wait, displaced,
    deadline; or 503 with it: `NO_REPLICA` when nothing accepts work, `COLD_START` when a
    replica is starting but will not be ready by the deadline."""

    reason: str
    retry_after_s: float = 0.0


@dataclass(frozen=True)
class Grant:
    """A queued ticket got a slot on `replica` (the slot is taken already)."""

    ticket: Ticket
    replica: Replica


DISPLACED = Refused("displaced", 1.0)
DEFAULT_RANK = priority_rank(DEFAULT_PRIORITY)


class Dispatcher:
    """Owns the replica table's routing state: the router, the priority queue and the wait
    estimator. `replicas` is the live table (id -> Replica); its owner adds and removes
    entries, this object only takes and gives back slots."""

    def __init__(self, config: GatewayConfig, replicas: dict[str, Replica] | None = None) -> None:
        self.config = config
        self.replicas: dict[str, Replica] = {} if replicas is None else replicas
        self.router = Router(
            make_policy(config.router, config.seed), config.max_outstanding_per_replica
        )
        self.queue: DispatchQueue[Ticket] = DispatchQueue(config.max_queue)
        self.waits = WaitEstimator()
        # Seconds from a replica's start to ready, when the fleet starts replicas on demand
        # (set by its controller); None: no replica comes on its own.
        self.cold_start_s: float | None = None
        # The views cache: one view per replica, sorted by id, rebuilt only for replicas
        # whose state changed (they say so: `Replica.on_change`) or whose breaker's state
        # changes with time (`_expiry`). Routing reads every view per decision; building
        # them all each time made a decision O(replicas) view constructions.
        self._table: dict[str, Replica] = {}  # the replicas the cache was built for
        self._views: list[ReplicaView] = []
        self._index: dict[str, int] = {}  # id -> position in _views
        self._dirty: set[str] = set()
        self._expiry: list[tuple[float, str]] = []  # (when a cached view goes stale, id)
        self._views_at = -math.inf

    def views(self, now: float) -> list[ReplicaView]:
        """A view of every replica at `now`, sorted by id: equal to building
        `[r.view(now) for r in replicas]` afresh (and sorting), at the cost of the replicas
        that changed. The list is shared: read it, do not change it."""
        table, known = self.replicas, self._table
        if (
            now < self._views_at
            or table.keys() != known.keys()
            or not all(map(operator.is_, table.values(), known.values()))
        ):
            self._rebuild(now)  # replicas came, went or were replaced (or time ran back)
        else:
            dirty = self._dirty
            expiry = self._expiry
            while expiry and expiry[0][0] <= now:
                dirty.add(heapq.heappop(expiry)[1])
            if dirty:
                views, index = self._views, self._index
                for rid in dirty:
                    i = index.get(rid)
                    if i is not None:
                        views[i] = self._view_of(table[rid], now)
                dirty.clear()
        self._views_at = now
        return self._views

    def next_change(self, now: float) -> float:
        """When a replica's view next changes with time alone (an open circuit's cooldown
        ends and it reads half-open); inf when none will. May be early, never late."""
        self.views(now)
        return self._expiry[0][0] if self._expiry else math.inf

    def _rebuild(self, now: float) -> None:
        self._table = dict(self.replicas)
        self._dirty.clear()
        self._expiry.clear()
        for replica in self._table.values():
            replica.on_change = self._dirty.add
        self._dirty.clear()  # the assignments above announced themselves
        self._views = [self._view_of(self._table[rid], now) for rid in sorted(self._table)]
        self._index = {v.id: i for i, v in enumerate(self._views)}

    def _view_of(self, replica: Replica, now: float) -> ReplicaView:
        until = replica.breaker.changes_at(now)
        if until != math.inf:
            heapq.heappush(self._expiry, (until, replica.id))
        return replica.view(now)

    def any_accepting(self, now: float) -> bool:
        return any(v.accepting for v in self.views(now))

    # ---- decisions ---------------------------------------------------------------------------

    def submit(
        self, request: RouteRequest, deadline: float | None, now: float
    ) -> Routed | Queued | Refused:
        """A fresh request: a slot now if nobody is queued and one is free, else a ticket,
        else refused (queue full, or the predicted wait passes `deadline`)."""
        if not len(self.queue):
            replica = self.route(request, now, ignore_capacity=False)
            if replica is not None:
                return Routed(replica)
        ahead = self.queue.ahead_of(request.priority_rank)
        slots = self.router.total_slots(self.views(now))
        predicted = self.waits.predict_wait(ahead, slots)
        cold_start = self.cold_start_wait(now) if slots == 0 else None
        if cold_start is not None:
            # Held while a replica starts: the wait is its cold start, then the queue ahead.
            per_replica = self.config.max_outstanding_per_replica
            predicted = cold_start + self.waits.predict_wait(ahead, per_replica)
            if deadline is not None and now + predicted > deadline:
                return Refused(COLD_START, predicted)
        if deadline is not None and now + predicted > deadline:
            retry = predicted if math.isfinite(predicted) else self.config.breaker_cooldown_s
            return Refused("predicted_wait", retry)
        expires = now + self.config.first_chunk_timeout_s if deadline is None else deadline
        ticket = Ticket(request, deadline, now, expires)
        try:
            displaced = self.queue.push(ticket, request.priority_rank)
        except QueueFull:
            return Refused("queue_full", predicted if math.isfinite(predicted) else 1.0)
        return Queued(ticket, displaced)

    def predicted_wait(self, now: float, rank: int = DEFAULT_RANK, arriving: int = 0) -> float:
        """Seconds a fresh request of this priority would wait for a slot now (what `submit`
        predicts, without queueing it), behind `arriving` requests that are about to be
        submitted: 0 while they leave a slot free and nobody is queued; the cold start and the
        queue ahead when a replica must start first; inf when none accepts work and none will
        start. Read-only (regional gateways compare it with their peers')."""
        views = self.views(now)
        free = 0 if len(self.queue) else self.router.free_slots(views)
        ahead = self.queue.ahead_of(rank) + arriving - free
        if ahead < 0:
            return 0.0
        slots = self.router.total_slots(views)
        if slots == 0:
            cold_start = self.cold_start_wait(now)
            if cold_start is None:
                return math.inf
            per_replica = self.config.max_outstanding_per_replica
            return cold_start + self.waits.predict_wait(ahead, per_replica)
        return self.waits.predict_wait(ahead, slots)

    def cold_start_wait(self, now: float) -> float | None:
        """Seconds until a replica should be ready when none is: the least remaining cold
        start of those loading, else a whole one (the fleet starts one now). None when no
        replica comes on its own (`cold_start_s` unset)."""
        if self.cold_start_s is None:
            return None
        remaining = [
            max(self.cold_start_s - (now - r.started_at), 0.0)
            for r in self.replicas.values()
            if r.loading and r.started_at is not None
        ]
        return min(remaining, default=self.cold_start_s)

    def route_now(self, request: RouteRequest, now: float) -> Replica | None:
        """A replica for a retry or a migration, past the slot limit and the queue; the
        replicas it excludes are used only as a last resort. None: none accepts work."""
        replica = self.route(request, now, ignore_capacity=True)
        if replica is None and request.exclude:
            bare = dataclasses.replace(request, exclude=frozenset())
            replica = self.route(bare, now, ignore_capacity=True)
        return replica

    def route(self, request: RouteRequest, now: float, ignore_capacity: bool) -> Replica | None:
        """Ask the router, and take a slot on the replica it picks."""
        view = self.router.route(request, self.views(now), now, ignore_capacity)
        if view is None:
            return None
        replica = self.replicas[view.id]
        replica.outstanding += 1
        replica.prefilling[request.request_id] = request.uncached_tokens(view.prefix)
        replica.breaker.on_dispatch(now)
        return replica

    def release(
        self,
        replica: Replica,
        outcome: Outcome,
        now: float,
        held_s: float | None = None,
        request_id: str | None = None,
    ) -> list[Grant]:
        """A routed request ended: give back its slot, tell the breaker, and grant queued
        tickets what freed. `held_s`: how long it held the slot (successes teach the wait
        estimator)."""
        replica.outstanding = max(replica.outstanding - 1, 0)
        if request_id is not None:
            replica.prefilling.pop(request_id, None)
        if outcome is Outcome.SUCCESS:
            replica.breaker.record_success(now)
            if held_s is not None:
                self.waits.observe(held_s)
        elif outcome is Outcome.FAILURE:
            replica.breaker.record_failure(now)
        else:
            replica.breaker.record_neutral(now)
        return self.grant(now)

    def grant(self, now: float) -> list[Grant]:
        """Serve the queue, most urgent first, while replicas have free slots. Called after
        `release` and whenever a replica may have become usable."""
        grants = []
        while len(self.queue):
            ticket = self.queue.peek()
            if ticket.gone():
                self.queue.pop()
                continue
            replica = self.route(ticket.request, now, ignore_capacity=False)
            if replica is None:
                break
            self.queue.pop()
            grants.append(Grant(ticket, replica))
        return grants

    def expire(self, ticket: Ticket, now: float) -> Refused:
        """`ticket` waited past `expires_at` without a slot: it leaves the queue, refused
        with `NO_REPLICA` when nothing accepts work (retry once a replica should be ready),
        else shed as `deadline`."""
        if not self.any_accepting(now):
            self.queue.remove(ticket)
            cold_start = self.cold_start_wait(now)
            return Refused(NO_REPLICA, cold_start or 0.0)
        slots = self.router.total_slots(self.views(now))
        retry = self.waits.predict_wait(len(self.queue), max(slots, 1))
        self.queue.remove(ticket)
        return Refused("deadline", retry)

    def expired(self, now: float) -> list[Ticket]:
        """Queued tickets whose `expires_at` has passed (for a driver without timers)."""
        return [t for t in self.queue.items() if t.expires_at <= now]

    def withdraw(self, ticket: Ticket) -> None:
        """Its holder stopped waiting (granted, cancelled or refused): out of the queue."""
        self.queue.remove(ticket)

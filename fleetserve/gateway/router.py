"""Filters replicas down to those that may take a request, then asks the policy. Pure."""

from __future__ import annotations

import operator
from collections.abc import Sequence

from fleetserve.gateway.policies.base import RoutingPolicy
from fleetserve.gateway.replica import ReplicaKind, ReplicaView
from fleetserve.gateway.route_request import RouteRequest

_BY_ID = operator.attrgetter("id")


class Router:
    def __init__(self, policy: RoutingPolicy, max_outstanding_per_replica: int) -> None:
        if max_outstanding_per_replica < 1:
            raise ValueError("max_outstanding_per_replica must be >= 1")
        self.policy = policy
        self.max_outstanding = max_outstanding_per_replica

    def candidates(
        self, request: RouteRequest, replicas: Sequence[ReplicaView], ignore_capacity: bool
    ) -> list[ReplicaView]:
        """Accepting (healthy, not draining, breaker lets it through), not excluded, and
        with a free slot unless `ignore_capacity` (retries and migrations do not queue)."""
        exclude, limit = request.exclude, self.max_outstanding
        extensions = request.needs_extensions
        return sorted(
            [
                r
                for r in replicas
                if r.accepting
                and (ignore_capacity or r.outstanding < limit)
                and (not exclude or r.id not in exclude)
                and (not extensions or r.kind is ReplicaKind.FLEETSERVE)
            ],
            key=_BY_ID,
        )

    def route(
        self,
        request: RouteRequest,
        replicas: Sequence[ReplicaView],
        now: float,
        ignore_capacity: bool = False,
    ) -> ReplicaView | None:
        """The replica for `request`, or None if none may take it now."""
        candidates = self.candidates(request, replicas, ignore_capacity)
        if not candidates:
            return None
        return self.policy.choose(request, candidates, now)

    def free_slots(self, replicas: Sequence[ReplicaView]) -> int:
        return sum(max(self.max_outstanding - r.outstanding, 0) for r in replicas if r.accepting)

    def total_slots(self, replicas: Sequence[ReplicaView]) -> int:
        return self.max_outstanding * sum(1 for r in replicas if r.accepting)

"""The replica with the fewest requests in flight from this gateway (ties taken in turn)."""

from __future__ import annotations

from collections.abc import Sequence

from fleetserve.gateway.policies.base import RoutingPolicy, TieBreaker
from fleetserve.gateway.replica import ReplicaView
from fleetserve.gateway.route_request import RouteRequest


class LeastOutstanding(RoutingPolicy):
    name = "least_outstanding"

    def __init__(self) -> None:
        self._ties = TieBreaker()

    def choose(
        self, request: RouteRequest, replicas: Sequence[ReplicaView], now: float
    ) -> ReplicaView:
        least = min(r.outstanding for r in replicas)
        return self._ties.pick([r for r in replicas if r.outstanding == least])

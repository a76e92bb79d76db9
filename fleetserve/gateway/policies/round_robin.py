"""Each request to the next replica in id order, whatever their load."""

from __future__ import annotations

from collections.abc import Sequence

from fleetserve.gateway.policies.base import RoutingPolicy, TieBreaker
from fleetserve.gateway.replica import ReplicaView
from fleetserve.gateway.route_request import RouteRequest


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._turn = TieBreaker()  # a cursor by id survives replicas coming and going

    def choose(
        self, request: RouteRequest, replicas: Sequence[ReplicaView], now: float
    ) -> ReplicaView:
        return self._turn.pick(replicas)

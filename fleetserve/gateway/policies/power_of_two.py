"""Power of two choices: sample two replicas at random (seeded), keep the less loaded.
Nearly as good as least-outstanding, without every gateway herding onto the same replica."""

from __future__ import annotations

import random
from collections.abc import Sequence

from fleetserve.gateway.policies.base import RoutingPolicy
from fleetserve.gateway.replica import ReplicaView
from fleetserve.gateway.route_request import RouteRequest


class PowerOfTwo(RoutingPolicy):
    name = "power_of_two"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    @classmethod
    def from_options(cls, seed: int) -> PowerOfTwo:
        return cls(seed)

    def choose(
        self, request: RouteRequest, replicas: Sequence[ReplicaView], now: float
    ) -> ReplicaView:
        if len(replicas) == 1:
            return replicas[0]
        a, b = self._rng.sample(list(replicas), 2)
        return b if b.outstanding < a.outstanding else a

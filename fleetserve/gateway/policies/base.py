"""The routing-policy interface.

A policy is pure: it reads frozen `ReplicaView`s and a `RouteRequest`, and gets `now` from
its caller. It may keep its own state (a round-robin cursor, a seeded RNG), but it does no
I/O, reads no clock and starts no task, so the simulator can run the very same object.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar

from fleetserve.gateway.replica import ReplicaView
from fleetserve.gateway.route_request import RouteRequest


class RoutingPolicy(abc.ABC):
    name: ClassVar[str]

    @classmethod
    def from_options(cls, seed: int) -> RoutingPolicy:
        """The policy as the gateway builds it; `seed` matters to randomized ones only."""
        return cls()

    @abc.abstractmethod
    def choose(
        self, request: RouteRequest, replicas: Sequence[ReplicaView], now: float
    ) -> ReplicaView:
        """Pick one of `replicas`: a non-empty list, sorted by id, of replicas that accept
        work (the `Router` filtered out unhealthy, draining, full and excluded ones)."""


class TieBreaker:
    """Spreads ties over replicas in turn instead of always picking the first."""

    def __init__(self) -> None:
        self._last: str | None = None

    def pick(self, tied: Sequence[ReplicaView]) -> ReplicaView:
        """`tied` sorted by id; returns the first whose id follows the last pick's."""
        chosen = next((r for r in tied if self._last is None or r.id > self._last), tied[0])
        self._last = chosen.id
        return chosen

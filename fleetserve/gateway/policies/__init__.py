"""Routing policies behind one interface, by name. Adding one: a file and a line here."""

from __future__ import annotations

from fleetserve.gateway.policies.base import RoutingPolicy
from fleetserve.registry import Registry

POLICIES: Registry[type[RoutingPolicy]] = Registry(
    "router",
    {
        "round_robin": "fleetserve.gateway.policies.round_robin:RoundRobin",
        "least_outstanding": "fleetserve.gateway.policies.least_outstanding:LeastOutstanding",
        "power_of_two": "fleetserve.gateway.policies.power_of_two:PowerOfTwo",
        "prefix_aware": "fleetserve.gateway.policies.prefix_aware:PrefixAware",
    },
)


def make_policy(name: str, seed: int = 0) -> RoutingPolicy:
    """A new policy; a `ValueError` naming the choices if `name` is unknown."""
    return POLICIES.get(name).from_options(seed)


__all__ = ["POLICIES", "RoutingPolicy", "make_policy"]

"""Routing policies behind one interface, by name. Adding one: a file and a line here."""

from __future__ import annotations

from collections.abc import Callable

from fleetserve.gateway.policies.base import RoutingPolicy
from fleetserve.gateway.policies.least_outstanding import LeastOutstanding
from fleetserve.gateway.policies.power_of_two import PowerOfTwo
from fleetserve.gateway.policies.prefix_aware import PrefixAware
from fleetserve.gateway.policies.round_robin import RoundRobin

POLICIES: dict[str, Callable[..., RoutingPolicy]] = {
    "round_robin": lambda seed=0: RoundRobin(),
    "least_outstanding": lambda seed=0: LeastOutstanding(),
    "power_of_two": lambda seed=0: PowerOfTwo(seed),
    "prefix_aware": lambda seed=0: PrefixAware(),
}


def make_policy(name: str, seed: int = 0) -> RoutingPolicy:
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose one of {sorted(POLICIES)}") from None
    return factory(seed=seed)


__all__ = ["POLICIES", "RoutingPolicy", "make_policy"]

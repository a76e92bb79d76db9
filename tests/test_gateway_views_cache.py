"""`Dispatcher.views` caches one view per replica and rebuilds only those that changed. On
randomized traces of everything that changes a replica (routing, releases with every
outcome, breakers opening and cooling down, probes, drains, load scrapes, KV events, the
prefilling ledger, replicas added, removed and replaced), the cached views must equal views
built afresh, and every routing policy must make the same choices as over fresh views."""

from __future__ import annotations

import dataclasses
import random

import pytest

from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.dispatcher import Dispatcher, Outcome
from fleetserve.gateway.policies import POLICIES
from fleetserve.gateway.policies.prefix_aware import PrefixAware
from fleetserve.gateway.prefix_index import EMPTY_PREFIX
from fleetserve.gateway.replica import LoadStats, Replica, ReplicaView
from fleetserve.gateway.route_request import RouteRequest

BLOCK = 4


class FreshViews(Dispatcher):
    """The dispatcher as it was: every view built anew for every decision."""

    def views(self, now: float) -> list[ReplicaView]:
        return sorted((r.view(now) for r in self.replicas.values()), key=lambda v: v.id)


def comparable(view: ReplicaView) -> tuple:
    """A view's fields, its prefix by the index it reads (a fresh `PrefixView` is a new
    object over the same index)."""
    return dataclasses.replace(view, prefix=EMPTY_PREFIX), view.prefix._index


def new_replica(d: Dispatcher, i: int) -> Replica:
    replica = Replica(f"r{i:03d}", "http://127.0.0.1:9", breaker_config=d.config.breaker)
    replica.ready = True
    return replica


def prompt(rng: random.Random) -> tuple[int, ...]:
    # A few shared heads so that prefix matches happen.
    head = [rng.randrange(3)] * BLOCK * rng.randrange(4)
    return tuple(head + [rng.randrange(50) for _ in range(rng.randrange(1, 3 * BLOCK))])


def trace(d: Dispatcher, seed: int, steps: int = 400) -> list[str | None]:
    """Random operations on `d`; returns the replica ids it chose, in order."""
    rng = random.Random(seed)
    n = 12
    for i in range(n):
        d.replicas[f"r{i:03d}"] = new_replica(d, i)
    routed: list[tuple[Replica, str]] = []
    chosen: list[str | None] = []
    now = 0.0
    for step in range(steps):
        now += rng.choice((0.0, 0.01, 0.5, 1.5))
        op = rng.randrange(12)
        replicas = list(d.replicas.values())
        r = rng.choice(replicas) if replicas else None
        if op <= 3:
            ids = prompt(rng)
            exclude = frozenset({r.id}) if r is not None and rng.random() < 0.2 else frozenset()
            request = RouteRequest(f"q{step}", ids, len(ids), 8, exclude=exclude)
            picked = d.route(request, now, ignore_capacity=rng.random() < 0.3)
            chosen.append(picked and picked.id)
            if picked is not None:
                routed.append((picked, request.request_id))
        elif op <= 5 and routed:
            replica, request_id = routed.pop(rng.randrange(len(routed)))
            outcome = rng.choice(
                (Outcome.SUCCESS, Outcome.FAILURE, Outcome.FAILURE, Outcome.NEUTRAL)
            )
            d.release(replica, outcome, now, 0.1, request_id)
        elif op == 6 and r is not None:
            field = rng.choice(("ready", "draining", "down"))
            setattr(r, field, not getattr(r, field))
        elif op == 7 and r is not None:
            if rng.random() < 0.5:
                r.load.running, r.load.waiting = rng.randrange(5), rng.randrange(5)
            else:
                r.load = LoadStats(rng.randrange(5), rng.randrange(5), rng.random())
        elif op == 8 and r is not None:
            ids = prompt(rng)
            hashes = RouteRequest("x", ids, len(ids)).block_hashes(BLOCK)
            kind = rng.choice(("stored", "stored", "removed", "cleared"))
            r.prefix.apply(
                {"block_size": BLOCK, "events": [{"kind": kind, "block_hashes": hashes}]}
            )
        elif op == 9 and r is not None:
            if rng.random() < 0.5:
                r.breaker.force_open(now)
            else:
                r.breaker.reset()
        elif op == 10 and r is not None:
            r.prefilling.pop(rng.choice(list(r.prefilling) or ["none"]), None)
        elif op == 11:
            if rng.random() < 0.4 and r is not None:
                del d.replicas[r.id]  # removed (its streams still end on it)
            elif rng.random() < 0.5 and r is not None:
                d.replicas[r.id] = new_replica(d, int(r.id[1:]))  # replaced under its id
            else:
                n += 1
                d.replicas[f"r{n:03d}"] = new_replica(d, n)
        expected = sorted((x.view(now) for x in d.replicas.values()), key=lambda v: v.id)
        assert [comparable(v) for v in d.views(now)] == [comparable(v) for v in expected], step
    return chosen


@pytest.mark.parametrize("router", sorted(POLICIES.names()))
@pytest.mark.parametrize("seed", range(4))
def test_cached_views_equal_fresh_ones_and_routing_chooses_the_same(router, seed):
    config = GatewayConfig(router=router, max_outstanding_per_replica=3, seed=seed)
    cached = trace(Dispatcher(config), seed)
    fresh = trace(FreshViews(config), seed)
    assert cached == fresh
    assert sum(c is not None for c in cached) > 50  # the trace did route


def test_views_follow_a_breaker_cooling_down_with_no_call():
    d = Dispatcher(GatewayConfig(router="round_robin"))
    replica = d.replicas["r000"] = new_replica(d, 0)
    assert d.views(0.0)[0].accepting
    replica.breaker.force_open(1.0)
    assert not d.views(1.0)[0].accepting
    cooldown = d.config.breaker.cooldown_s
    assert not d.views(1.0 + cooldown * 0.99)[0].accepting
    assert d.views(1.0 + cooldown)[0].accepting  # half-open: a trial may go


def reference_prefix_aware(policy: PrefixAware, request, replicas):
    """`PrefixAware.choose` as it was written before the one-pass version."""
    least = min(r.outstanding for r in replicas)
    fair = [r for r in replicas if r.outstanding <= least + policy.max_imbalance]
    costs = {r.id: (policy.cost(request, r), r.outstanding) for r in fair}
    best = min(costs.values())
    return [r for r in fair if costs[r.id] == best]


@pytest.mark.parametrize("seed", range(5))
def test_prefix_aware_one_pass_chooses_as_the_reference(seed):
    rng = random.Random(seed)
    d = Dispatcher(GatewayConfig(router="prefix_aware"))
    for i in range(30):
        replica = d.replicas[f"r{i:03d}"] = new_replica(d, i)
        replica.outstanding = rng.randrange(40)
        replica.prefilling[f"p{i}"] = rng.randrange(0, 100)
        for _ in range(rng.randrange(3)):
            ids = prompt(rng)
            hashes = RouteRequest("x", ids, len(ids)).block_hashes(BLOCK)
            replica.prefix.apply(
                {"block_size": BLOCK, "events": [{"kind": "stored", "block_hashes": hashes}]}
            )
    views = d.views(0.0)
    policy, reference = PrefixAware(decode_cost_tokens=rng.choice((0.0, 16.0))), PrefixAware()
    for j in range(200):
        ids = prompt(rng) if j % 5 else None
        request = RouteRequest(f"q{j}", ids, len(ids) if ids else rng.randrange(30))
        tied = reference_prefix_aware(policy, request, views)
        assert policy.choose(request, views, 0.0) is reference._ties.pick(tied)

"""Routing policies and the router on plain data."""

from __future__ import annotations

import pytest

from fleetserve.engine.block_hash import hash_block_chain
from fleetserve.gateway.circuit_breaker import BreakerState
from fleetserve.gateway.policies import POLICIES, make_policy
from fleetserve.gateway.policies.power_of_two import PowerOfTwo
from fleetserve.gateway.policies.prefix_aware import PrefixAware
from fleetserve.gateway.prefix_index import EMPTY_PREFIX, PrefixIndex, PrefixView
from fleetserve.gateway.replica import ReplicaKind, ReplicaView
from fleetserve.gateway.route_request import RouteRequest
from fleetserve.gateway.router import Router

B = 4  # block size


def view(rid: str, outstanding: int = 0, prefix: PrefixView = EMPTY_PREFIX, **kw) -> ReplicaView:
    fields = {
        "id": rid,
        "url": f"http://{rid}",
        "kind": ReplicaKind.FLEETSERVE,
        "outstanding": outstanding,
        "running": 0,
        "waiting": 0,
        "kv_cache_usage": 0.0,
        "healthy": True,
        "accepting": True,
        "draining": False,
        "breaker_state": BreakerState.CLOSED,
        "prefix": prefix,
    }
    fields.update(kw)
    return ReplicaView(**fields)


def index_with(tokens: list[int]) -> PrefixView:
    index = PrefixIndex()
    index.apply(
        {
            "block_size": B,
            "events": [
                {"kind": "stored", "block_hashes": hash_block_chain(tokens, B), "parent_hash": 0}
            ],
        }
    )
    return PrefixView(index)


REQ = RouteRequest("r", tuple(range(40)), 40, 16)


def test_registry_names_and_unknown():
    assert set(POLICIES) == {"round_robin", "least_outstanding", "power_of_two", "prefix_aware"}
    for name in POLICIES:
        assert make_policy(name).name == name
    with pytest.raises(ValueError, match="unknown router"):
        make_policy("random")


def test_round_robin_cycles_and_survives_membership_changes():
    policy = make_policy("round_robin")
    reps = [view("a"), view("b"), view("c")]
    assert [policy.choose(REQ, reps, 0).id for _ in range(4)] == ["a", "b", "c", "a"]
    # b leaves: the cursor (after a) moves on to c
    assert policy.choose(REQ, [reps[0], reps[2]], 0).id == "c"
    assert policy.choose(REQ, reps, 0).id == "a"


def test_least_outstanding_prefers_idle_and_spreads_ties():
    policy = make_policy("least_outstanding")
    assert policy.choose(REQ, [view("a", 3), view("b", 1), view("c", 2)], 0).id == "b"
    tied = [view("a", 1), view("b", 1), view("c", 5)]
    assert [policy.choose(REQ, tied, 0).id for _ in range(3)] == ["a", "b", "a"]


def test_power_of_two_is_seeded_and_picks_less_loaded_of_pair():
    reps = [view("a", 0), view("b", 10), view("c", 20)]
    a = [PowerOfTwo(seed=7).choose(REQ, reps, 0).id for _ in range(1)]
    p1, p2 = PowerOfTwo(seed=7), PowerOfTwo(seed=7)
    seq1 = [p1.choose(REQ, reps, 0).id for _ in range(50)]
    seq2 = [p2.choose(REQ, reps, 0).id for _ in range(50)]
    assert seq1 == seq2 and a[0] == seq1[0]
    assert "c" not in seq1  # the most loaded never wins a pair
    assert seq1.count("a") > seq1.count("b")
    assert PowerOfTwo().choose(REQ, [view("x")], 0).id == "x"


def test_prefix_aware_follows_longest_cached_prefix():
    prompt = list(range(40))
    half = index_with(prompt[:20])
    full = index_with(prompt)
    policy = PrefixAware()
    reps = [view("a", prefix=half), view("b", prefix=full), view("c")]
    assert REQ.cached_tokens(reps[0].prefix) == 20
    assert REQ.cached_tokens(reps[1].prefix) == 40 and REQ.uncached_tokens(reps[1].prefix) == 0
    assert policy.choose(REQ, reps, 0).id == "b"


def test_prefix_aware_trades_cache_against_queued_work():
    prompt = list(range(40))
    policy = PrefixAware(decode_cost_tokens=10.0)
    # b saves 40 prompt tokens; each request in flight costs 10: 3 still win, 5 lose.
    busy = [view("a", 0), view("b", 3, prefix=index_with(prompt))]
    assert policy.choose(REQ, busy, 0).id == "b"
    busier = [view("a", 0), view("b", 5, prefix=index_with(prompt))]
    assert policy.choose(REQ, busier, 0).id == "a"
    # prompts routed to b and not prefilled yet count token for token
    queued = [view("a", 1), view("b", 1, prefix=index_with(prompt), pending_prefill_tokens=50)]
    assert policy.choose(REQ, queued, 0).id == "a"
    assert policy.cost(REQ, queued[1]) == 0 + 50 + 10


def test_prefix_aware_imbalance_cap_and_no_information():
    prompt = list(range(40))
    policy = PrefixAware(decode_cost_tokens=0.0, max_imbalance=2)
    assert policy.choose(REQ, [view("a", 0), view("b", 3, prefix=index_with(prompt))], 0).id == "a"
    unknown = RouteRequest("u", None, 40, 16)
    plain = PrefixAware()
    assert plain.choose(unknown, [view("a", 2), view("b", 1)], 0).id == "b"
    assert (
        plain.choose(unknown, [view("a", 1, pending_prefill_tokens=99), view("b", 1)], 0).id == "b"
    )


def test_prefix_index_mirrors_stored_removed_cleared():
    index = PrefixIndex()
    hashes = hash_block_chain(list(range(12)), B)
    index.apply({"block_size": B, "events": [{"kind": "stored", "block_hashes": hashes}]})
    assert index.match_prefix(hashes) == 3
    index.apply({"events": [{"kind": "removed", "block_hashes": [hashes[1]]}]})
    assert index.match_prefix(hashes) == 1  # a hole stops the prefix
    index.apply({"events": [{"kind": "cleared"}]})
    assert index.match_prefix(hashes) == 0 and len(index) == 0
    index.apply({"block_size": B, "events": [{"kind": "stored", "block_hashes": hashes}]})
    index.apply({"block_size": 8, "events": []})  # another block size voids the old keys
    assert len(index) == 0 and index.block_size == 8


def test_route_request_hashes_match_the_engine_and_are_memoized():
    req = RouteRequest("x", tuple(range(10)), 10, 1)
    assert req.block_hashes(4) == hash_block_chain(list(range(10)), 4)
    assert req.block_hashes(4) is req.block_hashes(4)
    assert RouteRequest("y").block_hashes(4) == []


def test_router_filters_unusable_replicas():
    router = Router(make_policy("least_outstanding"), max_outstanding_per_replica=2)
    reps = [
        view("a", accepting=False),  # unhealthy or breaker open
        view("b", draining=True, accepting=False),
        view("c", outstanding=2),  # full
        view("d", outstanding=1, kind=ReplicaKind.OPENAI),
        view("e", outstanding=1),
    ]
    req = RouteRequest("q", exclude=frozenset({"e"}))
    assert router.route(req, reps, 0).id == "d"
    assert router.route(RouteRequest("q", exclude=frozenset({"d", "e"})), reps, 0) is None
    assert (
        router.route(
            RouteRequest("q", exclude=frozenset({"d", "e"})), reps, 0, ignore_capacity=True
        ).id
        == "c"
    )
    continuation = RouteRequest("q", needs_extensions=True)
    assert router.route(continuation, reps, 0).id == "e"
    assert router.free_slots(reps) == 0 + 1 + 1 and router.total_slots(reps) == 6

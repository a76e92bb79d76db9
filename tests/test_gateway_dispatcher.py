"""The gateway's pure decision object (`Dispatcher`) on plain data with a fake clock: no
event loop, no network, no real time. Replicas are table entries marked ready by hand."""

from __future__ import annotations

import pytest

from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.dispatcher import (
    COLD_START,
    NO_REPLICA,
    Dispatcher,
    Outcome,
    Queued,
    Refused,
    Routed,
)
from fleetserve.gateway.replica import Replica
from fleetserve.gateway.route_request import RouteRequest


def dispatcher(replicas: int = 1, **config) -> Dispatcher:
    d = Dispatcher(GatewayConfig(**{"router": "round_robin", **config}))
    for i in range(replicas):
        replica = Replica(f"r{i}", "http://127.0.0.1:9", breaker_config=d.config.breaker)
        replica.ready = True
        d.replicas[replica.id] = replica
    return d


def req(request_id: str, rank: int = 2) -> RouteRequest:
    return RouteRequest(request_id, priority_rank=rank)


def test_routes_while_slots_are_free_then_queues():
    d = dispatcher(max_outstanding_per_replica=1, replicas=2)
    first, second = d.submit(req("a"), None, 0.0), d.submit(req("b"), None, 0.0)
    assert isinstance(first, Routed) and isinstance(second, Routed)
    assert {first.replica.id, second.replica.id} == {"r0", "r1"}
    third = d.submit(req("c"), None, 0.0)
    assert isinstance(third, Queued) and len(d.queue) == 1
    assert third.ticket.expires_at == d.config.first_chunk_timeout_s  # no deadline of its own


def test_release_grants_queued_tickets_by_priority_then_arrival():
    d = dispatcher(max_outstanding_per_replica=1)
    (held,) = [d.submit(req("a"), None, 0.0).replica]
    low = d.submit(req("low", rank=3), None, 1.0).ticket
    high1 = d.submit(req("high1", rank=1), None, 2.0).ticket
    high2 = d.submit(req("high2", rank=1), None, 3.0).ticket
    grants = d.release(held, Outcome.SUCCESS, 4.0, held_s=4.0)
    assert [g.ticket for g in grants] == [high1] and grants[0].replica is held
    assert held.outstanding == 1  # the slot passed straight on
    assert [g.ticket for g in d.release(held, Outcome.SUCCESS, 5.0)] == [high2]
    assert [g.ticket for g in d.release(held, Outcome.SUCCESS, 6.0)] == [low]
    assert d.release(held, Outcome.SUCCESS, 7.0) == [] and held.outstanding == 0


def test_a_newcomer_waits_behind_the_queue_even_if_a_slot_is_free():
    d = dispatcher(max_outstanding_per_replica=1)
    held = d.submit(req("a"), None, 0.0).replica
    waiting = d.submit(req("b"), None, 0.0).ticket
    held.outstanding = 0  # a slot frees without a release (e.g. a replica came back)
    assert isinstance(d.submit(req("c"), None, 0.0), Queued)
    assert [g.ticket for g in d.grant(0.0)] == [waiting]


def test_full_queue_refuses_the_same_rank_and_displaces_a_less_urgent_one():
    d = dispatcher(max_outstanding_per_replica=1, max_queue=1)
    d.submit(req("a"), None, 0.0)
    low = d.submit(req("low", rank=3), None, 0.0).ticket
    same = d.submit(req("same", rank=3), None, 0.0)
    assert isinstance(same, Refused) and same.reason == "queue_full"
    high = d.submit(req("high", rank=1), None, 0.0)
    assert isinstance(high, Queued) and high.displaced is low
    assert d.queue.items() == [high.ticket]


def test_predicted_wait_past_the_deadline_is_shed_at_once():
    d = dispatcher(max_outstanding_per_replica=1)
    d.submit(req("a"), None, 100.0)
    d.waits.mean_service_s = 10.0  # requests hold their slot for seconds
    shed = d.submit(req("b"), deadline=100.5, now=100.0)
    assert shed == Refused("predicted_wait", 10.0)
    assert len(d.queue) == 0
    # The same request with time to spare is queued, with its deadline as expiry.
    queued = d.submit(req("b"), deadline=150.0, now=100.0)
    assert isinstance(queued, Queued) and queued.ticket.expires_at == 150.0


def test_deadline_expiry_sheds_with_a_retry_after_and_leaves_the_queue():
    d = dispatcher(max_outstanding_per_replica=1)
    d.submit(req("a"), None, 0.0)
    ticket = d.submit(req("b"), deadline=5.0, now=0.0).ticket
    assert d.expired(4.9) == [] and d.expired(5.0) == [ticket]
    refused = d.expire(ticket, 5.0)
    assert refused.reason == "deadline" and refused.retry_after_s > 0
    assert len(d.queue) == 0 and d.grant(5.0) == []


def test_expiry_with_no_replica_accepting_is_no_replica():
    d = dispatcher(max_outstanding_per_replica=1)
    d.submit(req("a"), None, 0.0)
    ticket = d.submit(req("b"), None, 0.0).ticket
    d.replicas["r0"].ready = False
    assert d.expire(ticket, 200.0) == Refused(NO_REPLICA)
    assert len(d.queue) == 0


def test_a_ticket_whose_holder_left_is_never_granted():
    d = dispatcher(max_outstanding_per_replica=1)
    held = d.submit(req("a"), None, 0.0).replica
    gone = d.submit(req("gone"), None, 0.0).ticket
    stays = d.submit(req("stays"), None, 0.0).ticket
    gone.gone = lambda: True  # its client disconnected before a slot freed
    assert [g.ticket for g in d.release(held, Outcome.NEUTRAL, 1.0)] == [stays]
    withdrawn = d.submit(req("withdrawn"), None, 1.0).ticket
    d.withdraw(withdrawn)
    assert d.release(held, Outcome.SUCCESS, 2.0) == [] and held.outstanding == 0


def test_release_teaches_the_wait_estimator_and_the_breaker():
    d = dispatcher(max_outstanding_per_replica=4, breaker_failure_threshold=1)
    replica = d.submit(req("a"), None, 0.0).replica
    before = d.waits.mean_service_s
    d.release(replica, Outcome.SUCCESS, 1.0, held_s=before + 10.0, request_id="a")
    assert d.waits.mean_service_s > before and "a" not in replica.prefilling
    replica = d.submit(req("b"), None, 2.0).replica
    d.release(replica, Outcome.FAILURE, 2.0)
    assert not replica.view(2.0).accepting  # the breaker opened
    assert d.submit(req("c"), None, 2.0).__class__ is Queued


def test_route_now_ignores_the_slot_limit_and_uses_excluded_replicas_last():
    d = dispatcher(max_outstanding_per_replica=1, replicas=2)
    d.submit(req("a"), None, 0.0)
    d.submit(req("b"), None, 0.0)
    retry = RouteRequest("c", exclude=frozenset({"r0"}))
    assert d.route_now(retry, 0.0).id == "r1"
    d.replicas["r1"].draining = True
    assert d.route_now(retry, 0.0).id == "r0"  # the last resort
    d.replicas["r0"].draining = True
    assert d.route_now(retry, 0.0) is None


@pytest.mark.parametrize("deadline", [None, 10.0])
def test_unknown_wait_without_any_replica_is_queued_or_shed(deadline):
    d = dispatcher(replicas=0)
    decision = d.submit(req("a"), deadline, 0.0)
    if deadline is None:
        assert isinstance(decision, Queued)
    else:  # no slot at all: the predicted wait is infinite, so it cannot meet a deadline
        assert decision == Refused("predicted_wait", d.config.breaker_cooldown_s)


# ---- held at zero (the fleet starts replicas on demand: `cold_start_s` is set) --------------


def test_at_zero_a_request_is_held_when_the_cold_start_meets_its_deadline():
    d = dispatcher(replicas=0)
    d.cold_start_s = 10.0
    assert isinstance(d.submit(req("no-deadline"), None, 0.0), Queued)
    assert isinstance(d.submit(req("patient"), 30.0, 0.0), Queued)
    refused = d.submit(req("hurried"), 5.0, 0.0)
    assert refused.reason == COLD_START and refused.retry_after_s >= 10.0


def test_the_hold_counts_down_the_cold_start_of_a_replica_already_loading():
    d = dispatcher(replicas=1)
    d.cold_start_s = 10.0
    loading = d.replicas["r0"]
    loading.ready, loading.loading, loading.started_at = False, True, 0.0
    assert d.cold_start_wait(8.0) == 2.0
    assert isinstance(d.submit(req("a"), 8.0 + 3.0, 8.0), Queued)
    refused = d.submit(req("b"), 8.0 + 1.0, 8.0)
    assert refused.reason == COLD_START and 2.0 <= refused.retry_after_s < 3.0
    assert d.cold_start_wait(50.0) == 0.0  # late: expected any moment


def test_without_a_cold_start_estimate_nothing_is_expected():
    d = dispatcher(replicas=0)
    assert d.cold_start_wait(0.0) is None
    assert d.submit(req("a"), 5.0, 0.0).reason == "predicted_wait"


def test_a_held_ticket_that_expires_gets_the_cold_start_as_retry_after():
    d = dispatcher(replicas=0)
    d.cold_start_s = 10.0
    ticket = d.submit(req("a"), None, 0.0).ticket
    assert d.expire(ticket, 4.0) == Refused(NO_REPLICA, 10.0)
    assert len(d.queue) == 0


def test_predicted_wait_of_a_fresh_request_counts_the_queue_and_those_arriving():
    d = dispatcher(max_outstanding_per_replica=2, replicas=2)  # 4 slots
    d.waits.mean_service_s = 1.0
    assert d.predicted_wait(0.0) == 0.0
    assert d.predicted_wait(0.0, arriving=3) == 0.0  # the fourth slot is still free
    assert d.predicted_wait(0.0, arriving=4) == pytest.approx(0.25)  # first in line
    for i in range(4):
        assert isinstance(d.submit(req(f"r{i}"), None, 0.0), Routed)
    assert d.predicted_wait(0.0) == pytest.approx(0.25)
    d.submit(req("queued"), None, 0.0)
    assert d.predicted_wait(0.0) == pytest.approx(0.5)
    assert d.predicted_wait(0.0, rank=1) == pytest.approx(0.25)  # a higher class goes first
    for replica in d.replicas.values():
        replica.ready = False
    assert d.predicted_wait(0.0) == float("inf")  # nothing accepts work, nothing starts
    d.cold_start_s = 10.0
    assert d.predicted_wait(0.0) == pytest.approx(10.0 + 2 * 1.0 / 2)

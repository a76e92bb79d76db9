"""The dispatcher (`Gateway.acquire/route_now/release`) on an event loop but without any
network: replicas are table entries marked ready by hand."""

from __future__ import annotations

import asyncio

import pytest

from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.gateway import Gateway, NoReplica, Outcome, Shed
from fleetserve.gateway.route_request import RouteRequest


def gateway(replicas: int = 1, **config) -> Gateway:
    gw = Gateway(GatewayConfig(**{"router": "round_robin", **config}))
    for _ in range(replicas):
        gw.add_replica("http://127.0.0.1:9").ready = True
    return gw


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_queue_serves_priority_first_when_a_slot_frees():
    async def scenario():
        gw = gateway(max_outstanding_per_replica=1)
        (replica,) = gw.replicas.values()
        held = await gw.acquire(RouteRequest("a"), None)
        low = asyncio.create_task(gw.acquire(RouteRequest("low", priority_rank=3), None))
        high = asyncio.create_task(gw.acquire(RouteRequest("high", priority_rank=1), None))
        await asyncio.sleep(0.01)
        assert len(gw.queue) == 2 and replica.outstanding == 1
        gw.release(held, Outcome.SUCCESS, 0.5)
        assert await high is replica and not low.done()
        gw.release(replica, Outcome.SUCCESS)
        assert await low is replica and replica.outstanding == 1

    run(scenario())


def test_full_queue_displaces_the_least_urgent():
    async def scenario():
        gw = gateway(max_outstanding_per_replica=1, max_queue=1)
        await gw.acquire(RouteRequest("a"), None)
        low = asyncio.create_task(gw.acquire(RouteRequest("low", priority_rank=3), None))
        await asyncio.sleep(0.01)
        with pytest.raises(Shed, match="queue_full"):
            await gw.acquire(RouteRequest("same", priority_rank=3), None)
        high = asyncio.create_task(gw.acquire(RouteRequest("high", priority_rank=1), None))
        with pytest.raises(Shed, match="displaced"):
            await low
        high.cancel()

    run(scenario())


def test_predicted_wait_past_the_deadline_is_shed_at_once():
    async def scenario():
        gw = gateway(max_outstanding_per_replica=1)
        await gw.acquire(RouteRequest("a"), None)
        gw.waits.observe(10.0)  # requests hold slots for seconds
        now = gw.clock()
        with pytest.raises(Shed) as shed:
            await gw.acquire(RouteRequest("b"), deadline=now + 0.5)
        assert shed.value.reason == "predicted_wait" and shed.value.retry_after_s > 0.5
        assert len(gw.queue) == 0

    run(scenario())


def test_cancelled_waiter_leaks_no_slot():
    async def scenario():
        gw = gateway(max_outstanding_per_replica=1)
        (replica,) = gw.replicas.values()
        held = await gw.acquire(RouteRequest("a"), None)
        waiter = asyncio.create_task(gw.acquire(RouteRequest("b"), None))
        await asyncio.sleep(0.01)
        gw.release(held, Outcome.SUCCESS)  # grants b's ticket ...
        waiter.cancel()  # ... but b's client is gone before it runs
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert replica.outstanding == 0

    run(scenario())


def test_no_ready_replica_gives_no_replica_after_waiting():
    async def scenario():
        gw = gateway(replica_wait_s=0.2, first_chunk_timeout_s=0.2)
        (replica,) = gw.replicas.values()
        replica.ready = False
        with pytest.raises(NoReplica):
            await gw.acquire(RouteRequest("a"), None)
        with pytest.raises(NoReplica):
            await gw.route_now(RouteRequest("b"), None)

    run(scenario())


def test_route_now_waits_for_a_replica_and_prefers_non_excluded():
    async def scenario():
        gw = gateway(replicas=2)
        r0, r1 = gw.replicas["r0"], gw.replicas["r1"]
        assert await gw.route_now(RouteRequest("a", exclude=frozenset({"r0"})), None) is r1
        r1.ready = False
        # only the excluded replica is left: used rather than failing
        assert await gw.route_now(RouteRequest("b", exclude=frozenset({"r0"})), None) is r0
        r0.ready = False

        async def heal():
            await asyncio.sleep(0.05)
            r1.ready = True
            gw.notify_changed()

        healer = asyncio.create_task(heal())
        assert await gw.route_now(RouteRequest("c"), None) is r1
        await healer

    run(scenario())


def test_failures_open_the_circuit_and_take_the_replica_out():
    async def scenario():
        gw = gateway(replicas=2, breaker_failure_threshold=2)
        r0 = gw.replicas["r0"]
        for _ in range(2):
            r0.outstanding += 1
            gw.release(r0, Outcome.FAILURE)
        picks = {(await gw.acquire(RouteRequest(str(i)), None)).id for i in range(4)}
        assert picks == {"r1"}

    run(scenario())


def test_pending_prefill_ledger_follows_requests():
    async def scenario():
        gw = gateway(replicas=1)
        (replica,) = gw.replicas.values()
        r = await gw.acquire(RouteRequest("a", tuple(range(40)), 40), None)
        assert replica.prefilling == {"a": 40} and r.view(0).pending_prefill_tokens == 40
        gw.prefill_done(r, "a")
        assert replica.prefilling == {}
        await gw.acquire(RouteRequest("b", None, 7), None)
        gw.release(r, Outcome.SUCCESS, 0.1, "b")
        assert replica.prefilling == {} and replica.outstanding == 1

    run(scenario())

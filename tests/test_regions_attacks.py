"""Regional gateways under attack (issue 16): a peer whose state body is garbage, huge,
endless or a redirect; numbers in a report that would overflow the policy's arithmetic; a
peer that does not list this region. Each must end as a failed poll or a request served
somewhere, never an exception in the routing path or a client's 400."""

from __future__ import annotations

import asyncio
import json
import math
import threading

import httpx
import pytest

from fleetserve.gateway.peers import MAX_STATE_BYTES, Peer, RegionReport, poll_once
from fleetserve.gateway.regional_config import PeerConfig, RegionsConfig
from fleetserve.gateway.route_request import RouteRequest

pytestmark = pytest.mark.timeout(60)

PEER_KEY = "peer-secret-0123456789"
GOOD = {
    "region": "b",
    "can_serve": True,
    "predicted_wait_s": 0.0,
    "replicas": 1,
    "slots": 4,
    "free_slots": 0,
    "queue_length": 2,
    "mean_service_s": 1.0,
}


def _peer() -> Peer:
    config = RegionsConfig("a", (PeerConfig("b", "http://peer-b:8000"),), peer_key=PEER_KEY)
    return Peer(config.peers[0], config)


def _poll(handler, peer: Peer | None = None, timeout_s: float = 5.0) -> bool:
    peer = peer or _peer()

    async def go() -> bool:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await poll_once(peer, client, {}, timeout_s, lambda: 0.0)

    return asyncio.run(go())


@pytest.mark.parametrize(
    "field, value",
    [
        ("slots", 10**400),
        ("queue_length", 10**400),
        ("free_slots", 10**30),
        ("replicas", 10**30),
        ("mean_service_s", math.inf),
        ("predicted_wait_s", 1e400),
    ],
    ids=lambda v: v if isinstance(v, str) else repr(v)[:8],
)
def test_a_report_with_absurd_numbers_is_refused(field, value):
    # 10**400 slots once reached the policy and raised OverflowError on every request
    # (and on /health and /metrics, which read the predicted wait too).
    with pytest.raises(ValueError, match=field):
        RegionReport.from_json({**GOOD, field: value})


def test_a_peer_sending_an_absurd_report_is_a_failed_poll_and_routing_still_works():
    body = json.dumps({**GOOD, "slots": 10**400, "queue_length": 10**400}).encode()
    peer = _peer()
    healthy = _poll(lambda request: httpx.Response(200, content=body), peer)
    assert not healthy and peer.report is None and "slots" in peer.last_error
    view = peer.view(RouteRequest("r", None, 10, 8))
    assert view.predicted_wait_s == math.inf and not view.healthy
    assert peer.describe()["predicted_wait_s"] is None


def test_an_endless_state_body_is_cut_off_at_the_limit():
    sent = 0

    async def endless():
        nonlocal sent
        chunk = b" " * 65536
        while True:
            sent += len(chunk)
            yield chunk

    peer = _peer()
    healthy = _poll(lambda request: httpx.Response(200, content=endless()), peer, timeout_s=30)
    assert not healthy
    assert "more than" in peer.last_error
    assert sent <= MAX_STATE_BYTES + 2 * 65536  # read no further than the limit


@pytest.mark.parametrize(
    "response, words",
    [
        (httpx.Response(302, headers={"Location": "http://elsewhere/region/state"}), "302"),
        (httpx.Response(200, content=b"\xff\xfe not json"), ""),
        (httpx.Response(200, content=b"[1, 2]"), "not a JSON object"),
        (httpx.Response(200, content=b'{"region": "b"'), ""),
        (httpx.Response(200, content=b"[" * 60000), "nested"),  # RecursionError in json
        (httpx.Response(200, content=json.dumps({**GOOD, "region": "a"}).encode()), "region"),
    ],
)
def test_a_garbage_state_answer_is_a_failed_poll(response, words):
    peer = _peer()
    peer.poll_succeeded(RegionReport.from_json(GOOD), 0.01, 0.0)
    peer.unhealthy_after = 1
    healthy = _poll(lambda request: response, peer)
    # a failed poll (with unhealthy_after=1 the peer is out), not a crash that keeps the
    # last good report
    assert not healthy and not peer.healthy and peer.failures == 1
    assert words in peer.last_error


# ---- a peer that does not list this region -------------------------------------------------


def test_a_peer_that_does_not_list_this_region_refuses_and_the_request_is_served_here():
    # A lists B; B (a typo, a region added on one side first) does not list A. B's refusal
    # of A's spill was a 400, which A passed to its client as the request's own fault.
    from gateway_harness import free_port, wait_until
    from test_gateway_regions import BODY, CLIENT, Region, served

    port_a, port_b = free_port(), free_port()
    a = Region("a", port_a, [("b", port_b)])
    b = Region("b", port_b, [])
    try:
        wait_until(lambda: a.gw.regions.peers["b"].serving and a.gw.any_accepting(), what="up")
        a.gw.dispatcher.waits.mean_service_s = 100.0
        a.gw.replicas["r0"].outstanding = a.gw.config.max_outstanding_per_replica
        answer = {}

        def send():
            answer["resp"] = httpx.post(
                f"{a.url}/v1/completions", json=BODY, headers=CLIENT, timeout=20
            )

        thread = threading.Thread(target=send)
        thread.start()
        wait_until(
            lambda: (
                a.metric("fleetserve:gateway_region_fallbacks_total", region="b") == 1
                or not thread.is_alive()
            ),
            what="the fallback",
        )

        def free_a_slot():
            a.gw.replicas["r0"].outstanding = 0
            a.gw.notify_changed()

        a.front.call(free_a_slot)
        thread.join(20)
        assert answer["resp"].status_code == 200, answer["resp"].text
        assert served(a) == 1 and served(b) == 0
    finally:
        a.close()
        b.close()

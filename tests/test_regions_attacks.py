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


# ---- regions files that would never finish, or say nothing ---------------------------------


def _world(**changes):
    import copy

    from test_plan import REGIONS

    from fleetserve.sim.regional_spec import regions_from_mapping

    data = copy.deepcopy(REGIONS)
    region = changes.pop("region", {})
    data["regions"][0].update(region)
    data.update(changes)
    return regions_from_mapping(data, "regions file")


@pytest.mark.parametrize(
    "changes, words",
    [
        # these ran for ever (a billion simulated replicas, or requests)
        ({"region": {"replicas": 10**9}}, "replicas"),
        ({"region": {"replicas": [10**30] * 24}}, "replicas"),
        ({"region": {"autoscale": {"min": 1, "max": 10**9}}}, "autoscale"),
        ({"day_s": 1e300}, "requests"),
        ({"region": {"traffic": {"peak_rps": 1e12}}}, "requests"),
        # outages the run never reaches (or reached at once, for no time): said nothing
        ({"outages": [{"region": "east", "at_h": 30, "for_h": 1}]}, "outside"),
        ({"start_hour": 20, "outages": [{"region": "east", "at_h": 10, "for_h": 1}]}, "outside"),
        ({"outages": [{"region": "east", "at_h": 3, "for_h": 0}]}, "for_h"),
        # a round trip given twice, differently: one silently won
        ({"rtt_ms": {"east": {"west": 90}, "west": {"east": 10}}}, "twice"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, dict) else v,
)
def test_a_regions_file_that_would_hang_or_mislead_is_a_clear_error(changes, words):
    with pytest.raises(ValueError, match=words):
        _world(**changes)


def test_a_regions_file_within_bounds_still_loads():
    spec = _world(
        start_hour=20,
        outages=[{"region": "east", "at_h": 34, "for_h": 1}],  # 10:00 the next day
        rtt_ms={"east": {"west": 90}, "west": {"east": 90}},  # both orders, the same
        region={"replicas": 64},
    )
    assert spec.outages[0].at_h == 34 and spec.rtt("west", "east") == 0.09


# ---- plan: SLOs no size meets, absurd sizes ------------------------------------------------


def test_plan_with_an_slo_no_size_meets_ends_and_says_so(tmp_path, capsys):
    from test_plan import files

    from fleetserve.cli import main

    argv = ["plan", *files(tmp_path), "--ttft-p99", "0.001", "--max-replicas", "2"]
    assert main(argv) == 1  # was a ValueError traceback
    err = capsys.readouterr().err
    assert "no plan meets the SLOs" in err and "--max-replicas 2" in err


@pytest.mark.parametrize("size", ["0", "1000000000"])
def test_plan_with_an_absurd_max_replicas_is_a_usage_error(tmp_path, capsys, size):
    from test_plan import files

    from fleetserve.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["plan", *files(tmp_path), "--ttft-p99", "250", "--max-replicas", size])
    assert exc.value.code == 2
    assert "--max-replicas" in capsys.readouterr().err


def test_an_outage_to_the_end_of_time_ends_with_the_run(tmp_path):
    # for_h: 1e300 schedules the region's return at t = 1e300 h: the run must still end
    # when its traffic does (and count the dark region's failovers).
    import copy
    import json

    from test_plan import REGIONS, files

    from fleetserve.cli import main

    regions = copy.deepcopy(REGIONS)
    regions.update(hours=3, outages=[{"region": "west", "at_h": 1, "for_h": 1e300}])
    argv = ["simulate", *files(tmp_path, regions=regions), "--no-plots"]
    argv = [a for a in argv if a not in ("--window", "8")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["regions"]["by_region"]["west"]["decisions"]["failover"] > 0


@pytest.mark.parametrize("key", ["on_demand_per_h", "spot_per_h"])
def test_an_absurd_price_is_a_clear_error(key):
    # 1e308 $/h made the day's cost inf, and writing bench.json raised (JSON has no inf)
    from fleetserve.sim.regional_spec import prices_from_mapping

    with pytest.raises(ValueError, match=key):
        prices_from_mapping({"east": {"on_demand_per_h": 1.0, key: 1e308}})


def test_a_bad_regional_section_is_named_once():
    with pytest.raises(ValueError) as exc:
        _world(regional={"x": 1})
    assert str(exc.value).count("regions file") == 1, exc.value


# ---- a recording peer: what a spilled request carries, and a client that leaves ------------


class RecordingPeer:
    """Region b's gateway, faked: its state says it is idle; its completions route records
    each request's headers and answers as `mode` says."""

    def __init__(self) -> None:
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, RedirectResponse, StreamingResponse
        from starlette.routing import Route

        self.headers: list[dict[str, str]] = []
        self.mode = "ok"
        self.release = None  # an asyncio.Event on the server's loop, for mode "hang"

        async def state(request):
            return JSONResponse({**GOOD, "free_slots": 4, "queue_length": 0})

        async def completions(request):
            self.headers.append(dict(request.headers))
            await request.body()
            if self.mode == "redirect":
                return RedirectResponse("http://127.0.0.1:9/v1/completions", status_code=307)
            if self.mode == "hang":
                self.release = asyncio.Event()
                await self.release.wait()
            if self.mode == "stream_hang":  # one chunk, then nothing

                async def events():
                    yield b'data: {"choices": [{"text": "x", "index": 0}]}\n\n'
                    await asyncio.Event().wait()

                return StreamingResponse(events(), media_type="text/event-stream")
            return JSONResponse({"choices": [{"text": "from b"}], "usage": {"total_tokens": 3}})

        self.app = Starlette(
            routes=[
                Route("/region/state", state),
                Route("/v1/completions", completions, methods=["POST"]),
            ]
        )


@pytest.fixture
def spilling():
    """Gateway a (client key `client-key`), its replica busy, and the recording peer b."""
    from gateway_harness import ThreadServer, free_port, wait_until
    from test_gateway_regions import Region

    peer = RecordingPeer()
    port_b = free_port()
    front_b = ThreadServer(peer.app, port=port_b).start()
    a = Region("a", free_port(), [("b", port_b)])
    try:
        wait_until(lambda: a.gw.regions.peers["b"].serving and a.gw.any_accepting(), what="up")
        a.gw.dispatcher.waits.mean_service_s = 100.0
        a.gw.replicas["r0"].outstanding = a.gw.config.max_outstanding_per_replica
        yield a, peer
    finally:
        a.close()
        front_b.stop()


def test_a_spilled_request_carries_the_peer_key_and_nothing_of_the_client(spilling):
    from test_gateway_regions import BODY

    a, peer = spilling
    client = {
        "Authorization": "Bearer client-key",
        "Cookie": "session=client-secret",
        "X-Api-Key": "client-secret",
        "X-Fleetserve-Priority": "batch",  # a client cannot set the peers' headers
        "Proxy-Authorization": "Basic client-secret",
        "X-Request-Id": "rid-1",
    }
    resp = httpx.post(f"{a.url}/v1/completions", json=BODY, headers=client, timeout=20)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "from b"
    assert resp.headers["x-request-id"] == "rid-1"
    (got,) = peer.headers
    assert got["authorization"] == f"Bearer {PEER_KEY}"
    assert got["x-fleetserve-spilled-from"] == "a"
    assert got["x-fleetserve-priority"] == "normal"  # the client key's class, not its say
    assert not any("client" in value for value in got.values()), got
    assert "cookie" not in got and "proxy-authorization" not in got


def test_a_peer_redirecting_a_spill_is_not_followed_and_the_request_is_served_here(spilling):
    import threading

    from gateway_harness import wait_until
    from test_gateway_regions import BODY, CLIENT, served

    a, peer = spilling
    peer.mode = "redirect"
    answer = {}

    def send():
        answer["resp"] = httpx.post(
            f"{a.url}/v1/completions", json=BODY, headers=CLIENT, timeout=20
        )

    thread = threading.Thread(target=send)
    thread.start()
    wait_until(lambda: a.metric("fleetserve:gateway_region_fallbacks_total", region="b") == 1,
               what="the fallback")  # fmt: skip

    def free_a_slot():
        a.gw.replicas["r0"].outstanding = 0
        a.gw.notify_changed()

    a.front.call(free_a_slot)
    thread.join(20)
    assert answer["resp"].status_code == 200 and served(a) == 1
    assert len(peer.headers) == 1  # asked once; the redirect's target never


def test_a_client_leaving_a_spilled_request_frees_its_admission_and_the_peer_count(spilling):
    import threading

    from gateway_harness import wait_until
    from test_gateway_regions import BODY, CLIENT

    a, peer = spilling
    peer.mode = "hang"

    def send():
        try:
            httpx.post(f"{a.url}/v1/completions", json=BODY, headers=CLIENT, timeout=1.0)
        except httpx.TimeoutException:
            pass  # the client gives up and closes its connection

    thread = threading.Thread(target=send)
    thread.start()
    wait_until(lambda: len(peer.headers) == 1, what="the spill")
    assert a.gw.regions.peers["b"].in_flight == 1
    thread.join(10)
    wait_until(lambda: a.gw.regions.peers["b"].in_flight == 0, what="the peer's count back")
    wait_until(
        lambda: a.metric("fleetserve:gateway_requests_total", status="499") == 1,
        what="a 499",
    )
    state = a.gw.admission._keys["default"]
    assert state.concurrent == 0


@pytest.mark.parametrize(
    "key", [f"{PEER_KEY}\n", f" {PEER_KEY}", "peer secret with spaces", "k\x00" * 9]
)
def test_a_peer_key_no_header_can_carry_is_refused(key):
    # A key with a newline (an env var from a file) could not be sent (h11 refuses the
    # header: every poll failed) nor matched (the presented key is stripped): the peers
    # never saw each other, and nothing said why.
    with pytest.raises(ValueError, match="peer key"):
        RegionsConfig("a", (PeerConfig("b", "http://peer-b:8000"),), peer_key=key)


@pytest.mark.parametrize("name", ["poll_interval_s", "poll_timeout_s"])
def test_a_poll_period_past_an_hour_is_refused(name):
    # poll_timeout_s: 1e300 let a peer that stopped answering mid-poll stay "healthy" on its
    # last report for ever; poll_interval_s: 1e300 polled a peer once.
    peers = (PeerConfig("b", "http://peer-b:8000"),)
    with pytest.raises(ValueError, match=name):
        RegionsConfig("a", peers, peer_key=PEER_KEY, **{name: 1e300})


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--window", "nan"], "window"),  # was a traceback from deep in the first window
        (["--window", "inf"], "window"),
        (["--cold-start", "nan"], "cold_start_s"),  # "cannot convert float NaN to integer"
        (["--cold-start", "inf"], "cold_start_s"),
        (["--tpot-p50", "inf"], "--tpot-p50 must be"),  # an objective nothing can miss
    ],
)
def test_plan_with_a_non_finite_flag_is_a_usage_error(tmp_path, capsys, extra, words):
    from test_plan import files

    from fleetserve.cli import main

    argv = [a for a in files(tmp_path) if a not in ("--window", "8")]
    with pytest.raises(SystemExit) as exc:
        main(["plan", *argv, "--ttft-p99", "250", *extra])
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_a_client_leaving_a_spilled_stream_frees_its_admission_and_the_peer_count(spilling):
    from gateway_harness import wait_until
    from test_gateway_regions import BODY, CLIENT

    a, peer = spilling
    peer.mode = "stream_hang"
    body = {**BODY, "stream": True}
    with httpx.stream("POST", f"{a.url}/v1/completions", json=body, headers=CLIENT,
                      timeout=10) as resp:  # fmt: skip
        assert resp.status_code == 200
        first = next(resp.iter_lines())
        assert first.startswith("data:") and len(peer.headers) == 1
    # the client left mid-stream
    wait_until(lambda: a.gw.regions.peers["b"].in_flight == 0, what="the peer's count back")
    assert a.gw.admission._keys["default"].concurrent == 0


def test_a_peer_url_that_is_this_gateway_never_becomes_a_peer():
    from gateway_harness import free_port, wait_until
    from test_gateway_regions import BODY, CLIENT, Region, served

    port = free_port()
    a = Region("a", port, [("b", port)])  # "b" is a itself
    try:
        peer = a.gw.regions.peers["b"]
        wait_until(lambda: peer.failures >= 2 and a.gw.any_accepting(), what="two polls")
        assert not peer.serving and "region 'a'" in peer.last_error
        resp = httpx.post(f"{a.url}/v1/completions", json=BODY, headers=CLIENT, timeout=20)
        assert resp.status_code == 200 and served(a) == 1
        assert httpx.get(f"{a.url}/health").json()["regions"]["peers"]["b"]["healthy"] is False
    finally:
        a.close()

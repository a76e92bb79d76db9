"""Regional gateways (issue 16, the live side): the regional options and their errors, the
peer bookkeeping on plain data, and two gateways in threads over fake replicas: the state
route and the spilled-request header behind the peer key, a spill and its counters, a peer
that fails before the first byte (served locally), and failover when the local replicas are
gone. The loopback test with tiny-model replicas and a delaying proxy is in
tests/test_regions_live.py."""

from __future__ import annotations

import argparse
import hashlib
import math
import threading

import httpx
import pytest
import yaml
from gateway_harness import FAST_GATEWAY, ThreadServer, free_port, sse_texts, wait_until
from prometheus_client.parser import text_string_to_metric_families

from fleetserve.gateway.api_keys import (
    ApiKey,
    ApiKeyStore,
    KeyLimits,
    single_key_store,
    with_operator_key,
)
from fleetserve.gateway.app import create_app
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.options import add_gateway_arguments
from fleetserve.gateway.peers import Peer, RegionReport, SentPrefixes
from fleetserve.gateway.regional_config import (
    SPILLED_FROM_HEADER,
    PeerConfig,
    RegionsConfig,
    parse_peer,
)
from fleetserve.gateway.regional_options import (
    add_regional_arguments,
    check_peer_key,
    regions_from_args,
)
from fleetserve.gateway.route_request import RouteRequest
from fleetserve.regions.policy import RegionalConfig
from fleetserve.testing.fake_replica import ByteTokenizer, FakeReplica, FakeSettings

pytestmark = pytest.mark.timeout(60)

PEER_KEY = "peer-secret-0123456789"
OPERATOR_KEY = "operator-secret"
PEER = {"Authorization": f"Bearer {PEER_KEY}"}


# ---- options -------------------------------------------------------------------------------


def _args(argv: list[str], monkeypatch=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_gateway_arguments(parser)
    add_regional_arguments(parser)
    return parser.parse_args(argv)


def test_peer_flag_parses_name_url_and_rtt():
    assert parse_peer("us=http://10.0.0.5:8000@80") == PeerConfig(
        "us", "http://10.0.0.5:8000", 0.08
    )
    assert parse_peer("eu-west=https://gw.example/") == PeerConfig("eu-west", "https://gw.example")
    for bad, words in [
        ("us", "NAME=URL"),
        ("=http://x:1", "NAME=URL"),
        ("us=http://x:1@fast", "milliseconds"),
        ("us=ftp://x:1", "http"),
        ("u s=http://x:1", "peer name"),
        ("us=http://x:1@-5", ">= 0"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_peer(bad)


def test_flags_give_the_regional_settings(monkeypatch):
    monkeypatch.setenv("FLEETSERVE_PEER_KEY", PEER_KEY)
    args = _args(
        ["--region", "eu", "--peer", "us=http://127.0.0.1:9001@90", "--peer", "ap=http://127.0.0.1:9002",
         "--regional-policy", "least_load", "--max-spill-fraction", "0.25", "--spill-window", "30",
         "--spill-min-gain", "0.1", "--prefill-s-per-token", "0.001", "--peer-poll-interval", "0.5"]
    )  # fmt: skip
    regions = regions_from_args(args)
    assert regions.region == "eu" and regions.policy == "least_load"
    assert [(p.name, p.rtt_s) for p in regions.peers] == [("us", 0.09), ("ap", None)]
    assert regions.peer_key == PEER_KEY and regions.poll_interval_s == 0.5
    c = regions.policy_config
    assert (c.max_spill_fraction, c.window_s, c.min_gain_s, c.prefill_s_per_token) == (
        0.25, 30.0, 0.1, 0.001,
    )  # fmt: skip
    assert regions_from_args(_args([])) is None


def test_gateway_config_regions_mapping_and_flags_win(tmp_path, monkeypatch):
    monkeypatch.delenv("FLEETSERVE_PEER_KEY", raising=False)
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({"max_queue": 10, "regions": {
        "region": "eu", "peer_key": PEER_KEY, "policy": "spill", "max_spill_fraction": 0.3,
        "unhealthy_after": 2,
        "peers": [{"name": "us", "url": "http://127.0.0.1:9001", "rtt_ms": 120}],
    }}))  # fmt: skip
    regions = regions_from_args(_args(["--gateway-config", str(path)]))
    assert regions.region == "eu" and regions.unhealthy_after == 2
    assert regions.peers == (PeerConfig("us", "http://127.0.0.1:9001", 0.12),)
    assert regions.policy_config.max_spill_fraction == 0.3
    flagged = regions_from_args(
        _args(["--gateway-config", str(path), "--region", "ap", "--regional-policy", "local"])
    )
    assert (flagged.region, flagged.policy) == ("ap", "local")


@pytest.mark.parametrize(
    "section, words",
    [
        ({"region": "eu", "colour": 1}, "unknown keys"),
        ({"peers": []}, "give this gateway's region"),
        ({"region": "eu", "policy": "nearest"}, "unknown 'nearest'"),
        ({"region": "eu", "max_spill_fraction": "half"}, "must be a number"),
        ({"region": "eu", "max_spill_fraction": 2}, "<= 1"),
        ({"region": "eu", "unhealthy_after": 0}, ">= 1"),
        ({"region": "eu", "peers": [{"name": "us"}]}, "must be a string"),
        ({"region": "eu", "peers": [{"name": "us", "url": "http://x:1", "rtt": 5}]}, "rtt_ms"),
        ({"region": "eu", "peers": [{"name": "eu", "url": "http://x:1"}], "peer_key": PEER_KEY},
         "own region"),
        ({"region": "eu", "peers": [{"name": "us", "url": "http://x:1"}]}, "need a peer key"),
        ({"region": "eu", "peer_key": "short"}, "at least 16"),
        ({"region": "eu", "peer_key": PEER_KEY, "peers": [
            {"name": "us", "url": "http://x:1"}, {"name": "us", "url": "http://y:1"}]},
         "named twice"),
    ],
)  # fmt: skip
def test_bad_regional_settings_are_clear_errors(tmp_path, monkeypatch, section, words):
    monkeypatch.delenv("FLEETSERVE_PEER_KEY", raising=False)
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({"regions": section}))
    with pytest.raises(ValueError, match=words):
        regions_from_args(_args(["--gateway-config", str(path)]))


def test_regional_flags_need_a_region():
    with pytest.raises(ValueError, match="--peer need --region"):
        regions_from_args(_args(["--peer", "us=http://x:1"]))


def test_the_peer_key_is_no_client_or_operator_key():
    regions = RegionsConfig("eu", peer_key=PEER_KEY)
    check_peer_key(regions, with_operator_key(single_key_store("client-key"), OPERATOR_KEY))
    with pytest.raises(ValueError, match="also a client or operator key"):
        check_peer_key(regions, single_key_store(PEER_KEY))
    with pytest.raises(ValueError, match="also a client or operator key"):
        check_peer_key(regions, with_operator_key(None, PEER_KEY))


def test_the_cli_names_a_bad_peer(capsys):
    from fleetserve.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["gateway", "--replica", "http://127.0.0.1:1", "--region", "eu",
              "--peer", "us=http://127.0.0.1:2@soon"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "milliseconds" in capsys.readouterr().err


# ---- peers on plain data --------------------------------------------------------------------


def _report(**kw) -> RegionReport:
    fields = {"region": "us", "can_serve": True, "predicted_wait_s": 0.0, "replicas": 1,
              "slots": 4, "free_slots": 2, "queue_length": 0, "mean_service_s": 1.0}  # fmt: skip
    return RegionReport(**{**fields, **kw})


def _peer(**kw) -> Peer:
    config = RegionsConfig("eu", (PeerConfig("us", "http://x:1", 0.1),), peer_key=PEER_KEY, **kw)
    return Peer(config.peers[0], config)


def test_peer_is_unhealthy_until_polled_then_after_failures_and_healthy_after_a_success():
    peer = _peer(unhealthy_after=2)
    assert not peer.view(RouteRequest("r")).healthy
    peer.poll_succeeded(_report(), 0.2, now=1.0)
    assert peer.healthy and peer.view(RouteRequest("r")).healthy
    peer.poll_failed("timeout")
    assert peer.healthy  # one failure is not enough
    peer.poll_failed("timeout")
    assert not peer.healthy
    peer.poll_succeeded(_report(), 0.2, now=3.0)
    assert peer.healthy and peer.failures == 0
    # a peer that cannot serve is not a place to send requests, though it answers
    peer.poll_succeeded(_report(can_serve=False, predicted_wait_s=math.inf), 0.2, now=4.0)
    assert peer.healthy and not peer.view(RouteRequest("r")).healthy


def test_rtt_is_a_moving_average_from_the_configured_estimate():
    peer = _peer(rtt_alpha=0.5)
    assert peer.rtt_s == 0.1
    peer.poll_succeeded(_report(), 0.3, now=1.0)
    assert peer.rtt_s == pytest.approx(0.2)
    peer.poll_succeeded(_report(), 0.2, now=2.0)
    assert peer.rtt_s == pytest.approx(0.2)


def test_a_peer_answering_as_another_region_is_a_failed_poll():
    peer = _peer(unhealthy_after=1)
    peer.poll_succeeded(_report(region="ap"), 0.1, now=1.0)
    assert not peer.healthy and "region 'ap'" in peer.last_error


def test_requests_sent_since_the_report_raise_the_predicted_wait():
    peer = _peer()
    peer.poll_succeeded(_report(free_slots=2, slots=4, mean_service_s=1.0), 0.1, now=1.0)
    assert peer.predicted_wait() == 0.0
    for _ in range(2):
        peer.sent(RouteRequest("r"))
    assert peer.predicted_wait() == pytest.approx(0.25)  # third in line for 4 slots of 1 s
    peer.sent(RouteRequest("r"))
    assert peer.predicted_wait() == pytest.approx(0.5)
    peer.poll_succeeded(_report(free_slots=0, queue_length=3), 0.1, now=2.0)  # fresh report
    assert peer.predicted_wait() == pytest.approx(1.0)
    assert peer.in_flight == 3


def test_sent_prompts_give_the_peer_a_prefix_bounded_by_lru():
    peer = _peer(max_prefix_blocks=6)
    peer.poll_succeeded(_report(block_size=4), 0.1, now=1.0)
    prompt = tuple(range(16))  # 4 blocks of 4
    peer.sent(RouteRequest("a", prompt_token_ids=prompt, num_prompt_tokens=16))
    longer = RouteRequest("b", prompt_token_ids=prompt + (99,) * 8, num_prompt_tokens=24)
    assert peer.cached_tokens(longer) == 16
    assert peer.view(longer).cached_prefix_tokens == 16
    other = tuple(range(100, 116))
    peer.sent(RouteRequest("c", prompt_token_ids=other, num_prompt_tokens=16))
    assert len(peer.prefixes) == 6  # the oldest two blocks of the first prompt went
    assert peer.cached_tokens(longer) == 0
    # a new block size voids what was remembered
    peer.poll_succeeded(_report(block_size=8), 0.1, now=2.0)
    assert len(peer.prefixes) == 0


def test_sent_prefixes_match_leading_blocks_only():
    index = SentPrefixes(10)
    index.remember([1, 2, 3])
    assert index.match_prefix([1, 2, 9, 3]) == 2 and index.match_prefix([4, 1]) == 0


def test_region_report_round_trips_and_rejects_junk():
    report = _report(predicted_wait_s=math.inf, block_size=16)
    data = report.to_json()
    assert data["predicted_wait_s"] is None
    assert RegionReport.from_json(data) == report
    for junk in [[], {**data, "region": "no spaces"}, {**data, "slots": -1},
                 {**data, "can_serve": "yes"}, {**data, "mean_service_s": "1"}]:  # fmt: skip
        with pytest.raises(ValueError):
            RegionReport.from_json(junk)


# ---- two gateways in threads over fake replicas --------------------------------------------


class Region:
    """A regional gateway in a thread over fake replicas in threads, on a port fixed before
    it starts (its peers are configured with it)."""

    def __init__(self, name, port, peers, n=1, policy="spill", settings=None, **config):
        self.fakes = [FakeReplica(settings or FakeSettings(token_delay_s=0.002)) for _ in range(n)]
        self.servers = [ThreadServer(f.app()).start() for f in self.fakes]
        regions = RegionsConfig(
            name,
            tuple(PeerConfig(p, f"http://127.0.0.1:{port_}", 0.01) for p, port_ in peers),
            policy=policy,
            # no cap: these tests are about the mechanics (the cap is the policy's, tested pure)
            policy_config=RegionalConfig(max_spill_fraction=1.0),
            peer_key=PEER_KEY,
            poll_interval_s=0.1,
            poll_timeout_s=1.0,
            unhealthy_after=2,
        )
        self.gw = Gateway(
            GatewayConfig(**{**FAST_GATEWAY, **config}),
            with_operator_key(single_key_store("client-key"), OPERATOR_KEY),
            ByteTokenizer(),
            regions=regions,
        )
        for server in self.servers:
            self.gw.add_replica(server.url)
        self.front = ThreadServer(create_app(self.gw), port=port).start()
        self.url = self.front.url

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=_bearer(OPERATOR_KEY)).text
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and set(labels.items()) <= set(s.labels.items())
        )

    def close(self) -> None:
        self.front.stop()
        for s in self.servers:
            s.stop()


def served(region: Region) -> int:
    """Client requests its replica generated for (its probes left out)."""
    return sum(1 for rid in region.fakes[0].request_ids if not rid.startswith("probe-"))


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


CLIENT = _bearer("client-key")
BODY = {"model": "fake", "prompt": "hello regions", "max_tokens": 8, "temperature": 0}


@pytest.fixture
def pair():
    port_a, port_b = free_port(), free_port()
    a = Region("a", port_a, [("b", port_b)])
    b = Region("b", port_b, [("a", port_a)])
    try:
        for region in (a, b):
            wait_until(lambda r=region: r.gw.any_accepting(), what="replicas ready")
        for region in (a, b):  # and each has heard so from the other
            wait_until(lambda r=region: all(p.serving for p in r.gw.regions.peers.values()),
                       what="peers polled")  # fmt: skip
        yield a, b
    finally:
        a.close()
        b.close()


def test_the_state_route_needs_the_peer_key(pair):
    a, _ = pair
    assert httpx.get(f"{a.url}/region/state").status_code == 401
    assert httpx.get(f"{a.url}/region/state", headers=CLIENT).status_code == 401
    assert httpx.get(f"{a.url}/region/state", headers=_bearer(OPERATOR_KEY)).status_code == 401
    state = httpx.get(f"{a.url}/region/state", headers=PEER).json()
    assert state["region"] == "a" and state["can_serve"] is True
    assert state["replicas"] == 1 and state["predicted_wait_s"] == 0.0
    assert state["slots"] == FAST_GATEWAY.get("max_outstanding_per_replica", 64)


def test_the_state_route_is_off_without_regions():
    gw = Gateway(GatewayConfig(**FAST_GATEWAY))
    front = ThreadServer(create_app(gw)).start()
    try:
        resp = httpx.get(f"{front.url}/region/state", headers=PEER)
        assert resp.status_code == 403 and "peer key" in resp.json()["error"]["message"]
        # and a client cannot claim to be a peer of a gateway that has none
        forged = {SPILLED_FROM_HEADER: "b", **PEER}
        resp = httpx.post(f"{front.url}/v1/completions", json=BODY, headers=forged)
        assert resp.status_code == 403
    finally:
        front.stop()


def test_a_forged_spilled_from_header_is_refused(pair):
    a, b = pair
    url = f"{b.url}/v1/completions"
    # a client's key (or none) with the header: refused, not served as a peer's request
    for headers in ({SPILLED_FROM_HEADER: "a", **CLIENT}, {SPILLED_FROM_HEADER: "a"}):
        resp = httpx.post(url, json=BODY, headers=headers)
        assert resp.status_code == 403, resp.text
        assert SPILLED_FROM_HEADER in resp.json()["error"]["message"]
    # the peer key naming a region that is not a peer: 403 (a 400 would reach the client)
    resp = httpx.post(url, json=BODY, headers={SPILLED_FROM_HEADER: "zz", **PEER})
    assert resp.status_code == 403
    # the peer key alone is no client key
    assert httpx.post(url, json=BODY, headers=PEER).status_code == 401
    # the real thing: served here, counted as spilled in from a
    resp = httpx.post(url, json=BODY, headers={SPILLED_FROM_HEADER: "a", **PEER})
    assert resp.status_code == 200, resp.text
    assert b.metric("fleetserve:gateway_region_requests_total", region="a", direction="in") == 1
    assert b.metric("fleetserve:gateway_region_decisions_total", reason="pinned") == 1


def test_a_busy_region_spills_and_the_peer_serves_it(pair):
    a, b = pair
    # A looks busy (its queue is long): the policy sends the next request to B.
    a.gw.dispatcher.waits.mean_service_s = 100.0
    a.gw.replicas["r0"].outstanding = a.gw.config.max_outstanding_per_replica
    resp = httpx.post(f"{a.url}/v1/completions", json=BODY, headers=CLIENT, timeout=10)
    assert resp.status_code == 200, resp.text
    assert served(b) == 1 and served(a) == 0
    assert a.metric("fleetserve:gateway_region_requests_total", region="b", direction="out",
                    reason="spill") == 1  # fmt: skip
    assert b.metric("fleetserve:gateway_region_requests_total", region="a", direction="in",
                    reason="spill") == 1  # fmt: skip
    # streamed: the same, passed through
    with httpx.stream("POST", f"{a.url}/v1/completions", json={**BODY, "stream": True},
                      headers=CLIENT, timeout=10) as resp:  # fmt: skip
        assert resp.status_code == 200
        text, chunks = sse_texts(resp.iter_lines(), chat=False)
    assert len(text) == 8 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert served(b) == 2
    assert a.metric("fleetserve:gateway_peer_healthy", region="b") == 1
    assert a.metric("fleetserve:gateway_peer_rtt_seconds", region="b") > 0
    health = httpx.get(f"{a.url}/health").json()
    assert health["regions"]["region"] == "a"
    assert health["regions"]["peers"]["b"]["healthy"] is True
    assert "url" not in health["regions"]["peers"]["b"]


def test_a_peer_failing_before_the_first_byte_leaves_the_request_here(pair):
    a, b = pair
    a.gw.dispatcher.waits.mean_service_s = 100.0
    a.gw.replicas["r0"].outstanding = a.gw.config.max_outstanding_per_replica
    # B's replica fails every generation (its probes pass): B answers 502, before any byte.
    b.fakes[0].s.fail_status, b.fakes[0].s.fail_count = 503, 1000
    answer = {}

    def send():
        answer["resp"] = httpx.post(f"{a.url}/v1/completions", json=BODY, headers=CLIENT,
                                    timeout=20)  # fmt: skip

    thread = threading.Thread(target=send)
    thread.start()
    wait_until(lambda: a.metric("fleetserve:gateway_region_fallbacks_total", region="b") == 1,
               what="the fallback")  # fmt: skip

    def free_a_slot():  # the request now waits in A's queue: give it A's replica
        a.gw.replicas["r0"].outstanding = 0
        a.gw.notify_changed()

    a.front.call(free_a_slot)
    thread.join(20)
    assert answer["resp"].status_code == 200, answer["resp"].text
    assert served(a) == 1  # B was asked, and failed it


def test_failover_when_the_local_replicas_are_gone(pair):
    a, b = pair
    a.servers[0].stop()  # A's only replica dies
    for _ in range(3):
        resp = httpx.post(f"{a.url}/v1/completions", json=BODY, headers=CLIENT, timeout=20)
        assert resp.status_code == 200, resp.text
    assert served(b) == 3
    assert a.metric("fleetserve:gateway_region_requests_total", region="b", direction="out",
                    reason="failover") == 3  # fmt: skip
    wait_until(lambda: httpx.get(f"{a.url}/health").json()["status"] != "ok", what="probe")
    health = httpx.get(f"{a.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "failing over to peer regions"


def test_a_failed_over_request_is_admitted_and_counted_once(pair):
    """A's replica looks up but answers 503 to every request; a key allowed one request at
    a time streams through B after A's replica failed it. While that stream runs, the
    key's slot is still taken at A (the local attempt used to give it back before the
    failover: every further request of the key went through too), and when it ends A
    counts it once, as a 200 (it was a 503 and a 200)."""
    a, b = pair
    limited = hashlib.sha256(b"limited-key").digest()
    a.gw.api_keys = with_operator_key(
        ApiKeyStore([(limited, ApiKey("limited", KeyLimits(max_concurrent=1)))]), OPERATOR_KEY
    )
    key = a.gw.api_keys.lookup("limited-key")
    # B's stream lasts a few seconds; A's replica fails what it is sent (not its probes)
    httpx.post(f"{b.servers[0].url}/fake/control", json={"token_delay_s": 0.05}).raise_for_status()
    httpx.post(
        f"{a.servers[0].url}/fake/control", json={"fail_status": 503, "fail_count": 1000}
    ).raise_for_status()
    headers = _bearer("limited-key")
    body = {**BODY, "max_tokens": 60, "stream": True}
    with httpx.stream("POST", f"{a.url}/v1/completions", json=body, headers=headers,
                      timeout=30) as stream:  # fmt: skip
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert served(a) >= 1  # A was tried first, and failed it
        assert a.front.call(lambda: a.gw.admission.concurrent(key)) == 1
        second = httpx.post(f"{a.url}/v1/completions", json=BODY, headers=headers, timeout=30)
        assert second.status_code == 429, second.text
        for _ in lines:
            pass
    wait_until(lambda: a.front.call(lambda: a.gw.admission.concurrent(key)) == 0, 10,
               what="the slot given back at the stream's end")  # fmt: skip
    endpoint = "/v1/completions"
    assert a.metric("fleetserve:gateway_requests_total", endpoint=endpoint, status="200") == 1
    assert a.metric("fleetserve:gateway_requests_total", endpoint=endpoint, status="503") == 0
    assert a.metric("fleetserve:gateway_requests_total", endpoint=endpoint, status="502") == 0


def test_local_policy_never_leaves_the_region():
    port_a, port_b = free_port(), free_port()
    a = Region("a", port_a, [("b", port_b)], policy="local", replica_wait_s=0.5,
               first_chunk_timeout_s=1.0)  # fmt: skip
    b = Region("b", port_b, [("a", port_a)])
    try:
        wait_until(lambda: a.gw.regions.peers["b"].serving and a.gw.any_accepting(), what="up")
        a.servers[0].stop()
        resp = httpx.post(f"{a.url}/v1/completions", json=BODY, headers=CLIENT, timeout=20)
        assert resp.status_code in (502, 503), resp.text
        assert served(b) == 0
    finally:
        a.close()
        b.close()


def test_serve_with_a_region_runs_a_regional_gateway_and_checks_its_peers(capsys, monkeypatch):
    from fleetserve.cli import main

    monkeypatch.delenv("FLEETSERVE_PEER_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "/nonexistent", "--region", "eu", "--peer", "us=http://127.0.0.1:2"])
    assert exit_info.value.code == 2
    assert "need a peer key" in capsys.readouterr().err

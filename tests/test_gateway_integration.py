"""The gateway against fake replicas served in threads of this process: streams, retries,
mid-stream migration (death, stall, error), disconnects, admission, draining, probes and
prefix-aware routing."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from gateway_harness import FAST_GATEWAY, ThreadServer, sse_texts, wait_until

from fleetserve.gateway.api_keys import hash_key, load_api_keys, with_operator_key
from fleetserve.gateway.app import create_app
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.replica import ReplicaKind
from fleetserve.testing.fake_replica import ByteTokenizer, FakeReplica, FakeSettings

pytestmark = pytest.mark.timeout(60)

FAST = FAST_GATEWAY


OPERATOR_KEY = "operator-secret"


class Fleet:
    """`api_keys` None: clients anonymous, the admin routes on with OPERATOR_KEY."""

    def __init__(
        self, n: int = 3, api_keys=None, kinds=None, upstream_api_key=None, **config
    ) -> None:
        self.fakes = [FakeReplica(FakeSettings(token_delay_s=0.002)) for _ in range(n)]
        self.servers = [ThreadServer(f.app()).start() for f in self.fakes]
        keys = api_keys if api_keys is not None else with_operator_key(None, OPERATOR_KEY)
        self.gw = Gateway(
            GatewayConfig(**{**FAST, **config}),
            keys,
            ByteTokenizer(),
            upstream_api_key=upstream_api_key,
        )
        for i, server in enumerate(self.servers):
            kind = kinds[i] if kinds else ReplicaKind.FLEETSERVE
            self.gw.add_replica(server.url, kind)
        self.front = ThreadServer(create_app(self.gw)).start()
        self.url = self.front.url
        wait_until(lambda: all(r.ready for r in self.gw.replicas.values()), what="replicas ready")

    def control(self, i: int, **settings) -> None:
        httpx.post(f"{self.servers[i].url}/fake/control", json=settings).raise_for_status()

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", headers=_bearer(OPERATOR_KEY)).text

    def close(self) -> None:
        self.front.stop()
        for s in self.servers:
            s.stop()


@pytest.fixture
def fleet():
    f = Fleet()
    yield f
    f.close()


def stream(url: str, chat: bool, body: dict, headers=None) -> tuple[str, list[dict]]:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with httpx.stream(
        "POST", url + path, json={**body, "stream": True}, headers=headers, timeout=30
    ) as resp:
        assert resp.status_code == 200, resp.read()
        return sse_texts(resp.iter_lines(), chat)


CHAT = {
    "model": "fake",
    "messages": [{"role": "user", "content": "tell me a story"}],
    "max_tokens": 40,
    "temperature": 0,
}
COMPLETION = {"model": "fake", "prompt": "Once upon a time", "max_tokens": 40}


def reference(fleet: Fleet, chat: bool, body: dict) -> str:
    return stream(fleet.servers[2].url, chat, body)[0]


@pytest.mark.parametrize("chat", [True, False])
def test_stream_passes_through_and_hides_token_ids(fleet, chat):
    body = CHAT if chat else COMPLETION
    text, chunks = stream(fleet.url, chat, body)
    assert text == reference(fleet, chat, body) and len(text) == 40
    assert all(
        "token_ids" not in c and "prompt_token_ids" not in c
        for ch in chunks
        for c in [ch, *ch["choices"]]
    )
    _, with_ids = stream(fleet.url, chat, {**body, "return_token_ids": True})
    assert sum(len(c.get("token_ids") or []) for ch in with_ids for c in ch["choices"]) == 40


def test_unary_and_request_id(fleet):
    resp = httpx.post(
        f"{fleet.url}/v1/completions", json=COMPLETION, headers={"X-Request-Id": "abc123"}
    )
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "abc123"
    assert resp.json()["choices"][0]["text"] == reference(fleet, False, COMPLETION)
    assert any("abc123" in f.request_ids for f in fleet.fakes)
    assert httpx.get(f"{fleet.url}/v1/models").json()["data"][0]["id"] == "fake"
    assert httpx.get(f"{fleet.url}/health").status_code == 200


@pytest.mark.parametrize("chat", [True, False])
def test_migration_when_replicas_die_mid_stream(fleet, chat):
    body = CHAT if chat else COMPLETION
    expected = reference(fleet, chat, body)
    fleet.control(0, die_after_tokens=5)
    fleet.control(1, die_after_tokens=12)
    for _ in range(4):  # round after round lands on the dying replicas
        text, chunks = stream(fleet.url, chat, {**body, "stream_options": {"include_usage": True}})
        assert text == expected
        usage = chunks[-1]["usage"]
        assert usage["completion_tokens"] == 40 and usage["prompt_tokens"] > 0
        assert len({c["id"] for c in chunks}) == 1
    assert "fleetserve:gateway_migrations_total" in fleet.metrics()
    assert _counter(fleet.metrics(), "fleetserve:gateway_migrations_total") >= 1


@pytest.mark.parametrize("chat", [True, False])
def test_migration_without_max_tokens_gives_what_the_replica_would_have(fleet, chat):
    """A chat stream without max_tokens runs to the context length, a completion stream
    without it to 16 tokens: a migrated one too, with every field reaching the replica."""
    for i in range(3):
        fleet.control(i, max_model_len=120)
    body = {**(CHAT if chat else COMPLETION), "cache_salt": "tenant-a", "seed": 7}
    body.pop("max_tokens")
    prompt_len = len(
        ByteTokenizer().apply_chat_template(CHAT["messages"]) if chat else COMPLETION["prompt"]
    )
    expected = reference(fleet, chat, body)
    assert len(expected) == (120 - prompt_len if chat else 16)
    fleet.control(0, die_after_tokens=5)
    fleet.control(1, die_after_tokens=12)
    for fake in fleet.fakes:
        fake.bodies.clear()
    for _ in range(3):
        text, chunks = stream(fleet.url, chat, body)
        assert text == expected
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    continued = [b for f in fleet.fakes for b in f.bodies if isinstance(b.get("prompt"), list)]
    assert continued, "no stream was continued"
    for cont in continued:
        assert cont["cache_salt"] == "tenant-a" and cont["seed"] != 7
        sent = len(cont["prompt"]) - prompt_len
        assert cont["max_tokens"] == (None if chat else 16 - sent)


def test_migration_keeps_stop_strings_across_the_seam(fleet):
    expected_full = reference(fleet, False, COMPLETION)
    stop = expected_full[3:7]  # the replica dies after 5 tokens: inside this string
    with_stop = {**COMPLETION, "stop": [stop]}
    expected = reference(fleet, False, with_stop)
    assert expected == expected_full[: expected_full.index(stop)]
    fleet.control(0, die_after_tokens=5)
    fleet.control(1, die_after_tokens=5)
    for _ in range(3):
        text, chunks = stream(fleet.url, False, with_stop)
        assert text == expected
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_migration_when_a_stream_stalls(fleet):
    expected = reference(fleet, True, CHAT)
    fleet.control(0, stall_after_tokens=3)
    fleet.control(1, stall_after_tokens=3)
    text, _ = stream(fleet.url, True, CHAT)
    assert text == expected
    assert 'reason="stall"' in fleet.metrics()


def test_retry_before_first_byte_and_client_errors_pass_through(fleet):
    for i in range(3):
        fleet.control(i, fail_status=503, fail_count=1)
    text, _ = stream(fleet.url, False, COMPLETION)  # 3 failures, 3 retries allowed
    assert text == reference(fleet, False, COMPLETION)
    assert _counter(fleet.metrics(), "fleetserve:gateway_retries_total") >= 2
    fleet.control(0, fail_status=400, fail_count=3)
    fleet.control(1, fail_status=400, fail_count=3)
    fleet.control(2, fail_status=400, fail_count=3)
    resp = httpx.post(f"{fleet.url}/v1/completions", json={**COMPLETION, "stream": True})
    assert resp.status_code == 400 and resp.json()["error"]["message"] == "injected"


def test_all_replicas_failing_gives_502_not_a_hang():
    fleet = Fleet(n=2, max_retries=1)
    try:
        for i in range(2):
            fleet.control(i, fail_status=503, fail_count=100)
        resp = httpx.post(f"{fleet.url}/v1/completions", json={**COMPLETION, "stream": True})
        assert resp.status_code == 502
        resp = httpx.post(f"{fleet.url}/v1/completions", json=COMPLETION)
        assert resp.status_code == 502
    finally:
        fleet.close()


def test_client_disconnect_aborts_upstream(fleet):
    for i in range(3):
        fleet.control(i, token_delay_s=0.02)
    body = {**COMPLETION, "max_tokens": 5000, "stream": True}

    def read_a_little():
        with httpx.stream("POST", f"{fleet.url}/v1/completions", json=body) as resp:
            for n, _ in enumerate(resp.iter_lines()):
                if n > 5:
                    break

    threads = [threading.Thread(target=read_a_little) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    wait_until(lambda: all(f.running == 0 for f in fleet.fakes), 10, what="upstreams aborted")
    assert sum(f.aborted for f in fleet.fakes) == 6
    wait_until(lambda: all(r.outstanding == 0 for r in fleet.gw.replicas.values()), 5)
    assert _counter(fleet.metrics(), "fleetserve:gateway_client_disconnects_total") == 6


def test_client_disconnect_aborts_a_unary_request(fleet):
    for i in range(3):
        fleet.control(i, token_delay_s=0.02)
    body = {**COMPLETION, "max_tokens": 5000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{fleet.url}/v1/completions", json=body, timeout=0.5)
    wait_until(lambda: sum(f.aborted for f in fleet.fakes) == 1, 10, what="upstream aborted")
    wait_until(lambda: all(f.running == 0 for f in fleet.fakes), 5, what="nothing running")
    wait_until(lambda: all(r.outstanding == 0 for r in fleet.gw.replicas.values()), 5)


def test_draining_replica_gets_no_new_work(fleet):
    rid = "r0"
    resp = httpx.post(f"{fleet.url}/admin/replicas/{rid}/drain", headers=_bearer(OPERATOR_KEY))
    assert resp.status_code == 200 and resp.json()["draining"]
    before = served(fleet.fakes[0])
    for _ in range(6):
        stream(fleet.url, False, {**COMPLETION, "max_tokens": 2})
    assert served(fleet.fakes[0]) == before
    httpx.post(
        f"{fleet.url}/admin/replicas/{rid}/undrain", headers=_bearer(OPERATOR_KEY)
    ).raise_for_status()


def test_active_probe_takes_unhealthy_replica_out_and_back(fleet):
    fleet.control(1, health_status=503)
    wait_until(lambda: not fleet.gw.replicas["r1"].ready, 5, what="r1 not ready")
    before = served(fleet.fakes[1])
    for _ in range(6):
        stream(fleet.url, False, {**COMPLETION, "max_tokens": 2})
    assert served(fleet.fakes[1]) == before
    probes = [
        b
        for b, rid in zip(fleet.fakes[0].bodies, fleet.fakes[0].request_ids, strict=True)
        if rid.startswith("probe")
    ]
    assert probes and probes[0]["max_tokens"] == 1  # a one-token generation, not a ping
    fleet.control(1, health_status=200)
    wait_until(lambda: fleet.gw.replicas["r1"].ready, 5, what="r1 ready again")


def test_prefix_aware_routing_follows_the_cache():
    fleet = Fleet(router="prefix_aware")
    try:
        _prefix_routing(fleet)
    finally:
        fleet.close()


def _prefix_routing(fleet: Fleet) -> None:
    system = "You are a helpful assistant. " * 20
    owners = []
    for turn in range(5):
        body = {**COMPLETION, "prompt": system + f"question {turn}", "max_tokens": 2}
        before = [served(f) for f in fleet.fakes]
        stream(fleet.url, False, body)
        owners.append(next(i for i, f in enumerate(fleet.fakes) if served(f) > before[i]))
        wait_until(lambda: len(fleet.gw.replicas[f"r{owners[-1]}"].prefix) > 0, 5)
    assert len(set(owners)) == 1, owners
    assert fleet.gw.replicas[f"r{owners[0]}"].prefix.block_size == 4
    assert "fleetserve:gateway_replica_cached_blocks" in fleet.metrics()


def test_openai_kind_replicas_get_plain_requests():
    fleet = Fleet(n=1, kinds=[ReplicaKind.OPENAI])
    try:
        text, _ = stream(fleet.url, False, COMPLETION)
        assert text == reference_direct(fleet.servers[0].url)
        assert all("return_token_ids" not in b for b in fleet.fakes[0].bodies)
        assert len(fleet.gw.replicas["r0"].prefix) == 0  # no KV-event subscription
    finally:
        fleet.close()


def reference_direct(url: str) -> str:
    return stream(url, False, COMPLETION)[0]


def test_api_keys_and_rate_limits(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"keys:\n  - name: limited\n    sha256: '{hash_key('k1')}'\n    requests_per_s: 1\n"
        f"  - name: ops\n    sha256: '{hash_key('k2')}'\n    admin: true\n"
    )
    fleet = Fleet(n=1, api_keys=load_api_keys(path))
    try:
        url = f"{fleet.url}/v1/completions"
        assert httpx.post(url, json=COMPLETION).status_code == 401
        assert httpx.post(url, json=COMPLETION, headers=_bearer("nope")).status_code == 401
        assert httpx.post(url, json=COMPLETION, headers=_bearer("k1")).status_code == 200
        limited = httpx.post(url, json=COMPLETION, headers=_bearer("k1"))
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["type"] == "rate_limit_exceeded"
        assert httpx.get(f"{fleet.url}/admin/replicas", headers=_bearer("k1")).status_code == 403
        listing = httpx.get(f"{fleet.url}/admin/replicas", headers=_bearer("k2"))
        assert listing.status_code == 200 and listing.json()[0]["id"] == "r0"
        metrics = httpx.get(f"{fleet.url}/metrics", headers=_bearer("k2"))
        assert 'reason="requests_per_s"' in metrics.text
        assert httpx.get(f"{fleet.url}/metrics", headers=_bearer("k1")).status_code == 403
    finally:
        fleet.close()


def test_migration_sends_the_internal_key_to_fleetserve_replicas_only(tmp_path):
    """A continuation carries the gateway's own upstream key, never the client's; and it
    goes only to a fleetserve replica, never to a plain OpenAI-compatible one."""
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - name: client\n    sha256: '{hash_key('client-secret')}'\n")
    kinds = [ReplicaKind.FLEETSERVE, ReplicaKind.FLEETSERVE, ReplicaKind.OPENAI]
    keys = with_operator_key(load_api_keys(path), OPERATOR_KEY)
    fleet = Fleet(n=3, api_keys=keys, kinds=kinds, upstream_api_key="internal")
    try:
        body = {**COMPLETION, "max_tokens": 30}
        expected = reference(fleet, False, body)
        fleet.control(0, die_after_tokens=5)
        fleet.control(1, die_after_tokens=15)
        for fake in fleet.fakes:
            fake.headers.clear()
            fake.bodies.clear()
        for _ in range(3):
            text, chunks = stream(fleet.url, False, body, headers=_bearer("client-secret"))
            assert text == expected and len({c["id"] for c in chunks}) == 1
        assert _counter(fleet.metrics(), "fleetserve:gateway_migrations_total") >= 1
        continued = [b for b in fleet.fakes[2].bodies if isinstance(b.get("prompt"), list)]
        assert not continued  # the OpenAI-kind replica got first attempts only
        seen = [h for fake in fleet.fakes for h in fake.headers]
        assert seen and all(h.get("authorization") == "Bearer internal" for h in seen)
        assert not any("client-secret" in str(h) for h in seen)
    finally:
        fleet.close()


def test_deadline_sheds_when_predicted_wait_is_too_long():
    fleet = Fleet(n=1, max_outstanding_per_replica=1)
    try:
        fleet.control(0, token_delay_s=0.05)
        long = {**COMPLETION, "max_tokens": 60, "stream": True}
        with httpx.stream("POST", f"{fleet.url}/v1/completions", json=long) as resp:
            lines = resp.iter_lines()
            next(lines)  # this stream holds the only slot
            shed = httpx.post(
                f"{fleet.url}/v1/completions", json=COMPLETION, headers={"X-Request-Timeout": "0.2"}
            )
            assert shed.status_code == 429 and "retry-after" in shed.headers
            bad = httpx.post(
                f"{fleet.url}/v1/completions",
                json=COMPLETION,
                headers={"X-Request-Timeout": "soon"},
            )
            assert bad.status_code == 400
            # without a deadline it waits in the queue and is served after the first
            queued = httpx.post(f"{fleet.url}/v1/completions", json=COMPLETION, timeout=30)
            assert queued.status_code == 200
        late = httpx.post(
            f"{fleet.url}/v1/completions",
            headers={"X-Request-Timeout": "0.1"},
            json={**COMPLETION, "max_tokens": 500},
            timeout=30,
        )
        assert late.status_code == 504 and late.json()["error"]["type"] == "timeout"
        assert 'reason="predicted_wait"' in fleet.metrics()
    finally:
        fleet.close()


def served(fake: FakeReplica) -> int:
    return sum(1 for rid in fake.request_ids if not rid.startswith("probe"))


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _counter(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_cover_the_issue_list(fleet):
    stream(fleet.url, True, CHAT)
    text = fleet.metrics()
    for name in [
        "fleetserve:gateway_replica_outstanding",
        "fleetserve:gateway_replica_healthy",
        "fleetserve:gateway_replica_breaker_state",
        "fleetserve:gateway_routing_decisions_total",
        "fleetserve:gateway_time_to_first_token_seconds_bucket",
        "fleetserve:gateway_e2e_request_latency_seconds_bucket",
        "fleetserve:gateway_queue_length",
    ]:
        assert name in text, name
    json.dumps(text)

"""The gateway's door under hostile clients (issue 9): admin routes and operator keys, URLs
added through the admin API, malformed bodies, body size, the token charge of batches,
client-chosen priorities, client-caused errors against the breaker and retries, and
clients that leave while queued. Each test checks the clear 4xx and that a normal request
is served alongside or afterwards. Fake replicas run in threads of this process."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import threading

import httpx
import pytest
from gateway_harness import FAST_GATEWAY, ThreadServer, free_port, wait_until

from fleetserve.gateway.api_keys import hash_key, load_api_keys, with_operator_key
from fleetserve.gateway.app import create_app
from fleetserve.gateway.circuit_breaker import BreakerState
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.options import api_keys_from_args
from fleetserve.gateway.replica import ReplicaKind
from fleetserve.testing.fake_replica import ByteTokenizer, FakeReplica, FakeSettings

pytestmark = pytest.mark.timeout(60)

FAST = {**FAST_GATEWAY, "breaker_cooldown_s": 5.0}  # the breaker tests watch it stay shut
OPERATOR = "op-secret"
INTERNAL = "internal-secret"
BODY = {"model": "fake", "prompt": "Once upon a time", "max_tokens": 4}


class HeaderLog:
    """ASGI wrapper that records the Authorization header of every call to a replica."""

    def __init__(self, app) -> None:
        self.app = app
        self.auth: list[tuple[str, str]] = []  # (path, Authorization)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            self.auth.append((scope["path"], headers.get(b"authorization", b"").decode()))
        await self.app(scope, receive, send)


class Door:
    """A gateway in front of `n` fake replicas, all in threads of this process."""

    def __init__(self, n=1, api_keys=None, kinds=None, tokenizer=None, wait=True, **config):
        self.fakes = [FakeReplica(FakeSettings(token_delay_s=0.002)) for _ in range(n)]
        self.logs = [HeaderLog(f.app()) for f in self.fakes]
        self.servers = [ThreadServer(log).start() for log in self.logs]
        self.gw = Gateway(
            GatewayConfig(**{**FAST, **config}),
            api_keys,
            tokenizer or ByteTokenizer(),
            upstream_api_key=INTERNAL,
        )
        for i, server in enumerate(self.servers):
            self.gw.add_replica(server.url, kinds[i] if kinds else ReplicaKind.FLEETSERVE)
        self.front = ThreadServer(create_app(self.gw)).start()
        self.url = self.front.url
        if wait:
            wait_until(lambda: all(r.ready for r in self.gw.replicas.values()), what="ready")

    def control(self, i: int, **settings) -> None:
        httpx.post(f"{self.servers[i].url}/fake/control", json=settings).raise_for_status()

    def post(self, body, headers=None, path="/v1/completions", timeout=30) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=timeout)

    def served(self, i: int) -> int:
        return sum(1 for rid in self.fakes[i].request_ids if not rid.startswith("probe"))

    def metric(self, name: str, headers=None) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=headers).text
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)
        )

    def close(self) -> None:
        self.front.stop()
        for s in self.servers:
            s.stop()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_ok(door: Door, headers=None) -> None:
    resp = door.post(BODY, headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"]


def assert_error(resp: httpx.Response, status: int, *words: str) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text)
    message = resp.json()["error"]["message"]
    for word in words:
        assert word in message, (word, message)


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"keys:\n  - name: client\n    sha256: '{hash_key('client-key')}'\n"
        f"  - name: vip\n    sha256: '{hash_key('vip-key')}'\n    priority: high\n"
        f"  - name: small\n    sha256: '{hash_key('small-key')}'\n    tokens_per_min: 1000\n"
        f"  - name: ops\n    sha256: '{hash_key('ops-key')}'\n    admin: true\n"
    )
    return path


# ---- finding 1: the admin routes ---------------------------------------------------------------


def test_without_any_key_admin_routes_are_off_and_say_how_to_turn_them_on():
    door = Door()
    try:
        for method, path in [
            ("GET", "/admin/replicas"),
            ("POST", "/admin/replicas"),
            ("POST", "/admin/replicas/r0/drain"),
            ("POST", "/admin/replicas/r0/remove"),
        ]:
            resp = httpx.request(method, door.url + path, json={"url": "http://127.0.0.1:9"})
            assert_error(resp, 403, "admin routes are off", "--operator-key")
        assert list(door.gw.replicas) == ["r0"] and not door.gw.replicas["r0"].draining
        # no key at all: the operator routes stay open, clients are anonymous
        assert httpx.get(f"{door.url}/metrics").status_code == 200
        assert httpx.get(f"{door.url}/openapi.json").status_code == 200
        assert httpx.get(f"{door.url}/docs").status_code == 200
        assert_ok(door)
    finally:
        door.close()


def test_admin_needs_the_operator_key_and_a_client_key_gets_403(keys_file):
    store = with_operator_key(load_api_keys(keys_file), OPERATOR)
    door = Door(api_keys=store)
    try:
        for headers, status in [({}, 401), (bearer("nope"), 401), (bearer("client-key"), 403)]:
            for path in ["/admin/replicas", "/metrics", "/openapi.json", "/docs", "/redoc"]:
                assert httpx.get(door.url + path, headers=headers).status_code == status, path
            resp = httpx.post(
                f"{door.url}/admin/replicas/r0/drain", headers=headers, json={"url": "x"}
            )
            assert resp.status_code == status
        assert not door.gw.replicas["r0"].draining
        for key in (OPERATOR, "ops-key"):  # the operator key and the file's admin entry
            listing = httpx.get(f"{door.url}/admin/replicas", headers=bearer(key))
            assert listing.status_code == 200 and listing.json()[0]["id"] == "r0"
            assert httpx.get(f"{door.url}/metrics", headers=bearer(key)).status_code == 200
            assert httpx.get(f"{door.url}/openapi.json", headers=bearer(key)).status_code == 200
        assert door.post(BODY).status_code == 401  # clients need a key
        assert_ok(door, bearer("client-key"))
    finally:
        door.close()


def test_operator_key_alone_keeps_clients_anonymous_and_guards_metrics():
    door = Door(api_keys=with_operator_key(None, OPERATOR))
    try:
        assert_ok(door)
        assert_error(httpx.get(f"{door.url}/metrics"), 401, "operator key")
        assert httpx.get(f"{door.url}/metrics", headers=bearer(OPERATOR)).status_code == 200
        drain = httpx.post(f"{door.url}/admin/replicas/r0/drain", headers=bearer(OPERATOR))
        assert drain.status_code == 200 and drain.json()["draining"]
    finally:
        door.close()


def _args(**kw) -> argparse.Namespace:
    base = {"api_keys_file": None, "operator_key": None, "gateway_config": None}
    return argparse.Namespace(**{**base, **kw})


def test_an_admin_key_is_never_a_client_key(keys_file, tmp_path, monkeypatch):
    monkeypatch.delenv("FLEETSERVE_OPERATOR_KEY", raising=False)
    with pytest.raises(ValueError, match="same key"):
        api_keys_from_args(_args(api_keys_file=str(keys_file), operator_key="client-key"))
    # `serve --replicas N --api-key K`: K is a client key, not an admin one
    store = api_keys_from_args(_args(), public_key="public")
    assert not store.lookup("public").admin and not store.has_admin
    with pytest.raises(ValueError, match="same key"):
        api_keys_from_args(_args(operator_key="public"), public_key="public")
    store = api_keys_from_args(_args(operator_key="op"), public_key="public")
    assert store.lookup("op").admin and store.clients_need_key
    # from the environment, then from the gateway config file
    monkeypatch.setenv("FLEETSERVE_OPERATOR_KEY", "from-env")
    assert api_keys_from_args(_args()).lookup("from-env").admin
    monkeypatch.delenv("FLEETSERVE_OPERATOR_KEY")
    config = tmp_path / "gw.yaml"
    config.write_text("operator_key: from-file\nmax_n: 4\n")
    store = api_keys_from_args(_args(gateway_config=str(config)))
    assert store.lookup("from-file").admin and not store.clients_need_key
    assert api_keys_from_args(_args()) is None  # nothing configured: admin routes off
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text(
        f"keys:\n  - name: a\n    sha256: '{hash_key('k')}'\n"
        f"  - name: b\n    sha256: '{hash_key('k')}'\n    admin: true\n"
    )
    with pytest.raises(ValueError, match="same key"):
        load_api_keys(duplicate)


def test_admin_added_replica_gets_no_internal_key_and_no_traffic_before_its_probe():
    # its failed probes open its breaker: a short cooldown lets it in soon after they pass
    door = Door(api_keys=with_operator_key(None, OPERATOR), breaker_cooldown_s=0.2)
    extra = FakeReplica(FakeSettings(token_delay_s=0.002, health_status=503))
    log = HeaderLog(extra.app())
    server = ThreadServer(log).start()
    try:
        for bad in [
            "http://user:pw@127.0.0.1:9",
            "file:///etc/passwd",
            "127.0.0.1:9",
            "http://127.0.0.1:9/?x=1",
            "http://127.0.0.1:port",
            5,
        ]:
            resp = httpx.post(
                f"{door.url}/admin/replicas", json={"url": bad}, headers=bearer(OPERATOR)
            )
            assert_error(resp, 400, "url")
        assert list(door.gw.replicas) == ["r0"]
        added = httpx.post(
            f"{door.url}/admin/replicas", json={"url": server.url}, headers=bearer(OPERATOR)
        )
        assert added.status_code == 201 and not added.json()["ready"]
        rid = added.json()["id"]
        wait_until(lambda: any(p == "/health" for p, _ in log.auth), 5, what="probed")
        for _ in range(6):  # its probe fails: no user traffic
            assert_ok(door)
        assert not any(not rid.startswith("probe") for rid in extra.request_ids)
        extra.s.health_status = 200
        added_replica = door.gw.replicas[rid]
        wait_until(lambda: added_replica.view(door.gw.clock()).accepting, 15, what="accepting")
        for _ in range(4):
            assert_ok(door)
        assert any(not r.startswith("probe") for r in extra.request_ids)
        assert log.auth and all(auth == "" for _, auth in log.auth)
        assert door.logs[0].auth and all(a == f"Bearer {INTERNAL}" for _, a in door.logs[0].auth)
        # a key for it is the operator's to give, and it gets only that one
        resp = httpx.post(f"{door.url}/admin/replicas/{rid}/remove", headers=bearer(OPERATOR))
        assert resp.status_code == 200 and rid not in door.gw.replicas
        log.auth.clear()
        readded = httpx.post(
            f"{door.url}/admin/replicas",
            json={"url": server.url, "api_key": "its-own"},
            headers=bearer(OPERATOR),
        )
        assert readded.status_code == 201
        wait_until(lambda: door.gw.replicas[readded.json()["id"]].ready, 5, what="ready")
        assert all(auth == "Bearer its-own" for _, auth in log.auth)
    finally:
        server.stop()
        door.close()


# ---- finding 10: malformed bodies --------------------------------------------------------------

MALFORMED = [
    ("/v1/completions", {"prompt": ["a", 5]}, "'prompt'"),
    ("/v1/completions", {"prompt": []}, "'prompt'"),
    ("/v1/completions", {"prompt": [[1, -2]]}, "'prompt'"),
    ("/v1/completions", {"prompt": [True]}, "'prompt'"),
    ("/v1/completions", {"max_tokens": 3}, "'prompt'"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "lots"}, "'max_tokens'"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "'n'"),
    ("/v1/completions", {"prompt": "x", "n": 1.5}, "'n'"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "'stop'"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "'stream'"),
    ("/v1/completions", {"prompt": "x", "min_tokens": "a"}, "'min_tokens'"),
    ("/v1/completions", {"prompt": "x", "stream_options": 3}, "'stream_options'"),
    ("/v1/chat/completions", {"messages": 5}, "'messages'"),
    ("/v1/chat/completions", {"messages": []}, "'messages'"),
    ("/v1/chat/completions", {"messages": [5]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "content"),
    ("/v1/chat/completions", {"messages": [{"role": "u", "content": [7]}]}, "content[0]"),
    ("/v1/chat/completions", [1, 2], "JSON object"),
]


def test_malformed_bodies_get_400_naming_the_field():
    door = Door()
    try:
        for path, body, field in MALFORMED:
            assert_error(door.post(body, path=path), 400, field)
            if isinstance(body, dict) and "stream" not in body:
                assert_error(door.post({**body, "stream": True}, path=path), 400, field)
        for raw in [b"not json", b"[" * 100_000, b'{"prompt": "x", "max_tokens": 1e999999}']:
            resp = httpx.post(f"{door.url}/v1/completions", content=raw)
            assert resp.status_code == 400, (raw[:20], resp.text)
        assert door.served(0) == 0  # none of them reached the replica
        assert_ok(door)
        chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
        assert door.post({**chat, "max_tokens": 3}, path="/v1/chat/completions").status_code == 200
    finally:
        door.close()


def test_body_over_the_limit_gets_413_and_is_not_forwarded():
    door = Door(max_body_bytes=64 * 1024)
    try:
        big = {"prompt": "x" * 70_000, "max_tokens": 1}
        assert_error(door.post(big), 413, "max_body_bytes")

        def chunks():  # no Content-Length: read only up to the limit
            yield b'{"prompt": "'
            for _ in range(100):
                yield b"y" * 1024
            yield b'"}'

        resp = httpx.post(f"{door.url}/v1/completions", content=chunks())
        assert_error(resp, 413, "max_body_bytes")
        assert door.served(0) == 0
        assert_ok(door)
    finally:
        door.close()


def test_default_body_limit_is_4_mib():
    assert GatewayConfig().max_body_bytes == 4 * 1024 * 1024


# ---- finding 3: the work a request may ask for -------------------------------------------------


def test_token_charge_counts_every_prompt_against_tokens_per_min(keys_file):
    door = Door(api_keys=load_api_keys(keys_file))
    small = bearer("small-key")  # tokens_per_min: 1000
    try:
        batch = {"prompt": ["hi"] * 100, "max_tokens": 16}  # 100 + 100 x 16 = 1700 tokens
        assert_error(door.post(batch, small), 429, "tokens_per_min", "number of prompts")
        with_n = {"prompt": "hi", "max_tokens": 100, "n": 12}  # 1 + 12 x 100
        assert_error(door.post(with_n, small), 429, "tokens_per_min")
        assert door.served(0) == 0
        assert_ok(door, small)
        fits = {"prompt": ["hi"] * 10, "max_tokens": 16}
        assert door.post(fits, small).status_code == 200
    finally:
        door.close()


def test_prompts_and_choices_per_request_are_capped():
    door = Door()
    try:
        assert_error(door.post({"prompt": ["a"] * 257, "max_tokens": 1}), 400, "256 per request")
        assert_error(door.post({"prompt": [[1]] * 257, "max_tokens": 1}), 400, "256 per request")
        assert_error(door.post({"prompt": "a", "n": 129, "max_tokens": 1}), 400, "'n'", "128")
        many = {"prompt": ["a"] * 20, "n": 13, "max_tokens": 1}
        assert_error(door.post(many), 400, "260 sequences", "256")
        assert door.served(0) == 0
        assert_ok(door)
    finally:
        door.close()


class CountingTokenizer(ByteTokenizer):
    def __init__(self) -> None:
        self.calls: list[str] = []  # the thread of each call

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls.append(threading.current_thread().name)
        return super().encode(text, add_special_tokens)


def test_refused_requests_are_not_tokenized_and_tokenizing_leaves_the_event_loop(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"keys:\n  - name: slow\n    sha256: '{hash_key('k')}'\n    requests_per_s: 1\n"
    )
    tokenizer = CountingTokenizer()
    door = Door(api_keys=load_api_keys(path), tokenizer=tokenizer)
    try:
        assert_ok(door, bearer("k"))
        assert len(tokenizer.calls) == 1
        assert door.front.thread.name not in tokenizer.calls  # not on the server's loop
        for _ in range(3):
            assert door.post(BODY, bearer("k")).status_code == 429
        assert door.post({"prompt": 5}, bearer("k")).status_code == 400
        assert door.post(BODY).status_code == 401
        assert len(tokenizer.calls) == 1
    finally:
        door.close()


# ---- finding 5: priority -----------------------------------------------------------------------


def _user_bodies(door: Door) -> list[dict]:
    return [
        b
        for f in door.fakes
        for b, rid in zip(f.bodies, f.request_ids, strict=True)
        if not rid.startswith("probe")
    ]


def test_client_priority_is_replaced_by_the_keys(keys_file):
    door = Door(
        n=2,
        api_keys=load_api_keys(keys_file),
        kinds=[ReplicaKind.FLEETSERVE] * 2,
        forward_priority=True,
    )
    try:
        hostile = {**BODY, "priority": -(2**31)}
        for key in ("client-key", "vip-key"):
            for stream in (False, True):
                resp = door.post({**hostile, "stream": stream}, bearer(key))
                assert resp.status_code == 200, resp.text
        user = [
            b
            for f in door.fakes
            for b, rid in zip(f.bodies, f.request_ids, strict=True)
            if not rid.startswith("probe")
        ]
        assert len(user) == 4
        # high comes first (lower is served first); normal is left to the replica's default
        assert sorted(b.get("priority", 0) for b in user) == [-1, -1, 0, 0]
        assert sum("priority" in b for b in user) == 2
    finally:
        door.close()


def test_priority_reaches_replicas_only_with_forward_priority(keys_file):
    """A replica started without --allow-client-priority answers 400 to any priority: by
    default the gateway orders its own queue by the key's class and sends none upstream."""
    door = Door(n=1, api_keys=load_api_keys(keys_file))
    try:
        for stream in (False, True):
            resp = door.post({**BODY, "priority": -(2**31), "stream": stream}, bearer("vip-key"))
            assert resp.status_code == 200, resp.text
        user = _user_bodies(door)
        assert len(user) == 2 and all("priority" not in b for b in user)
    finally:
        door.close()


def test_openai_replicas_get_no_priority_at_all():
    door = Door(kinds=[ReplicaKind.OPENAI])
    try:
        for stream in (False, True):
            resp = door.post({**BODY, "priority": 5, "stream": stream})
            assert resp.status_code == 200
        user = [
            b for b, r in zip(door.fakes[0].bodies, door.fakes[0].request_ids) if r[:5] != "probe"
        ]
        assert len(user) == 2 and all("priority" not in b for b in user)
    finally:
        door.close()


# ---- finding 6: client-caused errors, retries --------------------------------------------------


def test_a_500_for_one_body_is_passed_on_not_retried_and_leaves_the_breaker_closed():
    door = Door(n=2)
    try:
        for i in range(2):
            door.control(i, fail_status=500, fail_count=3)
        for stream in (False, True, False, True, False, True):
            resp = door.post({**BODY, "stream": stream})
            assert resp.status_code == 500 and resp.json()["error"]["message"] == "injected"
        assert door.served(0) + door.served(1) == 6  # one attempt each: no retries
        assert door.metric("fleetserve:gateway_retries_total") == 0
        for replica in door.gw.replicas.values():
            assert replica.breaker.state(door.gw.clock()) is BreakerState.CLOSED
        for _ in range(4):  # both replicas still take work
            assert_ok(door)
        assert door.served(0) >= 4 and door.served(1) >= 4
    finally:
        door.close()


def test_client_errors_are_neutral_for_the_breaker():
    door = Door(n=1)
    try:
        door.control(0, fail_status=422, fail_count=5)
        for _ in range(5):
            assert door.post(BODY).status_code == 422
        assert door.served(0) == 5
        assert door.gw.replicas["r0"].breaker.state(door.gw.clock()) is BreakerState.CLOSED
        assert_ok(door)
    finally:
        door.close()


def test_the_retry_budget_caps_retries():
    door = Door(n=2, retry_budget_percent=0, retry_min_concurrency=0)
    try:
        for i in range(2):
            door.control(i, fail_status=503, fail_count=1)
        for stream in (False, True):
            resp = door.post({**BODY, "stream": stream})
            assert_error(resp, 502, "503")
        assert door.served(0) + door.served(1) == 2  # no second attempt
        assert door.metric("fleetserve:gateway_retries_denied_total") == 2
        assert door.metric("fleetserve:gateway_retries_total") == 0
        assert door.gw.retry_budget.active_retries == 0
        assert door.gw.retry_budget.active_requests == 0
        assert_ok(door)
    finally:
        door.close()


def test_retries_within_the_budget_still_happen():
    door = Door(n=2)
    try:
        door.control(0, fail_status=503, fail_count=1)
        door.control(1, fail_status=503, fail_count=1)
        assert_ok(door)  # the first attempt fails, the retry succeeds
        assert door.metric("fleetserve:gateway_retries_total") >= 1
        assert door.metric("fleetserve:gateway_retries_denied_total") == 0
        wait_until(lambda: door.gw.retry_budget.active_requests == 0, 5)
        assert door.gw.retry_budget.active_retries == 0
    finally:
        door.close()


# ---- finding 10: a client that leaves while queued ---------------------------------------------


def test_a_client_that_leaves_while_queued_leaves_the_queue():
    # a queued request would wait up to first_chunk_timeout_s for a slot
    door = Door(n=1, max_outstanding_per_replica=1, first_chunk_timeout_s=60.0)
    try:
        door.control(0, token_delay_s=0.05)
        long = {**BODY, "max_tokens": 1000, "stream": True}
        with httpx.stream("POST", f"{door.url}/v1/completions", json=long) as held:
            lines = held.iter_lines()
            next(lines)  # this stream holds the only slot
            for rid, stream in [("gone-unary", False), ("gone-stream", True)]:
                with pytest.raises(httpx.ReadTimeout):
                    door.post({**BODY, "stream": stream}, {"X-Request-Id": rid}, timeout=0.5)
                wait_until(lambda: door.front.call(lambda: len(door.gw.queue)) == 0, 3)
            # a request queued now is served once the slot frees
            result = {}
            waiter = threading.Thread(target=lambda: result.update(r=door.post(BODY)))
            waiter.start()
            wait_until(lambda: door.front.call(lambda: len(door.gw.queue)) == 1, 5)
        waiter.join(30)
        assert result["r"].status_code == 200
        assert not {"gone-unary", "gone-stream"} & set(door.fakes[0].request_ids)
        assert door.metric("fleetserve:gateway_client_disconnects_total") >= 2
        wait_until(lambda: door.gw.replicas["r0"].outstanding == 0, 5)
    finally:
        door.close()


def test_gateway_flags_reach_the_config_and_the_help_renders(monkeypatch):
    from fleetserve.cli import build_parser
    from fleetserve.gateway.options import config_from_args

    monkeypatch.delenv("FLEETSERVE_OPERATOR_KEY", raising=False)
    argv = ["gateway", "--replica", "http://127.0.0.1:1", "--max-body-bytes", "1000",
            "--max-n", "4", "--retry-budget-percent", "50", "--retry-min-concurrency", "1",
            "--operator-key", "op"]  # fmt: skip
    args = build_parser(argv).parse_args(argv)
    config = config_from_args(args)
    assert (config.max_body_bytes, config.max_n, config.retry_budget_percent) == (1000, 4, 50.0)
    assert config.retry_min_concurrency == 1
    assert api_keys_from_args(args).lookup("op").admin
    help_text = args._parser.format_help()
    assert "--operator-key" in help_text and "--retry-budget-percent" in help_text


# ---- the door itself: `fleetserve gateway` in its own process, slow and huge heads ------------


def _read_until_closed(sock, limit_s: float) -> bytes:

    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"the gateway held the socket open past {limit_s} s") from None
    except ConnectionResetError:
        pass
    return data


def test_the_gateway_door_closes_slow_heads_and_refuses_huge_ones():
    """The same HTTP limits as the replica's door (fleetserve.http_limits): a half-sent head
    is answered 408 and closed after --header-timeout, an oversized head gets 431 (or a
    close), never a 200; a normal request is served while they stall."""
    fake = ThreadServer(FakeReplica(FakeSettings(token_delay_s=0.002)).app()).start()
    port = free_port()
    gateway = subprocess.Popen(
        [sys.executable, "-m", "fleetserve.cli", "gateway", "--replica", fake.url,
         "--port", str(port), "--header-timeout", "1", "--max-header-bytes", "4096",
         "--body-timeout", "1"],
        start_new_session=True,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert gateway.poll() is None, "the gateway exited"
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 30, 0.05, "the gateway is ready")
        silent = socket.create_connection(("127.0.0.1", port))
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: app")
        huge = socket.create_connection(("127.0.0.1", port))
        try:
            huge.sendall(
                b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
            )
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: also a refusal
        answer = httpx.post(f"{url}/v1/completions", json=BODY, timeout=10)
        assert answer.status_code == 200, answer.text
        big = _read_until_closed(huge, 10)
        assert not big.startswith(b"HTTP/1.1 200"), big[:100]
        assert big == b"" or big.startswith(b"HTTP/1.1 431"), big[:100]
        for sock in (silent, half):
            data = _read_until_closed(sock, 10)
            assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:100]
            sock.close()
        huge.close()
        # a body that never finishes: 408 after --body-timeout, and no traceback in the log
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt": '
        )
        data = _read_until_closed(slow, 10)
        assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:100]
        slow.close()
        assert httpx.post(f"{url}/v1/completions", json=BODY, timeout=10).status_code == 200
    finally:
        gateway.terminate()
        try:
            _, log = gateway.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            gateway.kill()
            _, log = gateway.communicate()
        fake.stop()
    assert "Traceback" not in log, log[-3000:]


# ---- found by an outside attack on the merged fixes --------------------------------------------


def _stream_events(door: Door, body: dict, headers=None) -> tuple[int, list[dict]]:
    events = []
    with httpx.stream(
        "POST", f"{door.url}/v1/completions", json={**body, "stream": True}, headers=headers
    ) as resp:
        if resp.status_code != 200:
            resp.read()
            return resp.status_code, [resp.json()]
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return 200, events


def _breakers_closed(door: Door) -> bool:
    now = door.gw.clock()
    return all(r.breaker.state(now) is BreakerState.CLOSED for r in door.gw.replicas.values())


def test_an_in_stream_generation_error_is_the_requests_own():
    """A replica's `generation_failed` error event (a sampling failure this body causes) is
    passed on: not retried before the first byte, not migrated after it, and neutral for the
    breaker; it used to be retried on every replica and open their breakers."""
    door = Door(n=2)
    try:
        for i in range(2):
            door.control(i, error_after_tokens=0)
        for _ in range(4):  # before the first byte: the replica's error, as a 500
            status, events = _stream_events(door, BODY)
            assert status == 500 and events[0]["error"]["code"] == "generation_failed"
        for i in range(2):
            door.control(i, error_after_tokens=2)
        for _ in range(4):  # mid-stream: the error event ends the client's stream
            status, events = _stream_events(door, {**BODY, "max_tokens": 8})
            assert status == 200 and events[-1]["error"]["code"] == "generation_failed"
            assert sum(len(e["choices"][0]["text"]) for e in events[:-1]) == 2
        assert door.served(0) + door.served(1) == 8  # one attempt each
        assert door.metric("fleetserve:gateway_retries_total") == 0
        assert door.metric("fleetserve:gateway_migrations_total") == 0
        assert _breakers_closed(door)
        for i in range(2):
            door.control(i, error_after_tokens=None)
        assert_ok(door)
    finally:
        door.close()


def test_a_dead_engine_in_the_stream_is_still_the_replicas_failure():
    door = Door(n=2)
    try:
        door.control(0, error_after_tokens=2, error_code="engine_dead")
        for _ in range(2):
            status, events = _stream_events(door, {**BODY, "max_tokens": 6})
            assert status == 200 and "error" not in events[-1], events[-1]
        assert door.metric("fleetserve:gateway_migrations_total") >= 1
    finally:
        door.close()


def test_the_clients_own_deadline_does_not_count_against_a_replica():
    """X-Request-Timeout shorter than the replica's answer: 504 for that client, and the
    replica's breaker stays closed (a client could open every breaker with tiny deadlines)."""
    door = Door(n=1, breaker_failure_threshold=2)
    try:
        door.control(0, token_delay_s=0.2)
        for stream in (False, True, False, True):
            resp = door.post({**BODY, "stream": stream}, {"X-Request-Timeout": "0.1"})
            assert resp.status_code == 504, resp.text
        assert _breakers_closed(door)
        door.control(0, token_delay_s=0.002)
        assert_ok(door)
    finally:
        door.close()


def test_a_full_replica_queue_is_a_429_not_a_failure():
    door = Door(n=2)
    try:
        for i in range(2):
            door.control(i, fail_status=429, fail_count=100)
        for stream in (False, True):
            resp = door.post({**BODY, "stream": stream})
            assert resp.status_code == 429 and resp.headers["Retry-After"], resp.text
        assert _breakers_closed(door)
        for i in range(2):
            door.control(i, fail_count=0)
        assert_ok(door)
    finally:
        door.close()


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "x", "temperature": NaN, "max_tokens": 2}',
        b'{"prompt": "x", "temperature": Infinity, "max_tokens": 2}',
        b'{"prompt": "x", "temperature": 1e999, "max_tokens": 2}',
        b'{"prompt": "\\udc00", "max_tokens": 2}',
        b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
    ],
)
def test_bodies_that_cannot_be_forwarded_are_400(raw):
    door = Door(n=1)
    try:
        for path in ("/v1/completions", "/v1/chat/completions"):
            resp = httpx.post(
                f"{door.url}{path}", content=raw, headers={"Content-Type": "application/json"}
            )
            assert resp.status_code == 400, resp.text
            assert "JSON" in resp.json()["error"]["message"]
        assert door.served(0) == 0
        ok = b'{"prompt": "\\ud83d\\ude00 a paired surrogate is fine", "max_tokens": 2}'
        resp = httpx.post(
            f"{door.url}/v1/completions", content=ok, headers={"Content-Type": "application/json"}
        )
        assert resp.status_code == 200, resp.text
    finally:
        door.close()


@pytest.mark.parametrize("given", ["caf\xe9", "a" * 300, "tab\there", ""])
def test_an_odd_request_id_is_replaced_not_a_500(given):
    door = Door(n=1)
    try:
        raw = given.encode("latin-1")
        for stream in (False, True):
            resp = door.post({**BODY, "stream": stream}, {"X-Request-Id": raw})
            assert resp.status_code == 200, resp.text
            echoed = resp.headers["X-Request-Id"]
            assert echoed != given and echoed.isascii() and len(echoed) <= 256
        good = door.post(BODY, {"X-Request-Id": "trace-42"})
        assert good.headers["X-Request-Id"] == "trace-42"
    finally:
        door.close()


def test_too_many_chat_messages_are_refused_before_any_work():
    door = Door(n=1)
    try:
        body = {"max_tokens": 1, "messages": [{"role": "user", "content": "x"}] * 4097}
        assert_error(door.post(body, path="/v1/chat/completions"), 400, "4096")
        assert door.served(0) == 0
        assert_ok(door)
    finally:
        door.close()


def test_no_redirect_echoes_the_host_and_unknown_routes_answer_openai_errors():
    door = Door(n=1, api_keys=with_operator_key(None, OPERATOR))
    try:
        for path in ("/metrics/", "/admin/replicas/", "/v1/completions/"):
            resp = httpx.get(f"{door.url}{path}", headers={"Host": "evil.example"})
            assert resp.status_code == 404 and "location" not in resp.headers, path
            assert resp.json()["error"]["type"] == "not_found_error"
        wrong_method = httpx.get(f"{door.url}/v1/completions")
        assert wrong_method.status_code == 405 and "error" in wrong_method.json()
        assert_ok(door)
    finally:
        door.close()


def test_a_client_that_leaves_before_the_stream_starts_leaves_nothing_held():
    """The first event is in, but the client left before the response started: Starlette
    then never runs the body iterator, so its `finally` cannot release. The replica slot,
    the upstream stream and the retry budget's count are still given back."""
    door = Door(n=1)
    try:
        door.control(0, token_delay_s=0.05)
        body = json.dumps({**BODY, "max_tokens": 50, "stream": True}).encode()
        calls = 0

        async def receive():
            nonlocal calls
            calls += 1
            if calls == 1:
                return {"type": "http.request", "body": body, "more_body": False}
            if calls == 2:  # the watcher while the stream opens: nothing yet
                await asyncio.Event().wait()
            return {"type": "http.disconnect"}  # once the response is about to start

        sent = []

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.start":  # the client is gone: never sent
                await asyncio.Event().wait()

        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "root_path": "",
        }  # fmt: skip
        app = door.front.server.config.app
        asyncio.run_coroutine_threadsafe(app(scope, receive, send), door.front.loop).result(20)
        assert [m["type"] for m in sent] == ["http.response.start"]  # the body never ran
        assert door.gw.replicas["r0"].outstanding == 0
        assert door.gw.retry_budget.active_requests == 0
        wait_until(lambda: door.fakes[0].running == 0, 10, what="the upstream request aborted")
        assert_ok(door)
    finally:
        door.close()


def test_a_request_that_got_nothing_gives_its_token_charge_back(keys_file):
    """With the replica failing (503, then refusing with 422), each request is charged 400
    tokens at admission; with no refund the 1,000-token budget would be gone after two and
    the key locked out after the outage. A short cooldown: whether the first request or the
    second opens the breaker depends on when probes land, and the 422s must reach the
    replica however far the cooldown has doubled."""
    door = Door(n=1, api_keys=load_api_keys(keys_file), breaker_cooldown_s=0.3)
    small = bearer("small-key")  # tokens_per_min: 1000
    body = {**BODY, "max_tokens": 400}
    try:
        door.control(0, fail_status=503, fail_count=1000)
        for stream in (False, True):
            assert door.post({**body, "stream": stream}, small).status_code in (502, 503)
        door.control(0, fail_status=422, fail_count=1000)
        for stream in (False, True):
            assert door.post({**body, "stream": stream}, small).status_code == 422
        door.control(0, fail_count=0)
        assert door.post(body, small).status_code == 200
    finally:
        door.close()


def test_a_queued_request_is_served_when_the_circuit_half_opens_not_at_the_next_probe():
    """The only replica's circuit is open and probes are 30 s apart: the queued request is
    granted the moment the 1 s cooldown ends. (It waited for the next probe, so a request
    whose timeout ended before that probe was shed with 429 although the replica was
    ready to take it.)"""
    door = Door(n=1, probe_interval_s=30.0, breaker_cooldown_s=1.0, first_chunk_timeout_s=10.0)
    try:
        replica = door.gw.replicas["r0"]
        door.front.call(lambda: replica.breaker.force_open(door.gw.clock()))
        assert door.front.call(lambda: replica.breaker.state(door.gw.clock())) is (
            BreakerState.OPEN
        )
        answer = door.post(BODY)
        assert answer.status_code == 200, answer.text
        assert door.front.call(lambda: replica.breaker.state(door.gw.clock())) is (
            BreakerState.CLOSED
        )
    finally:
        door.close()


def test_a_repeated_request_id_does_not_merge_two_requests_accounting():
    """Two requests in flight with the same X-Request-Id each keep their own prefill entry
    on the replica (the client's id used to key it, so one overwrote the other's)."""
    door = Door(n=1)
    try:
        door.control(0, prefill_s_per_token=0.05)  # both stay in prefill for a while
        replica = door.gw.replicas["r0"]
        same = {"X-Request-Id": "same-id"}
        bodies = [{**BODY, "prompt": f"{word} prompt of a few blocks"} for word in ("ab", "yz")]
        threads = [  # different prompts: the second must not be a prefix-cache hit
            threading.Thread(target=door.post, args=(body, same), kwargs={"timeout": 30})
            for body in bodies
        ]
        for t in threads:
            t.start()
        wait_until(lambda: replica.outstanding == 2, 10, what="both requests on the replica")
        assert len(door.front.call(lambda: dict(replica.prefilling))) == 2
        for t in threads:
            t.join(30)
        wait_until(lambda: replica.outstanding == 0, 10, what="both released")
        assert not replica.prefilling
    finally:
        door.close()

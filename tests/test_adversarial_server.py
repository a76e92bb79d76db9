"""The replica's door under hostile clients: malformed bodies and prompt shapes, work limits,
client priority, operator routes, and slow or oversized connections. Every refusal must be a
clear 4xx naming the problem, and the replica must keep serving normal requests. One replica
(tiny random Llama) with small limits for the module."""

from __future__ import annotations

import json
import signal
import socket
import time
from contextlib import ExitStack, contextmanager
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from fleetserve.testing.launcher import ReplicaProcess

API_KEY = "sk-client-0123456789"
OPERATOR_KEY = "op-operator-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}
MODEL = "llama"
MAX_MODEL_LEN = 256
MAX_QUEUE = 8
MAX_PROMPTS = 6
MAX_CHOICES = 12
MAX_HEADER = 8192
MAX_CONNECTIONS = 12
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
# How long a test waits for the server to close a stalled socket: generous, so that a loaded
# machine does not fail it, and far below "never" (the bug).
CLOSE_WITHIN_S = 20.0
OPERATOR_ROUTES = ["/metrics", "/docs", "/redoc", "/openapi.json", "/v1/kv_events"]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("adversarial") / "server.log"
    replica = ReplicaProcess(
        tiny_llama,
        "--api-key", API_KEY,
        "--operator-key", OPERATOR_KEY,
        "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN),
        "--max-body-bytes", str(256 * 1024),
        "--max-num-seqs", "4",
        "--kv-cache-memory", "32MiB",
        "--num-threads", "1",
        "--max-queue-len", str(MAX_QUEUE),
        "--max-prompts-per-request", str(MAX_PROMPTS),
        "--max-choices-per-request", str(MAX_CHOICES),
        "--max-header-bytes", str(MAX_HEADER),
        "--max-connections", str(MAX_CONNECTIONS),
        "--header-timeout", str(HEADER_TIMEOUT),
        "--body-timeout", str(BODY_TIMEOUT),
        log_path=log,
    )  # fmt: skip
    try:
        replica.wait_ready(timeout=300)
        yield replica
    finally:
        assert replica.stop() == 0, replica.log()[-3000:]


def post(server, path: str, body, headers=AUTH, **kwargs) -> httpx.Response:
    if isinstance(body, bytes | str):
        kwargs["content"] = body
        headers = {"Content-Type": "application/json", **headers}
    else:
        kwargs["json"] = body
    return httpx.post(server.url + path, headers=headers, timeout=60, **kwargs)


def assert_error(r: httpx.Response, status: int, *words: str, param: str | None = None) -> dict:
    """A 4xx in OpenAI's shape whose message names the problem (`words`, case-insensitive)."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word.lower() in error["message"].lower(), (word, error)
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_serves(server) -> None:
    """A normal request is still answered in full."""
    r = post(server, "/v1/completions", {"prompt": "the", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def address(server) -> tuple[str, int]:
    url = urlsplit(server.url)
    return url.hostname, url.port


def raw_socket(server) -> socket.socket:
    sock = socket.create_connection(address(server), timeout=CLOSE_WITHIN_S)
    return sock


def health_over(sock: socket.socket) -> bytes:
    """GET /health on a kept-alive raw connection; the whole response."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(b'{"status":"ok"}') and b"connection: close" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; raises TimeoutError if it never does."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


# ---- malformed bodies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "words", "param"),
    [
        (b"[1, 2, 3]", ["valid dictionary"], None),
        (b'"just a string"', ["valid dictionary"], None),
        (b"null", ["valid dictionary"], None),
        (b"{not json", ["json"], None),
        (b'{"prompt": "\xff\xfe"}', [], None),
        (b'{"prompt": "hi", "temperature": NaN}', ["temperature"], "temperature"),
        (b'{"prompt": "hi", "top_p": Infinity}', ["top_p"], "top_p"),
        (b'{"prompt": "hi", "temperature": 1e999}', ["temperature"], "temperature"),
        (b'{"prompt": "\\ud800"}', ["prompt"], None),
    ],
    ids=["list", "string", "null", "not-json", "bad-utf8", "nan", "infinity", "overflow",
         "lone-surrogate"],
)  # fmt: skip
def test_malformed_json_is_400(server, body, words, param):
    error = assert_error(post(server, "/v1/completions", body), 400, *words)
    if param is not None:
        assert error["param"] == param, error
    assert_serves(server)


def test_wrong_content_type_is_400(server):
    r = httpx.post(
        server.url + "/v1/completions",
        content=json.dumps({"prompt": "hi"}),
        headers={**AUTH, "Content-Type": "text/plain"},
    )
    assert_error(r, 400)
    form = httpx.post(server.url + "/v1/completions", data={"prompt": "hi"}, headers=AUTH)
    assert_error(form, 400)
    assert_serves(server)


@pytest.mark.parametrize(
    "prompt",
    [
        5,
        1.5,
        None,
        {"text": "hi"},
        [1.5, 2],
        [[1, "a"]],
        [[[1, 2]]],
        ["a", [1, 2]],
        [[1, 2], "a"],
        [-1, 2],
        [[-1]],
        [],
        [[]],
        [""],
        [10**30],
    ],
)
def test_prompt_of_wrong_shape_is_400(server, prompt):
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
    error = assert_error(r, 400)
    assert error["param"].startswith("prompt"), error
    assert_serves(server)


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ("hi", "messages"),
        ([], "messages"),
        ([1], "messages.0"),
        ([{"content": "hi"}], "messages.0.role"),
        ([{"role": "wizard", "content": "hi"}], "messages.0.role"),
        ([{"role": "user", "content": 5}], "messages.0.content"),
        ([{"role": "user", "content": [{"type": "image_url", "url": "x"}]}], "messages.0.content"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages.0.content"),
        ([{"role": "user", "content": "hi"}] * 5000, "messages"),
    ],
)
def test_messages_of_wrong_shape_are_400(server, messages, param):
    r = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    error = assert_error(r, 400)
    assert error["param"].startswith(param), error
    assert_serves(server)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 10**30),
        ("n", 10**30),
        ("n", 129),
        ("seed", 2**70),
        ("priority", 2**40),
        ("logprobs", 10**6),
        ("prompt_logprobs", 21),
        ("min_tokens", -1),
        ("stop", ["x"] * 17),
        ("stop", "x" * 513),
        ("stop", ["x" * 513]),
        ("stop_token_ids", [3] * 17),
        ("cache_salt", "s" * 1025),
    ],
)
def test_out_of_bounds_fields_are_400(server, field, value):
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: value})
    error = assert_error(r, 400, field)
    assert error["param"].startswith(field), error
    assert_serves(server)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"min_tokens": 10**30}, "min_tokens"),
        ({"max_completion_tokens": 10**30}, "max_completion_tokens"),
        ({"top_k": 10**30, "seed": -(2**64)}, "seed"),
    ],
)
def test_chat_out_of_bounds_fields_are_400(server, extra, field):
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    assert_error(post(server, "/v1/chat/completions", body), 400, field)
    assert_serves(server)


# ---- work one request may buy --------------------------------------------------------------


def test_too_many_prompts_is_400_naming_the_limit(server):
    r = post(server, "/v1/completions", {"prompt": [[5, 6, 7]] * (MAX_PROMPTS + 1)})
    assert_error(r, 400, "--max-prompts-per-request", param="prompt")
    # Beyond OpenAI's 2048 the schema itself refuses the list.
    r = post(server, "/v1/completions", {"prompt": [[5]] * 2049, "max_tokens": 1})
    assert_error(r, 400, param="prompt")
    assert_serves(server)


def test_prompts_times_n_is_bounded(server):
    # The example: 100 prompts x n=4 returned 400 choices with --max-queue-len 4.
    r = post(server, "/v1/completions", {"prompt": [[5, 6, 7]] * 100, "n": 4})
    assert_error(r, 400, "--max-prompts-per-request")
    r = post(server, "/v1/completions", {"prompt": [[5, 6, 7]] * 4, "n": 4, "max_tokens": 1})
    assert_error(r, 400, "--max-choices-per-request", param="n")
    chat = {"messages": [{"role": "user", "content": "hi"}], "n": MAX_CHOICES + 1}
    assert_error(post(server, "/v1/chat/completions", chat), 400, "--max-choices-per-request")
    assert_serves(server)


def test_request_that_can_never_fit_the_queue_is_400(server):
    # 2 prompts x n=5 = 10 engine requests: within --max-choices-per-request, over the queue.
    body = {"prompt": [[5, 6, 7]] * 2, "n": 5, "max_tokens": 1}
    assert_error(post(server, "/v1/completions", body), 400, "--max-queue-len", param="n")
    ok = {"prompt": [[5, 6, 7]] * 2, "n": 4, "max_tokens": 2, "ignore_eos": True}
    r = post(server, "/v1/completions", ok)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 8
    assert_serves(server)


@contextmanager
def engine_paused(server):
    """SIGSTOP the replica's child processes (the engine core): admitted requests then wait
    for their first token as long as the test needs."""
    children = psutil.Process(server.proc.pid).children(recursive=True)
    for child in children:
        child.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for child in children:
            child.send_signal(signal.SIGCONT)


def test_child_requests_count_against_the_queue(server):
    body = {"max_tokens": 2, "ignore_eos": True, "stream": True}
    with ExitStack() as stack, httpx.Client(timeout=60, headers=AUTH) as client:
        stack.enter_context(engine_paused(server))

        def stream(prompts: int, n: int) -> httpx.Response:
            req = {**body, "prompt": [[5, 6, 7]] * prompts, "n": n}
            r = stack.enter_context(client.stream("POST", server.url + "/v1/completions", json=req))
            return r

        assert stream(2, 3).status_code == 200  # 6 engine requests wait
        full = stream(1, 3)  # 6 + 3 > MAX_QUEUE: not now
        assert full.status_code == 429
        full.read()
        assert_error(full, 429, "waiting")
        assert int(full.headers["retry-after"]) >= 1
        chat = {"messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 1}
        assert_error(client.post(server.url + "/v1/chat/completions", json=chat), 429)
        assert stream(1, 2).status_code == 200  # 6 + 2 fits exactly
        one_more = stream(1, 1)
        assert one_more.status_code == 429
    # Resumed and closed: every place is given back.
    assert_serves(server)
    r = post(server, "/v1/completions", {**body, "stream": False, "prompt": [[5]] * 2, "n": 4})
    assert r.status_code == 200, r.text


def test_text_far_over_the_context_is_refused_before_tokenizing(server):
    # Far more characters than MAX_MODEL_LEN tokens can hold: refused on its length alone
    # (the message counts characters; after tokenizing it would count tokens).
    huge = "the " * 50_000
    r = post(server, "/v1/completions", {"prompt": huge, "max_tokens": 1})
    assert assert_error(r, 400, "characters", param="prompt")["code"] == "context_length_exceeded"
    r = post(server, "/v1/completions", {"prompt": ["hi", huge], "max_tokens": 1})
    assert_error(r, 400, "characters", param="prompt")
    chat = {"messages": [{"role": "user", "content": huge}]}
    assert_error(post(server, "/v1/chat/completions", chat), 400, "characters", param="messages")
    # Just over the context in tokens, but short in characters: the tokenized check says so.
    r = post(server, "/v1/completions", {"prompt": "the " * (MAX_MODEL_LEN + 10)})
    assert_error(r, 400, "tokens", param="prompt")
    assert_serves(server)


# ---- priority ------------------------------------------------------------------------------


@pytest.mark.parametrize("priority", [-(2**31), -1, 1, 2**31 - 1])
def test_client_priority_needs_the_flag(server, priority):
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1, "priority": priority})
    assert_error(r, 400, "--allow-client-priority", param="priority")
    chat = {"messages": [{"role": "user", "content": "hi"}], "priority": priority}
    assert_error(post(server, "/v1/chat/completions", chat), 400, "--allow-client-priority")
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1, "priority": 0})
    assert r.status_code == 200, r.text


# ---- operator routes -----------------------------------------------------------------------


@contextmanager
def get(server, path: str, headers: dict):
    with httpx.stream("GET", server.url + path, headers=headers, timeout=30) as r:
        yield r


@pytest.mark.parametrize("path", OPERATOR_ROUTES)
def test_operator_routes_need_the_operator_key(server, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": OPERATOR_KEY}):
        with get(server, path, headers) as r:
            r.read()
            assert_error(r, 401, "operator")
    with get(server, path, AUTH) as r:
        r.read()
        assert assert_error(r, 403, "--operator-key")["code"] == "operator_scope_required"
    with get(server, path, OPERATOR) as r:
        assert r.status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key
    assert_serves(server)


def test_operator_key_also_works_on_client_routes(server):
    assert httpx.get(server.url + "/v1/models", headers=OPERATOR).status_code == 200
    body = {"prompt": "hi", "max_tokens": 1}
    assert post(server, "/v1/completions", body, headers=OPERATOR).status_code == 200
    assert_error(post(server, "/v1/completions", body, headers={}), 401)


def _stored_events(server, query: str, prompt: list[int]) -> list[dict]:
    with get(server, "/v1/kv_events" + query, OPERATOR) as r:
        assert r.status_code == 200
        post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        for line in r.iter_lines():
            if line.startswith("data: "):
                events = json.loads(line.removeprefix("data: "))["events"]
                stored = [e for e in events if e["kind"] == "stored"]
                if stored:
                    return stored
    raise AssertionError("no stored event")


def test_kv_events_carry_no_token_ids_unless_asked(server):
    prompt = list(range(100, 140))  # two full blocks of 16
    stored = _stored_events(server, "", prompt)
    assert stored[0]["block_hashes"] and "parent_hash" in stored[0]
    assert all("token_ids" not in e for e in stored), stored
    other = list(range(200, 240))
    stored = _stored_events(server, "?token_ids=true", other)
    assert stored[0]["token_ids"][0] == other[:16]


def test_no_redirect_echoes_the_host_header(server):
    """A trailing slash used to get a 307 whose Location echoed the client's Host header."""
    for path in ("/metrics/", "/v1/models/", "/health/"):
        resp = httpx.get(server.url + path, headers={**OPERATOR, "Host": "evil.example"})
        assert resp.status_code == 404 and "location" not in resp.headers, path
    assert post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_large_unary_answer_with_echo_and_logprobs_is_whole(server):
    """Echo + logprobs for many choices makes a large JSON answer, now built and encoded on
    a worker thread (the stall it caused was measured by hand; a test does not time it):
    the answer is still whole and right."""
    body = {"prompt": [list(range(3, 40))] * 2, "max_tokens": 1, "n": 4, "echo": True,
            "logprobs": 5, "temperature": 1}  # fmt: skip
    resp = post(server, "/v1/completions", body)
    assert resp.status_code == 200, resp.text
    choices = resp.json()["choices"]
    assert len(choices) == 8 and all(len(c["logprobs"]["tokens"]) == 38 for c in choices)


# ---- slow and huge connections -------------------------------------------------------------


def test_half_a_header_then_silence_is_closed(server):
    with ExitStack() as stack:
        silent = stack.enter_context(raw_socket(server))  # connects, sends nothing
        half = stack.enter_context(raw_socket(server))
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: app")
        assert_serves(server)  # served alongside the stalled sockets
        start = time.monotonic()
        for sock in (silent, half):
            data = read_until_closed(sock)  # TimeoutError after CLOSE_WITHIN_S: never closed
            assert data == b"" or data.startswith(b"HTTP/1.1 408"), data
        assert time.monotonic() - start < CLOSE_WITHIN_S
    assert_serves(server)


def test_keep_alive_connection_with_a_stalled_second_request_is_closed(server):
    with raw_socket(server) as sock:
        first = health_over(sock)
        assert first.startswith(b"HTTP/1.1 200"), first
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # a second head, never finished
        data = read_until_closed(sock)
        assert data == b"" or data.startswith(b"HTTP/1.1 408"), data
    assert_serves(server)


def test_slow_body_gets_408_and_is_closed(server):
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: 100\r\n\r\n"
    )
    with raw_socket(server) as sock:
        sock.sendall(head.encode() + b'{"prompt": ')  # 11 of 100 bytes, then silence
        data = read_until_closed(sock)
        assert data.startswith(b"HTTP/1.1 408"), data
        assert b"body" in data.lower()
    assert_serves(server)


@pytest.mark.parametrize("size", [MAX_HEADER + 1000, 8_000_000])
def test_oversized_header_is_431_or_closed_never_200(server, size):
    head = (
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"X-Big: {'a' * size}\r\n\r\n"
    ).encode()
    with raw_socket(server) as sock:
        try:
            sock.sendall(head)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading and closed: also a refusal
        data = read_until_closed(sock)
    assert data == b"" or data.startswith(b"HTTP/1.1 431"), data[:200]
    assert_serves(server)


def test_connections_over_the_limit_get_503(server):
    with ExitStack() as stack:
        idle = []
        # Kept-alive connections after one request each; uvicorn counts the new one too.
        for _ in range(MAX_CONNECTIONS - 1):
            sock = stack.enter_context(raw_socket(server))
            assert health_over(sock).startswith(b"HTTP/1.1 200")
            idle.append(sock)
        r = httpx.get(server.url + "/health", timeout=30)
        assert r.status_code == 503, r.text
    assert_serves(server)

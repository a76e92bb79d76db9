"""The gateway's KServe v2 routes attacked from outside. Each test here failed on main when
it was written."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest
from gateway_harness import FAST_GATEWAY, ThreadServer, wait_until
from tensor_models import tiny_net
from test_attack_tensor import raw_post

from fleetserve.gateway.api_keys import with_operator_key
from fleetserve.gateway.app import create_app
from fleetserve.gateway.circuit_breaker import BreakerState
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.replica import ReplicaKind
from fleetserve.tensor.app import build_app
from fleetserve.tensor.batcher import BatchConfig
from fleetserve.tensor.handlers import TensorHandler
from fleetserve.tensor.state import TensorSettings
from fleetserve.testing.fake_replica import ByteTokenizer

OPERATOR_KEY = "operator-key"
ROW = {"inputs": [[0.0, 0.0, 0.0, 0.0]]}


@pytest.fixture(scope="module")
def gateway_to_model_named_ready():
    """A gateway in front of a tensor replica whose model is served as "ready" (any name
    the gateway's name check accepts is a fair name)."""
    net = tiny_net()
    settings = TensorSettings(
        model="ready",
        served_model_name="ready",
        operator_key=OPERATOR_KEY,
        batch=BatchConfig(max_batch_size=4),
    )
    replica = ThreadServer(build_app(settings, handler_factory=lambda _: TensorHandler(net)))
    replica.start()
    gw = Gateway(
        GatewayConfig(**FAST_GATEWAY),
        with_operator_key(None, "gateway-operator"),
        ByteTokenizer(),
        upstream_api_key=OPERATOR_KEY,
    )
    gw.add_replica(replica.url, ReplicaKind.FLEETSERVE)
    front = ThreadServer(create_app(gw)).start()
    try:
        wait_until(lambda: all(r.ready for r in gw.replicas.values()), 30, what="replica ready")
        yield front.url, replica.url
    finally:
        front.stop()
        replica.stop()


def test_metadata_of_a_model_named_ready_is_its_metadata(gateway_to_model_named_ready):
    """The gateway chose the replica's `/ready` route by `request.url.path.endswith("/ready")`,
    so the metadata of a model named "ready" came back as its readiness."""
    front, replica = gateway_to_model_named_ready
    auth = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    direct = httpx.get(replica + "/v2/models/ready", headers=auth)
    assert direct.status_code == 200 and "inputs" in direct.json()
    through = httpx.get(front + "/v2/models/ready")
    assert through.status_code == 200, through.text
    assert through.json() == direct.json()


class GatedNet(TensorHandler):
    """tiny_net whose every batch waits for `gate`: a replica as busy as a test wants."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__(tiny_net())
        self.gate = gate

    def predict(self, rows):
        self.gate.wait(30)
        return super().predict(rows)


def test_replicas_that_time_requests_out_under_load_are_busy_not_broken():
    """A tensor replica answers a request that waited past its queue timeout with 503
    `queue_timeout` and Retry-After: it is busy, not broken. The gateway counted each as the
    replica's failure: it retried it on the other (as busy) replica, opened the circuit
    breakers of both healthy replicas and answered 502 "every replica tried failed" with no
    Retry-After. Busy should read like a full queue (429): passed on with Retry-After and
    neutral for the breaker."""
    gate = threading.Event()
    replicas = []
    for _ in range(2):
        settings = TensorSettings(
            model="m",
            served_model_name="m",
            operator_key=OPERATOR_KEY,
            batch=BatchConfig(max_batch_size=1, timeout_s=0.2),
        )
        app = build_app(settings, handler_factory=lambda _: GatedNet(gate))
        replicas.append((ThreadServer(app).start(), app))
    gw = Gateway(
        GatewayConfig(**{**FAST_GATEWAY, "breaker_cooldown_s": 30.0}),
        with_operator_key(None, "gateway-operator"),
        ByteTokenizer(),
        upstream_api_key=OPERATOR_KEY,
    )
    for server, _ in replicas:
        gw.add_replica(server.url, ReplicaKind.FLEETSERVE)
    front = ThreadServer(create_app(gw)).start()
    try:
        wait_until(lambda: all(r.ready for r in gw.replicas.values()), 30, what="replicas ready")
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = [
                pool.submit(httpx.post, front.url + "/predict", json=ROW, timeout=60)
                for _ in range(12)
            ]

            def waiting() -> int:
                return sum(app.state.server.workers.load()[1] for _, app in replicas)

            wait_until(lambda: waiting() >= 4, 30, 0.01, "requests queued on the replicas")
            queued_at = time.monotonic()
            wait_until(lambda: time.monotonic() > queued_at + 0.3, 5, 0.01, "their timeout")
            gate.set()
            resps = [a.result() for a in answers]
        statuses = sorted(r.status_code for r in resps)
        assert 200 in statuses, statuses
        refused = [r for r in resps if r.status_code != 200]
        assert refused, statuses  # some waited past the replicas' queue timeout
        assert all(r.status_code in (429, 503) for r in refused), statuses
        assert all("retry-after" in r.headers for r in refused), [r.text for r in refused]
        now = gw.clock()
        assert [r.breaker.state(now) for r in gw.replicas.values()] == [BreakerState.CLOSED] * 2
    finally:
        gate.set()
        front.stop()
        for server, _ in replicas:
            server.stop()


@pytest.mark.parametrize(
    "path, header",
    [
        ("/v2/models/ready/infer", b"Inference-Header-Content-Length: \xb2"),
        ("/predict", b"Content-Type: \xe9t\xe9"),
    ],
    ids=["header-length", "content-type"],
)
def test_a_forwarded_header_with_a_non_ascii_byte_is_a_4xx(
    gateway_to_model_named_ready, path, header
):
    """The gateway passes Content-Type and Inference-Header-Content-Length on as they came;
    a latin-1 byte in them (legal on the wire) made httpx raise UnicodeEncodeError, and the
    client got a bare text/plain 500 from uvicorn."""
    front, _ = gateway_to_model_named_ready
    body = json.dumps({"inputs": [[0.0, 0.0, 0.0, 0.0]]}).encode()
    answer = raw_post(front, path, body, header)
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 500, answer[:300]
    assert httpx.post(front + "/predict", json=ROW).status_code == 200

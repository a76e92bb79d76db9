"""The gateway's KServe v2 routes attacked from outside. Each test here failed on main when
it was written."""

from __future__ import annotations

import httpx
import pytest
from gateway_harness import FAST_GATEWAY, ThreadServer, wait_until
from tensor_models import tiny_net

from fleetserve.gateway.api_keys import with_operator_key
from fleetserve.gateway.app import create_app
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.replica import ReplicaKind
from fleetserve.tensor.app import build_app
from fleetserve.tensor.batcher import BatchConfig
from fleetserve.tensor.handlers import TensorHandler
from fleetserve.tensor.state import TensorSettings
from fleetserve.testing.fake_replica import ByteTokenizer

OPERATOR_KEY = "operator-key"


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

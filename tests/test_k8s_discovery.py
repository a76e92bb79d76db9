"""Replica discovery from Kubernetes EndpointSlices (`fleetserve gateway --discover
kubernetes://NS/SERVICE`), on recorded API objects: pods loading, ready, terminating and
gone; addresses coming and going; dual-stack and unnamed ports. Then the poll loop against a
stand-in API server in front of fake replicas, and the autoscaler publishing its target."""

from __future__ import annotations

import asyncio
import copy

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from gateway_harness import ThreadServer, wait_until

from fleetserve.fleet.autoscaler import Autoscaler, AutoscalerConfig
from fleetserve.fleet.controller import FleetController
from fleetserve.fleet.kubernetes import (
    Change,
    DiscoveryTarget,
    Endpoint,
    ExternalScaler,
    KubernetesDiscovery,
    endpoints_from_slices,
    reconcile,
)
from fleetserve.gateway.api_keys import with_operator_key
from fleetserve.gateway.app import create_app
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.gateway import Gateway
from fleetserve.testing.fake_replica import FakeReplica, FakeSettings


def endpoint(pod: str, ip: str, ready=True, serving=None, terminating=False) -> dict:
    """One endpoint as the API server writes it (serving follows ready unless terminating)."""
    return {
        "addresses": [ip],
        "conditions": {
            "ready": ready,
            "serving": ready if serving is None else serving,
            "terminating": terminating,
        },
        "nodeName": "node-a",
        "targetRef": {"kind": "Pod", "name": pod, "namespace": "llm", "uid": f"uid-{pod}"},
        "zone": "zone-a",
    }


def endpoint_slice(*endpoints: dict, name="fleet-replicas-abcde", port=8000, family="IPv4"):
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "namespace": "llm",
            "labels": {
                "kubernetes.io/service-name": "fleet-replicas",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": family,
        "endpoints": list(endpoints),
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }


def test_the_discover_uri_names_a_namespace_and_a_service():
    assert DiscoveryTarget.parse("kubernetes://llm/fleet-replicas") == DiscoveryTarget(
        "llm", "fleet-replicas", "http"
    )
    assert DiscoveryTarget.parse("kubernetes://llm/fleet:api").port_name == "api"
    for bad in ("http://llm/fleet", "kubernetes://llm", "kubernetes://LLM/x", "kubernetes:///x",
                "kubernetes://llm/x/../y", "kubernetes://llm/-x"):  # fmt: skip
        with pytest.raises(ValueError, match="--discover"):
            DiscoveryTarget.parse(bad)


def test_slices_map_to_pods_with_their_readiness():
    slices = [
        endpoint_slice(
            endpoint("rep-0", "10.0.0.5"),
            endpoint("rep-1", "10.0.0.6", ready=False),  # loading its model
            endpoint("rep-2", "10.0.0.7", ready=False, serving=True, terminating=True),
        ),
        endpoint_slice(endpoint("rep-3", "10.0.1.9"), name="fleet-replicas-fghij", port=9000),
    ]
    assert endpoints_from_slices(slices) == {
        "rep-0": Endpoint("rep-0", "http://10.0.0.5:8000", ready=True, terminating=False),
        "rep-1": Endpoint("rep-1", "http://10.0.0.6:8000", ready=False, terminating=False),
        "rep-2": Endpoint("rep-2", "http://10.0.0.7:8000", ready=False, terminating=True),
        "rep-3": Endpoint("rep-3", "http://10.0.1.9:9000", ready=True, terminating=False),
    }


def test_odd_slices_are_read_as_the_api_documents_them():
    no_conditions = endpoint("rep-0", "10.0.0.5")
    del no_conditions["conditions"]  # absent conditions mean ready
    no_address = endpoint("rep-1", "10.0.0.6")
    no_address["addresses"] = []
    v6 = endpoint_slice(endpoint("rep-0", "fd00::5"), family="IPv6")  # dual stack: same pod
    unnamed = endpoint_slice(endpoint("rep-2", "10.0.0.8"))
    unnamed["ports"] = [{"port": 8080, "protocol": "TCP"}]
    wrong_port = endpoint_slice(endpoint("rep-3", "10.0.0.9"))
    wrong_port["ports"] = [{"name": "metrics", "port": 9090}, {"name": "grpc", "port": 9000}]
    no_pod = endpoint("", "10.0.0.10")
    del no_pod["targetRef"]
    found = endpoints_from_slices(
        [endpoint_slice(no_conditions, no_address, no_pod), v6, unnamed, wrong_port]
    )
    assert found == {
        "rep-0": Endpoint("rep-0", "http://10.0.0.5:8000", True, False),
        "10.0.0.10": Endpoint("10.0.0.10", "http://10.0.0.10:8000", True, False),
        "rep-2": Endpoint("rep-2", "http://10.0.0.8:8080", True, False),
    }
    only_v6 = endpoints_from_slices([v6])
    assert only_v6["rep-0"].url == "http://[fd00::5]:8000"


def test_reconcile_follows_pods_through_their_life():
    ep = {
        "a": Endpoint("a", "http://10.0.0.5:8000", True, False),
        "b": Endpoint("b", "http://10.0.0.6:8000", False, False),
        "t": Endpoint("t", "http://10.0.0.9:8000", False, True),
    }
    assert reconcile({}, ep) == [Change("add", ep["a"], "a"), Change("add", ep["b"], "b")]
    table = {"a": (ep["a"].url, "ready"), "b": (ep["b"].url, "loading")}
    assert reconcile(table, ep) == []  # nothing new: b still loads, t was never ours
    b_ready = {**ep, "b": Endpoint("b", ep["b"].url, True, False)}
    assert reconcile(table, b_ready) == [Change("ready", b_ready["b"], "b")]
    a_going = {**ep, "a": Endpoint("a", ep["a"].url, False, True)}
    assert reconcile(table, a_going) == [Change("drain", a_going["a"], "a")]
    draining = {**table, "a": (ep["a"].url, "draining")}
    assert reconcile(draining, a_going) == []
    assert reconcile(draining, {"b": ep["b"]}) == [Change("remove", id="a")]
    moved = {"a": Endpoint("a", "http://10.0.3.1:8000", True, False), "b": ep["b"]}
    assert reconcile(table, moved) == [Change("readd", moved["a"], "a")]


# ---- the poll loop, against a stand-in API server ------------------------------------------------


class FakeApiServer:
    """The one route the discovery reads; checks the bearer token and the label selector."""

    def __init__(self, token: str) -> None:
        self.items: list[dict] = []
        self.calls = 0
        self.down = False  # answers 503 (an API server restarting)
        app = FastAPI()

        @app.get("/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices")
        async def slices(namespace: str, request: Request) -> JSONResponse:
            self.calls += 1
            if self.down:
                return JSONResponse({"kind": "Status", "code": 503}, 503)
            if request.headers.get("authorization") != f"Bearer {token}":
                return JSONResponse({"kind": "Status", "code": 401}, 401)
            selector = request.query_params.get("labelSelector")
            assert namespace == "llm" and selector == "kubernetes.io/service-name=fleet-replicas"
            return JSONResponse({"kind": "EndpointSliceList", "items": copy.deepcopy(self.items)})

        self.server = ThreadServer(app).start()


@pytest.fixture
def cluster():
    api = FakeApiServer("sa-token")
    pods = {f"rep-{i}": ThreadServer(FakeReplica(FakeSettings()).app()).start() for i in range(2)}
    config = GatewayConfig(router="round_robin", probe_interval_s=0.05)
    gw = Gateway(config, with_operator_key(None, "op"))
    front = ThreadServer(create_app(gw)).start()
    discovery = KubernetesDiscovery(
        DiscoveryTarget("llm", "fleet-replicas"),
        api_url=api.server.url,
        token="sa-token",
        interval_s=0.05,
    )
    task = front.call(lambda: front.loop.create_task(discovery.run(gw)))
    yield api, pods, gw, front, discovery
    front.call(task.cancel)
    front.stop()
    for pod in pods.values():
        pod.stop()
    api.server.stop()


def pod_endpoint(pods, name, **conditions) -> dict:
    host, port = pods[name].url.removeprefix("http://").split(":")
    ep = endpoint(name, host, **conditions)
    return ep, int(port)


def states(front) -> dict[str, str]:
    replicas = httpx.get(f"{front.url}/admin/replicas", headers={"Authorization": "Bearer op"})
    return {r["id"]: r["state"] for r in replicas.json()}


@pytest.mark.timeout(60)
def test_the_gateway_follows_the_pods_the_api_lists(cluster):
    api, pods, gw, front, _ = cluster

    # Every fake pod has its own port: one slice per pod, as a Service with a port per pod
    # would never be; the discovery reads each slice's port for its endpoints.
    def publish(**pod_conditions):
        api.items = []
        for name, conditions in pod_conditions.items():
            ep, port = pod_endpoint(pods, name, **conditions)
            api.items.append(endpoint_slice(ep, name=f"slice-{name}", port=port))

    publish(**{"rep-0": {"ready": False}})
    wait_until(lambda: states(front) == {"rep-0": "loading"}, 10, what="rep-0 loading")
    publish(**{"rep-0": {}, "rep-1": {}})
    wait_until(lambda: states(front) == {"rep-0": "ready", "rep-1": "ready"}, 10, what="ready")
    body = {"prompt": "hi", "max_tokens": 3}
    assert httpx.post(f"{front.url}/v1/completions", json=body).status_code == 200
    assert gw.metrics.cold_start._sum.get() > 0  # rep-0 was seen loading, then ready
    publish(**{"rep-0": {"ready": False, "serving": True, "terminating": True}, "rep-1": {}})
    wait_until(lambda: states(front)["rep-0"] == "draining", 10, what="rep-0 draining")
    for _ in range(4):  # no new work for a terminating pod
        assert httpx.post(f"{front.url}/v1/completions", json=body).status_code == 200
    assert gw.replicas["rep-0"].outstanding == 0
    publish(**{"rep-1": {}})
    wait_until(lambda: states(front) == {"rep-1": "ready"}, 10, what="rep-0 removed")


@pytest.mark.timeout(30)
def test_a_failing_api_leaves_the_known_replicas_alone(cluster):
    api, pods, gw, front, _ = cluster
    ep, port = pod_endpoint(pods, "rep-0")
    api.items = [endpoint_slice(ep, port=port)]
    wait_until(lambda: states(front) == {"rep-0": "ready"}, 10, what="rep-0 ready")
    api.down = True
    calls = api.calls
    wait_until(lambda: api.calls > calls + 3, 10, what="more polls")
    assert states(front) == {"rep-0": "ready"}  # an API outage is not a fleet outage
    api.down = False
    api.items = [{"not": "a slice"}]  # a list without the pod: it is gone
    wait_until(lambda: states(front) == {}, 10, what="rep-0 removed")


@pytest.mark.timeout(30)
def test_a_wrong_token_is_logged_and_nothing_changes(caplog):
    api = FakeApiServer("right")
    gw = Gateway(GatewayConfig())
    discovery = KubernetesDiscovery(
        DiscoveryTarget("llm", "fleet-replicas"), api_url=api.server.url, token="wrong",
        interval_s=0.01,
    )  # fmt: skip

    async def a_few_polls():
        task = asyncio.create_task(discovery.run(gw))
        await asyncio.sleep(0.3)
        task.cancel()

    try:
        asyncio.run(a_few_polls())
    finally:
        api.server.stop()
    assert gw.replicas == {} and api.calls >= 2
    assert "answered 401" in caplog.text
    assert caplog.text.count("replica discovery failed") == 1  # once, not every poll


def test_the_external_scaler_publishes_the_target_for_keda_or_an_hpa():
    gw = Gateway(GatewayConfig(router="round_robin"))
    discovery = KubernetesDiscovery(
        DiscoveryTarget("llm", "fleet-replicas"), api_url="http://127.0.0.1:9", token="t"
    )
    scaler = ExternalScaler(gw, discovery)
    policy = Autoscaler(AutoscalerConfig(min_replicas=0, max_replicas=4))
    controller = FleetController(gw, scaler, policy, cold_start_estimate_s=30.0)
    assert controller.tick().desired == 0
    gw.turned_away = 1  # a request at zero
    assert controller.tick().desired == 1
    metrics = gw.metrics.render().decode()
    assert "fleetserve:gateway_desired_replicas 1.0" in metrics
    assert 'scale_events_total{direction="up",reason="activate"} 1.0' in metrics
    assert gw.replicas == {}  # nothing was started: Kubernetes does that


def test_a_replica_an_operator_removed_while_it_loaded_comes_back_when_ready():
    gw = Gateway(GatewayConfig())
    discovery = KubernetesDiscovery(
        DiscoveryTarget("llm", "fleet-replicas"), api_url="http://127.0.0.1:9", token="t"
    )
    loading = Endpoint("rep-0", "http://10.0.0.5:8000", ready=False, terminating=False)
    discovery.apply(gw, {"rep-0": loading})
    gw.remove_replica("rep-0")  # DELETE /admin/replicas/rep-0
    ready = Endpoint("rep-0", "http://10.0.0.5:8000", ready=True, terminating=False)
    discovery.apply(gw, {"rep-0": ready})  # raised KeyError and stopped the discovery
    assert gw.replicas["rep-0"].url == ready.url and not gw.replicas["rep-0"].down


def test_the_service_account_token_is_read_on_every_call(tmp_path, monkeypatch):
    # The kubelet rotates a projected token: one read at start would expire (every poll 401,
    # the replica table frozen).
    from fleetserve.fleet import kubernetes

    monkeypatch.setattr(kubernetes, "SERVICE_ACCOUNT", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    (tmp_path / "token").write_text("first\n")
    discovery = KubernetesDiscovery(DiscoveryTarget("llm", "fleet-replicas"), verify=False)
    assert discovery.api_url == "https://10.96.0.1:443"
    assert discovery.headers == {"Authorization": "Bearer first"}
    (tmp_path / "token").write_text("rotated\n")
    assert discovery.headers == {"Authorization": "Bearer rotated"}

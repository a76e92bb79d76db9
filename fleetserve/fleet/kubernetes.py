"""Replicas discovered on Kubernetes: `fleetserve gateway --discover kubernetes://NS/SERVICE`.

On Kubernetes the replica Deployment is the backend: Kubernetes places, restarts and stops
the pods, KEDA or an HPA sets their number from the gateway's
`fleetserve:gateway_desired_replicas`, and the gateway learns the pods from the
EndpointSlices of the replicas' headless Service (label `kubernetes.io/service-name`), read
with the gateway's own ServiceAccount (get/list on `endpointslices`, nothing more).

Each poll maps the slices to replicas (`endpoints_from_slices`, pure) and reconciles the
gateway's table with them (`reconcile`, pure):

- a pod that is not ready yet (loading its model, startup probe pending) is listed as
  `loading`: no work until ready; the autoscaler counts it as capacity on its way, and its
  cold start (first seen to ready) is measured;
- a ready pod gets work once the gateway's own probe passes too;
- a *terminating* pod (scale-down, rollout, node drain) gets no new work; its streams finish
  there during its preStop drain, and those still running when its process exits continue
  on another replica with the token-exact migration;
- a pod that is gone from the slices is removed.

Pods are named by their pod name (`targetRef`), so a pod keeps its id for its life and a new
pod is a new replica, like the local backend's `r0, r1, ...`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from fleetserve.gateway.gateway import Gateway

logger = logging.getLogger(__name__)

SCHEME = "kubernetes://"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_PORT_NAME = "http"
POLL_INTERVAL_S = 2.0


@dataclass(frozen=True)
class DiscoveryTarget:
    namespace: str
    service: str
    port_name: str = DEFAULT_PORT_NAME

    @classmethod
    def parse(cls, uri: str) -> DiscoveryTarget:
        """`kubernetes://NAMESPACE/SERVICE[:PORT_NAME]`; ValueError naming what is wrong."""
        if not uri.startswith(SCHEME):
            raise ValueError(f"--discover {uri!r}: expected kubernetes://NAMESPACE/SERVICE")
        namespace, _, rest = uri[len(SCHEME) :].partition("/")
        service, _, port_name = rest.partition(":")
        for what, value in (("namespace", namespace), ("service", service)):
            if not _dns_label(value):
                raise ValueError(
                    f"--discover {uri!r}: the {what} {value!r} is not a Kubernetes name "
                    "(lowercase letters, digits and '-', at most 63)"
                )
        if port_name and not _dns_label(port_name):
            raise ValueError(f"--discover {uri!r}: bad port name {port_name!r}")
        return cls(namespace, service, port_name or DEFAULT_PORT_NAME)


_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _dns_label(value: str) -> bool:
    """A Kubernetes name (RFC 1123 label): ASCII lowercase letters, digits and '-'."""
    return _DNS_LABEL.fullmatch(value) is not None


@dataclass(frozen=True)
class Endpoint:
    """One replica pod as its EndpointSlice describes it."""

    id: str  # the pod's name (its address when the slice names no pod)
    url: str
    ready: bool
    terminating: bool


def endpoints_from_slices(
    slices: Iterable[Mapping[str, Any]], port_name: str = DEFAULT_PORT_NAME
) -> dict[str, Endpoint]:
    """The replica pods of a Service's EndpointSlices (objects as the API returns them).
    An endpoint is skipped when its slice has no port named `port_name` (or, if the slice
    has a single unnamed port, that one) or it has no address. A pod listed twice (dual-stack
    slices) keeps its first address."""
    found: dict[str, Endpoint] = {}
    for piece in slices:
        port = _port(piece.get("ports") or [], port_name)
        if port is None:
            continue
        ipv6 = piece.get("addressType") == "IPv6"
        for ep in piece.get("endpoints") or []:
            addresses = ep.get("addresses") or []
            if not addresses:
                continue
            host = f"[{addresses[0]}]" if ipv6 else addresses[0]
            ref = ep.get("targetRef") or {}
            rid = ref.get("name") if ref.get("kind", "Pod") == "Pod" else None
            rid = rid or addresses[0]
            conditions = ep.get("conditions") or {}
            # Absent conditions mean ready (the API's documented default); `serving` is
            # readiness that stays true while terminating, so `ready` is the one to use.
            terminating = bool(conditions.get("terminating", False))
            ready = conditions.get("ready") is not False and not terminating
            found.setdefault(rid, Endpoint(rid, f"http://{host}:{port}", ready, terminating))
    return found


def _port(ports: list[Mapping[str, Any]], name: str) -> int | None:
    for port in ports:
        if port.get("name") == name and port.get("port"):
            return int(port["port"])
    if len(ports) == 1 and not ports[0].get("name") and ports[0].get("port"):
        return int(ports[0]["port"])
    return None


@dataclass(frozen=True)
class Change:
    """What the gateway must do for one replica: `add` (loading or ready), `ready`,
    `drain`, `remove`, or `readd` (same pod name, new address: a new process)."""

    action: str
    endpoint: Endpoint | None = None
    id: str = ""


def reconcile(table: Mapping[str, tuple[str, str]], seen: Mapping[str, Endpoint]) -> list[Change]:
    """The changes that bring the gateway's discovered replicas (`table`: id -> (url, one of
    loading|ready|draining as the gateway holds it)) in line with the pods `seen` now."""
    changes = []
    for rid, (url, state) in table.items():
        ep = seen.get(rid)
        if ep is None:
            changes.append(Change("remove", id=rid))
        elif ep.url != url:
            changes.append(Change("readd", ep, rid))
        elif ep.terminating and state != "draining":
            changes.append(Change("drain", ep, rid))
        elif ep.ready and state == "loading":
            changes.append(Change("ready", ep, rid))
    for rid, ep in seen.items():
        if rid not in table and not ep.terminating:
            changes.append(Change("add", ep, rid))
    return changes


class KubernetesDiscovery:
    """Polls the EndpointSlices of one Service and applies `reconcile` to a gateway."""

    def __init__(
        self,
        target: DiscoveryTarget,
        api_url: str | None = None,
        token: str | None = None,
        verify: ssl.SSLContext | bool = True,
        interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        """Without `api_url`/`token`, the pod's own: $KUBERNETES_SERVICE_HOST/PORT and the
        mounted ServiceAccount token and CA."""
        self.target = target
        self.interval_s = interval_s
        if api_url is None:
            host = os.environ.get("KUBERNETES_SERVICE_HOST")
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise ValueError(
                    "--discover kubernetes:// runs inside a pod: $KUBERNETES_SERVICE_HOST is unset"
                )
            api_url = f"https://{host}:{port}"
            ca = SERVICE_ACCOUNT / "ca.crt"
            if verify is True and ca.exists():
                verify = ssl.create_default_context(cafile=str(ca))
        self.api_url = api_url.rstrip("/")
        self.token = token  # None: the mounted ServiceAccount token, read on every call
        self.verify = verify
        self.discovered: dict[str, tuple[str, str]] = {}  # id -> (url, loading|ready|draining)

    @property
    def path(self) -> str:
        selector = quote(f"kubernetes.io/service-name={self.target.service}", safe="")
        return (
            f"/apis/discovery.k8s.io/v1/namespaces/{self.target.namespace}/endpointslices"
            f"?labelSelector={selector}"
        )

    @property
    def headers(self) -> dict[str, str]:
        """The bearer token, read afresh each time: the kubelet rotates a projected
        ServiceAccount token, and an old one expires (every call would answer 401)."""
        token = self.token
        if token is None:
            token = (SERVICE_ACCOUNT / "token").read_text().strip()
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def list_slices(self, client: httpx.AsyncClient) -> list[dict]:
        try:
            headers = self.headers
        except OSError as exc:
            raise RuntimeError(f"cannot read the ServiceAccount token: {exc}") from None
        resp = await client.get(self.api_url + self.path, headers=headers)
        if resp.status_code != 200:
            raise RuntimeError(
                f"listing the EndpointSlices of {self.target.namespace}/{self.target.service} "
                f"answered {resp.status_code}: {resp.text[:200]}"
            )
        items = resp.json().get("items")
        if not isinstance(items, list):
            raise RuntimeError("the EndpointSlice list has no items")
        return items

    def apply(self, gw: Gateway, seen: Mapping[str, Endpoint]) -> list[Change]:
        """Reconcile `gw` with the pods `seen`; returns what changed."""
        changes = reconcile(self.discovered, seen)
        for change in changes:
            rid, ep = change.id, change.endpoint
            if change.action in ("remove", "readd"):
                gw.remove_replica(rid)
                self.discovered.pop(rid, None)
                logger.info("replica %s gone from %s", rid, self.target.service)
            if change.action in ("add", "readd"):
                assert ep is not None
                logger.info("replica %s found at %s", rid, ep.url)
                if ep.ready:  # found ready (the gateway restarted): no cold start to measure
                    gw.add_replica(ep.url, replica_id=rid)
                    self.discovered[rid] = (ep.url, "ready")
                else:  # loading until Kubernetes calls it ready; probed from then on
                    gw.mark_loading(rid, ep.url)
                    self.discovered[rid] = (ep.url, "loading")
            elif change.action == "ready":
                assert ep is not None
                if rid not in gw.replicas:  # an operator removed it while it loaded
                    gw.mark_loading(rid, ep.url)
                gw.mark_up(rid, ep.url)
                self.discovered[rid] = (ep.url, "ready")
            elif change.action == "drain":
                if rid in gw.replicas:
                    gw.set_draining(rid, True)
                self.discovered[rid] = (self.discovered[rid][0], "draining")
                logger.info("replica %s terminating: no new work", rid)
        return changes

    async def run(self, gw: Gateway) -> None:
        """Poll and reconcile until cancelled; an API error is logged and retried (the
        replicas known stay as they are meanwhile)."""
        async with httpx.AsyncClient(verify=self.verify, timeout=10.0) as client:
            failing = False
            while True:
                try:
                    slices = await self.list_slices(client)
                    self.apply(gw, endpoints_from_slices(slices, self.target.port_name))
                    failing = False
                except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                    if not failing:
                        logger.warning("replica discovery failed (retrying): %s", exc)
                    failing = True
                except Exception:  # a bug here must not stop the discovery for good
                    logger.exception("replica discovery crashed (retrying)")
                await asyncio.sleep(self.interval_s)


class ExternalScaler:
    """Where the autoscaler's decisions go when Kubernetes owns the replicas: the target is
    published as `fleetserve:gateway_desired_replicas` for KEDA or an HPA to apply (which pod
    goes is then Kubernetes' choice; its preStop drain and the gateway's migration keep the
    streams whole). Stands in for the `Supervisor` in `FleetController`."""

    def __init__(self, gateway: Gateway, discovery: KubernetesDiscovery) -> None:
        self.failed: dict = {}  # Kubernetes restarts crash-looping pods (CrashLoopBackOff)
        self.gateway = gateway
        self.discovery = discovery
        self.target: int | None = None

    @property
    def serving(self) -> list[str]:
        return [rid for rid, (_, state) in self.discovery.discovered.items() if state != "draining"]

    def replica_ids(self) -> list[str]:
        return list(self.discovery.discovered)

    def set_target(self, n: int, remove: Iterable[str] = (), *, reason: str = "manual") -> None:
        self.gateway.metrics.desired_replicas.set(n)
        current = len(self.serving)
        if n != self.target and n != current:
            direction = "up" if n > current else "down"
            self.gateway.metrics.scale_events.labels(direction, reason).inc()
            logger.info("fleet: %d -> %d replicas wanted (%s)", current, n, reason)
        self.target = n

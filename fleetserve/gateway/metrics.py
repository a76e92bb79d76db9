"""The gateway's Prometheus metrics, in a registry of its own (no global state).

Per-replica gauges are read from the live replica table at scrape time (a custom
collector), so they never go stale between requests.

Scaling: `fleetserve:gateway_desired_replicas` is the number of replicas the fleet's
supervisor was last asked to keep (loading + ready; draining ones excluded). It is the
signal for an external scaler: a Kubernetes HPA (through prometheus-adapter, as an
external metric with `target: {type: AverageValue, averageValue: "1"}`, so that it wants
metric / 1 pods; a `Value` target would multiply the current size by metric / target) or a
KEDA `prometheus` trigger (`metricType: AverageValue`, `threshold: "1"`) reads it and
sets the Deployment's replicas to it. `fleetserve:gateway_replicas{state}` counts the
replicas by state (always loading, ready, draining and failed; down and not_ready when
some are), `..._scale_events_total{direction,reason}` one per change of the target, and
`..._cold_start_seconds` the time from a replica's start to its first passing probe."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fleetserve.gateway.circuit_breaker import BreakerState
from fleetserve.gateway.replica import Replica

P = "fleetserve:gateway_"
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320,
)  # fmt: skip
COLD_START_BUCKETS = (1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900)
# Always exported, at 0 when no replica is in them (dashboards and alerts need the series).
REPLICA_STATES = ("loading", "ready", "draining", "failed")
BREAKER_CODE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class _ReplicaCollector(Collector):
    def __init__(
        self,
        replicas: Callable[[], Iterable[Replica]],
        now: Callable[[], float],
        queue_len: Callable[[], int],
    ) -> None:
        self._replicas = replicas
        self._now = now
        self._queue_len = queue_len

    def collect(self):
        now = self._now()
        gauges = {
            "outstanding": "requests in flight from this gateway",
            "healthy": "1 if ready, not down and the circuit is not open",
            "ready": "1 if the last active probe (a one-token generation) passed",
            "draining": "1 if the replica gets no new work",
            "failed": "1 if its supervisor gave up restarting it (crash loop)",
            "breaker_state": "circuit breaker: 0 closed, 1 half-open, 2 open",
            "running": "requests running on the replica (its /metrics)",
            "waiting": "requests waiting on the replica (its /metrics)",
            "kv_cache_usage": "KV-cache usage of the replica, 0..1 (its /metrics)",
            "cached_blocks": "prefix-cache blocks mirrored from the replica's KV events",
        }
        families = {
            k: GaugeMetricFamily(f"{P}replica_{k}", doc, labels=["replica"])
            for k, doc in gauges.items()
        }
        replicas = list(self._replicas())
        for r in replicas:
            values = {
                "outstanding": r.outstanding,
                "healthy": int(r.healthy(now)),
                "ready": int(r.ready),
                "draining": int(r.draining),
                "failed": int(r.failed is not None),
                "breaker_state": BREAKER_CODE[r.breaker.state(now)],
                "running": r.load.running,
                "waiting": r.load.waiting,
                "kv_cache_usage": r.load.kv_cache_usage,
                "cached_blocks": len(r.prefix),
            }
            for k, v in values.items():
                families[k].add_metric([r.id], v)
        yield from families.values()
        by_state = dict.fromkeys(REPLICA_STATES, 0)
        for r in replicas:
            by_state[r.state] = by_state.get(r.state, 0) + 1
        states = GaugeMetricFamily(f"{P}replicas", "replicas by state", labels=["state"])
        for state, count in by_state.items():
            states.add_metric([state], count)
        yield states
        queue = GaugeMetricFamily(f"{P}queue_length", "requests waiting for a replica slot")
        queue.add_metric([], self._queue_len())
        yield queue


class _PeerCollector(Collector):
    """Each peer region's measured round trip, health and predicted wait, at scrape time."""

    def __init__(self, peers: Callable[[], Iterable]) -> None:
        self._peers = peers

    def collect(self):
        rtt = GaugeMetricFamily(
            f"{P}peer_rtt_seconds", "round trip to a peer region's gateway (moving average)",
            labels=["region"],
        )  # fmt: skip
        healthy = GaugeMetricFamily(
            f"{P}peer_healthy", "1 while a peer region answers its polls", labels=["region"]
        )
        wait = GaugeMetricFamily(
            f"{P}peer_predicted_wait_seconds",
            "a peer region's predicted wait for a new request (its report, plus what was sent "
            "since)",
            labels=["region"],
        )
        for peer in self._peers():
            if peer.rtt_s is not None:
                rtt.add_metric([peer.name], peer.rtt_s)
            healthy.add_metric([peer.name], int(peer.healthy))
            predicted = peer.predicted_wait()
            if math.isfinite(predicted):
                wait.add_metric([peer.name], predicted)
        yield from (rtt, healthy, wait)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{P}requests",
            "requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.routed = Counter(
            f"{P}routing_decisions",
            "requests sent to a replica, by policy and replica",
            ["policy", "replica"],
            registry=r,
        )
        self.retries = Counter(
            f"{P}retries",
            "requests re-sent to another replica before their first byte",
            ["reason"],
            registry=r,
        )
        self.migrations = Counter(
            f"{P}migrations",
            "streams continued on another replica after their first byte",
            ["reason"],
            registry=r,
        )
        self.migration_failures = Counter(
            f"{P}migration_failures", "streams that could not be continued", registry=r
        )
        self.retries_denied = Counter(
            f"{P}retries_denied",
            "retries not made because the retry budget was spent",
            registry=r,
        )
        self.shed = Counter(
            f"{P}shed_requests",
            "requests refused with 429 (or displaced from the queue)",
            ["reason"],
            registry=r,
        )
        self.disconnects = Counter(
            f"{P}client_disconnects", "clients that left before their response ended", registry=r
        )
        self.ttft = Histogram(
            f"{P}time_to_first_token_seconds",
            "arrival at the gateway to the first token sent",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{P}e2e_request_latency_seconds",
            "arrival at the gateway to the response's end",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            f"{P}queue_wait_seconds",
            "time spent waiting for a replica slot",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        # Many regions: requests sent to (out) or received from (in) another region's
        # gateway, by that region and why (spill, failover); every regional decision by its
        # reason; and spills that the peer failed before the first byte (served here).
        self.region_requests = Counter(
            f"{P}region_requests",
            "requests sent to (out) or received from (in) another region, by region and reason",
            ["region", "direction", "reason"],
            registry=r,
        )
        self.region_decisions = Counter(
            f"{P}region_decisions",
            "regional routing decisions: local, spill, failover, pinned, capped, unavailable",
            ["reason"],
            registry=r,
        )
        self.region_fallbacks = Counter(
            f"{P}region_fallbacks",
            "requests a peer region failed before their first byte, then served here",
            ["region"],
            registry=r,
        )

        self.desired_replicas = Gauge(
            f"{P}desired_replicas",
            "replicas the fleet is asked to keep (loading + ready); for an HPA or KEDA",
            registry=r,
        )
        self.scale_events = Counter(
            f"{P}scale_events",
            "changes of the fleet's target, by direction (up, down) and reason",
            ["direction", "reason"],
            registry=r,
        )
        self.cold_start = Histogram(
            f"{P}cold_start_seconds",
            "a replica's start to its first passing probe",
            buckets=COLD_START_BUCKETS,
            registry=r,
        )

    def watch_peers(self, peers: Callable[[], Iterable]) -> None:
        self.registry.register(_PeerCollector(peers))

    def watch_replicas(
        self,
        replicas: Callable[[], Iterable[Replica]],
        now: Callable[[], float],
        queue_len: Callable[[], int],
    ) -> None:
        self.registry.register(_ReplicaCollector(replicas, now, queue_len))

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""The gateway's Prometheus metrics, in a registry of its own (no global state).

Per-replica gauges are read from the live replica table at scrape time (a custom
collector), so they never go stale between requests."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fleetserve.gateway.circuit_breaker import BreakerState
from fleetserve.gateway.replica import Replica

P = "fleetserve:gateway_"
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320,
)  # fmt: skip
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
        for r in self._replicas():
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
        queue = GaugeMetricFamily(f"{P}queue_length", "requests waiting for a replica slot")
        queue.add_metric([], self._queue_len())
        yield queue


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

    def watch_replicas(
        self,
        replicas: Callable[[], Iterable[Replica]],
        now: Callable[[], float],
        queue_len: Callable[[], int],
    ) -> None:
        self.registry.register(_ReplicaCollector(replicas, now, queue_len))

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics under the `fleetserve:` prefix (vLLM's names, with our prefix).

Engine gauges and counters are read from the core's latest stats at scrape time; request
histograms are observed here as requests finish. Every name is documented in README.md.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetserve.engine.async_engine import AsyncEngine, RequestMetrics

PREFIX = "fleetserve:"
LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip


class ServerMetrics:
    """One registry per server (no global state): `render()` is the /metrics body."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)

        self.ttft = histogram(
            "time_to_first_token_seconds",
            "Time to first token (arrival to first token).",
            LATENCY_BUCKETS,
        )
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Time per output token after the first (per request mean).",
            TPOT_BUCKETS,
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "End-to-end request latency.", LATENCY_BUCKETS
        )
        self.queue = histogram(
            "request_queue_time_seconds",
            "Time a request waited in the engine's queue before its first schedule.",
            LATENCY_BUCKETS,
        )
        self.success = Counter(
            PREFIX + "request_success",
            "Requests finished, by finish reason.",
            labels + ["finished_reason"],
            registry=self.registry,
        )
        self.registry.register(EngineCollector(engine, model_name))
        engine.request_observers.append(self.observe)

    def observe(self, m: RequestMetrics) -> None:
        name = self.model_name
        self.e2e.labels(name).observe(m.finish_time - m.arrival_time)
        if m.first_token_time is not None:
            self.ttft.labels(name).observe(m.first_token_time - m.arrival_time)
            if m.num_generation_tokens > 1:
                decode = m.finish_time - m.first_token_time
                self.tpot.labels(name).observe(decode / (m.num_generation_tokens - 1))
        if m.queue_time is not None:
            self.queue.labels(name).observe(m.queue_time)
        self.success.labels(name, m.finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """Gauges and counters from the engine core's stats, read at scrape time."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        name = [self.model_name]

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            g.add_metric(name, value)
            return g

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            c.add_metric(name, value)
            return c

        queries, hits = s.get("prefix_cache_queries", 0), s.get("prefix_cache_hits", 0)
        yield gauge(
            "num_requests_running",
            "Requests in the engine's running batch.",
            s.get("num_running", 0),
        )
        yield gauge(
            "num_requests_waiting",
            "Requests waiting in the engine's queue.",
            s.get("num_waiting", 0),
        )
        yield gauge(
            "kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use (0 to 1).",
            s.get("kv_cache_usage", 0.0),
        )
        yield gauge(
            "prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache / prompt tokens looked up.",
            hits / queries if queries else 0.0,
        )
        yield counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queries
        )
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", hits)
        yield counter(
            "num_preemptions",
            "Requests preempted for lack of KV blocks.",
            s.get("num_preemptions", 0),
        )
        yield counter(
            "prompt_tokens",
            "Prompt tokens prefilled (prefix-cache hits excluded).",
            s.get("prompt_tokens_total", 0),
        )
        yield counter("generation_tokens", "Tokens generated.", s.get("generation_tokens_total", 0))
        yield gauge(
            "num_requests_in_flight",
            "Requests this server is answering (API server side).",
            self.engine.num_in_flight,
        )
        yield gauge(
            "engine_healthy",
            "1 while the engine core answers, else 0.",
            1.0 if self.engine.check_health() else 0.0,
        )

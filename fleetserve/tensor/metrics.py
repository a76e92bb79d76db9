"""Prometheus metrics of a tensor-model replica, under the LLM replica's `fleetserve:` prefix
and names where they mean the same (queue time, end-to-end latency, requests running and
waiting, which the gateway scrapes for load), plus the batcher's own: rows per batch and the
model's time per batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetserve.server.metrics import LATENCY_BUCKETS, PREFIX

FAST_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256, 512, 1024)


class TensorMetrics:
    """One registry per server; `gauges()` gives (running, waiting) at scrape time."""

    def __init__(self, model_name: str, gauges: Callable[[], tuple[int, int]]) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)

        self.queue = histogram(
            "request_queue_time_seconds",
            "Time a request waited in the batcher's queue before its batch started.",
            FAST_BUCKETS,
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds",
            "Request latency from arrival to answer (queue, batch, postprocess).",
            LATENCY_BUCKETS,
        )
        self.batch_size = histogram(
            "batch_size", "Rows (inputs along the batch dimension) per model call.", BATCH_BUCKETS
        )
        self.inference = histogram(
            "inference_time_seconds", "Time of one model call over a batch.", FAST_BUCKETS
        )
        self.finished = Counter(
            PREFIX + "request_success",
            "Requests finished, by outcome: ok, bad_input, queue_full, timeout, cancelled, error.",
            labels + ["finished_reason"],
            registry=self.registry,
        )
        self.registry.register(_Gauges(model_name, gauges))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Gauges(Collector):
    def __init__(self, model_name: str, read: Callable[[], tuple[int, int]]) -> None:
        self.model_name = model_name
        self.read = read

    def collect(self) -> Iterator[Metric]:
        running, waiting = self.read()
        for name, doc, value in (
            ("num_requests_running", "Requests in a batch on the model now.", running),
            ("num_requests_waiting", "Requests waiting in the batcher's queue.", waiting),
        ):
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric([self.model_name], value)
            yield g

"""benchmarks/autoscale.py's arithmetic on plain data: the seeded trace, replica-seconds,
reversals of the desired size, and what it reads from the gateway's /metrics."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "autoscale.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("autoscale_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_trace_is_seeded_and_follows_its_phases(bench):
    phases = [bench.Phase("idle", 100, 1.0), bench.Phase("burst", 100, 10.0)]
    trace = bench.poisson_arrivals(phases, seed=3)
    assert trace == bench.poisson_arrivals(phases, seed=3)
    assert trace != bench.poisson_arrivals(phases, seed=4)
    idle = [t for t, p in trace if p == "idle"]
    burst = [t for t, p in trace if p == "burst"]
    assert all(0 <= t < 100 for t in idle) and all(100 <= t < 200 for t in burst)
    assert 60 < len(idle) < 140 and 800 < len(burst) < 1200  # ~100 and ~1000
    assert [t for t, _ in trace] == sorted(t for t, _ in trace)


def test_replica_seconds_hold_each_sample_until_the_next(bench):
    samples = [
        bench.Sample(0.0, ready=1),
        bench.Sample(10.0, ready=1, loading=2),
        bench.Sample(12.0, ready=3),
        bench.Sample(20.0, ready=2, draining=1),
        bench.Sample(25.0, ready=1),
    ]
    # 10 x 1 + 2 x 3 + 8 x 3 + 5 x 3 + 5 x 1 (the last sample held until the end)
    assert bench.replica_seconds(samples, end=30.0) == pytest.approx(60.0)
    assert bench.replica_seconds(samples, end=11.0) == pytest.approx(13.0)


def test_reversals_count_changes_of_direction_of_the_desired_size(bench):
    def run(*desired):
        return [bench.Sample(float(i), desired=d) for i, d in enumerate(desired)]

    assert bench.reversals(run(1, 1, 2, 4, 4, 3, 2, 1)) == 1  # up, then down: no flapping
    assert bench.reversals(run(1, 2, 1, 2, 1)) == 3
    assert bench.reversals(run(1, 1, 1)) == 0


def test_metrics_give_replicas_by_state_queue_and_scale_events(bench):
    text = "\n".join(
        [
            'fleetserve:gateway_replicas{state="loading"} 1.0',
            'fleetserve:gateway_replicas{state="ready"} 2.0',
            'fleetserve:gateway_replicas{state="draining"} 1.0',
            'fleetserve:gateway_replicas{state="failed"} 5.0',
            "fleetserve:gateway_queue_length 7.0",
            "fleetserve:gateway_desired_replicas 3.0",
            'fleetserve:gateway_scale_events_total{direction="up",reason="start"} 1.0',
            'fleetserve:gateway_scale_events_total{direction="up",reason="panic"} 2.0',
        ]
    )
    sample = bench.parse_metrics(text + "\n", t=1.5)
    assert (sample.loading, sample.ready, sample.draining, sample.holding) == (1, 2, 1, 4)
    assert (sample.queue, sample.desired, sample.scale_events) == (7, 3, 3)

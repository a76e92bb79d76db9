"""Pure parts of fleetserve bench: schedule, lengths, workloads, percentiles, metrics."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fleetserve.bench.arrivals import arrival_times
from fleetserve.bench.config import SLO, LengthSpec, LoadConfig, TargetConfig, WorkloadConfig
from fleetserve.bench.lengths import sample_lengths
from fleetserve.bench.metrics import meets_slo, summarize_run
from fleetserve.bench.payload import build_body, build_input
from fleetserve.bench.result import RequestResult
from fleetserve.bench.stats import percentile, summarize
from fleetserve.bench.timeseries import timeseries
from fleetserve.bench.tokenizer import WordTokenizer
from fleetserve.bench.workload import generate_sessions


def _gaps(times: list[float]) -> np.ndarray:
    return np.diff(np.asarray(times))


# --- arrival schedule ---------------------------------------------------------------------


def test_poisson_schedule_has_the_asked_rate_and_exponential_gaps() -> None:
    times = arrival_times(20.0, 1.0, np.random.default_rng(7), count=20_000)
    assert len(times) == 20_000
    assert times[0] == 0.0
    assert all(b > a for a, b in itertools.pairwise(times))
    rate = (len(times) - 1) / times[-1]
    assert rate == pytest.approx(20.0, rel=0.03)
    gaps = _gaps(times)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV = 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_burstiness_keeps_the_rate_and_sets_the_spread(burstiness: float) -> None:
    times = arrival_times(5.0, burstiness, np.random.default_rng(3), count=20_000)
    gaps = _gaps(times)
    assert 1 / gaps.mean() == pytest.approx(5.0, rel=0.05)
    # gamma(shape k): coefficient of variation 1/sqrt(k)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_infinite_burstiness_is_a_constant_rate() -> None:
    times = arrival_times(4.0, math.inf, np.random.default_rng(0), count=9)
    assert times == [i * 0.25 for i in range(9)]
    assert arrival_times(4.0, math.inf, np.random.default_rng(0), duration_s=1.0) == [
        0.0,
        0.25,
        0.5,
        0.75,
    ]


def test_schedule_is_seeded() -> None:
    a = arrival_times(3.0, 1.0, np.random.default_rng(1), count=50)
    b = arrival_times(3.0, 1.0, np.random.default_rng(1), count=50)
    c = arrival_times(3.0, 1.0, np.random.default_rng(2), count=50)
    assert a == b
    assert a != c


def test_schedule_bounded_by_duration() -> None:
    times = arrival_times(100.0, 1.0, np.random.default_rng(5), duration_s=20.0)
    assert max(times) < 20.0
    # Poisson count with mean 2000: within 5 standard deviations (~224)
    assert abs(len(times) - 2000) < 224
    capped = arrival_times(100.0, 1.0, np.random.default_rng(5), count=10, duration_s=20.0)
    assert capped == times[:10]


def test_infinite_rate_sends_everything_at_once() -> None:
    assert arrival_times(math.inf, 1.0, np.random.default_rng(0), count=3) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="count"):
        arrival_times(math.inf, 1.0, np.random.default_rng(0), duration_s=1.0)


# --- percentiles --------------------------------------------------------------------------


def test_percentile_on_known_data() -> None:
    data = [float(x) for x in range(1, 101)]
    assert percentile(data, 50) == pytest.approx(50.5)
    assert percentile(data, 90) == pytest.approx(90.1)
    assert percentile(data, 99) == pytest.approx(99.01)
    assert percentile(data, 0) == 1.0
    assert percentile(data, 100) == 100.0
    assert percentile([4.0], 99) == 4.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_percentile_matches_numpy_linear() -> None:
    values = sorted(np.random.default_rng(0).lognormal(0, 1, 999).tolist())
    for q in (1, 25, 50, 90, 99, 99.9):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12)


def test_summarize() -> None:
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert s == pytest.approx(
        {"count": 4, "mean": 2.5, "p50": 2.5, "p90": 3.7, "p99": 3.97, "max": 4.0}
    )
    empty = summarize([])
    assert empty["count"] == 0 and empty["p99"] is None and empty["mean"] is None


# --- lengths and workloads ----------------------------------------------------------------


def test_lengths_fixed_uniform_normal_lognormal() -> None:
    rng = np.random.default_rng(0)
    assert sample_lengths(LengthSpec(32), rng, 5) == [32] * 5
    uniform = sample_lengths(LengthSpec(100, range_ratio=0.5), rng, 2000)
    assert min(uniform) >= 50 and max(uniform) <= 150 and max(uniform) - min(uniform) > 80
    normal = sample_lengths(LengthSpec(10, std=20.0), rng, 2000)
    assert min(normal) == 1  # clipped at the minimum
    lognormal = sample_lengths(LengthSpec(100, lognormal_sigma=1.0), rng, 40_000)
    assert np.mean(lognormal) == pytest.approx(100, rel=0.05)
    assert np.median(lognormal) < 70  # long tail: median well below the mean
    clipped = sample_lengths(LengthSpec(100, lognormal_sigma=1.0, max=300), rng, 2000)
    assert max(clipped) == 300


def test_length_spec_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="at most one"):
        LengthSpec(10, std=1.0, range_ratio=0.1)
    with pytest.raises(ValueError, match="mean"):
        LengthSpec(0)
    with pytest.raises(ValueError, match="range_ratio"):
        LengthSpec(10, range_ratio=1.0)


def test_load_config_validation() -> None:
    with pytest.raises(ValueError, match="duration"):
        LoadConfig(num_sessions=None, duration_s=None)
    with pytest.raises(ValueError, match="rate or a concurrency"):
        LoadConfig(num_sessions=None, duration_s=5.0)
    with pytest.raises(ValueError, match="burstiness"):
        LoadConfig(burstiness=0)


def _workload(kind: str, **kw) -> WorkloadConfig:
    return WorkloadConfig(kind, LengthSpec(12, range_ratio=0.5), LengthSpec(5), **kw)


def test_random_workload_is_seeded_and_sized() -> None:
    source = WordTokenizer()
    first = [s for _, s in zip(range(20), generate_sessions(_workload("random"), source, 3))]
    again = [s for _, s in zip(range(20), generate_sessions(_workload("random"), source, 3))]
    other = [s for _, s in zip(range(20), generate_sessions(_workload("random"), source, 4))]
    assert first == again
    assert first != other
    for session in first:
        (turn,) = session.turns
        assert len(turn.text.split()) == turn.input_len
        assert 6 <= turn.input_len <= 18 and turn.output_len == 5
        assert session.system == "" and session.group is None


def test_shared_prefix_groups() -> None:
    config = _workload("shared-prefix", num_groups=3, prefix_len=40)
    sessions = [s for _, s in zip(range(9), generate_sessions(config, WordTokenizer(), 0))]
    assert [s.group for s in sessions] == [0, 1, 2] * 3
    prefixes = {s.group: s.system for s in sessions[:3]}
    assert len(set(prefixes.values())) == 3
    for s in sessions:
        assert s.system == prefixes[s.group]
        assert len(s.system.split()) == 40
    assert len({s.turns[0].text for s in sessions}) == 9  # questions differ


def test_multi_turn_sessions() -> None:
    config = _workload("multi-turn", turns=4)
    session = next(generate_sessions(config, WordTokenizer(), 0))
    assert len(session.turns) == 4
    assert len({t.text for t in session.turns}) == 4


# --- payloads -----------------------------------------------------------------------------


def test_chat_and_completion_inputs_carry_history() -> None:
    history = [("q1", "a1"), ("q2", "a2")]
    messages = build_input("chat", "sys", history, "q3")
    assert [m["role"] for m in messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert [m["content"] for m in messages] == ["sys", "q1", "a1", "q2", "a2", "q3"]
    assert build_input("completions", "", history, "q3") == "q1 a1 q2 a2 q3"
    assert build_input("chat", "", [], "hi") == [{"role": "user", "content": "hi"}]


def test_body_fields() -> None:
    target = TargetConfig(
        "http://x:1/v1/", "m", "completions", ignore_eos=True, extra_body={"top_k": 1}
    )
    assert target.base_url == "http://x:1"
    body = build_body(target, "hello", 7)
    assert body == {
        "model": "m",
        "prompt": "hello",
        "max_tokens": 7,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "top_k": 1,
    }
    plain = build_body(TargetConfig("http://x:1", "m"), [], 3)
    assert "ignore_eos" not in plain and plain["messages"] == []


# --- metrics ------------------------------------------------------------------------------


def _result(
    i: int,
    start: float,
    chunks: list[float],
    end: float,
    tokens: int | None,
    error: str | None = None,
) -> RequestResult:
    r = RequestResult(index=i, session=i, turn=0, input_len=10, output_len=4, scheduled_s=start)
    r.start_s, r.end_s, r.chunk_times_s = start, end, chunks
    r.prompt_tokens, r.completion_tokens, r.error = 10, tokens, error
    return r


def test_request_latencies() -> None:
    r = _result(0, 1.0, [1.5, 1.6, 1.8, 2.0], 2.0, 4)
    assert r.ttft_s == pytest.approx(0.5)
    assert r.e2e_s == pytest.approx(1.0)
    assert r.tpot_s == pytest.approx(0.5 / 3)
    assert r.itl_s == pytest.approx([0.1, 0.2, 0.2])


def test_summary_throughput_goodput_errors() -> None:
    results = [
        _result(0, 0.0, [0.1, 0.2, 0.3, 0.4], 0.4, 4),  # ttft 100 ms, tpot 100 ms
        _result(1, 0.0, [0.5, 0.6, 0.7, 0.8], 0.8, 4),  # ttft 500 ms
        _result(2, 1.0, [1.1, 1.9, 2.7, 3.5], 3.5, 4),  # tpot 800 ms
        _result(3, 1.0, [], 1.2, None, error="http_503"),
        _result(4, 1.0, [], 1.3, None, error="timeout"),
        _result(5, 1.0, [], 1.3, None, error="http_503"),
    ]
    slo = SLO(ttft_ms=200, tpot_ms=200)
    assert [meets_slo(r, slo) for r in results] == [True, False, False, False, False, False]
    s = summarize_run(results, slo, duration_s=4.0)
    assert s["requests"] == {"sent": 6, "completed": 3, "failed": 3}
    assert s["errors"] == {"http_503": 2, "timeout": 1}
    assert s["request_throughput"] == pytest.approx(0.75)
    assert s["goodput"] == pytest.approx(0.25)
    assert s["slo_attainment"] == pytest.approx(1 / 6)
    assert s["output_tokens_per_s"] == pytest.approx(3.0)
    assert s["input_tokens_per_s"] == pytest.approx(7.5)
    assert s["ttft_ms"]["max"] == pytest.approx(500)
    assert s["ttft_ms"]["count"] == 3
    assert s["tpot_ms"]["p50"] == pytest.approx(100)
    assert s["itl_ms"]["count"] == 9
    assert s["usage"]["requests_without_usage"] == 0
    no_slo = summarize_run(results, SLO(), duration_s=4.0)
    assert no_slo["goodput"] == pytest.approx(no_slo["request_throughput"])


def test_usage_mismatches_counted() -> None:
    a = _result(0, 0.0, [0.1, 0.2], 0.2, 2)
    b = _result(1, 0.0, [0.1, 0.2], 0.2, 2)
    a.expected_prompt_tokens, a.expected_completion_tokens = 10, 2
    b.expected_prompt_tokens, b.expected_completion_tokens = 11, 3
    usage = summarize_run([a, b], SLO(), 1.0)["usage"]
    assert usage["prompt_token_mismatches"] == 1
    assert usage["completion_token_mismatches"] == 1
    unchecked = summarize_run([_result(2, 0.0, [0.1], 0.1, 1)], SLO(), 1.0)["usage"]
    assert unchecked["prompt_token_mismatches"] is None


def test_timeseries_conserves_tokens_and_busy_time() -> None:
    results = [
        _result(0, 0.0, [0.25, 0.5, 0.75, 1.0], 1.0, 8),
        _result(1, 0.5, [1.5, 2.0], 2.0, 2),
    ]
    ts = timeseries(results, duration_s=2.0, bucket_s=0.5)
    assert ts["t_s"] == [0.0, 0.5, 1.0, 1.5]
    width = ts["bucket_s"]
    assert sum(ts["output_tokens_per_s"]) * width == pytest.approx(10)
    assert sum(ts["running_requests"]) * width == pytest.approx(1.0 + 1.5)
    assert ts["running_requests"] == pytest.approx([1.0, 2.0, 1.0, 1.0])

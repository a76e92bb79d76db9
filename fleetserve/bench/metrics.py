"""Aggregating per-request results into the report's summary. Pure: no clock, no I/O.

Definitions (all from client-side timestamps; latencies in ms, rates per second of
`duration_s`, the time from the benchmark start until the last request ended):

- TTFT: first text-bearing chunk - request sent.
- TPOT: (e2e - TTFT) / (output_tokens - 1), for requests with at least 2 output tokens.
- ITL: gaps between consecutive text-bearing chunks, pooled over all requests.
- e2e: stream ended - request sent.
- goodput: completed requests that met every SLO, per second. Without SLOs it equals the
  request throughput. A request with one output token has no TPOT and meets any TPOT SLO.
- Token throughputs count completed requests only, with the server's usage when it sends one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from fleetserve.bench.config import SLO
from fleetserve.bench.result import RequestResult
from fleetserve.bench.stats import summarize
from fleetserve.bench.tokencheck import count_mismatches

_MS = 1000.0


def meets_slo(result: RequestResult, slo: SLO) -> bool:
    """Whether a request completed within every objective of `slo`."""
    if not result.ok:
        return False
    ttft, tpot = result.ttft_s, result.tpot_s
    if slo.ttft_ms is not None and (ttft is None or ttft * _MS > slo.ttft_ms):
        return False
    return slo.tpot_ms is None or tpot is None or tpot * _MS <= slo.tpot_ms


def _rate(amount: float, duration_s: float) -> float:
    return amount / duration_s if duration_s > 0 else 0.0


def summarize_run(results: Sequence[RequestResult], slo: SLO, duration_s: float) -> dict[str, Any]:
    """The `summary` object of the report (see SCHEMA.md)."""
    done = [r for r in results if r.ok]
    good = sum(meets_slo(r, slo) for r in done)
    input_tokens = sum(r.input_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    mismatches = count_mismatches(results)
    return {
        "duration_s": duration_s,
        "requests": {
            "sent": len(results),
            "completed": len(done),
            "failed": len(results) - len(done),
        },
        "request_throughput": _rate(len(done), duration_s),
        "input_tokens_per_s": _rate(input_tokens, duration_s),
        "output_tokens_per_s": _rate(output_tokens, duration_s),
        "total_tokens_per_s": _rate(input_tokens + output_tokens, duration_s),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "goodput": _rate(good, duration_s),
        "slo_attainment": good / len(results) if results else None,
        "ttft_ms": summarize(r.ttft_s * _MS for r in done if r.ttft_s is not None),
        "tpot_ms": summarize(r.tpot_s * _MS for r in done if r.tpot_s is not None),
        "itl_ms": summarize(gap * _MS for r in done for gap in r.itl_s),
        "e2e_ms": summarize(r.e2e_s * _MS for r in done),
        "dispatch_lag_ms": summarize((r.start_s - r.scheduled_s) * _MS for r in results),
        "errors": dict(sorted(Counter(r.error for r in results if r.error).items())),
        "usage": {
            "requests_without_usage": sum(r.completion_tokens is None for r in done),
            "prompt_token_mismatches": mismatches["prompt"],
            "completion_token_mismatches": mismatches["completion"],
        },
    }


def request_record(result: RequestResult, slo: SLO) -> dict[str, Any]:
    """One entry of the report's `requests` list."""
    ttft, tpot = result.ttft_s, result.tpot_s
    return {
        "index": result.index,
        "session": result.session,
        "turn": result.turn,
        "group": result.group,
        "scheduled_s": result.scheduled_s,
        "start_s": result.start_s,
        "end_s": result.end_s,
        "ttft_ms": ttft * _MS if ttft is not None else None,
        "tpot_ms": tpot * _MS if tpot is not None else None,
        "e2e_ms": result.e2e_s * _MS,
        "input_len": result.input_len,
        "output_len": result.output_len,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "expected_prompt_tokens": result.expected_prompt_tokens,
        "expected_completion_tokens": result.expected_completion_tokens,
        "num_chunks": len(result.chunk_times_s),
        "met_slo": meets_slo(result, slo),
        "error": result.error,
        "error_detail": result.error_detail,
    }

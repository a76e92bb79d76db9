"""The bench report: JSON schema, Markdown, plots and `fleetserve bench compare`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fleetserve.bench.compare import compare_table, load_report
from fleetserve.bench.config import SLO, LengthSpec, LoadConfig, TargetConfig, WorkloadConfig
from fleetserve.bench.plots import write_plots
from fleetserve.bench.report import (
    SCHEMA_VERSION,
    build_report,
    config_record,
    markdown_summary,
    write_report,
)
from fleetserve.bench.result import RequestResult
from fleetserve.cli import main

# The documented schema (fleetserve/bench/SCHEMA.md); changing it means a new schema_version.
TOP_KEYS = {
    "schema_version",
    "tool",
    "label",
    "created_at",
    "config",
    "summary",
    "timeseries",
    "requests",
}
SUMMARY_KEYS = {
    "duration_s",
    "requests",
    "request_throughput",
    "input_tokens_per_s",
    "output_tokens_per_s",
    "total_tokens_per_s",
    "total_input_tokens",
    "total_output_tokens",
    "goodput",
    "slo_attainment",
    "ttft_ms",
    "tpot_ms",
    "itl_ms",
    "e2e_ms",
    "dispatch_lag_ms",
    "errors",
    "usage",
}
DIST_KEYS = {"count", "mean", "p50", "p90", "p99", "max"}
CONFIG_KEYS = {
    "url",
    "model",
    "endpoint",
    "temperature",
    "ignore_eos",
    "extra_body",
    "request_timeout_s",
    "workload",
    "load",
    "slo",
    "tokenizer",
    "token_counting",
}
REQUEST_KEYS = {
    "index",
    "session",
    "turn",
    "group",
    "scheduled_s",
    "start_s",
    "end_s",
    "ttft_ms",
    "tpot_ms",
    "e2e_ms",
    "input_len",
    "output_len",
    "prompt_tokens",
    "completion_tokens",
    "expected_prompt_tokens",
    "expected_completion_tokens",
    "num_chunks",
    "met_slo",
    "error",
    "error_detail",
}


def _results(speed: float) -> list[RequestResult]:
    """Ten requests of 8 tokens; `speed` divides every time, so speed 2 is twice as fast."""
    out = []
    for i in range(10):
        start = i * 0.1 / speed
        r = RequestResult(index=i, session=i, turn=0, input_len=16, output_len=8, scheduled_s=start)
        r.start_s = start
        r.chunk_times_s = [start + (0.2 + 0.05 * k) / speed for k in range(8)]
        r.end_s = r.chunk_times_s[-1]
        r.prompt_tokens, r.completion_tokens = 16, 8
        out.append(r)
    out[-1].error, out[-1].chunk_times_s = "http_503", []
    return out


def _report(label: str, speed: float) -> dict:
    config = config_record(
        TargetConfig("http://h:1", "m", api_key="secret-key"),
        WorkloadConfig("random", LengthSpec(16), LengthSpec(8)),
        LoadConfig(num_sessions=10, rate=math.inf, concurrency=4),
        SLO(ttft_ms=300.0),
        tokenizer=None,
    )
    results = _results(speed)
    return build_report(label, config, results, SLO(ttft_ms=300.0), max(r.end_s for r in results))


def test_report_follows_the_schema(tmp_path: Path) -> None:
    report = _report("base", 1.0)
    files = write_report(report, tmp_path)
    assert [f.name for f in files] == ["bench.json", "summary.md"]
    text = (tmp_path / "bench.json").read_text()
    assert "secret-key" not in text
    stored = json.loads(text)  # strict JSON: an infinite rate is stored as null
    assert set(stored) == TOP_KEYS
    assert stored["schema_version"] == SCHEMA_VERSION == 1
    assert set(stored["summary"]) == SUMMARY_KEYS
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "dispatch_lag_ms"):
        assert set(stored["summary"][key]) == DIST_KEYS
    assert set(stored["summary"]["requests"]) == {"sent", "completed", "failed"}
    assert set(stored["summary"]["usage"]) == {
        "requests_without_usage",
        "prompt_token_mismatches",
        "completion_token_mismatches",
    }
    assert set(stored["config"]) == CONFIG_KEYS
    assert stored["config"]["load"]["rate"] is None
    assert set(stored["timeseries"]) == {
        "bucket_s",
        "t_s",
        "output_tokens_per_s",
        "running_requests",
    }
    assert len(stored["requests"]) == 10
    assert all(set(r) == REQUEST_KEYS for r in stored["requests"])
    assert stored["summary"]["requests"] == {"sent": 10, "completed": 9, "failed": 1}
    assert stored["summary"]["errors"] == {"http_503": 1}
    assert stored["summary"]["total_output_tokens"] == 72
    md = (tmp_path / "summary.md").read_text()
    assert md == markdown_summary(stored)
    assert "| TTFT" in md and "http_503: 1" in md


def test_compare_two_stored_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for label, speed in (("slow", 1.0), ("fast", 2.0)):
        write_report(_report(label, speed), tmp_path / label)
    a, b = tmp_path / "slow" / "bench.json", tmp_path / "fast" / "bench.json"
    table = compare_table([load_report(a), load_report(b)], ["slow", "fast"])
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()}
    assert "2.00x" in rows["output tokens/s"]  # twice as fast: double throughput
    assert "0.50x" in rows["TTFT mean (ms)"]  # and half the latency
    assert "1.00x" in rows["completed requests"]

    assert main(["bench", "compare", str(a), str(b)]) == 0
    printed = capsys.readouterr().out
    assert "fast / slow" in printed and "2.00x" in printed


def test_compare_refuses_another_schema(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"schema_version": 0}))
    with pytest.raises(ValueError, match="schema_version"):
        load_report(path)
    with pytest.raises(SystemExit):  # the CLI turns it into a usage error
        main(["bench", "compare", str(path)])


def test_plots_are_written(tmp_path: Path) -> None:
    files = write_plots(_report("base", 1.0), tmp_path)
    names = sorted(f.name for f in files)
    assert names == ["e2e_cdf.png", "output_throughput.png", "running_requests.png", "ttft_cdf.png"]
    for f in files:
        data = f.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

"""The benchmark report: a JSON document (schema in SCHEMA.md), its Markdown summary, and
the table the CLI prints. Building is pure; `write_report` does the file I/O."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleetserve.bench.config import SLO, LoadConfig, TargetConfig, WorkloadConfig
from fleetserve.bench.metrics import request_record, summarize_run
from fleetserve.bench.result import RequestResult
from fleetserve.bench.tables import fmt, markdown_table
from fleetserve.bench.timeseries import timeseries

SCHEMA_VERSION = 1
LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))
STATS = ("mean", "p50", "p90", "p99", "max")


def _jsonable(value: Any) -> Any:
    """Dataclasses to dicts and infinities to None (strict JSON has no Infinity)."""
    if dataclasses.is_dataclass(value):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return None
    return value


def config_record(
    target: TargetConfig,
    workload: WorkloadConfig,
    load: LoadConfig,
    slo: SLO,
    tokenizer: str | None,
) -> dict[str, Any]:
    """The report's `config`. The API key is never written."""
    target_fields = _jsonable(target)
    target_fields.pop("api_key", None)
    return {
        **target_fields,
        "workload": _jsonable(workload),
        "load": _jsonable(load),
        "slo": _jsonable(slo),
        "tokenizer": tokenizer,
        "token_counting": "approx-words" if tokenizer is None else "tokenizer",
    }


def build_report(
    label: str,
    config: dict[str, Any],
    results: Sequence[RequestResult],
    slo: SLO,
    duration_s: float,
    created_at: datetime | None = None,
) -> dict[str, Any]:
    created = created_at or datetime.now(UTC)
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "fleetserve bench",
        "label": label,
        "created_at": created.isoformat(timespec="seconds"),
        "config": config,
        "summary": summarize_run(results, slo, duration_s),
        "timeseries": timeseries(results, duration_s),
        "requests": [request_record(r, slo) for r in results],
    }


def summary_table(report: dict[str, Any]) -> str:
    """Throughput and counts, then latency percentiles: the table the CLI prints."""
    s = report["summary"]
    req = s["requests"]
    usage = s["usage"]
    lag = s["dispatch_lag_ms"]
    errors = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "none"
    scalars = [
        (
            "requests sent / completed / failed",
            f"{req['sent']} / {req['completed']} / {req['failed']}",
        ),
        ("duration (s)", fmt(s["duration_s"])),
        ("request throughput (req/s)", fmt(s["request_throughput"], 3)),
        ("goodput (req/s)", fmt(s["goodput"], 3)),
        ("SLO attainment", fmt(s["slo_attainment"], 3)),
        ("input tokens/s", fmt(s["input_tokens_per_s"], 1)),
        ("output tokens/s", fmt(s["output_tokens_per_s"], 1)),
        ("total tokens/s", fmt(s["total_tokens_per_s"], 1)),
        (
            "input / output tokens",
            f"{fmt(s['total_input_tokens'])} / {fmt(s['total_output_tokens'])}",
        ),
        ("errors", errors),
        ("dispatch lag p99 / max (ms)", f"{fmt(lag['p99'])} / {fmt(lag['max'])}"),
        ("requests without usage", fmt(usage["requests_without_usage"])),
        (
            "usage mismatches (prompt / completion)",
            f"{fmt(usage['prompt_token_mismatches'])} / "
            f"{fmt(usage['completion_token_mismatches'])}",
        ),
    ]
    first = markdown_table(["metric", "value"], scalars)
    rows = [[name, *(fmt(s[key][stat]) for stat in STATS)] for key, name in LATENCIES]
    second = markdown_table(["latency (ms)", *STATS], rows)
    return f"{first}\n\n{second}"


def markdown_summary(report: dict[str, Any]) -> str:
    c = report["config"]
    load = c["load"]
    rate = "unlimited" if load["rate"] is None else f"{load['rate']} sessions/s"
    concurrency = load["concurrency"] or "unlimited"
    lines = [
        f"# fleetserve bench: {report['label']}",
        "",
        f"- target: `{c['url']}` model `{c['model']}`, endpoint `{c['endpoint']}`",
        f"- workload: `{c['workload']['kind']}`, token counting: {c['token_counting']}",
        f"- load: rate {rate}, burstiness {load['burstiness']}, concurrency {concurrency}"
        + (f", ramp-up {load['ramp_up_s']} s" if load.get("ramp_up_s") else ""),
        f"- seed {load['seed']}, warmup {load['warmup']} requests",
        f"- SLOs: TTFT {c['slo']['ttft_ms'] or '-'} ms, TPOT {c['slo']['tpot_ms'] or '-'} ms",
        f"- created {report['created_at']}, schema version {report['schema_version']}",
        "",
        summary_table(report),
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write `bench.json` and `summary.md` into `out_dir` (created if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "bench.json"
    json_path.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    md_path = out_dir / "summary.md"
    md_path.write_text(markdown_summary(report))
    return [json_path, md_path]

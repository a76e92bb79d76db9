"""`fleetserve bench compare A.json B.json ...`: one column per report, with each value's
ratio to the first report's."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleetserve.bench.report import SCHEMA_VERSION
from fleetserve.bench.tables import fmt, markdown_table

# (row name, path into the report's summary). Throughputs: higher is better; latencies: lower.
ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("completed requests", ("requests", "completed")),
    ("failed requests", ("requests", "failed")),
    ("duration (s)", ("duration_s",)),
    ("request throughput (req/s)", ("request_throughput",)),
    ("goodput (req/s)", ("goodput",)),
    ("input tokens/s", ("input_tokens_per_s",)),
    ("output tokens/s", ("output_tokens_per_s",)),
    ("total tokens/s", ("total_tokens_per_s",)),
    ("output tokens", ("total_output_tokens",)),
    ("TTFT mean (ms)", ("ttft_ms", "mean")),
    ("TTFT p50 (ms)", ("ttft_ms", "p50")),
    ("TTFT p99 (ms)", ("ttft_ms", "p99")),
    ("TPOT mean (ms)", ("tpot_ms", "mean")),
    ("TPOT p50 (ms)", ("tpot_ms", "p50")),
    ("TPOT p99 (ms)", ("tpot_ms", "p99")),
    ("ITL p50 (ms)", ("itl_ms", "p50")),
    ("ITL p99 (ms)", ("itl_ms", "p99")),
    ("E2E mean (ms)", ("e2e_ms", "mean")),
    ("E2E p99 (ms)", ("e2e_ms", "p99")),
)


def load_report(path: Path) -> dict[str, Any]:
    """A report from a JSON file, refusing files of another schema version."""
    report = json.loads(path.read_text())
    version = report.get("schema_version") if isinstance(report, dict) else None
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {version!r}, this fleetserve reads {SCHEMA_VERSION}"
        )
    return report


def _lookup(summary: dict[str, Any], path: tuple[str, ...]) -> float | int | None:
    value: Any = summary
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return "-"
    return f"{value / base:.2f}x"


def compare_table(reports: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """Rows of `ROWS`; for every report after the first, its value and its ratio to the first."""
    headers = ["metric", labels[0]]
    for label in labels[1:]:
        headers += [label, f"{label} / {labels[0]}"]
    rows = []
    for name, path in ROWS:
        base = _lookup(reports[0]["summary"], path)
        row = [name, fmt(base)]
        for report in reports[1:]:
            value = _lookup(report["summary"], path)
            row += [fmt(value), ratio(value, base)]
        rows.append(row)
    return markdown_table(headers, rows)


def labels_for(reports: Sequence[dict[str, Any]], paths: Sequence[Path]) -> list[str]:
    """Each report's label, made unique with its file name where two are equal."""
    labels = [r.get("label") or p.stem for r, p in zip(reports, paths)]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({p})" for label, p in zip(labels, paths)]
    return labels

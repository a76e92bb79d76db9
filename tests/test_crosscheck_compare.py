"""benchmarks/crosscheck_compare.py reads both peers' result files and judges within 10%."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "crosscheck_compare.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("crosscheck_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def write_ours(folder: Path, ttft_p50: float, tok_s: float) -> None:
    (folder / "bench").mkdir(parents=True)
    latency = {"count": 10, "mean": ttft_p50, "p50": ttft_p50, "p90": 0, "p99": 0, "max": 0}
    summary = {
        "duration_s": 100.0,
        "requests": {"sent": 10, "completed": 10, "failed": 0},
        "output_tokens_per_s": tok_s,
        "total_output_tokens": 1280,
        "ttft_ms": latency,
        "itl_ms": latency,
        "e2e_ms": latency,
    }
    (folder / "bench" / "bench.json").write_text(json.dumps({"summary": summary}))


def write_guidellm(folder: Path, ttft_p50: float, tok_s: float) -> None:
    def stat(median: float, mean: float, count: int = 10, total: float = 0.0) -> dict:
        ok = {"median": median, "mean": mean, "count": count, "total_sum": total}
        return {"successful": ok}

    metrics = {
        "time_to_first_token_ms": stat(ttft_p50, ttft_p50),
        "output_tokens_per_second": stat(50.0, tok_s),  # median is per request: not used
        "inter_token_latency_ms": stat(10.0, 10.0),
        "request_latency": stat(2.0, 2.0),
        "output_token_count": stat(128.0, 128.0, total=1280.0),
    }
    bench = {"metrics": metrics, "duration": 101.0}
    (folder / "guidellm.json").write_text(json.dumps({"benchmarks": [bench]}))


def write_aiperf(folder: Path, ttft_p50: float, tok_s: float) -> None:
    (folder / "aiperf").mkdir()
    data = {
        "time_to_first_token": {"p50": ttft_p50, "avg": ttft_p50},
        "output_token_throughput": {"avg": tok_s},
        "inter_token_latency": {"avg": 10.0},
        "request_latency": {"p50": 2000.0},
        "benchmark_duration": {"avg": 99.0},
        "request_count": {"avg": 10},
        "total_output_tokens": {"avg": 1280},
    }
    (folder / "aiperf" / "profile_export_aiperf.json").write_text(json.dumps(data))


def test_guidellm_run_within_tolerance_passes(compare, tmp_path, capsys) -> None:
    write_ours(tmp_path, ttft_p50=1000.0, tok_s=100.0)
    write_guidellm(tmp_path, ttft_p50=1080.0, tok_s=95.0)
    assert compare.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "guidellm / ours = 1.080" in out
    assert "guidellm / ours = 0.950" in out  # its run mean, not its per-request median


def test_aiperf_run_outside_tolerance_fails_and_says_which(compare, tmp_path, capsys) -> None:
    write_ours(tmp_path, ttft_p50=1000.0, tok_s=100.0)
    write_aiperf(tmp_path, ttft_p50=1050.0, tok_s=75.0)
    assert compare.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "| output tokens/s | 100.0 | 75.0 | 0.750 | DIFFERS |" in out
    assert "| TTFT p50 (ms) | 1,000.0 | 1,050.0 | 1.050 | ok |" in out


def test_verdict_is_on_the_median_of_repeated_runs(compare, tmp_path, capsys) -> None:
    for i, tok_s in enumerate([100.0, 70.0, 104.0]):  # one noisy run of three
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        write_ours(folder, ttft_p50=1000.0, tok_s=100.0)
        write_guidellm(folder, ttft_p50=1000.0, tok_s=tok_s)
    assert compare.main([str(tmp_path / f"run{i}") for i in range(3)]) == 0
    assert "= 1.000 (runs: 1.000, 0.700, 1.040) ok" in capsys.readouterr().out


def test_folder_without_peer_results_is_named(compare, tmp_path) -> None:
    write_ours(tmp_path, ttft_p50=1000.0, tok_s=100.0)
    with pytest.raises(SystemExit, match="neither"):
        compare.main([str(tmp_path)])

"""`fleetserve simulate` from the command line: bench's flags in, bench's files out."""

from __future__ import annotations

import json

import pytest

from fleetserve.bench.compare import compare_table, load_report
from fleetserve.cli import main
from fleetserve.perf.cost_model import CostModel

COSTS = CostModel(
    {"base": 0.02, "tokens": 1e-4, "sampled": 1e-3},
    meta={"model": "m", "engine": {"num_blocks": 512, "block_size": 16, "max_model_len": 1024}},
)


def simulate(tmp_path, name: str, *flags: str) -> dict:
    costs = tmp_path / "costs.json"
    COSTS.save(costs)
    out = tmp_path / name
    argv = ["simulate", "--cost-model", str(costs), "--out", str(out), "--no-progress"]
    assert main(argv + ["--no-plots", *flags]) == 0
    return json.loads((out / "bench.json").read_text())


def test_simulate_writes_a_bench_report_that_compare_reads(tmp_path, capsys):
    flags = ["--num-requests", "30", "--rate", "5", "--input-len", "64", "--output-len", "16"]
    one = simulate(tmp_path, "one", *flags, "--replicas", "1", "--label", "one")
    three = simulate(tmp_path, "three", *flags, "--replicas", "3", "--label", "three")
    assert one["summary"]["requests"]["completed"] == 30
    assert one["simulation"]["engine"]["num_blocks"] == 512  # from the cost model's profile
    assert (tmp_path / "one" / "summary.md").exists()
    assert "prefix-cache hit rate" in capsys.readouterr().out
    reports = [load_report(tmp_path / d / "bench.json") for d in ("one", "three")]
    table = compare_table(reports, ["one", "three"])
    assert "three / one" in table
    # three replicas at the same load: a shorter queue, so TTFT p50 is no worse
    assert three["summary"]["ttft_ms"]["p50"] <= one["summary"]["ttft_ms"]["p50"]


def test_simulate_takes_failures_and_autoscaling_flags(tmp_path):
    report = simulate(
        tmp_path,
        "fail",
        *["--num-requests", "60", "--rate", "20", "--output-len", "32", "--replicas", "2"],
        *["--fail", "1@1+2", "--max-replicas", "4", "--cold-start", "2"],
    )
    sim = report["simulation"]
    assert sim["failures"] == [{"replica": 1, "at_s": 1.0, "down_s": 2.0}]
    assert sim["autoscaling"]["config"]["max_replicas"] == 4
    assert report["summary"]["requests"]["sent"] == 60


def test_simulate_without_a_cost_model_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--cost-model", str(tmp_path / "missing.json")])
    assert exc.value.code == 2
    assert "cannot read cost model" in capsys.readouterr().err


def test_simulate_shares_cores_and_rejects_none(tmp_path, capsys):
    flags = ["--num-requests", "30", "--rate", "20", "--output-len", "16", "--replicas", "3"]
    report = simulate(tmp_path, "shared", *flags, "--shared-cores", "2")
    assert report["simulation"]["shared_cores"] == 2.0
    with pytest.raises(SystemExit) as exc:
        simulate(tmp_path, "bad", *flags, "--shared-cores", "0")
    assert exc.value.code == 2
    assert "shared_cores must be > 0" in capsys.readouterr().err

"""Compare `fleetserve bench` with a third-party client on the same server and workload.

Reads the result folders that `benchmarks/crosscheck_aiperf.sh` and
`benchmarks/crosscheck_guidellm.sh` write (our `bench/bench.json` next to aiperf's
`aiperf/profile_export_aiperf.json` or guidellm's `guidellm.json`) and prints, for each
folder, both clients' figures side by side with the peer / ours ratio. The two figures the
cross-check is judged on are TTFT p50 and output tokens/s: each must agree within --tolerance
(10% by default). With several folders (repeated runs) it also prints each peer's median ratio.
Exit status 1 when a median ratio falls outside the tolerance.

    .venv/bin/python benchmarks/crosscheck_compare.py benchmarks/out/crosscheck-guidellm-*
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

# (key, label, judged): the judged ones decide the verdict; the others explain a disagreement.
METRICS = [
    ("ttft_p50_ms", "TTFT p50 (ms)", True),
    ("output_tok_s", "output tokens/s", True),
    ("ttft_mean_ms", "TTFT mean (ms)", False),
    ("itl_mean_ms", "inter-token latency mean (ms)", False),
    ("e2e_p50_ms", "end-to-end p50 (ms)", False),
    ("duration_s", "duration (s)", False),
    ("completed", "requests completed", False),
    ("output_tokens", "output tokens", False),
]


@dataclass
class Run:
    folder: Path
    peer: str
    ours: dict[str, float]
    theirs: dict[str, float]


def read_ours(path: Path) -> dict[str, float]:
    summary = json.loads(path.read_text())["summary"]
    return {
        "ttft_p50_ms": summary["ttft_ms"]["p50"],
        "output_tok_s": summary["output_tokens_per_s"],
        "ttft_mean_ms": summary["ttft_ms"]["mean"],
        "itl_mean_ms": summary["itl_ms"]["mean"],
        "e2e_p50_ms": summary["e2e_ms"]["p50"],
        "duration_s": summary["duration_s"],
        "completed": summary["requests"]["completed"],
        "output_tokens": summary["total_output_tokens"],
    }


def read_aiperf(path: Path) -> dict[str, float]:
    data = json.loads(path.read_text())
    return {
        "ttft_p50_ms": data["time_to_first_token"]["p50"],
        "output_tok_s": data["output_token_throughput"]["avg"],
        "ttft_mean_ms": data["time_to_first_token"]["avg"],
        "itl_mean_ms": data["inter_token_latency"]["avg"],
        "e2e_p50_ms": data["request_latency"]["p50"],
        "duration_s": data["benchmark_duration"]["avg"],
        "completed": data["request_count"]["avg"],
        "output_tokens": data["total_output_tokens"]["avg"],
    }


def read_guidellm(path: Path) -> dict[str, float]:
    (bench,) = json.loads(path.read_text())["benchmarks"]
    metrics = bench["metrics"]

    def ok(name: str) -> dict:
        return metrics[name]["successful"]

    return {
        "ttft_p50_ms": ok("time_to_first_token_ms")["median"],
        # guidellm's "mean" output tokens/s is its total output tokens over the run's duration.
        "output_tok_s": ok("output_tokens_per_second")["mean"],
        "ttft_mean_ms": ok("time_to_first_token_ms")["mean"],
        "itl_mean_ms": ok("inter_token_latency_ms")["mean"],
        "e2e_p50_ms": ok("request_latency")["median"] * 1000.0,
        "duration_s": bench["duration"],
        "completed": ok("request_latency")["count"],
        "output_tokens": ok("output_token_count")["total_sum"],
    }


def read_run(folder: Path) -> Run:
    ours = read_ours(folder / "bench" / "bench.json")
    aiperf = folder / "aiperf" / "profile_export_aiperf.json"
    guidellm = folder / "guidellm.json"
    if aiperf.exists():
        return Run(folder, "aiperf", ours, read_aiperf(aiperf))
    if guidellm.exists():
        return Run(folder, "guidellm", ours, read_guidellm(guidellm))
    raise SystemExit(f"{folder}: neither {aiperf.name} nor {guidellm.name} found")


def ratio(run: Run, key: str) -> float:
    return run.theirs[key] / run.ours[key]


def print_run(run: Run, tolerance: float) -> None:
    print(f"\n{run.folder.name}  (fleetserve bench vs {run.peer})\n")
    print(f"| metric | fleetserve bench | {run.peer} | {run.peer} / ours | judged |")
    print("|---|---:|---:|---:|---|")
    for key, label, judged in METRICS:
        r = ratio(run, key)
        verdict = ("ok" if abs(r - 1.0) <= tolerance else "DIFFERS") if judged else ""
        print(f"| {label} | {run.ours[key]:,.1f} | {run.theirs[key]:,.1f} | {r:.3f} | {verdict} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.10)
    args = parser.parse_args(argv)
    runs = [read_run(folder) for folder in args.folders]
    for run in runs:
        print_run(run, args.tolerance)
    failed = False
    for peer in sorted({run.peer for run in runs}):
        group = [run for run in runs if run.peer == peer]
        print(f"\n{peer}: median over {len(group)} run(s), tolerance ±{args.tolerance:.0%}")
        for key, label, judged in METRICS:
            if not judged:
                continue
            ratios = [ratio(run, key) for run in group]
            median = statistics.median(ratios)
            ok = abs(median - 1.0) <= args.tolerance
            failed |= not ok
            spread = ", ".join(f"{r:.3f}" for r in ratios)
            verdict = "ok" if ok else "DIFFERS"
            print(f"  {label}: {peer} / ours = {median:.3f} (runs: {spread}) {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

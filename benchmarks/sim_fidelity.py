"""How close `fleetserve simulate` comes to the real thing: the same `fleetserve bench` run
against real servers and against the simulator, side by side.

    flock /tmp/fleetserve-bench.lock python benchmarks/sim_fidelity.py \\
        --cost-model bench-out/smollm2.json --rows light,near,over
    flock /tmp/fleetserve-bench.lock python benchmarks/sim_fidelity.py \\
        --cost-model bench-out/smollm2.json --rows round_robin,prefix_aware

Rows (SmolLM2, the default model, exact prompts with its tokenizer, --ignore-eos, seed 0):

- `light`, `near`, `over`: one replica (`fleetserve serve`) at 20%, 80% and 150% of the
  request rate the simulator finds it sustains (a closed loop of 32, simulated);
- `round_robin`, `prefix_aware`: three replicas (`fleetserve serve` x 3 behind
  `fleetserve gateway --router R`) on the multi-turn workload.

Each row prints TTFT p50/p90, TPOT p50, output tokens/s, the prefix-cache hit rate (real: the
replicas' /metrics counters; simulated: the engines' own) and errors, real vs simulated, with
the relative error. The bench.json files stay under --out for `fleetserve bench compare`.
Every real replica computes on one thread (`--num-threads 1`), as the profile must: profile
with `fleetserve profile --num-threads 1`. `--calibrate` first fits what serving adds to the
profiled step (per step and per output token, on separate closed-loop runs) and simulates
with it. The three real replicas share this machine's cores, and so do the simulated ones
(`fleetserve simulate --shared-cores`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

ROWS = ("light", "near", "over", "round_robin", "prefix_aware")
LOAD_FACTORS = {"light": 0.2, "near": 0.8, "over": 1.5}
SINGLE = ["--workload", "random", "--input-len", "128", "--output-len", "64"]
MULTI = ["--workload", "multi-turn", "--input-len", "64", "--output-len", "32", "--turns", "3"]
METRICS = (
    ("TTFT p50 (ms)", ("ttft_ms", "p50")),
    ("TTFT p90 (ms)", ("ttft_ms", "p90")),
    ("TPOT p50 (ms)", ("tpot_ms", "p50")),
    ("output tok/s", ("output_tokens_per_s",)),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen(
        [PYTHON, "-m", "fleetserve.cli", *argv],
        cwd=ROOT,
        env=ENV,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, stopped by its id
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}: not healthy after {timeout:.0f} s")


def prefix_counters(urls: list[str]) -> tuple[float, float]:
    """Sum of (queries, hits) of the replicas' prefix-cache counters."""
    queries = hits = 0.0
    for url in urls:
        text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
        for line in text.splitlines():
            if line.startswith("fleetserve:prefix_cache_queries_total"):
                queries += float(line.split()[-1])
            elif line.startswith("fleetserve:prefix_cache_hits_total"):
                hits += float(line.split()[-1])
    return queries, hits


def bench(url: str, flags: list[str], out: Path, label: str) -> dict:
    argv = ["bench", "--url", url, "--out", str(out), "--label", label, "--no-plots"]
    subprocess.run(
        [PYTHON, "-m", "fleetserve.cli", *argv, *flags, "--no-progress"],
        cwd=ROOT,
        env=ENV,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads((out / "bench.json").read_text())


def simulate(cost_model: Path, flags: list[str], out: Path, label: str, *extra: str) -> dict:
    argv = ["simulate", "--cost-model", str(cost_model), "--out", str(out), "--label", label]
    subprocess.run(
        [PYTHON, "-m", "fleetserve.cli", *argv, *flags, *extra, "--no-progress", "--no-plots"],
        cwd=ROOT,
        env=ENV,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads((out / "bench.json").read_text())


def real_single(flags: list[str], out: Path, label: str) -> tuple[dict, float | None]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(["serve", "--port", str(port), "--num-threads", "1"], out.with_suffix(".log"))
    try:
        wait_healthy(url, proc)
        before = prefix_counters([url])
        report = bench(url, flags, out, label)
        after = prefix_counters([url])
    finally:
        stop(proc)
    return report, _hit_rate(before, after)


def real_fleet(flags: list[str], router: str, out: Path, label: str, tokenizer: str):
    out.mkdir(parents=True, exist_ok=True)
    replicas, urls = [], []
    for i in range(3):
        port = free_port()
        urls.append(f"http://127.0.0.1:{port}")
        replicas.append(
            start(["serve", "--port", str(port), "--num-threads", "1"], out / f"replica{i}.log")
        )
    gw_port = free_port()
    gateway = None
    try:
        for url, proc in zip(urls, replicas):
            wait_healthy(url, proc)
        argv = ["gateway", "--port", str(gw_port), "--router", router, "--tokenizer", tokenizer]
        for url in urls:
            argv += ["--replica", url]
        gateway = start(argv, out / "gateway.log")
        gw_url = f"http://127.0.0.1:{gw_port}"
        wait_healthy(gw_url, gateway)
        before = prefix_counters(urls)
        report = bench(gw_url, flags, out, label)
        after = prefix_counters(urls)
    finally:
        for proc in [gateway, *replicas]:
            if proc is not None:
                stop(proc)
    return report, _hit_rate(before, after)


def _hit_rate(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    queries = after[0] - before[0]
    return (after[1] - before[1]) / queries if queries else None


CALIBRATION = ((1, 8), (8, 16))  # (closed-loop concurrency, requests)


def calibrate_serving(cost_model: Path, common: list[str], out: Path) -> Path:
    """What serving adds to `core.step()`, fitted on a served replica: two closed loops of
    random 128 -> 64 requests, at concurrency 1 and 8, run for real and simulated with the
    bare cost model. A decode step of b sequences takes `step_s + b x token_s` more for real
    than the profile says (the engine-core loop's IPC per step; the front end's
    detokenizing and streaming per output token, on the same cores), so the two TPOT gaps
    give both. Writes the cost model with them (`serving`) beside the runs and returns it.
    Separate runs from the rows it is then checked on."""
    from fleetserve.perf.cost_model import CostModel

    gaps = []
    for concurrency, n in CALIBRATION:
        flags = [*common, *SINGLE, "--num-requests", str(n), "--concurrency", str(concurrency)]
        label = f"calibrate-c{concurrency}"
        real, _ = real_single(flags, out / f"{label}-real", f"{label}-real")
        sim = simulate(cost_model, flags, out / f"{label}-sim", f"{label}-sim")
        r, m = lookup(real, ("tpot_ms", "p50")), lookup(sim, ("tpot_ms", "p50"))
        print(f"calibration, concurrency {concurrency}: TPOT p50 real {r:.1f} ms, bare {m:.1f} ms")
        gaps.append((concurrency, (r - m) / 1e3))
    (b1, g1), (b2, g2) = gaps
    token_s = max((g2 - g1) / (b2 - b1), 0.0)
    step_s = max(g1 - token_s * b1, 0.0)
    served = CostModel.load(cost_model).with_serving(step_s, token_s)
    path = out / f"{cost_model.stem}-served.json"
    served.save(path)
    print(f"serving costs: {step_s * 1e3:.2f} ms a step + {token_s * 1e3:.2f} ms an output token")
    return path


def sustained_rate(cost_model: Path, common: list[str], out: Path) -> float:
    """Requests/s one simulated replica sustains in a closed loop of 32."""
    flags = [*common, *SINGLE, "--num-requests", "64", "--concurrency", "32"]
    report = simulate(cost_model, flags, out / "capacity", "capacity")
    return report["summary"]["request_throughput"]


def lookup(report: dict, path: tuple[str, ...]):
    value = report["summary"]
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def rel_error(real, sim) -> str:
    if real is None or sim is None or real == 0:
        return "-"
    return f"{(sim - real) / real:+.1%}"


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) and abs(value) < 10 else f"{value:.1f}"


def row_table(name: str, real: dict, sim: dict, real_hits, sim_hits) -> list[str]:
    lines = []
    for metric, path in METRICS:
        a, b = lookup(real, path), lookup(sim, path)
        lines.append(f"| {name} | {metric} | {fmt(a)} | {fmt(b)} | {rel_error(a, b)} |")
    lines.append(
        f"| {name} | prefix hit rate | {fmt(real_hits)} | {fmt(sim_hits)} | "
        f"{rel_error(real_hits, sim_hits)} |"
    )
    errors = (real["summary"]["errors"], sim["summary"]["errors"])
    lines.append(f"| {name} | errors | {errors[0] or 0} | {errors[1] or 0} | |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cost-model", type=Path, required=True, help="fleetserve profile JSON")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated of {ROWS}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "sim_fidelity")
    parser.add_argument("--num-requests", type=int, default=40)
    parser.add_argument("--num-conversations", type=int, default=16)
    parser.add_argument("--multi-turn-rate", type=float, default=0.5, help="conversations/s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="first fit the serving costs (per step, per output token) on a served replica "
        "and simulate with them (see calibrate_serving)",
    )
    parser.add_argument(
        "--shared-cores",
        type=float,
        default=os.cpu_count(),
        help="cores the three real replicas share (this machine's): the simulated ones share "
        "as many",
    )
    args = parser.parse_args()
    # A timeout's SIGTERM must still stop the servers (the `finally` blocks run on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {ROWS}")

    from fleetserve.options import default_model

    tokenizer = default_model()
    common = ["--tokenizer", tokenizer, "--ignore-eos", "--seed", str(args.seed)]
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| row | metric | real | simulated | error |", "|---|---|---|---|---|"]
    capacity = None
    if args.calibrate:
        args.cost_model = calibrate_serving(args.cost_model, common, args.out)
    for row in rows:
        if row in LOAD_FACTORS:
            if capacity is None:
                capacity = sustained_rate(args.cost_model, common, args.out)
                print(f"simulated capacity of one replica: {capacity:.3f} requests/s")
            rate = LOAD_FACTORS[row] * capacity
            flags = [*common, *SINGLE, "--rate", f"{rate:.4f}"]
            flags += ["--num-requests", str(args.num_requests)]
            real, real_hits = real_single(flags, args.out / f"{row}-real", f"{row}-real")
            sim = simulate(args.cost_model, flags, args.out / f"{row}-sim", f"{row}-sim")
        else:
            flags = [*common, *MULTI, "--rate", str(args.multi_turn_rate)]
            flags += ["--num-conversations", str(args.num_conversations)]
            real, real_hits = real_fleet(
                flags, row, args.out / f"{row}-real", f"{row}-real", tokenizer
            )
            sim = simulate(
                args.cost_model,
                flags,
                args.out / f"{row}-sim",
                f"{row}-sim",
                *["--replicas", "3", "--router", row, "--shared-cores", str(args.shared_cores)],
            )
        sim_hits = sim["simulation"]["prefix_cache"]["hit_rate"]
        lines += row_table(row, real, sim, real_hits, sim_hits)
        print("\n".join(lines[-6:]), flush=True)
    print()
    print("\n".join(lines))
    (args.out / "fidelity.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

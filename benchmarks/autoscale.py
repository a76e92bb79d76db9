"""The autoscaled fleet against fixed fleets of its min and of its max size, on a trace that
goes idle -> 10x burst -> idle.

    .venv/bin/python benchmarks/autoscale.py                    # fake replicas, 60/60/60 s
    .venv/bin/python benchmarks/autoscale.py --quick            # fake replicas, ~3-4 min
    .venv/bin/python benchmarks/autoscale.py --model smollm2 --quick   # real SmolLM2 replicas
    .venv/bin/python benchmarks/autoscale.py --calibrate smollm2       # measure the fake's cost

The trace: Poisson arrivals (seeded) at `--base-rate` for `--idle-s`, `--burst-factor` times
that for `--burst-s`, then the base rate again for `--after-s`; every request a streamed
completion of `--max-tokens` tokens (`ignore_eos`, greedy). It runs three times, each on a
freshly started fleet: (a) autoscaled between `--min-replicas` and `--max-replicas`, (b) a
fixed fleet of min size, (c) a fixed fleet of max size. Per run: requests lost (anything but
a 200 with the whole stream), TTFT p50/p99 of the requests that arrived during the burst,
replica-seconds (the replicas holding a process, loading + ready + draining, sampled from
the gateway's /metrics every `--sample-s` and integrated over the trace's length, the same
window for every fleet), scale events, and
reversals of the desired size (up after down or down after up: oscillation). Then the
ratios autoscaled / fixed-max of replica-seconds and of TTFT p99 (the aim: <= 0.6 and
<= 1.5). Written to `--out` (default bench-out/autoscale-TIME/): `timeline.png` (replicas by
state, the desired size, the gateway's queue and the arrivals over time, one panel per
fleet), `summary.json` and `summary.md`, with the CPU flags.

Fake replicas (`fleetserve.testing.fake_fleet`) charge an engine's cost: a decode step of
`token_delay + per_seq x streams running`, `prefill` per prompt token, and `load` seconds
before they are ready. The defaults in `CALIBRATION` were measured on SmolLM2 (the command
is beside them); `--calibrate MODEL` measures them again on this machine and prints them.
With `--model` the replicas are real (`fleetserve serve MODEL`, `--num-threads 1` each so a
replica is one core: on 2 cores use `--max-replicas 2`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fleetserve.cpu import describe as describe_cpu
from fleetserve.options import default_model
from fleetserve.testing.launcher import stop_process_group

ROOT = Path(__file__).resolve().parent.parent
OPERATOR_KEY = secrets.token_urlsafe(16)
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}
HOLDING = ("loading", "ready", "draining")  # states in which a replica holds a process
WORDS = (
    "the fleet grows when the burst comes and shrinks when it has passed while every "
    "stream goes on to its last token on one replica or another"
).split()

# SmolLM2-135M-Instruct Q4_1 (dequantized to float32) served by `fleetserve serve` with its
# defaults on this machine (2 cores AMD EPYC, avx2 fma avx512f avx512bw avx512vl avx512_vnni
# avx512_bf16, no amx), measured 2026-11-30 19:13-19:21 UTC with
#   flock /tmp/fleetserve-bench.lock .venv/bin/python benchmarks/autoscale.py --calibrate smollm2
# while other engineers' tests kept the 1-minute load average at 6-7 on the 2 cores (their
# processes outside the lock): step at batch 1 0.910/1.323/0.873 s, at batch 8
# 2.248/1.462/1.357 s, load 39.6 s. A decode step costs token_delay + per_seq x streams; load
# is start to first passing /health (the prefill figure came out 0: TTFT at batch 1 was
# below one step). On a quiet machine expect several times less; run --calibrate and pass
# its line as --calibration.
CALIBRATION = {
    "token_delay_s": 0.8314,
    "per_seq_s": 0.0788,
    "prefill_s_per_token": 0.0,
    "load_s": 39.6,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def load_average() -> str:
    return f"load average (1 min) {os.getloadavg()[0]:.2f}"


# ---- the trace -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    name: str
    duration_s: float
    rate: float  # requests per second


def poisson_arrivals(phases: list[Phase], seed: int) -> list[tuple[float, str]]:
    """(arrival time from the start, phase name), Poisson within each phase."""
    rng = random.Random(seed)
    out, start = [], 0.0
    for phase in phases:
        t = start
        while phase.rate > 0:
            t += rng.expovariate(phase.rate)
            if t >= start + phase.duration_s:
                break
            out.append((t, phase.name))
        start += phase.duration_s
    return out


def burst_rate(cal: dict, replicas: int, streams: float, tokens: int) -> float:
    """Requests/s that keep `replicas` replicas at `streams` streams each, by the calibrated
    cost: a replica with n streams makes n / (token_delay + n x per_seq) tokens/s."""
    tokens_per_s = streams / (cal["token_delay_s"] + streams * cal["per_seq_s"])
    return replicas * tokens_per_s / tokens


def prompt(i: int, words: int) -> str:
    return f"request {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))


# ---- a fleet in a child process ---------------------------------------------------------------


class Fleet:
    """A fleet behind one gateway in its own process group; `url` is the gateway."""

    def __init__(self, name: str, cmd: list[str], log: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.log = open(log, "wb")  # noqa: SIM115 - closed in close()
        env = {**os.environ, "FLEETSERVE_OPERATOR_KEY": OPERATOR_KEY}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.log, env=env, start_new_session=True
        )
        self.url = self._url()

    def _url(self) -> str:
        if "--port" in self.cmd:
            return f"http://127.0.0.1:{self.cmd[self.cmd.index('--port') + 1]}"
        line = self.proc.stdout.readline().decode()  # the fake fleet prints `fleet: URL`
        if not line.startswith("fleet: "):
            raise RuntimeError(f"{self.name}: the fleet did not start: {line!r}")
        return line.split(" ", 1)[1].strip()

    def wait_ready(self, replicas: int, timeout: float = 900.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: the fleet exited ({self.proc.returncode})")
            try:
                listing = httpx.get(f"{self.url}/admin/replicas", headers=OPERATOR, timeout=2)
                ready = [r for r in listing.json() if r["state"] == "ready"]
                if listing.status_code == 200 and len(ready) >= replicas:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: {replicas} replicas not ready in {timeout:.0f}s")

    def close(self) -> None:
        stop_process_group(self.proc, grace_s=30)
        self.log.close()


def fleet_command(args: argparse.Namespace, replicas: int, autoscaled: bool) -> list[str]:
    """The fleet's command: autoscaled between min and max, or fixed at `replicas`."""
    if autoscaled:
        scaling = [
            "--min-replicas", str(args.min_replicas),
            "--max-replicas", str(args.max_replicas),
            "--target-concurrency", str(args.target_concurrency),
            "--stable-window", str(args.stable_window),
            "--scale-down-delay", str(args.scale_down_delay),
            "--autoscale-interval", str(args.autoscale_interval),
        ]  # fmt: skip
    elif replicas == 1 and args.model:
        # `serve --replicas 1` is a lone replica without a gateway; pinned bounds keep one.
        scaling = ["--min-replicas", "1", "--max-replicas", "1"]
    else:
        scaling = []
    if args.model:
        return [sys.executable, "-m", "fleetserve.cli", "--log-level", "WARNING",
                "serve", args.model, "--port", str(free_port()), "--replicas", str(replicas),
                "--num-threads", "1", "--drain-timeout", str(args.drain),
                *scaling]  # fmt: skip
    cal = args.calibration
    return [sys.executable, "-m", "fleetserve.testing.fake_fleet", "fake",
            "--replicas", str(replicas), "--router", "least_outstanding",
            "--token-delay", str(cal["token_delay_s"]), "--per-seq-delay", str(cal["per_seq_s"]),
            "--prefill-s-per-token", str(cal["prefill_s_per_token"]),
            "--load-delay", str(cal["load_s"]), "--drain", str(args.drain),
            *scaling]  # fmt: skip


# ---- what the gateway says ---------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    loading: int = 0
    ready: int = 0
    draining: int = 0
    queue: int = 0
    desired: int | None = None
    scale_events: int = 0

    @property
    def holding(self) -> int:
        return self.loading + self.ready + self.draining


def parse_metrics(text: str, t: float) -> Sample:
    sample = Sample(t)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "fleetserve:gateway_replicas" and s.labels.get("state") in HOLDING:
                setattr(sample, s.labels["state"], int(s.value))
            elif s.name == "fleetserve:gateway_queue_length":
                sample.queue = int(s.value)
            elif s.name == "fleetserve:gateway_desired_replicas":
                sample.desired = int(s.value)
            elif s.name == "fleetserve:gateway_scale_events_total":
                sample.scale_events += int(s.value)
    return sample


async def sample_loop(client: httpx.AsyncClient, url: str, t0: float, every: float, out, stop):
    while not stop.is_set():
        try:
            resp = await client.get(f"{url}/metrics", headers=OPERATOR, timeout=5)
            out.append(parse_metrics(resp.text, time.monotonic() - t0))
        except httpx.HTTPError:
            pass
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


# ---- the clients -----------------------------------------------------------------------------


@dataclass
class Result:
    arrival_s: float
    phase: str
    status: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    tokens: int = 0
    complete: bool = False
    error: str | None = None


async def one_request(client, url, model, i, arrival, phase, args, t0) -> Result:
    result = Result(arrival, phase)
    await asyncio.sleep(max(0.0, t0 + arrival - time.monotonic()))
    body = {"model": model, "prompt": prompt(i, args.prompt_words), "max_tokens": args.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.monotonic()
    finish = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            result.status = resp.status_code
            if resp.status_code != 200:
                result.error = (await resp.aread()).decode(errors="replace")[:200]
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                for choice in chunk.get("choices") or ():
                    if choice.get("text") and result.ttft_s is None:
                        result.ttft_s = time.monotonic() - start
                    finish = choice.get("finish_reason") or finish
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.e2e_s = time.monotonic() - start
    result.complete = (
        result.error is None and finish == "length" and result.tokens == args.max_tokens
    )
    return result


async def drive(fleet: Fleet, arrivals, args) -> tuple[list[Result], list[Sample], float]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
        model = (await client.get(f"{fleet.url}/v1/models", headers=OPERATOR)).json()
        model = model["data"][0]["id"] if model.get("data") else "fake"
        samples: list[Sample] = []
        stop = asyncio.Event()
        t0 = time.monotonic()
        sampler = asyncio.create_task(
            sample_loop(client, fleet.url, t0, args.sample_s, samples, stop)
        )
        tasks = [
            asyncio.create_task(one_request(client, fleet.url, model, i, a, p, args, t0))
            for i, (a, p) in enumerate(arrivals)
        ]
        total = args.idle_s + args.burst_s + args.after_s
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=args.progress_s)
            now = time.monotonic() - t0
            done = sum(t.done() for t in tasks)
            sent = sum(a <= now for a, _ in arrivals)
            last = samples[-1] if samples else Sample(now)
            print(f"  {fleet.name:10s} t={now:6.1f}/{total:.0f}s sent {sent:4d} done {done:4d} "
                  f"replicas loading {last.loading} ready {last.ready} draining {last.draining} "
                  f"desired {last.desired} queue {last.queue}", flush=True)  # fmt: skip
        end = time.monotonic() - t0
        # A little more sampling after the last answer: the scale-down in progress shows.
        await asyncio.sleep(min(args.sample_s * 4, 1.0))
        stop.set()
        await sampler
        return [t.result() for t in tasks], samples, end


# ---- one run and the summary ----------------------------------------------------------------


def replica_seconds(samples: list[Sample], end: float) -> float:
    """Integral of the replicas holding a process over [0, end], each sample held until the
    next one."""
    total = 0.0
    for a, b in zip(samples, samples[1:] + [Sample(end)]):
        if a.t >= end:
            break
        total += a.holding * (min(b.t, end) - a.t)
    return total


def reversals(samples: list[Sample]) -> int:
    """How often the desired size changed direction (down after up or up after down)."""
    values = [s.desired for s in samples if s.desired is not None]
    steps = [b - a for a, b in zip(values, values[1:]) if b != a]
    return sum((x > 0) != (y > 0) for x, y in zip(steps, steps[1:]))


@dataclass
class RunSummary:
    fleet: str
    requests: int
    lost: int
    ttft_burst_p50_s: float | None
    ttft_burst_p99_s: float | None
    ttft_all_p99_s: float | None
    replica_seconds: float
    duration_s: float
    scale_events: int
    reversals: int
    max_replicas_seen: int
    max_queue: int
    load_average: str = ""
    errors: list[str] = field(default_factory=list)


def summarize(
    name: str, results: list[Result], samples: list[Sample], end: float, window: float
) -> RunSummary:
    """`window`: the trace's length, over which replica-seconds are counted for every fleet
    alike (a fleet whose last answer comes later is not charged less for stopping sooner)."""
    burst = [r.ttft_s for r in results if r.phase == "burst" and r.ttft_s is not None]
    every = [r.ttft_s for r in results if r.ttft_s is not None]
    lost = [r for r in results if r.status != 200 or not r.complete]
    events = samples[-1].scale_events - samples[0].scale_events if samples else 0
    return RunSummary(
        fleet=name,
        requests=len(results),
        lost=len(lost),
        ttft_burst_p50_s=pct(burst, 0.5),
        ttft_burst_p99_s=pct(burst, 0.99),
        ttft_all_p99_s=pct(every, 0.99),
        replica_seconds=replica_seconds(samples, window),
        duration_s=end,
        scale_events=events,
        reversals=reversals(samples),
        max_replicas_seen=max((s.holding for s in samples), default=0),
        max_queue=max((s.queue for s in samples), default=0),
        errors=sorted({f"{r.status} {r.error}" for r in lost})[:5],
    )


def run_one(name: str, cmd: list[str], initial: int, arrivals, args) -> dict:
    print(f"{name}: starting ({' '.join(cmd[2:])}); {load_average()}", flush=True)
    before = os.getloadavg()[0]
    fleet = Fleet(name, cmd, args.out / f"{name}.log")
    try:
        fleet.wait_ready(initial)
        print(f"{name}: {initial} replicas ready; trace of {len(arrivals)} requests", flush=True)
        results, samples, end = asyncio.run(drive(fleet, arrivals, args))
    finally:
        fleet.close()
    summary = summarize(name, results, samples, end, args.idle_s + args.burst_s + args.after_s)
    summary.load_average = f"{before:.2f} -> {os.getloadavg()[0]:.2f}"
    print(f"{name}: {fmt_summary(summary)}", flush=True)
    return {"summary": asdict(summary), "command": cmd,
            "samples": [asdict(s) for s in samples],
            "requests": [asdict(r) for r in results]}  # fmt: skip


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def fmt_summary(s: RunSummary) -> str:
    return (
        f"lost {s.lost}/{s.requests}, burst TTFT p50 {fmt_s(s.ttft_burst_p50_s)} s p99 "
        f"{fmt_s(s.ttft_burst_p99_s)} s, {s.replica_seconds:.1f} replica-s, "
        f"{s.scale_events} scale events, {s.reversals} reversals"
    )


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def markdown(report: dict) -> str:
    runs = [r["summary"] for r in report["runs"].values()]
    rows = [
        ("requests", "requests", "{}"),
        ("lost (not 200 + whole stream)", "lost", "{}"),
        ("TTFT p50, burst (s)", "ttft_burst_p50_s", "{:.3f}"),
        ("TTFT p99, burst (s)", "ttft_burst_p99_s", "{:.3f}"),
        ("TTFT p99, whole trace (s)", "ttft_all_p99_s", "{:.3f}"),
        ("replica-seconds", "replica_seconds", "{:.1f}"),
        ("run length (s)", "duration_s", "{:.1f}"),
        ("scale events", "scale_events", "{}"),
        ("desired-size reversals", "reversals", "{}"),
        ("most replicas at once", "max_replicas_seen", "{}"),
        ("longest gateway queue", "max_queue", "{}"),
        ("load average (1 min) before -> after", "load_average", "{}"),
    ]
    lines = [
        f"# autoscale benchmark {report['started']}",
        "",
        f"CPU: {report['cpu']}",
        "",
        f"Backend: {report['backend']}; trace: {report['trace']}",
        "",
        "| | " + " | ".join(r["fleet"] for r in runs) + " |",
        "|---|" + "---:|" * len(runs),
    ]
    for label, key, form in rows:
        cells = ["-" if r[key] is None else form.format(r[key]) for r in runs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ratios = report["ratios"]
    lines += [
        "",
        f"- autoscaled / fixed-max replica-seconds: **{fmt_s(ratios['replica_seconds'])}** "
        "(aim <= 0.6)",
        f"- autoscaled / fixed-max TTFT p99 in the burst: **{fmt_s(ratios['ttft_burst_p99'])}** "
        "(aim <= 1.5)",
        "- requests lost: " + ", ".join(f"{r['fleet']} {r['lost']}" for r in runs) + " (aim: 0)",
        "",
        "Commands:",
        "",
    ]
    lines += [f"- {name}: `{' '.join(r['command'][1:])}`" for name, r in report["runs"].items()]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.2 * len(runs)), sharex=True)
    for ax, (name, run) in zip(axes, runs.items()):
        samples = run["samples"]
        t = [s["t"] for s in samples]
        ax.stackplot(
            t,
            [s["ready"] for s in samples],
            [s["loading"] for s in samples],
            [s["draining"] for s in samples],
            labels=["ready", "loading", "draining"],
            colors=["#4c72b0", "#dd8452", "#c44e52"],
            step="post",
            alpha=0.8,
        )
        ax.step(t, [s["desired"] for s in samples], where="post", color="black", lw=1,
                label="desired")  # fmt: skip
        ax.set_ylabel("replicas")
        ax.set_title(f"{name}: {fmt_summary(RunSummary(**run['summary']))}", fontsize=9)
        right = ax.twinx()
        right.plot(t, [s["queue"] for s in samples], color="green", lw=1, label="gateway queue")
        arrivals = [r["arrival_s"] for r in run["requests"]]
        if arrivals:
            width = max(1.0, max(arrivals) / 60)  # about 60 bins
            per_bin = [0] * (int(max(arrivals) / width) + 1)
            for a in arrivals:
                per_bin[int(a / width)] += 1
            right.step([i * width for i in range(len(per_bin))], [c / width for c in per_bin],
                       where="post", color="gray", ls="--", lw=1, label="arrivals / s")  # fmt: skip
        right.set_ylabel("queue, arrivals/s")
        handles = ax.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        ax.legend(handles[0] + more[0], handles[1] + more[1], loc="upper right", fontsize=7)
    axes[-1].set_xlabel("seconds from the trace's start")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_benchmark(args: argparse.Namespace) -> dict:
    phases = [
        Phase("idle", args.idle_s, args.base_rate),
        Phase("burst", args.burst_s, args.base_rate * args.burst_factor),
        Phase("after", args.after_s, args.base_rate),
    ]
    arrivals = poisson_arrivals(phases, args.seed)
    backend = f"real {args.model}" if args.model else f"fake replicas {args.calibration}"
    trace = (
        f"{args.idle_s:g} s at {args.base_rate:g} req/s, {args.burst_s:g} s at "
        f"{args.base_rate * args.burst_factor:g}, {args.after_s:g} s at {args.base_rate:g} "
        f"(seed {args.seed}, {len(arrivals)} requests, {args.max_tokens} tokens each)"
    )
    print(f"autoscale: {backend}; {trace}; CPU {describe_cpu()}", flush=True)
    fleets = {
        "autoscaled": (fleet_command(args, args.min_replicas, True), max(args.min_replicas, 1)),
        "fixed-min": (fleet_command(args, args.min_replicas, False), args.min_replicas),
        "fixed-max": (fleet_command(args, args.max_replicas, False), args.max_replicas),
    }
    if args.min_replicas == 0:
        del fleets["fixed-min"]  # a fixed fleet of zero serves nothing
    runs = {name: run_one(name, cmd, n, arrivals, args) for name, (cmd, n) in fleets.items()}
    auto, fixed_max = runs["autoscaled"]["summary"], runs["fixed-max"]["summary"]
    return {
        "started": args.started,
        "cpu": describe_cpu(),
        "backend": backend,
        "trace": trace,
        "args": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "runs": runs,
        "ratios": {
            "replica_seconds": ratio(auto["replica_seconds"], fixed_max["replica_seconds"]),
            "ttft_burst_p99": ratio(auto["ttft_burst_p99_s"], fixed_max["ttft_burst_p99_s"]),
        },
    }


# ---- calibration ------------------------------------------------------------------------------


async def _streams(url: str, model: str, n: int, tokens: int, words: int) -> list[list[float]]:
    """`n` concurrent greedy streams; each one's chunk arrival times (from its start)."""

    async def one(client: httpx.AsyncClient, i: int) -> list[float]:
        body = {"model": model, "prompt": prompt(i, words), "max_tokens": tokens,
                "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
        start, times = time.monotonic(), []
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    times.append(time.monotonic() - start)
        return times

    async with httpx.AsyncClient(timeout=600) as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(n))))


def calibrate(model: str, rounds: int = 3, batch: int = 8, tokens: int = 64, words: int = 48):
    """Cold start, decode step at batch 1 and `batch`, and prefill per token of `model`
    served by `fleetserve serve` with its defaults (the whole machine for one replica)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "fleetserve.cli", "--log-level", "WARNING", "serve", model,
           "--port", str(port)]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                sys.exit(f"the replica exited ({proc.returncode})")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        load_s = time.monotonic() - started
        served = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        probe = {"model": served, "prompt": prompt(0, words), "max_tokens": 1}
        usage = httpx.post(f"{url}/v1/completions", json=probe, timeout=60).json()["usage"]
        prompt_tokens = usage["prompt_tokens"]
        asyncio.run(_streams(url, served, 2, 8, words))  # warm-up
        steps: dict[int, list[float]] = {1: [], batch: []}
        ttft1 = []
        for _ in range(rounds):
            for n in steps:
                runs = asyncio.run(_streams(url, served, n, tokens, words))
                gaps = [(t[-1] - t[1]) / (len(t) - 2) for t in runs if len(t) > 2]
                steps[n].append(statistics.median(gaps))
                if n == 1:
                    ttft1.append(runs[0][0])
    finally:
        stop_process_group(proc, grace_s=30)
    step1, stepb = (statistics.median(steps[n]) for n in (1, batch))
    per_seq = max(0.0, (stepb - step1) / (batch - 1))
    prefill = max(0.0, statistics.median(ttft1) - step1) / prompt_tokens
    result = {
        "token_delay_s": round(step1 - per_seq, 4),
        "per_seq_s": round(per_seq, 4),
        "prefill_s_per_token": round(prefill, 6),
        "load_s": round(load_s, 1),
    }
    print(f"calibrate {model}: step at batch 1 {[round(s, 4) for s in steps[1]]} s, at batch "
          f"{batch} {[round(s, 4) for s in steps[batch]]} s; TTFT at batch 1 "
          f"{[round(t, 4) for t in ttft1]} s for {prompt_tokens} prompt tokens; load "
          f"{load_s:.1f} s; CPU {describe_cpu()}; {load_average()}")  # fmt: skip
    print(f"CALIBRATION = {json.dumps(result)}")
    return result


# ---- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="real replicas of MODEL ('smollm2': the default model)")
    p.add_argument("--calibrate", metavar="MODEL", help="measure the fake replicas' cost")
    p.add_argument("--quick", action="store_true", help="a short trace (~3-4 min in all)")
    p.add_argument("--idle-s", type=float, default=60.0)
    p.add_argument("--burst-s", type=float, default=60.0)
    p.add_argument("--after-s", type=float, default=60.0)
    p.add_argument(
        "--base-rate",
        type=float,
        default=None,
        help="req/s (default: the burst keeps the max fleet at 3/4 of its target, by the "
        "calibrated cost, and the base is 1/burst-factor of that)",
    )
    p.add_argument("--burst-factor", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=16, help="tokens a request")
    p.add_argument("--prompt-words", type=int, default=24)
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=None, help="default: 4 fake, 2 real")
    p.add_argument("--target-concurrency", type=float, default=8.0)
    p.add_argument("--stable-window", type=float, default=None, help="default: 20 s, 10 quick")
    p.add_argument("--scale-down-delay", type=float, default=None, help="default: as stable")
    p.add_argument("--autoscale-interval", type=float, default=0.5)
    p.add_argument("--drain", type=float, default=5.0, help="drain deadline of a scale-down")
    p.add_argument("--sample-s", type=float, default=0.25)
    p.add_argument("--progress-s", type=float, default=10.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--calibration", type=json.loads, default=CALIBRATION,
                   help="JSON of the fake replicas' cost (default: CALIBRATION)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    real = args.model is not None
    if args.model == "smollm2":
        args.model = default_model()
    if args.quick:
        args.idle_s, args.burst_s, args.after_s = (15.0, 30.0, 20.0) if not real else (
            20.0, 30.0, 30.0
        )  # fmt: skip
    args.max_replicas = args.max_replicas or (2 if real else 4)
    # The burst keeps the max fleet at 3/4 of the target concurrency a replica (by the
    # calibrated cost); the base rate is a tenth of it.
    args.base_rate = args.base_rate or round(
        burst_rate(args.calibration, args.max_replicas, 0.75 * args.target_concurrency,
                   args.max_tokens) / args.burst_factor, 4
    )  # fmt: skip
    window = 10.0 if args.quick else 20.0
    args.stable_window = args.stable_window or window
    args.scale_down_delay = args.scale_down_delay or args.stable_window
    args.started = time.strftime("%Y%m%d-%H%M%S")
    args.out = args.out or ROOT / "bench-out" / f"autoscale-{args.started}"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.calibrate:
        calibrate(default_model() if args.calibrate == "smollm2" else args.calibrate)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    report = run_benchmark(args)
    (args.out / "summary.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "summary.md").write_text(markdown(report))
    plot(report, args.out / "timeline.png")
    print(markdown(report))
    print(f"autoscale: wrote {args.out}/summary.md, summary.json, timeline.png")


if __name__ == "__main__":
    main()

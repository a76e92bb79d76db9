"""Two live regions on loopback: a burst on region A, with the spill policy against a gateway
of region A that never leaves it (`--regional-policy local`), over the same replicas.

    flock /tmp/fleetserve-bench.lock .venv/bin/python benchmarks/regions_live.py
    .venv/bin/python benchmarks/regions_live.py --model PATH --repeats 5   # real replicas

Region B is `--delay-ms` away from A each way (a delaying TCP proxy between A's gateway and
B's). Each replica is a fake one (`fleetserve.testing.fake_replica`: a decode step costs
`--token-delay + --per-seq-delay x streams running`, an engine's batching) unless `--model`
gives a model for real ones (`fleetserve serve MODEL --num-threads 1`). Each gateway keeps at
most `--slots` requests in flight on its replica and queues the rest, so that its predicted
wait means something. Per repeat: a burst of `--burst` streamed chats of `--max-tokens`
tokens at once on the local-only gateway, then the same on the spilling one (the order
alternates between repeats), each after the replicas are idle again. It prints, per policy,
the medians over the repeats of the TTFT p50 and p99 the client saw, the requests spilled,
and the ratio spill / local of the TTFT p99 medians, with the load average and CPU flags.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from fleetserve.cpu import cpu_flags
from fleetserve.testing.launcher import ReplicaProcess, stop_process_group
from fleetserve.testing.regional_stack import TwoRegions, burst, percentile

OUT = "fleetserve:gateway_region_requests_total"
FLAGS = {"avx2", "avx512f", "avx512_bf16", "amx_tile", "avx512_vnni"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="real replicas of this model (default: fake)")
    p.add_argument("--token-delay", type=float, default=0.02, help="fake: seconds per step")
    p.add_argument("--per-seq-delay", type=float, default=0.004, help="fake: per stream/step")
    p.add_argument("--delay-ms", type=float, default=50.0, help="one way, between A and B")
    p.add_argument("--burst", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


class FakeReplicaProcess:
    def __init__(self, port: int, args: argparse.Namespace) -> None:
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "fleetserve.testing.fake_replica", "--port", str(port),
               "--token-delay", str(args.token_delay),
               "--per-seq-delay", str(args.per_seq_delay)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.DEVNULL)

    def wait_listening(self) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError("the fake replica did not start")

    def wait_ready(self, timeout: float) -> None:
        self.wait_listening()

    def stop(self) -> None:
        stop_process_group(self.proc, grace_s=5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    args = parse_args()
    folder = Path(tempfile.mkdtemp(prefix="regions-live-"))
    if args.model:
        extra = ["--num-threads", "1", "--max-model-len", "1024"]
        replicas = [ReplicaProcess(args.model, *extra, log_path=folder / f"r{x}.log") for x in "ab"]
        model = "model"
    else:
        replicas = [FakeReplicaProcess(_free_port(), args) for _ in "ab"]
        model = "fake"
    stack = None
    try:
        url_a, url_b = (r.wait_listening() for r in replicas)
        stack = TwoRegions(url_a, url_b, folder, delay_s=args.delay_ms / 1000, slots=args.slots,
                           peer_key="benchmark-peer-key-0123", operator_key="benchmark-operator",
                           env=dict(os.environ))  # fmt: skip
        for r in replicas:
            r.wait_ready(300)
        stack.wait_ready(120)
        if args.model:
            model = httpx.get(f"{url_a}/v1/models", timeout=5).json()["data"][0]["id"]
        for gw in (stack.a, stack.a_local):  # warm-up
            burst(gw.url, args.slots * 2, args.max_tokens, model)
        rows: dict[str, list[tuple[float, float, float]]] = {"local": [], "spill": []}
        for i in range(args.repeats):
            order = [("local", stack.a_local), ("spill", stack.a)]
            for name, gw in order if i % 2 == 0 else order[::-1]:
                before = gw.total(OUT, direction="out")
                answers = burst(gw.url, args.burst, args.max_tokens, model)
                lost = sum(1 for status, _, _ in answers if status != 200)
                if lost:
                    raise RuntimeError(f"{name}: {lost} requests failed: {answers}")
                ttfts = [t for _, t, _ in answers]
                spilled = gw.total(OUT, direction="out") - before
                rows[name].append((percentile(ttfts, 0.5), percentile(ttfts, 0.99), spilled))
                print(f"repeat {i} {name}: TTFT p50 {rows[name][-1][0]:.3f}s p99 "
                      f"{rows[name][-1][1]:.3f}s, spilled {spilled:.0f}", flush=True)  # fmt: skip
        kind = args.model or f"fake {args.token_delay}+{args.per_seq_delay}/seq"
        print(f"\nburst {args.burst} x {args.max_tokens} tokens, {args.slots} slots a replica, "
              f"B {args.delay_ms:.0f} ms away each way, {args.repeats} repeats (medians); "
              f"replicas: {kind}")  # fmt: skip
        medians = {}
        for name, values in rows.items():
            p50, p99, spilled = (statistics.median(v[k] for v in values) for k in range(3))
            medians[name] = p99
            print(f"  {name:6s} TTFT p50 {p50:.3f}s  p99 {p99:.3f}s  spilled {spilled:.0f}")
        print(f"  TTFT p99 spill / local: {medians['spill'] / medians['local']:.2f}")
        flags = sorted(set(cpu_flags().split()) & FLAGS)
        print(f"  load average {os.getloadavg()}, cpu flags: {' '.join(flags)}")
    except BaseException:
        if stack is not None:
            print(stack.logs(), file=sys.stderr)
        raise
    finally:
        if stack is not None:
            stack.stop()
        for r in replicas:
            r.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

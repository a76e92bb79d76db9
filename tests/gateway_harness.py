"""Servers for gateway tests: ASGI apps on free loopback ports, in threads of the test
process (uvicorn), or fake replicas in child processes (to SIGKILL)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not met within {timeout}s")


class ThreadServer:
    """An ASGI app served by uvicorn on its own event loop in a daemon thread."""

    def __init__(self, app, port: int = 0) -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.server.serve())

    def start(self) -> ThreadServer:
        self.thread.start()
        wait_until(lambda: self.server.started, what="server start")
        return self

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def call(self, fn, timeout: float = 10.0):
        """Run `fn()` on the server's loop (for state its tasks touch)."""

        async def run():
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class FakeProcess:
    """`python -m fleetserve.testing.fake_replica` in a child process of its own group."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fleetserve.testing.fake_replica",
                "--port",
                str(self.port),
                *args,
            ],
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> FakeProcess:
        def up():
            if self.proc.poll() is not None:
                raise RuntimeError("fake replica exited")
            try:
                return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout, 0.1, "fake replica start")
        return self

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def sse_texts(lines, chat: bool) -> tuple[str, list[dict]]:
    """Joined text and parsed chunks of an SSE body given as lines."""
    import json

    text, chunks = "", []
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        obj = json.loads(line[6:])
        chunks.append(obj)
        for c in obj.get("choices") or ():
            text += ((c.get("delta") or {}).get("content") or "") if chat else (c.get("text") or "")
    return text, chunks


# Gateway timings for tests against fake replicas in threads: fast probes, short stalls.
FAST_GATEWAY = {
    "probe_interval_s": 0.1,
    "probe_timeout_s": 2.0,
    "stall_timeout_s": 0.5,
    "first_chunk_timeout_s": 5.0,
    "retry_backoff_s": 0.01,
    "replica_wait_s": 3.0,
    "breaker_cooldown_s": 0.5,
    "router": "round_robin",
}

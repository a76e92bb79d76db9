"""Regional gateways on loopback, for the live test of many regions and its benchmark:
`fleetserve gateway` processes (`GatewayProcess`) over replicas that run already, and a
client that sends a burst of streamed chats and times each one's first token (`burst`)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fleetserve.testing.delay_proxy import DelayProxy
from fleetserve.testing.launcher import stop_process_group


class GatewayProcess:
    """`fleetserve gateway --replica URL --port PORT ARGS` in its own process group, its
    output in `log`. `env` should hold the peer key (and the operator key, for `total`)."""

    def __init__(
        self,
        port: int,
        replica: str,
        log: Path,
        *args: str,
        env: dict[str, str],
        operator_key: str,
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self._operator = {"Authorization": f"Bearer {operator_key}"}
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "fleetserve.cli", "gateway", "--replica", replica,
               "--port", str(port), *args]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=self._log, env=env, start_new_session=True
        )

    def wait_listening(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health/live", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the gateway did not listen within {timeout_s}s:\n{self.log()}")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def total(self, name: str, **labels: str) -> float:
        """Sum of the metric `name` over the series whose labels include `labels`."""
        text = httpx.get(f"{self.url}/metrics", headers=self._operator, timeout=5).text
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and set(labels.items()) <= set(s.labels.items())
        )

    def log(self) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])

    def stop(self) -> None:
        stop_process_group(self.proc, grace_s=10)
        self._log.close()


async def chat(
    client: httpx.AsyncClient, url: str, i: int, max_tokens: int, model: str
) -> tuple[int, float, str]:
    """(status, seconds to the first token, text) of one streamed chat completion."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"request {i} of the burst"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.monotonic()
    ttft, text = None, ""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            return resp.status_code, float("inf"), (await resp.aread()).decode()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return 502, float("inf"), line
            content = chunk["choices"][0]["delta"].get("content")
            if content:
                ttft = ttft if ttft is not None else time.monotonic() - start
                text += content
    return 200, ttft if ttft is not None else time.monotonic() - start, text


def burst(url: str, n: int, max_tokens: int, model: str = "llama") -> list[tuple[int, float, str]]:
    """`n` streamed chats sent at once; each one's (status, TTFT, text)."""

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(chat(client, url, i, max_tokens, model) for i in range(n))
            )

    return asyncio.run(run())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class TwoRegions:
    """Regions A and B on loopback over two running replicas: B's gateway, and two gateways
    of region A over A's replica (one with the spill policy, one `local`: the baseline),
    with B `delay_s` away from A each way through a `DelayProxy`. `stop()` ends them all."""

    def __init__(
        self,
        replica_a: str,
        replica_b: str,
        folder: Path,
        *,
        delay_s: float,
        slots: int,
        peer_key: str,
        operator_key: str,
        env: dict[str, str],
    ) -> None:
        self.started: list = []
        env = {**env, "FLEETSERVE_PEER_KEY": peer_key, "FLEETSERVE_OPERATOR_KEY": operator_key}
        common = ["--max-outstanding-per-replica", str(slots), "--probe-interval", "0.5",
                  "--peer-poll-interval", "0.2"]  # fmt: skip
        port_a, port_a_local, port_b = _free_ports(3)
        self.proxy = DelayProxy("127.0.0.1", port_b, delay_s).start()  # B as seen from A
        self.started.append(self.proxy)
        b_from_a = f"b=http://127.0.0.1:{self.proxy.port}@{2 * delay_s * 1000:.0f}"

        def gateway(port: int, replica: str, name: str, *args: str) -> GatewayProcess:
            gw = GatewayProcess(port, replica, folder / f"{name}.log", *common, *args,
                                env=env, operator_key=operator_key)  # fmt: skip
            self.started.append(gw)
            return gw

        self.b = gateway(port_b, replica_b, "gw-b", "--region", "b",
                         "--peer", f"a=http://127.0.0.1:{port_a}")  # fmt: skip
        self.a = gateway(port_a, replica_a, "gw-a", "--region", "a", "--peer", b_from_a)
        self.a_local = gateway(port_a_local, replica_a, "gw-a-local", "--region", "a",
                               "--peer", b_from_a, "--regional-policy", "local")  # fmt: skip

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Every gateway listens with a ready replica, and A's see B."""
        for gw in (self.a, self.a_local, self.b):
            gw.wait_listening(timeout_s)
            _wait(lambda gw=gw: gw.health()["status"] == "ok", timeout_s, "a replica ready")
        for gw in (self.a, self.a_local):
            peers = lambda gw=gw: gw.health()["regions"]["peers"]  # noqa: E731
            _wait(lambda peers=peers: peers()["b"]["can_serve"], timeout_s, "B seen from A")

    def logs(self) -> str:
        return "\n".join(
            f"--- {gw.log_path.name}\n{gw.log()}"
            for gw in self.started
            if isinstance(gw, GatewayProcess)
        )

    def stop(self) -> None:
        for item in reversed(self.started):
            item.stop()


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not within {timeout_s}s")

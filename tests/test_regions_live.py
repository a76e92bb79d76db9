"""Two regions on loopback (issue 16, "How it is checked"): regional gateways A and B, each
over one tiny-model replica, with a delaying TCP proxy between them (50 ms each way, so the
round trip A measures is real).

- A burst on A with the spill policy sends part of it to B (within the cap, and B counts
  what A sent), and the client-side TTFT p99 is lower than the same burst on a gateway of
  region A that never leaves it (`--regional-policy local`) over the same replica.
- A's replica killed: A's users are served by B, every request answered.

The gateways are `fleetserve gateway` processes; A's two gateways (spill, local) share A's
replica and are used one after the other."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from gateway_harness import free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

from fleetserve.testing.delay_proxy import DelayProxy
from fleetserve.testing.launcher import ReplicaProcess, stop_process_group

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PEER_KEY = "regions-live-peer-key"
OPERATOR_KEY = "regions-live-operator"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}
ENV = {**os.environ, "FLEETSERVE_PEER_KEY": PEER_KEY, "FLEETSERVE_OPERATOR_KEY": OPERATOR_KEY}
DELAY_S = 0.05  # one way, between the regions
BURST = 24
MAX_TOKENS = 96  # long enough that waiting behind the burst costs more than the round trip
SLOTS = 4  # requests in flight per replica: the rest wait in the gateway's queue


class GatewayProcess:
    def __init__(self, port: int, replica: str, log: Path, *args: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "fleetserve.cli", "gateway", "--replica", replica,
               "--port", str(port), "--max-outstanding-per-replica", str(SLOTS),
               "--probe-interval", "0.5", "--peer-poll-interval", "0.2", *args]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=self._log, env=ENV, start_new_session=True
        )

    def wait_listening(self) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, f"the gateway exited:\n{self.log()}"
            try:
                return httpx.get(f"{self.url}/health/live", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 60, 0.1, "the gateway listening")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def total(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=OPERATOR, timeout=5).text
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


async def _chat(client: httpx.AsyncClient, url: str, i: int) -> tuple[int, float, str]:
    """(status, seconds to the first token, text) of one streamed chat completion."""
    body = {
        "model": "llama",
        "messages": [{"role": "user", "content": f"request {i} of the burst"}],
        "max_tokens": MAX_TOKENS,
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
            assert "error" not in chunk, chunk
            content = chunk["choices"][0]["delta"].get("content")
            if content:
                ttft = ttft if ttft is not None else time.monotonic() - start
                text += content
    return 200, ttft if ttft is not None else time.monotonic() - start, text


def burst(url: str, n: int = BURST) -> list[tuple[int, float, str]]:
    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(_chat(client, url, i) for i in range(n)))

    return asyncio.run(run())


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@pytest.fixture(scope="module")
def regions(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("regions")
    started: list = []
    try:
        replica_args = ["--max-model-len", "512", "--kv-cache-memory", "32MiB",
                        "--num-threads", "1"]  # fmt: skip
        replica_a = ReplicaProcess(tiny_llama, *replica_args, log_path=folder / "ra.log")
        started.append(replica_a)
        replica_b = ReplicaProcess(tiny_llama, *replica_args, log_path=folder / "rb.log")
        started.append(replica_b)
        port_a, port_a_local, port_b = free_port(), free_port(), free_port()
        proxy = DelayProxy("127.0.0.1", port_b, DELAY_S).start()  # B as seen from A
        started.append(proxy)
        url_a, url_b = replica_a.wait_listening(), replica_b.wait_listening()
        b_from_a = f"b=http://127.0.0.1:{proxy.port}@{2 * DELAY_S * 1000:.0f}"
        a_from_b = f"a=http://127.0.0.1:{port_a}"
        gw_b = GatewayProcess(
            port_b, url_b, folder / "gw-b.log", "--region", "b", "--peer", a_from_b
        )
        started.append(gw_b)
        gw_a = GatewayProcess(port_a, url_a, folder / "gw-a.log",
                              "--region", "a", "--peer", b_from_a)  # fmt: skip
        started.append(gw_a)
        gw_a_local = GatewayProcess(port_a_local, url_a, folder / "gw-a-local.log",
                                    "--region", "a", "--peer", b_from_a,
                                    "--regional-policy", "local")  # fmt: skip
        started.append(gw_a_local)
        replica_a.wait_ready(120)
        replica_b.wait_ready(120)
        for gw in (gw_a, gw_a_local, gw_b):
            gw.wait_listening()
            wait_until(lambda gw=gw: gw.health()["status"] == "ok", 60, 0.1, "a replica ready")
        for gw in (gw_a, gw_a_local):
            wait_until(lambda gw=gw: gw.health()["regions"]["peers"]["b"]["healthy"], 30, 0.1,
                       "B polled from A")  # fmt: skip
        yield {"a": gw_a, "a_local": gw_a_local, "b": gw_b, "replica_a": replica_a,
               "proxy": proxy}  # fmt: skip
    except BaseException:
        for item in started:
            if isinstance(item, GatewayProcess):
                print(f"--- {item.log_path.name}\n{item.log()}")
        raise
    finally:
        for item in reversed(started):
            item.stop()


def test_a_burst_spills_to_the_other_region_and_its_ttft_p99_falls(regions):
    a, a_local, b = regions["a"], regions["a_local"], regions["b"]
    # the round trip A measured through the proxy: at least the two delays
    rtt_ms = a.health()["regions"]["peers"]["b"]["rtt_ms"]
    assert rtt_ms >= 2 * DELAY_S * 1000 * 0.9, rtt_ms

    # Warm-up: both replicas, both of A's gateways, the connections through the proxy.
    burst(a.url, 8)
    burst(a_local.url, 8)
    out_before = a.total("fleetserve:gateway_region_requests_total", direction="out", region="b")
    spill_before = a.total("fleetserve:gateway_region_decisions_total", reason="spill")
    local = burst(a_local.url)
    spilled = burst(a.url)
    assert [s for s, _, _ in local] == [200] * BURST, local
    assert [s for s, _, _ in spilled] == [200] * BURST, spilled
    assert all(len(text) > 0 for _, _, text in local + spilled)

    total_out = a.total("fleetserve:gateway_region_requests_total", direction="out", region="b")
    out = total_out - out_before
    into_b = b.total("fleetserve:gateway_region_requests_total", direction="in", region="a")
    decisions = {
        reason: a.total("fleetserve:gateway_region_decisions_total", reason=reason)
        for reason in ("local", "spill", "capped", "failover", "unavailable")
    }
    assert 0 < out <= BURST // 2 + 1, (out, decisions)  # the cap: half of A's, plus one
    assert into_b == total_out
    assert a_local.total("fleetserve:gateway_region_requests_total", direction="out") == 0
    spills = a.total("fleetserve:gateway_region_decisions_total", reason="spill") - spill_before
    assert spills == out

    local_p99 = p99([t for _, t, _ in local])
    spill_p99 = p99([t for _, t, _ in spilled])
    print(f"TTFT p99: local-only {local_p99:.3f}s, spill {spill_p99:.3f}s; spilled {out:.0f}")
    # Queueing dominates: half the burst waits behind half as many requests (the margin is
    # the round trip and B's own load, far below the halved queue).
    assert spill_p99 < local_p99, (spill_p99, local_p99)


def test_region_a_replicas_killed_its_users_are_served_by_b(regions):
    a, b = regions["a"], regions["b"]
    before = b.total("fleetserve:gateway_region_requests_total", direction="in", region="a")
    regions["replica_a"].proc.send_signal(signal.SIGKILL)
    regions["replica_a"].proc.wait(10)
    answers = burst(a.url, 8)  # at once, before A's probes have noticed
    assert [s for s, _, _ in answers] == [200] * 8, answers
    assert all(len(text) > 0 for _, _, text in answers)
    failover = a.total("fleetserve:gateway_region_requests_total", direction="out",
                       region="b", reason="failover")  # fmt: skip
    assert failover >= 1
    after = b.total("fleetserve:gateway_region_requests_total", direction="in", region="a")
    assert after - before >= 8  # every one of them was served by B
    wait_until(lambda: a.health()["status"] == "failing over to peer regions", 10, 0.1,
               "A's health saying so")  # fmt: skip
    answers = burst(a.url, 4)  # and after they noticed
    assert [s for s, _, _ in answers] == [200] * 4, answers

"""The elastic fleet end to end (issue 11, "How it is checked"): `fleetserve serve` with the
autoscaler on, as a child process in its own process group, over a tiny real model.

- From zero replicas, 20 concurrent requests are all answered 200 after the cold start, and
  the fleet scaled up to serve them.
- Load removed: the fleet returns to its minimum while 10 long greedy streams run; the
  replica that goes is drained by migration (short drain deadline), and every stream's text
  equals a run of the same prompts on a fleet that does not scale, and the fleet then stays
  at its minimum (a draining replica's stale /metrics load once scaled it straight back up).
- At zero replicas, a request whose deadline is shorter than the expected cold start gets
  503 with Retry-After, never a 404.
- SIGKILL of the replica being drained during a scale-down loses nothing (fake replicas
  under the same fleet code: their text is known exactly without a reference run).

Test deadlines allow for the policy raising its cooldowns to the measured cold start."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway_harness import free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

from fleetserve.testing.fake_replica import next_token
from fleetserve.testing.launcher import stop_process_group

OPERATOR_KEY = "autoscale-test-operator"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}
ENV = {**os.environ, "FLEETSERVE_OPERATOR_KEY": OPERATOR_KEY}


# ---- a fleet in a child process -------------------------------------------------------------


class FleetProcess:
    """`fleetserve serve MODEL ARGS` or `python -m fleetserve.testing.fake_fleet fake ARGS` in
    its own process group, its log in a file a failing test shows."""

    def __init__(self, cmd: list[str], log: Path, url: str | None = None) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._log, env=ENV, start_new_session=True
        )
        if url is None:  # the fake fleet prints its URL first
            line = self.proc.stdout.readline().decode()
            assert line.startswith("fleet: "), line
            url = line.split(" ", 1)[1].strip()
        self.url = url

    def replicas(self) -> list[dict]:
        assert self.proc.poll() is None, f"the fleet exited:\n{self.log()}"
        try:
            resp = httpx.get(f"{self.url}/admin/replicas", headers=OPERATOR, timeout=5)
        except httpx.HTTPError:
            return []
        return resp.json() if resp.status_code == 200 else []

    def states(self) -> list[str]:
        return sorted(r["state"] for r in self.replicas())

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """(sample name, sorted label items) -> value, from the gateway's /metrics."""
        text = httpx.get(f"{self.url}/metrics", headers=OPERATOR, timeout=5).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def total(self, name: str, **labels: str) -> float:
        """Sum of `name` over the series whose labels include `labels`."""
        return sum(
            value
            for (sample, items), value in self.metrics().items()
            if sample == name and set(labels.items()) <= set(items)
        )

    def log(self) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-60:])

    def stop(self) -> None:
        stop_process_group(self.proc, grace_s=30)
        self._log.close()


def serve_tiny(model: Path, tmp_path: Path, *args: str, context: int = 512) -> FleetProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "fleetserve.cli", "serve", str(model), "--port", str(port),
           "--max-model-len", str(context), "--kv-cache-memory", "32MiB", "--num-threads", "1",
           *args]  # fmt: skip
    return FleetProcess(cmd, tmp_path / "fleet.log", url=f"http://127.0.0.1:{port}")


def counts(fleet: FleetProcess) -> dict[str, int]:
    states = fleet.states()
    return {s: states.count(s) for s in set(states)}


# ---- clients ---------------------------------------------------------------------------------


async def _chat(client: httpx.AsyncClient, url: str, body: dict, progress=None, i=0):
    """(status, text, finish_reason) of one streamed chat completion."""
    text, finish = "", None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            return resp.status_code, (await resp.aread()).decode(), None
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                finish = choice.get("finish_reason") or finish
            if progress is not None:
                progress[i] += 1
    return 200, text, finish


def _body(i: int, max_tokens: int) -> dict:
    return {
        "model": "llama",
        "messages": [{"role": "user", "content": f"stream {i} goes on"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


# ---- tiny real model -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_from_zero_replicas_twenty_concurrent_requests_are_all_answered(tiny_llama, tmp_path):
    fleet = serve_tiny(
        tiny_llama, tmp_path,
        "--min-replicas", "0", "--max-replicas", "2", "--target-concurrency", "10",
        "--scale-to-zero-grace", "1", "--stable-window", "1", "--scale-down-delay", "1",
        "--autoscale-interval", "0.2",
    )  # fmt: skip
    try:
        wait_until(lambda: counts(fleet).get("ready") == 1, 90, 0.2, "the first replica ready")
        # Idle: it goes (the grace is raised to the measured cold start).
        wait_until(lambda: fleet.replicas() == [] and fleet.proc.poll() is None, 60, 0.2,
                   "zero replicas")  # fmt: skip
        assert fleet.total("fleetserve:gateway_replicas", state="ready") == 0
        ups_before = fleet.total("fleetserve:gateway_scale_events_total", direction="up")

        async def twenty():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(
                    *(_chat(client, fleet.url, _body(i, 16)) for i in range(20))
                )

        answers = asyncio.run(twenty())
        assert [status for status, _, _ in answers] == [200] * 20, answers
        assert all(finish == "length" and text for _, text, finish in answers)
        assert fleet.total("fleetserve:gateway_scale_events_total", direction="up") > ups_before
        assert fleet.total("fleetserve:gateway_cold_start_seconds_count") >= 2
    except BaseException:
        print(fleet.log())
        raise
    finally:
        fleet.stop()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_deadline_shorter_than_the_cold_start_gets_503_with_retry_after(tiny_llama, tmp_path):
    fleet = serve_tiny(
        tiny_llama, tmp_path,
        "--min-replicas", "0", "--max-replicas", "1", "--replicas", "0",
        "--cold-start-estimate", "60", "--autoscale-interval", "0.2",
    )  # fmt: skip
    try:
        wait_until(lambda: fleet.proc.poll() is None and _health(fleet.url) is not None, 30,
                   0.1, "the gateway listening")  # fmt: skip
        assert fleet.replicas() == []
        body = {**_body(0, 4), "stream": False}
        resp = httpx.post(
            f"{fleet.url}/v1/chat/completions",
            json=body,
            headers={"X-Request-Timeout": "2"},
            timeout=30,
        )
        assert resp.status_code == 503, resp.text
        assert float(resp.headers["Retry-After"]) > 0
        assert "error" in resp.json()
    except BaseException:
        print(fleet.log())
        raise
    finally:
        fleet.stop()


def _health(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code
    except httpx.HTTPError:
        return None


LONG = 12000  # tokens per stream: long enough to outlast a scale-down delay of a cold start


async def _hold(client: httpx.AsyncClient, url: str, stop: asyncio.Event, i: int) -> None:
    """A client that keeps one short request in flight until `stop`: load that holds the
    fleet at two replicas."""
    while not stop.is_set():
        status, text, _ = await _chat(client, url, _body(100 + i, 32))
        assert status == 200, text


@pytest.fixture(scope="module")
def scale_down_run(long_llama, tmp_path_factory) -> Iterator[dict]:
    """Two replicas at start (minimum one), held there by 24 clients of short requests
    (target 12 a replica). Ten long streams start, round robin puts five on each replica,
    then the short requests stop: ten streams want one replica, so the fleet shrinks while
    they run, and the short drain deadline moves the streams of the replica that goes. Then,
    once the fleet is at one replica, the same ten prompts again: the no-scaling run."""
    folder = tmp_path_factory.mktemp("scale-down")
    # A context of 16384, so that a stream outlasts the scale-down delay, which the policy
    # raises to the measured cold start (10-25 s here).
    model = long_llama
    fleet = serve_tiny(
        model, folder,
        "--router", "round_robin",
        "--replicas", "2", "--min-replicas", "1", "--max-replicas", "2",
        "--target-concurrency", "12", "--stable-window", "1", "--scale-down-delay", "1",
        "--autoscale-interval", "0.2", "--drain-timeout", "0.5",
        "--kv-cache-memory", "160MiB",  # 10 streams of 12k tokens, no preemption
        context=16384,
    )  # fmt: skip
    n = 10
    run: dict = {"n": n, "seen_at_minimum": None}
    try:
        wait_until(lambda: _health(fleet.url) is not None, 60, 0.1, "the gateway listening")

        def events(direction: str) -> float:
            return fleet.total("fleetserve:gateway_scale_events_total", direction=direction)

        async def scaled_run():
            progress = [0] * n
            stop_holding = asyncio.Event()
            async with httpx.AsyncClient(timeout=240) as client:
                hold = [
                    asyncio.create_task(_hold(client, fleet.url, stop_holding, i))
                    for i in range(24)
                ]
                while await asyncio.to_thread(counts, fleet) != {"ready": 2}:
                    for failed in [t for t in hold if t.done()]:
                        await failed  # raises what went wrong
                    await asyncio.sleep(0.1)
                tasks = [
                    asyncio.create_task(_chat(client, fleet.url, _body(i, LONG), progress, i))
                    for i in range(n)
                ]
                while min(progress) < 1:
                    await asyncio.sleep(0.05)
                stop_holding.set()
                await asyncio.gather(*hold)
                run["ups_before"], run["downs_before"] = events("up"), events("down")
                while not all(t.done() for t in tasks):
                    now = await asyncio.to_thread(counts, fleet)
                    if run["seen_at_minimum"] is None and now == {"ready": 1}:
                        run["seen_at_minimum"] = sum(not t.done() for t in tasks)
                    await asyncio.sleep(0.1)
                run["ups_during"] = events("up") - run["ups_before"]
                run["downs_during"] = events("down") - run["downs_before"]
                return [t.result() for t in tasks]

        run["scaled"] = asyncio.run(scaled_run())
        run["migrations"] = fleet.total("fleetserve:gateway_migrations_total")
        wait_until(lambda: counts(fleet) == {"ready": 1}, 90, 0.2, "one replica left")
        before = fleet.total("fleetserve:gateway_scale_events_total")

        async def reference():
            async with httpx.AsyncClient(timeout=240) as client:
                return await asyncio.gather(
                    *(_chat(client, fleet.url, _body(i, LONG)) for i in range(n))
                )

        run["unscaled"] = asyncio.run(reference())
        run["events_during_reference"] = (
            fleet.total("fleetserve:gateway_scale_events_total") - before
        )
        yield run
    except BaseException:
        print(fleet.log())
        raise
    finally:
        fleet.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scale_down_migrates_ten_long_streams_text_exactly(scale_down_run):
    run = scale_down_run
    assert all(status == 200 and finish == "length" for status, _, finish in run["scaled"])
    assert run["downs_during"] >= 1
    assert run["migrations"] >= 1  # the replica that went moved its streams
    assert run["events_during_reference"] == 0
    assert all(status == 200 and finish == "length" for status, _, finish in run["unscaled"])
    assert [text for _, text, _ in run["scaled"]] == [text for _, text, _ in run["unscaled"]]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_fleet_stays_at_its_minimum_while_the_ten_streams_finish(scale_down_run):
    run = scale_down_run
    assert run["ups_during"] == 0, "scaled up again after the load was removed"
    assert run["seen_at_minimum"] == run["n"], "not back at 1 replica while all 10 streams ran"


# ---- fake replicas: SIGKILL during a scale-down -----------------------------------------------


def _fake_text(prompt: str, max_tokens: int) -> str:
    seq = list(prompt.encode())
    for _ in range(max_tokens):
        seq.append(next_token(seq))
    return bytes(seq[len(prompt.encode()) :]).decode()


async def _completion_stream(client, url, prompt: str, max_tokens: int, progress, i):
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
    text, finish = "", None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    text += choice.get("text") or ""
                    finish = choice.get("finish_reason") or finish
                progress[i] += 1
    return text, finish


@pytest.mark.timeout(90)
def test_sigkill_of_the_replica_being_drained_loses_nothing(tmp_path):
    # A long drain deadline: the replica that goes keeps its streams until it is killed.
    fleet = FleetProcess(
        [sys.executable, "-m", "fleetserve.testing.fake_fleet", "fake",
         "--replicas", "2", "--min-replicas", "1", "--max-replicas", "2",
         "--target-concurrency", "16", "--stable-window", "0.5", "--scale-down-delay", "0.5",
         "--autoscale-interval", "0.1", "--drain", "60", "--token-delay", "0.05"],
        tmp_path / "fleet.log",
    )  # fmt: skip
    try:
        wait_until(lambda: counts(fleet).get("ready") == 2, 30, 0.1, "2 fake replicas ready")
        n, tokens = 8, 400
        prompts = [f"stream {i}:" for i in range(n)]
        progress = [0] * n
        killed = []

        async def streams():
            async with httpx.AsyncClient(timeout=120) as client:
                tasks = [
                    asyncio.create_task(
                        _completion_stream(client, fleet.url, p, tokens, progress, i)
                    )
                    for i, p in enumerate(prompts)
                ]
                deadline = time.monotonic() + 30
                while not killed and time.monotonic() < deadline:
                    replicas = await asyncio.to_thread(fleet.replicas)
                    draining = [r for r in replicas if r["state"] == "draining"]
                    if draining and draining[0]["outstanding"] > 0:
                        os.killpg(draining[0]["pid"], signal.SIGKILL)
                        killed.append(draining[0])
                    await asyncio.sleep(0.05)
                return await asyncio.gather(*tasks)

        answers = asyncio.run(streams())
        assert killed, "no replica was draining with streams"
        assert answers == [(_fake_text(p, tokens), "length") for p in prompts]
        assert fleet.total("fleetserve:gateway_migrations_total") >= 1
        wait_until(lambda: fleet.states() == ["ready"], 30, 0.1, "one replica left")
        assert [r["id"] for r in fleet.replicas()] != [killed[0]["id"]]
    except BaseException:
        print(fleet.log())
        raise
    finally:
        fleet.stop()

"""The supervisor grows and shrinks the fleet (issue 11, items 3 and 4): new replicas get new
ids and the old ones are untouched; a replica scaled down is drained (its streams finish
there) and, past the drain deadline, evicted (its streams continue elsewhere with the
token-exact migration); no accepted request ends in an error because of a scale-down; a
replica still loading is never the one removed; a draining replica is taken back when the
target grows again; states and events show in /admin/replicas and /metrics.

The replicas are in-process fake replicas (uvicorn threads) behind a real gateway, started
by a backend that can hold a replica "loading" until the test lets it be ready."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import httpx
import pytest
from gateway_harness import ThreadServer, sse_texts, wait_until

from fleetserve.fleet.backend import FleetBackend, ReplicaHandle
from fleetserve.fleet.backoff import RestartBackoff
from fleetserve.fleet.supervisor import Supervisor
from fleetserve.gateway.api_keys import with_operator_key
from fleetserve.gateway.app import create_app
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.gateway import Gateway
from fleetserve.testing.fake_replica import ByteTokenizer, FakeReplica, FakeSettings, next_token

OPERATOR = {"Authorization": "Bearer op"}
TOKEN_DELAY_S = 0.01


class InProcessBackend(FleetBackend):
    """Fake replicas on uvicorn threads. A replica whose index is in `hold` stays loading
    (not ready) until `let_ready(index)`."""

    name = "in-process"

    def __init__(self, hold: tuple[int, ...] = ()) -> None:
        self.hold = {i: threading.Event() for i in hold}
        self.starts: list[int] = []
        self.fakes: dict[int, FakeReplica] = {}

    def let_ready(self, index: int) -> None:
        self.hold[index].set()

    async def start(self, index: int) -> ReplicaHandle:
        self.starts.append(index)
        fake = FakeReplica(FakeSettings(token_delay_s=TOKEN_DELAY_S))
        self.fakes[index] = fake
        server = ThreadServer(fake.app())
        await asyncio.to_thread(server.start)
        return ReplicaHandle(index, server.url, None, server)

    async def wait_ready(self, handle: ReplicaHandle, timeout_s: float) -> bool:
        gate = self.hold.get(handle.index)
        while gate is not None and not gate.is_set():
            await asyncio.sleep(0.01)
        return True

    async def wait_exit(self, handle: ReplicaHandle) -> int | None:
        await asyncio.to_thread(handle.native.thread.join)
        return 0

    async def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        handle.native.server.should_exit = True


class Fleet:
    """A gateway on a thread, a supervisor on its loop, and helpers to drive both."""

    def __init__(self, backend: InProcessBackend, num: int, drain_timeout_s: float) -> None:
        config = GatewayConfig(
            router="round_robin", probe_interval_s=0.05, stall_timeout_s=5.0, retry_backoff_s=0.01
        )
        self.gw = Gateway(config, with_operator_key(None, "op"), tokenizer=ByteTokenizer())
        self.front = ThreadServer(create_app(self.gw)).start()
        self.backend = backend
        self.sup = Supervisor(
            backend,
            self.gw,
            num,
            stop_grace_s=5.0,
            drain_timeout_s=drain_timeout_s,
            backoff=lambda: RestartBackoff(0.01),
        )
        self.front.call(self.sup.start)

    def set_target(self, n: int, remove: tuple[str, ...] = ()) -> None:
        self.front.call(lambda: self.sup.set_target(n, remove))

    def states(self) -> dict[str, str]:
        replicas = httpx.get(f"{self.front.url}/admin/replicas", headers=OPERATOR).json()
        return {r["id"]: r["state"] for r in replicas}

    def wait_states(self, expected: dict[str, str], timeout: float = 20.0) -> None:
        wait_until(lambda: self.states() == expected, timeout, what=f"replicas {expected}")

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.front.url}/metrics", headers=OPERATOR).text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sup.stop(), self.front.loop).result(30)
        self.front.stop()


@pytest.fixture
def fleet_of() -> Callable[..., Fleet]:
    fleets: list[Fleet] = []

    def make(num: int, drain_timeout_s: float = 30.0, hold: tuple[int, ...] = ()) -> Fleet:
        fleets.append(Fleet(InProcessBackend(hold), num, drain_timeout_s))
        return fleets[-1]

    yield make
    for fleet in fleets:
        fleet.close()


def expected_text(prompt: str, max_tokens: int) -> str:
    """What any unscaled, uninterrupted run generates: the fake model is a pure function."""
    seq = list(prompt.encode())
    for _ in range(max_tokens):
        seq.append(next_token(seq))
    return bytes(seq[len(prompt.encode()) :]).decode()


class Streams:
    """`n` streamed completions in threads, each recording its events as they come."""

    def __init__(self, url: str, n: int, max_tokens: int) -> None:
        self.prompts = [f"story {i}:" for i in range(n)]
        self.max_tokens = max_tokens
        self.events = [0] * n
        self.lines: list[list[str]] = [[] for _ in range(n)]
        self.threads = [
            threading.Thread(target=self._run, args=(url, i), daemon=True) for i in range(n)
        ]
        for t in self.threads:
            t.start()

    def _run(self, url: str, i: int) -> None:
        body = {"prompt": self.prompts[i], "max_tokens": self.max_tokens, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                self.lines[i].append(line)
                self.events[i] += line.startswith("data: ")

    def under_way(self, events: int) -> bool:
        return min(self.events) >= events

    def check_all_complete_and_exact(self) -> None:
        for t in self.threads:
            t.join(60)
            assert not t.is_alive()
        for prompt, lines in zip(self.prompts, self.lines, strict=True):
            text, chunks = sse_texts(lines, chat=False)
            assert not [c for c in chunks if "error" in c], f"{prompt!r} ended with an error"
            assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert text == expected_text(prompt, self.max_tokens), prompt


def _drain_migrations(fleet: Fleet) -> float:
    return fleet.metric('fleetserve:gateway_migrations_total{reason="drain"}')


@pytest.mark.timeout(60)
def test_growing_starts_new_ids_and_leaves_the_running_ones_alone(fleet_of):
    fleet = fleet_of(1)
    fleet.wait_states({"r0": "ready"})
    r0 = fleet.gw.replicas["r0"]
    url = r0.url
    fleet.set_target(3)
    fleet.set_target(3)  # idempotent: nothing more starts
    fleet.wait_states({"r0": "ready", "r1": "ready", "r2": "ready"})
    assert fleet.backend.starts == [0, 1, 2]
    assert fleet.gw.replicas["r0"] is r0 and r0.url == url and not r0.draining
    assert fleet.metric('fleetserve:gateway_replicas{state="ready"}') == 3
    assert fleet.metric("fleetserve:gateway_desired_replicas") == 3
    assert fleet.metric('fleetserve:gateway_scale_events_total{direction="up",reason="start"}') == 1
    assert (
        fleet.metric('fleetserve:gateway_scale_events_total{direction="up",reason="manual"}') == 1
    )
    assert fleet.metric("fleetserve:gateway_cold_start_seconds_count") == 3


@pytest.mark.timeout(90)
def test_shrinking_drains_and_every_stream_completes_exactly(fleet_of):
    fleet = fleet_of(3)
    fleet.wait_states({"r0": "ready", "r1": "ready", "r2": "ready"})
    streams = Streams(fleet.front.url, 10, max_tokens=150)
    wait_until(lambda: streams.under_way(5), 20, what="streams under way")
    fleet.set_target(1)
    fleet.set_target(1)  # idempotent: the same two drains
    # Round robin put streams on every replica: the two drained ones keep theirs for now.
    states = fleet.states()
    assert states == {"r0": "ready", "r1": "draining", "r2": "draining"}
    assert fleet.metric('fleetserve:gateway_replicas{state="draining"}') == 2
    streams.check_all_complete_and_exact()
    fleet.wait_states({"r0": "ready"})
    assert _drain_migrations(fleet) == 0  # the drain deadline was never reached
    assert fleet.backend.fakes[1].aborted == 0 and fleet.backend.fakes[2].aborted == 0
    assert (
        fleet.metric('fleetserve:gateway_scale_events_total{direction="down",reason="manual"}') == 1
    )
    assert fleet.metric("fleetserve:gateway_desired_replicas") == 1
    # The fleet still serves, and a replica added later gets a new id.
    fleet.set_target(2)
    fleet.wait_states({"r0": "ready", "r3": "ready"})


@pytest.mark.timeout(60)
def test_a_replica_still_loading_is_never_the_one_removed(fleet_of):
    fleet = fleet_of(3, hold=(2,))
    fleet.wait_states({"r0": "ready", "r1": "ready", "r2": "loading"})
    assert fleet.metric('fleetserve:gateway_replicas{state="loading"}') == 1
    fleet.set_target(2)  # the newest *ready* one goes
    fleet.wait_states({"r0": "ready", "r2": "loading"})
    fleet.set_target(1, remove=("r2",))  # named, but loading: another goes instead
    fleet.wait_states({"r2": "loading"})
    fleet.backend.let_ready(2)
    fleet.wait_states({"r2": "ready"})
    assert fleet.backend.starts == [0, 1, 2]


@pytest.mark.timeout(90)
def test_streams_past_the_drain_deadline_migrate_token_exactly(fleet_of):
    fleet = fleet_of(3, drain_timeout_s=0.3)
    fleet.wait_states({"r0": "ready", "r1": "ready", "r2": "ready"})
    streams = Streams(fleet.front.url, 10, max_tokens=300)
    wait_until(lambda: streams.under_way(5), 20, what="streams under way")
    fleet.set_target(1)
    streams.check_all_complete_and_exact()
    assert _drain_migrations(fleet) >= 6  # the streams of r1 and r2 (round robin: 3 + 3)
    assert fleet.metric("fleetserve:gateway_migration_failures_total") == 0
    # Leaving at an event boundary is not the replica's failure.
    assert fleet.gw.replicas["r0"].breaker.state(fleet.gw.clock()).value == "closed"
    fleet.wait_states({"r0": "ready"})


@pytest.mark.timeout(60)
def test_growing_again_takes_a_draining_replica_back(fleet_of):
    fleet = fleet_of(2)
    fleet.wait_states({"r0": "ready", "r1": "ready"})
    streams = Streams(fleet.front.url, 4, max_tokens=200)
    wait_until(lambda: streams.under_way(5), 20, what="streams under way")
    assert fleet.gw.replicas["r0"].outstanding > 0  # so its drain lasts
    fleet.set_target(1, remove=("r0",))
    assert fleet.states() == {"r0": "draining", "r1": "ready"}
    fleet.set_target(2)
    assert fleet.states() == {"r0": "ready", "r1": "ready"}
    streams.check_all_complete_and_exact()
    assert fleet.backend.starts == [0, 1]  # no new replica, no restart
    assert fleet.states() == {"r0": "ready", "r1": "ready"}
    events = "fleetserve:gateway_scale_events_total"
    assert fleet.metric(f'{events}{{direction="down",reason="manual"}}') == 1
    assert fleet.metric(f'{events}{{direction="up",reason="manual"}}') == 1

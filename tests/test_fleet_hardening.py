"""The fleet's hardening (issue 9, finding 10): replicas start from a written config that
holds the internal key and never the public one; abbreviated flags are errors; a replica
that cannot start is retried, then given up on and reported, and the fleet exits naming the
cause when every replica did; SIGTERM lets the streams in flight finish."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import subprocess
import sys
import threading

import httpx
import pytest
import yaml
from gateway_harness import ThreadServer, free_port, sse_texts, wait_until

from fleetserve.cli import build_parser
from fleetserve.fleet.backend import FleetBackend, ReplicaHandle
from fleetserve.fleet.backoff import RestartBackoff
from fleetserve.fleet.replicated import ReplicaConfigs, replica_config
from fleetserve.fleet.supervisor import Supervisor, failure_cause
from fleetserve.gateway.api_keys import with_operator_key
from fleetserve.gateway.app import create_app
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.gateway import Gateway
from fleetserve.options import resolve_options
from fleetserve.testing.launcher import stop_process_group


def _serve_args(argv: list[str]):
    return build_parser(["serve", *argv]).parse_args(["serve", *argv])


# ---- the replicas' written config ----------------------------------------------------------------


def test_replicas_get_a_written_config_with_the_internal_key_only(tmp_path):
    serve_yaml = tmp_path / "serve.yaml"
    serve_yaml.write_text(
        "api-key: public-secret\nmax-num-seqs: 8\nkv-cache-memory: 64MiB\ndrain-timeout: 12\n"
    )
    args = _serve_args(
        ["m.gguf", "--config", str(serve_yaml), "--replicas", "3", "--host", "0.0.0.0",
         "--port", "9000", "--router", "round_robin", "--max-model-len", "256"]
    )  # fmt: skip
    configs = ReplicaConfigs({**resolve_options(args), "num_threads": 2}, "internal-key")
    try:
        path = configs.write(4321)
        assert stat.S_IMODE(configs.folder.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert "public-secret" not in path.read_text()
        written = yaml.safe_load(path.read_text())
        assert written["operator-key"] == "internal-key" and "api-key" not in written
        assert written["allow-client-priority"] is True
        assert (written["host"], written["port"]) == ("127.0.0.1", 4321)
        assert written["model"] == "m.gguf" and written["num-threads"] == 2
        assert written["max-num-seqs"] == 8 and written["max-model-len"] == 256
        assert written["kv-cache-memory"] == 64 * 2**20 and written["drain-timeout"] == 12
        assert not {"replicas", "router", "config", "gateway-config", "api-keys-file"} & set(
            written
        )
        # the replica reads it back as its whole configuration
        replica = resolve_options(_serve_args(["--config", str(path)]))
        assert replica["operator_key"] == "internal-key" and replica["port"] == 4321
        assert replica["api_key"] is None and replica["allow_client_priority"] is True
        assert replica["max_num_seqs"] == 8 and replica["model"] == "m.gguf"
    finally:
        configs.close()
    assert not configs.folder.exists()


def test_the_public_keys_never_reach_a_replica_config():
    options = {"operator_key": "public-op", "api_key": "public", "host": "::", "max_num_seqs": 4}
    assert replica_config(options, 1234, "internal") == {
        "max-num-seqs": 4,
        "host": "127.0.0.1",
        "port": 1234,
        "operator-key": "internal",
        "allow-client-priority": True,
    }


@pytest.mark.parametrize("flag", ["--api-ke", "--max-num-seq", "--drain"])
def test_abbreviated_flags_are_errors(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        _serve_args(["m.gguf", "--replicas", "2", flag, "1"])
    assert exc.value.code == 2 and flag in capsys.readouterr().err


# ---- the supervisor, over a scripted backend ---------------------------------------------------


class ScriptedBackend(FleetBackend):
    """Each start plays the next step: 'raise' (cannot launch), 'crash' (exits before it is
    ready), 'blip' (ready, then exits), 'up' (ready until stopped). Then 'crash' forever."""

    name = "scripted"

    def __init__(self, *steps: str) -> None:
        self.steps = list(steps)
        self.starts = 0
        self.stopped = asyncio.Event()

    async def start(self, index: int) -> ReplicaHandle:
        self.starts += 1
        step = self.steps.pop(0) if self.steps else "crash"
        if step == "raise":
            raise OSError("no free port")
        handle = ReplicaHandle(index, f"http://127.0.0.1:{9000 + self.starts}", self.starts, step)
        handle.output_tail.extend(
            ["INFO loading", "ValueError: the checkpoint has no layers", "INFO shutting down"]
        )
        return handle

    async def wait_ready(self, handle: ReplicaHandle, timeout_s: float) -> bool:
        return handle.native in ("blip", "up")

    async def wait_exit(self, handle: ReplicaHandle) -> int | None:
        if handle.native == "up":
            await self.stopped.wait()
        return 3

    async def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        self.stopped.set()


def _supervise(backend, num=1, max_failures=3, until=None) -> tuple[Supervisor, Gateway]:
    gw = Gateway(GatewayConfig())

    async def run() -> Supervisor:
        sup = Supervisor(
            backend, gw, num, max_failures=max_failures, backoff=lambda: RestartBackoff(0.001)
        )
        sup.start()
        async with asyncio.timeout(10):
            while not until(sup, gw):
                await asyncio.sleep(0.001)
        await sup.stop()
        return sup

    return asyncio.run(run()), gw


def test_a_start_that_raises_is_retried_and_logged(caplog):
    backend = ScriptedBackend("raise", "raise", "up")
    sup, gw = _supervise(backend, until=lambda s, gw: "r0" in gw.replicas)
    assert backend.starts == 3 and sup.restarts == 2 and not sup.failed
    assert gw.replicas["r0"].failed is None
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and "could not be started" in errors[0].getMessage()


def test_a_crash_loop_is_given_up_on_and_reported(caplog):
    backend = ScriptedBackend()
    sup, gw = _supervise(backend, num=1, until=lambda s, gw: s.all_failed.is_set())
    assert backend.starts == 3  # max_failures, then no more
    replica = gw.replicas["r0"]
    assert replica.state == "failed" and replica.down
    assert "ValueError: the checkpoint has no layers" in replica.failed
    assert "3 times in a row" in sup.failed[0]
    assert 'fleetserve:gateway_replica_failed{replica="r0"} 1.0' in gw.metrics.render().decode()
    assert any(r.levelno == logging.ERROR and "giving up" in r.getMessage() for r in caplog.records)


def test_a_replica_that_got_ready_starts_its_failure_count_again():
    backend = ScriptedBackend("crash", "crash", "blip", "crash", "crash", "up")
    sup, gw = _supervise(backend, until=lambda s, gw: backend.starts == 6 and gw.replicas)
    assert not sup.failed and gw.replicas["r0"].state != "failed"


def test_one_failed_replica_of_two_does_not_stop_the_fleet():
    backend = ScriptedBackend("up")  # r0 or r1 gets it; the other crash-loops
    sup, _ = _supervise(backend, num=2, until=lambda s, gw: len(s.failed) == 1)
    assert not sup.all_failed.is_set()


def test_failure_cause_picks_the_error_lines():
    lines = ["INFO a", "Traceback (most recent call last):", '  File "x.py"', "KeyError: 'w'"]
    assert failure_cause(lines + ["INFO shutting down"]) == "KeyError: 'w'"
    assert failure_cause(["just", "some", "lines", "here"]) == "some | lines | here"


def test_a_failed_replica_shows_in_admin_replicas_and_metrics():
    gw = Gateway(GatewayConfig(probe_interval_s=0.05), with_operator_key(None, "op"))
    front = ThreadServer(create_app(gw)).start()
    sup = Supervisor(ScriptedBackend(), gw, 2, max_failures=2, backoff=lambda: RestartBackoff(0.01))
    front.call(sup.start)
    try:
        wait_until(sup.all_failed.is_set, 10, what="both replicas failed")
        operator = {"Authorization": "Bearer op"}
        replicas = httpx.get(f"{front.url}/admin/replicas", headers=operator).json()
        assert [r["state"] for r in replicas] == ["failed", "failed"]
        assert "checkpoint has no layers" in replicas[0]["failure"]
        metrics = httpx.get(f"{front.url}/metrics", headers=operator).text
        assert 'fleetserve:gateway_replica_failed{replica="r1"} 1.0' in metrics
        assert httpx.get(f"{front.url}/health").status_code == 503
    finally:
        asyncio.run_coroutine_threadsafe(sup.stop(), front.loop).result(10)
        front.stop()


# ---- the fleet's serving code in a process of its own (signals, exit status) -------------------


def _fake_fleet(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetserve.testing.fake_fleet", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    first = proc.stdout.readline()
    assert first.startswith("fleet: "), first
    return proc, first.split(" ", 1)[1].strip()


@pytest.mark.timeout(60)
def test_the_fleet_exits_naming_the_cause_when_every_replica_fails():
    proc, _ = _fake_fleet("crash", "--replicas", "2", "--max-failures", "2")
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        stop_process_group(proc, grace_s=5)
    assert proc.returncode == 1
    assert "every replica failed to start" in err
    assert "model.gguf is truncated" in err.rsplit("fleet failed:", 1)[1]


@pytest.mark.timeout(90)
def test_a_stream_in_flight_at_sigterm_finishes():
    """The gateway used to cut streams 10 s after SIGTERM while replicas drain for 30 s:
    this one needs about 12 s more when the signal comes."""
    proc, url = _fake_fleet("fake", "--replicas", "2", "--token-delay", "0.04", "--drain", "30")
    result: dict = {}

    def client() -> None:
        body = {"prompt": "once", "max_tokens": 300, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
            lines = []
            for line in resp.iter_lines():
                lines.append(line)
                result["events"] = len(lines)
            result["text"], result["chunks"] = sse_texts(lines, chat=False)
            result["done"] = "data: [DONE]" in lines

    try:
        wait_until(lambda: _status(f"{url}/health") == 200, 30, 0.05, "fleet ready")
        thread = threading.Thread(target=client)
        thread.start()
        wait_until(lambda: result.get("events", 0) >= 10, 20, what="stream under way")
        os.kill(proc.pid, signal.SIGTERM)
        wait_until(lambda: _status(f"{url}/health") is None, 10, 0.05, "gateway closed")
        thread.join(60)
        assert result.get("done") and len(result["text"]) == 300
        assert result["chunks"][-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
    finally:
        stop_process_group(proc, grace_s=5)


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


# ---- the real command line, with a model that cannot load ---------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fleetserve_serve_replicas_exits_when_the_model_cannot_load(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetserve.cli", "--log-level", "WARNING",
         "serve", str(tmp_path / "missing-model"), "--replicas", "2",
         "--port", str(free_port()), "--replica-max-failures", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, err = proc.communicate(timeout=100)
    finally:
        stop_process_group(proc, grace_s=5)
    assert proc.returncode == 1
    summary = err.rsplit("fleetserve: every replica failed to start", 1)[1]
    assert "missing-model does not exist" in summary

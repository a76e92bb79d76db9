"""The engine door under attack, through a real replica: a request with out-of-range sampling
values gets a 400 and cannot disturb a stream running beside it; seeds at the edge of the
range work with n > 1 and leave nothing counted in flight; a hung engine core ends its
requests with an error and the server exits 1; a SIGKILLed server leaves no socket folder.
(The engine-level isolation of a failing request is in test_engine.py.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
from gateway_harness import wait_until
from test_server_api import assert_error, random_prompt, scrape
from test_server_lifecycle import StreamInThread, engine_core_pid

from fleetserve.engine import ipc_dir
from fleetserve.testing.launcher import ReplicaProcess

MODEL = "llama"
SERVER_ARGS = ("--dtype", "float32", "--num-threads", "1", "--kv-cache-memory", "64MiB")
LONG_GREEDY = {"temperature": 0, "max_tokens": 400, "ignore_eos": True, "return_token_ids": True}

# Each was accepted before and ends in a 400 naming the field now.
OUT_OF_RANGE = [
    ({"temperature": 1, "repetition_penalty": 1e-40, "max_tokens": 3}, "repetition_penalty"),
    ({"temperature": 1, "repetition_penalty": 1e6, "max_tokens": 3}, "repetition_penalty"),
    ({"temperature": 1e6, "max_tokens": 3}, "temperature"),
    ({"n": 3, "seed": 2**64, "max_tokens": 3}, "seed"),
    ({"min_tokens": 2**63, "max_tokens": None}, "min_tokens"),
]
# Legal but extreme: each must be answered and must not disturb its neighbours.
EXTREME_BUT_VALID = [
    {"temperature": 1e-5, "repetition_penalty": 0.01, "presence_penalty": -2,
     "frequency_penalty": -2, "top_p": 1e-9, "min_p": 1.0, "top_k": 10**6, "logprobs": 20},
    {"temperature": 100, "repetition_penalty": 10, "seed": 2**64 - 1, "n": 2},
    {"temperature": 0.003, "repetition_penalty": 0.01, "seed": -(2**63), "top_k": 1},
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("adversarial_engine") / "server.log"
    replica = ReplicaProcess(tiny_llama, *SERVER_ARGS, "--max-num-seqs", "8", log_path=log)
    try:
        replica.wait_ready(timeout=300)
        yield replica
    finally:
        assert replica.stop() == 0, replica.log()[-3000:]


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": MODEL, **body}, timeout=60)


def in_flight(url: str) -> float:
    return scrape(url)["fleetserve:num_requests_in_flight"]


def test_poison_values_get_400_and_a_stream_beside_them_is_token_exact(server):
    prompt = random_prompt(30, 12)
    alone = complete(server.url, prompt=prompt, **LONG_GREEDY)
    assert alone.status_code == 200, alone.text
    expected = alone.json()["choices"][0]["token_ids"]

    stream = StreamInThread(server.url, prompt=prompt, **_openai(LONG_GREEDY))
    assert stream.first.wait(30) and stream.error is None
    for body, param in OUT_OF_RANGE:
        r = complete(server.url, prompt="poison", **body)
        error = assert_error(r, 400, param)
        assert param in error["message"], error
    for body in EXTREME_BUT_VALID:
        r = complete(server.url, prompt=random_prompt(31, 8), max_tokens=24, **body)
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            assert choice["finish_reason"] in ("length", "stop"), choice
    stream.join()
    assert stream.error is None and stream.finish_reason == "length"
    assert stream.token_ids == expected


def test_seed_at_the_edge_of_its_range_with_n_3(server):
    body = {"prompt": "seeded", "n": 3, "max_tokens": 6, "temperature": 1.0}
    for seed in (2**64 - 1, 2**64 - 2, -(2**63)):
        first = complete(server.url, seed=seed, **body)
        assert first.status_code == 200, first.text
        again = complete(server.url, seed=seed, **body)
        assert [c["text"] for c in first.json()["choices"]] == [
            c["text"] for c in again.json()["choices"]
        ]
        assert len(first.json()["choices"]) == 3
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={**body, "seed": 2**64 - 1, "stream": True}
    ) as r:
        assert r.status_code == 200
        text = "".join(r.iter_text())
    assert text.endswith("data: [DONE]\n\n") and '"error"' not in text
    assert_error(complete(server.url, seed=2**64, **body), 400, "seed")
    wait_until(lambda: in_flight(server.url) == 0, what="nothing in flight")
    assert complete(server.url, prompt="after", max_tokens=2).status_code == 200


def test_hung_engine_core_fails_requests_and_the_server_exits_1(tiny_llama, tmp_path):
    replica = ReplicaProcess(
        tiny_llama, *SERVER_ARGS, "--health-timeout", "3", log_path=tmp_path / "hung.log"
    )
    core = None
    try:
        replica.wait_ready()
        core = engine_core_pid(replica)
        stream = StreamInThread(replica.url, prompt="hello", **_openai(LONG_GREEDY))
        assert stream.first.wait(30) and stream.error is None
        os.kill(core, signal.SIGSTOP)  # alive, but silent
        stream.join(60)
        assert stream.error is not None and stream.finish_reason is None
        assert replica.wait(60) == 1
        assert "silent for" in replica.log()
    finally:
        replica.stop()
        if core is not None:
            _kill(core)


def test_sigkilled_server_leaves_no_socket_folder(tiny_llama, tmp_path):
    # A short temp folder: ipc paths must fit in a socket address (~107 bytes).
    tmp = Path(tempfile.mkdtemp(prefix="fs-ipc-"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp / f"{ipc_dir.PREFIX}{dead.pid}-left"  # from a server killed with its core
    stale.mkdir()
    replica = ReplicaProcess(
        tiny_llama, *SERVER_ARGS, env={"TMPDIR": str(tmp)}, log_path=tmp_path / "kill.log"
    )
    core = None
    try:
        replica.wait_ready()
        assert not stale.exists()  # swept at start: its owner is gone
        core = engine_core_pid(replica)
        [own] = tmp.glob(f"{ipc_dir.PREFIX}{replica.proc.pid}-*")
        replica.proc.kill()
        replica.wait(30)
        # The orphaned core notices, removes the folder and exits.
        wait_until(lambda: not own.exists(), what="socket folder removed")
        wait_until(lambda: not ipc_dir.pid_alive(core) or _zombie(core), what="core gone")
    finally:
        replica.stop()
        if core is not None:
            _kill(core)
        shutil.rmtree(tmp, ignore_errors=True)


def test_sweep_removes_only_folders_of_dead_owners(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / f"{ipc_dir.PREFIX}{dead.pid}-abc"
    alive = tmp_path / f"{ipc_dir.PREFIX}{os.getpid()}-abc"
    other = tmp_path / f"{ipc_dir.PREFIX}notapid"
    for path in (gone, alive, other):
        path.mkdir()
    assert ipc_dir.sweep_stale(tmp_path) == [gone]
    assert alive.exists() and other.exists() and not gone.exists()


def _openai(body: dict) -> dict:
    """A plain body as `StreamInThread` kwargs (the SDK wants engine fields in extra_body)."""
    extra = {k: v for k, v in body.items() if k in ("ignore_eos", "return_token_ids")}
    plain = {k: v for k, v in body.items() if k not in extra}
    return {**plain, "extra_body": extra}


def _kill(pid: int) -> None:
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return False

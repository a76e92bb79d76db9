"""`fleetserve bench` end to end against a fake OpenAI-compatible streaming server.

The fake server counts one token per whitespace-separated word of the prompt (all message
contents for chat) and streams exactly `max_tokens` one-word chunks, then a usage chunk and
[DONE], so every count the bench reports can be checked exactly.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from fleetserve.bench.arrivals import arrival_times
from fleetserve.cli import main

READY_DEADLINE_S = 15.0


@dataclass
class FakeState:
    bodies: list[dict] = field(default_factory=list)
    fail_every: int = 0  # answer 503 to every n-th request (0: never)
    token_delay_s: float = 0.001


def _answer_word(i: int) -> str:
    return f"w{i}"


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def generate(request: Request, chat: bool):
        body = await request.json()
        state.bodies.append(body)
        if state.fail_every and len(state.bodies) % state.fail_every == 0:
            return JSONResponse({"error": {"message": "busy"}}, status_code=503)
        if chat:
            prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
        else:
            prompt_tokens = len(body["prompt"].split())
        n = body["max_tokens"]

        def chunk(text: str | None, finish: str | None = None) -> str:
            if chat:
                choice = {
                    "index": 0,
                    "delta": {"content": text} if text else {},
                    "finish_reason": finish,
                }
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
            return "data: " + json.dumps({"id": "x", "choices": [choice]}) + "\n\n"

        async def stream():
            if chat:
                yield chunk(None)  # role-only first chunk, as OpenAI sends: not a token
            for i in range(n):
                await asyncio.sleep(state.token_delay_s)
                yield chunk(_answer_word(i) + (" " if i < n - 1 else ""))
            yield chunk(None, "length")
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n,
                "total_tokens": prompt_tokens + n,
            }
            yield "data: " + json.dumps({"id": "x", "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    return app


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, FakeState]]:
    """A uvicorn server on a free port in a background thread; stopped at the end."""
    state = FakeState()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(make_app(state), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + READY_DEADLINE_S
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=1.0, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("fake server did not become ready")
            time.sleep(0.02)
        yield url, state
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "fake server did not stop"


@pytest.fixture
def server(fake: tuple[str, FakeState]) -> tuple[str, FakeState]:
    url, state = fake
    state.bodies.clear()
    state.fail_every = 0
    return url, state


def _bench(url: str, out: Path, *args: str) -> tuple[int, dict]:
    argv = ["bench", "--url", url, "--out", str(out), "--no-progress", "--seed", "1", *args]
    code = main(argv)
    report = json.loads((out / "bench.json").read_text()) if (out / "bench.json").exists() else {}
    return code, report


def test_random_chat_run(server, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    url, state = server
    code, report = _bench(
        url,
        tmp_path,
        "--model",
        "fake-model",
        "--num-requests",
        "12",
        "--concurrency",
        "4",
        "--input-len",
        "16",
        "--output-len",
        "5",
        "--ignore-eos",
        "--warmup",
        "2",
        "--slo-ttft",
        "60000",
    )
    assert code == 0
    s = report["summary"]
    assert s["requests"] == {"sent": 12, "completed": 12, "failed": 0}
    assert s["errors"] == {}
    assert s["total_output_tokens"] == 12 * 5
    assert s["total_input_tokens"] == 12 * 16
    assert s["usage"]["requests_without_usage"] == 0
    assert s["goodput"] == pytest.approx(s["request_throughput"])
    for r in report["requests"]:
        assert (r["prompt_tokens"], r["completion_tokens"], r["num_chunks"]) == (16, 5, 5)
        assert 0 < r["ttft_ms"] <= r["e2e_ms"]
        assert r["tpot_ms"] is not None
    # every request the server saw: 2 warmup + 12 measured, all streaming with usage
    assert len(state.bodies) == 14
    for body in state.bodies:
        assert body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True
        assert body["temperature"] == 0.0
        assert body["max_tokens"] == 5
        assert body["model"] == "fake-model"
    for name in (
        "summary.md",
        "ttft_cdf.png",
        "e2e_cdf.png",
        "output_throughput.png",
        "running_requests.png",
    ):
        assert (tmp_path / name).stat().st_size > 0
    printed = capsys.readouterr().out
    assert "output tokens/s" in printed and "12 / 12 / 0" in printed


def test_rate_schedule_on_completions(server, tmp_path: Path) -> None:
    url, state = server
    code, report = _bench(
        url,
        tmp_path,
        "--endpoint",
        "completions",
        "--rate",
        "400",
        "--num-requests",
        "15",
        "--input-len",
        "20",
        "--input-len-std",
        "6",
        "--output-len",
        "3",
    )
    assert code == 0
    assert report["config"]["model"] == "fake-model"  # found through /v1/models
    expected = arrival_times(400.0, 1.0, np.random.default_rng((1, 0)), count=15)
    requests = report["requests"]
    assert [r["scheduled_s"] for r in requests] == pytest.approx(expected)
    assert all(r["start_s"] >= r["scheduled_s"] for r in requests)
    assert len({r["input_len"] for r in requests}) > 3  # lengths vary
    for r in requests:
        assert r["prompt_tokens"] == r["input_len"]
        assert r["completion_tokens"] == 3
    assert "prompt" in state.bodies[0] and "ignore_eos" not in state.bodies[0]


def test_multi_turn_carries_the_answers(server, tmp_path: Path) -> None:
    url, state = server
    code, report = _bench(
        url,
        tmp_path,
        "--workload",
        "multi-turn",
        "--num-conversations",
        "3",
        "--turns",
        "3",
        "--concurrency",
        "2",
        "--input-len",
        "6",
        "--output-len",
        "4",
    )
    assert code == 0
    assert report["summary"]["requests"]["completed"] == 9
    answer = " ".join(_answer_word(i) for i in range(4))
    by_turn = {len(b["messages"]): b for b in state.bodies}
    assert sorted(len(b["messages"]) for b in state.bodies) == [1] * 3 + [3] * 3 + [5] * 3
    third = by_turn[5]["messages"]
    assert [m["role"] for m in third] == ["user", "assistant"] * 2 + ["user"]
    assert third[1]["content"] == answer and third[3]["content"] == answer
    for r in report["requests"]:
        assert r["prompt_tokens"] == 6 * (r["turn"] + 1) + 4 * r["turn"]
    sessions: dict[int, list[dict]] = {}
    for r in report["requests"]:
        sessions.setdefault(r["session"], []).append(r)
    for turns in sessions.values():
        turns.sort(key=lambda r: r["turn"])
        assert [r["turn"] for r in turns] == [0, 1, 2]
        for before, after in itertools.pairwise(turns):
            assert after["start_s"] >= before["end_s"]  # sent after the answer arrived


def test_shared_prefix_groups_share_the_system_prompt(server, tmp_path: Path) -> None:
    url, state = server
    code, report = _bench(
        url,
        tmp_path,
        "--workload",
        "shared-prefix",
        "--num-groups",
        "2",
        "--prefix-len",
        "30",
        "--num-requests",
        "6",
        "--input-len",
        "8",
        "--output-len",
        "2",
        "--model",
        "m",
        "--no-plots",
    )
    assert code == 0
    systems = [b["messages"][0]["content"] for b in state.bodies]
    assert len(set(systems)) == 2
    assert all(r["prompt_tokens"] == 38 for r in report["requests"])
    assert {r["group"] for r in report["requests"]} == {0, 1}
    assert not (tmp_path / "ttft_cdf.png").exists()


def test_http_errors_are_counted_by_kind(server, tmp_path: Path) -> None:
    url, state = server
    state.fail_every = 3
    code, report = _bench(
        url,
        tmp_path,
        "--model",
        "m",
        "--num-requests",
        "9",
        "--output-len",
        "2",
        "--input-len",
        "4",
    )
    assert code == 0
    s = report["summary"]
    assert s["requests"] == {"sent": 9, "completed": 6, "failed": 3}
    assert s["errors"] == {"http_503": 3}
    assert s["total_output_tokens"] == 12


def test_duration_bounded_closed_loop(server, tmp_path: Path) -> None:
    url, _ = server
    code, report = _bench(
        url,
        tmp_path,
        "--model",
        "m",
        "--duration",
        "0.3",
        "--concurrency",
        "2",
        "--output-len",
        "3",
        "--input-len",
        "4",
        "--no-plots",
    )
    assert code == 0
    requests = report["requests"]
    assert len(requests) >= 2
    assert all(r["start_s"] < 0.3 for r in requests)  # nothing starts after the duration
    assert report["summary"]["requests"]["failed"] == 0


def test_ramp_up_staggers_the_first_streams_of_a_closed_loop(server, tmp_path: Path) -> None:
    url, _ = server
    code, report = _bench(
        url,
        tmp_path,
        "--model",
        "m",
        "--num-requests",
        "8",
        "--concurrency",
        "4",
        "--ramp-up",
        "0.4",
        "--output-len",
        "2",
        "--input-len",
        "4",
        "--no-plots",
    )
    assert code == 0
    assert report["config"]["load"]["ramp_up_s"] == 0.4
    requests = report["requests"]
    assert report["summary"]["requests"] == {"sent": 8, "completed": 8, "failed": 0}
    for i in range(4):  # stream i starts no earlier than i * 0.4 / 4
        assert requests[i]["start_s"] >= i * 0.1 - 1e-6
    assert [r["start_s"] for r in requests[:4]] == sorted(r["start_s"] for r in requests[:4])


def test_unreachable_server_is_a_connection_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, report = _bench(
        f"http://127.0.0.1:{port}", tmp_path, "--model", "m", "--num-requests", "3", "--no-plots"
    )
    assert code == 1
    assert report["summary"]["errors"] == {"connection_error": 3}


@pytest.mark.parametrize(
    "args",
    [
        ["--model", "m"],  # no --url
        ["--url", "http://h:1", "--model", "m", "--workload", "multi-turn", "--num-requests", "5"],
        [
            "--url",
            "http://h:1",
            "--model",
            "m",
            "--workload",
            "sharegpt-like",
            "--range-ratio",
            "1",
        ],
        ["--url", "http://h:1", "--model", "m", "--duration", "5"],  # endless burst
        ["--url", "http://h:1", "--model", "m", "--extra-body", "[1]"],
        ["--url", "h:1", "--model", "m"],
        ["--url", "http://h:1", "--model", "m", "--ramp-up", "2"],  # no closed loop to ramp
        ["--url", "http://h:1", "--model", "m", "--concurrency", "2", "--ramp-up", "-1"],
    ],
)
def test_argument_mistakes_are_usage_errors(args: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err

"""Parsing of server-sent events by the bench client, on canned streams (no server)."""

from __future__ import annotations

import asyncio
import itertools
import json

import httpx

from fleetserve.bench.client import StreamingClient
from fleetserve.bench.config import TargetConfig
from fleetserve.bench.result import RequestResult


def _sse(*events: object) -> bytes:
    lines = []
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        lines.append(f"data: {data}\n\n")
    return "".join(lines).encode()


def _send(
    content: bytes, status: int = 200, endpoint: str = "chat", api_key: str | None = None
) -> tuple[RequestResult, httpx.Request]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, content=content)

    ticks = itertools.count()
    target = TargetConfig("http://fake/v1", "m", endpoint, api_key=api_key)

    async def go() -> RequestResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            client = StreamingClient(http, target, t0=0.0, clock=lambda: float(next(ticks)))
            result = RequestResult(0, 0, 0, 1, 4, 0.0)
            await client.send({"model": "m"}, result)
            return result

    return asyncio.run(go()), seen[0]


def _delta(text: str | None, finish: str | None = None, **extra: object) -> dict:
    delta = {"content": text} if text is not None else {}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def test_usage_on_the_finish_chunk_and_no_done() -> None:
    # transformers serve puts usage on the finish_reason chunk and may omit [DONE]
    usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    result, request = _send(
        _sse(_delta(""), _delta("a"), _delta("b"), _delta(None, "length", usage=usage)),
        api_key="k",
    )
    assert result.ok, result.error_detail
    assert result.text == "ab"
    assert (result.prompt_tokens, result.completion_tokens) == (7, 2)
    assert len(result.chunk_times_s) == 2  # empty and role-only chunks are not tokens
    assert result.start_s < result.chunk_times_s[0] < result.chunk_times_s[1] <= result.end_s
    assert str(request.url) == "http://fake/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer k"


def test_completions_text_and_reasoning_count_as_output() -> None:
    result, request = _send(
        _sse({"choices": [{"text": "x", "finish_reason": None}]}, "[DONE]"),
        endpoint="completions",
    )
    assert result.ok and result.text == "x" and result.completion_tokens is None
    assert str(request.url) == "http://fake/v1/completions"
    thinking, _ = _send(
        _sse({"choices": [{"delta": {"reasoning_content": "hm"}, "finish_reason": "stop"}]})
    )
    assert thinking.ok and thinking.text == "hm"


def test_error_kinds() -> None:
    busy, _ = _send(b'{"error": {"message": "slow down"}}', status=429)
    assert busy.error == "http_429" and "slow down" in busy.error_detail
    broken, _ = _send(_sse(_delta("a"), {"error": {"message": "oom"}}))
    assert broken.error == "stream_error" and "oom" in broken.error_detail
    cut, _ = _send(_sse(_delta("a")))
    assert cut.error == "incomplete_stream"
    empty, _ = _send(_sse(_delta(None, "stop"), "[DONE]"))
    assert empty.error == "empty_output"
    garbage, _ = _send(b"data: {not json\n\n")
    assert garbage.error == "bad_response"

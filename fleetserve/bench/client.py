"""Sending one streaming request and timing every server-sent-events chunk on the client.

Error kinds (the keys of the report's `errors`):

| kind | meaning |
|---|---|
| `http_<status>` | the server answered with that status instead of 200 |
| `timeout` | no complete answer within the request timeout (connect, read or pool) |
| `connection_error` | could not connect |
| `connection_lost` | the connection broke mid-stream |
| `stream_error` | the stream carried an `{"error": ...}` object |
| `bad_response` | a chunk that is not the JSON of an OpenAI stream |
| `incomplete_stream` | the stream ended with neither `[DONE]` nor a finish_reason |
| `empty_output` | the stream ended normally but carried no text |
| `http_error` | any other HTTP client error |
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx

from fleetserve.bench.config import TargetConfig
from fleetserve.bench.payload import ENDPOINT_PATHS
from fleetserve.bench.result import RequestResult

_DETAIL_CHARS = 300


def make_http_client(target: TargetConfig) -> httpx.AsyncClient:
    """One connection per request in flight (no pool limit, so no request waits for a
    connection), and no proxy from the environment: a benchmark measures the server."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(target.request_timeout_s),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        trust_env=False,
    )


def auth_headers(target: TargetConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}


def _chunk_text(choice: dict[str, Any]) -> str:
    """Text of one streamed choice: completions `text`, or chat `delta` content (reasoning
    models stream `reasoning_content` first, which counts as output too)."""
    if "text" in choice:
        return choice["text"] or ""
    delta = choice.get("delta") or {}
    return (
        (delta.get("content") or "")
        + (delta.get("reasoning_content") or "")
        + (delta.get("reasoning") or "")
    )


class StreamingClient:
    """Streams requests to one OpenAI-compatible server. `clock` returns seconds; `t0` is the
    benchmark start on that clock, so results hold times relative to it."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        target: TargetConfig,
        t0: float,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.http = http
        self.url = target.base_url + ENDPOINT_PATHS[target.endpoint]
        self.headers = auth_headers(target)
        self.t0 = t0
        self.clock = clock

    def now(self) -> float:
        return self.clock() - self.t0

    async def send(self, body: dict[str, Any], result: RequestResult) -> None:
        """Send `body`, filling `result` in place (times, text, usage, error). Never raises
        for an error of the server or the network; those become `result.error`."""
        result.start_s = self.now()
        try:
            await self._stream(body, result)
        except httpx.TimeoutException as exc:
            self._fail(result, "timeout", exc)
        except httpx.ConnectError as exc:
            self._fail(result, "connection_error", exc)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            self._fail(result, "connection_lost", exc)
        except httpx.HTTPError as exc:
            self._fail(result, "http_error", exc)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            self._fail(result, "bad_response", exc)
        finally:
            result.end_s = self.now()

    @staticmethod
    def _fail(result: RequestResult, kind: str, detail: object) -> None:
        result.error = kind
        result.error_detail = (f"{type(detail).__name__}: {detail}")[:_DETAIL_CHARS]

    async def _stream(self, body: dict[str, Any], result: RequestResult) -> None:
        parts: list[str] = []
        finished = False
        async with self.http.stream("POST", self.url, json=body, headers=self.headers) as resp:
            if resp.status_code != 200:
                await resp.aread()
                result.error = f"http_{resp.status_code}"
                result.error_detail = resp.text[:_DETAIL_CHARS]
                return
            async for line in resp.aiter_lines():
                now = self.now()
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event: lines
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    finished = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = "stream_error"
                    result.error_detail = json.dumps(chunk["error"])[:_DETAIL_CHARS]
                    return
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.completion_tokens = usage.get("completion_tokens")
                for choice in chunk.get("choices") or ():
                    text = _chunk_text(choice)
                    if text:
                        result.chunk_times_s.append(now)
                        parts.append(text)
                    if choice.get("finish_reason"):
                        finished = True
        result.text = "".join(parts)
        if not finished:
            result.error = "incomplete_stream"
        elif not result.chunk_times_s:
            result.error = "empty_output"

"""One HTTP call to a replica: open a streamed response and read its events with timeouts,
or make a plain request. Every failure becomes an `UpstreamError` that says whether another
replica may be tried."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx

from fleetserve.http.sse import iter_sse_data

MAX_ERROR_BODY = 64 * 1024


class UpstreamError(Exception):
    """`retryable`: the replica failed (not the request), so another one may succeed.
    `status`/`body`: the replica's own error response, passed on when not retryable."""

    def __init__(
        self, message: str, retryable: bool = True, status: int | None = None, body: bytes = b""
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.body = body
        self.reason = "stall" if isinstance(self, UpstreamStall) else "error"

    @property
    def busy(self) -> bool:
        """The replica refused for load (alive, not broken): a full queue (429), or a request
        that waited past the replica's own queue timeout (503 `queue_timeout`, a tensor
        replica's batcher)."""
        return self.status == 429 or (self.status == 503 and b'"queue_timeout"' in self.body)

    @property
    def replica_failed(self) -> bool:
        """Counts against the replica's circuit breaker: a retryable error, unless the
        replica is only busy."""
        return self.retryable and not self.busy


class UpstreamStall(UpstreamError):
    """No event within the timeout; the replica may be alive but stuck."""


# Answers that say the replica (not the request) failed: another replica may succeed, and
# they count against the replica's circuit breaker.
REPLICA_FAILURE_STATUSES = frozenset({408, 429, 502, 503, 504})


def is_retryable_status(status: int, body: bytes = b"") -> bool:
    """Whether an error answer is the replica's failure rather than the request's.

    4xx: the request's (not retried, neutral for the breaker). A 500 from a replica whose
    probes pass is taken to be the request's too (a body that trips a bug): retrying it
    would only spread it over the fleet and open every breaker; it is passed on as it is.
    A replica that is really broken fails its probes, which take it out. A dead engine
    (`engine_dead`, whatever its status) and 502/503/504, 408 and 429 are the replica's.
    """
    return status in REPLICA_FAILURE_STATUSES or (status >= 500 and b"engine_dead" in body)


class UpstreamStream:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._events: AsyncIterator[str] = iter_sse_data(response.aiter_lines())

    async def next_event(self, timeout_s: float) -> str | None:
        """The next event's data, or None at the end of the stream."""
        try:
            async with asyncio.timeout(timeout_s):
                return await anext(self._events)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise UpstreamStall(f"no event for {timeout_s:.1f}s") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"stream broke: {type(exc).__name__}: {exc}") from None

    async def aclose(self) -> None:
        # Closing a response that was not read to its end closes the connection, which is
        # how the replica learns to abort the request.
        await self.response.aclose()


async def open_stream(
    client: httpx.AsyncClient, url: str, body: dict, headers: dict[str, str], timeout_s: float
) -> UpstreamStream:
    request = client.build_request("POST", url, json=body, headers=headers)
    try:
        async with asyncio.timeout(timeout_s):
            response = await client.send(request, stream=True)
    except TimeoutError:
        raise UpstreamStall(f"no response headers within {timeout_s:.1f}s") from None
    except httpx.HTTPError as exc:
        raise UpstreamError(f"{type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        try:
            content = await _read_limited(response)
        finally:
            await response.aclose()
        raise UpstreamError(
            f"replica answered {response.status_code}",
            retryable=is_retryable_status(response.status_code, content),
            status=response.status_code,
            body=content,
        )
    return UpstreamStream(response)


async def post_json(
    client: httpx.AsyncClient, url: str, body: dict, headers: dict[str, str], timeout_s: float
) -> httpx.Response:
    """A non-streamed call; returns 2xx and non-retryable answers, raises otherwise."""
    content = json.dumps(body).encode()
    json_headers = {"Content-Type": "application/json", **headers}
    return await send_raw(client, "POST", url, content, json_headers, timeout_s)


async def send_raw(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    content: bytes,
    headers: dict[str, str],
    timeout_s: float,
) -> httpx.Response:
    """One non-streamed call with any method and body; returns 2xx and non-retryable
    answers, raises `UpstreamError` otherwise."""
    try:
        async with asyncio.timeout(timeout_s):
            response = await client.request(method, url, content=content, headers=headers)
    except TimeoutError:
        raise UpstreamStall(f"no answer within {timeout_s:.1f}s") from None
    except httpx.HTTPError as exc:
        raise UpstreamError(f"{type(exc).__name__}: {exc}") from None
    if response.status_code != 200 and is_retryable_status(
        response.status_code, response.content[:MAX_ERROR_BODY]
    ):
        raise UpstreamError(
            f"replica answered {response.status_code}",
            status=response.status_code,
            body=response.content[:MAX_ERROR_BODY],
        )
    return response


async def _read_limited(response: httpx.Response) -> bytes:
    out = bytearray()
    async for chunk in response.aiter_bytes():
        out += chunk
        if len(out) >= MAX_ERROR_BODY:
            break
    return bytes(out[:MAX_ERROR_BODY])


def stream_error(err: dict) -> UpstreamError:
    """An error event a replica sent in its stream. A dead engine is the replica's failure
    (retry, migrate); anything else is the request's own (a sampling failure, a bug that this
    body trips): passed on to the client as a 500, not retried, neutral for the breaker."""
    message = f"the replica sent an error: {err.get('message', err)}"
    if err.get("code") == "engine_dead":
        return UpstreamError(message)
    return UpstreamError(message, False, 500, json.dumps({"error": err}).encode())


def error_payload(data: str) -> dict | None:
    """The error object of an in-stream error event, if `data` is one."""
    if '"error"' not in data:
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    if isinstance(obj, dict) and "error" in obj and not obj.get("choices"):
        return obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
    return None

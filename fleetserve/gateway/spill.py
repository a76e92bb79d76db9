"""A request sent to a peer region's gateway: the client's JSON body as this gateway read it,
the peer's answer passed back as it comes (a stream stays a stream), with the peer key and a
header naming this region so that the peer serves it itself (it is never spilled again).

Nothing is lost to a peer that fails before the first byte (no answer, a refusal for load,
an error status, a stream that ends before its first chunk): `spill` returns None and the
caller serves the request locally. Errors that are the request's own (400, 404, 413, 422)
are passed on as the peer gave them: a local replica would say the same. A stream that
breaks after its first byte ends with an error event, as a local stream that cannot migrate.

Admission and the client's key were checked here, at the origin; the peer trusts the peer
key, and takes the key's priority class from a header only when it comes with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import anyio
import httpx
from fastapi import Request
from fastapi.responses import Response

from fleetserve.gateway.context import RequestContext
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.peers import Peer
from fleetserve.gateway.regional_config import (
    PRIORITY_HEADER,
    SPILL_REASON_HEADER,
    SPILLED_FROM_HEADER,
)
from fleetserve.http.disconnect import ClientDisconnected, unless_disconnected
from fleetserve.http.errors import error_body
from fleetserve.http.responses import ClosingStreamingResponse
from fleetserve.http.sse import DONE_EVENT, encode_event

logger = logging.getLogger(__name__)

# A peer's answers that are the request's own fault: passed on, not served locally again.
REQUEST_ERRORS = frozenset({400, 404, 413, 422})
MAX_ERROR_BYTES = 64 * 1024  # a refusal's body; a longer one is replaced by this gateway's
PASSED_BACK = ("content-type", "retry-after")


def _headers(gw: Gateway, ctx: RequestContext, reason: str) -> dict[str, str]:
    regions = gw.regions
    headers = {
        **regions.peer_headers,
        SPILLED_FROM_HEADER: regions.name,
        SPILL_REASON_HEADER: reason,
        PRIORITY_HEADER: ctx.key.priority,
        "X-Request-Id": ctx.request_id,
        "Content-Type": "application/json",
    }
    remaining = ctx.remaining(gw.clock())
    if remaining is not None:
        headers["X-Request-Timeout"] = f"{max(remaining, 0.001):.3f}"
    return headers


async def spill(
    gw: Gateway,
    ctx: RequestContext,
    request: Request,
    peer: Peer,
    reason: str,
) -> Response | None:
    """Serve `ctx` through `peer`; None when the peer failed before the first byte (serve it
    locally). The request holds its key's admission: released here when the peer answers."""
    content = json.dumps(ctx.body).encode()
    headers = _headers(gw, ctx, reason)
    url = f"{peer.url}{ctx.endpoint}"
    remaining = ctx.remaining(gw.clock())
    limit = gw.config.first_chunk_timeout_s if ctx.stream else gw.config.unary_timeout_s
    timeout = limit if remaining is None else max(min(limit, remaining), 0.001)
    peer.sent(ctx.route)
    gw.metrics.region_requests.labels(peer.name, "out", reason).inc()
    upstream: httpx.Response | None = None
    try:
        try:
            async with asyncio.timeout(timeout):
                built = gw.client.build_request("POST", url, content=content, headers=headers)
                upstream = await unless_disconnected(
                    request, gw.client.send(built, stream=ctx.stream)
                )
                if ctx.stream and upstream.status_code == 200:
                    chunks = upstream.aiter_raw()
                    first = await unless_disconnected(request, anext(chunks))
        except ClientDisconnected:
            raise
        except (TimeoutError, httpx.HTTPError, StopAsyncIteration) as exc:
            why = "no first byte in time" if isinstance(exc, TimeoutError) else repr(exc)
            return await _fall_back(gw, ctx, peer, upstream, why)
        status = upstream.status_code
        if status != 200 and status not in REQUEST_ERRORS:
            return await _fall_back(gw, ctx, peer, upstream, f"it answered {status}")
    except ClientDisconnected:
        if upstream is not None:
            await upstream.aclose()
        peer.done()
        gw.account(ctx, "499", 0)
        gw.metrics.disconnects.inc()
        return Response(status_code=499)
    passed = {k: v for k, v in upstream.headers.items() if k.lower() in PASSED_BACK}
    passed["X-Request-Id"] = ctx.request_id
    if not ctx.stream or status != 200:
        body = await _refusal_body(upstream, peer, timeout) if ctx.stream else upstream.content
        await upstream.aclose()
        peer.done()
        gw.account(ctx, str(status), await usage_tokens(body) if status == 200 else 0)
        return Response(body, status, headers=passed)
    gw.metrics.ttft.observe(gw.clock() - ctx.arrival)
    closed = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal closed
        status = "200"
        try:
            yield first
            while True:
                try:
                    async with asyncio.timeout(gw.config.stall_timeout_s):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except (TimeoutError, httpx.HTTPError) as exc:
                    logger.warning(
                        "request %s: the stream from peer %s broke: %r",
                        ctx.request_id,
                        peer.name,
                        exc,
                    )
                    status = "502"
                    message = f"the stream from region {peer.name} broke"
                    yield encode_event(error_body(message, "upstream_error", code=502))
                    yield DONE_EVENT
                    break
                yield chunk
        finally:
            with anyio.CancelScope(shield=True):
                closed = True
                await _close_stream(gw, ctx, peer, upstream, status)

    async def on_close() -> None:
        if not closed:  # the client left before the body started
            await _close_stream(gw, ctx, peer, upstream, "499")

    return ClosingStreamingResponse(
        body(), on_close=on_close, media_type="text/event-stream", headers=passed
    )


async def _close_stream(
    gw: Gateway,
    ctx: RequestContext,
    peer: Peer,
    upstream: httpx.Response,
    status: str,
) -> None:
    await upstream.aclose()
    peer.done()
    gw.account(ctx, status, None)


async def _fall_back(
    gw: Gateway, ctx: RequestContext, peer: Peer, upstream: httpx.Response | None, why: str
) -> None:
    if upstream is not None:
        await upstream.aclose()
    peer.done()
    peer.poll_failed(f"a spilled request failed: {why}")
    gw.metrics.region_fallbacks.labels(peer.name).inc()
    logger.info(
        "request %s: region %s failed before the first byte (%s); served here",
        ctx.request_id,
        peer.name,
        why,
    )
    return None


async def _refusal_body(upstream: httpx.Response, peer: Peer, timeout: float) -> bytes:
    """The body of a peer's refusal of a stream (400, 404, 413, 422), read within
    `timeout` and up to MAX_ERROR_BYTES; past either, this gateway's own error body."""
    data = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in upstream.aiter_raw():
                data += chunk
                if len(data) > MAX_ERROR_BYTES:
                    break
        if len(data) <= MAX_ERROR_BYTES:
            return bytes(data)
    except (TimeoutError, httpx.HTTPError):
        pass
    message = f"region {peer.name} refused the request ({upstream.status_code})"
    return json.dumps(error_body(message, "invalid_request_error")).encode()


def _usage_tokens(body: bytes) -> int | None:
    try:
        return int(json.loads(body)["usage"]["total_tokens"])
    except (ValueError, KeyError, TypeError):
        return None


async def usage_tokens(body: bytes) -> int | None:
    """`usage.total_tokens` of an answer's JSON body; None if it has none. A large body
    (many choices, echoed logprobs) is parsed off the event loop."""
    if len(body) > 2**20:
        return await asyncio.to_thread(_usage_tokens, body)
    return _usage_tokens(body)

"""The path of one generation request through the gateway:

authenticate ─▶ parse ─▶ tokenize (for routing) ─▶ admit (key limits) ─▶ acquire a replica
(queue) ─▶ stream (`StreamSession`) or unary call, with retries ─▶ release.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fleetserve.gateway.api_keys import ANONYMOUS, ApiKey
from fleetserve.gateway.context import RequestContext
from fleetserve.gateway.continuation import max_tokens_of
from fleetserve.gateway.gateway import DeadlineExceeded, Gateway, NoReplica, Outcome, Shed
from fleetserve.gateway.replica import Replica
from fleetserve.gateway.route_request import RouteRequest
from fleetserve.gateway.sse import error_body
from fleetserve.gateway.stream import StreamSession, failure_status
from fleetserve.gateway.tokenizer import estimate_prompt_tokens
from fleetserve.gateway.upstream import UpstreamError, post_json

logger = logging.getLogger(__name__)


class HttpError(Exception):
    def __init__(
        self, status: int, message: str, err_type: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.headers = headers or {}

    def response(self, request_id: str | None = None) -> JSONResponse:
        headers = dict(self.headers)
        if request_id:
            headers["X-Request-Id"] = request_id
        return JSONResponse(
            error_body(str(self), self.err_type, self.status), self.status, headers=headers
        )


def too_many(reason: str, retry_after_s: float) -> HttpError:
    seconds = max(1, math.ceil(retry_after_s)) if math.isfinite(retry_after_s) else 60
    return HttpError(
        429,
        f"rate limited ({reason}); retry after {seconds}s",
        "rate_limit_exceeded",
        {"Retry-After": str(seconds)},
    )


def authenticate(gw: Gateway, request: Request, admin: bool = False) -> ApiKey:
    if gw.api_keys is None:
        return ANONYMOUS
    auth = request.headers.get("authorization", "")
    presented = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    key = gw.api_keys.lookup(presented) if presented else None
    if key is None:
        raise HttpError(
            401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error"
        )
    if admin and not key.admin:
        raise HttpError(403, "this key may not call admin endpoints", "permission_error")
    return key


def parse_deadline(request: Request, gw: Gateway, now: float) -> float | None:
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        default = gw.config.default_request_timeout_s
        return None if default is None else now + default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not (seconds > 0 and math.isfinite(seconds)):
        raise HttpError(
            400, "X-Request-Timeout must be a positive number of seconds", "invalid_request_error"
        )
    return now + seconds


async def build_context(gw: Gateway, request: Request, endpoint: str, chat: bool) -> RequestContext:
    now = gw.clock()
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    key = authenticate(gw, request)
    deadline = parse_deadline(request, gw, now)
    try:
        body = await request.json()
    except ValueError:
        raise HttpError(400, "the body must be a JSON object", "invalid_request_error") from None
    if not isinstance(body, dict):
        raise HttpError(400, "the body must be a JSON object", "invalid_request_error")
    routable = gw.prompts is not None and endpoint != "/v1/embeddings"
    ids = gw.prompts.prompt_ids(body, chat) if routable else None
    num_prompt = len(ids) if ids is not None else estimate_prompt_tokens(body, chat)
    try:
        max_tokens = max_tokens_of(body, chat)
        n = int(body.get("n") or 1)
    except (TypeError, ValueError):
        raise HttpError(400, "max_tokens and n must be integers", "invalid_request_error") from None
    if max_tokens is None:
        max_tokens = gw.config.default_max_tokens
    route = RouteRequest(
        request_id=request_id,
        prompt_token_ids=tuple(ids) if ids is not None else None,
        num_prompt_tokens=num_prompt,
        max_tokens=max_tokens,
        priority_rank=key.priority_rank,
    )
    return RequestContext(
        endpoint=endpoint,
        chat=chat,
        body=body,
        request_id=request_id,
        key=key,
        route=route,
        arrival=now,
        deadline=deadline,
        charged_tokens=num_prompt + max(max_tokens, 0) * max(n, 1),
    )


async def handle_generate(gw: Gateway, request: Request, endpoint: str, chat: bool) -> Response:
    request_id = request.headers.get("x-request-id")
    try:
        ctx = await build_context(gw, request, endpoint, chat)
    except HttpError as err:
        gw.metrics.requests.labels(endpoint, str(err.status)).inc()
        return err.response(request_id)
    decision = gw.admission.admit(ctx.key, ctx.charged_tokens, ctx.arrival)
    if not decision.admitted:
        gw.metrics.shed.labels(decision.reason).inc()
        gw.metrics.requests.labels(endpoint, "429").inc()
        if decision.reason == "too_large":
            err = HttpError(
                429,
                "the request needs more tokens than the key's tokens_per_min",
                "rate_limit_exceeded",
            )
        else:
            err = too_many(decision.reason, decision.retry_after_s)
        return err.response(ctx.request_id)
    if ctx.stream:
        return await _stream(gw, ctx)
    return await _unary(gw, ctx, request)


async def _stream(gw: Gateway, ctx: RequestContext) -> Response:
    session = StreamSession(gw, ctx)
    try:
        first = await session.open()
    except (Shed, NoReplica, DeadlineExceeded, UpstreamError) as exc:
        return _failure_response(gw, ctx, exc)
    return StreamingResponse(
        session.body(first),
        media_type="text/event-stream",
        headers={"X-Request-Id": ctx.request_id, "Cache-Control": "no-cache"},
    )


def _failure_response(
    gw: Gateway, ctx: RequestContext, exc: Shed | NoReplica | DeadlineExceeded | UpstreamError
) -> Response:
    if isinstance(exc, Shed):
        gw.metrics.shed.labels(exc.reason).inc()
        return too_many(exc.reason, exc.retry_after_s).response(ctx.request_id)
    if isinstance(exc, NoReplica):
        return HttpError(
            503, f"no replica available: {exc}", "service_unavailable", {"Retry-After": "1"}
        ).response(ctx.request_id)
    if isinstance(exc, DeadlineExceeded):
        return HttpError(504, f"the request's deadline passed ({exc})", "timeout").response(
            ctx.request_id
        )
    if exc.status is not None and not exc.retryable:  # the replica's verdict on the request
        return Response(
            exc.body,
            exc.status,
            media_type="application/json",
            headers={"X-Request-Id": ctx.request_id},
        )
    return HttpError(502, f"every replica tried failed; last: {exc}", "upstream_error").response(
        ctx.request_id
    )


class _ClientGone(Exception):
    pass


async def _unary(gw: Gateway, ctx: RequestContext, request: Request) -> Response:
    """A non-streamed request: retried whole on another replica while it fails (nothing was
    sent to the client yet, and greedy answers do not change)."""
    status, used = "502", None
    replica: Replica | None = None
    retries = 0
    try:
        replica = await gw.acquire(ctx.route, ctx.deadline)
        while True:
            started = gw.clock()
            remaining = ctx.remaining(started)
            timeout = gw.config.unary_timeout_s if remaining is None else max(remaining, 0.001)
            call = post_json(
                gw.client,
                f"{replica.url}{ctx.endpoint}",
                ctx.body,
                ctx.upstream_headers(retries),
                timeout,
            )
            try:
                resp = await _unless_disconnected(request, call)
            except UpstreamError as exc:
                gw.release(replica, Outcome.FAILURE, None, ctx.request_id)
                ctx.exclude.add(replica.id)
                replica = None
                remaining = ctx.remaining(gw.clock())
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded(str(exc)) from exc
                if retries >= gw.config.max_retries:
                    raise
                retries += 1
                gw.metrics.retries.labels(exc.reason).inc()
                await asyncio.sleep(gw.config.backoff(retries))
                replica = await gw.route_now(ctx.route_request(), ctx.deadline)
                continue
            outcome = Outcome.SUCCESS if resp.status_code == 200 else Outcome.NEUTRAL
            gw.release(replica, outcome, gw.clock() - started, ctx.request_id)
            replica = None
            status, used = str(resp.status_code), _usage_tokens(resp)
            return Response(
                resp.content,
                resp.status_code,
                media_type="application/json",
                headers={"X-Request-Id": ctx.request_id},
            )
    except _ClientGone:
        status = "499"
        gw.metrics.disconnects.inc()
        return Response(status_code=499)
    except (Shed, NoReplica, DeadlineExceeded, UpstreamError) as exc:
        status = failure_status(exc)
        return _failure_response(gw, ctx, exc)
    finally:
        if replica is not None:
            gw.release(replica, Outcome.NEUTRAL, None, ctx.request_id)
        now = gw.clock()
        gw.admission.release(ctx.key, ctx.charged_tokens, used, now)
        gw.metrics.e2e.observe(now - ctx.arrival)
        gw.metrics.requests.labels(ctx.endpoint, status).inc()


def _usage_tokens(resp) -> int | None:
    try:
        usage = resp.json().get("usage") or {}
        return int(usage["total_tokens"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


async def _unless_disconnected(request: Request, call):
    """Await `call` unless the client disconnects first (then cancel it: closing the
    upstream connection aborts the request on the replica)."""
    task = asyncio.ensure_future(call)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise _ClientGone
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

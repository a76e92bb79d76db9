"""The path of one generation request through the gateway, cheapest checks first:

authenticate ─▶ read the body (size limit) ─▶ check its shape and limits ─▶ admit (key
limits) ─▶ tokenize (for routing, in a thread) ─▶ acquire a replica (queue) ─▶ stream
(`StreamSession`) or unary call, with retries (retry budget) ─▶ release.

A regional gateway (`--region`) asks its regional policy first, after tokenizing: a request
that goes to a peer region is passed through to that region's gateway (`spill`), and comes
back here if the peer fails before the first byte. A request whose local replicas fail it
before its first byte goes to the nearest healthy peer (failover). A peer's request (the
peer key and `X-Fleetserve-Spilled-From`) is served here, never sent on.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import re
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from fleetserve.gateway.api_keys import ANONYMOUS, ApiKey
from fleetserve.gateway.context import RawRequest, RequestContext
from fleetserve.gateway.gateway import DeadlineExceeded, Gateway, NoReplica, Outcome, Shed
from fleetserve.gateway.peers import Peer
from fleetserve.gateway.priority import DEFAULT_PRIORITY, PRIORITY_CLASSES
from fleetserve.gateway.regional_config import (
    PRIORITY_HEADER,
    SPILL_REASON_HEADER,
    SPILLED_FROM_HEADER,
)
from fleetserve.gateway.replica import Replica
from fleetserve.gateway.request_body import BodyShape, InvalidBody, charged_tokens, check_body
from fleetserve.gateway.route_request import RouteRequest
from fleetserve.gateway.spill import spill, usage_tokens
from fleetserve.gateway.stream import StreamSession, failure_status, local_failure
from fleetserve.gateway.upstream import UpstreamError, post_json, send_raw
from fleetserve.http.disconnect import ClientDisconnected, unless_disconnected
from fleetserve.http.errors import error_body
from fleetserve.http.request_id import request_id_or_new
from fleetserve.http.responses import ClosingStreamingResponse

logger = logging.getLogger(__name__)

# Longer single prompts are not tokenized for prefix routing (their estimate is used):
# tokenizing megabytes costs the gateway more than a cache hit saves.
MAX_TOKENIZED_PROMPT_CHARS = 256 * 1024
ENABLE_ADMIN = (
    "start the gateway with --operator-key (or $FLEETSERVE_OPERATOR_KEY, or operator_key "
    "in --gateway-config, or an 'admin: true' entry in --api-keys-file)"
)


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
            error_body(str(self), self.err_type, code=self.status), self.status, headers=headers
        )


def retry_after_seconds(retry_after_s: float) -> int:
    """A Retry-After header's whole seconds: at least 1, 60 for an unknown wait."""
    return max(1, math.ceil(retry_after_s)) if math.isfinite(retry_after_s) else 60


def too_many(reason: str, retry_after_s: float) -> HttpError:
    seconds = retry_after_seconds(retry_after_s)
    return HttpError(
        429,
        f"rate limited ({reason}); retry after {seconds}s",
        "rate_limit_exceeded",
        {"Retry-After": str(seconds)},
    )


def _presented_key(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else ""


def authenticate(gw: Gateway, request: Request) -> ApiKey:
    """The client's key; anonymous when no client key is configured."""
    if gw.api_keys is None or not gw.api_keys.clients_need_key:
        return ANONYMOUS
    presented = _presented_key(request)
    key = gw.api_keys.lookup(presented) if presented else None
    if key is None:
        raise HttpError(
            401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error"
        )
    return key


def authenticate_peer(gw: Gateway, request: Request) -> bool:
    """Whether the request presents this gateway's peer key (constant time)."""
    regions = gw.regions
    if regions is None or not regions.config.peer_key:
        return False
    presented = hashlib.sha256(_presented_key(request).encode()).digest()
    return hmac.compare_digest(presented, hashlib.sha256(regions.config.peer_key.encode()).digest())


def spilled_from(gw: Gateway, request: Request) -> tuple[str, ApiKey] | None:
    """(origin region, key) of a request a peer region sent here, or None for a client's.
    Only a peer may name its region: the header without the peer key is refused (403), so
    a client cannot skip the spill (or its key) by forging it. The priority class of the
    origin's client key comes in a header too, trusted for the same reason."""
    origin = request.headers.get(SPILLED_FROM_HEADER)
    if origin is None:
        return None
    if not authenticate_peer(gw, request):
        raise HttpError(
            403,
            f"{SPILLED_FROM_HEADER} is for peer gateways and needs the peer key",
            "permission_error",
        )
    if gw.regions.peers.get(origin) is None:
        # 403, not 400: the origin passes a 400 on to its client as the request's own fault,
        # but this one is the two gateways' configuration (the origin serves it itself).
        raise HttpError(
            403,
            f"{SPILLED_FROM_HEADER}: {origin[:64]!r} is not a peer region of this gateway",
            "permission_error",
        )
    priority = request.headers.get(PRIORITY_HEADER, DEFAULT_PRIORITY)
    if priority not in PRIORITY_CLASSES:
        raise HttpError(
            400, f"{PRIORITY_HEADER}: unknown class {priority[:32]!r}", "invalid_request_error"
        )
    return origin, ApiKey(f"peer:{origin}", priority=priority)


def authenticate_operator(gw: Gateway, request: Request, admin_api: bool) -> None:
    """Admin routes (`admin_api`) need an admin key and are off without one. Operator
    routes (/metrics, /docs) are open while no key at all is configured, and otherwise
    need an admin key too."""
    store = gw.api_keys
    if store is None and not admin_api:
        return
    if store is None or not store.has_admin:
        what = "the admin routes are off" if admin_api else "this route needs an operator key"
        raise HttpError(403, f"{what}: {ENABLE_ADMIN}", "permission_error")
    presented = _presented_key(request)
    key = store.lookup(presented) if presented else None
    if key is None:
        raise HttpError(
            401, "an operator key is required (Authorization: Bearer KEY)", "authentication_error"
        )
    if not key.admin:
        raise HttpError(403, "this key may not call operator routes", "permission_error")


async def read_json(request: Request, limit: int) -> object:
    """The body parsed as JSON; 413 past `limit` bytes (read no further), 400 if not JSON."""
    data = await read_body(request, limit)
    try:
        body = json.loads(data, parse_constant=_not_json, parse_float=_finite_float)
        if _SURROGATE_ESCAPE.search(data):  # only then can a string fail to encode
            json.dumps(body, ensure_ascii=False).encode()
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        detail = str(exc) if isinstance(exc, _NotJson | UnicodeEncodeError) else "not JSON"
        raise HttpError(
            400, f"the body must be a JSON object ({detail})", "invalid_request_error"
        ) from None
    return body


class _NotJson(ValueError):
    pass


def _not_json(name: str) -> float:
    raise _NotJson(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"{text[:32]} is out of range for a number")
    return value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a UTF-16 surrogate, \ud800-\udfff


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


async def handle_generate(gw: Gateway, request: Request, endpoint: str, chat: bool) -> Response:
    request_id = request_id_or_new(request.headers.get("x-request-id"))
    now = gw.clock()
    origin = None
    try:
        peer = spilled_from(gw, request)
        if peer is not None:
            origin, key = peer
        else:
            key = authenticate(gw, request)
        deadline = parse_deadline(request, gw, now)
        body = await read_json(request, gw.config.max_body_bytes)
        try:
            shape = check_body(body, endpoint, gw.config)
        except InvalidBody as exc:
            raise HttpError(400, str(exc), "invalid_request_error") from None
    except HttpError as err:
        gw.metrics.requests.labels(endpoint, str(err.status)).inc()
        return err.response(request_id)
    if origin is not None:
        reason = request.headers.get(SPILL_REASON_HEADER)
        reason = reason if reason in ("spill", "failover") else "spill"
        gw.metrics.region_requests.labels(origin, "in", reason).inc()
    charge = charged_tokens(shape.estimated_prompt_tokens, shape, gw.config.default_max_tokens)
    refused = _admit(gw, key, charge, now)
    if refused is not None:
        gw.metrics.requests.labels(endpoint, "429").inc()
        return refused.response(request_id)
    ids = await _prompt_ids(gw, body, endpoint, shape)
    if ids is not None and len(ids) > shape.estimated_prompt_tokens:
        # The estimate was low: charge the rest before any replica does the work.
        extra = len(ids) - shape.estimated_prompt_tokens
        refused = _admit(gw, key, extra, gw.clock(), top_up=True)
        if refused is not None:
            gw.admission.release(key, charge, 0, gw.clock())
            gw.metrics.requests.labels(endpoint, "429").inc()
            return refused.response(request_id)
        charge += extra
    route = RouteRequest(
        # the gateway's own id: the client's X-Request-Id may repeat, and the replicas'
        # prefill accounting is keyed by this one
        request_id=uuid.uuid4().hex,
        prompt_token_ids=tuple(ids) if ids is not None else None,
        num_prompt_tokens=len(ids) if ids is not None else shape.estimated_prompt_tokens,
        max_tokens=gw.config.default_max_tokens if shape.max_tokens is None else shape.max_tokens,
        priority_rank=key.priority_rank,
    )
    ctx = RequestContext(
        endpoint=endpoint,
        chat=chat,
        body=body,
        request_id=request_id,
        key=key,
        route=route,
        arrival=now,
        deadline=deadline,
        charged_tokens=charge,
        spilled_from=origin,
    )
    tried: set[str] = set()  # peer regions that failed it before its first byte
    if gw.regions is not None:
        choice = gw.regions.choose(route, origin, now)
        gw.metrics.region_decisions.labels(choice.reason).inc()
        if choice.leaves:
            peer = gw.regions.peers[choice.region]
            answer = await _spill(gw, ctx, request, peer, choice.reason)
            if answer is not None:
                return answer
            tried.add(peer.name)
    ctx.may_fail_over = gw.can_fail_over(origin)
    answer = await _serve_here(gw, ctx, request)
    if ctx.handed_over:
        # The local replicas failed it before its first byte: the nearest healthy region
        # that has not failed it already. The key's admission is still held (the local
        # attempt left it and the counting to this step), so it is not admitted twice.
        choice = gw.regions.choose(route, None, gw.clock(), local_failed=True, exclude=tried)
        if choice.leaves:
            gw.metrics.region_decisions.labels(choice.reason).inc()
            peer = gw.regions.peers[choice.region]
            spilled = await _spill(gw, ctx, request, peer, choice.reason)
            if spilled is not None:
                return spilled
        gw.account(ctx, str(answer.status_code), 0)  # nobody took it: the client got nothing
    return answer


async def _spill(
    gw: Gateway, ctx: RequestContext, request: Request, peer: Peer, reason: str
) -> Response | None:
    """`spill`, and if it is interrupted (the handler cancelled), the request's end: its
    key's admission is not left held."""
    try:
        return await spill(gw, ctx, request, peer, reason)
    except BaseException:
        gw.account(ctx, "499", 0)
        raise


async def _serve_here(gw: Gateway, ctx: RequestContext, request: Request) -> Response:
    """Serve `ctx` on this gateway's replicas. A failure before the first byte that a peer
    region might not have (no replica, every replica failed) is left in `ctx.local_failure`
    along with the answer."""
    gw.request_started(ctx)
    if ctx.stream:
        return await _stream(gw, ctx, request)
    try:
        return await _unary(gw, ctx, request)
    finally:
        gw.request_ended(ctx)


def _admit(
    gw: Gateway, key: ApiKey, tokens: int, now: float, top_up: bool = False
) -> HttpError | None:
    """None if admitted, else the 429 to answer."""
    if top_up:
        decision = gw.admission.charge_more(key, tokens, now)
    else:
        decision = gw.admission.admit(key, tokens, now)
    if decision.admitted:
        return None
    gw.metrics.shed.labels(decision.reason).inc()
    if decision.reason == "too_large":
        return HttpError(
            429,
            "the request may cost more tokens (prompt + prompts x n x max_tokens) than the "
            "key's tokens_per_min: lower max_tokens, n or the number of prompts",
            "rate_limit_exceeded",
        )
    return too_many(decision.reason, decision.retry_after_s)


async def _prompt_ids(gw: Gateway, body: dict, endpoint: str, shape: BodyShape) -> list[int] | None:
    """The prompt's token ids for prefix routing, tokenized off the event loop; None for
    batches, embeddings, huge prompts and when the gateway has no tokenizer."""
    if gw.prompts is None or endpoint == "/v1/embeddings" or not shape.single_prompt:
        return None
    if shape.estimated_prompt_tokens * 4 > MAX_TOKENIZED_PROMPT_CHARS:
        return None
    return await asyncio.to_thread(gw.prompts.prompt_ids, body, endpoint != "/v1/completions")


async def _stream(gw: Gateway, ctx: RequestContext, request: Request) -> Response:
    session = StreamSession(gw, ctx)
    try:
        # A client that leaves while its request waits for a slot leaves the queue at once.
        first = await unless_disconnected(request, session.open())
    except ClientDisconnected:
        gw.request_ended(ctx)
        gw.metrics.disconnects.inc()
        return Response(status_code=499)
    except (Shed, NoReplica, DeadlineExceeded, UpstreamError) as exc:
        gw.request_ended(ctx)  # (the session set ctx.local_failure)
        return _failure_response(gw, ctx, exc)
    except BaseException:
        gw.request_ended(ctx)
        raise

    async def on_close() -> None:
        await session.aclose()  # a no-op once the body's own end closed it
        gw.request_ended(ctx)

    return ClosingStreamingResponse(
        session.body(first),
        on_close=on_close,  # also if the client left before the body started
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
            503,
            f"no replica available: {exc}",
            "service_unavailable",
            {"Retry-After": str(retry_after_seconds(exc.retry_after_s))},
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
    if exc.busy:  # every replica tried is busy: the client may come back
        return too_many("replicas_busy", 1.0).response(ctx.request_id)
    return HttpError(502, f"every replica tried failed; last: {exc}", "upstream_error").response(
        ctx.request_id
    )


async def _unary(gw: Gateway, ctx: RequestContext, request: Request) -> Response:
    """A non-streamed request: retried whole on another replica while it fails (nothing was
    sent to the client yet, and greedy answers do not change)."""
    status, used = "502", None
    replica: Replica | None = None
    retries = 0
    try:
        # A client that leaves while its request waits for a slot leaves the queue at once.
        replica = await unless_disconnected(request, gw.acquire(ctx.route, ctx.deadline))
        while True:
            started = gw.clock()
            remaining = ctx.remaining(started)
            timeout = gw.config.unary_timeout_s if remaining is None else max(remaining, 0.001)
            headers = ctx.upstream_headers(retries, replica)
            if ctx.raw is not None:
                call = send_raw(
                    gw.client,
                    ctx.raw.method,
                    f"{replica.url}{ctx.raw.path}",
                    ctx.raw.content,
                    {**ctx.raw.headers, **headers},
                    timeout,
                )
            else:
                call = post_json(
                    gw.client, f"{replica.url}{ctx.endpoint}", ctx.body_for(replica), headers,
                    timeout,
                )  # fmt: skip
            try:
                resp = await unless_disconnected(request, call)
            except UpstreamError as exc:
                # A timeout the client's own deadline caused is not the replica's failure.
                remaining = ctx.remaining(gw.clock())
                past_deadline = remaining is not None and remaining <= 0
                failed = exc.replica_failed and not past_deadline
                gw.release(
                    replica,
                    Outcome.FAILURE if failed else Outcome.NEUTRAL,
                    None,
                    ctx.route.request_id,
                )
                ctx.exclude.add(replica.id)
                replica = None
                if past_deadline:
                    raise DeadlineExceeded(str(exc)) from exc
                if retries >= gw.config.max_retries or not gw.allow_retry(ctx):
                    raise
                retries += 1
                gw.metrics.retries.labels(exc.reason).inc()
                await asyncio.sleep(gw.config.backoff(retries))
                fail_over = gw.can_fail_over(ctx.spilled_from)
                replica = await gw.route_now(ctx.route_request(), ctx.deadline, fail_over)
                continue
            outcome = Outcome.SUCCESS if resp.status_code == 200 else Outcome.NEUTRAL
            gw.release(replica, outcome, gw.clock() - started, ctx.route.request_id)
            replica = None
            status = str(resp.status_code)
            used = await usage_tokens(resp.content)
            if used is None and resp.status_code != 200:
                used = 0  # the replica refused it: nothing was generated
            headers = {"X-Request-Id": ctx.request_id}
            passed = {k: v for k, v in resp.headers.items() if k.lower() in PASSED_BACK}
            return Response(
                resp.content,
                resp.status_code,
                media_type=resp.headers.get("content-type", "application/json"),
                headers={**passed, **headers},
            )
    except ClientDisconnected:
        status = "499"
        gw.metrics.disconnects.inc()
        return Response(status_code=499)
    except (Shed, NoReplica, DeadlineExceeded, UpstreamError) as exc:
        status = failure_status(exc)
        used = 0  # the client received nothing: its key is not charged for it
        ctx.local_failure = local_failure(exc)
        return _failure_response(gw, ctx, exc)
    finally:
        if replica is not None:
            gw.release(replica, Outcome.NEUTRAL, None, ctx.route.request_id)
        if not ctx.handed_over:
            gw.account(ctx, status, used)


# Headers of a forwarded request that describe its body (the KServe v2 binary extension
# splits the body in a JSON header and raw tensor bytes), and of its answer.
PASSED_ON = frozenset({"content-type", "inference-header-content-length"})
PASSED_BACK = frozenset({"inference-header-content-length"})


async def read_body(request: Request, limit: int) -> bytes:
    """The body's bytes; 413 past `limit` (read no further), 499 if the client left."""
    too_large = HttpError(
        413, f"the body is larger than {limit} bytes (max_body_bytes)", "invalid_request_error"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    data = bytearray()
    try:
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_large
    except ClientDisconnect:  # left mid-body (or cut by --body-timeout): nobody to answer
        raise HttpError(499, "the client left before its body was read", "client_closed") from None
    return bytes(data)


async def handle_passthrough(
    gw: Gateway, request: Request, endpoint: str, path: str, method: str = "POST"
) -> Response:
    """A tensor model's call (`/predict`, KServe v2), forwarded to a replica as it came:
    the same keys, limits, queue, deadline and retries as a completion, no token accounting
    (a request costs one request, no tokens). `endpoint`: the route's template, for metrics;
    `path`: the replica path to call, built by the caller from checked parts."""
    request_id = request_id_or_new(request.headers.get("x-request-id"))
    now = gw.clock()
    try:
        key = authenticate(gw, request)
        deadline = parse_deadline(request, gw, now)
        headers = {k: v for k, v in request.headers.items() if k.lower() in PASSED_ON}
        for name, value in headers.items():
            if not value.isascii():  # legal on the wire, but it cannot be sent on
                raise HttpError(400, f"header {name} must be ASCII", "invalid_request_error")
        content = await read_body(request, gw.config.max_body_bytes) if method == "POST" else b""
    except HttpError as err:
        gw.metrics.requests.labels(endpoint, str(err.status)).inc()
        return err.response(request_id)
    refused = _admit(gw, key, 0, now)
    if refused is not None:
        gw.metrics.requests.labels(endpoint, "429").inc()
        return refused.response(request_id)
    ctx = RequestContext(
        endpoint=endpoint,
        chat=False,
        body={},
        request_id=request_id,
        key=key,
        route=RouteRequest(request_id=uuid.uuid4().hex, priority_rank=key.priority_rank),
        arrival=now,
        deadline=deadline,
        charged_tokens=0,
        raw=RawRequest(method, path, content, headers),
    )
    gw.request_started(ctx)
    try:
        return await _unary(gw, ctx, request)
    finally:
        gw.request_ended(ctx)

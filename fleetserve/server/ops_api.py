"""Operations routes: /health and /health/live (open, for probes), and the operator's
/metrics and KV-event stream (for the gateway's router), which need --operator-key once any
key is configured."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from fleetserve.http.responses import ClosingStreamingResponse
from fleetserve.http.sse import SSE_HEADERS, sse_event
from fleetserve.server.errors import APIError, error_response
from fleetserve.server.state import Phase, ServerState, get_state, require_operator_key

State = Annotated[ServerState, Depends(get_state)]

router = APIRouter()
operator = [Depends(require_operator_key)]

KEEPALIVE_S = 15.0  # an SSE comment this often, so proxies and clients see a live stream


@router.get("/health", responses={503: {"description": "loading, draining or engine down"}})
async def health(state: State) -> Response:
    """200 while the engine core answers and the replica takes work; 503 otherwise."""
    try:
        state.check_ready()
    except APIError as exc:
        return error_response(exc)
    return JSONResponse({"status": "ok"})


@router.get("/health/live", responses={503: {"description": "the engine failed or died"}})
async def live(state: State) -> Response:
    """Liveness, for a probe that restarts the process: 200 while it loads, serves or
    drains (a liveness probe on /health would kill a replica in the middle of its drain);
    503 once its model failed to load or its engine died."""
    phase = state.phase
    if phase is not Phase.LOADING and getattr(state.engine, "dead", None):  # not yet DEAD
        phase = Phase.DEAD
    if phase in (Phase.FAILED, Phase.DEAD):
        return error_response(APIError(503, f"the replica is {phase.value}", code=phase.value))
    return JSONResponse({"status": phase.value})


@router.get("/metrics", dependencies=operator, tags=["operator"])
async def metrics(state: State) -> Response:
    await state.engine.fresh_stats(timeout_s=0.2)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/kv_events", dependencies=operator, tags=["operator"])
async def kv_events(state: State, token_ids: bool = False) -> StreamingResponse:
    """SSE stream of the engine's prefix-cache changes, for a prefix-aware router. Each event
    is `{"block_size": B, "events": [{"kind": "stored"|"removed"|"cleared", "block_hashes":
    [...], "parent_hash": int}]}`. With `?token_ids=true` stored blocks also carry their
    `"token_ids": [[...], ...]`: every client's prompts, so never forward them to a client.
    A new subscriber starts from nothing (no snapshot): treat the replica's cache as empty at
    connect time."""
    state.check_ready()
    sub = state.engine.subscribe_kv_events()
    block_size = state.engine.block_size

    async def stream() -> AsyncIterator[str]:
        try:
            it = aiter(sub)
            while True:
                try:
                    batch = await asyncio.wait_for(anext(it), KEEPALIVE_S)
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                except StopAsyncIteration:
                    return
                if not token_ids:
                    batch = [{k: v for k, v in e.items() if k != "token_ids"} for e in batch]
                body = {"block_size": block_size, "events": batch}
                yield sse_event(body)
        finally:
            sub.close()

    return ClosingStreamingResponse(
        stream(), on_close=sub.close, media_type="text/event-stream", headers=SSE_HEADERS
    )

"""The replica's FastAPI app: routes, middleware, error bodies, and the engine's lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from fleetserve.server import errors, openai_api, ops_api
from fleetserve.server.middleware import BodyLimitMiddleware, RequestIdMiddleware
from fleetserve.server.state import ServerSettings, ServerState


def build_app(
    settings: ServerSettings,
    on_ready: Callable[[], None] | None = None,
    request_exit: Callable[[int], None] | None = None,
) -> FastAPI:
    """`request_exit(code)` asks the HTTP server to stop (after a drain, or with 1 when the
    engine dies); `on_ready()` runs once the model is loaded."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServerState(settings, on_ready, request_exit)
        app.state.server = state
        state.start()  # loads in the background; routes answer 503 until it is done
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="fleetserve",
        summary="An OpenAI-compatible replica: one model, continuous batching, paged KV cache.",
        version="0.1.0",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(openai_api.router)
    app.include_router(ops_api.router)
    # Outermost last: the request id is set before the body limit can answer 413.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app

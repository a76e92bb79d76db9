"""The replica's FastAPI app: routes, middleware, error bodies, and the engine's lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from fleetserve.server import errors, openai_api, ops_api
from fleetserve.server.middleware import BodyLimitMiddleware, RequestIdMiddleware
from fleetserve.server.state import (
    EngineFactory,
    ServerSettings,
    ServerState,
    llm_engine,
    require_operator_key,
)


def build_app(
    settings: ServerSettings,
    on_ready: Callable[[], None] | None = None,
    request_exit: Callable[[int], None] | None = None,
    engine_factory: EngineFactory = llm_engine,
) -> FastAPI:
    """`request_exit(code)` asks the HTTP server to stop (after a drain, or with 1 when the
    engine dies); `on_ready()` runs once the model is loaded; `engine_factory(settings)`
    makes the engine behind the routes (default: the LLM engine of `settings.engine`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServerState(settings, on_ready, request_exit, engine_factory)
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
        # The schema and its viewers are operator routes (below), not FastAPI's open ones.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        # No 307 to the slash-less path: its Location would echo the client's Host header.
        redirect_slashes=False,
    )
    errors.install(app)
    app.include_router(openai_api.router)
    app.include_router(ops_api.router)
    _add_docs(app)
    # Outermost last: the request id is set before the body limit can answer 413.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app


def _add_docs(app: FastAPI) -> None:
    """/openapi.json, /docs and /redoc behind the operator key. A browser sends no bearer
    token: with a key configured, fetch the schema with curl, or view it without keys."""
    operator = [Depends(require_operator_key)]
    title = app.title

    @app.get("/openapi.json", dependencies=operator, include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=operator, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{title} - Swagger UI")

    @app.get("/redoc", dependencies=operator, include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{title} - ReDoc")
